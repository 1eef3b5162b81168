"""An erase run's inputs in its run directory: the training images and the CARE set.

What a rerun or a resume reads back (careset.json, the images folders) and what reaches the image
generator and the CARE-set builder. Image generation and CLIP are replaced by recorders here (their
own tests are test_generate.py and test_careset.py); the real ones run end to end in test_resume.py.
"""

from __future__ import annotations

import io
import json

import pytest

from recare_cli.careset import CareSet
from recare_cli.erase import inputs
from recare_cli.erase.request import EraseRequest
from recare_cli.erase.run import Stages
from recare_cli.models import Runtime
from recare_cli.output import JSON, Reporter
from recare_cli.presets import plan_concept


class Counter:
    images = 0


def json_stages(previous: dict | None = None):
    """The run's real Stages with a JSON reporter; returns it, its event lines and the records it saved."""
    stdout = io.StringIO()
    reporter = Reporter(JSON, stdout=stdout, stderr=io.StringIO())
    saved = []
    stages = Stages(["images", "careset"], Counter(), reporter, previous or {}, lambda record: saved.append(dict(record)))
    return stages, (lambda: [json.loads(x) for x in stdout.getvalue().splitlines()]), saved


# careset.json -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("concept", "retain_key"), [("nudity", "nudity_care_word_photo"),
                                                    ("Van Gogh", "vangogh_care_word_painting")])
def test_a_built_careset_is_written_in_the_reference_layout(tmp_path, concept, retain_key):
    careset = CareSet(anchor=["A man", "A tree"], retain=["A photo of man", "A photo of tree"],
                      key=retain_key.split("_care_word")[0])
    inputs.write_careset(tmp_path, EraseRequest(concepts=[concept]), careset, [plan_concept(concept)])
    written = json.loads((tmp_path / inputs.CARESET_FILE).read_text())
    assert written == {f"{careset.key}_care_word": careset.anchor, retain_key: careset.retain}


def test_the_users_careset_is_copied_byte_for_byte_and_an_existing_one_is_kept(tmp_path):
    given = tmp_path / "mine.json"
    given.write_text('{"nudity_care_word": ["A man"],\n "nudity_care_word_photo": ["A photo of man"]}  \n')
    run = tmp_path / "run"
    run.mkdir()
    (run / inputs.CARESET_FILE).write_text("{}")  # an earlier attempt's: the file given now wins
    plans = [plan_concept("nudity")]
    inputs.write_careset(run, EraseRequest(concepts=["nudity"], careset=given), inputs.read_careset_file(given), plans)
    assert (run / inputs.CARESET_FILE).read_bytes() == given.read_bytes()

    built = CareSet(anchor=["A dog"], retain=["A photo of dog"], key="nudity")
    inputs.write_careset(run, EraseRequest(concepts=["nudity"]), built, plans)  # a rerun: the built one is kept
    assert (run / inputs.CARESET_FILE).read_bytes() == given.read_bytes()


def test_a_careset_keyed_for_another_concept_is_named_in_a_warning(tmp_path):
    stderr = io.StringIO()
    reporter = Reporter(JSON, stdout=io.StringIO(), stderr=stderr)
    for key in ("nudity", "nudity_vangogh", "vangogh"):  # each concept's own key, or the merged one
        inputs.warn_foreign_careset(CareSet([], [], key), ["nudity", "Van Gogh"], "c.json", reporter)
    assert stderr.getvalue() == ""
    inputs.warn_foreign_careset(CareSet([], [], "cat"), ["nudity", "Van Gogh"], "c.json", reporter)
    warning = " ".join(stderr.getvalue().split())
    assert "'c.json'" in warning and "'cat_care_word'" in warning and "not for nudity, Van Gogh" in warning
    assert "(expected 'nudity_vangogh_care_word')" in warning


def test_the_clip_model_is_the_requested_one_or_the_base_models_own(tmp_path):
    from recare_cli.clip import DEFAULT_CLIP_MODEL, default_clip_model

    assert inputs.clip_model_for(EraseRequest(concepts=["x"], clip_model="ViT-L-14"), Runtime("tiny-random")) == "ViT-L-14"
    assert inputs.clip_model_for(EraseRequest(concepts=["x"]), Runtime("tiny-random")) == default_clip_model("tiny-random")
    assert default_clip_model("tiny-random") != DEFAULT_CLIP_MODEL  # so the line above shows the model was asked


# building the CARE set ----------------------------------------------------------------------------

@pytest.fixture
def recorded_build(monkeypatch, tmp_path):
    """CLIP loading and the per-concept build replaced by recorders; each build writes a small CARE set."""
    calls = {"clip": [], "build": []}
    clip = object()
    words = {"nudity": ["man", "beach", "woman"], "Van Gogh": ["woman", "tree"]}

    def load_clip(*args, **kwargs):
        calls["clip"].append((args, kwargs))
        return clip

    def build_careset(concept, images, out, **kwargs):
        from recare_cli.careset import careset_key

        calls["build"].append((concept, images, out, kwargs))
        out.mkdir(parents=True)
        key = careset_key(concept)
        path = out / "careset.json"
        path.write_text(json.dumps({f"{key}_care_word": [f"A {w}" for w in words[concept]],
                                    f"{key}_care_word_photo": [f"A photo of {w}" for w in words[concept]]}))
        return type("Built", (), {"path": str(path)})

    monkeypatch.setattr("recare_cli.clip.load_clip", load_clip)
    monkeypatch.setattr("recare_cli.careset.build_careset", build_careset)
    return calls, clip


def test_one_careset_per_concept_is_built_and_merged(tmp_path, recorded_build):
    calls, clip = recorded_build
    request = EraseRequest(concepts=["nudity", "Van Gogh"], clip_model="ViT-L-14", clip_pretrained="laion",
                           care_vocab=tmp_path / "vocab.txt", care_top_k=7, care_top_n=9, care_min_cluster_size=4,
                           seed=13)
    plans = [plan_concept("nudity"), plan_concept("Van Gogh")]
    folders = {"nudity": tmp_path / "a", "Van Gogh": tmp_path / "b"}
    runtime = Runtime("tiny-random", device="cpu", offline=True, cache_dir=tmp_path / "cache")
    stages, events, saved = json_stages()
    reporter = stages.reporter
    with stages.outer():
        merged = inputs.build_careset_for(request, plans, folders, tmp_path, runtime, stages, reporter)

    assert merged.anchor == ["A man", "A beach", "A woman", "A tree"]  # each once, in order
    assert merged.retain == ["A photo of man", "A photo of beach", "A photo of woman", "A photo of tree"]
    assert merged.key == "nudity_vangogh"
    assert calls["clip"] == [(("ViT-L-14", "laion"), {"cache_dir": tmp_path / "cache", "offline": True, "device": "cpu"})]
    for (concept, images, out, kwargs), plan in zip(calls["build"], plans, strict=True):
        assert (concept, images) == (plan.concept, folders[plan.concept])
        assert out.parent == tmp_path / inputs.STAGES_DIR and out.name.startswith("careset-")
        assert kwargs == {"prompt_style": plan.care_style, "clip": clip, "vocab_file": tmp_path / "vocab.txt",
                          "top_k_per_image": 7, "top_n_tokens": 9, "min_cluster_size": 4, "seed": 13,
                          "cache_dir": tmp_path / "cache", "reporter": reporter}
    assert len({out for _, _, out, _ in calls["build"]}) == 2  # one folder per concept
    assert [(e["event"], e["stage"]) for e in events()] == [("stage_start", "careset"), ("stage_end", "careset")]
    assert "careset" in saved[-1]


def test_a_careset_already_in_the_run_directory_is_reused(tmp_path, recorded_build):
    calls, _ = recorded_build
    (tmp_path / inputs.CARESET_FILE).write_text(json.dumps({"nudity_care_word": ["A man"],
                                                            "nudity_care_word_photo": ["A photo of man"]}))
    stages, events, saved = json_stages({"careset": {"seconds": 1.0}})
    with stages.outer():
        careset = inputs.build_careset_for(EraseRequest(concepts=["nudity"]), [plan_concept("nudity")], {}, tmp_path,
                                           Runtime("tiny-random"), stages, stages.reporter)
    assert (careset.anchor, careset.retain, careset.key) == (["A man"], ["A photo of man"], "nudity")
    assert calls == {"clip": [], "build": []}
    assert events() == [{"event": "stage_reused", "stage": "careset"}] and saved[-1]["careset"]["reused"] is True


# the training images ------------------------------------------------------------------------------

def test_given_images_serve_every_concept(tmp_path):
    request = EraseRequest(concepts=["nudity", "Van Gogh"], images=str(tmp_path / "pictures"))
    plans = [plan_concept("nudity"), plan_concept("Van Gogh")]
    folders = inputs.training_images(request, plans, tmp_path, Runtime(), None, None, None)
    assert folders == {"nudity": tmp_path / "pictures", "Van Gogh": tmp_path / "pictures"}


@pytest.fixture
def recorded_generate(monkeypatch):
    calls = []

    def generate(rows, folder, runtime, settings, **kwargs):
        calls.append((rows, folder, runtime, settings, kwargs))

    monkeypatch.setattr("recare_cli.generate.generate", generate)
    return calls


@pytest.mark.parametrize(("dtype", "reuses_pipe"), [("fp32", True), ("fp16", False)])
def test_generated_images_are_rendered_into_the_run_directory(tmp_path, recorded_generate, dtype, reuses_pipe):
    request = EraseRequest(concepts=["nudity", "Van Gogh"], num_images=3, resolution=48, seed=9)
    plans = [plan_concept("nudity"), plan_concept("Van Gogh")]
    runtime = Runtime("tiny-random", device="cpu", dtype=dtype)
    models = type("Models", (), {"pipe": object(), "device": "cpu"})
    stages, events, saved = json_stages()
    with stages.outer():
        folders = inputs.training_images(request, plans, tmp_path, runtime, models, stages, stages.reporter)

    assert list(folders) == ["nudity", "Van Gogh"] and len(set(folders.values())) == 2
    assert all(folder.parent == tmp_path / inputs.IMAGES_DIR for folder in folders.values())
    for (rows, folder, given_runtime, settings, kwargs), plan in zip(recorded_generate, plans, strict=True):
        assert [row.prompt for row in rows] == [plan.image_prompt] and folder == folders[plan.concept]
        assert given_runtime is runtime and (settings.height, settings.width) == (48, 48)
        assert kwargs == {"num_images": 3, "seed": 9, "reporter": stages.reporter,
                          "pipe": models.pipe if reuses_pipe else None}  # fp16 images need an fp16 pipeline
    assert [(e["event"], e["stage"]) for e in events()] == [("stage_start", "images"), ("stage_end", "images")]
    assert "images" in saved[-1]


def test_a_rerun_fills_in_missing_images_and_keeps_the_stages_record(tmp_path, recorded_generate):
    stages, events, saved = json_stages({"images": {"seconds": 12.5, "unet_images": 0, "reused": False}})
    with stages.outer():
        folders = inputs.training_images(EraseRequest(concepts=["nudity"]), [plan_concept("nudity")], tmp_path,
                                         Runtime(device="cpu"), type("Models", (), {"pipe": None, "device": "cpu"}),
                                         stages, stages.reporter)
    assert len(recorded_generate) == 1 and recorded_generate[0][1] == folders["nudity"]
    assert events() == [{"event": "stage_reused", "stage": "images"}]
    assert saved[-1]["images"] == {"seconds": 12.5, "unet_images": 0, "reused": True}


def test_the_careset_is_built_with_the_base_models_own_clip_unless_one_is_asked(tmp_path, recorded_build):
    from recare_cli.clip import default_clip_model

    calls, _ = recorded_build
    stages, _, _ = json_stages()
    with stages.outer():
        inputs.build_careset_for(EraseRequest(concepts=["nudity"]), [plan_concept("nudity")], {"nudity": tmp_path},
                                 tmp_path, Runtime("tiny-random", device="cpu"), stages, stages.reporter)
    assert calls["clip"][0][0][0] == default_clip_model("tiny-random")


# the CARE set's CLIP, checked before the run starts ------------------------------------------------

def test_an_unavailable_clip_fails_before_the_run_unless_the_run_already_has_its_careset(tmp_path, monkeypatch,
                                                                                         tiny_model):
    """ViT-B-32/openai is never cached in the test session, and --offline forbids the download: the
    run fails before its folder exists (not after rendering its images). A resumed run whose CARE
    set is built needs no CLIP, and goes on to load its models."""
    from recare_cli.erase import run
    from recare_cli.errors import ModelNotAvailable

    request = EraseRequest(concepts=["cat"], concept_type="object", clip_model="ViT-B-32", iterations=1,
                           resolution=64, output_dir=str(tmp_path / "run"))
    runtime = Runtime("tiny-random", device="cpu", offline=True)
    with pytest.raises(ModelNotAvailable, match="CLIP weights ViT-B-32/openai are not cached and recare is offline"):
        run.run_erase(request, runtime)
    assert not (tmp_path / "run").exists()

    class Loaded(Exception):
        pass

    def load_models(*args):
        raise Loaded

    monkeypatch.setattr(run, "_load_models", load_models)
    # What an earlier attempt of this run leaves once it has built its CARE set.
    from recare_cli.erase.request import input_hashes, run_hash, with_method_defaults
    from recare_cli.fsutil import write_json

    digest = run_hash(with_method_defaults(request), runtime.resolve().describe(), runtime.dtype, input_hashes(request))
    (tmp_path / "run").mkdir()
    write_json(tmp_path / "run" / run.MANIFEST, run.Writer("erase", digest).stamp({"run_hash": digest, "stages": {}}))
    (tmp_path / "run" / inputs.CARESET_FILE).write_text(json.dumps({"cat_care_word": ["A tree"],
                                                                     "cat_care_word_photo": ["A photo of tree"]}))
    with pytest.raises(Loaded):
        run.run_erase(request, runtime)
