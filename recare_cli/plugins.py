"""Concept types, metrics, methods and attacks, registered by plugins through entry points.

A plugin is a callable `hook(register)` published in one of the entry-point groups below; it
calls `register(obj)` once per thing it adds. recare's own concept types, metrics, methods and attacks are
default plugins loaded through the very same code path, so a third-party plugin can do anything
a built-in does. Each entry point loads in its own try/except: a broken plugin costs one warning
(an error with RECARE_STRICT_PLUGINS=1) and the rest of recare keeps working.
RECARE_LOAD_PLUGINS=a,b loads only the third-party plugins named a and b.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from recare_cli.errors import RecareError, UsageError

GROUPS = {
    "recare.concept_types": "concept_types",
    "recare.metrics": "metrics",
    "recare.methods": "methods",
    "recare.attacks": "attacks",
}
DEFAULT_PLUGINS = [
    EntryPoint("builtin", "recare_cli.builtins.concept_types:register", "recare.concept_types"),
    EntryPoint("builtin", "recare_cli.builtins.metrics:register", "recare.metrics"),
    EntryPoint("builtin", "recare_cli.builtins.methods:register", "recare.methods"),
    EntryPoint("builtin", "recare_cli.builtins.attacks:register", "recare.attacks"),
]


@dataclass(frozen=True)
class ConceptType:
    """What recare needs to know to erase a kind of concept."""

    name: str
    templates: tuple[str, ...]  # textual-inversion captions, each with one "{}"
    care_style: str  # "photo" or "style": the CARE set's retain prompts
    initializer_token: str  # default embedding for a new adversarial token
    target_prompt: str  # images of the target, e.g. "A photo of {}"
    default_metrics: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Metric:
    """An evaluation; `run`'s contract is documented in recare_cli/evaluate/__init__.py."""

    name: str
    run: Callable[..., Any]
    description: str = ""
    requires: tuple[str, ...] = ()  # option names checked before any image is generated
    check: Callable[..., Any] | None = None  # check(ctx): refuses unusable options and weights before any image


@dataclass(frozen=True)
class Method:
    """An erasure method; `run`'s contract is documented in recare_cli/erase/__init__.py."""

    name: str
    run: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class Attack:
    """An adversarial attack for `recare eval --attack`; `run`'s contract is in recare_cli/attacks/__init__.py."""

    name: str
    run: Callable[..., Any]
    description: str = ""
    needs_target_images: bool = False  # the base model's image of each prompt and seed
    needs_concept_images: bool = False  # images of the erased concept (a run's, or --attack-images)
    options: tuple[str, ...] = ()  # which of steps, tokens, lr, images it reads; others are warned about


_KINDS = {ConceptType: "concept_types", Metric: "metrics", Method: "methods", Attack: "attacks"}


@dataclass
class PluginInfo:
    name: str
    group: str
    source: str  # "builtin" or the distribution name
    version: str | None
    registered: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    concept_types: dict[str, ConceptType] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    methods: dict[str, Method] = field(default_factory=dict)
    attacks: dict[str, Attack] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    def load(self, ep: EntryPoint, source: str, version: str | None, strict: bool, warn) -> None:
        info = PluginInfo(ep.name, ep.group, source, version)
        self.plugins.append(info)
        expected = GROUPS[ep.group]

        added = []

        def register(obj) -> None:
            kind = _KINDS.get(type(obj))
            if kind != expected:
                raise TypeError(f"group {ep.group} takes {expected}, got {type(obj).__name__}")
            added.append(obj)

        try:
            ep.load()(register)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - one broken plugin (even one calling sys.exit) must not break the CLI
            # Collapsed to one line: the warning (or error) must stay a single line.
            info.error = " ".join(f"{type(exc).__name__}: {exc}".split())
            if strict:
                raise RecareError(f"plugin '{ep.name}' ({ep.group}) failed to load: {info.error}") from exc
            warn(f"plugin '{ep.name}' ({ep.group}) failed to load and was skipped: {info.error}")
            return
        # Registered only once the hook has succeeded, so a plugin that fails half-way adds nothing.
        for obj in added:
            getattr(self, expected)[obj.name] = obj
            info.registered.append(obj.name)

    def concept_type(self, name: str) -> ConceptType:
        return _lookup(self.concept_types, name, "concept type", "--type")

    def metric(self, name: str) -> Metric:
        return _lookup(self.metrics, name, "metric", "--metric")

    def method(self, name: str) -> Method:
        return _lookup(self.methods, name, "method", "--method")

    def attack(self, name: str) -> Attack:
        return _lookup(self.attacks, name, "attack", "--attack")


def _lookup(table: dict, name: str, what: str, flag: str):
    if name not in table:
        raise UsageError(f"unknown {what} '{name}'", hint=f"{flag} takes one of: {', '.join(sorted(table))}")
    return table[name]


def _third_party(warn, strict: bool) -> list[tuple[EntryPoint, str, str | None]]:
    found = []
    for group in GROUPS:
        for ep in entry_points(group=group):
            dist = getattr(ep, "dist", None)
            found.append((ep, dist.name if dist else "?", dist.version if dist else None))
    only = os.environ.get("RECARE_LOAD_PLUGINS")
    if only is not None:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        missing = wanted - {ep.name for ep, _, _ in found} - {source for _, source, _ in found}
        if missing:
            if strict:
                raise UsageError(f"RECARE_LOAD_PLUGINS names {', '.join(sorted(missing))}, which no installed package "
                                 "provides", hint="install it, or fix RECARE_LOAD_PLUGINS (RECARE_STRICT_PLUGINS=1 is on)")
            warn(f"RECARE_LOAD_PLUGINS names {', '.join(sorted(missing))}, which no installed package provides")
        found = [item for item in found if item[0].name in wanted or item[1] in wanted]
    return found


def _stderr_warning(message: str) -> None:
    from recare_cli.output import Reporter

    Reporter().warn(message)


@lru_cache(maxsize=1)
def registry() -> Registry:
    from recare_cli import __version__

    strict = os.environ.get("RECARE_STRICT_PLUGINS", "") not in ("", "0")
    reg = Registry()
    for ep in DEFAULT_PLUGINS:
        reg.load(ep, "builtin", __version__, strict=True, warn=_stderr_warning)
    for ep, source, version in _third_party(_stderr_warning, strict):
        reg.load(ep, source, version, strict=strict, warn=_stderr_warning)
    return reg
