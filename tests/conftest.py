"""Shared fixtures: an isolated recare cache with `tiny-random` built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SESSION_ROOT = None


def pytest_configure(config):
    # Isolate every test from the user's cache, config and network before anything imports HF.
    global SESSION_ROOT
    import tempfile

    SESSION_ROOT = Path(tempfile.mkdtemp(prefix="recare-tests-"))
    (SESSION_ROOT / "config.toml").write_text("")
    os.environ["RECARE_CACHE_DIR"] = str(SESSION_ROOT / "cache")
    os.environ["RECARE_CONFIG"] = str(SESSION_ROOT / "config.toml")
    os.environ["HF_HOME"] = str(SESSION_ROOT / "hf-home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    models = os.environ.get("RECARE_TEST_MODELS")
    if models:  # built-in models an earlier session built: mutation testing runs one session per mutant
        shutil.copytree(models, SESSION_ROOT / "cache" / "models")


def pytest_unconfigure(config):
    if SESSION_ROOT is not None:
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """recare's cache for this test session (RECARE_CACHE_DIR points here)."""
    return Path(os.environ["RECARE_CACHE_DIR"])


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    """The built-in tiny-random pipeline folder, built once per session."""
    from recare_cli.models import builtin_path

    return builtin_path("tiny-random", cache_dir)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    """A loaded tiny-random pipeline on the CPU (do not mutate its weights; deep-copy first)."""
    from recare_cli.models import Runtime

    pipe, _, _ = Runtime("tiny-random", device="cpu").pipeline()
    return pipe


@pytest.fixture(scope="session")
def tiny_v_pipe(cache_dir):
    """The built-in SD-2.x-shaped v-prediction pipeline on the CPU (deep-copy before mutating)."""
    from recare_cli.models import Runtime

    pipe, _, _ = Runtime("tiny-random-v", device="cpu").pipeline()
    return pipe


@pytest.fixture(scope="session")
def tiny_xl_pipe(cache_dir):
    """The built-in SDXL-shaped pipeline on the CPU (deep-copy before mutating)."""
    from recare_cli.models import Runtime

    pipe, _, _ = Runtime("tiny-random-xl", device="cpu").pipeline()
    return pipe


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from recare_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return invoke
