"""`fedface bench lfw`: public pre-training of the identity encoder on Labeled Faces in the Wild,
measured on people held out of it, next to Eigenfaces on the same pairs.

Trains the packaged recipe (``scenarios/lfw_pretrain.toml``: 2,911 people, fold 0 of 10 of them
held out) into ``--out`` (one run directory per seed; a finished run of the same config and
split there is reused, and the output says so), then verifies the held-out people: 10-fold
accuracy and ROC AUC on their balanced pairs (docs/metrics.md), for the trained encoder and for
Eigenfaces (PCA fitted on the training people's images) plain and whitened, on exactly the same
pairs. The pre-trained encoder, as it is (no fine-tuning), also verifies every person of ORL
and of Extended Yale B (``--orl``, ``--yaleb``: whole photographs read at the recipe's 64x64,
the same evaluation), each next to the same Eigenfaces (fitted on LFW's training people, so
that neither sees the set it is measured on). The figures are medians over the seeds. The
last stdout line is one JSON object.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from fedface.common.data import load_faces
from fedface.common.eigenfaces import Eigenfaces
from fedface.common.metrics import verify
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.bench.runs import parse_seeds, train_or_reuse
from fedface.simulations.centralized import load_config_faces, prepare_task_data
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

#: What ``--quick`` (for tests) shrinks the benchmark to: people kept (in name order), epochs.
QUICK_PEOPLE = 300
QUICK_EPOCHS = 1


def _eigen(models: dict[str, Eigenfaces], test_images: np.ndarray, labels: np.ndarray, n_folds: int) -> dict[str, float]:
    """Plain and whitened Eigenfaces' verification on the pairs of ``labels``' people."""
    out: dict[str, float] = {}
    for name, model in models.items():
        r = verify(model.embed(test_images), labels, n_folds=n_folds, seed=0)
        out[f"{name}_verif_acc"] = float(r.accuracy)
        out[f"{name}_auc"] = float(r.auc)
    return out


def _transfer(cfg: Any, checkpoint: Path, sets: dict[str, Any]) -> dict[str, float]:
    """Open-set verification of a pre-trained encoder, as it is, on every person of other sets."""
    from fedface.common.evaluation import evaluate_open_set
    from fedface.common.models import build_encoder
    from fedface.simulations.centralized import load_encoder_init

    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    load_encoder_init(encoder, cfg.with_overrides({"training.init-from": str(checkpoint)}))  # checks the shape, says which file
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, float] = {}
    for name, faces in sets.items():
        m = evaluate_open_set(encoder.to(device), faces, cfg.evaluation, device=device, with_occlusion=False)
        out[f"{name}_verif_acc"], out[f"{name}_auc"] = float(m["verif_acc"]), float(m["verif_auc"])
    return out


def lfw(
    data: Annotated[Path, typer.Option("--lfw", help="Labeled Faces in the Wild, aligned: <Name>/<Name>_NNNN.jpg.")] = Path("..") / "shared" / "data" / "lfw_dev",
    orl: Annotated[Path, typer.Option(help="ORL faces, verified by the pre-trained encoder as it is.")] = Path("..") / "shared" / "data" / "orl",
    yaleb: Annotated[Path, typer.Option(help="Extended Yale B (cropped), likewise.")] = Path("..") / "shared" / "data" / "extended_yaleb",
    transfer: Annotated[bool, typer.Option(help="Also verify ORL and Extended Yale B with the pre-trained encoder; --no-transfer for LFW only.")] = True,
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated; the figures are medians over them.")] = "1,2,3",
    out: Annotated[Path, typer.Option(help="Directory of the benchmark's run directories; finished runs of the same config there are reused.")] = Path("runs") / "bench-lfw",
    epochs: Annotated[int, typer.Option(help="Training epochs (0: the recipe's).")] = 0,
    quick: Annotated[bool, typer.Option(help=f"A small check of the pipeline (for tests): the first {QUICK_PEOPLE} people, {QUICK_EPOCHS} epoch; not a measurement.")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Pre-train the identity encoder on LFW; verify people held out of it, against Eigenfaces (plain and whitened)."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    with user_errors():
        seed_list = parse_seeds(seeds)
        if threads > 0:
            torch.set_num_threads(threads)
        overrides: dict[str, object] = {"data.root": str(data), "training.threads": threads}
        if quick:
            overrides["training.epochs"] = QUICK_EPOCHS
        elif epochs > 0:
            overrides["training.epochs"] = epochs
        cfg = scenario_config("lfw_pretrain.toml").with_overrides(overrides)
        faces = load_config_faces(cfg)
        if quick:
            faces = faces.subset(np.flatnonzero(faces.labels < QUICK_PEOPLE)).relabel()
        task = prepare_task_data(cfg, faces)
        test = task.test
        genuine = int(sum(c * (c - 1) // 2 for c in np.bincount(test.labels) if c > 1))
        err_console.print(
            f"LFW: {len(faces)} images of {faces.num_identities} people; {task.train.num_identities} people train, "
            f"{len(np.unique(test.labels))} held out ({len(test)} images, {genuine} genuine pairs); seeds {seed_list}; runs in {out}"
        )
        # PCA fitted once on the training people's images, plain and whitened
        models = {name: Eigenfaces(whiten=whiten).fit(task.train.images) for name, whiten in (("eigenfaces", False), ("eigenfaces_whitened", True))}
        eigen = _eigen(models, test.images, test.labels, cfg.evaluation.n_folds)
        # the other sets the pre-trained encoder verifies as it is (output key: data)
        others = {name: load_faces(root, size=cfg.data.image_size) for name, root in (("orl", orl), ("extended_yaleb", yaleb))} if transfer else {}
        if quick:  # a few people of each: a check of the pipeline
            others = {n: f.subset(np.flatnonzero(f.labels < 5)).relabel() for n, f in others.items()}
        for name, faces_other in others.items():
            for key, value in _eigen(models, faces_other.images, faces_other.labels, cfg.evaluation.n_folds).items():
                eigen[f"{name}_{key}"] = value
        reused: list[str] = []
        per_seed: list[dict[str, Any]] = []
        for seed in seed_list:
            run = train_or_reuse(cfg.with_overrides({"training.seed": seed}), out / f"lfw-seed{seed}", faces, reused)
            m = run["metrics"]
            moved = _transfer(cfg, out / f"lfw-seed{seed}" / "checkpoint.pt", others) if others else {}
            per_seed.append(
                {
                    "seed": seed,
                    **moved,
                    "lfw_heldout_verif_acc": m["verif_acc"],
                    "lfw_heldout_auc": m["verif_auc"],
                    "lfw_heldout_tar_far1e-2": m["tar_far1e-2"],
                    "lfw_heldout_occluded_verif_acc": m.get("occluded_verif_acc"),
                    "train_s": run["wall_s"],
                }
            )
            err_console.print(
                f"seed {seed}: held-out verification {m['verif_acc']:.3f} (AUC {m['verif_auc']:.3f}), {run['wall_s'] / 60:.1f} min"
                + "".join(f"; {name} {moved[f'{name}_verif_acc']:.3f} (Eigenfaces {eigen[f'{name}_eigenfaces_verif_acc']:.3f})" for name in others)
            )
    keys = ["lfw_heldout_verif_acc", "lfw_heldout_auc", "train_s"] + [f"{n}_{k}" for n in others for k in ("verif_acc", "auc")]
    medians = {k: float(statistics.median([r[k] for r in per_seed])) for k in keys}
    err_console.print(
        f"median of {len(per_seed)} seed(s): held-out verification {medians['lfw_heldout_verif_acc']:.3f} (AUC {medians['lfw_heldout_auc']:.3f}); "
        f"Eigenfaces {eigen['eigenfaces_verif_acc']:.3f}, whitened {eigen['eigenfaces_whitened_verif_acc']:.3f}"
        + (f"; reused {len(reused)} finished run(s)" if reused else "")
    )
    print_json(
        {
            "bench": "lfw",
            **medians,
            **eigen,
            "heldout_people": int(len(np.unique(test.labels))),
            "heldout_images": len(test),
            "genuine_pairs": genuine,
            "per_seed": per_seed,
            "seeds": seed_list,
            "epochs": cfg.training.epochs,
            "quick": quick,
            "reused": reused,
            "runs": str(out),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


__all__ = ["lfw"]
