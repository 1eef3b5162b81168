"""Built-in metrics, registered exactly as a third-party `recare.metrics` plugin registers its own.

The modules are imported lazily so that listing metrics (`recare --help`, the registry) stays cheap.
"""

from importlib import import_module

from recare_cli.plugins import Metric


def _lazy(module: str, function: str = "run"):
    def call(ctx):
        return getattr(import_module(f"recare_cli.metrics.{module}"), function)(ctx)

    return call


def register(register):
    register(Metric("care", _lazy("care"), "CARE score: CLIP zero-shot top-1 over the 82 CARE labels (--targets)",
                    requires=("targets",), check=_lazy("care", "check")))
    register(Metric("nudity", _lazy("nudity"), "NudeNet ASR: % of images with an EXPOSED class >= --threshold"))
    register(Metric("object", _lazy("object"), "ImageNet top-1/top-k hits of --target (ResNet-50, or CLIP with --zero-shot)",
                    requires=("target",), check=_lazy("object", "check")))
    register(Metric("style", _lazy("style"), "artist in the top-k of an image classifier (--classifier-weights FOLDER)",
                    requires=("classifier_weights", "target"), check=_lazy("style", "check")))
    register(Metric("fid", _lazy("fid"), "FID between --reference-dir images and generated ones (Inception v3)",
                    requires=("reference_dir",), check=_lazy("fid", "check")))
    register(Metric("toy", _lazy("toy"), "toy world: % of images showing each toy concept the prompt names "
                                         "(and --target), by the toy classifier (--model toy)", check=_lazy("toy", "check")))
    register(Metric("clipscore", _lazy("clipscore"), "CLIP score of each image and its prompt: 100 * max(cos, 0)",
                    check=_lazy("clipscore", "check")))
