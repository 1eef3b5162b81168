"""CARE set cost on the built-in `tiny-random` CLIP: vocabulary build, and seconds per 100 images.

    python bench/careset.py                          # 100 images of 512 px, CPU
    python bench/careset.py --images 300 --device cuda --clip-model ViT-B-32 --clip-pretrained FILE

Uses a fresh cache folder so the vocabulary (49,408 tokens) is really encoded, then times
image embedding + top-k over the whole vocabulary (`embed_images` + `frequent_tokens`, the
per-image part of `recare careset`) and the selection (t-SNE + k-means + refinement) on the
most frequent tokens. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels (SD output: 512).")
    parser.add_argument("--clip-model", default="tiny-random")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from recare_cli.careset import SelectionParams, embed_images, frequent_tokens, select_tokens
    from recare_cli.clip import load_clip, vocab_embeddings
    from recare_cli.clipvocab import vocab

    with tempfile.TemporaryDirectory(prefix="recare-bench-careset-") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            paths.append(tmp / f"{i:05d}.png")
            Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(paths[-1])

        start = time.perf_counter()
        clip = load_clip(args.clip_model, args.clip_pretrained, cache_dir=tmp / "cache", device=args.device)
        load_s = time.perf_counter() - start

        start = time.perf_counter()
        vocab_matrix = vocab_embeddings(clip, cache_dir=tmp / "cache")
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        vocab_embeddings(clip, cache_dir=tmp / "cache")
        cached_s = time.perf_counter() - start

        start = time.perf_counter()
        image_embeddings, _, _ = embed_images(clip, paths)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        chosen, _ = frequent_tokens(image_embeddings, vocab_matrix, top_k=50, top_n=100)
        topk_s = time.perf_counter() - start

        tokens = [vocab()[i] for i in chosen]
        start = time.perf_counter()
        select_tokens(clip.encode_text(tokens).numpy(), clip.encode_text(["nudity"]).numpy()[0], SelectionParams())
        select_s = time.perf_counter() - start

    per_100 = 100 / args.images
    print(f"clip {clip.key} on {args.device}; {args.images} images of {args.size} px")
    print(f"load CLIP:                      {load_s:8.2f} s")
    print(f"vocabulary build ({vocab_matrix.shape[0]} tokens): {build_s:8.2f} s  (cached reload {cached_s:.3f} s)")
    print(f"per 100 images, embedding:      {embed_s * per_100:8.2f} s")
    print(f"per 100 images, top-k:          {topk_s * per_100:8.2f} s")
    print(f"per 100 images, total:          {(embed_s + topk_s) * per_100:8.2f} s")
    print(f"selection ({len(tokens)} tokens):        {select_s:8.2f} s")


if __name__ == "__main__":
    main()
