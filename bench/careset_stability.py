"""Does the toy CARE set keep the same words across image sets and clustering seeds? (a benchmark)

Renders `--sets` sets of 64 "a star" images from `--model toy` (image seeds 42, 43, ...; as
`recare erase` renders its training images) into --out, then selects the CARE set of each with
the toy's erase settings (its word list, top 5 per image, top 12 tokens, min cluster size 3) for
clustering seeds 42-44, and prints the kept words of every combination.

    python bench/careset_stability.py [--sets 3] [--out bench-runs/careset-stability]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-runs/careset-stability"))
    args = parser.parse_args(argv)

    from recare_cli.careset import SelectionParams, embed_images, frequent_tokens, select_tokens
    from recare_cli.clip import load_clip, vocab_embeddings
    from recare_cli.fsutil import list_images
    from recare_cli.generate import GenerateSettings, PromptRow, generate
    from recare_cli.models import Runtime
    from recare_cli.output import Reporter
    from recare_cli.presets import MODEL_DEFAULTS, TOY_WORDS

    toy = MODEL_DEFAULTS["toy"]
    runtime = Runtime("toy", device="cpu")
    clip = load_clip("toy", None, cache_dir=runtime.cache_dir)
    candidates = [w.strip() + "</w>" for w in TOY_WORDS.read_text().splitlines() if w.strip()]
    vocab = vocab_embeddings(clip, candidates, cache_dir=runtime.cache_dir)
    concept = clip.encode_text(["star"]).numpy()[0]
    for image_seed in range(42, 42 + args.sets):
        folder = args.out / f"star-{image_seed}"
        generate([PromptRow("a star")], folder, runtime, GenerateSettings(height=32, width=32),
                 num_images=toy["num_images"], seed=image_seed, reporter=Reporter())
        embeddings, _, _ = embed_images(clip, list_images(folder))
        chosen, _ = frequent_tokens(embeddings, vocab, toy["care_top_k"], toy["care_top_n"])
        tokens = [candidates[i] for i in chosen]
        token_matrix = clip.encode_text(tokens).numpy()
        for seed in (42, 43, 44):
            selection = select_tokens(token_matrix, concept, SelectionParams(
                min_cluster_size=toy["care_min_cluster_size"], seed=seed))
            print(f"images seed {image_seed}, clustering seed {seed}: "
                  f"{', '.join(tokens[i][:-4] for i in selection.kept)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
