"""`fedface bench federated`: federated DP training against centralized training, and scale.

Default mode, in one run on ORL (64x64; 10 identities held out for the server's evaluation,
the other 30 dealt to ``--sites`` identity-disjoint sites; one split for every variant):

- ``federated_dp``: ``--sites`` sites, SecAgg+ on, DP-SGD at each site at ``--epsilon``
  (calibrated once per site for all rounds), open-set verification accuracy per round;
- ``untrained``: the same encoder before any training (random, same seed), on the same
  held-out people with the same evaluation: the floor every trained variant must beat (a
  random GRU already verifies ORL's open set at about 0.81);
- ``plain``: the same without SecAgg+ (its sites' policy opts in to clear updates);
- ``paired``: the seconds per round with and without SecAgg+, from one run in which odd rounds
  go through SecAgg+ and even rounds in the clear (the same processes, the same moment of the
  machine); the separate runs' seconds per round are reported too;
- ``central_dp``: one model on all 30 training identities with DP-SGD at the same epsilon;
- ``central``: the same recipe without privacy.

``--no-timing`` leaves out ``plain`` and ``paired`` (accuracy only: one federated run of the three).

The non-private variants opt in explicitly: simulated sites refuse clear updates and
non-private rounds by default (their ``[site-policy]``). The sites' ledgers live in the
benchmark's temporary directory, so a benchmark never spends a lifetime budget.

The recipe is the packaged ``scenarios/federated.toml`` (or ``--scenario``). ``--sites 100
--rounds 5 --scale`` runs the scale mode instead: identities recur across sites (images never
do), one federated run, reporting wall time, seconds per round and peak memory. The last
stdout line is one JSON object.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from fedface.common.config import TrainConfig
from fedface.common.data import load_faces, split_open_set
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors


def _central(cfg: TrainConfig, orl: Path, eps: float | None, ledger: Path) -> dict[str, Any]:
    """One centralized training on the federated run's training identities (worker process)."""
    from fedface.simulations.centralized import train_run

    torch.set_num_threads(1)
    faces = load_faces(orl, size=cfg.data.image_size, crop=cfg.data.crop)  # as the federation loads them
    split = split_open_set(faces, test_identities=cfg.federation.test_identities, seed=cfg.split.seed)
    over: dict[str, Any] = {"training.epochs": cfg.training.epochs, "training.eval-every": 10_000}
    if eps is None:
        # not private: an infinite epsilon (None would leave the scenario's epsilon in place)
        over.update({"privacy.epsilon": math.inf})
    else:
        over.update({"privacy.epsilon": eps, "privacy.ledger": str(ledger), "privacy.dataset": f"central-{eps}"})
    run = train_run(cfg.with_overrides(over), faces=faces, split=split)
    return {"open_verif_acc": run.metrics["verif_acc"], "open_verif_auc": run.metrics["verif_auc"], "train_s": run.wall_s,
            "epsilon_spent": (run.privacy or {}).get("epsilon")}


def _untrained_verif_acc(cfg: TrainConfig) -> float:
    """Open-set verification accuracy of the encoder before any training: built with the
    run's seed (as the federated run builds its own when it does not start from a checkpoint),
    evaluated on the same held-out people as the server evaluates every round."""
    from fedface.common.evaluation import evaluate_open_set
    from fedface.common.federated import federation_data
    from fedface.common.models import build_encoder

    torch.manual_seed(cfg.training.seed)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    metrics = evaluate_open_set(encoder, federation_data(cfg).test, cfg.evaluation, device=torch.device("cpu"), with_occlusion=False)
    return float(metrics["verif_acc"])


def _minus(a: float | None, b: float | None) -> float:
    """``a - b``, NaN when either is missing (a real 0.0 stays 0.0)."""
    return math.nan if a is None or b is None else float(a) - float(b)


def _max_site_epsilon(cfg: TrainConfig, history: list[dict[str, Any]]) -> float | None:
    """The largest epsilon any site reported spent; inf for a run without privacy."""
    if not cfg.privacy.enabled:
        return math.inf
    spent = [r["max_epsilon"] for r in history if r.get("max_epsilon") is not None]
    return max(spent) if spent else None


def _round_seconds(history: list[dict[str, Any]]) -> float:
    """Median seconds per round, the first round excluded when there are more (it starts the actors)."""
    secs = [r["seconds"] for r in history]
    return statistics.median(secs[1:] if len(secs) > 2 else secs)


def _paired_seconds(history: list[dict[str, Any]], *, secagg: bool) -> float:
    """Median seconds of the paired run's SecAgg+ (or plain) rounds, round 1 excluded (it starts the actors)."""
    secs = [r["seconds"] for r in history[1:] if r.get("secagg") == secagg]
    return statistics.median(secs) if secs else math.nan


def federated(
    orl: Annotated[Path, typer.Option(help="ORL faces (or any layout fedface reads).")] = Path("../shared/data/orl"),
    scenario: Annotated[Optional[Path], typer.Option("--scenario", "-c", help="Recipe (default: packaged scenarios/federated.toml).")] = None,
    sites: Annotated[Optional[int], typer.Option(help="Sites (default from the scenario: 10).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Rounds (default from the scenario).")] = None,
    epsilon: Annotated[float, typer.Option(help="Each site's (and the central DP model's) epsilon.")] = 8.0,
    scale: Annotated[bool, typer.Option(help="Scale mode: one federated run, identities recurring across sites.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of split, partition and training.")] = 0,
    init_from: Annotated[Optional[Path], typer.Option(help="Start every model (federated and centralized) from this checkpoint's encoder, e.g. public pre-training.")] = None,
    timing: Annotated[bool, typer.Option(help="Also time SecAgg+ against clear rounds (two more federated runs); --no-timing measures accuracy only.")] = True,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Federated (SecAgg+, DP at each site) vs centralized DP and non-private on ORL; or a scale run."""
    import logging

    from fedface.simulations.simulate import run_federated

    setup_logging(verbose, quiet=not verbose)
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.INFO)
    t0 = time.perf_counter()
    with user_errors(), tempfile.TemporaryDirectory(prefix="fedface-bench-fed-") as tmp:
        work = Path(tmp)
        base = TrainConfig.from_toml(scenario) if scenario is not None else scenario_config("federated.toml")
        # (an infinite epsilon is "not private"; None would leave the scenario's epsilon in place)
        over: dict[str, Any] = {"data.root": str(orl), "training.seed": seed, "split.seed": seed, "federation.seed": seed,
                                "privacy.epsilon": epsilon, "training.init-from": str(init_from) if init_from is not None else None}
        if sites is not None:
            over["federation.sites"] = sites
        if rounds is not None:
            over["federation.rounds"] = rounds
        if scale:
            over["federation.recurring"] = True
        if not math.isfinite(epsilon):
            over["site-policy.allow-non-private"] = True  # a non-private benchmark opts in
        cfg = base.with_overrides(over)
        fc = cfg.federation

        def show(tag: str) -> Any:
            def on_round(n: int, row: dict[str, Any]) -> None:
                if row.get("initial"):
                    err_console.print(f"{tag} starting encoder: verification acc {row.get('verif_acc', float('nan')):.3f}")
                    return
                err_console.print(
                    f"{tag} round {n}/{fc.rounds}: {row['answered']}/{row['sampled']} answered, "
                    f"verification acc {row.get('verif_acc', float('nan')):.3f}, {row['seconds']:.1f} s"
                )
            return on_round

        if scale:
            err_console.print(f"scale: {fc.sites} sites x {fc.rounds} rounds, SecAgg+ {'on' if fc.secagg else 'off'}")
            res = run_federated(cfg, out_dir=work / "scale", on_round=show("scale"), ledger_dir=work / "ledgers")
            result: dict[str, Any] = {
                "bench": "federated-scale",
                "sites": fc.sites,
                "rounds": fc.rounds,
                "completed": res.completed,
                "round_s": _round_seconds(res.history) if res.history else None,
                "round_s_all": [r["seconds"] for r in res.history],
                "final_open_verif_acc": res.final.get("verif_acc"),
                "wall_s": time.perf_counter() - t0,
                "peak_rss_mb": peak_rss_mb(),
            }
            print_json(result)
            return
        # One thing at a time, so the seconds per round compare: the federated runs alone, then
        # the two centralized baselines side by side.
        err_console.print(f"federated: {fc.sites} sites x {fc.rounds} rounds, SecAgg+, DP epsilon {epsilon} per site")
        untrained = _untrained_verif_acc(cfg)
        ledgers = work / "ledgers"
        fed = run_federated(cfg, out_dir=work / "secagg", on_round=show("SecAgg+"), ledger_dir=ledgers / "secagg")
        plain = paired = None
        if timing:
            # the baseline without SecAgg+: its sites' policy opts in to clear updates
            clear = cfg.with_overrides({"federation.secagg": False, "site-policy.require-secagg": False})
            plain = run_federated(clear, out_dir=work / "plain", on_round=show("plain"), ledger_dir=ledgers / "plain")
            # the seconds per round, paired: SecAgg+ and plain rounds alternate in one run
            paired = run_federated(
                cfg, out_dir=work / "paired", on_round=show("paired (odd rounds SecAgg+)"), alternate_secagg=True, ledger_dir=ledgers / "paired"
            )
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            central_f = pool.submit(_central, cfg, orl, None, work / "ledger.sqlite")
            central_dp_f = pool.submit(_central, cfg, orl, epsilon if math.isfinite(epsilon) else None, work / "ledger.sqlite")
            central, central_dp = central_f.result(), central_dp_f.result()
    if paired is not None:
        secagg_s, plain_s = _paired_seconds(paired.history, secagg=True), _paired_seconds(paired.history, secagg=False)
    else:
        secagg_s = plain_s = math.nan  # not measured (--no-timing)
    result = {
        "bench": "federated",
        "sites": fc.sites,
        "rounds": fc.rounds,
        "epsilon": epsilon,
        "init_from": str(init_from) if init_from is not None else None,
        # the server's round-0 evaluation: every variant starts from this encoder
        "initial_open_verif_acc": (fed.initial or {}).get("verif_acc"),
        # the same encoder before any training, same split and evaluation: what "learned" means
        "untrained_open_verif_acc": untrained,
        "federated_dp_open_verif_acc": fed.final.get("verif_acc"),
        "federated_dp_open_verif_auc": fed.final.get("verif_auc"),
        "federated_dp_per_round": [r.get("verif_acc") for r in fed.history],
        # never 0 for a run that spent privacy without reporting it: inf when not private,
        # None when no site reported a spend
        "federated_dp_max_site_epsilon": _max_site_epsilon(cfg, fed.history),
        "plain_dp_open_verif_acc": plain.final.get("verif_acc") if plain is not None else None,
        "central_dp_open_verif_acc": central_dp["open_verif_acc"],
        "central_open_verif_acc": central["open_verif_acc"],
        "central_dp_epsilon_spent": central_dp["epsilon_spent"],
        "federated_minus_central_dp": _minus(fed.final.get("verif_acc"), central_dp["open_verif_acc"]),
        "federated_dp_minus_untrained": _minus(fed.final.get("verif_acc"), untrained),
        "central_dp_minus_untrained": central_dp["open_verif_acc"] - untrained,
        # what federated DP fine-tuning adds to the starting (e.g. publicly pre-trained) encoder
        "federated_dp_minus_initial": _minus(fed.final.get("verif_acc"), (fed.initial or {}).get("verif_acc")),
        "secagg_round_s": secagg_s if timing else None,
        "plain_round_s": plain_s if timing else None,
        "secagg_over_plain": secagg_s / plain_s if timing and plain_s else None,
        # the same figures from the two separate runs (one after the other: machine drift and
        # the first run's slower start land on one of them)
        "secagg_run_round_s": _round_seconds(fed.history),
        "plain_run_round_s": _round_seconds(plain.history) if plain is not None else None,
        "completed": fed.completed and all(r.completed for r in (plain, paired) if r is not None),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    err_console.print(
        f"final verification acc: untrained {untrained:.3f}, federated DP {result['federated_dp_open_verif_acc']:.3f}, central DP "
        f"{result['central_dp_open_verif_acc']:.3f}, central {result['central_open_verif_acc']:.3f}"
        + (f"; seconds per round SecAgg+ {secagg_s:.1f} vs plain {plain_s:.1f}" if timing else "")
    )
    print_json(result)


__all__ = ["federated"]
