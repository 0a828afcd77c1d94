"""`fedface bench expression`: facial-expression recognition on FER2013, CK+ and JAFFE, next to
Eigenfaces + logistic regression on the same splits.

In one run, for each seed:

- FER2013: the packaged recipe (``scenarios/fer2013_expression.toml``) trained on FER2013's
  training images less its fixed validation part (fold 0 of 10: 2,884 images), evaluated on
  that part: accuracy, macro-F1, per-class recall, and the training's wall time;
- CK+: ten subject folds, each fine-tuned from that seed's FER2013 checkpoint
  (``scenarios/ckplus_expression.toml``); accuracy over all images, each tested once, by a
  model that never saw its subject;
- JAFFE: leave one subject out (``scenarios/jaffe_expression.toml``, ten folds), likewise;
- private FER2013 (unless ``--no-federated``): public pre-training on CK+
  (``scenarios/ckplus_public.toml``), then from it federated DP-SGD over 10 sites with SecAgg+
  (``scenarios/fer2013_federated.toml``, epsilon 8 per site) and the same recipe centralized
  with DP-SGD at the same epsilon, both evaluated on the same validation part as the
  non-private recipe (``central_fer2013_val_acc``).

The figures are medians over the seeds. Eigenfaces + logistic regression (PCA keeping 95 % of
the variance, then a multinomial logistic regression) is trained and tested on exactly the
same splits. The last stdout line is one JSON object.

Every model is trained into ``--out`` (one run directory per seed and fold). A run directory
that already holds a finished run of the same config is **reused** (evaluated from its
metrics, not retrained) and the output says so (``reused``): a full run trains three FER2013
models of about an hour each on a 2-core CPU, so it may be resumed, or the FER2013 recipe run
once with `fedface train` and the benchmark pointed at it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet, split_open_set_folds
from fedface.common.eigenfaces import eigenfaces_expression
from fedface.common.errors import FedFaceError
from fedface.common.evaluation import expression_scores
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.bench.runs import federated_or_reuse, parse_seeds, train_or_reuse
from fedface.simulations.centralized import expression_classes, expression_labels, load_config_faces
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

logger = logging.getLogger(__name__)

#: What ``--quick`` (for tests) shrinks the benchmark to: FER2013 images per class, epochs,
#: folds run of the ten, and the federation's sites and rounds.
QUICK_FER_PER_CLASS = 40
QUICK_EPOCHS = 1
QUICK_FOLDS = 2
QUICK_SITES = 3  # the fewest a site's default policy lets SecAgg+ sum its update with
QUICK_ROUNDS = 1


def _default_data(name: str) -> Path:
    return Path("..") / "shared" / "data" / name


def _pooled(folds: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy and macro-F1 over every fold's test images together (each image tested once)."""
    labels = np.concatenate([f["labels"] for f in folds])
    pred = np.concatenate([f["pred"] for f in folds])
    scores = expression_scores(labels, pred, list(folds[0]["classes"]))
    return {"acc": scores["expression_acc"], "macro_f1": scores["expression_macro_f1"]}


def _fold_predictions(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted classes of a run's test images, from its confusion counts."""
    counts = np.asarray(json.loads((run_dir / "confusion.json").read_text(encoding="utf-8"))["counts"])
    labels, pred = [], []
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            labels += [i] * int(n)
            pred += [j] * int(n)
    return np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)


def _eigen(faces: FaceSet, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    pred = eigenfaces_expression(faces.images[train], labels[train], faces.images[test])
    return {"labels": labels[test], "pred": np.asarray(pred, dtype=np.int64), "classes": expression_classes(faces)}


def _fold_set(name: str, cfg: TrainConfig, faces: FaceSet, out: Path, init: Path, folds: int, reused: list[str]) -> dict[str, Any]:
    """All subject folds of one fine-tuned data set; pooled accuracy, GRU and Eigenfaces."""
    expr_faces, labels = expression_labels(faces, expression_classes(faces))
    splits = split_open_set_folds(expr_faces, folds=cfg.split.folds, seed=cfg.split.seed)[:folds]
    gru, eig = [], []
    for split in splits:
        k = int(split.params["fold"])
        fold_cfg = cfg.with_overrides({"split.fold": k, "training.init-from": str(init)})
        run_dir = out / f"fold{k}"
        train_or_reuse(fold_cfg, run_dir, faces, reused)
        y, pred = _fold_predictions(run_dir)
        gru.append({"labels": y, "pred": pred, "classes": expression_classes(faces)})
        eig.append(_eigen(expr_faces, labels, split.train, split.test))
    g, e = _pooled(gru), _pooled(eig)
    err_console.print(f"{name}: {len(splits)} subject folds, GRU accuracy {g['acc']:.3f} (macro-F1 {g['macro_f1']:.3f}); Eigenfaces + LR {e['acc']:.3f}")
    return {"gru": g, "eigenfaces": e, "folds": len(splits)}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def expression(
    fer: Annotated[Path, typer.Option(help="FER2013's training images (<emotion>/<image>).")] = _default_data("fer2013") / "train",
    ckplus: Annotated[Path, typer.Option(help="CK+ 48x48 crops (<emotion>/S###_###_########.png).")] = _default_data("ckplus48"),
    jaffe: Annotated[Path, typer.Option(help="JAFFE (KA.AN1.39.tiff ...).")] = _default_data("jaffe"),
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated; the figures are medians over them.")] = "1,2,3",
    out: Annotated[Path, typer.Option(help="Directory of the benchmark's run directories; finished runs of the same config there are reused.")] = Path("runs") / "bench-expression",
    federated: Annotated[bool, typer.Option(help="Also private FER2013: federated DP (10 sites, SecAgg+, epsilon 8 each) and centralized DP, both from public pre-training on CK+.")] = True,
    quick: Annotated[bool, typer.Option(help=f"A small check of the pipeline (for tests): {QUICK_FER_PER_CLASS} FER2013 images per class, {QUICK_EPOCHS} epoch, {QUICK_FOLDS} folds of CK+ and JAFFE, {QUICK_SITES} sites x {QUICK_ROUNDS} round; not a measurement.")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Expression recognition on FER2013, CK+ (10 subject folds) and JAFFE (leave one subject out), against Eigenfaces + LR."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    with user_errors():
        seed_list = parse_seeds(seeds)
        if threads > 0:
            torch.set_num_threads(threads)
        overrides: dict[str, object] = {"training.threads": threads}
        if quick:
            overrides["training.epochs"] = QUICK_EPOCHS
            fer = _quick_subset(fer, out / "quick-fer2013", QUICK_FER_PER_CLASS)
        fer_cfg = scenario_config("fer2013_expression.toml").with_overrides({**overrides, "data.root": str(fer)})
        ck_cfg = scenario_config("ckplus_expression.toml").with_overrides({**overrides, "data.root": str(ckplus)})
        ja_cfg = scenario_config("jaffe_expression.toml").with_overrides({**overrides, "data.root": str(jaffe)})
        pub_cfg = scenario_config("ckplus_public.toml").with_overrides({**overrides, "data.root": str(ckplus)})
        fed_over: dict[str, object] = {**overrides, "data.root": str(fer)}
        if quick:
            fed_over.update({"federation.sites": QUICK_SITES, "federation.rounds": QUICK_ROUNDS})
        fed_cfg = scenario_config("fer2013_federated.toml").with_overrides(fed_over)
        fer_faces = load_config_faces(fer_cfg)
        expression_labels(fer_faces, expression_classes(fer_faces))  # not expression data: one clear error
        ck_faces, ja_faces = load_config_faces(ck_cfg), load_config_faces(ja_cfg)
        folds = QUICK_FOLDS if quick else ck_cfg.split.folds
        err_console.print(
            f"FER2013 {len(fer_faces)} images, CK+ {len(ck_faces)} ({ck_faces.num_identities} subjects), "
            f"JAFFE {len(ja_faces)} ({ja_faces.num_identities} subjects); seeds {seed_list}; runs in {out}"
        )
        reused: list[str] = []
        per_seed: list[dict[str, Any]] = []
        for seed in seed_list:
            cfg = fer_cfg.with_overrides({"training.seed": seed})
            fer_dir = out / f"fer2013-seed{seed}"
            fer_run = train_or_reuse(cfg, fer_dir, fer_faces, reused)
            m = fer_run["metrics"]
            err_console.print(
                f"seed {seed}: FER2013 validation accuracy {m['expression_acc']:.3f}, macro-F1 {m['expression_macro_f1']:.3f} "
                f"({fer_run['wall_s'] / 60:.1f} min)"
            )
            init = fer_dir / "checkpoint.pt"
            ck = _fold_set("CK+", ck_cfg.with_overrides({"training.seed": seed}), ck_faces, out / f"ckplus-seed{seed}", init, folds, reused)
            ja = _fold_set("JAFFE", ja_cfg.with_overrides({"training.seed": seed}), ja_faces, out / f"jaffe-seed{seed}", init, folds, reused)
            private = _private_fer(pub_cfg, fed_cfg, seed, ck_faces, fer_faces, out, reused) if federated else {}
            per_seed.append(
                {
                    "seed": seed,
                    "fer2013_val_acc": m["expression_acc"],
                    "fer2013_val_macro_f1": m["expression_macro_f1"],
                    "fer2013_recall": {k.removeprefix("recall_"): v for k, v in m.items() if k.startswith("recall_")},
                    "fer2013_train_s": fer_run["wall_s"],
                    "ckplus_10fold_acc": ck["gru"]["acc"],
                    "ckplus_10fold_macro_f1": ck["gru"]["macro_f1"],
                    "jaffe_loso_acc": ja["gru"]["acc"],
                    "jaffe_loso_macro_f1": ja["gru"]["macro_f1"],
                    "eigenfaces": {"ckplus_10fold_acc": ck["eigenfaces"]["acc"], "jaffe_loso_acc": ja["eigenfaces"]["acc"]},
                    # the non-private recipe is the centralized baseline of the private runs
                    **(
                        {"central_fer2013_val_acc": m["expression_acc"], "fed_dp_minus_central": private["fed_dp_fer2013_val_acc"] - m["expression_acc"], **private}
                        if federated
                        else {}
                    ),
                }
            )
        fer_expr, fer_labels = expression_labels(fer_faces, expression_classes(fer_faces))
        fer_split = split_open_set_folds(fer_expr, folds=fer_cfg.split.folds, seed=fer_cfg.split.seed)[fer_cfg.split.fold]
        fer_eig = _pooled([_eigen(fer_expr, fer_labels, fer_split.train, fer_split.test)])
    keys = ["fer2013_val_acc", "fer2013_val_macro_f1", "fer2013_train_s", "ckplus_10fold_acc", "ckplus_10fold_macro_f1", "jaffe_loso_acc", "jaffe_loso_macro_f1"]
    if federated:
        keys += list(PRIVATE_KEYS)
    medians = {k: _median([r[k] for r in per_seed]) for k in keys}
    if federated:
        # privacy spent: the largest over the seeds, never a median
        medians.update({k: max(r[k] for r in per_seed) for k in ("fed_dp_max_site_epsilon", "central_dp_epsilon_spent")})
    eigen = {
        "fer2013_val_acc": fer_eig["acc"],
        "fer2013_val_macro_f1": fer_eig["macro_f1"],
        "ckplus_10fold_acc": per_seed[0]["eigenfaces"]["ckplus_10fold_acc"],
        "jaffe_loso_acc": per_seed[0]["eigenfaces"]["jaffe_loso_acc"],
    }
    err_console.print(
        f"median of {len(per_seed)} seed(s): FER2013 {medians['fer2013_val_acc']:.3f} (Eigenfaces + LR {eigen['fer2013_val_acc']:.3f}), "
        f"CK+ {medians['ckplus_10fold_acc']:.3f} ({eigen['ckplus_10fold_acc']:.3f}), JAFFE {medians['jaffe_loso_acc']:.3f} ({eigen['jaffe_loso_acc']:.3f})"
        + (
            f"; private: federated DP {medians['fed_dp_fer2013_val_acc']:.3f}, central DP {medians['central_dp_fer2013_val_acc']:.3f}, "
            f"from CK+ pre-training alone {medians['public_init_fer2013_val_acc']:.3f}"
            if federated
            else ""
        )
        + (f"; reused {len(reused)} finished run(s)" if reused else "")
    )
    print_json(
        {
            "bench": "expression",
            **medians,
            "eigenfaces": eigen,
            "per_seed": per_seed,
            "seeds": seed_list,
            "federated": federated,
            "quick": quick,
            "folds": folds,
            "reused": reused,
            "runs": str(out),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def _quick_subset(root: Path, into: Path, n: int) -> Path:
    """A folder of links to the first ``n`` images (by name) of each of ``root``'s expression
    folders, for ``--quick``: a small data set that the sites of a federation can load by path
    like any other (nothing is copied)."""
    from fedface.common.data.files import is_image_name, natural_key
    from fedface.common.errors import DataNotFoundError

    if not root.is_dir():
        raise DataNotFoundError(f"FER2013 images not found at {root}: pass --fer with a folder of <emotion>/<image> files")
    if into.exists():
        shutil.rmtree(into)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted((p for p in folder.iterdir() if is_image_name(p.name)), key=lambda p: natural_key(p.name))[:n]
        (into / folder.name).mkdir(parents=True)
        for image in images:
            (into / folder.name / image.name).symlink_to(image.resolve())
    return into


def _central_spent(run_dir: Path) -> float:
    """The epsilon a finished centralized DP run spent (from its metrics.json)."""
    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return float(summary["privacy"]["epsilon"])


#: The private figures of one seed (medians over the seeds in the output).
PRIVATE_KEYS = (
    "fed_dp_fer2013_val_acc",
    "fed_dp_fer2013_val_macro_f1",
    "central_dp_fer2013_val_acc",
    "central_dp_fer2013_val_macro_f1",
    "public_init_fer2013_val_acc",
    "central_fer2013_val_acc",
    "fed_dp_minus_central",
    "fed_dp_wall_s",
    "central_dp_train_s",
)


def _private_fer(
    pub_cfg: TrainConfig, fed_cfg: TrainConfig, seed: int, ck_faces: FaceSet, fer_faces: FaceSet, out: Path, reused: list[str]
) -> dict[str, Any]:
    """Public pre-training on CK+, then federated and centralized DP on FER2013 from it."""
    pub_dir = out / f"public-ckplus-seed{seed}"
    train_or_reuse(pub_cfg.with_overrides({"training.seed": seed}), pub_dir, ck_faces, reused)
    init = pub_dir / "checkpoint.pt"
    cfg = fed_cfg.with_overrides({"training.seed": seed, "federation.seed": seed, "training.init-from": str(init)})
    rounds = cfg.federation.rounds

    def on_round(n: int, row: dict[str, Any]) -> None:
        if not row.get("initial"):
            err_console.print(f"seed {seed}: federated DP round {n}/{rounds}: expression acc {row.get('expression_acc', float('nan')):.3f}, {row['seconds']:.0f} s")

    fed = federated_or_reuse(cfg, out / f"fer2013-fed-dp-seed{seed}", reused, on_round=on_round)
    if not fed["completed"]:
        from fedface.server.app import reason_counts

        why = "; ".join(f"{reason} ({n} site-rounds)" for reason, n in reason_counts(fed["history"]).items()) or fed.get("error") or "no reason recorded"
        raise FedFaceError(f"the federated DP run of seed {seed} did not complete ({out / f'fer2013-fed-dp-seed{seed}'}): {why}")
    central_dir = out / f"fer2013-central-dp-seed{seed}"
    # its own ledger in its run directory: a benchmark never spends the user's budgets
    dp_cfg = cfg.with_overrides({"privacy.ledger": str(central_dir / "ledger.sqlite"), "privacy.dataset": f"bench-central-dp-seed{seed}"})
    central = train_or_reuse(dp_cfg, central_dir, fer_faces, reused)
    spent = [r["max_epsilon"] for r in fed["history"] if r.get("max_epsilon") is not None]
    fed_acc = float(fed["final"]["expression_acc"])
    start = (fed.get("initial") or {}).get("expression_acc")  # the server's round-0 evaluation
    start_acc = float(start) if start is not None else math.nan
    err_console.print(
        f"seed {seed}: private FER2013 from CK+ pre-training ({start_acc:.3f}): "
        f"federated DP {fed_acc:.3f}, central DP {central['metrics']['expression_acc']:.3f}"
    )
    return {
        "fed_dp_fer2013_val_acc": fed_acc,
        "fed_dp_fer2013_val_macro_f1": float(fed["final"]["expression_macro_f1"]),
        "fed_dp_per_round": [r.get("expression_acc") for r in fed["history"]],
        # never 0 for a run that spent privacy without reporting it: inf when no site reported
        "fed_dp_max_site_epsilon": max(spent) if spent else math.inf,
        "fed_dp_wall_s": float(fed["wall_s"]),
        "public_init_fer2013_val_acc": start_acc,
        "central_dp_fer2013_val_acc": float(central["metrics"]["expression_acc"]),
        "central_dp_fer2013_val_macro_f1": float(central["metrics"]["expression_macro_f1"]),
        "central_dp_epsilon_spent": _central_spent(central_dir),
        "central_dp_train_s": central["wall_s"],
    }


__all__ = ["expression"]
