"""`fedface bench expression`: facial-expression recognition on FER2013, CK+ and JAFFE, next to
Eigenfaces + logistic regression on the same splits.

In one run, for each seed:

- FER2013: the packaged recipe (``scenarios/fer2013_expression.toml``) trained on FER2013's
  training images less its fixed validation part (fold 0 of 10: 2,884 images), evaluated on
  that part: accuracy, macro-F1, per-class recall, and the training's wall time;
- CK+: ten subject folds, each fine-tuned from that seed's FER2013 checkpoint
  (``scenarios/ckplus_expression.toml``); accuracy over all images, each tested once, by a
  model that never saw its subject;
- JAFFE: leave one subject out (``scenarios/jaffe_expression.toml``, ten folds), likewise.

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
from fedface.common.evaluation import expression_scores
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.bench.runs import parse_seeds, train_or_reuse
from fedface.simulations.centralized import expression_classes, expression_labels, load_config_faces
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

logger = logging.getLogger(__name__)

#: What ``--quick`` (for tests) shrinks the benchmark to: FER2013 images per class, epochs,
#: and folds run of the ten.
QUICK_FER_PER_CLASS = 40
QUICK_EPOCHS = 1
QUICK_FOLDS = 2


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
    quick: Annotated[bool, typer.Option(help=f"A small check of the pipeline (for tests): {QUICK_FER_PER_CLASS} FER2013 images per class, {QUICK_EPOCHS} epoch, {QUICK_FOLDS} folds of CK+ and JAFFE; not a measurement.")] = False,
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
        fer_cfg = scenario_config("fer2013_expression.toml").with_overrides({**overrides, "data.root": str(fer)})
        ck_cfg = scenario_config("ckplus_expression.toml").with_overrides({**overrides, "data.root": str(ckplus)})
        ja_cfg = scenario_config("jaffe_expression.toml").with_overrides({**overrides, "data.root": str(jaffe)})
        fer_faces = load_config_faces(fer_cfg)
        expression_labels(fer_faces, expression_classes(fer_faces))  # not expression data: one clear error
        if quick:
            keep = _per_class(fer_faces, QUICK_FER_PER_CLASS)
            fer_faces = fer_faces.subset(keep).relabel()
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
                }
            )
        fer_expr, fer_labels = expression_labels(fer_faces, expression_classes(fer_faces))
        fer_split = split_open_set_folds(fer_expr, folds=fer_cfg.split.folds, seed=fer_cfg.split.seed)[fer_cfg.split.fold]
        fer_eig = _pooled([_eigen(fer_expr, fer_labels, fer_split.train, fer_split.test)])
    keys = ("fer2013_val_acc", "fer2013_val_macro_f1", "fer2013_train_s", "ckplus_10fold_acc", "ckplus_10fold_macro_f1", "jaffe_loso_acc", "jaffe_loso_macro_f1")
    medians = {k: _median([r[k] for r in per_seed]) for k in keys}
    eigen = {
        "fer2013_val_acc": fer_eig["acc"],
        "fer2013_val_macro_f1": fer_eig["macro_f1"],
        "ckplus_10fold_acc": per_seed[0]["eigenfaces"]["ckplus_10fold_acc"],
        "jaffe_loso_acc": per_seed[0]["eigenfaces"]["jaffe_loso_acc"],
    }
    err_console.print(
        f"median of {len(per_seed)} seed(s): FER2013 {medians['fer2013_val_acc']:.3f} (Eigenfaces + LR {eigen['fer2013_val_acc']:.3f}), "
        f"CK+ {medians['ckplus_10fold_acc']:.3f} ({eigen['ckplus_10fold_acc']:.3f}), JAFFE {medians['jaffe_loso_acc']:.3f} ({eigen['jaffe_loso_acc']:.3f})"
        + (f"; reused {len(reused)} finished run(s)" if reused else "")
    )
    print_json(
        {
            "bench": "expression",
            **medians,
            "eigenfaces": eigen,
            "per_seed": per_seed,
            "seeds": seed_list,
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


def _per_class(faces: FaceSet, n: int) -> np.ndarray:
    """The first ``n`` images of each expression, in load order (a quick, deterministic subset)."""
    values = np.asarray(faces.attributes["expression"])
    return np.concatenate([np.flatnonzero(values == c)[:n] for c in np.unique(values)])


__all__ = ["expression"]
