"""`fid`: Fréchet Inception Distance between `--reference-dir` images (e.g. COCO-30k) and the generated ones.

Features are the 2048-d pool features of torchvision's Inception v3 (ImageNet weights
inception_v3_google-0cc3c7bd.pth from `--inception-weights`, torch's hub cache, or a download
when online), images resized to 299x299. These are not pytorch-fid's TF-ported weights, so values
are comparable between recare runs, not digit for digit with published FID tables.
"""

from __future__ import annotations

from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.evaluate import EVAL_IMAGE_SUFFIXES, EvalContext, EvalImage, Row
from recare_cli.fsutil import list_images
from recare_cli.metrics.common import pretrained_file, read_state_dict, score_images
from recare_cli.models import is_offline

INCEPTION_FILES = ("inception_v3_google-0cc3c7bd.pth",)
INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
FLAG = "--inception-weights"
FEATURE_DIM = 2048


def psd_sqrt(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    import numpy as np

    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), in float64."""
    return frechet_distance_factored(mu1, psd_sqrt(sigma1), mu2, psd_sqrt(sigma2))


def frechet_distance_factored(mu1, root1, mu2, root2) -> float:
    """The same distance, each covariance given as a factor: sigma = root rootᵀ (d x k, any k).

    The eigenvalues of sigma1 sigma2 are the squared singular values of root1ᵀ root2, so
    Tr (sigma1 sigma2)^½ is that matrix's nuclear norm: no square root of a non-symmetric
    product, no negative eigenvalues from round-off, and Tr sigma = ||root||²_F.
    """
    import numpy as np

    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    root1, root2 = np.asarray(root1, dtype=np.float64), np.asarray(root2, dtype=np.float64)
    cross_trace = np.linalg.svd(root1.T @ root2, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(root1**2) + np.sum(root2**2) - 2.0 * cross_trace)


def feature_statistics(features):
    """(mean, covariance factor) of features [n, d], in float64.

    With n <= d the centred features / sqrt(n - 1) are themselves a factor of the covariance, and
    a d x n one: far cheaper than the d x d square root (2048² for Inception) for small samples.
    """
    import numpy as np

    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    mean = features.mean(axis=0)
    if n <= d:
        return mean, (features - mean).T / np.sqrt(n - 1)
    return mean, psd_sqrt(np.cov(features, rowvar=False))


def build_inception(path: Path):
    """torchvision's Inception v3 with `path`'s weights, returning pool features instead of logits."""
    import torch
    from torchvision.models import inception_v3

    state = read_state_dict(path, "Inception v3", FLAG)
    if "Mixed_7c.branch_pool.conv.weight" not in state:
        raise RecareError(f"{FLAG} '{path}' is not an Inception v3 checkpoint (no Mixed_7c weights)",
                          hint=f"pass torchvision's {INCEPTION_FILES[0]}")
    # transform_input=True: the Google weights expect their own input scaling, as torchvision sets it up.
    model = inception_v3(weights=None, aux_logits="AuxLogits.fc.weight" in state, transform_input=True,
                         init_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecareError(f"{FLAG} '{path}' does not fit Inception v3: {str(exc).splitlines()[1].strip()}") from None
    model.fc = torch.nn.Identity()
    return model.eval()


def inception_features(ctx: EvalContext, model, images: list[EvalImage], description: str):
    import torch
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize((299, 299)), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def features(batch):
        return model(torch.stack([preprocess(image) for image in batch]).to(ctx.device))

    return score_images(ctx, images, features, description).numpy()


def inception_file(ctx: EvalContext) -> Path:
    return pretrained_file(ctx.option("inception_weights"), INCEPTION_FILES, INCEPTION_URL,
                           "Inception v3 (FID)", FLAG, is_offline(ctx.runtime.offline))


def reference_images(ctx: EvalContext) -> list[EvalImage]:
    reference_dir = Path(ctx.option("reference_dir")).expanduser()
    return [EvalImage(path) for path in list_images(reference_dir, "--reference-dir", EVAL_IMAGE_SUFFIXES)]


def check(ctx: EvalContext) -> None:
    inception_file(ctx)
    reference_images(ctx)


def run(ctx: EvalContext) -> list[Row]:
    weights = inception_file(ctx)
    model = ctx.shared(("inception", str(weights)), lambda: build_inception(weights))
    model.to(ctx.device)
    reference_dir = Path(ctx.option("reference_dir")).expanduser()
    reference = reference_images(ctx)
    reference_stats = ctx.shared(("fid-reference", str(reference_dir.resolve()), str(weights)), lambda: feature_statistics(
        inception_features(ctx, model, reference, "fid reference")))
    images = ctx.images()
    if min(len(images), len(reference)) < 2:
        raise RecareError(f"FID needs at least 2 images on each side ({len(images)} generated, "
                          f"{len(reference)} reference)", hint="pass more prompts or --num-images")
    if min(len(images), len(reference)) <= FEATURE_DIM:
        ctx.reporter.warn(f"FID from {min(len(images), len(reference))} images is biased upward "
                          f"(fewer than the {FEATURE_DIM} feature dimensions); the paper uses 30,000")
    generated_stats = feature_statistics(inception_features(ctx, model, images, "fid"))
    return [Row({}, {"fid": frechet_distance_factored(*generated_stats, *reference_stats), "images": len(images),
                     "reference_images": len(reference)})]
