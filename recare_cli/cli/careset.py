"""`recare careset`: build the CARE set (anchor and retain words) from images of the concept."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from recare_cli.cli.common import Common, with_common


class PromptStyle(str, Enum):
    photo = "photo"
    style = "style"


@with_common
def careset(
    common: Common,
    concept: Annotated[str, typer.Option(help="The reference word of the concept, e.g. nudity or 'Van Gogh'.")],
    images: Annotated[Path, typer.Option(help="Folder of images that contain the concept (png/jpg/jpeg)."
                                      " Unreadable, truncated or oversized (decompression-bomb) images are skipped with a warning, before any work starts.")],
    output_dir: Annotated[Path, typer.Option(help="Where careset.json, careset.report.json and careset.png (the t-SNE map) go.")],
    prompt_style: Annotated[Optional[PromptStyle], typer.Option(
        help="Retain prompts 'A photo of w' (photo) or 'A painting of w' (style). "
             "Default: from --type, else from the concept (nudity: photo, Van Gogh: style), else photo.")] = None,
    concept_type: Annotated[Optional[str], typer.Option(
        "--type", help="Concept type (object, style, person or a plugin's); sets the default --prompt-style.")] = None,
    clip_model: Annotated[str, typer.Option(
        help="open_clip model name, open_clip folder, hf-hub:org/repo, or a built-in: toy, tiny-random.")] = "ViT-B-32",
    clip_pretrained: Annotated[str, typer.Option(
        help="open_clip pretrained tag, or a local checkpoint file.")] = "openai",
    vocab: Annotated[Optional[Path], typer.Option(
        help="Word list (one a line): only these CLIP tokens are candidates.")] = None,
    top_k_per_image: Annotated[int, typer.Option(help="Tokens taken from each image.")] = 50,
    top_n_tokens: Annotated[int, typer.Option(help="Most frequent tokens that are clustered.")] = 100,
    n_clusters: Annotated[int, typer.Option(help="k-means clusters.")] = 7,
    k_each_side: Annotated[int, typer.Option(
        help="Clusters dropped at each end of the mean-residual order.")] = 1,
    min_cluster_size: Annotated[int, typer.Option(help="Smallest cluster that is refined.")] = 2,
    alpha: Annotated[float, typer.Option(help="Refinement tolerance: drop d_i > (1 + alpha) * mean of the rest.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of t-SNE and k-means.")] = 42,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing careset.json.")] = False,
) -> None:
    """Build a CARE set: words that co-occur with the concept in its images but are not the concept."""
    from recare_cli import careset as core

    style = prompt_style.value if prompt_style else core.prompt_style_for(concept, concept_type)
    reporter = common.reporter
    result = core.build_careset(
        concept, images, output_dir, prompt_style=style, clip_model=clip_model, clip_pretrained=clip_pretrained,
        vocab_file=vocab, top_k_per_image=top_k_per_image, top_n_tokens=top_n_tokens, n_clusters=n_clusters,
        k_each_side=k_each_side, min_cluster_size=min_cluster_size, alpha=alpha, seed=seed,
        cache_dir=common.cache_dir, offline=common.offline, device=common.device, reporter=reporter,
        overwrite=overwrite,
    )
    report = result.report

    def render(console) -> None:
        from rich.markup import escape
        from rich.table import Table

        # Tokens are arbitrary BPE strings ("[/", "</w>"): escape them so rich shows them as they are.
        table = Table("cluster", "size", "mean residual", "top tokens", "status",
                      title=f"CARE set clusters for '{escape(concept)}' (clusters in order of mean residual)")
        for cluster in report["clusters"]:
            colour = "green" if cluster["status"] == "kept" else "red"
            tokens = ", ".join(cluster["tokens"][:6]) + (" …" if len(cluster["tokens"]) > 6 else "")
            refined = f"; refined away: {', '.join(cluster['refined_away'])}" if cluster["refined_away"] else ""
            table.add_row(str(cluster["cluster"]), str(cluster["size"]), f"{cluster['mean_residual']:.4f}",
                          escape(tokens + refined), f"[{colour}]{cluster['status']}[/]")
        console.print(table)
        console.print(f"[bold]{len(report['words'])} words:[/] {escape(', '.join(report['words']))}", highlight=False)
        console.print(f"→ {escape(str(result.path))}  (details: {escape(str(result.report_path))}, "
                      f"map: {escape(str(result.picture_path))})", highlight=False)

    reporter.result(
        {"careset": str(result.path), "report": str(result.report_path), "picture": str(result.picture_path),
         "key": report["key"], "prompt_style": style, "words": report["words"], "anchor": result.anchor, "retain": result.retain,
         "removed_clusters": report["removed_clusters"], "refined_away": report["refined_away"],
         "images_used": report["images"]["used"], "images_skipped": len(report["images"]["skipped"])},
        render=render,
    )
