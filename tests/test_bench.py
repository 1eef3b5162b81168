"""bench/erase.py's GPU mode can only be measured on a lent GPU machine; its dry run keeps the code path honest."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_mode_dry_run_builds_sd14_shaped_models_and_reports_every_stage():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "erase.py"), "--gpu", "--dry-run", "--device", "cpu", "--prefix-steps", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    for stage in ("erase-0", "inversion-0", "erase-1", "inversion-1", "robust"):
        seconds, unet_images = rows[stage]
        assert float(seconds) > 0 and int(unet_images) > 0
    assert "shrunken SD-1.4 structure (dry run)" in result.stdout and "peak RSS" in result.stdout


def test_the_dry_run_model_is_sd14_in_everything_but_width():
    """Same parameter names (blocks, layers per block, attention placement, text layers), smaller tensors."""
    import importlib.util

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = importlib.util.spec_from_file_location("bench_erase", ROOT / "bench" / "erase.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full, dry = bench.sd14_configs(dry_run=False), bench.sd14_configs(dry_run=True)
    builders = {"unet": lambda c: UNet2DConditionModel(**c), "vae": lambda c: AutoencoderKL(**c),
                "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c))}
    for part, build in builders.items():
        with torch.device("meta"):  # the full-size model without its memory
            real, shrunk = build(full[part]).state_dict(), build(dry[part]).state_dict()
        assert list(real) == list(shrunk), part
        assert all(real[k].dim() == shrunk[k].dim() for k in real), part
    assert full["unet"]["layers_per_block"] == dry["unet"]["layers_per_block"] == 2
