"""Helpers several metrics share: label lookup, batched image scoring, top-k hits, weight files."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Callable

from recare_cli.errors import ModelNotAvailable, RecareError, UsageError
from recare_cli.evaluate import EvalContext, EvalImage, Row, open_rgb
from recare_cli.models.files import load_tensor_file

BATCH_SIZE = 16


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def find_label(target: str | int, labels: list[str], flag: str = "--target") -> int:
    """The index of `target` among `labels`: an index, a name, or a unique part of one.

    Names compare without case, spaces or punctuation, so "Van Gogh" finds "vincent-van-gogh".
    """
    text = str(target).strip()
    if text.isdigit():
        index = int(text)
        if index >= len(labels):
            raise UsageError(f"{flag} {index} is out of range: the classifier has {len(labels)} classes")
        return index
    wanted = _normal(text)
    normal = [_normal(label) for label in labels]
    exact = [i for i, n in enumerate(normal) if n == wanted]
    partial = [i for i, n in enumerate(normal) if wanted and wanted in n]
    found = exact or partial
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(labels[i] for i in found[:6]) + (", …" if len(found) > 6 else "")
        raise UsageError(f"{flag} '{text}' matches {len(found)} classes ({names})", hint="be more specific or give the class index")
    close = difflib.get_close_matches(text, labels, n=4, cutoff=0.6)
    raise UsageError(f"{flag} '{text}' is not one of the classifier's {len(labels)} classes",
                     hint=f"did you mean {', '.join(close)}?" if close else "give a class name or index")


def score_images(ctx: EvalContext, images: list[EvalImage], score: Callable, description: str,
                 batch_size: int = BATCH_SIZE):
    """Run `score(list of RGB PIL images) -> tensor (batch, …)` over `images` in batches; concatenated."""
    import torch

    parts = []
    with ctx.reporter.progress(f"{description} ({ctx.label})", total=len(images)) as task, torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            parts.append(score([open_rgb(image) for image in batch]).float().cpu())
            task.advance(len(batch))
    return torch.cat(parts)


def topk_hit_rows(images: list[EvalImage], logits, labels: list[str], target: int, k: int) -> list[Row]:
    """Per image: the top-1 class and whether the target is in the top 1 / top k; then the hit rates (%)."""
    k = min(k, len(labels))
    ranked = logits.topk(k, dim=1).indices.tolist()
    rows = []
    for image, top in zip(images, ranked):
        rows.append(Row({"image": image.file},
                        {"top1_class": labels[top[0]], "hit_top1": int(top[0] == target), f"hit_top{k}": int(target in top),
                         "verdict": f"{'hit' if target in top else 'miss'} (top-1: {labels[top[0]]})"},
                        detail=True))
    count = len(rows)
    rows.append(Row({"target": labels[target]}, {
        "top1_pct": 100.0 * sum(r.values["hit_top1"] for r in rows) / count,
        f"top{k}_pct": 100.0 * sum(r.values[f"hit_top{k}"] for r in rows) / count,
        "images": count,
    }))
    return rows


def pretrained_file(given: str | Path | None, file_names: tuple[str, ...], url: str, what: str, flag: str,
                    offline: bool) -> Path:
    """A weights file: `flag`'s value, else torch's hub cache, else downloaded there unless offline."""
    import torch

    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UsageError(f"{flag} '{given}' is not a file")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in file_names:
        if (cache / name).is_file():
            return cache / name
    if not offline:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cache / file_names[0]), progress=False)
            return cache / file_names[0]
        except Exception:  # noqa: BLE001 - any download failure means "not available", said below
            pass
    raise ModelNotAvailable(
        f"{what} weights are not available{' offline' if offline else ''} (looked for {cache / file_names[0]})",
        hint=f"download {url} elsewhere and pass {flag} {file_names[0]}",
    )


def read_state_dict(path: Path, what: str, flag: str) -> dict:
    """A name → tensor mapping from a .pth/.pt/.safetensors file, unwrapped from common checkpoint wrappers."""
    import torch

    try:
        state = load_tensor_file(path, f"{flag} '{path}'")
    except RecareError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable is a user error whatever the reason
        raise RecareError(f"{flag} '{path}' is not a {what} checkpoint: {type(exc).__name__}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecareError(f"{flag} '{path}' is not a {what} checkpoint (no name → tensor state dict)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
