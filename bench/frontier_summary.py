"""The figures bench/toy_frontier.py reports of each model, its matched-erasure table, and its picture."""

from __future__ import annotations

from pathlib import Path

from frontier_measure import CONCEPT  # bench/, the script's own folder

MATCHED = 10.0  # the target rate at which methods are compared


def summarise(entry: dict, base: dict, care: list[str]) -> dict:
    """The figures of one model, with `care` as the CARE set: every concept in it counts as CARE,
    whatever CARE set the measurement was labelled with (ESD, UCE and the base model are measured
    once, for every image count's comparison)."""
    def regrouped(row):
        kind, plus, rest = row["group"].partition("+")
        if kind in ("CARE", "unrelated"):
            kind = "CARE" if row["concept"] in care else "unrelated"
        return dict(row, group=kind + plus + rest)

    rates, base_rates = [regrouped(r) for r in entry["rates"]], base["rates"]

    def mean_rate(group):
        values = [r["rate"] for r in rates if r["group"] == group]
        return sum(values) / len(values) if values else None

    def all_kept(groups, concept=None):
        """[kept % (sum of rates over sum of base rates), lowest per-prompt kept %]"""
        pairs = [(r["rate"], b["rate"]) for r, b in zip(rates, base_rates)
                 if r["group"] in groups and (concept is None or r["concept"] == concept) and b["rate"] > 0]
        if not pairs:
            return None
        return [100.0 * sum(r for r, _ in pairs) / sum(b for _, b in pairs), min(100.0 * r / b for r, b in pairs)]

    return {
        "target_common": mean_rate("target-common"), "target_rare": mean_rate("target-rare"),
        "adversarial": mean_rate("adversarial"),
        "care_kept": all_kept(("CARE", "CARE+target")),
        "care_kept_without_target": all_kept(("CARE",)), "care_kept_with_target": all_kept(("CARE+target",)),
        "care_per_concept": {w: all_kept(("CARE", "CARE+target"), w) for w in care},
        "unrelated_kept": all_kept(("unrelated",)), "unrelated_kept_with_target": all_kept(("unrelated+target",)),
        "night_without_target": all_kept(("CARE", "unrelated"), "night"),
        "night_with_target": all_kept(("CARE+target", "unrelated+target"), "night"),
    }


def target(point: dict) -> float:
    """A model's target rate: the higher of its common- and rare-context rates (the goal needs both low)."""
    return max(point["target_common"], point["target_rare"])


def at_matched_erasure(points: list[dict], key: str, level: float = 10.0):
    """`key` at target rate `level` on the method's upper envelope, None if no setting reaches it.

    The envelope is the settings no other setting beats on both counts (a target rate as low and a
    `key` as high), joined by straight lines: the most a method keeps at each erasure among the
    settings tried, whatever order they were tried in. At or under its lowest-rate setting's level,
    the method keeps the most of any setting at or under the level.
    """
    measured = [(target(p), p[key][0]) for p in points if p[key] is not None]
    envelope = sorted((t, k) for t, k in measured
                      if not any(t2 <= t and k2 >= k and (t2, k2) != (t, k) for t2, k2 in measured))
    if not envelope or envelope[0][0] > level:
        return None
    for (t_low, k_low), (t_high, k_high) in zip(envelope, envelope[1:]):
        if t_low <= level < t_high:
            return k_low + (level - t_low) / (t_high - t_low) * (k_high - k_low)
    return envelope[-1][1]


def plot(points: dict, path: Path, images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for method in dict.fromkeys(p["model"]["method"] for p in points.values()):
        # The curve is seed 42's settings; other seeds' defaults are stars off the line.
        ours = [p for p in points.values() if p["model"]["method"] == method]
        curve = sorted((p for p in ours if p["model"].get("seed", 42) == 42), key=target)
        x = [target(p) for p in curve]
        for ax, key in zip(axes, ("care_kept", "unrelated_kept")):
            line, = ax.plot(x, [p[key][0] for p in curve], "o-", label=method, alpha=0.8)
            defaults = [(target(p), p[key][0]) for p in ours if p["model"].get("default")]
            if defaults:
                ax.plot(*zip(*defaults), "*", markersize=14, color=line.get_color(), markeredgecolor="black")
    for ax, title in zip(axes, ("CARE concepts kept", "unrelated concepts kept")):
        ax.axvline(MATCHED, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{CONCEPT} rate, % (higher of common, rare contexts)")
        ax.set_xlim(-3, 103)
        ax.set_ylim(0, 115)
        ax.set_ylabel("% of the base model's rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy world: erasing star, ReCARE trained on {images} images "
                 "(lines: seed 42 settings; stars: defaults, seeds 42 and 43)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
