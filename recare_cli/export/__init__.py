"""Exporting an erased model in the formats other tools load, each one loaded back and checked.

Formats: a full diffusers pipeline folder, the UNet alone (diffusers keys), one original-layout
(LDM) Stable Diffusion checkpoint for AUTOMATIC1111 / ComfyUI, a LoRA of the weight difference,
and the learned adversarial tokens as textual-inversion embeddings.

Every export is written into a staging path next to the output, loaded back with the loader its
users will use, and compared with the source before it takes the output's name: a UNet forward on
a fixed input (the *probe*) must agree within the dtype's tolerance, and weights that are merely
re-keyed (VAE, text encoder, tokens) must come back bit for bit. A failed check leaves nothing.

Modules: source (what is exported), settings (what is asked for, refused early), run (staging,
checking, publishing), check (the probe, the tolerances, the weight comparison), writing (what
every format shares), one module per format (diffusers_folder, unet, single_file, lora, tokens),
and keymaps (the diffusers -> original key maps the single file needs).
"""

from recare_cli.export.check import TOLERANCE, max_abs_diff, require_same_weights, unet_probe
from recare_cli.export.keymaps import pipeline_to_ldm
from recare_cli.export.lora import LoraFactors, lora_factors
from recare_cli.export.run import export, staged_output
from recare_cli.export.settings import (
    DEFAULT_RANK, FILE_SUFFIX, FORMATS, ExportResult, ExportSettings, check_settings,
)
from recare_cli.export.source import ExportSource, base_model_for, resolve_source

__all__ = [
    "DEFAULT_RANK", "FILE_SUFFIX", "FORMATS", "TOLERANCE", "ExportResult", "ExportSettings", "ExportSource",
    "LoraFactors", "base_model_for", "check_settings", "export", "lora_factors", "max_abs_diff",
    "pipeline_to_ldm", "require_same_weights", "resolve_source", "staged_output", "unet_probe",
]
