"""Options every subcommand accepts, added by one decorator so no command repeats them."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.cache import check_cache_dir
from recare_cli.errors import interrupts_held
from recare_cli.models import DEFAULT_MODEL
from recare_cli.numbers import check_all
from recare_cli.output import HUMAN, JSON, QUIET, Reporter, quiet_libraries

COMMON_PANEL = "Common options"


class Device(str, Enum):
    # cuda:N is accepted too; click.Choice cannot express it, so this enum only feeds completion.
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class Common:
    model: str
    device: str
    dtype: str
    json: bool
    quiet: bool
    verbose: bool
    offline: bool
    cache_dir: Optional[Path]

    @property
    def reporter(self) -> Reporter:
        return Reporter(JSON if self.json else QUIET if self.quiet else HUMAN)


# Set by the decorator so the error handler knows whether to show tracebacks.
VERBOSE = {"on": False}


def _complete_device(incomplete: str):
    return [d.value for d in Device if d.value.startswith(incomplete)]


def _option(name: str, annotation, default, help: str, *flags: str, **kwargs) -> inspect.Parameter:
    option = typer.Option(*flags, help=help, rich_help_panel=COMMON_PANEL, **kwargs)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def _common_parameters(default_model: str) -> list[inspect.Parameter]:
    return [
        _option("model", str, default_model,
                "Base model (SD 1.x, SD 2.x, SDXL; the family is read from its files): HF repo id, diffusers folder, "
                "SD/SDXL .safetensors/.ckpt file, or a built-in (toy, tiny-random, tiny-random-v, tiny-random-xl).",
                "--model"),
        _option("device", str, "auto", "auto, cpu, cuda, cuda:N or mps.", "--device",
                autocompletion=_complete_device),
        _option("dtype", DType, DType.auto, "auto = fp16 on CUDA, fp32 on CPU.", "--dtype"),
        _option("json_output", bool, False, "Results as JSON lines on stdout; progress and logs on stderr.", "--json"),
        _option("quiet", bool, False, "No progress bars or messages.", "--quiet", "-q"),
        _option("verbose", bool, False, "Show tracebacks on errors.", "--verbose", "-v"),
        _option("offline", bool, False, "Never touch the network (HF_HUB_OFFLINE=1).", "--offline"),
        _option("cache_dir", Optional[Path], None, "recare's cache folder.", "--cache-dir",
                envvar="RECARE_CACHE_DIR"),
    ]


def with_common(func=None, *, default_model: str | None = None):
    """Add the common options to a command; the command receives them as `common: Common`."""
    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "common"]
        extra = _common_parameters(default_model or DEFAULT_MODEL)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            common = Common(
                model=kwargs.pop("model"),
                device=kwargs.pop("device"),
                dtype=DType(kwargs.pop("dtype")).value,
                json=kwargs.pop("json_output"),
                quiet=kwargs.pop("quiet"),
                verbose=kwargs.pop("verbose"),
                offline=kwargs.pop("offline"),
                cache_dir=kwargs.pop("cache_dir"),
            )
            VERBOSE["on"] = common.verbose
            quiet_libraries(common.verbose)
            check_all(kwargs)  # typed, environment and config.toml values alike, before anything loads
            check_cache_dir(common.cache_dir)
            if common.offline:
                # Read by huggingface_hub when it is first imported, which happens after this.
                os.environ["HF_HUB_OFFLINE"] = "1"
            with interrupts_held():  # every command here runs torch; its import must not take a Ctrl-C
                importlib.import_module("torch")
            return func(*args, common=common, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        return wrapper

    return decorate(func) if func is not None else decorate
