"""`fedface bench privacy`: what privacy costs in recognition, from scratch and after public pre-training.

In one run:

1. **public pre-training**: the encoder is trained non-privately on a public face set
   (default Extended Yale B: other people than ORL's), as DP fine-tuning is done in practice;
   its own figures on ORL are reported under ``pretrained_only``;
2. for each epsilon of ``--epsilons`` (default 1, 2, 4, 8, inf) and each start (``scratch``:
   random initialisation; ``pretrained``: the public encoder), one DP-SGD training on ORL with
   the same recipe for each protocol:

   - open set: train on 30 identities, 10-fold verification accuracy on pairs of the other 10;
   - closed set: 5 training / 5 test images per identity, rank-1.

   ``inf`` is the same recipe without privacy. Every private training is calibrated once for
   its whole run and charged to a ledger of this benchmark's own (a temporary file), each
   (row, protocol) as its own data set, so rows do not compose with each other.

The recipes are the packaged scenarios ``privacy_recipe.toml`` and ``public_pretrain.toml``
(or ``--recipe`` and ``--pretrain-config``). The last stdout line is one JSON object
with ``rows`` (``eps``, ``init``, ``open_verif_acc``, ``closed_rank1``, ...) and
``pretrained_only``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from fedface.common.checkpoint import load_checkpoint
from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet, Split, load_faces, split_closed_set, split_open_set
from fedface.common.evaluation import evaluate_closed_set, evaluate_open_set
from fedface.common.models import build_encoder
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.centralized import train_run
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors


def _parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers or inf, got {text!r}", param_hint="--epsilons") from None
    if not values or any(not v > 0 for v in values):
        raise typer.BadParameter(f"every epsilon must be > 0 (or inf), got {text!r}", param_hint="--epsilons")
    return values


def _private(cfg: TrainConfig, eps: float, ledger: Path, dataset: str) -> TrainConfig:
    if math.isinf(eps):
        return cfg.with_overrides({"privacy.epsilon": None, "privacy.noise-multiplier": None})
    return cfg.with_overrides({"privacy.epsilon": eps, "privacy.ledger": str(ledger), "privacy.dataset": dataset})


def _train_job(kind: str, cfg: TrainConfig, faces: FaceSet, split: Split, threads: int) -> dict[str, Any]:
    """One training (top-level: runs in a worker process)."""
    if threads > 0:
        torch.set_num_threads(threads)
    run = train_run(cfg, faces=faces, split=split)
    m = run.metrics
    out: dict[str, Any] = {"train_s": run.wall_s}
    if kind == "open":
        out.update({"open_verif_acc": m["verif_acc"], "open_verif_auc": m["verif_auc"], "open_tar_far1e-2": m["tar_far1e-2"]})
    else:
        out.update({"closed_rank1": m["rank1"]})
    if run.privacy is not None:
        out.update({"epsilon_spent": run.privacy["epsilon"], "noise_multiplier": run.privacy["noise_multiplier"],
                    "sample_rate": run.privacy["sample_rate"], "steps": run.privacy["steps"]})
    return out


def _pretrain_job(cfg: TrainConfig, out_dir: Path, threads: int) -> dict[str, Any]:
    if threads > 0:
        torch.set_num_threads(threads)
    run = train_run(cfg, out_dir=out_dir, overwrite=True)
    return {"public_rank1": run.metrics.get("rank1", float("nan")), "train_s": run.wall_s}


def _pretrained_figures(ckpt: Path, orl: FaceSet, open_split: Split, closed_split: Split, cfg: TrainConfig) -> dict[str, float]:
    c = load_checkpoint(ckpt)
    encoder = build_encoder(c.config.model, image_size=c.config.data.image_size)
    encoder.load_state_dict(c.encoder_state)
    cpu = torch.device("cpu")
    o = evaluate_open_set(encoder, orl.subset(open_split.test), cfg.evaluation, device=cpu, with_occlusion=False)
    k = evaluate_closed_set(encoder, orl.subset(closed_split.train), orl.subset(closed_split.test), cfg.evaluation, device=cpu, with_occlusion=False)
    return {"open_verif_acc": o["verif_acc"], "open_verif_auc": o["verif_auc"], "open_tar_far1e-2": o["tar_far1e-2"], "closed_rank1": k["rank1"]}


def _default_data(name: str) -> Path:
    return Path("..") / "shared" / "data" / name


def privacy(
    orl: Annotated[Path, typer.Option(help="Private faces: ORL/AT&T (sN/M.pgm) or any layout fedface reads.")] = _default_data("orl"),
    public: Annotated[Path, typer.Option(help="Public faces for pre-training (default Extended Yale B).")] = _default_data("extended_yaleb"),
    epsilons: Annotated[str, typer.Option(help="Comma-separated epsilons; inf is the same recipe without privacy.")] = "1,2,4,8,inf",
    recipe: Annotated[Optional[Path], typer.Option(help="Training recipe of every row, from scratch and fine-tuning (default: packaged scenarios/privacy_recipe.toml).")] = None,
    pretrain_config: Annotated[Optional[Path], typer.Option(help="Public pre-training recipe (default: packaged scenarios/public_pretrain.toml).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of splits, training and noise.")] = 0,
    jobs_n: Annotated[int, typer.Option("--jobs", "-j", help="Trainings run at once, each in its own process (default: the CPU count).")] = 0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Open-set verification and closed-set rank-1 on ORL at each epsilon, from scratch and after public pre-training."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    eps_list = _parse_epsilons(epsilons)
    workers = jobs_n if jobs_n > 0 else (os.cpu_count() or 1)
    threads = 1 if workers > 1 else 0
    with user_errors(), tempfile.TemporaryDirectory(prefix="fedface-bench-privacy-") as tmp:
        work = Path(tmp)
        ledger = work / "ledger.sqlite"
        overrides = {"training.seed": seed, "split.seed": seed, "training.threads": threads, "training.eval-every": 10_000}
        scratch = (TrainConfig.from_toml(recipe) if recipe else scenario_config("privacy_recipe.toml")).with_overrides(overrides)
        finetune = scratch
        pre_cfg = (TrainConfig.from_toml(pretrain_config) if pretrain_config else scenario_config("public_pretrain.toml")).with_overrides(
            {**overrides, "data.root": str(public)}
        )
        size = scratch.data.image_size
        faces = load_faces(orl, size=size)
        open_split = split_open_set(faces, test_identities=10, seed=seed)
        closed_split = split_closed_set(faces, train_per_identity=5, seed=seed)
        ctx = multiprocessing.get_context("spawn")
        err_console.print(
            f"private: {len(faces)} ORL images of {faces.num_identities} identities; public pre-training on {public}; "
            f"epsilons {', '.join(str(e) for e in eps_list)}; {workers} process(es)"
        )
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
            pre_dir = work / "pretrain"
            pre_future = pool.submit(_pretrain_job, pre_cfg, pre_dir, threads)
            futures: dict[tuple[str, float, str], Any] = {}
            for eps in eps_list:
                for kind, split in (("open", open_split), ("closed", closed_split)):
                    cfg = _private(scratch, eps, ledger, f"scratch-{eps}-{kind}")
                    futures[("scratch", eps, kind)] = pool.submit(_train_job, kind, cfg, faces, split, threads)
            pre = pre_future.result()
            ckpt = pre_dir / "checkpoint.pt"
            err_console.print(f"public pre-training done: rank-1 on held-out public images {pre['public_rank1']:.3f}")
            for eps in eps_list:
                for kind, split in (("open", open_split), ("closed", closed_split)):
                    cfg = _private(finetune.with_overrides({"training.init-from": str(ckpt)}), eps, ledger, f"pretrained-{eps}-{kind}")
                    futures[("pretrained", eps, kind)] = pool.submit(_train_job, kind, cfg, faces, split, threads)
            pretrained_only = _pretrained_figures(ckpt, faces, open_split, closed_split, finetune)
            done = {key: f.result() for key, f in futures.items()}
    rows = []
    for init in ("scratch", "pretrained"):
        for eps in eps_list:
            o, c = done[(init, eps, "open")], done[(init, eps, "closed")]
            row: dict[str, Any] = {
                "eps": "inf" if math.isinf(eps) else eps,
                "init": init,
                "open_verif_acc": o["open_verif_acc"],
                "open_verif_auc": o["open_verif_auc"],
                "open_tar_far1e-2": o["open_tar_far1e-2"],
                "closed_rank1": c["closed_rank1"],
                "open_epsilon_spent": o.get("epsilon_spent"),
                "closed_epsilon_spent": c.get("epsilon_spent"),
                "open_noise_multiplier": o.get("noise_multiplier"),
                "closed_noise_multiplier": c.get("noise_multiplier"),
                "train_s": o["train_s"] + c["train_s"],
            }
            rows.append(row)
            err_console.print(
                f"{init:>10} eps {row['eps']!s:>4}: open verification {row['open_verif_acc']:.3f} "
                f"(AUC {row['open_verif_auc']:.3f}), closed rank-1 {row['closed_rank1']:.3f}"
            )
    err_console.print(
        f"pre-trained only: open verification {pretrained_only['open_verif_acc']:.3f}, closed rank-1 {pretrained_only['closed_rank1']:.3f}"
    )
    result: dict[str, Any] = {
        "bench": "privacy",
        "rows": rows,
        "pretrained_only": pretrained_only,
        "public_pretrain": pre,
        "delta": scratch.privacy.delta,
        "accountant": scratch.privacy.accountant,
        "sampling": "poisson",
        "seed": seed,
        **_gain_kept(rows, pretrained_only),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    print_json(result)


def _gain_kept(rows: list[dict[str, Any]], pretrained_only: dict[str, float]) -> dict[str, Any]:
    """Share of the non-private fine-tuning gain (open-set accuracy) that DP fine-tuning at eps 8 keeps."""
    by_eps = {r["eps"]: r for r in rows if r["init"] == "pretrained"}
    if "inf" not in by_eps or 8.0 not in by_eps:
        return {}
    gain = by_eps["inf"]["open_verif_acc"] - pretrained_only["open_verif_acc"]
    kept = by_eps[8.0]["open_verif_acc"] - pretrained_only["open_verif_acc"]
    return {"finetune_gain_nonprivate": gain, "finetune_gain_eps8": kept, "eps8_gain_kept": kept / gain if gain > 0 else float("nan")}


__all__ = ["privacy"]
