"""Building a CARE set from a concept's images: CLIP vocabulary embeddings (cached) → top-k tokens
per image (matrix products) → the most frequent tokens → the selection → careset.json,
careset.report.json and careset.png."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recare_cli.careset.file import (
    CARESET, CARESET_FILE, PROMPT_STYLES, REPORT_FILE, WORD_END, careset_json, careset_key, strip_word_end,
)
from recare_cli.careset.select import SelectionParams, select_tokens, selection_report
from recare_cli.clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from recare_cli.errors import RecareError, UsageError
from recare_cli.fsutil import list_images, scan_images
from recare_cli.manifest import claim
from recare_cli.numbers import check_all
from recare_cli.output import QUIET_REPORTER, Reporter

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
