"""`fedface bench baseline`: the centralized GRU encoder against Eigenfaces, on real faces.

In one run, on ORL (64x64):

- closed set: 5 training / 5 test images per subject; rank-1 of the test images against the
  training images (the gallery), clean and with a 20x20 box blanked at five places;
- open set: identity-disjoint folds (default 4 folds: train on 30 identities, test on the other
  10, every identity tested once); 10-fold verification accuracy, ROC AUC, TAR@FAR on pairs of
  the held-out identities, averaged over folds;
- expressions on Yale A (subjects held out in 3 folds of 5);

and the same figures for Eigenfaces (PCA + cosine nearest neighbour; PCA + logistic regression
for expressions) on the same splits. The last stdout line is one JSON object.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer

from fedface.common.config import EvaluationConfig, TrainConfig
from fedface.common.data import FaceSet, Split, load_faces, split_closed_set, split_open_set_folds, to_tensor
from fedface.common.data.transforms import occlude, occlusion_boxes
from fedface.common.eigenfaces import Eigenfaces, eigenfaces_expression
from fedface.common.metrics import identify, verify
from fedface.simulations.bench.common import mean, peak_rss_mb, scenario_config
from fedface.simulations.centralized import expression_labels, train_run
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

logger = logging.getLogger(__name__)


def _occluded_arrays(images: np.ndarray, ev: EvaluationConfig) -> list[np.ndarray]:
    x = to_tensor(images)
    boxes = occlusion_boxes(images.shape[1:], ev.occlusion_box, ev.occlusion_placements)
    return [occlude(x, b)[:, 0].numpy() for b in boxes]


def _eigen_closed(train: FaceSet, test: FaceSet, ev: EvaluationConfig) -> dict[str, float]:
    model = Eigenfaces().fit(train.images)
    g = model.embed(train.images)
    out = identify(g, train.labels, model.embed(test.images), test.labels)
    occ = [identify(g, train.labels, model.embed(v), test.labels)["rank1"] for v in _occluded_arrays(test.images, ev)]
    return {"closed_rank1": out["rank1"], "closed_rank5": out["rank5"], "occluded_rank1": mean(occ)}


def _eigen_open(train: FaceSet, test: FaceSet, ev: EvaluationConfig) -> dict[str, float]:
    model = Eigenfaces().fit(train.images)
    emb = model.embed(test.images)
    r = verify(emb, test.labels, n_folds=ev.n_folds).to_dict()
    occ = [verify(emb, test.labels, probe_embeddings=model.embed(v), n_folds=ev.n_folds).accuracy for v in _occluded_arrays(test.images, ev)]
    return {
        "open_verif_acc": float(r["accuracy"]),
        "open_verif_auc": float(r["auc"]),
        "open_eer": float(r["eer"]),
        "open_tar_far1e-2": float(r["tar_far1e-2"]),
        "open_tar_far1e-3": float(r["tar_far1e-3"]),
        "occluded_open_verif_acc": mean(occ),
    }


def _closed_job(cfg: TrainConfig, orl: FaceSet) -> dict[str, Any]:
    c = cfg.with_overrides({"split.kind": "closed-set", "split.train-per-identity": 5})
    split = split_closed_set(orl, train_per_identity=5, seed=c.split.seed)
    run = train_run(c, faces=orl, split=split)
    gru = {
        "closed_rank1": run.metrics["rank1"],
        "closed_rank5": run.metrics["rank5"],
        "occluded_rank1": run.metrics["occluded_rank1"],
        "closed_train_s": run.wall_s,
    }
    return {"gru": gru, "eigenfaces": _eigen_closed(orl.subset(split.train), orl.subset(split.test), c.evaluation)}


def _open_job(cfg: TrainConfig, orl: FaceSet, split: Split) -> dict[str, Any]:
    run = train_run(cfg, faces=orl, split=split)
    m = run.metrics
    gru = {
        "open_verif_acc": m["verif_acc"],
        "open_verif_auc": m["verif_auc"],
        "open_eer": m["verif_eer"],
        "open_tar_far1e-2": m["tar_far1e-2"],
        "open_tar_far1e-3": m["tar_far1e-3"],
        "open_rank1": m["rank1"],
        "occluded_open_verif_acc": m["occluded_verif_acc"],
        "open_train_s": run.wall_s,
    }
    eig = _eigen_open(orl.subset(split.train), orl.subset(split.test), cfg.evaluation)
    return {"fold": int(split.params["fold"]), "test_identities": int(split.params["test_identities"]), "gru": gru, "eigenfaces": eig}


def _expression_job(cfg: TrainConfig, yale: FaceSet, split: Split) -> dict[str, Any]:
    faces, labels = expression_labels(yale)
    run = train_run(cfg, faces=yale, split=split)
    pred = eigenfaces_expression(faces.images[split.train], labels[split.train], faces.images[split.test])
    return {
        "gru": {"expression_acc": run.metrics["expression_acc"], "occluded_expression_acc": run.metrics["occluded_expression_acc"]},
        "eigenfaces": {"expression_acc": float(np.mean(pred == labels[split.test]))},
    }


_JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "closed": _closed_job,
    "open": _open_job,
    "expression": _expression_job,
}


def _run_job(kind: str, threads: int, *args: Any) -> tuple[str, dict[str, Any]]:
    """One training job; top-level so that worker processes can run it."""
    if threads > 0:
        torch.set_num_threads(threads)
    return kind, _JOBS[kind](*args)


def _run_all(jobs: list[tuple[Any, ...]], workers: int, threads: int) -> list[tuple[str, dict[str, Any]]]:
    """Run the jobs inline (workers == 1) or in that many spawned processes, in job order."""
    if workers <= 1:
        return [_run_job(kind, threads, *args) for kind, *args in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_job, kind, threads, *args) for kind, *args in jobs]
        return [f.result() for f in futures]


def _mean_of(rows: list[dict[str, Any]], side: str) -> dict[str, float]:
    return {key: mean([r[side][key] for r in rows]) for key in rows[0][side]}


def _default_data(name: str) -> Path:
    return Path("..") / "shared" / "data" / name


def baseline(
    orl: Annotated[Path, typer.Option(help="ORL/AT&T faces (sN/M.pgm) or any layout fedface reads.")] = _default_data("orl"),
    yale: Annotated[Path, typer.Option(help="Yale A faces (expression labels).")] = _default_data("yalefaces"),
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Model/training config of the ORL runs (default: the packaged scenarios/baseline.toml).")] = None,
    expression_config: Annotated[Optional[Path], typer.Option(help="Config of the Yale A expression runs (default: the packaged scenarios/yale_expression.toml).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs per model (default from the config).")] = None,
    folds: Annotated[int, typer.Option(help="Identity folds of the open-set benchmark (4 on ORL: 30 train / 10 test identities each).")] = 4,
    expression_folds: Annotated[int, typer.Option(help="Subject folds of the Yale A expression benchmark.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of splits and training.")] = 0,
    jobs_n: Annotated[int, typer.Option("--jobs", "-j", help="Training jobs run at once, each in its own process (default: the CPU count; 1 runs all in this process).")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch in each job (0: 1 thread per job when jobs run in parallel, torch's default otherwise).")] = 0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Centralized GRU encoder vs Eigenfaces on ORL (closed set, open set, occlusion) and Yale A expressions."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    if jobs_n <= 0:
        jobs_n = os.cpu_count() or 1
    if threads <= 0 and jobs_n > 1:
        threads = 1
    with user_errors():
        cfg = TrainConfig.from_toml(config) if config is not None else scenario_config("baseline.toml")
        cfg = cfg.with_overrides(
            {"training.epochs": epochs, "training.seed": seed, "split.seed": seed, "training.threads": threads}
        )
        expr_cfg = (
            TrainConfig.from_toml(expression_config) if expression_config is not None else scenario_config("yale_expression.toml")
        )
        expr_cfg = expr_cfg.with_overrides(
            {"training.epochs": epochs, "training.seed": seed, "split.seed": seed, "training.threads": threads}
        )
        if threads > 0:
            torch.set_num_threads(threads)
        size = cfg.data.image_size
        orl_faces = load_faces(orl, size=size)
        yale_faces = load_faces(yale, size=size)
        err_console.print(f"ORL: {len(orl_faces)} images of {orl_faces.num_identities} identities; training {cfg.training.epochs} epochs per model")
        jobs: list[tuple[Any, ...]] = [("closed", cfg, orl_faces)]
        jobs += [("open", cfg, orl_faces, split) for split in split_open_set_folds(orl_faces, folds=folds, seed=seed)]
        expr_faces, _ = expression_labels(yale_faces)
        jobs += [
            ("expression", expr_cfg, yale_faces, split)
            for split in split_open_set_folds(expr_faces, folds=expression_folds, seed=seed)
        ]
        workers = max(1, min(jobs_n, len(jobs)))
        err_console.print(f"{len(jobs)} training jobs in {workers} process(es)")
        done = _run_all(jobs, workers, threads)
    closed = [r for kind, r in done if kind == "closed"][0]
    open_rows = [r for kind, r in done if kind == "open"]
    expr_rows = [r for kind, r in done if kind == "expression"]
    closed_gru, closed_eig = closed["gru"], closed["eigenfaces"]
    open_gru, open_eig = _mean_of(open_rows, "gru"), _mean_of(open_rows, "eigenfaces")
    expr_gru, expr_eig = _mean_of(expr_rows, "gru"), _mean_of(expr_rows, "eigenfaces")
    err_console.print(
        f"closed set: GRU rank-1 {closed_gru['closed_rank1']:.3f} (occluded {closed_gru['occluded_rank1']:.3f}); "
        f"Eigenfaces {closed_eig['closed_rank1']:.3f} ({closed_eig['occluded_rank1']:.3f})"
    )
    for r in open_rows:
        err_console.print(
            f"open set, fold {r['fold'] + 1}/{len(open_rows)}: GRU verification acc {r['gru']['open_verif_acc']:.3f} "
            f"AUC {r['gru']['open_verif_auc']:.3f}; Eigenfaces {r['eigenfaces']['open_verif_acc']:.3f} / "
            f"{r['eigenfaces']['open_verif_auc']:.3f}"
        )
    err_console.print(
        f"open set, mean of {len(open_rows)} folds: GRU {open_gru['open_verif_acc']:.3f} / {open_gru['open_verif_auc']:.3f}; "
        f"Eigenfaces {open_eig['open_verif_acc']:.3f} / {open_eig['open_verif_auc']:.3f}"
    )
    err_console.print(
        f"expressions (Yale A, subjects held out): GRU {expr_gru['expression_acc']:.3f}; Eigenfaces + LR {expr_eig['expression_acc']:.3f}"
    )
    result: dict[str, Any] = {
        "bench": "baseline",
        **closed_gru,
        **open_gru,
        **expr_gru,
        "eigenfaces": {**closed_eig, **open_eig, **expr_eig},
        "open_folds": open_rows,
        "epochs": cfg.training.epochs,
        "expression_epochs": expr_cfg.training.epochs,
        "seed": seed,
        "device": "cuda" if torch.cuda.is_available() and cfg.training.device != "cpu" else "cpu",
        "workers": workers,
        "torch_threads": threads if threads > 0 else torch.get_num_threads(),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    print_json(result)
