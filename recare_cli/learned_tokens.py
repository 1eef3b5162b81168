"""Learned tokens (an erase run's adversarial tokens, an attack's, `--embeddings` files): one
tokens.safetensors layout for reading, writing and adding them to a pipeline's text encoder(s).

SD 1.x/2.x have one text encoder, SDXL two; a token is one row per encoder, and SDXL's file keeps
them as `clip_l`/`clip_g` matrices, the layout A1111 and ComfyUI read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from recare_cli.errors import RecareError, UsageError
from recare_cli.models import ModelRef, is_sdxl


SDXL_TOKEN_KEYS = ("clip_l", "clip_g")  # SDXL embeddings' rows per text encoder, as A1111 and ComfyUI name them


def text_encoder_pairs(pipe) -> list:
    """(text encoder, tokenizer) pairs of a pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    return pairs + [(pipe.text_encoder_2, pipe.tokenizer_2)] if is_sdxl(pipe) else pairs


def learned_tokens_tensors(tokens: dict) -> dict:
    """What tokens.safetensors holds for {name: [row per text encoder]}.

    SD 1.x/2.x: {name: row}. SDXL: {"clip_l": [n, D1], "clip_g": [n, D2]}, one row per token in the
    order of the file's `tokens` metadata: the layout SDXL embeddings have everywhere.
    """
    import torch

    if all(len(rows) == 1 for rows in tokens.values()):
        return {name: rows[0] for name, rows in tokens.items()}
    return {key: torch.stack([rows[i].reshape(-1) for rows in tokens.values()]) for i, key in enumerate(SDXL_TOKEN_KEYS)}


def write_learned_tokens(path: Path, tokens: dict, metadata: dict | None = None) -> None:
    """Write {name: [row per text encoder]} as a tokens.safetensors (atomically), names in order in its metadata."""
    from recare_cli.fsutil import write_safetensors

    write_safetensors(path, learned_tokens_tensors(tokens), {"tokens": json.dumps(list(tokens)), **(metadata or {})})


def read_learned_tokens(path: Path) -> dict:
    """{name: [row per text encoder]} from a tokens.safetensors, in the order the run learned them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata() or {}
    if not tensors:
        raise RecareError(f"'{path}' holds no token embeddings")
    try:
        order = [t for t in json.loads(metadata.get("tokens", "[]")) if isinstance(t, str)]
    except ValueError:
        order = []
    if set(tensors) == set(SDXL_TOKEN_KEYS):
        count = tensors["clip_l"].shape[0]
        if len(order) != count or tensors["clip_g"].shape[0] != count:
            raise RecareError(f"'{path}' holds SDXL embeddings for {count} tokens but names {len(order)} in its metadata")
        return {name: [tensors[key][i] for key in SDXL_TOKEN_KEYS] for i, name in enumerate(order)}
    order = [t for t in order if t in tensors]
    return {t: [tensors[t]] for t in order + sorted(set(tensors) - set(order))}


EMBEDDINGS_HINT = ("pass an embeddings.safetensors of `recare eval --attack`, or the tokens.safetensors of an erase "
                   "run or of `recare export --format tokens`")


def read_embeddings_files(specs) -> list[tuple[str, dict]]:
    """(spec, {name: [row per text encoder]}) of each `--embeddings` file: cheap checks, before any model loads."""
    read = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"--embeddings '{spec}': no such file", hint=EMBEDDINGS_HINT)
        try:
            tokens = read_learned_tokens(path)
        except RecareError as exc:
            raise UsageError(f"--embeddings '{spec}': {exc.message}", hint=exc.hint or EMBEDDINGS_HINT) from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
            raise UsageError(f"--embeddings '{spec}' is not a safetensors file of token embeddings "
                             f"({type(exc).__name__})", hint=EMBEDDINGS_HINT) from None
        read.append((str(spec), tokens))
    return read


def text_encoder_widths(ref: ModelRef) -> list[int] | None:
    """Token-embedding widths of the model's text encoder(s), from its configs; None where only loading tells."""
    if ref.kind == "single-file":
        return None
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        config = ref.path / name / "config.json"
        if config.is_file():
            widths.append(int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"]))
    return widths or None


def check_token_widths(embeddings: dict, widths: list[int], source: str) -> None:
    """Every token has one row per text encoder, each as wide as that encoder's embeddings."""
    for name, rows in embeddings.items():
        got = [int(row.numel()) for row in rows]
        if got != widths:
            raise RecareError(f"{source} holds token '{name}' with {'+'.join(map(str, got))} dimensions, this model's "
                              f"text encoder(s) take {'+'.join(map(str, widths))}",
                              hint="the tokens were learned on another base model; pass that one with --model")


def check_tokens_are_new(pipe, embeddings: dict, source: str) -> None:
    """A token the tokenizer already has must mean the same (the same file twice), or the prompts change meaning."""
    import torch

    pairs = text_encoder_pairs(pipe)
    vocabulary = pipe.tokenizer.get_vocab()
    for name, rows in embeddings.items():
        if name in vocabulary and not all(
                torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(name)].detach().cpu(),
                            row.reshape(-1).to(encoder.dtype)) for (encoder, tokenizer), row in zip(pairs, rows)):
            raise RecareError(f"{source}: token '{name}' is already in this model's vocabulary with another meaning",
                              hint="a learned token must be a new word: leave out the file that defines it again")


def add_learned_tokens(pipe, path: Path, embeddings: dict | None = None, source: str | None = None) -> list[str]:
    """Add learned tokens (a tokens.safetensors: an erase run's, an attack's) to the pipeline's text encoder(s).

    `embeddings` is the file's content when the caller read it already. Tokens the tokenizer has
    already are left as they are.
    """
    import torch

    embeddings = read_learned_tokens(path) if embeddings is None else embeddings
    pairs = text_encoder_pairs(pipe)
    check_token_widths(embeddings, [encoder.get_input_embeddings().weight.shape[1] for encoder, _ in pairs],
                       source or f"'{path}'")
    names = [name for name in embeddings if name not in pipe.tokenizer.get_vocab()]
    for i, (encoder, tokenizer) in enumerate(pairs):
        tokenizer.add_tokens(names)
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for name in names:
                table[tokenizer.convert_tokens_to_ids(name)] = embeddings[name][i].reshape(-1).to(table.dtype)
    return names


def check_embeddings_files(specs, ref: ModelRef) -> list[tuple[str, dict]]:
    """Read every `--embeddings` file and check its widths against the model's configs, before the model loads."""
    token_files = read_embeddings_files(specs)
    widths = text_encoder_widths(ref) if token_files else None
    if widths:
        for spec, tokens in token_files:
            _as_usage_error(check_token_widths, tokens, widths, f"--embeddings '{spec}'")
    return token_files


def add_embeddings_files(pipe, token_files: list[tuple[str, dict]]) -> None:
    """Add the tokens of `check_embeddings_files`'s files to the loaded pipeline."""
    for spec, tokens in token_files:
        _as_usage_error(check_tokens_are_new, pipe, tokens, f"--embeddings '{spec}'")
        _as_usage_error(add_learned_tokens, pipe, Path(spec), tokens, f"--embeddings '{spec}'")


def _as_usage_error(check: Callable, *args) -> None:
    """A file the user named that does not fit the model is theirs to change: exit 2, as any bad argument."""
    try:
        check(*args)
    except UsageError:
        raise
    except RecareError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
