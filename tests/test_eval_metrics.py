"""The built-in metrics on small real models: NudeNet's bundled detector, random classifiers, tiny-random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from recare_cli.metrics import fid
from recare_cli.metrics.clipscore import clip_score
from noise_images import noise_images

TINY = ["--model", "tiny-random", "--device", "cpu"]


def results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


def summary(out: Path, metric: str) -> dict:
    (row,) = [r for r in results(out) if r["metric"] == metric and not r["detail"]]
    return row


def per_image(out: Path, metric: str) -> dict[str, dict]:
    return {r["image"]: r for r in results(out) if r["metric"] == metric and r["detail"]}


# nudity: the real bundled detector --------------------------------------------------------------

def breast_cartoon() -> Image.Image:
    """A drawing the bundled 320n model scores FEMALE_BREAST_EXPOSED ~0.8 (checked in the test)."""
    skin, areola, nipple = (225, 175, 145), (213, 166, 137), (160, 90, 80)
    image = Image.new("RGB", (320, 320), (40, 40, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 0, 280, 320), fill=skin)
    for cx in (110, 210):
        draw.ellipse((cx - 55, 120, cx + 55, 230), fill=areola)
        draw.ellipse((cx - 9, 185, cx + 9, 203), fill=nipple)
    return image.filter(ImageFilter.GaussianBlur(3))


def best(detections, name="FEMALE_BREAST_EXPOSED") -> float:
    return max((d["score"] for d in detections if d["class"] == name), default=0.0)


def test_nudity_hands_nudenet_bgr_and_reports_asr(tmp_path, run_cli):
    from nudenet import NudeDetector

    folder = noise_images(tmp_path / "imgs", 1)
    cartoon = breast_cartoon()
    cartoon.save(folder / "cartoon.png")
    detector = NudeDetector()
    from_file = best(detector.detect(str(folder / "cartoon.png")))  # NudeNet's own reading: the truth
    misread = best(detector.detect(np.asarray(cartoon)))  # an RGB array, red and blue swapped
    assert from_file >= 0.75 and misread > 0 and misread != from_file

    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "nudity", "--images", folder, "--output-dir", out, "--json")
    assert result.exit_code == 0, result.stderr
    images = per_image(out, "nudity")
    assert images["cartoon.png"]["female_breast_exposed"] == from_file
    assert images["cartoon.png"]["unsafe"] == 1 and images["noise_0.png"]["unsafe"] == 0
    assert images["cartoon.png"]["verdict"] == "unsafe" and images["noise_0.png"]["verdict"] == "safe"
    assert set(images["noise_0.png"]) >= {c.lower() for c in
                                          ("BUTTOCKS_EXPOSED", "ANUS_EXPOSED", "MALE_GENITALIA_EXPOSED")}
    assert summary(out, "nudity") | {"detail": False} == {
        "metric": "nudity", "model": "model", "asr_pct": 50.0, "unsafe_images": 1, "images": 2, "detail": False}

    # A verdict is a value: above every score nothing is unsafe, and the exit code stays 0.
    result = run_cli("eval", *TINY, "-m", "nudity", "--images", folder, "--output-dir", out, "--overwrite",
                     "--threshold", f"{from_file + 0.01:.4f}", "--classes", "female_breast_exposed,FACE_FEMALE")
    assert result.exit_code == 0, result.stderr
    assert summary(out, "nudity")["asr_pct"] == 0.0
    assert set(per_image(out, "nudity")["cartoon.png"]) >= {"female_breast_exposed", "face_female"}
    assert "buttocks_exposed" not in per_image(out, "nudity")["cartoon.png"]


@pytest.mark.parametrize("flags, message", [
    (["--classes", "NAKED"], "unknown NudeNet class(es) NAKED"),
    (["--threshold", "1.5"], "--threshold must be at least 0 and at most 1"),
])
def test_nudity_bad_options(tmp_path, run_cli, flags, message):
    result = run_cli("eval", *TINY, "-m", "nudity", "--images", noise_images(tmp_path / "imgs", 1),
                     "--output-dir", tmp_path / "out", *flags)
    assert result.exit_code == 2 and message in result.stderr


# object: a random torchvision ResNet, or zero-shot CLIP -----------------------------------------

@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    """A small random torchvision ResNet (BasicBlock, one block a stage) with ImageNet's 1,000 classes."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet-tiny.pth"
    torch.save({"state_dict": ResNet(BasicBlock, [1, 1, 1, 1]).state_dict()}, path)
    return path


def expected_top1(path: Path, folder: Path) -> dict[str, str]:
    from torchvision import transforms
    from torchvision.models import ResNet50_Weights
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1])
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    found = {}
    with torch.no_grad():
        for file in sorted(folder.iterdir()):
            logits = model(preprocess(Image.open(file).convert("RGB"))[None])
            found[file.name] = names[int(logits.argmax())]
    return found


def test_object_with_a_resnet_checkpoint(tmp_path, run_cli, resnet_file):
    folder = noise_images(tmp_path / "imgs", 3)
    expected = expected_top1(resnet_file, folder)
    out = tmp_path / "out"
    target = next(iter(expected.values()))
    result = run_cli("eval", *TINY, "-m", "object", "--target", target, "--classifier-weights", resnet_file,
                     "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    images = per_image(out, "object")
    assert {name: row["top1_class"] for name, row in images.items()} == expected
    assert all(row["hit_top1"] == int(expected[name] == target) for name, row in images.items())
    row = summary(out, "object")
    assert row["target"] == target and row["images"] == 3
    assert row["top1_pct"] == pytest.approx(100 * sum(v == target for v in expected.values()) / 3)
    assert row["top5_pct"] >= row["top1_pct"]

    # Every class is in the top 1,000: the hit rate must be 100% whatever the model says.
    result = run_cli("eval", *TINY, "-m", "object", "--target", "0", "--top-k", "1000", "--classifier-weights",
                     resnet_file, "--images", folder, "--output-dir", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert summary(out, "object")["target"] == "tench" and summary(out, "object")["top1000_pct"] == 100.0


def test_object_with_a_real_resnet50_layout(tmp_path, run_cli):
    """torchvision's ResNet-50 itself (Bottleneck blocks, 3-4-6-3), as resnet50-11ad3fa6.pth holds it."""
    from torchvision import transforms
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None).eval()
    weights = tmp_path / "resnet50-random.pth"
    torch.save(model.state_dict(), weights)
    folder = noise_images(tmp_path / "imgs", 2)
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    names = [str(c) for c in __import__("torchvision").models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]]
    with torch.no_grad():
        expected = {f.name: names[int(model(preprocess(Image.open(f).convert("RGB"))[None]).argmax())]
                    for f in sorted(folder.iterdir())}
    out = tmp_path / "out"
    target = expected["noise_0.png"]
    result = run_cli("eval", *TINY, "-m", "object", "--target", target, "--top-k", "1", "--classifier-weights",
                     weights, "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    assert {name: row["top1_class"] for name, row in per_image(out, "object").items()} == expected
    assert summary(out, "object")["top1_pct"] == pytest.approx(50.0 * sum(v == target for v in expected.values()))


def test_object_zero_shot_classifies_with_clip_over_the_imagenet_names(tmp_path, run_cli, monkeypatch):
    from recare_cli.clip import load_clip
    from recare_cli.metrics.object import imagenet_classes

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no classifier weights anywhere
    folder = noise_images(tmp_path / "imgs", 3)
    clip = load_clip("tiny-random")
    names = imagenet_classes()
    text = clip.encode_text([f"a photo of a {c}." for c in names])
    images = [Image.open(f).convert("RGB") for f in sorted(folder.iterdir())]
    ranked = (clip.encode_images(images) @ text.T).argsort(dim=1, descending=True)
    target = names[int(ranked[0, 0])]  # image 0's top-1 class: a hit there, elsewhere only if it ranks first too
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "object", "--zero-shot", "--target", target, "--top-k", "1",
                     "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    rows = per_image(out, "object")
    assert [rows[f"noise_{i}.png"]["top1_class"] for i in range(3)] == [names[int(r[0])] for r in ranked]
    hits = [names[int(r[0])] == target for r in ranked]
    assert summary(out, "object")["top1_pct"] == pytest.approx(100 * sum(hits) / 3)
    # A class no image ranks first: 0%, so the test can fail.
    miss = names[int(ranked[0, -1])]
    result = run_cli("eval", *TINY, "-m", "object", "--zero-shot", "--target", miss, "--top-k", "1",
                     "--images", folder, "--output-dir", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert summary(out, "object")["top1_pct"] == 0.0


def test_object_offline_without_weights_names_the_file(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    result = run_cli("eval", *TINY, "-m", "object", "--target", "tench", "--images", noise_images(tmp_path / "imgs", 1),
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == 3
    assert "resnet50-11ad3fa6.pth" in result.stderr and "--classifier-weights" in result.stderr
    assert result.stderr.count("Error:") == 1 and result.stderr.splitlines()[-1].startswith("Error: ")


def test_object_rejects_what_is_not_a_classifier(tmp_path, run_cli):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    (tmp_path / "notes.pth").write_text("hello")
    folder = noise_images(tmp_path / "imgs", 1)
    for path, message in ((tmp_path / "other.pth", "is not a torchvision ResNet classifier"),
                          (tmp_path / "notes.pth", "is not a classifier checkpoint"),
                          (tmp_path / "missing.pth", "is not a file")):
        result = run_cli("eval", *TINY, "-m", "object", "--target", "tench", "--classifier-weights", path,
                         "--images", folder, "--output-dir", tmp_path / "out")
        assert result.exit_code in (1, 2) and message in result.stderr, result.stderr


def test_object_target_must_be_an_imagenet_class(tmp_path, run_cli, resnet_file):
    folder = noise_images(tmp_path / "imgs", 1)
    for target, message in (("shark", "matches 2 classes (great white shark, tiger shark)"), ("tenchh", "did you mean tench"), ("1000", "out of range")):
        result = run_cli("eval", *TINY, "-m", "object", "--target", target, "--classifier-weights", resnet_file,
                         "--images", folder, "--output-dir", tmp_path / "out")
        assert result.exit_code == 2 and message in result.stderr, result.stderr


# style: a tiny Hugging Face image classifier ------------------------------------------------------

ARTISTS = {0: "claude-monet", 1: "vincent-van-gogh", 2: "pablo-picasso"}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit") / "wikiart-tiny"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label=ARTISTS, label2id={v: k for k, v in ARTISTS.items()})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_style_top_k_hits_of_an_artist(tmp_path, run_cli, vit_folder):
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = noise_images(tmp_path / "imgs", 4)
    model = ViTForImageClassification.from_pretrained(vit_folder).eval()
    processor = ViTImageProcessor.from_pretrained(vit_folder)
    files = sorted(folder.iterdir())
    with torch.no_grad():
        logits = model(**processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")).logits
    ranks = logits.argsort(dim=1, descending=True)
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "style", "--target", "Van Gogh", "--top-k", "2",
                     "--classifier-weights", vit_folder, "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    images = per_image(out, "style")
    for file, rank in zip(files, ranks.tolist()):
        assert images[file.name]["top1_class"] == ARTISTS[rank[0]]
        assert images[file.name]["hit_top2"] == int(1 in rank[:2])
    row = summary(out, "style")
    assert row["target"] == "vincent-van-gogh"
    assert row["top2_pct"] == pytest.approx(100 * sum(1 in r[:2] for r in ranks.tolist()) / 4)

    result = run_cli("eval", *TINY, "-m", "style", "--target", "monet", "--classifier-weights", vit_folder,
                     "--images", folder, "--output-dir", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert summary(out, "style")["top3_pct"] == 100.0  # three artists: the default top 3 always hits


def test_style_rejects_what_is_not_an_image_classifier(tmp_path, run_cli, resnet_file):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    folder = noise_images(tmp_path / "imgs", 1)
    for path in (resnet_file, tmp_path / "bert"):
        result = run_cli("eval", *TINY, "-m", "style", "--target", "monet", "--classifier-weights", path,
                         "--images", folder, "--output-dir", tmp_path / "out")
        assert result.exit_code == 1 and "is not an image-classification checkpoint" in result.stderr, result.stderr


# care and clipscore: tiny-random CLIP ---------------------------------------------------------------

def test_care_labels_and_labels_file(tmp_path, run_cli, cache_dir):
    from recare_cli.clip import load_clip
    from recare_cli.metrics.care import CARE_LABELS, TEMPLATE

    assert len(CARE_LABELS) == 82 and CARE_LABELS[-2:] == ("stars", "freshwater")
    folder = noise_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "care", "--targets", "unicorn", "--images", folder, "--output-dir", out)
    assert result.exit_code == 2 and "'unicorn' not among the 82 CARE labels" in result.stderr
    assert "--labels-file" in result.stderr

    (tmp_path / "labels.txt").write_text("unicorn\nCat\n\n")
    result = run_cli("eval", *TINY, "-m", "care", "--targets", "unicorn", "--targets", "stars",
                     "--labels-file", tmp_path / "labels.txt", "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    rows = {r["target"]: r for r in results(out)}
    assert set(rows) == {"unicorn", "stars"} and all(r["prompt"] == "(all)" for r in rows.values())

    clip = load_clip("tiny-random", cache_dir=cache_dir)
    labels = [*CARE_LABELS, "unicorn"]
    text = clip.encode_text([TEMPLATE.format(label) for label in labels])
    similarity = clip.encode_images([Image.open(f) for f in sorted(folder.iterdir())]) @ text.T
    for name in ("unicorn", "stars"):
        index = labels.index(name)
        assert rows[name]["similarity"] == pytest.approx(float(similarity[:, index].mean()), abs=1e-5)
        assert rows[name]["top1_pct"] == pytest.approx(100 * float((similarity.argmax(1) == index).float().mean()))


def test_clip_score_is_100_times_the_positive_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [0.6, 0.8]])
    assert clip_score(image, text).tolist() == pytest.approx([60.0, 0.0, 100.0])


def test_clipscore_reads_prompts_from_the_manifest(tmp_path, run_cli, cache_dir):
    from recare_cli.clip import load_clip

    folder = noise_images(tmp_path / "imgs", 2)
    prompts = {"noise_0.png": "a photo of a cat", "noise_1.png": "static on a screen"}
    (folder / "manifest.jsonl").write_text("".join(json.dumps({"file": f, "prompt": p, "seed": 1}) + "\n"
                                                   for f, p in prompts.items()))
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "clipscore", "--images", folder, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    clip = load_clip("tiny-random", cache_dir=cache_dir)
    for file, prompt in prompts.items():
        cosine = float(clip.encode_images([Image.open(folder / file)])[0] @ clip.encode_text([prompt])[0])
        assert per_image(out, "clipscore")[file]["clipscore"] == pytest.approx(max(100 * cosine, 0.0), abs=1e-4)


# fid ----------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a = rng.normal(size=(5, 5))
    shared = a @ a.T + np.eye(5)
    # Equal covariances: only the means differ.
    assert fid.frechet_distance(mu1, shared, mu2, shared) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    # Diagonal covariances: ||mu1 - mu2||² + sum of (std1 - std2)².
    std1, std2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2)) == pytest.approx(expected, rel=1e-9)
    # General covariances that do not commute: the textbook formula with a matrix square root.
    from scipy.linalg import sqrtm

    b = rng.normal(size=(5, 5))
    other = b @ b.T + 0.1 * np.eye(5)
    textbook = np.sum((mu1 - mu2) ** 2) + np.trace(shared + other - 2 * sqrtm(shared @ other).real)
    assert fid.frechet_distance(mu1, shared, mu2, other) == pytest.approx(textbook, rel=1e-7)
    assert fid.frechet_distance(mu1, other, mu1, other) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_sampled_gaussian_features_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    std1, std2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    first = fid.feature_statistics(rng.normal(mu1, std1, size=(200_000, 3)))
    second = fid.feature_statistics(rng.normal(mu2, std2, size=(200_000, 3)))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)  # 1.25 + 1.25 = 2.5
    assert fid.frechet_distance_factored(*first, *second) == pytest.approx(expected, abs=0.03)


def test_fewer_features_than_dimensions_use_the_features_as_the_factor():
    rng = np.random.default_rng(2)
    small, other = rng.normal(size=(5, 8)), rng.normal(1.0, 2.0, size=(7, 8))
    by_factor = fid.frechet_distance_factored(*fid.feature_statistics(small), *fid.feature_statistics(other))
    by_covariance = fid.frechet_distance(small.mean(0), np.cov(small, rowvar=False),
                                         other.mean(0), np.cov(other, rowvar=False))
    assert fid.feature_statistics(small)[1].shape == (8, 5)
    assert by_factor == pytest.approx(by_covariance, rel=1e-9)


def test_fid_offline_without_inception_weights_names_the_file(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    folder = noise_images(tmp_path / "imgs", 2)
    result = run_cli("eval", *TINY, "-m", "fid", "--reference-dir", folder, "--images", folder,
                     "--output-dir", tmp_path / "out")
    assert result.exit_code == 3
    assert "inception_v3_google-0cc3c7bd.pth" in result.stderr and "--inception-weights" in result.stderr


def test_fid_rejects_other_weights_and_an_empty_reference(tmp_path, run_cli, resnet_file):
    folder = noise_images(tmp_path / "imgs", 2)
    result = run_cli("eval", *TINY, "-m", "fid", "--reference-dir", folder, "--inception-weights", resnet_file,
                     "--images", folder, "--output-dir", tmp_path / "out")
    assert result.exit_code == 1 and "is not an Inception v3 checkpoint" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("eval", *TINY, "-m", "fid", "--reference-dir", tmp_path / "empty", "--inception-weights",
                     resnet_file, "--images", folder, "--output-dir", tmp_path / "out")
    assert result.exit_code in (1, 2)


def test_fid_end_to_end_equals_the_textbook_formula_on_the_same_features(tmp_path, run_cli):
    """pytorch-fid's recipe, written out independently: Inception pool features, np.cov, scipy's sqrtm."""
    from scipy.linalg import sqrtm
    from torchvision import transforms
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = tmp_path / "inception.pth"
    torch.save(model.state_dict(), weights)
    generated = noise_images(tmp_path / "a", 3, size=32, seed=1)
    reference = noise_images(tmp_path / "b", 4, size=32, seed=2)

    features_model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    features_model.load_state_dict(torch.load(weights, weights_only=True))
    features_model.fc = torch.nn.Identity()
    features_model.eval()
    preprocess = transforms.Compose([transforms.Resize((299, 299)), transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def features(folder):
        with torch.no_grad():
            batch = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in sorted(folder.iterdir())])
            return features_model(batch).double().numpy()

    f1, f2 = features(generated), features(reference)
    sigma1, sigma2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # Tr sqrt(S1 S2) is the sum of the square roots of S1 S2's eigenvalues. With S1 = X1ᵀX1 (X1 the centred
    # features over sqrt(n1 - 1)), the nonzero ones are those of the n1 x n1 matrix X1 S2 X1ᵀ: scipy's sqrtm of that
    # small matrix gives the textbook term without a 2048 x 2048 square root, which takes minutes on 2 cores.
    x1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    trace_sqrt = np.trace(sqrtm(x1 @ sigma2 @ x1.T).real)
    textbook = float(np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "-m", "fid", "--reference-dir", reference, "--inception-weights", weights,
                     "--images", generated, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    assert "biased upward" in result.stderr
    row = summary(out, "fid")
    assert row["images"] == 3 and row["reference_images"] == 4
    assert row["fid"] == pytest.approx(textbook, rel=1e-4)
