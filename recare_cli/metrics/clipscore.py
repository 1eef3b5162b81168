"""`clipscore`: how well each image matches its prompt, 100 * max(cos(image, prompt), 0).

That is CLIP score as torchmetrics defines it (torchmetrics uses ViT-L/14 by default; recare uses
the run's CLIP, ViT-B-32/openai unless `--clip-model` says otherwise). Prompts come from the
generated images' manifest, so an `--images` folder needs the manifest.jsonl `recare generate` writes.
"""

from __future__ import annotations

from recare_cli.errors import UsageError
from recare_cli.evaluate import EvalContext, Row
from recare_cli.metrics.common import score_images


def clip_score(image_embeddings, text_embeddings):
    """Row-wise CLIP score of L2-normalised embeddings: 100 * max(cosine, 0)."""
    return 100.0 * (image_embeddings * text_embeddings).sum(dim=1).clamp(min=0)


def check(ctx: EvalContext) -> None:
    ctx.check_clip()


def run(ctx: EvalContext) -> list[Row]:
    clip = ctx.clip()
    images = ctx.images()
    unprompted = [image.file for image in images if image.prompt is None]
    if unprompted:
        raise UsageError(f"clipscore needs each image's prompt, unknown for {len(unprompted)} image(s) "
                         f"such as {unprompted[0]}",
                         hint="evaluate a folder written by `recare generate` (it has manifest.jsonl), or generate with --prompt")
    image_embeddings = score_images(ctx, images, clip.encode_images, "clipscore")
    scores = clip_score(image_embeddings, clip.encode_text([image.prompt for image in images]))
    rows = [Row({"image": image.file}, {"clipscore": float(score)}, detail=True) for image, score in zip(images, scores)]
    rows.append(Row({}, {"clipscore": float(scores.mean()), "images": len(images)}))
    return rows
