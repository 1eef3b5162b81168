"""The CARE set ("dictionary") of recare-method.md §6: words that co-occur with a concept in its
images but are not the concept, turned into anchor ("A {word}") and retain ("A photo of {word}")
prompts for stage 2.

The pipeline: CLIP vocabulary embeddings (cached) → top-k tokens per image (matrix products) →
the most frequent tokens → `select_tokens`, a pure function of embeddings (residuals w.r.t. the
concept, t-SNE + k-means clusters, dropping the extreme clusters, intra-cluster refinement) →
careset.json (the reference's format) and careset.report.json (how every token was decided).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recare_cli.clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import list_images, scan_images
from recare_cli.manifest import Writer, claim
from recare_cli.numbers import check_all
from recare_cli.output import QUIET_REPORTER, Reporter

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


# reading ----------------------------------------------------------------------------------

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


# images and top-k ---------------------------------------------------------------------------

def embed_images(clip, paths: Sequence[Path], reporter: Reporter = QUIET_REPORTER, batch_size: int = 32):
    """(L2-normalised image embeddings [n, d], paths used, paths skipped as unreadable)."""
    import torch
    from PIL import Image

    used, skipped, chunks = [], [], []
    with reporter.progress("embedding images", total=len(paths)) as task:
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start:start + batch_size]:
                try:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                    used.append(path)
                except (OSError, ValueError, Image.DecompressionBombError):
                    skipped.append(path)
            if images:
                chunks.append(clip.encode_images(images, batch_size=batch_size))
            task.advance(len(paths[start:start + batch_size]))
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return embeddings, used, skipped


def frequent_tokens(image_embeddings, vocab_embeddings, top_k: int, top_n: int, chunk: int = 64):
    """Indices of the `top_n` tokens that most often rank in an image's top `top_k`, with their counts.

    Ties are broken by first appearance (image order, then rank), as counting in that order would.
    """
    import torch

    vocab_t = vocab_embeddings.float().T.contiguous()
    top_k = min(top_k, vocab_t.shape[1])
    hits = []
    for start in range(0, image_embeddings.shape[0], chunk):
        similarities = image_embeddings[start:start + chunk].float() @ vocab_t
        hits.append(torch.topk(similarities, top_k, dim=1).indices)
    flat = torch.cat(hits).reshape(-1)
    counts = torch.bincount(flat, minlength=vocab_t.shape[1])
    first_seen = torch.full_like(counts, flat.numel())
    first_seen.scatter_reduce_(0, flat, torch.arange(flat.numel()), reduce="amin")
    seen = torch.nonzero(counts).squeeze(1)
    # Sort by count (descending), then by first appearance: lexsort as two stable sorts.
    seen = seen[torch.argsort(first_seen[seen], stable=True)]
    seen = seen[torch.argsort(-counts[seen], stable=True)]
    chosen = seen[:top_n]
    return chosen.tolist(), counts[chosen].tolist()


# selection (pure) ---------------------------------------------------------------------------

TSNE_PERPLEXITY = 30.0  # sklearn's default, which the reference uses


@dataclass
class SelectionParams:
    n_clusters: int = 7
    k_each_side: int = 1
    min_cluster_size: int = 2
    alpha: float = 0.01
    seed: int = 42


@dataclass
class Selection:
    kept: list[int]  # indices of the kept tokens, in input order
    labels: list[int]  # cluster of each token; 0 = lowest mean residual
    similarity: list[float]  # W . C
    residual_norm: list[float]  # ||W - (W . c_hat) c_hat||
    cluster_mean_residual: list[float]  # per cluster, in label order
    removed_clusters: dict[int, str]  # cluster -> "lowest residual" | "highest residual"
    refinement_d: dict[int, float] = field(default_factory=dict)  # token -> d_i, refined clusters only
    refined_away: list[int] = field(default_factory=list)
    perplexity: float | None = TSNE_PERPLEXITY  # None: no t-SNE (too few tokens)
    n_clusters: int = 7
    tsne: list[tuple[float, float]] = field(default_factory=list)  # each token's place on the 2-D map


def cluster_tokens(token_embeddings, n_clusters: int, seed: int):
    """(cluster labels, t-SNE perplexity or None, 2-D map): t-SNE to 2-D (seeded, PCA init, auto
    learning rate), then k-means.

    t-SNE needs more tokens than its perplexity (30). With fewer (a short --vocab list such as the
    toy world's) k-means runs on the embeddings themselves and the map is their first two
    principal components: a t-SNE of a dozen points is chaotic. On the toy's 9 candidate words it
    put `night` into star's cluster in one process and not in another, from float noise alone.
    """
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    embeddings = np.asarray(token_embeddings, dtype=np.float64)
    # A hundred points gain nothing from threads, and OpenMP spin-waiting on a busy CPU made
    # t-SNE 10-25x slower; one thread gives the same numbers.
    with threadpool_limits(1):
        if embeddings.shape[0] > TSNE_PERPLEXITY:
            perplexity = TSNE_PERPLEXITY
            points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                          random_state=seed).fit_transform(embeddings)
            map_2d = points
        else:
            perplexity, points = None, embeddings
            centred = embeddings - embeddings.mean(axis=0)
            map_2d = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
        # n_init fixed (not "auto") so the clusters do not change with the sklearn version.
        labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit_predict(points)
    return labels, perplexity, map_2d


def refine_cluster(residuals, alpha: float):
    """(keep mask, d) for one cluster's residuals [m, d] (already orthogonal to the concept, §6.5).

    d_i = ||mean of the other tokens' residuals||²; a token whose removal makes the rest much more
    coherent (d_i > (1 + alpha) * mean of the other d) is an outlier of the cluster.
    """
    import numpy as np

    residuals = np.asarray(residuals, dtype=np.float64)
    m = residuals.shape[0]
    leave_one_out_means = (residuals.sum(axis=0, keepdims=True) - residuals) / (m - 1)
    d = (leave_one_out_means ** 2).sum(axis=1)
    mean_other_d = (d.sum() - d) / (m - 1)
    return d <= (1 + alpha) * mean_other_d, d


def select_tokens(token_embeddings, concept_embedding, params: SelectionParams | None = None) -> Selection:
    """§6.3-6.5 on float arrays: W [n, d] (L2-normalised token embeddings) and C [d]."""
    import numpy as np

    params = params or SelectionParams()
    W = np.asarray(token_embeddings, dtype=np.float64)
    C = np.asarray(concept_embedding, dtype=np.float64).reshape(-1)
    n = W.shape[0]
    if n < 2:
        raise UsageError(f"only {n} candidate token(s): need at least 2 to cluster",
                         hint="use more images, a larger --top-n-tokens, or a longer --vocab list")
    if not 1 <= params.n_clusters <= n:
        raise UsageError(f"--n-clusters {params.n_clusters} must be between 1 and the number of tokens ({n})")
    c_hat = C / np.linalg.norm(C)
    similarity = W @ C
    residuals = W - np.outer(W @ c_hat, c_hat)
    residual_norm = np.linalg.norm(residuals, axis=1)

    raw_labels, perplexity, map_2d = cluster_tokens(W, params.n_clusters, params.seed)
    raw_means = np.array([residual_norm[raw_labels == k].mean() for k in range(params.n_clusters)])
    # Renumber clusters by mean residual so that label 0 is the most concept-like.
    rank_of = np.empty(params.n_clusters, dtype=int)
    rank_of[np.argsort(raw_means, kind="stable")] = np.arange(params.n_clusters)
    labels = rank_of[raw_labels]
    cluster_means = np.sort(raw_means, kind="stable")

    # At most (n_clusters - 1) // 2 per side, so at least one cluster always survives.
    drop = min(params.k_each_side, (params.n_clusters - 1) // 2)
    removed = {k: "lowest residual" for k in range(drop)}
    removed.update({params.n_clusters - 1 - k: "highest residual" for k in range(drop)})

    keep = np.array([label not in removed for label in labels])
    refinement_d: dict[int, float] = {}
    for cluster in range(params.n_clusters):
        members = np.nonzero(labels == cluster)[0]
        if cluster in removed or len(members) < max(2, params.min_cluster_size):
            continue
        member_keep, d = refine_cluster(residuals[members], params.alpha)
        refinement_d.update({int(i): float(di) for i, di in zip(members, d)})
        keep[members[~member_keep]] = False
    refined_away = [i for i in refinement_d if not keep[i]]
    return Selection(
        kept=[int(i) for i in np.nonzero(keep)[0]],
        labels=[int(x) for x in labels],
        similarity=[float(x) for x in similarity],
        residual_norm=[float(x) for x in residual_norm],
        cluster_mean_residual=[float(x) for x in cluster_means],
        removed_clusters=removed,
        refinement_d=refinement_d,
        refined_away=sorted(refined_away),
        perplexity=perplexity,
        n_clusters=params.n_clusters,
        tsne=[(float(x), float(y)) for x, y in map_2d],
    )


# export -----------------------------------------------------------------------------------------

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


def selection_report(tokens: Sequence[str], counts: Sequence[int], selection: Selection) -> dict:
    """How every token was decided: its cluster, residual, and why it was kept or dropped."""
    def status(i: int) -> str:
        if selection.labels[i] in selection.removed_clusters:
            return "cluster removed"
        return "refined away" if i in selection.refined_away else "kept"

    token_rows = [
        {"token": tok, "word": strip_word_end(tok), "count": int(counts[i]), "cluster": selection.labels[i],
         "similarity": round(selection.similarity[i], 6), "residual_norm": round(selection.residual_norm[i], 6),
         "refinement_d": round(selection.refinement_d[i], 6) if i in selection.refinement_d else None,
         "tsne": [round(x, 4) for x in selection.tsne[i]], "status": status(i)}
        for i, tok in enumerate(tokens)
    ]
    clusters = []
    for k in range(selection.n_clusters):
        members = [i for i, label in enumerate(selection.labels) if label == k]
        clusters.append({
            "cluster": k, "size": len(members), "mean_residual": round(selection.cluster_mean_residual[k], 6),
            "status": f"removed ({selection.removed_clusters[k]})" if k in selection.removed_clusters else "kept",
            "tokens": [tokens[i] for i in members],
            "refined_away": [tokens[i] for i in members if i in selection.refined_away],
        })
    return {
        "tsne_perplexity": selection.perplexity,
        "n_clusters": selection.n_clusters,
        "clusters": clusters,
        "removed_clusters": sorted(selection.removed_clusters),
        "refined_away": [tokens[i] for i in selection.refined_away],
        "tokens": token_rows,
    }


# the whole build ---------------------------------------------------------------------------

@dataclass
class CaresetResult:
    path: Path  # careset.json
    report_path: Path
    picture_path: Path  # careset.png
    anchor: list[str]
    retain: list[str]
    report: dict


def _read_vocab_file(path: Path, vocabulary: Sequence[str], reporter: Reporter) -> list[int]:
    """Indices of the vocabulary tokens (`word</w>`) named in a word list, one word a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecareError(f"cannot read --vocab '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    words = list(dict.fromkeys(w.strip().lower() for w in lines if w.strip()))
    if not words:
        raise RecareError(f"--vocab '{path}' lists no words", hint="one word a line")
    index = {tok: i for i, tok in enumerate(vocabulary)}
    found = [index[w + WORD_END] for w in words if w + WORD_END in index]
    missing = [w for w in words if w + WORD_END not in index]
    if missing:
        reporter.warn(f"{len(missing)} of {len(words)} words in --vocab are not single CLIP tokens and were "
                      f"ignored (e.g. {', '.join(missing[:5])})")
    if not found:
        raise RecareError(f"no word of --vocab '{path}' is a CLIP vocabulary token",
                          hint="list single lower-case words such as 'tree' or 'beach'")
    return found


def _check_params(concept: str, prompt_style: str, top_k_per_image: int, top_n_tokens: int, n_clusters: int,
                  k_each_side: int, min_cluster_size: int, alpha: float) -> None:
    if not concept or not concept.strip():
        raise UsageError("--concept is empty", hint="e.g. --concept nudity or --concept 'Van Gogh'")
    if not careset_key(concept):
        raise UsageError(f"--concept '{concept}' has no letter or digit to build the CARE set's key from")
    if prompt_style not in PROMPT_STYLES:
        raise UsageError(f"--prompt-style '{prompt_style}' is not one of {', '.join(PROMPT_STYLES)}")
    check_all({"top_k_per_image": top_k_per_image, "top_n_tokens": top_n_tokens, "n_clusters": n_clusters,
               "k_each_side": k_each_side, "min_cluster_size": min_cluster_size, "alpha": alpha})


def build_careset(
    concept: str,
    images_dir: Path,
    output_dir: Path,
    prompt_style: str = "photo",
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    vocab_file: Path | None = None,
    top_k_per_image: int = 50,
    top_n_tokens: int = 100,
    n_clusters: int = 7,
    k_each_side: int = 1,
    min_cluster_size: int = 2,
    alpha: float = 0.01,
    seed: int = 42,
    cache_dir=None,
    offline: bool = False,
    device: str = "cpu",
    reporter: Reporter = QUIET_REPORTER,
    overwrite: bool = True,
    clip=None,
) -> CaresetResult:
    """Build careset.json + careset.report.json in `output_dir` (recare-method.md §6).

    `overwrite=False` refuses an existing careset.json (the CLI's default); programs that own
    `output_dir`, such as a resumed erase run, rebuild in place. `clip`, a loaded `ClipModel`,
    replaces loading `clip_model`/`clip_pretrained` (erase builds one CARE set per concept with it).
    """
    from recare_cli.clip import load_clip, vocab_embeddings
    from recare_cli.clipvocab import vocab
    from recare_cli.fsutil import ensure_writable_dir, removing_new_dirs, write_json

    _check_params(concept, prompt_style, top_k_per_image, top_n_tokens, n_clusters, k_each_side,
                  min_cluster_size, alpha)
    paths = list_images(Path(images_dir), warn=reporter.warn)
    output_dir = Path(output_dir)
    careset_path, report_path = output_dir / CARESET_FILE, output_dir / REPORT_FILE
    claim(output_dir, CARESET)
    if careset_path.exists() and not overwrite:
        raise RecareError(f"'{careset_path}' already exists", hint="pass --overwrite or another --output-dir")
    with removing_new_dirs(output_dir):  # a failed first run leaves no empty folder
        ensure_writable_dir(output_dir)

        clip = clip or load_clip(clip_model, clip_pretrained, cache_dir=cache_dir, offline=offline, device=device)
        vocabulary = vocab()
        candidates = (_read_vocab_file(vocab_file, vocabulary, reporter) if vocab_file is not None
                      else list(range(len(vocabulary))))
        candidate_tokens = [vocabulary[i] for i in candidates]
        reporter.info(f"CLIP {clip.key}; {len(paths)} images; {len(candidate_tokens)} candidate tokens")
        vocab_matrix = vocab_embeddings(clip, candidate_tokens, cache_dir=cache_dir, reporter=reporter)

        image_embeddings, used, skipped = embed_images(clip, paths, reporter)
        if skipped:  # changed since list_images checked them
            reporter.warn(f"skipped {len(skipped)} of {len(paths)} images that could not be read "
                          f"(e.g. {skipped[0].name})")
        skipped = [path for path, _ in scan_images(Path(images_dir)).skipped] + skipped
        if not used:
            raise RecareError(f"none of the {len(paths)} images in '{images_dir}' could be read",
                              hint="are they valid png/jpg files?")
        chosen, counts = frequent_tokens(image_embeddings, vocab_matrix, top_k_per_image, top_n_tokens)
        tokens = [candidate_tokens[i] for i in chosen]
        if len(tokens) < 2:
            raise RecareError(f"only {len(tokens)} distinct token(s) ranked in the images' top {top_k_per_image}",
                              hint="use more images or a longer --vocab list")
        if n_clusters > len(tokens):
            reporter.warn(f"only {len(tokens)} tokens for {n_clusters} clusters: using {len(tokens)} clusters")
            n_clusters = len(tokens)

        token_matrix = clip.encode_text(tokens).numpy()
        concept_embedding = clip.encode_text([concept]).numpy()[0]
        params = SelectionParams(n_clusters, k_each_side, min_cluster_size, alpha, seed)
        selection = select_tokens(token_matrix, concept_embedding, params)

        # A token and its word-start twin ("cat</w>", "cat") give one word: list it once.
        words = list(dict.fromkeys(strip_word_end(tokens[i]) for i in selection.kept))
        careset = careset_json(concept, words, prompt_style)
        anchor, retain = careset.values()
        report = {
            "concept": concept, "key": careset_key(concept), "prompt_style": prompt_style,
            "clip": {"model": clip.name, "pretrained": clip.pretrained, "key": clip.key},
            "images": {"folder": str(images_dir), "used": len(used), "skipped": [p.name for p in skipped]},
            "params": {"top_k_per_image": top_k_per_image, "top_n_tokens": top_n_tokens, "n_clusters": n_clusters,
                       "k_each_side": k_each_side, "min_cluster_size": min_cluster_size, "alpha": alpha, "seed": seed,
                       "vocab_file": str(vocab_file) if vocab_file else None, "candidates": len(candidate_tokens)},
            **selection_report(tokens, counts, selection),
            "words": words,
        }
        write_json(report_path, CARESET.stamp(report))
        from recare_cli.pictures import CARESET_PICTURE, plot_careset

        picture_path = output_dir / CARESET_PICTURE
        plot_careset(report, picture_path)
        write_json(careset_path, careset)  # last: a careset.json on disk is always a finished one
        return CaresetResult(careset_path, report_path, picture_path, list(anchor), list(retain), report)
