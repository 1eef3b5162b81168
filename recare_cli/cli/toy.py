"""`recare toy`: rebuild the toy world's models (the built-in `toy` model, CLIP and classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The toy world: a small trained model shipped with recare (--model toy).",
                  no_args_is_help=True)


@app.command()
def train(
    output: Annotated[Path, typer.Option(help="Folder for toy.json, toy.safetensors and words.txt.")] = Path("toy-model"),
    work_dir: Annotated[Path, typer.Option(
        help="Dataset and finished stages; a rerun continues from them.")] = Path("toy-model-work"),
    fraction: Annotated[float, typer.Option(
        help="Scale every step count and the dataset, in [0.0001, 1] (1 = the shipped recipe; 0.001 for a smoke test).")] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing toy model in --output.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
) -> None:
    """Train the toy world's models from seeds (about an hour on a 2-core CPU).

    To ship the result, copy --output's files into recare_cli/data/toy/.
    """
    from recare_cli.errors import UsageError
    from recare_cli.fsutil import ensure_writable_dir
    from recare_cli.numbers import check
    from recare_cli.output import HUMAN, JSON, Reporter, quiet_libraries
    from recare_cli.toy.package import TOY_JSON
    from recare_cli.toy.train import train_toy_world

    check("fraction", fraction)
    quiet_libraries()
    if (output / TOY_JSON).exists() and not overwrite:
        raise UsageError(f"'{output}' already holds a toy model", hint="pass --overwrite or another --output")
    ensure_writable_dir(output, "--output")
    ensure_writable_dir(work_dir, "--work-dir")
    reporter = Reporter(JSON if json_output else HUMAN)
    manifest = train_toy_world(work_dir, output, fraction=fraction, reporter=reporter)

    def render(console) -> None:
        console.print(f"toy model written to {output}")
        for stage, info in manifest["training"].items():
            console.print(f"  {stage}: {info['seconds']} s, final loss {info['final_loss']}")

    reporter.result({"output": str(output), "training": manifest["training"]}, render=render)
