"""What `recare erase` is asked, and a recipe of such requests: the core, without loading a model.

Which settings name the run directory (a changed setting must never resume an old run, a
cosmetic one must not start a new one), what each method refuses, how a recipe file becomes
requests, and the one-line error every mistake in it gets.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest

from recare_cli.erase.request import (
    EraseRequest, check_request, erase_from_prompts, input_hashes, parameters, run_hash, uses_careset,
    with_method_defaults,
)
from recare_cli.errors import UsageError

MODEL = {"model": "tiny-random", "revision": None}


def digest(request: EraseRequest, model: dict = MODEL, dtype: str = "auto", hashes: dict | None = None) -> str:
    return run_hash(request, model, dtype, hashes or {})


# the run hash ---------------------------------------------------------------------------------

# A value other than the default for every field of EraseRequest.
OTHER = {
    "concepts": ["Van Gogh"], "erase_from": ["painting"], "method": None, "concept_type": "style",
    "train_method": "xattn", "iterations": 7, "negative_guidance": 3.0, "stage1_lr": 1e-3, "stage2_lr": 1e-3,
    "ti_lr": 1e-2, "ti_steps": 5, "rounds": 3, "num_adv_concepts": 3, "compositional_guidance_scale": 3.0,
    "initializer_token": "man", "images": Path("elsewhere"), "careset": Path("c.json"), "care_vocab": Path("w.txt"),
    "care_top_k": 5, "care_top_n": 6, "care_min_cluster_size": 3, "num_images": 9, "resolution": 64, "seed": 1,
    "prefix_steps": 1, "center_crop": True, "apg_eta": 0.5, "apg_norm_threshold": 1.0, "apg_momentum": 0.5,
    "clip_model": "ViT-B-16", "clip_pretrained": "laion2b", "checkpoint_every": 1, "save_pt": True,
    "report_to": "tensorboard", "gradient_checkpointing": True, "output_dir": Path("out"), "preserve": ["cat", "dog"],
    "guide": "art", "uce_erase_scale": 2.0, "uce_preserve_scale": 2.0, "uce_lamb": 0.1, "uce_expand": True,
    "command": "recare erase --concept nudity",
}
# What each method's weights are computed from (recare-method.md, esd_diffusers.py, uce_sd_erase.py).
ESD_READS = {"concepts", "erase_from", "train_method", "iterations", "negative_guidance", "stage1_lr", "resolution",
             "seed", "prefix_steps", "apg_eta", "apg_norm_threshold", "apg_momentum"}
RECARE_READS = ESD_READS | {"concept_type", "stage2_lr", "ti_lr", "ti_steps", "rounds", "num_adv_concepts",
                            "compositional_guidance_scale", "initializer_token", "care_top_k", "care_top_n",
                            "care_min_cluster_size", "num_images", "center_crop", "clip_model", "clip_pretrained"}
# The concept's type picks UCE's default guide and its --uce-expand templates.
UCE_READS = {"concepts", "concept_type", "preserve", "guide", "uce_erase_scale", "uce_preserve_scale", "uce_lamb",
             "uce_expand"}
# With --preserve careset, UCE also reads the CARE set, built from generated images.
UCE_CARESET_READS = UCE_READS | {"seed", "resolution", "num_images", "care_top_k", "care_top_n",
                                 "care_min_cluster_size", "clip_model", "clip_pretrained"}


def test_every_field_is_sorted_into_read_or_not_read():
    assert set(OTHER) == {f.name for f in fields(EraseRequest)}


@pytest.mark.parametrize("method, preserve, reads", [
    ("recare", [], RECARE_READS),
    ("esd", [], ESD_READS),
    ("uce", [], UCE_READS),
    ("uce", ["careset"], UCE_CARESET_READS),
])
def test_the_run_hash_covers_what_the_method_reads_and_nothing_else(method, preserve, reads):
    base = EraseRequest(concepts=["nudity"], method=method, preserve=preserve)
    for name, value in OTHER.items():
        if name == "method":
            continue
        if name == "preserve" and preserve:
            value = [*preserve, *value]  # still with the CARE set
        changed = digest(replace(base, **{name: value})) != digest(base)
        assert changed == (name in reads), f"{method}: changing {name} {'does not change' if not changed else 'changes'}"


def test_the_run_hash_covers_the_method_model_revision_dtype_and_inputs():
    request = EraseRequest(concepts=["nudity"])
    first = digest(request)
    assert digest(request) == first and len(first) == 8 and int(first, 16) >= 0  # names runs/<concept>-<method>-<hash>
    assert len({first, digest(replace(request, method="esd")), digest(replace(request, method="uce"))}) == 3
    assert digest(request, {"model": "other", "revision": None}) != first
    assert digest(request, {"model": "tiny-random", "revision": "abc"}) != first
    assert digest(request, dtype="fp16") != first
    assert digest(request, hashes={"images": "00"}) != first != digest(request, hashes={"images": "01"})


def test_parameters_are_every_field_but_the_command_line():
    request = EraseRequest(concepts=["nudity"], command="recare erase --concept nudity")
    recorded = parameters(request)  # the manifest's "parameters"
    assert list(recorded) == [f.name for f in fields(EraseRequest) if f.name != "command"]
    assert recorded["concepts"] == ["nudity"] and recorded["iterations"] == request.iterations


# inputs: hashed by content ---------------------------------------------------------------------

def _images(folder: Path, contents: dict[str, bytes]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for name, colour in contents.items():
        Image.new("RGB", (4, 4), tuple(colour)).save(folder / name)
    return folder


def test_images_enter_by_content_and_name_not_by_folder(tmp_path):
    one = _images(tmp_path / "one", {"a.png": b"\x01\x02\x03", "b.png": b"\x04\x05\x06"})
    moved = _images(tmp_path / "moved", {"a.png": b"\x01\x02\x03", "b.png": b"\x04\x05\x06"})
    other_pixels = _images(tmp_path / "pixels", {"a.png": b"\x01\x02\x03", "b.png": b"\x04\x05\x07"})
    renamed = _images(tmp_path / "renamed", {"a.png": b"\x01\x02\x03", "c.png": b"\x04\x05\x06"})
    request = EraseRequest(concepts=["nudity"])
    hashes = input_hashes(replace(request, images=one))
    assert list(hashes) == ["images"] and len(hashes["images"]) == 64
    assert input_hashes(replace(request, images=moved)) == hashes
    assert input_hashes(replace(request, images=other_pixels)) != hashes
    assert input_hashes(replace(request, images=renamed)) != hashes
    assert input_hashes(request) == {}  # images generated in the run: the settings say which


def test_careset_and_vocabulary_files_enter_by_content(tmp_path):
    careset, vocab = tmp_path / "careset.json", tmp_path / "words.txt"
    careset.write_text('{"x_care_word": ["a"]}')
    vocab.write_text("cat\ndog\n")
    request = EraseRequest(concepts=["nudity"], careset=careset, care_vocab=vocab)
    hashes = input_hashes(request)
    assert set(hashes) == {"careset", "care_vocab"} and hashes["careset"] != hashes["care_vocab"]
    copy = tmp_path / "copy.json"
    copy.write_bytes(careset.read_bytes())
    assert input_hashes(replace(request, careset=copy)) == hashes
    vocab.write_text("cat\nfox\n")
    assert input_hashes(request)["care_vocab"] != hashes["care_vocab"]
    assert input_hashes(request)["careset"] == hashes["careset"]
    big = tmp_path / "big.txt"  # longer than one read block
    big.write_bytes(b"w\n" * (3 << 19))
    bigger = tmp_path / "bigger.txt"
    bigger.write_bytes(b"w\n" * (3 << 19) + b"x")
    assert input_hashes(replace(request, care_vocab=big)) != input_hashes(replace(request, care_vocab=bigger))


def test_a_vocabulary_that_is_not_a_file_is_one_error(tmp_path):
    for vocab in (tmp_path / "missing.txt", tmp_path):
        with pytest.raises(UsageError) as caught:
            input_hashes(EraseRequest(concepts=["nudity"], care_vocab=vocab))
        assert caught.value.message == f"--care-vocab '{vocab}' is not a file"
        assert caught.value.hint == "a word list, one word a line"


def test_methods_without_a_careset_hash_no_inputs_but_still_check_images(tmp_path):
    images = _images(tmp_path / "images", {"a.png": b"\x01\x02\x03"})
    careset = tmp_path / "careset.json"
    careset.write_text("{}")
    for method in ("esd", "uce"):
        request = EraseRequest(concepts=["nudity"], method=method, images=images, careset=careset, care_vocab=careset)
        assert input_hashes(request) == {}
        empty = tmp_path / f"empty-{method}"
        empty.mkdir()
        with pytest.raises(UsageError, match="holds no images"):
            input_hashes(replace(request, images=empty))
    request = EraseRequest(concepts=["nudity"], method="uce", preserve=["careset"], images=images, careset=careset)
    assert set(input_hashes(request)) == {"images", "careset"}


def test_which_runs_read_a_careset():
    assert uses_careset(EraseRequest(concepts=["a"]))
    assert not uses_careset(EraseRequest(concepts=["a"], method="esd"))
    assert not uses_careset(EraseRequest(concepts=["a"], method="uce", preserve=["cat"]))
    assert uses_careset(EraseRequest(concepts=["a"], method="uce", preserve=["cat", "careset"]))


# method defaults and checks -----------------------------------------------------------------------

def test_unset_method_settings_take_the_methods_defaults_and_set_ones_stay():
    def defaults(method, **given):
        request = with_method_defaults(EraseRequest(concepts=["a"], method=method, **given))
        return request.negative_guidance, request.stage1_lr

    assert defaults("recare") == (2.0, 0.5e-5) and defaults("esd") == (1.0, 2e-5)
    assert defaults("esd", negative_guidance=0.5) == (0.5, 2e-5)
    assert defaults("recare", stage1_lr=1e-3) == (2.0, 1e-3)
    assert defaults("a-plugin-method") == defaults("recare")  # a third-party method gets the spec's


def _refused(request: EraseRequest) -> UsageError:
    with pytest.raises(UsageError) as caught:
        check_request(request)
    return caught.value


# Checks of this module say exactly what and how to fix it; the rest come from the modules they call.
@pytest.mark.parametrize("change, message, hint", [
    ({"method": "magic"}, "unknown --method 'magic'", "choose one of recare, esd, uce"),
    ({"concepts": []}, "no concept given", "pass --concept NAME (repeatable)"),
    ({"concepts": ["nudity", "Van Gogh", " Nudity"]}, "concept ' Nudity' is given twice", "name each concept once"),
    ({"erase_from": ["a", "b"]}, "--erase-from given 2 times for 1 concepts",
     "give it once (for every --concept) or once per --concept, in the same order"),
    ({"erase_from": [" "]}, "--erase-from is empty", "name the prompt to erase the concept from, e.g. painting"),
    ({"rounds": 0}, "--rounds must be at least 1 with --method recare (got 0)",
     "each round erases and then learns one adversarial token; use --method esd for none"),
    ({"method": "esd", "preserve": ["cat"]}, "--preserve and --guide are options of --method uce, not esd",
     "leave them out, or pass --method uce"),
    ({"method": "recare", "guide": ""}, "--preserve and --guide are options of --method uce, not recare",
     "leave them out, or pass --method uce"),
    ({"concepts": ["nudity", "Van Gogh"]}, "concepts erased together must share one type: nudity (object), "
     "Van Gogh (style)", "pass --type, or run them separately"),
])
def test_each_bad_request_is_one_error_with_its_hint(change, message, hint):
    error = _refused(replace(EraseRequest(concepts=["nudity"]), **change))
    assert (error.message, error.hint) == (message, hint)


@pytest.mark.parametrize("change, message", [
    ({"train_method": "all"}, "unknown --train-method 'all'"),
    ({"report_to": "wandb"}, "--report-to 'wandb' is not supported"),
    ({"iterations": 0}, "--iterations"),
    ({"method": "uce", "erase_from": ["painting"]}, "--erase-from is not an option of --method uce"),
    ({"concepts": ["a weird thing"]}, "'a weird thing' is not a known concept"),
])
def test_the_checks_of_other_modules_run_too(change, message):
    assert message in _refused(replace(EraseRequest(concepts=["nudity"]), **change)).message


def test_good_requests_pass_and_plan_each_concept():
    plans = check_request(EraseRequest(concepts=["tench", "church"], concept_type="object", initializer_token="fish",
                                       erase_from=["a photo"], rounds=1))
    assert [(p.concept, p.concept_type, p.initializer_token) for p in plans] == [
        ("tench", "object", "fish"), ("church", "object", "fish")]
    two = EraseRequest(concepts=["tench", "church"], concept_type="object")
    for erase_from in ([], ["painting"], ["painting", "photo"]):
        check_request(replace(two, erase_from=erase_from))
    check_request(EraseRequest(concepts=["nudity"], method="esd", rounds=0))  # ESD has no rounds
    check_request(EraseRequest(concepts=["nudity"], method="uce", preserve=["careset"], guide=""))


def test_each_concept_is_erased_from_its_own_prompt():
    two = EraseRequest(concepts=["tench", "church"], concept_type="object")
    assert erase_from_prompts(two) == ["tench", "church"]
    assert erase_from_prompts(replace(two, erase_from=["a photo"])) == ["a photo", "a photo"]
    assert erase_from_prompts(replace(two, erase_from=["fish", "building"])) == ["fish", "building"]


def test_a_library_request_has_the_cli_defaults():
    # bench scripts and plugins build EraseRequest directly: left at its defaults, it is the run `recare erase` makes
    import typer.main

    from recare_cli.cli import app

    erase = typer.main.get_command(app).commands["erase"]
    cli_defaults = {param.name: param.default for param in erase.params}
    for spec in fields(EraseRequest):
        if spec.name in ("concepts", "command"):
            continue
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        cli_default = cli_defaults[spec.name]
        assert (cli_default if cli_default is not None or default != [] else []) == default, spec.name
