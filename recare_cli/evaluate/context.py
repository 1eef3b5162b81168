"""What a metric sees of one evaluated model: its images and options (the contract: recare_cli/evaluate/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import IMAGE_SUFFIXES, list_images
from recare_cli.generate import GenerateSettings, PromptRow, generate, plan_jobs, read_manifest
from recare_cli.models import Runtime
from recare_cli.output import Reporter

EVAL_IMAGE_SUFFIXES = IMAGE_SUFFIXES + (".webp",)


@dataclass(frozen=True)
class EvalImage:
    path: Path
    prompt: str | None = None  # None for a folder without a manifest.jsonl
    seed: int | None = None

    @property
    def file(self) -> str:
        return self.path.name


@dataclass
class Row:
    key: dict[str, Any]
    values: dict[str, Any]
    detail: bool = False


@dataclass
class ModelUnderTest:
    label: str  # "erased", "model" or "base": also the images folder's name
    runtime: Runtime
    unet: str | None = None

    def describe(self) -> dict:
        return {"label": self.label, "model": self.runtime.model, "unet": self.unet}


@dataclass
class EvalContext:
    """What a metric sees of one evaluated model; see the contract in recare_cli/evaluate/__init__.py."""

    model: ModelUnderTest
    options: Mapping[str, Any]
    reporter: Reporter
    images_dir: Path
    prompts: list[PromptRow] | None = None  # None: read `images_dir` instead of generating
    num_images: int = 1
    seed: int = 42
    generation: GenerateSettings = field(default_factory=GenerateSettings)
    cache: dict = field(default_factory=dict)  # shared by the contexts of one run
    clip_base: str | None = None  # the model whose CLIP is the default: --model's, for both sides of --compare
    _images: list[EvalImage] | None = None

    @property
    def label(self) -> str:
        return self.model.label

    @property
    def runtime(self) -> Runtime:
        return self.model.runtime

    @property
    def device(self) -> str:
        return self.runtime.torch_device()

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def shared(self, key, factory: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = factory()
        return self.cache[key]

    def _clip_choice(self) -> tuple[str, str]:
        from recare_cli.clip import DEFAULT_CLIP_PRETRAINED, default_clip_model

        return (self.option("clip_model", default_clip_model(self.clip_base or self.runtime.model)),
                self.option("clip_pretrained", DEFAULT_CLIP_PRETRAINED))

    def clip(self):
        from recare_cli.clip import load_clip

        name, pretrained = self._clip_choice()
        return self.shared(("clip", name, pretrained), lambda: load_clip(
            name, pretrained, cache_dir=self.runtime.cache_dir, offline=self.runtime.offline, device=self.device))

    def check_clip(self) -> None:
        """What `clip()` would refuse (an unknown model, weights missing offline), without loading it."""
        from recare_cli.clip import locate_clip

        name, pretrained = self._clip_choice()
        locate_clip(name, pretrained, cache_dir=self.runtime.cache_dir, offline=self.runtime.offline)

    def images(self) -> list[EvalImage]:
        if self._images is None:
            self._images = self._generate() if self.prompts is not None else read_image_folder(self.images_dir, "--images")
        return self._images

    def _generate(self) -> list[EvalImage]:
        settings = replace(self.generation, unet=self.model.unet)
        self.reporter.event("images", model=self.label, folder=str(self.images_dir))
        generate(self.prompts, self.images_dir, self.runtime, settings, self.num_images, self.seed,
                 self.reporter, record={"command": "eval", "label": self.label})
        # The manifest knows the seed of an image kept from an earlier run with another --seed.
        entries = {e.get("file"): e for e in read_manifest(self.images_dir)}
        return [
            EvalImage(self.images_dir / job.file, entries.get(job.file, {}).get("prompt", job.prompt),
                      entries.get(job.file, {}).get("seed", job.seed))
            for job in plan_jobs(self.prompts, self.num_images, self.seed)
        ]


def read_image_folder(folder: Path, flag: str, prompts: list[PromptRow] | None = None,
                      warn: Callable[[str], None] | None = None) -> list[EvalImage]:
    """A folder's images, with prompts and seeds from its manifest.jsonl when `recare generate` wrote it.

    Images without a manifest entry (a folder from another tool) take the one prompt given, if any;
    several prompts cannot be matched to them, which is a UsageError.
    """
    try:
        entries = {e.get("file"): e for e in read_manifest(folder) if isinstance(e, dict)}
    except ValueError:  # a damaged manifest only costs the prompts, which most metrics do not need
        entries = {}
    paths = list_images(folder, flag, EVAL_IMAGE_SUFFIXES)
    unlisted = [p for p in paths if not entries.get(p.name, {}).get("prompt")]
    fallback = None
    if prompts and not unlisted and warn is not None:
        warn(f"--prompt/--prompts-file unused: every image in {flag} has its prompt in manifest.jsonl")
    if prompts and unlisted:
        if len(prompts) > 1:
            raise UsageError(f"{len(unlisted)} of the images in {flag} '{folder}' have no manifest.jsonl entry, "
                             f"and {len(prompts)} prompts cannot be matched to them",
                             hint="give one --prompt for all of them, or a manifest.jsonl mapping file to prompt")
        fallback = prompts[0]
    return [
        EvalImage(path, entries[path.name]["prompt"], entries[path.name].get("seed")) if path not in unlisted
        else EvalImage(path, fallback.prompt if fallback else None, fallback.seed if fallback else None)
        for path in paths
    ]


def open_rgb(image: EvalImage):
    from PIL import Image

    try:
        with Image.open(image.path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise RecareError(f"cannot read image '{image.path}': {exc}") from None
