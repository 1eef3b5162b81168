"""Concept inversion (Pham et al., ICLR 2024, "Circumventing concept erasure methods for text-to-image
generative models"; NYU-DICE-Lab/circumventing-concept-erasure): a new token is learned by textual
inversion on the attacked model from images of the concept, then stands in for the concept.

The inversion is recare's own (recare_cli/erase/inversion.py, ReCARE's stage 1 step 2): one new
embedding row, AdamW lr 5e-3, the concept type's caption templates, initialised from its
initializer token, on the attacked model's frozen weights. Steps: `--attack-steps`, default
recare's textual-inversion default (3,000; 1,000 for `--model toy`, as erase's toy preset).
The token is learned once per attacked model and shared by every prompt: each prompt says it
where it said the concept (case-insensitive, whole words), or starts with it when it does not
name the concept. On SDXL the token is learned in both text encoders, as erase learns its own.
"""

from __future__ import annotations

import re

from recare_cli.attacks import Adversarial, AttackContext, AttackTarget

TOKEN_FILE = "concept-token.safetensors"
TOKEN_ROUND = 100  # new_token_name's round: never the name of an erase run's own tokens (rounds 0, 1, ...)


def default_steps(model: str) -> int:
    from recare_cli.erase.inversion import InversionSettings
    from recare_cli.presets import MODEL_DEFAULTS

    return MODEL_DEFAULTS.get(model, {}).get("ti_steps", InversionSettings().steps)


def with_token(prompt: str, concepts: tuple[str, ...], token: str) -> str:
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(c)}(?!\w)" for c in concepts), re.IGNORECASE)
    replaced, count = pattern.subn(token, prompt)
    return replaced if count else f"{token} {prompt}"


def learn_token(ctx: AttackContext) -> tuple[str, object]:
    """(token, embedding): read back from an earlier run's file, or learned now and written there."""
    from recare_cli.erase.inversion import (
        InversionSettings, add_token, initializer_id, inversion_stage, new_token_name, token_embedding,
    )
    from recare_cli.erase.loop import StageLoop
    from recare_cli.fsutil import read_safetensors

    models = ctx.models
    saved = ctx.work_dir / TOKEN_FILE
    if saved.is_file():
        (name, embedding), = read_safetensors(saved)[0].items()
        add_token(models, name, embedding)
        return name, embedding
    concept = ctx.concept
    name = new_token_name(ctx.settings.seed, TOKEN_ROUND, set(models.tokenizer.get_vocab()))
    initial = token_embedding(models, initializer_id(models.tokenizer, concept.initializer_token))
    token_id = add_token(models, name, initial.clone())
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    steps = int(ctx.option("steps", default_steps(ctx.model_name)))
    settings = InversionSettings(steps=steps, lr=float(ctx.option("lr", InversionSettings.lr)), resolution=ctx.resolution)
    with ctx.progress(steps, what="concept-inversion token") as task:
        loop = StageLoop(ctx.work_dir, "concept-inversion", steps, ctx.settings.seed, checkpoint_every=100,
                         reporter=ctx.reporter, task=task)
        embedding = inversion_stage(models, token_id, list(concept.images), concept.templates, name, settings, loop)
        loop.save_stage(saved, {name: embedding})
    return name, embedding


def run(ctx: AttackContext, target: AttackTarget) -> Adversarial:
    name, embedding = ctx.shared("token", lambda: learn_token(ctx))
    return Adversarial(with_token(target.prompt, ctx.concept.concepts, name), embeddings={name: embedding})
