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


def _bench_erase():
    import importlib.util

    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))  # bench/erase.py imports its sibling bench_setting.py, as a script does

    spec = importlib.util.spec_from_file_location("bench_erase", ROOT / "bench" / "erase.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_dry_run_model_is_sd14_in_everything_but_width():
    """Same parameter names (blocks, layers per block, attention placement, text layers), smaller tensors."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    bench = _bench_erase()
    full, dry = bench.sd14_configs(dry_run=False), bench.sd14_configs(dry_run=True)
    builders = {"unet": lambda c: UNet2DConditionModel(**c), "vae": lambda c: AutoencoderKL(**c),
                "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c))}
    for part, build in builders.items():
        with torch.device("meta"):  # the full-size model without its memory
            real, shrunk = build(full[part]).state_dict(), build(dry[part]).state_dict()
        assert list(real) == list(shrunk), part
        assert all(real[k].dim() == shrunk[k].dim() for k in real), part
    assert full["unet"]["layers_per_block"] == dry["unet"]["layers_per_block"] == 2


def test_sdxl_gpu_mode_dry_run_reports_every_stage():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "erase.py"), "--gpu", "--family", "sdxl", "--dry-run", "--device", "cpu",
         "--prefix-steps", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    for stage in ("erase-0", "inversion-0", "erase-1", "inversion-1", "robust"):
        seconds, unet_images = rows[stage]
        assert float(seconds) > 0 and int(unet_images) > 0
    assert "shrunken SDXL structure (dry run)" in result.stdout


def test_sdxl_gpu_mode_builds_the_published_unet():
    """Full-size configs, built without memory on the meta device: SDXL base's UNet has 2,567,463,684 weights."""
    import torch
    from diffusers import UNet2DConditionModel

    bench = _bench_erase()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.sdxl_configs(dry_run=False)["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
