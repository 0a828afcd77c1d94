"""`fedface evaluate CHECKPOINT`: metrics of a saved model (or a run directory's final model) on any supported data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fedface.simulations.console import err_console, print_json, setup_logging, user_errors


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (checkpoint.pt of `fedface train`, checkpoints/round-NNNN.pt of `fedface simulate`) or a run directory (its final model).")],
    data: Annotated[Optional[Path], typer.Option(help="Faces to evaluate on; every image is treated as an unseen identity (or subject). Default: the run's own test part (a federated run's held-out identities).")] = None,
    layout: Annotated[Optional[str], typer.Option(help="Layout of --data: auto, orl, olivetti, yale-a, extended-yale-b, image-folder.")] = None,
    split: Annotated[Optional[Path], typer.Option("--split", help="A saved split.json: evaluate on its test part of --data (or of the run's data).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    output_format: Annotated[str, typer.Option("--format", help="text (a table on stderr) or json (one JSON object on stdout's last line).")] = "text",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """Evaluate a trained encoder: verification, identification and expression metrics, clean and occluded.

    CHECKPOINT is any checkpoint fedface writes, or a run directory: a `fedface train` run's
    checkpoint.pt, or a `fedface simulate` run's last round checkpoint (encoder only).
    """
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")
    setup_logging(verbose, quiet)
    with user_errors():
        from fedface.simulations.evaluation import evaluate_checkpoint

        metrics = evaluate_checkpoint(checkpoint, data=data, layout=layout, split_path=split, device_name=device)
    if output_format == "json":
        print_json(metrics)
        return
    table = Table(title=f"{metrics.get('checkpoint', checkpoint)}: {metrics.get('protocol', '')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key not in ("checkpoint", "protocol"):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    err_console.print(table)
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
