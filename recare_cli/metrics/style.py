"""`style`: is the erased artist still recognisable? A hit when `--target` is in the classifier's top k (3).

The classifier is a Hugging Face image-classification folder given by `--classifier-weights`
(the paper's is a 129-class WikiArt ViT): config.json with id2label, the weights, and
preprocessor_config.json. Without the latter, a ViT's standard processing (the config's image
size, mean and std 0.5) is used, as the WikiArt ViT was trained with it.
"""

from __future__ import annotations

from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.evaluate import EvalContext, Row
from recare_cli.metrics.common import find_label, score_images, topk_hit_rows

DEFAULT_TOP_K = 3
FLAG = "--classifier-weights"


def classifier_folder(ctx: EvalContext) -> Path:
    path = Path(ctx.option("classifier_weights")).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise RecareError(f"{FLAG} '{path}' is not an image-classification checkpoint folder (no config.json)",
                          hint="pass a folder saved with save_pretrained, e.g. the WikiArt ViT")
    return path


def load_classifier(path: Path):
    """(model, image processor) from a `classifier_folder`, or a one-line error."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

    from recare_cli.output import quiet_libraries

    quiet_libraries()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecareError(f"{FLAG} '{path}' is not an image-classification checkpoint: {first}") from None
    if (path / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        size = getattr(config, "image_size", 224)
        processor = ViTImageProcessor(size={"height": size, "width": size})
    return model.eval(), processor


def check(ctx: EvalContext) -> None:
    classifier_folder(ctx)


def run(ctx: EvalContext) -> list[Row]:
    path = classifier_folder(ctx)
    model, processor = ctx.shared(("hf-classifier", str(path)), lambda: load_classifier(path))
    model.to(ctx.device)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    target = find_label(ctx.option("target"), labels)
    images = ctx.images()

    def score(batch):
        inputs = processor(images=batch, return_tensors="pt")
        return model(pixel_values=inputs["pixel_values"].to(ctx.device, model.dtype)).logits

    logits = score_images(ctx, images, score, "style")
    return topk_hit_rows(images, logits, labels, target, int(ctx.option("top_k", DEFAULT_TOP_K)))
