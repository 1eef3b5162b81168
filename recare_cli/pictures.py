"""The pictures recare writes beside its numbers: eval's grid.png, erase's losses.png, careset's careset.png.

The grid is drawn with PIL alone; the two plots use matplotlib's object API (no pyplot, so no
global backend is switched), imported only when a plot is drawn. Every picture is written through
`atomic_path`, like every other output.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.fsutil import atomic_path

LOSSES_FILE = "losses.png"
CARESET_PICTURE = "careset.png"

# The grid shows at most this many prompts and images per prompt: a 4,703-prompt I2P run would
# otherwise make a picture nobody can open. results.csv has every image.
GRID_MAX_PROMPTS = 10
GRID_MAX_IMAGES = 8
# Images at least this wide are scaled down to it; smaller ones (the toy's 32 px) are scaled up
# by a whole factor, nearest-neighbour, to at least GRID_MIN_CELL, so their pixels stay sharp.
GRID_MAX_CELL = 256
GRID_MIN_CELL = 160
LABEL_WIDTH = 130
PAD = 6
FONT_SIZE = 13
TITLE_SIZE = 15


# the eval grid ---------------------------------------------------------------------------------

@dataclass
class GridRow:
    """One model's images of one prompt, with the judge's verdict under each (\"\" for none)."""

    label: str
    images: list[Path]
    verdicts: list[str] = field(default_factory=list)


@dataclass
class GridBlock:
    """One prompt: a title, column headers (the seeds) and a row per model."""

    title: str
    rows: list[GridRow]
    columns: list[str] = field(default_factory=list)


def cell_size(width: int, height: int) -> tuple[int, int]:
    """How large an image of `width` x `height` is drawn in the grid."""
    longest = max(width, height)
    if longest >= GRID_MAX_CELL:
        scale = GRID_MAX_CELL / longest
    else:
        scale = math.ceil(GRID_MIN_CELL / longest)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a line that would overflow `max_lines` ends the text with '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " ..."
    for i, line in enumerate(lines):  # a single word wider than the cell is cut
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "."
        lines[i] = line
    return lines


def draw_grid(blocks: Sequence[GridBlock], path: str | os.PathLike) -> tuple[int, int]:
    """Write the blocks as one PNG at `path` (atomically); returns its (width, height)."""
    from PIL import Image, ImageDraw

    first = next((p for b in blocks for r in b.rows for p in r.images), None)
    if first is None:
        raise ValueError("a grid needs at least one image")
    with Image.open(first) as img:
        cell_w, cell_h = cell_size(*img.size)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    line_h = FONT_SIZE + 4
    verdict_lines = 3
    n_cols = max(len(r.images) for b in blocks for r in b.rows)
    width = LABEL_WIDTH + n_cols * (cell_w + PAD) + PAD
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [_wrap(measure, b.title or "(no prompt)", title_font, width - 2 * PAD, 3) for b in blocks]
    row_h = cell_h + PAD + verdict_lines * line_h
    heights = [PAD + len(t) * (TITLE_SIZE + 4) + line_h + len(b.rows) * row_h + PAD for b, t in zip(blocks, titles)]
    canvas = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)

    top = 0
    for block, title, height in zip(blocks, titles, heights):
        if top:
            draw.line([(0, top), (width, top)], fill=(170, 170, 170), width=1)
        y = top + PAD
        for line in title:
            draw.text((PAD, y), line, fill="black", font=title_font)
            y += TITLE_SIZE + 4
        for c, header in enumerate(block.columns[:n_cols]):
            draw.text((LABEL_WIDTH + c * (cell_w + PAD), y), header, fill=(90, 90, 90), font=font)
        y += line_h
        for row in block.rows:
            for i, line in enumerate(_wrap(draw, row.label, font, LABEL_WIDTH - 2 * PAD, 3)):
                draw.text((PAD, y + cell_h // 2 - line_h + i * line_h), line, fill="black", font=font)
            for c, image_path in enumerate(row.images):
                x = LABEL_WIDTH + c * (cell_w + PAD)
                with Image.open(image_path) as img:
                    picture = img.convert("RGB")
                resample = Image.Resampling.NEAREST if picture.width < cell_w else Image.Resampling.LANCZOS
                canvas.paste(picture.resize((cell_w, cell_h), resample), (x, y))
                verdict = row.verdicts[c] if c < len(row.verdicts) else ""
                for i, line in enumerate(_wrap(draw, verdict, font, cell_w, verdict_lines)):
                    draw.text((x, y + cell_h + 2 + i * line_h), line, fill="black", font=font)
            y += row_h
        top += height
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    return canvas.size


def eval_grid(models: Iterable[tuple[str, Sequence]], records: Sequence[dict], path: str | os.PathLike,
              max_prompts: int = GRID_MAX_PROMPTS, max_images: int = GRID_MAX_IMAGES) -> tuple[int, int]:
    """grid.png of an eval run: per prompt, a row per (label, EvalImage list), verdicts from `records`.

    A verdict is the `verdict` value of a metric's per-image (detail) row for that model and image
    file; several metrics' verdicts are joined with '; '.
    """
    verdicts: dict[tuple[str, str], list[str]] = {}
    for record in records:
        if record.get("detail") and record.get("verdict") and "image" in record:
            verdicts.setdefault((record["model"], record["image"]), []).append(str(record["verdict"]))
    blocks: dict[str | None, GridBlock] = {}
    for label, images in models:
        by_prompt: dict[str | None, list] = {}
        for image in images:
            by_prompt.setdefault(image.prompt, []).append(image)
        for prompt, chosen in by_prompt.items():
            if prompt not in blocks:
                if len(blocks) == max_prompts:
                    continue
                blocks[prompt] = GridBlock(prompt or "", [], [
                    f"seed {image.seed}" if image.seed is not None else image.file for image in chosen[:max_images]])
            chosen = chosen[:max_images]
            blocks[prompt].rows.append(GridRow(
                label, [image.path for image in chosen],
                ["; ".join(verdicts.get((label, image.file), [])) for image in chosen]))
    return draw_grid(list(blocks.values()), path)


# erase's losses --------------------------------------------------------------------------------

def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")


def _save_figure(figure, path: str | os.PathLike) -> tuple[int, int]:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    width, height = figure.get_size_inches() * figure.dpi
    return round(width), round(height)


def read_losses(path: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """losses.jsonl as stage -> loss name -> [(step, value)], in the order the stages ran."""
    stages: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not Path(path).is_file():
        return stages  # nothing trained step by step (UCE's closed-form edit)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        stage, step = entry.get("stage"), entry.get("step")
        for name, value in entry.items():
            if name not in ("stage", "step") and isinstance(value, (int, float)):
                stages.setdefault(stage, {}).setdefault(name, []).append((step, float(value)))
    return stages


def plot_losses(losses_jsonl: str | os.PathLike, path: str | os.PathLike) -> tuple[int, int] | None:
    """losses.png: one panel per stage, every loss it logged over its steps. None if nothing was logged."""
    stages = read_losses(losses_jsonl)
    if not stages:
        return None
    columns = min(3, len(stages))
    rows = math.ceil(len(stages) / columns)
    figure = _figure(4 * columns, 3 * rows)
    for i, (stage, losses) in enumerate(stages.items()):
        axes = figure.add_subplot(rows, columns, i + 1)
        for name, points in losses.items():
            steps, values = zip(*sorted(points))
            axes.plot(steps, values, label=name, linewidth=1)
        axes.set_title(stage)
        axes.set_xlabel("step")
        if len(losses) > 1:
            axes.legend(fontsize="small")
    return _save_figure(figure, path)


# the CARE set's map ------------------------------------------------------------------------------

def plot_careset(report: dict, path: str | os.PathLike) -> tuple[int, int]:
    """careset.png: the candidate words on their t-SNE map (careset.report.json's `tsne`), coloured by
    cluster; kept words filled, words of a removed cluster crossed, words refined away hollow."""
    figure = _figure(9, 7)
    axes = figure.add_subplot()
    for cluster in report["clusters"]:
        colour = f"C{cluster['cluster'] % 10}"
        label = f"cluster {cluster['cluster']}: {cluster['status']}"
        members = [t for t in report["tokens"] if t["cluster"] == cluster["cluster"]]
        for status, style in (("kept", dict(marker="o", color=colour)),
                              ("cluster removed", dict(marker="x", color=colour)),
                              ("refined away", dict(marker="o", facecolors="none", edgecolors=colour))):
            points = [t["tsne"] for t in members if t["status"] == status]
            if points:
                xs, ys = zip(*points)
                axes.scatter(xs, ys, s=40, label=label, **style)
                label = None  # one legend entry per cluster
    for token in report["tokens"]:
        axes.annotate(token["word"], token["tsne"], fontsize=7, xytext=(3, 3), textcoords="offset points",
                      color="black" if token["status"] == "kept" else "grey")
    axes.set_title(f"CARE set of '{report['concept']}': filled = kept, x = cluster removed, hollow = refined away",
                   fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize="small", loc="best")
    return _save_figure(figure, path)
