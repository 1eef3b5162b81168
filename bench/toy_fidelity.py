"""Where the toy model loses a concept (not a test): the judge, the VAE, or the UNet?

For every label of the ground-truth classifier's heads, prints how often the classifier finds it
on fresh procedural renders of scenes that have it, and on the toy VAE's reconstructions of the
same renders. When both are high but `bench/toy_quality.py`'s base row is low for a concept, the
concept is lost by the UNet's sampling, not by the VAE's latent space or by the judge.

    python bench/toy_fidelity.py            # 4,000 scenes; about a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=12345, help="dataset seed; the training set uses 1")
    args = parser.parse_args()

    from recare_cli.toy import world
    from recare_cli.toy.classifier import HEADS, predict, to_pixels
    from recare_cli.toy.package import build_vae, load_classifier, manifest, weights

    vae = build_vae(manifest()["config"], weights("vae"))
    classifier = load_classifier()

    renders, _, labels = world.make_dataset(args.scenes, args.seed)
    with torch.no_grad():
        reconstructions = torch.cat([
            vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
            for batch in to_pixels(renders).split(256)
        ])
    reconstructions = ((reconstructions + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    judged = {"render": predict(classifier, renders), "VAE reconstruction": predict(classifier, reconstructions)}

    print(f"{args.scenes} scenes (seed {args.seed}); % of scenes with the label in which the classifier finds it\n")
    print("| head | label | scenes | render | VAE reconstruction |")
    print("|---|---|---|---|---|")
    for head, names in HEADS.items():
        for index, name in enumerate(names):
            has_label = labels[head] == index
            rates = [100 * np.mean(np.asarray(judged[kind][head])[has_label] == name) for kind in judged]
            print(f"| {head} | {name} | {int(has_label.sum())} | {rates[0]:.0f}% | {rates[1]:.0f}% |")


if __name__ == "__main__":
    main()
