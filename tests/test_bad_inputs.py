"""Bad inputs, exit codes and messages (issue 18): one table of cases, each an argv, the exit code,
a fragment of the one `Error:` line, and the files that must be left as they were.

Every error case also checks that stderr is exactly that one line. The cases fail before any model
loads, which keeps the table fast; interrupts and terminals are real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-random", "--device", "cpu"]
GEN = ["generate", "-p", "a cat", *TINY, "--steps", "1", "--height", "64", "--width", "64"]
ERASE = ["erase", "-c", "cat", "--type", "object", *TINY, "--resolution", "64", "--iterations", "1"]
EVAL = ["eval", "-m", "clipscore", *TINY, "--clip-model", "tiny-random"]


# inputs -----------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims `width`×`height` (a decompression bomb, for PIL)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + _chunk(b"IEND", b""))
    return path


def real_png(path: Path, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncated_png(path: Path) -> Path:
    real_png(path, seed=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of bad inputs shared by the table's rows (rows never write into it)."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "afile").write_text("not a folder\n")
    bad = root / "bad-images"
    bad.mkdir()
    png_claiming(bad / "bomb.png", 100_000, 100_000)
    truncated_png(bad / "truncated.png")
    good = root / "good-images"
    good.mkdir()
    real_png(good / "a.png")
    real_png(good / "b.png", seed=2)
    mixed = root / "mixed-images"
    mixed.mkdir()
    real_png(mixed / "good.png")
    png_claiming(mixed / "bomb.png", 10_000, 10_000)  # in PIL's DecompressionBombWarning band
    truncated_png(mixed / "truncated.png")
    for name, seed in (("inf", "inf"), ("huge", "1e30"), ("negative", "-1"), ("toolarge", str(2**63)),
                       ("fraction", "1.5")):
        (root / f"seed-{name}.csv").write_text(f"prompt,evaluation_seed\na cat,{seed}\n")
    (root / "seed-last.csv").write_text(f"prompt,evaluation_seed\na cat,{2**63 - 1}\n")

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    torch.save({"state_dict": {"w": Planted()}}, root / "planted.ckpt")
    (root / "garbage.ckpt").write_bytes(b"this is not a checkpoint at all")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, root / "not-sd.ckpt")
    (root / "garbage.safetensors").write_bytes(struct.pack("<Q", 9) + b"{garbage}" + b"\0" * 16)
    save_file({"first_stage_model.w": torch.zeros(1)}, str(root / "vae-only.safetensors"))
    save_file({"w": torch.zeros(1)}, str(root / "unet.safetensors"))
    (root / "recipe-inf.toml").write_text('stage1-lr = inf\n[[concept]]\nconcept = "cat"\ntype = "object"\n')
    (root / "recipe-height.toml").write_text('[[concept]]\nconcept = "cat"\ntype = "object"\nresolution = 100\n')
    (root / "config-nan.toml").write_text("[generate]\nguidance = nan\n")
    (root / "config-seed.toml").write_text("seed = -5\n")
    return root


def snapshot(paths: list[Path]) -> dict[str, object]:
    """What is on disk at each path: None, a file's bytes, or a folder's sorted listing."""
    state = {}
    for path in paths:
        if path.is_file():
            state[str(path)] = path.read_bytes()
        elif path.is_dir():
            state[str(path)] = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
        else:
            state[str(path)] = None
    return state


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


# the table ----------------------------------------------------------------------------------------

OUT = "{ws}/out"  # every row's output; it must never be created
CASES = [
    # learning rates, guidance and scales: non-finite, non-positive, or so large they can only overflow
    ("stage1-lr-huge", [*ERASE, "--stage1-lr", "1e40", "--output-dir", OUT], 2, "--stage1-lr must be"),
    ("stage1-lr-inf", [*ERASE, "--stage1-lr", "inf", "--output-dir", OUT], 2, "--stage1-lr must be a finite number"),
    ("stage1-lr-zero", [*ERASE, "--stage1-lr", "0", "--output-dir", OUT], 2, "greater than 0"),
    ("stage2-lr-nan", [*ERASE, "--stage2-lr", "nan", "--output-dir", OUT], 2, "--stage2-lr must be a finite number"),
    ("ti-lr-nan", [*ERASE, "--ti-lr", "nan", "--output-dir", OUT], 2, "--ti-lr must be a finite number"),
    ("ti-lr-negative", [*ERASE, "--ti-lr", "-0.1", "--output-dir", OUT], 2, "--ti-lr must be"),
    ("negative-guidance-nan", [*ERASE, "--negative-guidance", "nan", "--output-dir", OUT], 2,
     "--negative-guidance must be a finite number"),
    ("compositional-inf", [*ERASE, "--compositional-guidance-scale", "inf", "--output-dir", OUT], 2,
     "--compositional-guidance-scale must be a finite number"),
    ("apg-momentum-nan", [*ERASE, "--apg-momentum", "nan", "--output-dir", OUT], 2, "--apg-momentum must be"),
    ("guidance-nan", [*GEN, "--guidance", "nan", "--output-dir", OUT], 2, "--guidance must be a finite number"),
    ("guidance-inf", [*GEN, "--guidance", "inf", "--output-dir", OUT], 2, "--guidance must be a finite number"),
    ("guidance-negative", [*GEN, "--guidance", "-1", "--output-dir", OUT], 2, "--guidance must be"),
    ("eval-guidance-nan", [*EVAL, "-p", "a cat", "--guidance", "nan", "--output-dir", OUT], 2, "--guidance must be"),
    ("threshold-nan", ["eval", "-m", "nudity", *TINY, "-p", "a cat", "--threshold", "nan", "--output-dir", OUT], 2,
     "--threshold must be a finite number"),
    ("careset-alpha-nan", ["careset", "--concept", "cat", "--images", "{ws}/mixed-images", "--output-dir", OUT,
                           "--alpha", "nan"], 2, "--alpha must be a finite number"),
    ("toy-fraction-nan", ["toy", "train", "--fraction", "nan", "--output", OUT, "--work-dir", OUT], 2,
     "--fraction must be a finite number"),
    # image sides: positive multiples of 8, not absurdly large, checked before the model loads
    ("height-63", [*GEN, "--height", "63", "--output-dir", OUT], 2, "--height must be a multiple of 8"),
    ("height-negative", [*GEN, "--height", "-8", "--output-dir", OUT], 2, "--height must be a multiple of 8"),
    ("height-zero", [*GEN, "--height", "0", "--output-dir", OUT], 2, "--height must be a multiple of 8"),
    ("height-100000", [*GEN, "--height", "100000", "--output-dir", OUT], 2, "at most 4096"),
    ("width-63", [*GEN, "--width", "63", "--output-dir", OUT], 2, "--width must be a multiple of 8"),
    ("eval-height", [*EVAL, "-p", "a cat", "--height", "12", "--output-dir", OUT], 2, "--height must be"),
    ("resolution-100", [*ERASE, "--resolution", "100", "--output-dir", OUT], 2, "--resolution must be a multiple of 8"),
    # seeds: flag and CSV columns, 0 <= seed < 2**63, when the file is read
    ("seed-negative", [*GEN, "--seed", "-1", "--output-dir", OUT], 2, "--seed must be at least 0"),
    ("erase-seed-negative", [*ERASE, "--seed", "-3", "--output-dir", OUT], 2, "--seed must be at least 0"),
    ("csv-seed-inf", ["generate", "--prompts-file", "{ws}/seed-inf.csv", *TINY, "--output-dir", OUT], 2,
     "line 2: seed 'inf' is not a whole number"),
    ("csv-seed-1e30", ["generate", "--prompts-file", "{ws}/seed-huge.csv", *TINY, "--output-dir", OUT], 2,
     "line 2: seed '1e30' is out of range"),
    ("csv-seed-negative", ["generate", "--prompts-file", "{ws}/seed-negative.csv", *TINY, "--output-dir", OUT], 2,
     "seed '-1' is out of range"),
    ("csv-seed-2**63", ["generate", "--prompts-file", "{ws}/seed-toolarge.csv", *TINY, "--output-dir", OUT], 2,
     "is out of range"),
    ("csv-seed-fraction", ["generate", "--prompts-file", "{ws}/seed-fraction.csv", *TINY, "--output-dir", OUT], 2,
     "seed '1.5' is not a whole number"),
    ("csv-seed-last-image", ["generate", "--prompts-file", "{ws}/seed-last.csv", "--num-images", "2", *TINY,
                             "--output-dir", OUT], 2, "is not below 2**63"),
    ("eval-csv-seed", [*EVAL, "--prompts-file", "{ws}/seed-huge.csv", "--output-dir", OUT], 2, "is out of range"),
    # absurd sizes are refused up front, not a MemoryError
    ("num-images-1e8", [*GEN, "--num-images", "100000000", "--output-dir", OUT], 2, "--num-images must be"),
    ("num-images-total", [*GEN, *["-p", "x"] * 20, "--num-images", "99999", "--output-dir", OUT], 2,
     "more than one run plans"),
    # the config file and recipes go through the same checks
    ("config-guidance-nan", [*GEN, "--output-dir", OUT], 2, "--guidance must be a finite number"),
    ("config-seed", [*GEN, "--output-dir", OUT], 2, "--seed must be at least 0"),
    ("recipe-lr-inf", ["erase", "--recipe", "{ws}/recipe-inf.toml", *TINY], 2, "--stage1-lr must be a finite number"),
    ("recipe-resolution", ["erase", "--recipe", "{ws}/recipe-height.toml", *TINY], 2, "--resolution must be"),
    # a corrupt or planted single-file model is a bad file (exit 1), not "model not available" (exit 3)
    ("ckpt-planted", ["generate", "-p", "a cat", "--model", "{ws}/planted.ckpt", "--device", "cpu",
                      "--output-dir", OUT], 1, "is unreadable"),
    ("ckpt-garbage", ["generate", "-p", "a cat", "--model", "{ws}/garbage.ckpt", "--device", "cpu",
                      "--output-dir", OUT], 1, "is unreadable: not a PyTorch checkpoint"),
    ("ckpt-not-sd", ["generate", "-p", "a cat", "--model", "{ws}/not-sd.ckpt", "--device", "cpu",
                     "--output-dir", OUT], 1, "is not a Stable Diffusion checkpoint"),
    ("safetensors-garbage", ["generate", "-p", "a cat", "--model", "{ws}/garbage.safetensors", "--device", "cpu",
                             "--output-dir", OUT], 1, "is not a readable safetensors checkpoint"),
    ("safetensors-not-sd", ["generate", "-p", "a cat", "--model", "{ws}/vae-only.safetensors", "--device", "cpu",
                            "--output-dir", OUT], 1, "is not a Stable Diffusion checkpoint"),
    # image folders: every image checked up front, in one place, by every command that reads one
    ("erase-bad-images", [*ERASE, "--images", "{ws}/bad-images", "--output-dir", OUT], 2,
     "none of the 2 images in --images"),
    # the CARE set's CLIP: checked before the training images are rendered
    ("erase-clip-model-unknown", [*ERASE, "--clip-model", "nosuch", "--output-dir", OUT], 2,
     "--clip-model 'nosuch' is not an open_clip model"),
    ("erase-clip-tag-unknown", [*ERASE, "--clip-model", "ViT-B-32", "--clip-pretrained", "nosuch", "--output-dir", OUT],
     2, "--clip-pretrained 'nosuch' is neither a file nor a pretrained tag of ViT-B-32"),
    ("eval-bad-images", [*EVAL, "--images", "{ws}/bad-images", "--output-dir", OUT], 2,
     "none of the 2 images in --images"),
    ("careset-bad-images", ["careset", "--concept", "cat", "--images", "{ws}/bad-images", "--output-dir", OUT,
                            "--clip-model", "tiny-random"], 2, "none of the 2 images in --images"),
    ("eval-several-prompts-no-manifest", [*EVAL, "--images", "{ws}/good-images", "-p", "a cat", "-p", "a dog",
                                          "--output-dir", OUT], 2, "2 prompts cannot be matched to them"),
    # paths in the way: one line naming the command's own flag
    ("cache-dir-is-a-file", [*GEN, "--cache-dir", "{ws}/afile", "--output-dir", OUT], 2,
     "--cache-dir '{ws}/afile' is not a folder"),
    ("cache-show-cache-dir-file", ["cache", "--cache-dir", "{ws}/afile"], 2, "is not a folder"),
    ("export-output-under-file", ["export", "{ws}/unet.safetensors", "-f", "unet", "-o", "{ws}/afile/x.safetensors",
                                  *TINY], 2, "choose another --output"),
    ("generate-output-under-file", [*GEN, "--output-dir", "{ws}/afile/out"], 2, "choose another --output-dir"),
    # cache clear without a terminal to ask on, with or without --json
    ("cache-clear-no-tty", ["cache", "clear", "--cache-dir", "{ws}/cache"], 2, "pass --yes"),
    ("cache-clear-no-tty-json", ["cache", "clear", "--json", "--cache-dir", "{ws}/cache"], 2, "pass --yes"),
]
UNTOUCHED = ["out", "afile", "bad-images", "good-images", "mixed-images", "cache", "PWNED", "seed-inf.csv"]
CONFIGS = {"config-guidance-nan": "config-nan.toml", "config-seed": "config-seed.toml"}


@pytest.mark.parametrize("case,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(run_cli, ws, monkeypatch, case, argv, code, fragment):
    cache = ws / "cache" / "erased" / "kept"
    cache.mkdir(parents=True, exist_ok=True)
    if case in CONFIGS:
        monkeypatch.setenv("RECARE_CONFIG", str(ws / CONFIGS[case]))
    before = snapshot([ws / name for name in UNTOUCHED])
    result = run_cli(*[a.format(ws=ws) for a in argv])
    assert result.exit_code == code, result.stderr
    line = one_error_line(result.stderr)
    assert fragment.format(ws=ws) in line
    assert result.stdout == ""
    assert snapshot([ws / name for name in UNTOUCHED]) == before
    assert "--output-dir" not in line or "--output-dir" in argv  # hints name the flag the command has


# pieces of the table that need more than one call --------------------------------------------------

def test_numbers_are_checked_by_one_module_for_cli_and_library_alike():
    from recare_cli.erase.run import EraseRequest, check_request
    from recare_cli.errors import UsageError
    from recare_cli.generate import GenerateSettings, generate
    from recare_cli.models import Runtime

    with pytest.raises(UsageError, match="--stage1-lr must be a finite number"):
        check_request(EraseRequest(concepts=["cat"], concept_type="object", stage1_lr=float("nan")))
    with pytest.raises(UsageError, match="--guidance must be a finite number"):
        generate([], Path("unused"), Runtime("tiny-random"), GenerateSettings(guidance=float("inf")))


def test_every_number_option_of_every_command_has_a_rule():
    """A new int or float option without a rule in recare_cli.numbers would take NaN, infinity or a
    negative count to wherever it is used (--uce-erase-scale nan once reached the manifest)."""
    import typing

    import typer

    from recare_cli.cli.app import app
    from recare_cli.numbers import RULES

    def commands(command, path=()):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from commands(sub, (*path, name))
        else:
            yield " ".join(path), command.callback

    def numeric(annotation) -> bool:
        return annotation in (int, float) or any(numeric(a) for a in typing.get_args(annotation))

    options = {(path, name) for path, callback in commands(typer.main.get_command(app))
               for name, annotation in typing.get_type_hints(callback).items() if numeric(annotation)}
    assert len(options) > 30 and {name for _, name in options} >= {"guidance", "uce_lamb", "attack_lr", "seed"}
    assert sorted(option for option in options if option[1] not in RULES) == []


def test_long_prompts_get_short_unique_file_names():
    from recare_cli.generate import MAX_NAME_BYTES, image_filename

    emoji, cjk = "😀" * 120, "猫が窓辺で眠っている" * 40
    names = {image_filename(emoji, 0), image_filename(emoji + " 🐱", 0), image_filename(cjk, 0),
             image_filename(cjk + "。", 0), image_filename(cjk, 1)}
    assert len(names) == 5  # cut names stay distinct: the hash covers the whole prompt
    for name in names:
        assert len(name.encode("utf-8")) <= MAX_NAME_BYTES and name.endswith(("_0.png", "_1.png"))
        name.encode("utf-8").decode("utf-8")  # cut on a character boundary
    assert image_filename("a photo of a cat", 3) == "a_photo_of_a_cat_3.png"  # short names as the reference's


def test_json_never_holds_nan(tmp_path):
    from recare_cli.errors import RecareError
    from recare_cli.evaluate import write_results
    from recare_cli.fsutil import write_json
    from recare_cli.output import JSON, Reporter

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    with pytest.raises(RecareError, match="non-finite"):
        write_json(tmp_path / "settings.json", {"guidance": float("nan")})
    assert not (tmp_path / "settings.json").exists()
    records = [{"metric": "m", "model": "model", "fid": float("nan"), "detail": False, "_key": (), "_values": ("fid",)}]
    write_results(tmp_path, records, {"seed": 1})
    assert strict((tmp_path / "results.json").read_text())["results"][0]["fid"] is None
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    Reporter(JSON, stdout=Out()).event("step", loss=float("inf"))
    assert strict(lines[0])["loss"] is None


def test_image_folders_are_checked_in_one_place(ws, run_cli, tmp_path, tiny_model):
    """A folder with one good image: the bad ones are skipped with one warning, PIL's own stays quiet,
    and images without a manifest entry take the one prompt given."""
    from recare_cli.fsutil import scan_images

    scan = scan_images(ws / "mixed-images")
    assert [p.name for p in scan.images] == ["good.png"]
    assert {p.name for p, _ in scan.skipped} == {"bomb.png", "truncated.png"}

    out = tmp_path / "eval"
    result = run_cli(*EVAL, "--images", ws / "mixed-images", "-p", "a cat", "--output-dir", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "skipped 2 of 3 images" in lines[0], result.stderr
    assert "DecompressionBomb" not in result.stderr and "unused" not in result.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["image"] for r in results if r.get("detail")] == ["good.png"]


def test_verbose_errors_do_not_suggest_verbose(run_cli, monkeypatch, tmp_path):
    import recare_cli.generate

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(recare_cli.generate, "read_prompts", broken)
    quiet = run_cli(*GEN, "--output-dir", tmp_path / "a")
    assert quiet.exit_code == 1 and "rerun with --verbose" in one_error_line(quiet.stderr)
    loud = run_cli(*GEN, "--output-dir", tmp_path / "b", "--verbose")
    assert loud.exit_code == 1 and "Traceback" in loud.stderr
    last = loud.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: unexpected ValueError: boom") and "--verbose" not in last


# subprocesses: plugins, terminals, Ctrl-C, library noise --------------------------------------------

def _run(args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "recare_cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def test_plugin_calling_sys_exit_costs_one_warning(tmp_path):
    site = tmp_path / "site"
    (site / "recare_exiting-1.0.dist-info").mkdir(parents=True)
    (site / "recare_exiting-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: recare-exiting\n"
                                                                   "Version: 1.0\n")
    (site / "recare_exiting-1.0.dist-info" / "entry_points.txt").write_text(
        "[recare.metrics]\nexiting = recare_exiting:register\n")
    (site / "recare_exiting.py").write_text("import sys\n\ndef register(register):\n    sys.exit(3)\n")
    env = {"PYTHONPATH": str(site)}
    result = _run(["plugins", "list", "--json"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning:") and "exiting" in lines[0] and "SystemExit" in lines[0]
    assert any(json.loads(line).get("name") == "builtin" or "builtin" in line for line in result.stdout.splitlines())

    strict = _run(["plugins", "list"], {**env, "RECARE_STRICT_PLUGINS": "1", "RECARE_LOAD_PLUGINS": "nosuch"})
    assert strict.returncode == 2 and "nosuch" in one_error_line(strict.stderr)


def _tty_run(args, answer: bytes):
    """Run recare with a terminal as stdin (stdout and stderr stay pipes), typing `answer`."""
    import pty

    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "recare_cli", *args], stdin=secondary, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=REPO_ROOT, text=True)
    os.close(secondary)
    os.write(primary, answer)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        os.close(primary)
    return process.returncode, out, err


def test_cache_clear_asks_on_stderr_and_says_when_declined(tmp_path):
    entry = tmp_path / "cache" / "erased" / "kept"
    entry.mkdir(parents=True)
    code, out, err = _tty_run(["cache", "clear", "--json", "--cache-dir", str(tmp_path / "cache")], b"n\n")
    assert code == 1 and out == "" and entry.is_dir()
    assert "Delete everything" in err and "nothing was deleted" in err.strip().splitlines()[-1]
    code, out, err = _tty_run(["cache", "clear", "--json", "--cache-dir", str(tmp_path / "cache")], b"y\n")
    assert code == 0 and not entry.exists() and json.loads(out)["removed"] == ["erased/kept"]


# "ready" is written before recare's own code runs: Python's start-up is not recare's to handle.
STARTER = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); from recare_cli.__main__ import main; main()"


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.4, 0.6, 0.8, 1.5, 3.0])
def test_ctrl_c_whenever_it_lands_is_exit_130_and_one_line(tmp_path, tiny_model, delay):
    """Imports of the CLI (~0.1 s), of diffusers (lazily, ~0.5-0.8 s), model loading, generating."""
    out = tmp_path / "images"
    process = subprocess.Popen([sys.executable, "-c", STARTER, *GEN, "--steps", "50", "--num-images", "4",
                                "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO_ROOT, text=True)
    assert process.stdout.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    # Killed by SIGINT (after a library marked the interrupt as unhandled) is what a shell reports as 130, too.
    assert process.returncode in (130, -signal.SIGINT), err
    assert err.strip() == "Error: interrupted; finished work is kept and a rerun continues from it"
    assert not list(out.glob("*.tmp")) if out.exists() else True


# Python drops an exception raised in a weakref callback ("Exception ignored in …"); imports run such
# callbacks, so a Ctrl-C landing there was lost and generate ran to the end with exit 0 (seen on CI).
DROPPED_CTRL_C = """import os, signal, sys, time, weakref
import recare_cli.generate as generate
read_prompts = generate.read_prompts
def read_prompts_with_ctrl_c_in_a_callback(*args, **kwargs):
    class Dropped: pass
    def callback(ref):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200):
            time.sleep(0.001)
    thing = Dropped(); ref = weakref.ref(thing, callback); del thing
    return read_prompts(*args, **kwargs)
generate.read_prompts = read_prompts_with_ctrl_c_in_a_callback
from recare_cli.__main__ import main; main()"""


def test_ctrl_c_that_python_drops_in_a_callback_still_stops_the_command(tmp_path, tiny_model):
    out = tmp_path / "images"
    result = subprocess.run([sys.executable, "-c", DROPPED_CTRL_C, *GEN, "--num-images", "2", "--output-dir", str(out)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "Error: interrupted; finished work is kept and a rerun continues from it"
    assert "Exception ignored" not in result.stderr and [line for line in lines if "Error" in line] == lines[-1:]
    assert len(list(out.glob("*.png"))) < 2 and not list(out.glob("*.tmp"))


def test_ctrl_c_during_the_torch_import_waits_for_the_import_to_finish(tmp_path):
    """A KeyboardInterrupt raised while torch's C++ start-up calls back into Python aborts the process
    (SIGABRT, seen under load); so the import holds Ctrl-C back. A stand-in torch takes a Ctrl-C
    halfway through its import and notes whether the import got to its end."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    marker = tmp_path / "import-finished"
    (fake / "__init__.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\nfor _ in range(200):\n    time.sleep(0.001)\n"
        f"open({str(marker)!r}, 'w').close()\n")
    result = _run([*GEN, "--output-dir", str(tmp_path / "images")], {"PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "Error: interrupted; finished work is kept and a rerun continues from it"
    assert marker.exists()


def test_first_use_of_a_builtin_prints_only_recare(tmp_path):
    """A fresh cache: the built-in is written (transformers' "Writing model shards", diffusers' loading bars),
    an image of a 120-emoji prompt is drawn; stderr holds none of the libraries' output."""
    out = tmp_path / "images"
    result = _run([*GEN, "-p", "😀" * 120, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.returncode == 0, result.stderr
    for noise in ("Writing model shards", "Loading pipeline components", "it/s]", "Warning", "warn"):
        assert noise not in result.stderr, result.stderr
    names = [p.name for p in out.glob("*.png")]
    assert len(names) == 2 and all(len(n.encode()) <= 200 for n in names)


def test_unet_folder_without_weights_is_one_line(tmp_path, tiny_model):
    """diffusers' "An error occurred while trying to fetch …" must not surround the one Error line."""
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text((tiny_model / "unet" / "config.json").read_text())
    result = _run([*GEN, "--unet", str(unet), "--output-dir", str(tmp_path / "images")])
    assert result.returncode in (1, 2)
    one_error_line(result.stderr)
    assert not (tmp_path / "images").exists()
