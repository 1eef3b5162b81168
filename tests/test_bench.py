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
