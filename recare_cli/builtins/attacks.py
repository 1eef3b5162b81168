"""Built-in attacks for `recare eval --attack`, registered exactly as a third-party `recare.attacks` plugin.

The modules are imported lazily so that listing attacks (`recare plugins list`) imports no torch.
"""

from importlib import import_module

from recare_cli.plugins import Attack


def _lazy(module: str):
    def run(ctx, target):
        return import_module(f"recare_cli.attacks.{module}").run(ctx, target)

    return run


def register(register):
    register(Attack(
        "unlearndiffatk", _lazy("unlearndiffatk"),
        "UnlearnDiffAtk (Zhang et al., ECCV 2024): a prefix of k vocabulary tokens that makes the attacked "
        "model denoise the base model's image of the prompt (--compare base)",
        needs_target_images=True, options=("steps", "tokens", "lr"),
    ))
    register(Attack(
        "concept-inversion", _lazy("concept_inversion"),
        "Concept inversion (Pham et al., ICLR 2024): a token learned by textual inversion on the attacked model "
        "from images of the concept replaces the concept in each prompt",
        needs_concept_images=True, options=("steps", "lr", "images"),
    ))
