"""`fedface train`: centralized training (no federation; optionally DP-SGD) from a config plus flags."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedface.common.config import TrainConfig
from fedface.common.privacy.accounting import format_epsilon
from fedface.common.training import EpochStats
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

HEADLINE = {
    "closed-set": ("rank1", "rank-1"),
    "open-set": ("verif_acc", "verif acc"),
    "expression": ("expression_acc", "expression acc"),
}


def headline(cfg: TrainConfig) -> tuple[str, str]:
    """The metric key and label shown for a run of this task and split."""
    return HEADLINE["expression" if cfg.training.task == "expression" else cfg.split.kind]


def load_config(config: Path | None, overrides: dict[str, object]) -> TrainConfig:
    """The config file (or defaults) with flags applied on top; ``--task expression`` without
    a config starts from the packaged expression recipe (scenarios/fer2013_expression.toml)."""
    if config is not None:
        base = TrainConfig.from_toml(config)
    elif overrides.get("training.task") == "expression":
        from fedface.simulations.bench.common import scenario_config

        base = scenario_config("fer2013_expression.toml")
    else:
        base = TrainConfig()
    return base.with_overrides(overrides)


def default_run_dir(prefix: str) -> Path:
    """``runs/<prefix>-YYYYmmdd-HHMMSS`` under the current directory."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{prefix}-{stamp}"


def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (kebab-case keys); flags override it.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Face data directory (ORL, Yale A, Extended Yale B, Olivetti cache, one folder per identity; for expressions FER2013, CK+, JAFFE or any <emotion>/<image> folder).")] = None,
    layout: Annotated[Optional[str], typer.Option(help="Data layout: auto, orl, olivetti, yale-a, extended-yale-b, jaffe, fer2013, expression-folder, image-folder.")] = None,
    task: Annotated[Optional[str], typer.Option(help="identity (margin head) or expression (7 classes: FER2013, CK+, JAFFE; Yale A's own 6). Without --config, expression starts from the packaged FER2013 recipe.")] = None,
    split: Annotated[Optional[str], typer.Option(help="closed-set (images of every identity split) or open-set (identities held out).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the one-cycle schedule.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of training and of the split (a split by folds, as the expression recipes use, stays fixed).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu or cuda.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (0: torch's default).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Train with DP-SGD spending at most this epsilon (noise calibrated once for the whole training); 'inf' or unset: not private.", rich_help_panel="Privacy")] = None,
    delta: Annotated[Optional[float], typer.Option(help="DP delta (default 1e-5; keep it well below 1 / training images).", rich_help_panel="Privacy")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Per-example gradient clipping norm (default 1.0).", rich_help_panel="Privacy")] = None,
    accountant: Annotated[Optional[str], typer.Option(help="Privacy accountant: rdp (default) or prv.", rich_help_panel="Privacy")] = None,
    secure_mode: Annotated[Optional[bool], typer.Option("--secure-mode/--no-secure-mode", help="OS randomness for Poisson sampling and noise seeds (production).", rich_help_panel="Privacy")] = None,
    ledger: Annotated[Optional[Path], typer.Option(help="Privacy ledger file (default $FEDFACE_LEDGER or ~/.fedface/privacy-ledger.sqlite); the training is charged there before it starts.", rich_help_panel="Privacy")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start the encoder from this checkpoint's encoder (e.g. public pre-training).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory to write (default runs/train-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Reuse a run directory that already holds a run.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="text, or json: the final metrics as one JSON object on stdout's last line.")] = "text",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only; no progress bar.")] = False,
) -> None:
    """Train the GRU face encoder on one machine and evaluate it on the held-out part.

    Writes a run directory with the resolved config, the split, per-epoch metrics
    (metrics.json) and the checkpoint (checkpoint.pt), each written atomically.

    With --epsilon, trains with DP-SGD (Poisson sampling, per-example clipping, Gaussian
    noise); the training is charged to the privacy ledger before it starts and refused if it
    would pass the data set's budget (see `fedface privacy status`).
    """
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")
    setup_logging(verbose, quiet)
    with user_errors():
        overrides: dict[str, object] = {
            "data.root": str(data) if data is not None else None,
            "data.layout": layout,
            "training.task": task,
            "split.kind": split,
            "training.epochs": epochs,
            "training.batch-size": batch_size,
            "training.lr": lr,
            "training.seed": seed,
            "training.device": device,
            "training.threads": threads,
            "training.init-from": str(init_from) if init_from is not None else None,
            "privacy.epsilon": epsilon,
            "privacy.delta": delta,
            "privacy.max-grad-norm": max_grad_norm,
            "privacy.accountant": accountant,
            "privacy.secure-mode": secure_mode,
            "privacy.ledger": str(ledger) if ledger is not None else None,
        }
        if task == "expression" and split is None:
            overrides["split.kind"] = "open-set"
        cfg = load_config(config, overrides)
        if seed is not None and not cfg.split.folds:
            # a split by folds holds a fixed fold out (FER2013's validation part): --seed trains, it does not move it
            cfg = cfg.with_overrides({"split.seed": seed})
        run_dir = out if out is not None else default_run_dir("train")
        run = _train_with_progress(cfg, run_dir, overwrite, show=not quiet)
    key, label = headline(cfg)
    spent = ""
    if run.privacy is not None:
        spent = (
            f"  epsilon {format_epsilon(run.privacy['epsilon'])} (delta {run.privacy['delta']:.1e}; "
            f"data set total {format_epsilon(run.privacy['dataset_epsilon_after'])})"
        )
    err_console.print(f"[bold]{label}[/] {run.metrics.get(key, float('nan')):.4f}{spent}  run directory: {run_dir}")
    if output_format == "json":
        extra = {"privacy": run.privacy} if run.privacy is not None else {}
        print_json({"run_dir": str(run_dir), "wall_s": run.wall_s, **run.metrics, **extra})


def _train_with_progress(cfg: TrainConfig, run_dir: Path, overwrite: bool, *, show: bool):  # type: ignore[no-untyped-def]
    from fedface.simulations.centralized import train_run

    key, label = headline(cfg)
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show,
        transient=False,
    )
    bar = progress.add_task("", total=cfg.training.epochs)
    last_metric = ""

    def on_epoch(stats: EpochStats, metrics: dict[str, float] | None) -> None:
        # The bar appears with the first finished epoch, after data loading and set-up, so
        # that an early error is not printed under an empty bar.
        nonlocal last_metric
        if not progress.live.is_started:
            progress.start()
        if metrics is not None and key in metrics:
            last_metric = f"  test {label} {metrics[key]:.3f}"
        progress.update(
            bar,
            advance=1,
            description=f"loss {stats.loss:.3f}  {stats.images_per_s:.0f} img/s{last_metric}",
        )

    try:
        return train_run(cfg, out_dir=run_dir, overwrite=overwrite, on_epoch=on_epoch)
    finally:
        if progress.live.is_started:
            progress.stop()
