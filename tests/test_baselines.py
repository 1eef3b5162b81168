"""The published baselines: ESD (esd_diffusers.py) and UCE (uce_sd_erase.py) on tiny-random."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_spies import RecordingLoop, record_training, unet_eps

TINY = ("--model", "tiny-random", "--device", "cpu")


@pytest.fixture
def models(tiny_pipe):
    from recare_cli.erase.context import EraseModels

    return EraseModels.from_pipeline(copy.deepcopy(tiny_pipe), "cpu")


# ESD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,eta", [("a painting of a dog", 1.5), (None, 1.0)])
def test_esd_trains_the_erase_from_prediction_towards_the_published_target(tiny_pipe, models, monkeypatch, source, eta):
    import recare_cli.erase.esd as esd
    from recare_cli.erase.params import select_trainable

    concept = "a photo of a cat"
    source = source or concept
    draws, draw_args, regressions = record_training(monkeypatch, esd)
    trainable = select_trainable(models.unet, "noxattn")
    loop = RecordingLoop()
    esd.esd_stage(models, trainable, [concept], [source], esd.EsdSettings(iterations=1, lr=2.5e-4, eta=eta,
                                                                         resolution=64, prefix_steps=1), loop)

    (latents_k, t), (eps_theta, target) = draws[0], regressions[0]
    eps = unet_eps(tiny_pipe, latents_k, t, {concept, source, ""})  # the weights as the stage started
    # esd_diffusers.py: target = eps(erase_from) - eta (eps(concept) - eps('')), and eps('') when erase_from = concept
    expected = (eps[source] if source != concept else eps[""]) - eta * (eps[concept] - eps[""])
    assert target.shape == expected.shape and torch.allclose(target, expected, atol=1e-5)  # allclose broadcasts
    assert draw_args == [(64, 1)]  # the partial denoising at the stage's resolution and prefix steps
    assert torch.allclose(eps_theta, eps[source], atol=1e-5)
    # plain Adam (the published optimizer), not ReCARE's AdamW with weight decay
    assert type(loop.optimizer) is torch.optim.Adam and loop.optimizer.defaults["weight_decay"] == 0
    assert loop.optimizer.defaults["lr"] == 2.5e-4  # not torch's default 1e-3


def test_esd_samples_one_concept_per_iteration(models, monkeypatch):
    import recare_cli.erase.esd as esd
    from recare_cli.erase.params import select_trainable

    concepts = ["a cat", "a dog", "a car"]
    sources = ["a cat", "a painting", "a car"]
    embeds_of = {p: models.embed([p]) for p in concepts + sources}
    prefixes, trained = [], []
    latents = torch.zeros(1, 4, 8, 8)
    monkeypatch.setattr(esd, "draw_training_latent", lambda m, embeds, *a: prefixes.append(embeds[1:].clone()) or (latents, 500))
    eps = models.eps
    monkeypatch.setattr(models, "eps", lambda lat, t, embeds, weights=None: (
        trained.append(embeds.clone()) if weights is None else None) or eps(lat, t, embeds, weights=weights))
    np.random.seed(3)
    expected = [int(np.random.choice(3)) for _ in range(24)]
    np.random.seed(3)
    esd.esd_stage(models, select_trainable(models.unet, "xattn"), concepts, sources,
                  esd.EsdSettings(iterations=24, lr=1e-4, resolution=64, prefix_steps=1), RecordingLoop())
    drawn = [next(i for i, c in enumerate(concepts) if torch.equal(p, embeds_of[c])) for p in prefixes]
    assert drawn == expected and set(drawn) == {0, 1, 2}  # one uniformly drawn concept per iteration
    # each iteration trains exactly the drawn concept's erase-from prompt, once
    assert all(torch.equal(e, embeds_of[sources[i]]) for e, i in zip(trained, drawn, strict=True))


def test_method_defaults_are_each_methods_own_and_typed_flags_win():
    from recare_cli.erase.run import EraseRequest, with_method_defaults
    from recare_cli.presets import with_model_defaults

    def effective(method, model="tiny-random", **typed):
        request = with_model_defaults(EraseRequest(concepts=["star"], method=method, **typed), model, set(typed))
        request = with_method_defaults(request)
        return request.negative_guidance, request.stage1_lr

    assert effective("esd") == (1.0, 2e-5)  # esd_diffusers.py
    assert effective("recare") == (2.0, 0.5e-5)  # recare-method.md
    assert effective("esd", "toy") == (1.0, 1e-4) and effective("recare", "toy") == (2.0, 3e-4)
    assert effective("esd", "toy", stage1_lr=7e-5, negative_guidance=0.5) == (0.5, 7e-5)


# UCE ------------------------------------------------------------------------------------------

def test_uce_closed_form_is_the_least_squares_minimiser():
    from recare_cli.erase.uce import UceSettings, uce_weight

    g = torch.Generator().manual_seed(0)
    d_out, d_text = 6, 5
    w_old = torch.randn(d_out, d_text, generator=g, dtype=torch.float64)
    erase_c, guide_c, preserve_c = (torch.randn(n, d_text, generator=g, dtype=torch.float64) for n in (2, 2, 3))
    settings = UceSettings(erase_scale=1.7, preserve_scale=0.6, lamb=0.3)
    got = uce_weight(w_old, erase_c, guide_c, preserve_c, settings)

    # argmin_W lam ||W - W_old||^2 + s_e sum ||W c_i - W_old g_i||^2 + s_p sum ||W c_j - W_old c_j||^2,
    # as one stacked least-squares problem in W^T.
    root = np.sqrt
    design = torch.cat([root(settings.lamb) * torch.eye(d_text, dtype=torch.float64),
                        root(settings.erase_scale) * erase_c, root(settings.preserve_scale) * preserve_c])
    wanted = torch.cat([root(settings.lamb) * w_old.T, root(settings.erase_scale) * guide_c @ w_old.T,
                        root(settings.preserve_scale) * preserve_c @ w_old.T])
    expected = torch.linalg.lstsq(design, wanted).solution.T
    assert torch.allclose(got, expected, atol=1e-10)


def test_uce_text_feature_is_the_prompts_last_token(models):
    from recare_cli.erase.uce import text_features

    features = text_features(models, ["a photo of a cat", ""])
    ids = models.tokenizer("a photo of a cat").input_ids  # start, 5 words, end
    hidden = models.embed(["a photo of a cat", ""])
    assert torch.equal(features[0], hidden[0, len(ids) - 2])  # "cat", before end-of-text
    assert torch.equal(features[1], hidden[1, 0])  # "": the start token, as the reference's index gives


def test_uce_edit_keeps_preserved_concepts_and_maps_erased_ones_to_the_guide(models):
    from recare_cli.erase.uce import UceSettings, cross_attention_projections, text_features, uce_edit

    erase, preserve = ["a cat"], ["a dog", "a car", "a tree"]
    projections = cross_attention_projections(models.unet)
    attn2 = [n for n, _ in models.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and sorted(projections) == sorted(f"{n}.{kv}" for n in attn2 for kv in ("to_k", "to_v"))  # every K and V
    before = {n: m.weight.detach().clone() for n, m in projections.items()}
    c_erase, c_guide, c_keep = text_features(models, erase), text_features(models, [""]), text_features(models, preserve)

    uce_edit(models, erase, "object", preserve, None, UceSettings(preserve_scale=100.0, lamb=0.01))
    for name, module in projections.items():
        w_old, w_new = before[name], module.weight.detach()
        kept = (c_keep @ w_new.T - c_keep @ w_old.T).norm() / (c_keep @ w_old.T).norm()
        assert kept < 0.02, name  # preserve concepts' keys/values stay
        towards = (c_erase @ w_new.T - c_guide @ w_old.T).norm() / (c_erase @ w_old.T - c_guide @ w_old.T).norm()
        assert towards < 0.1, name  # the erased concept now gives (nearly) the guide's keys/values


@pytest.mark.parametrize("concept_type, templates", [
    ("object", ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"]),
    ("style", ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"]),
])
def test_uce_expand_erases_each_concept_and_its_five_published_templates(models, concept_type, templates):
    """--uce-expand (recare-method.md §9's templates): every templated prompt is an erase concept,
    guided like the concept itself, and none becomes a preserve concept (docs/fidelity.md)."""
    from recare_cli.erase.uce import UceSettings, cross_attention_projections, text_features, uce_edit, uce_weight

    concepts = ["a cat", "a dog"]
    erase = [p for c in concepts for p in [c] + [t.format(c) for t in templates]]
    guide = "art" if concept_type == "style" else ""
    c_erase, c_guide, c_keep = text_features(models, erase), text_features(models, [guide]), text_features(models, ["a car"])
    projections = cross_attention_projections(models.unet)
    expected = {n: uce_weight(m.weight.detach().clone(), c_erase, c_guide.expand(len(erase), -1), c_keep, UceSettings())
                for n, m in projections.items()}

    edited = uce_edit(models, concepts, concept_type, ["a car"], None, UceSettings(expand=True))
    for name in projections:
        assert torch.allclose(edited[f"{name}.weight"], expected[name], atol=1e-6), name


def test_uce_registers_as_a_method_plugin():
    from recare_cli.plugins import registry

    method = registry().method("uce")
    assert method.name == "uce" and "uce_sd_erase.py" in method.description


def _uce_args(out: Path, *extra, model: str = "tiny-random") -> list:
    return ["erase", "--concept", "nudity", "--model", model, "--device", "cpu", "--method", "uce",
            "--output-dir", out, *extra]


UCE_MODELS = [("tiny-random", "tiny_pipe"), ("tiny-random-xl", "tiny_xl_pipe")]  # SD 1.x; SDXL's 2-encoder context


@pytest.mark.parametrize("model, pipe_fixture", UCE_MODELS)
def test_uce_run_directory_works_with_generate_and_export(run_cli, request, tmp_path, model, pipe_fixture):
    from safetensors.torch import load_file

    out = tmp_path / "uce"
    result = run_cli(*_uce_args(out, "--preserve", "man", "--json", model=model))
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(result.stdout.splitlines()[-1])["stages"]) == ["uce"]
    manifest = json.loads((out / "recare-run.json").read_text())
    assert manifest["method"] == "uce" and manifest["status"] == "complete"
    assert manifest["parameters"]["preserve"] == ["man"] and manifest["parameters"]["uce_lamb"] == 0.5
    edited = load_file(str(out / "unet.safetensors"))
    original = request.getfixturevalue(pipe_fixture).unet.state_dict()
    changed = {k for k in edited if not torch.equal(edited[k], original[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)

    generated = run_cli("generate", "--prompt", "nudity", "--model", model, "--device", "cpu", "--height", "64",
                        "--width", "64", "--steps", "2", "--unet", out, "--output-dir", tmp_path / "images", "--quiet")
    assert generated.exit_code == 0, generated.stderr
    assert (tmp_path / "images" / "nudity_0.png").is_file()
    exported = run_cli("export", out, "--format", "unet", "--output", tmp_path / "unet.safetensors", "--json")
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout.splitlines()[-1])["max_abs_diff"] == 0.0


def test_uce_flags_reach_the_edit(run_cli, tmp_path, monkeypatch):
    import recare_cli.erase.uce as uce

    seen = {}

    def recording_edit(models, concepts, concept_type, preserve, guide, settings):
        seen.update(concepts=concepts, concept_type=concept_type, preserve=preserve, guide=guide, settings=settings)
        return {}

    monkeypatch.setattr(uce, "uce_edit", recording_edit)
    result = run_cli(*_uce_args(tmp_path / "run", "--uce-erase-scale", "2", "--uce-preserve-scale", "3", "--uce-lamb", "0.7",
                                "--uce-expand", "--preserve", "man", "--preserve", "man", "--guide", "a tree"))
    assert result.exit_code == 0, result.stderr
    assert seen == {"concepts": ["nudity"], "concept_type": "object", "preserve": ["man"], "guide": "a tree",
                    "settings": uce.UceSettings(erase_scale=2.0, preserve_scale=3.0, lamb=0.7, expand=True)}


@pytest.mark.parametrize("model", [m for m, _ in UCE_MODELS])
def test_uce_preserve_careset_uses_the_care_sets_words(run_cli, tmp_path, model):
    from safetensors.torch import load_file

    careset = tmp_path / "careset.json"
    careset.write_text(json.dumps({"nudity_care_word": ["A man", "A woman", "A beach"],
                                   "nudity_care_word_photo": ["A photo of man", "A photo of woman", "A photo of beach"]}))
    by_set, by_hand = tmp_path / "set", tmp_path / "hand"
    assert run_cli(*_uce_args(by_set, "--preserve", "careset", "--careset", careset, model=model)).exit_code == 0
    assert run_cli(*_uce_args(by_hand, "--preserve", "man", "--preserve", "woman", "--preserve", "beach",
                              model=model)).exit_code == 0
    a, b = load_file(str(by_set / "unet.safetensors")), load_file(str(by_hand / "unet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (by_set / "careset.json").is_file()
    # words given beside `careset` are kept too
    with_word, with_word_by_hand = tmp_path / "set+tree", tmp_path / "hand+tree"
    assert run_cli(*_uce_args(with_word, "--preserve", "tree", "--preserve", "careset", "--careset", careset,
                              model=model)).exit_code == 0
    assert run_cli(*_uce_args(with_word_by_hand, "--preserve", "tree", "--preserve", "man", "--preserve", "woman",
                              "--preserve", "beach", model=model)).exit_code == 0
    c, d = load_file(str(with_word / "unet.safetensors")), load_file(str(with_word_by_hand / "unet.safetensors"))
    assert all(torch.equal(c[k], d[k]) for k in c) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("extra,message,hint", [
    (("--uce-lamb", "0"), "--uce-lamb must be greater than 0 and at most 1e+06 (got 0.0)", "leave out --uce-lamb"),
    (("--uce-lamb", "nan"), "--uce-lamb must be a finite number, greater than 0", "leave out --uce-lamb"),
    (("--uce-erase-scale", "-1"), "--uce-erase-scale must be at least 0 and at most 1e+06 (got -1.0)", None),
    (("--uce-erase-scale", "nan"), "--uce-erase-scale must be a finite number, at least 0", None),
    (("--uce-preserve-scale", "-0.5"), "--uce-preserve-scale must be at least 0 and at most 1e+06 (got -0.5)", None),
    (("--uce-preserve-scale", "inf"), "--uce-preserve-scale must be a finite number", None),
    (("--erase-from", "a painting"), "--erase-from is not an option of --method uce",
     "UCE maps each concept to its guide: pass --guide PROMPT instead"),
    (("--preserve", " "), "--preserve is empty", "name a concept to keep, or 'careset' for the CARE set's words"),
    (("--preserve", "tree", "--preserve", "Nudity "), "--preserve 'Nudity ' is also a --concept to erase",
     "UCE cannot keep and erase one concept"),
    (("--guide", "NUDITY"), "--guide 'NUDITY' is the concept itself: the edit would change nothing", None),
])
def test_uce_bad_settings_fail_with_one_line(run_cli, tmp_path, extra, message, hint):
    result = run_cli(*_uce_args(tmp_path / "run", *extra))
    assert result.exit_code == 2 and f"Error: {message}" in result.stderr and "Traceback" not in result.stderr
    if hint is not None:
        assert hint in result.stderr


def test_uce_scales_of_zero_are_allowed_and_bad_numbers_are_refused_in_the_core_too():
    """A scale of 0 switches its term off (the published code allows it); only negative ones are refused."""
    from recare_cli.erase.request import EraseRequest, check_request
    from recare_cli.errors import UsageError

    check_request(EraseRequest(concepts=["x"], concept_type="object", method="uce", uce_erase_scale=0.0,
                               uce_preserve_scale=0.0))
    with pytest.raises(UsageError, match="--uce-erase-scale must be a finite number"):
        check_request(EraseRequest(concepts=["x"], concept_type="object", method="uce", uce_erase_scale=float("nan")))


def test_preserve_is_refused_by_the_trained_methods(run_cli, tmp_path):
    result = run_cli("erase", "--concept", "nudity", *TINY, "--method", "esd", "--preserve", "man",
                     "--output-dir", tmp_path / "run")
    assert result.exit_code == 2 and "--method uce" in result.stderr
