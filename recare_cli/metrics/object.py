"""`object`: is the erased object still recognisable? ImageNet top-1 / top-k hits of `--target`.

The paper uses torchvision's ImageNet ResNet-50. Its weights come from `--classifier-weights`,
torch's hub cache (TORCH_HOME/hub/checkpoints) or a download when online. Any torchvision ResNet
state dict loads (depth and block type are read from its keys). `--zero-shot` classifies with
CLIP over the 1,000 ImageNet class names instead and needs no classifier weights.
"""

from __future__ import annotations

from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.evaluate import EvalContext, Row
from recare_cli.metrics.common import find_label, pretrained_file, read_state_dict, score_images, topk_hit_rows
from recare_cli.models import is_offline

RESNET50_FILES = ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")  # torchvision's V2, then V1
RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
ZERO_SHOT_TEMPLATE = "a photo of a {}."
DEFAULT_TOP_K = 5
FLAG = "--classifier-weights"


def imagenet_classes() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def build_resnet(state: dict, path: Path):
    """A torchvision ResNet shaped after `state` (ResNet-18 … 152), with `state` loaded."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if "conv1.weight" not in state or "fc.weight" not in state:
        raise RecareError(f"{FLAG} '{path}' is not a torchvision ResNet classifier (no conv1/fc weights)",
                          hint="pass ImageNet ResNet-50 weights such as resnet50-11ad3fa6.pth, or use --zero-shot")
    layers = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise RecareError(f"{FLAG} '{path}' is not a torchvision ResNet classifier (no layer{stage})")
        layers.append(max(blocks) + 1)
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    model = ResNet(block, layers, num_classes=state["fc.weight"].shape[0])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecareError(f"{FLAG} '{path}' does not fit a torchvision ResNet: {str(exc).splitlines()[1].strip()}") from None
    return model.eval()


def classifier_file(ctx: EvalContext) -> Path:
    return pretrained_file(ctx.option("classifier_weights"), RESNET50_FILES, RESNET50_URL,
                           "ImageNet ResNet-50 classifier", FLAG, is_offline(ctx.runtime.offline))


def resnet_scorer(ctx: EvalContext):
    """(score function, class names) for the ResNet classifier."""
    import torch
    from torchvision import transforms

    path = classifier_file(ctx)
    model = ctx.shared(("resnet", str(path)), lambda: build_resnet(read_state_dict(path, "classifier", FLAG), path))
    model.to(ctx.device)
    classes = model.fc.out_features
    labels = imagenet_classes() if classes == 1000 else [str(i) for i in range(classes)]
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def score(images):
        return model(torch.stack([preprocess(image) for image in images]).to(ctx.device))

    return score, labels


def clip_scorer(ctx: EvalContext):
    labels = imagenet_classes()
    clip = ctx.clip()
    text = ctx.shared(("imagenet-text", clip.key), lambda: clip.encode_text([ZERO_SHOT_TEMPLATE.format(c) for c in labels]))

    def score(images):
        return clip.encode_images(images) @ text.T

    return score, labels


def check(ctx: EvalContext) -> None:
    if ctx.option("zero_shot", False):
        ctx.check_clip()
        find_label(ctx.option("target"), imagenet_classes())
    else:
        classifier_file(ctx)  # the target is checked against the classes its weights have, when they load


def run(ctx: EvalContext) -> list[Row]:
    score, labels = clip_scorer(ctx) if ctx.option("zero_shot", False) else resnet_scorer(ctx)
    target = find_label(ctx.option("target"), labels)
    images = ctx.images()
    logits = score_images(ctx, images, score, "object")
    return topk_hit_rows(images, logits, labels, target, int(ctx.option("top_k", DEFAULT_TOP_K)))
