"""User defaults from a TOML file (platformdirs user config dir, or the path in RECARE_CONFIG).

Top-level keys set options of every command; a table named after a command sets that command's:

    model = "tiny-random"
    device = "cpu"
    [generate]
    steps = 25
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from recare_cli.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_path() -> Path:
    if os.environ.get("RECARE_CONFIG"):
        return Path(os.environ["RECARE_CONFIG"])
    from platformdirs import user_config_dir

    return Path(user_config_dir("recare")) / "config.toml"


def load_config() -> dict:
    path = config_path()
    if not path.is_file():
        if os.environ.get("RECARE_CONFIG"):
            raise UsageError(f"config file '{path}' (from RECARE_CONFIG) does not exist")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file '{path}' is not valid TOML: {exc}") from None


# Keys are written as the options are (`json`, `cache-dir`); click knows some under other names.
PARAMETER_NAMES = {"json": "json_output"}


def _parameter(key: str) -> str:
    name = key.replace("-", "_")
    return PARAMETER_NAMES.get(name, name)


def default_map(config: dict, commands: dict[str, set[str]]) -> dict:
    """Click's default_map: per command, the top-level keys overlaid with the command's table.

    `commands` maps each command to its parameter names; a key no command knows is an error, so
    a typo (`stepz = 25`) is reported instead of silently doing nothing.
    """
    path = config_path()
    known_anywhere = set().union(*commands.values())
    shared = {}
    for key, value in config.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(f"config file '{path}': unknown section [{key}]",
                                 hint=f"sections are named after commands: {', '.join(commands)}")
            continue
        if _parameter(key) not in known_anywhere:
            raise UsageError(f"config file '{path}': no command has an option '{key}'")
        shared[_parameter(key)] = value
    result = {}
    for name, parameters in commands.items():
        table = {_parameter(k): v for k, v in config.get(name, {}).items()}
        unknown = sorted(set(table) - parameters)
        if unknown:
            raise UsageError(f"config file '{path}': [{name}] has no option '{unknown[0]}'",
                             hint=f"see `recare {name} --help`")
        result[name] = {**{k: v for k, v in shared.items() if k in parameters}, **table}
    return result
