"""`care`: the CARE score (recare-method.md §7): CLIP zero-shot classification over 82 labels.

Each image is classified among the 80 COCO classes plus `stars` and `freshwater` (plus any
`--labels-file` lines) with the text "a photo of a {label}"; for each prompt and `--targets`
label the result is the top-1 rate (%) of that label and the mean cosine similarity between the
images and the label's text. The rows with prompt "(all)" are the overall score of each target.
"""

from __future__ import annotations

from pathlib import Path

from recare_cli.errors import UsageError
from recare_cli.evaluate import EvalContext, Row
from recare_cli.metrics.common import score_images

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
CARE_LABELS = COCO_CLASSES + ("stars", "freshwater")
TEMPLATE = "a photo of a {}"
ALL = "(all)"


def label_set(labels_file: str | Path | None) -> list[str]:
    labels = list(CARE_LABELS)
    if labels_file is None:
        return labels
    path = Path(labels_file).expanduser()
    try:
        extra = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --labels-file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    if not extra:
        raise UsageError(f"--labels-file '{path}' holds no labels", hint="one label a line")
    known = {label.lower() for label in labels}
    return labels + [label for label in dict.fromkeys(extra) if label.lower() not in known]


def target_indices(targets, labels: list[str]) -> list[int]:
    lowered = [label.lower() for label in labels]
    names = [t.strip() for item in targets for t in str(item).split(",") if t.strip()]
    unknown = [name for name in names if name.lower() not in lowered]
    if unknown:
        raise UsageError(f"--targets: '{', '.join(unknown)}' not among the {len(labels)} CARE labels",
                         hint="add them with --labels-file FILE (one label a line)")
    return list(dict.fromkeys(lowered.index(name.lower()) for name in names))


def check(ctx: EvalContext) -> None:
    target_indices(ctx.option("targets"), label_set(ctx.option("labels_file")))
    ctx.check_clip()


def run(ctx: EvalContext) -> list[Row]:
    labels = label_set(ctx.option("labels_file"))
    targets = target_indices(ctx.option("targets"), labels)
    clip = ctx.clip()
    text = clip.encode_text([TEMPLATE.format(label) for label in labels])
    images = ctx.images()
    similarity = score_images(ctx, images, lambda batch: clip.encode_images(batch) @ text.T, "care")
    top1 = similarity.argmax(dim=1)
    groups: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        if image.prompt is not None:
            groups.setdefault(image.prompt, []).append(i)
    groups[ALL] = list(range(len(images)))
    rows = []
    for prompt, members in groups.items():
        for target in targets:
            rows.append(Row({"prompt": prompt, "target": labels[target]}, {
                "top1_pct": 100.0 * float((top1[members] == target).float().mean()),
                "similarity": float(similarity[members, target].mean()),
                "images": len(members),
            }))
    return rows
