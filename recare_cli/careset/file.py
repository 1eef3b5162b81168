"""The CARE set file (recare-method.md §6.6, the reference's format): its key, its prompts, and
reading one exactly as the reference's training accepts it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recare_cli.errors import RecareError
from recare_cli.manifest import Writer

CARESET_FILE = "careset.json"
REPORT_FILE = "careset.report.json"
CARESET = Writer("careset")
PROMPT_STYLES = ("photo", "style")
RETAIN_MARKERS = ("photo", "painting")
WORD_END = "</w>"
DEFAULT_PROMPT_STYLE = "photo"


def careset_key(word: str) -> str:
    """The JSON key stem of §6.6: lower-cased, everything but [a-z0-9_-] removed."""
    return re.sub(r"[^a-z0-9_-]", "", word.lower())


def prompt_style_for(concept: str, type_name: str | None = None) -> str:
    """The CARE set's prompt style: from --type, else from a preset concept, else photo."""
    from recare_cli.plugins import registry
    from recare_cli.presets import PRESETS, preset_key

    if type_name is None:
        preset = next((p for name, p in PRESETS.items() if preset_key(name) == preset_key(concept)), None)
        if preset is None:
            return DEFAULT_PROMPT_STYLE
        type_name = preset.concept_type
    return registry().concept_type(type_name).care_style


@dataclass
class CareSet:
    anchor: list[str]  # "A {word}"
    retain: list[str]  # "A photo of {word}" / "A painting of {word}"
    key: str  # the anchor list's key without "_care_word", e.g. "nudity"

    def words(self) -> list[str]:
        """The CARE words themselves: each anchor prompt without its "A "."""
        return list(dict.fromkeys(a.split(" ", 1)[1] if a.startswith("A ") else a for a in self.anchor))


def read_careset(path) -> CareSet:
    """Read a CARE set, accepting exactly what the reference's training accepts (§6.6)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecareError(f"CARE set '{path}' does not exist", hint="build one with `recare careset`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecareError(f"cannot read CARE set '{path}': {exc}") from None
    except json.JSONDecodeError as exc:
        raise RecareError(f"CARE set '{path}' is not JSON: {exc.msg} at line {exc.lineno}") from None

    def bad(problem: str) -> RecareError:
        return RecareError(f"CARE set '{path}' {problem}",
                           hint='expected {"<key>_care_word": ["A tok", ...], "<key>_care_word_photo": ["A photo of tok", ...]}')

    if not isinstance(data, dict):
        raise bad(f"is not a JSON object (found {type(data).__name__})")
    retain_keys = [k for k in data if any(marker in k for marker in RETAIN_MARKERS)]
    anchor_keys = [k for k in data if k not in retain_keys]
    if len(retain_keys) > 1:
        raise bad(f"has {len(retain_keys)} retain lists ({', '.join(retain_keys)}); exactly one key may contain "
                  "'photo' or 'painting'")
    if not retain_keys:
        raise bad("has no retain list (a key containing 'photo' or 'painting')")
    if len(anchor_keys) != 1:
        raise bad("has no anchor list" if not anchor_keys
                  else f"has {len(anchor_keys)} anchor lists ({', '.join(anchor_keys)}); exactly one is allowed")
    lists = {}
    for key in (anchor_keys[0], retain_keys[0]):
        value = data[key]
        if not isinstance(value, list):
            raise bad(f"list '{key}' is not a list (found {type(value).__name__})")
        if not value:
            raise bad(f"list '{key}' is empty")
        wrong = [i for i, entry in enumerate(value) if not isinstance(entry, str) or not entry.strip()]
        if wrong:
            raise bad(f"list '{key}' has {len(wrong)} entries that are not non-empty strings (first at index {wrong[0]})")
        lists[key] = value
    anchor_key = anchor_keys[0]
    stem = anchor_key[: -len("_care_word")] if anchor_key.endswith("_care_word") else anchor_key
    return CareSet(anchor=lists[anchor_key], retain=lists[retain_keys[0]], key=stem)


def strip_word_end(token: str) -> str:
    return token[: -len(WORD_END)] if token.endswith(WORD_END) else token


def careset_json(concept: str, words: Sequence[str], prompt_style: str) -> dict:
    """The reference's file: {"{key}_care_word": ["A w", ...], "{key}_care_word_photo": ["A photo of w", ...]}."""
    key = careset_key(concept)
    noun = "painting" if prompt_style == "style" else "photo"
    return {
        f"{key}_care_word": [f"A {w}" for w in words],
        f"{key}_care_word_{noun}": [f"A {noun} of {w}" for w in words],
    }
