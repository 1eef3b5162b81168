"""The pictures: eval's grid.png, erase's losses.png, careset's careset.png — valid PNGs of the
expected size, showing what they claim, written atomically."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare_cli import pictures
from recare_cli.evaluate import EvalImage, Row
from recare_cli.pictures import GRID_MAX_CELL, GRID_MIN_CELL, cell_size, eval_grid, plot_careset, plot_losses
from recare_cli.plugins import Metric, registry


def solid(path: Path, colour, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def checkerboard(path: Path, size: int) -> Path:
    """1-px red/blue checks: any smoothing while scaling blends them into other colours."""
    yy, xx = np.mgrid[:size, :size]
    pixels = np.where(((xx + yy) % 2 == 0)[..., None], [255, 0, 0], [0, 0, 255]).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def opened_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def count(pixels: np.ndarray, colour) -> int:
    return int(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).sum())


def bbox(pixels: np.ndarray, colour) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1))
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_cell_size_scales_small_images_up_by_a_whole_factor_and_large_ones_down():
    for side in (8, 32, 64, 100):
        width, height = cell_size(side, side)
        assert width == height and width % side == 0 and width >= GRID_MIN_CELL
    assert cell_size(512, 512) == (GRID_MAX_CELL, GRID_MAX_CELL)
    assert cell_size(1024, 512) == (GRID_MAX_CELL, GRID_MAX_CELL // 2)


# grid.png ---------------------------------------------------------------------------------------

def test_grid_has_a_row_per_model_and_the_verdict_under_each_image(tmp_path):
    colours = {("base", "a star"): [(10, 200, 10), (10, 10, 200)], ("erased", "a star"): [(200, 10, 10), (200, 200, 10)],
               ("base", "night"): [(10, 200, 200), (200, 10, 200)], ("erased", "night"): [(120, 60, 0), (0, 60, 120)]}
    models = []
    for label in ("erased", "base"):
        images = []
        for prompt in ("a star", "night"):
            for i, colour in enumerate(colours[(label, prompt)]):
                path = solid(tmp_path / label / f"{prompt.replace(' ', '_')}_{i}.png", colour, 32)
                images.append(EvalImage(path, prompt, 42 + i))
        models.append((label, images))
    # Only the erased model's first "a star" image has a verdict; the other images have none.
    records = [{"metric": "m", "model": "erased", "image": "a_star_0.png", "verdict": "star: no", "detail": True},
               {"metric": "m", "model": "base", "image": "a_star_0.png", "verdict": "", "detail": True},
               {"metric": "m", "model": "erased", "prompt": "a star", "verdict": "summary rows are not shown",
                "detail": False}]

    size = eval_grid(models, records, tmp_path / "grid.png")
    pixels = opened_png(tmp_path / "grid.png")
    assert (pixels.shape[1], pixels.shape[0]) == size
    side = cell_size(32, 32)[0]
    for colour_list in colours.values():
        for colour in colour_list:  # every image once, scaled to one cell
            assert count(pixels, colour) == side * side
    top_erased, bottom_erased, left, right = bbox(pixels, colours[("erased", "a star")][0])
    top_base, *_ = bbox(pixels, colours[("base", "a star")][0])
    top_night, *_ = bbox(pixels, colours[("base", "night")][0])
    assert top_erased < top_base < top_night  # rows in the order given, prompts as blocks
    below = pixels[bottom_erased + 1: bottom_erased + 1 + pictures.FONT_SIZE + 4, left:right + 1]
    assert (below.sum(axis=-1) < 300).any()  # the verdict's dark text
    _, bottom_other, left_other, right_other = bbox(pixels, colours[("erased", "a star")][1])
    below_other = pixels[bottom_other + 1: bottom_other + 1 + 2 * (pictures.FONT_SIZE + 4), left_other:right_other + 1]
    assert (below_other == 255).all()  # no verdict, no text
    _, bottom_base, left_base, right_base = bbox(pixels, colours[("base", "a star")][0])
    below_base = pixels[bottom_base + 1: bottom_base + 1 + 2 * (pictures.FONT_SIZE + 4), left_base:right_base + 1]
    assert (below_base == 255).all()  # the same file name under another model has its own (empty) verdict


def test_grid_scales_a_small_image_with_nearest_neighbour_and_a_large_one_down(tmp_path):
    small = checkerboard(tmp_path / "small.png", 32)
    pixels_small = _grid_of(tmp_path, small)
    side = cell_size(32, 32)[0]
    # Nearest-neighbour keeps every pixel pure red or pure blue; smoothing would blend most of them.
    assert count(pixels_small, (255, 0, 0)) + count(pixels_small, (0, 0, 255)) == side * side

    large = solid(tmp_path / "large.png", (30, 140, 90), 512)
    pixels_large = _grid_of(tmp_path, large)
    assert count(pixels_large, (30, 140, 90)) == GRID_MAX_CELL * GRID_MAX_CELL


def _grid_of(tmp_path: Path, image: Path) -> np.ndarray:
    eval_grid([("model", [EvalImage(image, "a prompt", 0)])], [], tmp_path / "grid.png")
    return opened_png(tmp_path / "grid.png")


def test_grid_shows_at_most_the_first_prompts_and_images(tmp_path):
    images = [EvalImage(solid(tmp_path / f"{p}_{i}.png", (p * 20, i * 20, 5), 16), f"prompt {p}", i)
              for p in range(4) for i in range(5)]
    eval_grid([("model", images)], [], tmp_path / "grid.png", max_prompts=2, max_images=3)
    pixels = opened_png(tmp_path / "grid.png")
    shown = {(p, i) for p in range(4) for i in range(5) if count(pixels, (p * 20, i * 20, 5))}
    assert shown == {(p, i) for p in range(2) for i in range(3)}


def test_a_failing_picture_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    image = solid(tmp_path / "images" / "a.png", (1, 2, 3), 8)
    grid = tmp_path / "out" / "grid.png"
    grid.parent.mkdir()
    grid.write_bytes(b"the previous grid")

    def torn_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", torn_save)
    with pytest.raises(OSError):
        eval_grid([("model", [EvalImage(image, "p", 0)])], [], grid)
    assert grid.read_bytes() == b"the previous grid"
    assert [p.name for p in grid.parent.iterdir()] == ["grid.png"]


def test_eval_writes_grid_with_verdicts_unless_told_not_to(tmp_path, run_cli):
    folder = tmp_path / "images"
    for i in range(3):
        solid(folder / f"img_{i}.png", (40 * i, 80, 200), 24)

    def darkness(ctx):
        rows = []
        for image in ctx.images():
            with Image.open(image.path) as img:
                red = img.convert("RGB").getpixel((0, 0))[0]
            rows.append(Row({"image": image.file}, {"red": red, "verdict": "dark" if red < 50 else "light"}, detail=True))
        return rows + [Row({}, {"mean_red": sum(r.values["red"] for r in rows) / len(rows)})]

    registry().metrics["darkness"] = Metric("darkness", darkness, "test metric", requires=())
    try:
        out = tmp_path / "out"
        result = run_cli("eval", "--model", "tiny-random", "-m", "darkness", "--images", folder, "--output-dir", out,
                         "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["files"][-1] == str(out / "grid.png")
        pixels = opened_png(out / "grid.png")
        for i in range(3):
            assert count(pixels, (40 * i, 80, 200)) == cell_size(24, 24)[0] ** 2
        with open(out / "results.csv") as handle:
            per_image = [r for r in csv.DictReader(handle) if r["detail"] == "1"]
        assert [r["verdict"] for r in per_image] == ["dark", "dark", "light"]

        refused = run_cli("eval", "--model", "tiny-random", "-m", "darkness", "--images", folder,
                          "--output-dir", tmp_path / "other", "--no-grid")
        assert refused.exit_code == 0, refused.stderr
        assert not (tmp_path / "other" / "grid.png").exists()
    finally:
        registry().metrics.pop("darkness", None)


# losses.png -------------------------------------------------------------------------------------

def test_losses_png_has_a_panel_per_stage(tmp_path):
    log = tmp_path / "losses.jsonl"
    lines = [json.dumps({"stage": stage, "step": step, "loss": 1.0 / (step + 1), "erase_loss": 0.5})
             for stage in ("erase-0", "inversion-0", "erase-1", "inversion-1", "robust") for step in range(5)]
    log.write_text("\n".join(lines) + "\n{\"stage\": \"robust\", \"st")  # a line torn by a kill
    assert set(pictures.read_losses(log)) == {"erase-0", "inversion-0", "erase-1", "inversion-1", "robust"}
    assert pictures.read_losses(log)["robust"]["loss"] == [(s, 1.0 / (s + 1)) for s in range(5)]

    size = plot_losses(log, tmp_path / "losses.png")
    pixels = opened_png(tmp_path / "losses.png")
    assert (pixels.shape[1], pixels.shape[0]) == size
    # Five panels: three a row, two rows; each panel is wider than tall.
    assert size[0] > size[1] and math.isclose(size[0] / size[1], (3 * 4) / (2 * 3), rel_tol=0.01)
    one = tmp_path / "one.jsonl"
    one.write_text(lines[0] + "\n")
    assert plot_losses(one, tmp_path / "one.png")[0] < size[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_losses(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# careset.png ------------------------------------------------------------------------------------

def test_careset_map_is_drawn_from_the_reports_tsne_coordinates(tmp_path):
    from recare_cli.careset import SelectionParams, select_tokens, selection_report

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tokens = [f"word{i}</w>" for i in range(40)]
    selection = select_tokens(embeddings, rng.normal(size=16), SelectionParams(n_clusters=4))
    report = {"concept": "star", **selection_report(tokens, list(range(40, 0, -1)), selection)}
    points = np.array([row["tsne"] for row in report["tokens"]])
    assert points.shape == (40, 2) and np.isfinite(points).all() and len(np.unique(points, axis=0)) == 40
    # Over 30 tokens, k-means ran on these t-SNE points: each point is nearest to its own cluster's centre.
    labels = np.array([row["cluster"] for row in report["tokens"]])
    centres = np.array([points[labels == k].mean(axis=0) for k in range(4)])
    nearest = np.linalg.norm(points[:, None] - centres[None], axis=-1).argmin(axis=1)
    assert (nearest == labels).all()

    size = plot_careset(report, tmp_path / "careset.png")
    pixels = opened_png(tmp_path / "careset.png")
    assert (pixels.shape[1], pixels.shape[0]) == size and size[0] > size[1]
