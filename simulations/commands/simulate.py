"""`fedface simulate`: a federated run of many simulated sites on this machine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from fedface.common import wire
from fedface.common.privacy.accounting import format_epsilon
from fedface.common.config import TrainConfig
from fedface.simulations.bench.common import scenario_config
from fedface.simulations.commands.train import default_run_dir
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors


def simulate(
    scenario: Annotated[Optional[Path], typer.Option("--scenario", "-c", help="Scenario TOML (a training config with a federation section; default: the packaged scenarios/federated.toml); flags override it.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Face data directory to partition into sites (default: the scenario's data.root).")] = None,
    task: Annotated[Optional[str], typer.Option(help="identity (default) or expression; without --scenario, expression runs the packaged FER2013 scenario (scenarios/fer2013_federated.toml).")] = None,
    sites: Annotated[Optional[int], typer.Option(help="Number of sites (virtual SuperNodes).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Each site's epsilon for the whole run (noise calibrated once for all rounds); default from the scenario (8 in the packaged one); inf: not private.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="DP delta (default 1e-5).")] = None,
    secagg: Annotated[Optional[bool], typer.Option("--secagg/--no-secagg", help="Flower SecAgg+ (default on): the server sees only the masked sum of updates.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="fedavg (default), fedprox, fedadam or fedavgm (server momentum).")] = None,
    local_epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round at each site.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split, the partition and training.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start the global encoder from this checkpoint's encoder (e.g. `fedface train` on a public data set).")] = None,
    client_cpus: Annotated[Optional[float], typer.Option(help="CPUs Ray reserves per site (default 1: as many sites train at once as there are cores).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running Ray cluster's head (`ray start --head`) to run the sites on; each machine needs the data at the same absolute path. Default: a private Ray instance on this machine.")] = None,
    allow_non_private: Annotated[bool, typer.Option("--allow-non-private", help="Let the simulated sites' policy train without DP-SGD (needed with --epsilon inf; default: they refuse).")] = False,
    ledger_dir: Annotated[Optional[Path], typer.Option(help="Where the simulated sites keep their privacy ledgers across runs, one folder per data set and partition (default $FEDFACE_LEDGER_DIR or ~/.fedface/ledgers); never deleted by --overwrite.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory to write (default runs/simulate-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run directory that already holds a run (the sites' ledgers stay).")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Go on with the run in this directory after its last checkpointed round (its config; --rounds may raise the plan).")] = None,
    output_format: Annotated[str, typer.Option("--format", help="text, or json: the summary as one JSON object on stdout's last line.")] = "text",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail (-v also shows Flower's and Ray's logs).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings, errors and the closing summary only (no per-round progress).")] = False,
) -> None:
    """Federated training of the GRU face encoder over many simulated sites (Flower simulation engine).

    Holds out federation.test-identities people (or, with split.folds, one fold of them) for
    the server's evaluation, gives each site
    its own people, trains with DP-SGD at every site (each round charged to the site's ledger
    before its update leaves), aggregates through SecAgg+, and writes the run directory:
    config, split, partition, run store (runs.sqlite), a checkpoint per round, each site's head
    under sites/, and metrics.json. Each site enforces the scenario's site-policy section (SecAgg+
    required, at least 3 sites per sum, no non-private rounds unless allowed) and keeps its
    ledger in --ledger-dir, so its lifetime spend composes over every run on the same faces.
    """
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")
    if task is not None and task not in ("identity", "expression"):
        raise typer.BadParameter(f"expected identity or expression, got {task!r}", param_hint="--task")
    if strategy is not None and strategy not in ("fedavg", "fedprox", "fedadam", "fedavgm"):
        raise typer.BadParameter(f"expected fedavg, fedprox, fedadam or fedavgm, got {strategy!r}", param_hint="--strategy")
    setup_logging(verbose, quiet)
    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with user_errors():
        overrides: dict[str, object] = {
            "data.root": str(data) if data is not None else None,
            "federation.sites": sites,
            "federation.rounds": rounds,
            "federation.secagg": secagg,
            "federation.strategy": strategy,
            "federation.local-epochs": local_epochs,
            "federation.seed": seed,
            "training.seed": seed,
            "training.task": task,
            "privacy.epsilon": epsilon,
            "privacy.delta": delta,
            "training.init-from": str(init_from) if init_from is not None else None,
            "site-policy.allow-non-private": True if allow_non_private else None,
        }
        if resume is not None:
            if scenario is not None or out is not None or init_from is not None:
                raise typer.BadParameter("--resume takes the run's own config and directory: drop --scenario, --out and --init-from")
            base = TrainConfig.from_toml(resume / "config.toml")
            overrides = {"federation.rounds": rounds, "site-policy.allow-non-private": overrides["site-policy.allow-non-private"]}
        else:
            default = "fer2013_federated.toml" if task == "expression" else "federated.toml"
            base = TrainConfig.from_toml(scenario) if scenario is not None else scenario_config(default)
        cfg = base.with_overrides(overrides)
        if seed is not None and resume is None and not cfg.split.folds:
            # a split by folds holds a fixed fold out (FER2013's validation part): --seed does not move it
            cfg = cfg.with_overrides({"split.seed": seed})
        key, label = ("expression_acc", "expression acc") if cfg.training.task == "expression" else ("verif_acc", "verification acc")
        second, second_label = ("expression_macro_f1", "macro-F1") if cfg.training.task == "expression" else ("verif_auc", "AUC")
        run_dir = resume if resume is not None else (out if out is not None else default_run_dir("simulate"))
        from fedface.simulations.simulate import check_federated_config, run_federated

        check_federated_config(cfg)  # before the banner: a refused config prints one line
        fc = cfg.federation
        err_console.print(
            f"{fc.sites} sites x {fc.rounds} rounds, {fc.strategy}, SecAgg+ {'on' if fc.secagg else 'off'}, "
            + (f"DP-SGD at each site (epsilon {cfg.privacy.epsilon or 'from noise'}, delta {cfg.privacy.delta:g})" if cfg.privacy.enabled else "not private")
            + f"; run directory {run_dir}"
        )

        def on_round(number: int, row: dict[str, Any]) -> None:
            if quiet:
                return
            if row.get("initial"):
                err_console.print(
                    f"starting model (round {number}): {label} {row.get(key, float('nan')):.3f} "
                    f"({second_label} {row.get(second, float('nan')):.3f})"
                )
                return
            eps, life = row.get("max_epsilon"), row.get("max_lifetime_epsilon")
            spent = f", epsilon spent this run (max over sites) {format_epsilon(eps)}" if eps is not None else ""
            if life is not None:
                spent += f", lifetime {format_epsilon(life)}"
            err_console.print(
                f"round {number}/{fc.rounds}: {row['answered']}/{row['sampled']} sites answered"
                + (f", {row['refused']} refused" if row["refused"] else "")
                + (f", {row['failed']} failed" if row["failed"] else "")
                + f"; {label} {row.get(key, float('nan')):.3f} ({second_label} {row.get(second, float('nan')):.3f}){spent}; {row['seconds']:.1f} s"
            )

        result = run_federated(
            cfg,
            out_dir=run_dir,
            overwrite=overwrite,
            on_round=on_round,
            client_cpus=client_cpus,
            resume=resume is not None,
            ray_address=ray_address,
            ledger_dir=ledger_dir,
        )
        refusals = result.refusals()
        if refusals and result.completed:  # (an incomplete run's error names them)
            err_console.print("sites refused or failed: " + "; ".join(f"{escape(reason)} ({n} site-rounds)" for reason, n in refusals.items()), soft_wrap=True)
        if not result.completed:
            hint = escape(_refusal_hint(refusals))
            err_console.print(f"[red]run incomplete[/]: {escape(str(result.error))} (run directory {run_dir}){hint}", soft_wrap=True)
            raise typer.Exit(1)
    life = max((r["max_lifetime_epsilon"] for r in result.history if r.get("max_lifetime_epsilon") is not None), default=None)
    err_console.print(
        f"[bold]final {label}[/] {result.final.get(key, float('nan')):.4f}"
        + (f"  max lifetime epsilon {format_epsilon(life)}" if life is not None else "")
        + f"  run directory: {run_dir}  ({result.wall_s:.0f} s)"
    )
    if output_format == "json":
        print_json({"run_id": result.run_id, "run_dir": str(run_dir), "wall_s": result.wall_s, "rounds": result.history, **result.final})


def _refusal_hint(refusals: dict[str, int]) -> str:
    """What to change when the simulated sites' policy refused the run."""
    hints = {
        wire.REASON_NON_PRIVATE: "pass --allow-non-private (or set [site-policy] allow-non-private = true) for a non-private run",
        wire.REASON_SECAGG: "set [site-policy] require-secagg = false in the scenario to let simulated sites send clear updates",
        wire.REASON_PEERS: "use at least 3 sites (or lower [site-policy] min-peers and [federation] min-sites-per-aggregate)",
        wire.REASON_EPSILON_PER_RUN: "ask for a smaller --epsilon, or raise [site-policy] epsilon-per-run",
        wire.REASON_DELTA: "ask for a smaller --delta, or raise [site-policy] delta",
    }
    found = [hints[r] for r in refusals if r in hints]
    return ("; " + "; ".join(found)) if found else ""


__all__ = ["simulate"]
