"""The one place that says which numbers recare accepts, by option name.

Every command-line option (typed, from the environment or from config.toml), every recipe key and
every CSV seed goes through `check`, before any model loads: a NaN guidance, an infinite learning
rate or a seed of 1e30 is a usage error (exit 2) instead of black images, exploded weights or an
overflow after an hour of training. Upper bounds are set where a larger value can only overflow,
exhaust memory or is meaningless (a learning rate of 1e40, a 100000-pixel image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recare_cli.errors import UsageError

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_SIDE = 4096  # pixels; past this one image no longer fits on any current accelerator
MAX_JOBS = 1_000_000  # images one generate/eval run plans; split larger jobs (reruns skip what exists)


@dataclass(frozen=True)
class Rule:
    low: float
    high: float
    low_open: bool = False  # low itself is excluded (learning rates, scales: "positive")
    high_open: bool = False
    multiple: int = 1  # integers only: must be a multiple of this (image sides: the VAE's factor 8)

    def describe(self) -> str:
        low = f"{'greater than' if self.low_open else 'at least'} {_fmt(self.low)}"
        high = f"{'below' if self.high_open else 'at most'} {_fmt(self.high)}"
        multiple = f"a multiple of {self.multiple}, " if self.multiple > 1 else ""
        return f"{multiple}{low} and {high}"

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and (self.multiple == 1 or value % self.multiple == 0)


def _fmt(value: float) -> str:
    if value == SEED_LIMIT:
        return "2**63"
    return f"{value:g}" if isinstance(value, float) else str(value)


LEARNING_RATE = Rule(0.0, 1.0, low_open=True)
GUIDANCE = Rule(0.0, 100.0, low_open=True)
COUNT = Rule(1, 10_000_000)
SIDE = Rule(8, MAX_SIDE, multiple=8)
SEED = Rule(0, SEED_LIMIT, high_open=True)

RULES: dict[str, Rule] = {
    # learning rates
    "stage1_lr": LEARNING_RATE, "stage2_lr": LEARNING_RATE, "ti_lr": LEARNING_RATE,
    # guidance and scales
    "guidance": GUIDANCE, "negative_guidance": GUIDANCE, "compositional_guidance_scale": GUIDANCE,
    "apg_eta": Rule(0.0, 100.0), "apg_norm_threshold": Rule(0.0, 1e6), "apg_momentum": Rule(-1.0, 1.0),
    # thresholds and fractions
    "threshold": Rule(0.0, 1.0), "alpha": Rule(0.0, 100.0), "fraction": Rule(0.0001, 1.0),
    # image sides (pixels)
    "height": SIDE, "width": SIDE, "resolution": SIDE,
    # seeds
    "seed": SEED,
    # counts
    "num_images": Rule(1, 100_000), "steps": Rule(1, 1000),
    "prefix_steps": Rule(1, 50),  # 50: erase.denoise.NSTEPS, the method's own schedule
    "batch_size": Rule(1, 4096), "iterations": COUNT, "ti_steps": COUNT, "checkpoint_every": COUNT,
    "rounds": Rule(0, 1000), "num_adv_concepts": Rule(0, 1000), "care_top_k": COUNT, "care_top_n": COUNT,
    "top_k_per_image": COUNT, "top_n_tokens": Rule(2, 10_000_000), "n_clusters": Rule(1, 10_000),
    "min_cluster_size": Rule(2, 10_000_000), "care_min_cluster_size": Rule(2, 10_000_000), "k_each_side": Rule(0, 10_000), "top_k": Rule(1, 1000), "rank": Rule(1, 100_000),
    # UCE's closed form: a scale of 0 switches its term off; lambda keeps the system solvable
    "uce_erase_scale": Rule(0.0, 1e6), "uce_preserve_scale": Rule(0.0, 1e6), "uce_lamb": Rule(0.0, 1e6, low_open=True),
    # attacks
    "attack_steps": COUNT, "attack_tokens": Rule(1, 1000), "attack_lr": LEARNING_RATE, "attack_seed": SEED,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(name: str, value, where: str | None = None):
    """`value` if RULES allows it for option `name` (None and unknown names pass), else a UsageError."""
    rule = RULES.get(name)
    if rule is None or value is None or isinstance(value, bool):
        return value
    if not isinstance(value, (int, float)) or not rule.accepts(value):
        subject = f"{where}: {name}" if where else flag(name)
        finite = "" if isinstance(value, (int, float)) and math.isfinite(value) else "a finite number, "
        raise UsageError(f"{subject} must be {finite}{rule.describe()} (got {value})",
                         hint=f"leave out {flag(name) if not where else name} for its default")
    return value


def check_all(values: dict, where: str | None = None) -> None:
    """`check` every known option in `values` (parameter name -> value)."""
    for name, value in values.items():
        check(name, value, where)


def parse_seed(text: str, where: str) -> int:
    """A seed from a file cell ('42', '42.0'): a whole number in [0, 2**63), or a UsageError naming `where`."""
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"{where}: seed '{text}' is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise UsageError(f"{where}: seed '{text}' is not a whole number", hint=f"seeds are whole numbers {SEED.describe()}")
    seed = int(text) if text.strip().lstrip("+-").isdigit() else int(number)
    if not SEED.accepts(seed):
        raise UsageError(f"{where}: seed '{text}' is out of range", hint=f"seeds are whole numbers {SEED.describe()}")
    return seed


def check_job_count(prompts: int, per_prompt: int) -> None:
    """Refuse runs too large to plan (each image is one entry of the manifest) before anything is built."""
    if prompts * per_prompt > MAX_JOBS:
        raise UsageError(
            f"{prompts} prompts × {per_prompt} images is {prompts * per_prompt:,} images, more than one run "
            f"plans ({MAX_JOBS:,})",
            hint="split the prompts into several runs or lower --num-images")
