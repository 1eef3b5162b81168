"""Adversarial attacks on an (erased) model, for `recare eval --attack NAME`.

How an attack works (the contract plugins implement)
----------------------------------------------------
An attack is a `recare_cli.plugins.Attack` registered from a `recare.attacks` entry point, exactly
as recare's own (recare_cli/builtins/attacks.py)::

    from recare_cli.attacks import Adversarial, AttackContext, AttackTarget
    from recare_cli.plugins import Attack

    def shout(ctx: AttackContext, target: AttackTarget) -> Adversarial:
        return Adversarial(prompt=target.prompt.upper())

    def register(register):
        register(Attack("shout", shout, "the prompt in capitals"))

- `run(ctx, target)` is called once per prompt and seed of the run, for every attacked model (the
  evaluated one, and the base model too with `--compare`), and returns the adversarial prompt it
  found. Prompts already attacked in an earlier run of the same command are not asked again.
- `target` is the prompt, its image seed and, for an attack with `needs_target_images`, the base
  model's image of that prompt and seed (`target.target_image`).
- `ctx.models` is the attacked model (`recare_cli.erase.context.EraseModels`: UNet, VAE, text
  encoder(s) and tokenizer(s), DDIM scheduler, all frozen, float32); an attack must leave its
  weights as they are. `models.encode`/`encode_ids` give the UNet's conditioning for any model
  family and `models.eps` predicts with it (SDXL: pooled embedding and time ids included). `ctx.vocabulary()` is the tokenizer's own tokens (no special or learned ones).
  `ctx.option("steps", default)` reads `--attack-steps` (also "tokens", "lr"); `ctx.seed(target)`
  is a seed for this target derived from `--attack-seed`; `ctx.shared(key, factory)` keeps one
  object for every prompt of this model (a learned token); `ctx.progress(total)` is this prompt's
  progress bar; `ctx.work_dir` holds the attack's own files (checkpoints, loss logs).
- An attack with `needs_concept_images` gets `ctx.concept`: the erased concept(s), images of them
  and the concept type's caption templates.
- Soft attacks (a prompt using learned embeddings) return them in `Adversarial.embeddings`
  (token -> embedding; SDXL: both encoders' rows end to end, as recare's textual inversion learns them); recare adds them to the tokenizer to render the images and writes them to
  the results. Images of every adversarial prompt are rendered by recare and judged by the run's
  metrics exactly like the plain images.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recare_cli.output import QUIET_REPORTER, Reporter


@dataclass(frozen=True)
class AttackSettings:
    """The `--attack-*` options; None means the attack's own default."""

    steps: int | None = None
    tokens: int | None = None
    lr: float | None = None
    seed: int = 42
    images: Path | None = None

    def given(self) -> dict:
        """The options the user set, as the attack reads them."""
        return {k: v for k, v in (("steps", self.steps), ("tokens", self.tokens), ("lr", self.lr),
                                   ("images", self.images)) if v is not None}


@dataclass(frozen=True)
class ConceptSource:
    """What concept-inversion learns from: the erased concept(s) and images of them."""

    concepts: tuple[str, ...]
    images: tuple[Path, ...]
    templates: tuple[str, ...]
    initializer_token: str


@dataclass(frozen=True)
class AttackTarget:
    prompt: str
    seed: int
    file: str  # the plain image of this prompt and seed
    case_number: str | None = None
    target_image: Path | None = None  # the base model's image of this prompt and seed

    @property
    def key(self) -> str:
        return self.file


@dataclass
class Adversarial:
    prompt: str
    losses: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # a discrete attack's tokens, as found
    embeddings: dict[str, Any] = field(default_factory=dict)  # a soft attack's tokens: name -> embedding


@dataclass
class AttackContext:
    """What an attack sees of one attacked model; see the module docstring."""

    attack: str
    label: str
    model_name: str  # --model (the attack's defaults may depend on it: toy)
    models: Any  # EraseModels
    settings: AttackSettings
    work_dir: Path
    reporter: Reporter = QUIET_REPORTER
    concept: ConceptSource | None = None
    resolution: int = 512
    cache: dict = field(default_factory=dict)
    current: AttackTarget | None = None

    def option(self, name: str, default: Any = None) -> Any:
        value = self.settings.given().get(name)
        return default if value is None else value

    def seed(self, target: AttackTarget) -> int:
        """A seed of (--attack-seed, prompt, image seed): the same whatever order or rerun finds the prompt."""
        text = f"{self.settings.seed}\0{target.prompt}\0{target.seed}".encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:6], "big")

    def shared(self, key, factory: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = factory()
        return self.cache[key]

    def vocabulary(self):
        """Ids of the tokenizers' own vocabulary: no special tokens, no tokens an erase run added.

        SDXL's two tokenizers share one vocabulary but not their special tokens (the second pads
        with "!"): the ids are those that mean the same plain token in every tokenizer of the model.
        """
        import torch

        tokenizers = [tokenizer for _, tokenizer in self.models.text_encoders]
        special = {i for tokenizer in tokenizers for i in tokenizer.all_special_ids}
        size = min(tokenizer.vocab_size for tokenizer in tokenizers)
        return torch.tensor([i for i in range(size) if i not in special], device=self.models.device)

    @contextmanager
    def progress(self, total: int | None, what: str = ""):
        target = self.current
        where = f" '{target.prompt}' seed {target.seed}" if target is not None else ""
        with self.reporter.progress(f"{what or self.attack} ({self.label}){where}", total=total) as task:
            yield task
