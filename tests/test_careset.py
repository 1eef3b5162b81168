"""CARE set construction (recare-method.md §6): selection math on planted vectors, the file format
and its reader, and `recare careset` end to end on the tiny-random CLIP with a short word list."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recare_cli.careset import (
    SelectionParams,
    careset_json,
    careset_key,
    frequent_tokens,
    prompt_style_for,
    read_careset,
    refine_cluster,
    select_tokens,
)
from recare_cli.errors import RecareError, UsageError

# Single CLIP tokens ("word</w>"), so every one is a candidate with --vocab.
WORDS = """tree beach dog cat car house river mountain flower bird city road chair table window door sky
cloud water fire snow grass horse boat train bridge street garden forest lake ocean sand stone wall
book phone lamp bed shirt hat shoe cup""".split()


# selection on planted vectors -------------------------------------------------------------------

CLUSTER_SIMILARITIES = (0.95, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1)  # to the concept; residual = sqrt(1 - s²)
OUTLIER_CLUSTER = 3


def planted(rng, per_cluster=12, dim=24, noise=0.01):
    """Seven clusters in orthogonal directions at known angles to the concept C = e0, plus one
    token of cluster 3 whose residual points half away from the cluster: (W, C, group, outlier)."""
    concept = np.zeros(dim)
    concept[0] = 1.0
    rows, groups = [], []
    for k, s in enumerate(CLUSTER_SIMILARITIES):
        direction = np.zeros(dim)
        direction[1 + k] = 1.0
        for _ in range(per_cluster):
            v = s * concept + np.sqrt(1 - s * s) * direction + noise * rng.standard_normal(dim)
            rows.append(v / np.linalg.norm(v))
            groups.append(k)
    s = CLUSTER_SIMILARITIES[OUTLIER_CLUSTER]
    off_axis = np.zeros(dim)
    off_axis[1 + OUTLIER_CLUSTER], off_axis[dim - 1] = 0.6, 0.8
    outlier = s * concept + np.sqrt(1 - s * s) * off_axis
    rows.append(outlier / np.linalg.norm(outlier))
    groups.append(OUTLIER_CLUSTER)
    order = rng.permutation(len(rows))  # no help from the input order
    return np.array(rows)[order], concept, [groups[i] for i in order], int(np.nonzero(order == len(rows) - 1)[0][0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_drops_extreme_clusters_and_refines_the_outlier(seed):
    W, C, groups, outlier = planted(np.random.default_rng(seed))
    selection = select_tokens(W, C, SelectionParams(seed=seed))

    # Every planted group is exactly one cluster, numbered by mean residual = by falling similarity.
    assert {g: {selection.labels[i] for i, gi in enumerate(groups) if gi == g} for g in range(7)} == \
        {g: {g} for g in range(7)}
    assert selection.cluster_mean_residual == sorted(selection.cluster_mean_residual)
    assert selection.removed_clusters == {0: "lowest residual", 6: "highest residual"}
    assert selection.refined_away == [outlier]
    expected_kept = [i for i, g in enumerate(groups) if g in (1, 2, 3, 4, 5) and i != outlier]
    assert selection.kept == expected_kept
    similarity = np.array(selection.similarity)
    assert np.allclose(np.array(selection.residual_norm) ** 2 + similarity ** 2, 1.0)


def test_selection_parameters_change_the_result():
    W, C, groups, outlier = planted(np.random.default_rng(0))
    none_dropped = select_tokens(W, C, SelectionParams(k_each_side=0, alpha=10.0))
    assert none_dropped.removed_clusters == {} and none_dropped.refined_away == []
    assert none_dropped.kept == list(range(len(W)))
    two_each_side = select_tokens(W, C, SelectionParams(k_each_side=2))
    assert set(two_each_side.removed_clusters) == {0, 1, 5, 6}
    assert {groups[i] for i in two_each_side.kept} == {2, 3, 4}
    big_clusters_only = select_tokens(W, C, SelectionParams(min_cluster_size=50))
    assert big_clusters_only.refined_away == [] and outlier in big_clusters_only.kept


def test_at_least_one_cluster_survives():
    W, C, _, _ = planted(np.random.default_rng(0))
    assert select_tokens(W, C, SelectionParams(n_clusters=2, k_each_side=1)).removed_clusters == {}
    assert len(select_tokens(W, C, SelectionParams(n_clusters=3, k_each_side=5)).removed_clusters) == 2


def test_refine_cluster_flags_the_token_that_breaks_coherence():
    rng = np.random.default_rng(0)
    residuals = np.tile([0.0, 0.7, 0.0, 0.0], (8, 1)) + 0.005 * rng.standard_normal((8, 4))
    residuals[5] = [0.0, 0.35, 0.6, 0.0]
    keep, d = refine_cluster(residuals, alpha=0.01)
    assert keep.tolist() == [True] * 5 + [False] + [True] * 2
    assert d.argmax() == 5
    assert refine_cluster(residuals, alpha=1.0)[0].all()


@pytest.mark.parametrize("per_cluster", [1, 2])
def test_a_few_tokens_keep_the_same_words_under_float_noise(per_cluster):
    """A t-SNE of 7-15 points moved words between clusters under 1e-6 noise (33-50 of 50 cases),
    which is how the toy's CARE set kept night on one machine and dropped it on another."""
    changed = 0
    for seed in range(6):
        W, C, _, _ = planted(np.random.default_rng(seed), per_cluster=per_cluster, noise=0.05)
        kept = select_tokens(W, C, SelectionParams(seed=0)).kept
        for j in range(3):
            noisy = W + 1e-6 * np.random.default_rng(100 + j).standard_normal(W.shape)
            changed += select_tokens(noisy, C, SelectionParams(seed=0)).kept != kept
    assert changed == 0


def test_many_tokens_still_go_through_tsne():
    W, C, _, _ = planted(np.random.default_rng(0))
    assert len(W) > 30 and select_tokens(W, C, SelectionParams(seed=0)).perplexity == 30


def test_a_pair_is_refined_only_when_pairs_count_as_clusters():
    """In a pair the leave-one-out test compares two different words and drops the one nearer the
    concept (the toy's `night`); --min-cluster-size 3 (the toy's default) leaves pairs whole."""
    concept = np.array([1.0, 0.0, 0.0])
    near = np.array([0.45, np.sqrt(1 - 0.45 ** 2), 0.0])  # like night: nearer the concept
    far = np.array([0.35, np.sqrt(1 - 0.35 ** 2) * 0.99, np.sqrt(1 - 0.35 ** 2) * 0.141])
    W = np.stack([near, far / np.linalg.norm(far)])
    spec = select_tokens(W, concept, SelectionParams(n_clusters=1, k_each_side=0, min_cluster_size=2))
    assert spec.refined_away == [0] and spec.kept == [1]
    pairs_whole = select_tokens(W, concept, SelectionParams(n_clusters=1, k_each_side=0, min_cluster_size=3))
    assert pairs_whole.refined_away == [] and pairs_whole.kept == [0, 1]


def test_erase_builds_the_careset_with_its_min_cluster_size(monkeypatch, tmp_path):
    from recare_cli.erase import inputs
    from recare_cli.erase.request import EraseRequest
    from recare_cli.presets import with_model_defaults

    seen = {}

    class Stop(Exception):
        pass

    def fake_build(concept, images, out, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("recare_cli.careset.build_careset", fake_build)
    monkeypatch.setattr("recare_cli.clip.load_clip", lambda *a, **k: None)

    class Stages:
        def stage(self, *a, **k):
            import contextlib
            return contextlib.nullcontext()

    class Plan:
        concept, care_style = "star", "photo"

    class Runtime:
        model, cache_dir, offline = "toy", None, True

        def torch_device(self):
            return "cpu"

    request = with_model_defaults(EraseRequest(concepts=["star"]), "toy", set())
    with pytest.raises(Stop):
        inputs.build_careset_for(request, [Plan()], {"star": tmp_path}, tmp_path, Runtime(), Stages(), None)
    assert seen["min_cluster_size"] == 3 and seen["top_n_tokens"] == 12
    explicit = with_model_defaults(EraseRequest(concepts=["star"], care_min_cluster_size=2), "toy",
                                   {"care_min_cluster_size"})
    with pytest.raises(Stop):
        inputs.build_careset_for(explicit, [Plan()], {"star": tmp_path}, tmp_path, Runtime(), Stages(), None)
    assert seen["min_cluster_size"] == 2


def test_selection_rejects_too_few_tokens():
    W, C, _, _ = planted(np.random.default_rng(0))
    with pytest.raises(UsageError, match="between 1 and the number of tokens"):
        select_tokens(W[:5], C, SelectionParams(n_clusters=7))
    with pytest.raises(UsageError, match="at least 2"):
        select_tokens(W[:1], C, SelectionParams(n_clusters=1))


def test_frequent_tokens_counts_top_k_hits_with_first_seen_tie_break():
    import torch

    vocab = torch.eye(6)  # token j is axis j
    images = torch.tensor([
        [0.0, 0.1, 0.9, 0.8, 0.0, 0.0],  # top-2: 2, 3
        [0.0, 0.0, 0.1, 0.7, 0.9, 0.0],  # top-2: 4, 3
        [0.9, 0.0, 0.8, 0.0, 0.0, 0.0],  # top-2: 0, 2
        [0.0, 0.0, 0.0, 0.0, 0.9, 0.8],  # top-2: 4, 5
    ])
    tokens, counts = frequent_tokens(images, vocab.half(), top_k=2, top_n=4, chunk=3)
    # 2, 3 and 4 twice each, in order of first appearance; then 0 before 5.
    assert tokens == [2, 3, 4, 0] and counts == [2, 2, 2, 1]
    tokens, counts = frequent_tokens(images, vocab, top_k=1, top_n=10)
    assert tokens == [4, 2, 0] and counts == [2, 1, 1]


# file format ----------------------------------------------------------------------------------

def test_careset_key_and_format():
    assert careset_key("Van Gogh") == "vangogh"
    assert careset_key("A.B c-d_e!") == "abc-d_e"
    assert careset_json("Van Gogh", ["tree", "sky"], "style") == {
        "vangogh_care_word": ["A tree", "A sky"],
        "vangogh_care_word_painting": ["A painting of tree", "A painting of sky"],
    }
    assert list(careset_json("nudity", ["man"], "photo")) == ["nudity_care_word", "nudity_care_word_photo"]


def test_read_careset_round_trip(tmp_path):
    path = tmp_path / "careset.json"
    path.write_text(json.dumps(careset_json("nudity", ["man", "beach"], "photo")))
    careset = read_careset(path)
    assert careset.anchor == ["A man", "A beach"]
    assert careset.retain == ["A photo of man", "A photo of beach"]
    assert careset.key == "nudity"


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"x_care_word_photo": ["A photo of a"]}', "no anchor list"),
    ('{"x_care_word": ["A a"]}', "no retain list"),
    ('{"x_care_word": [], "x_care_word_photo": ["A photo of a"]}', "'x_care_word' is empty"),
    ('{"x_care_word": ["A a"], "x_care_word_photo": ["p"], "x_care_word_painting": ["q"]}', "2 retain lists"),
    ('{"a": ["A a"], "b": ["A b"], "x_photo": ["p"]}', "2 anchor lists"),
    ('{"x_care_word": ["A a", 3], "x_care_word_photo": ["p", "q"]}', "not non-empty strings"),
    ('{"x_care_word": "A a", "x_care_word_photo": ["p"]}', "is not a list"),
])
def test_read_careset_errors_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RecareError) as info:
        read_careset(path)
    assert problem in info.value.message and str(path) in info.value.message


def test_read_careset_missing_file(tmp_path):
    with pytest.raises(RecareError, match="does not exist"):
        read_careset(tmp_path / "nope.json")


def test_prompt_style_follows_type_then_preset():
    assert prompt_style_for("Van Gogh") == "style"
    assert prompt_style_for("nudity") == "photo"
    assert prompt_style_for("a kettle") == "photo"
    assert prompt_style_for("a kettle", "style") == "style"
    with pytest.raises(UsageError, match="unknown concept type"):
        prompt_style_for("a kettle", "bogus")


# end to end on tiny-random -----------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "solid.JPG")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS + ["notaclipwordatall"]) + "\n")
    return path


def careset_args(images, out, vocab_file, *extra):
    return ("careset", "--concept", "nudity", "--images", images, "--output-dir", out, "--clip-model", "tiny-random",
            "--vocab", vocab_file, "--top-k-per-image", "20", "--top-n-tokens", "12", *extra)


def test_cli_builds_careset_and_report(run_cli, images, vocab_file, tmp_path):
    out = tmp_path / "out"
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_cli(*careset_args(images, out, vocab_file, "--json"))
    assert result.exit_code == 0, result.stderr
    assert "skipped 1 of 8 images" in result.stderr
    assert f"1 of {len(WORDS) + 1} words in --vocab are not single CLIP tokens" in result.stderr

    payload = json.loads(result.stdout.strip().splitlines()[-1])
    careset = read_careset(out / "careset.json")
    report = json.loads((out / "careset.report.json").read_text())
    assert payload["anchor"] == careset.anchor and payload["retain"] == careset.retain
    assert list(json.loads((out / "careset.json").read_text())) == ["nudity_care_word", "nudity_care_word_photo"]
    assert careset.anchor == [f"A {w}" for w in report["words"]]
    assert set(report["words"]) <= set(WORDS)

    assert report["images"]["used"] == 7 and report["images"]["skipped"] == ["broken.png"]
    assert report["params"]["candidates"] == len(WORDS)
    # Each image ranks 20 distinct words, so there are at least 12 to keep.
    assert len(report["tokens"]) == 12 and report["n_clusters"] == 7 and report["tsne_perplexity"] is None  # 12 tokens: no t-SNE
    # The report explains every word: kept tokens are exactly those neither removed nor refined away.
    kept = [row["word"] for row in report["tokens"] if row["status"] == "kept"]
    assert kept == report["words"]
    assert sorted(report["removed_clusters"]) == [0, 6]
    for row in report["tokens"]:
        cluster = report["clusters"][row["cluster"]]
        assert row["token"] in cluster["tokens"]
        assert (row["status"] == "cluster removed") == cluster["status"].startswith("removed")
        assert (row["status"] == "refined away") == (row["token"] in report["refined_away"])
    counts = [row["count"] for row in report["tokens"]]
    assert counts == sorted(counts, reverse=True) and 1 <= counts[0] <= 7
    means = [c["mean_residual"] for c in report["clusters"]]
    assert means == sorted(means)
    assert payload["picture"] == str(out / "careset.png") and all(len(row["tsne"]) == 2 for row in report["tokens"])
    with Image.open(out / "careset.png") as picture:
        assert picture.format == "PNG" and picture.width > picture.height


def test_cli_is_deterministic_and_refuses_to_overwrite(run_cli, images, vocab_file, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_cli(*careset_args(images, first, vocab_file, "-q")).exit_code == 0
    assert run_cli(*careset_args(images, second, vocab_file, "-q")).exit_code == 0
    assert (first / "careset.json").read_text() == (second / "careset.json").read_text()

    before = (first / "careset.json").read_text()
    refused = run_cli(*careset_args(images, first, vocab_file, "-q", "--seed", "7"))
    assert refused.exit_code == 1 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert (first / "careset.json").read_text() == before
    replaced = run_cli(*careset_args(images, first, vocab_file, "-q", "--seed", "7", "--overwrite",
                                     "--k-each-side", "0", "--alpha", "100"))
    assert replaced.exit_code == 0
    report = json.loads((first / "careset.report.json").read_text())
    assert report["params"]["seed"] == 7 and report["removed_clusters"] == [] and report["refined_away"] == []
    assert len(read_careset(first / "careset.json").anchor) == len({w["word"] for w in report["tokens"]})


def test_cli_style_concept_gets_painting_prompts_and_a_table(run_cli, images, vocab_file, tmp_path):
    out = tmp_path / "out"
    args = list(careset_args(images, out, vocab_file, "--n-clusters", "30"))
    args[2] = "Van Gogh"
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "only 12 tokens for 30 clusters" in result.stderr
    assert "CARE set clusters for 'Van Gogh'" in result.stdout and "words:" in result.stdout
    data = json.loads((out / "careset.json").read_text())
    assert list(data) == ["vangogh_care_word", "vangogh_care_word_painting"]
    assert all(p.startswith("A painting of ") for p in data["vangogh_care_word_painting"])


@pytest.mark.parametrize("change, message, code", [
    ({"--images": "missing"}, "does not exist", 2),
    ({"--images": "empty"}, "holds no images", 2),
    ({"--images": "unreadable"}, "none of the 2 images", 2),
    ({"--concept": "  "}, "--concept is empty", 2),
    ({"--concept": "!!"}, "no letter or digit", 2),
    ({"--n-clusters": "0"}, "--n-clusters must be at least 1", 2),
    ({"--type": "bogus"}, "unknown concept type 'bogus'", 2),
    ({"--clip-model": "ViT-B-32"}, "--clip-pretrained /path/to/open_clip_pytorch_model.bin", 3),
    ({"--vocab": "nowords"}, "no word of --vocab", 1),
])
def test_cli_bad_input_is_one_error_line(run_cli, images, vocab_file, tmp_path, change, message, code):
    folders = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "unreadable": tmp_path / "unreadable"}
    folders["empty"].mkdir()
    folders["unreadable"].mkdir()
    (folders["unreadable"] / "a.png").write_text("x")
    (folders["unreadable"] / "b.jpg").write_bytes(b"")
    (tmp_path / "nowords.txt").write_text("notaclipwordatall\n")
    args = list(careset_args(images, tmp_path / "out", vocab_file))
    for flag, value in change.items():
        value = folders.get(value, tmp_path / "nowords.txt" if value == "nowords" else value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = run_cli(*args, "--offline")
    assert result.exit_code == code, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "careset.json").exists()
