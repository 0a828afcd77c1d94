"""Benchmark runs that can be resumed: a run directory that holds a finished run of the same
config, split and starting checkpoint is reused instead of retrained (`fedface bench
expression`, `fedface bench lfw`: their full runs take hours on a 2-core CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedface.common.config import TrainConfig
from fedface.common.data import FaceSet
from fedface.common.errors import ConfigError, FedFaceError
from fedface.common.io import atomic_write_json
from fedface.simulations.centralized import train_run
from fedface.simulations.console import err_console

__all__ = ["FEDERATED_RECORD", "INIT_RECORD", "clear_run_dir", "federated_or_reuse", "finished", "parse_seeds", "reusable_federated", "train_or_reuse"]


def parse_seeds(seeds: str) -> list[int]:
    """``--seeds 1,2,3`` as a list; a clear ConfigError for anything else."""
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not seed_list:
        raise ConfigError("--seeds names no seed: pass e.g. --seeds 1,2,3")
    return seed_list


INIT_RECORD = "init.json"  # the digest of the checkpoint a fine-tuned run started from
FEDERATED_RECORD = "bench-result.json"  # a finished federated benchmark run: its config and figures


def _same_config(a: TrainConfig, b: TrainConfig) -> bool:
    """Equal configs, up to how the run was executed (threads, device)."""
    neutral = {"training.threads": 0, "training.device": "auto"}
    return a.with_overrides(neutral).model_dump() == b.with_overrides(neutral).model_dump()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished(run_dir: Path, cfg: TrainConfig, faces: FaceSet) -> dict[str, Any] | None:
    """The final metrics of a **finished** run of ``cfg`` on ``faces`` in ``run_dir``, else None.

    Finished means: its checkpoint (the last file a run writes) holds this config, its
    metrics hold the final figures, an expression run's confusion counts are there (an identity
    run writes none), its saved split is the split ``cfg`` makes of ``faces`` now, and a
    fine-tuned run started from the checkpoint ``training.init-from`` names now (by content
    digest, not by path).
    """
    from fedface.common.checkpoint import load_checkpoint
    from fedface.common.data import Split
    from fedface.simulations.centralized import prepare_task_data

    names = ["checkpoint.pt", "metrics.json", "split.json"] + (["confusion.json"] if cfg.training.task == "expression" else [])
    files = [run_dir / n for n in names]
    if not all(f.is_file() for f in files):
        return None
    try:
        if not _same_config(load_checkpoint(run_dir / "checkpoint.pt").config, cfg):
            return None
        summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if not summary.get("final") or "wall_s" not in summary:
            return None
        data = prepare_task_data(cfg, faces)
        if Split.load(run_dir / "split.json", data.faces) != data.split:
            return None
        if cfg.training.init_from is not None:
            record = json.loads((run_dir / INIT_RECORD).read_text(encoding="utf-8"))
            if record.get("sha256") != _digest(Path(cfg.training.init_from)):
                return None
    except (FedFaceError, OSError, ValueError, KeyError, TypeError):
        return None
    return {"metrics": summary["final"], "wall_s": float(summary["wall_s"])}


def _worth_keeping(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run cannot give back without training again, or
    must never lose: a checkpoint (a run's or a federation's round checkpoint), a federated
    record, or a privacy ledger (a benchmark's sites spend in ledgers of their own)."""
    return (run_dir / FEDERATED_RECORD).is_file() or any(run_dir.rglob("*.pt")) or any(run_dir.rglob("*.sqlite"))


def clear_run_dir(run_dir: Path) -> Path | None:
    """Make way for a new run in ``run_dir``; return where what was there was moved.

    A directory holding a checkpoint, a federated record or a privacy ledger (a finished run
    that is not the one wanted now, or an interrupted federation with its round checkpoints
    and its sites' ledgers) is renamed beside it, ``<name>.replaced-<UTC time>``, never
    deleted: it can be hours of training, and a ledger is append-only. What is left otherwise
    (a run interrupted before its first checkpoint) is removed, so that nothing of it can be
    mistaken for the new run's.
    """
    if not run_dir.exists():
        return None
    if _worth_keeping(run_dir):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
        run_dir.rename(moved)
        err_console.print(f"moved {run_dir} (not reusable for this run: another config, split or start, or unfinished) to {moved}; training anew")
        return moved
    shutil.rmtree(run_dir)
    return None


def train_or_reuse(cfg: TrainConfig, run_dir: Path, faces: FaceSet, reused: list[str]) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, or reuse the finished run of it there (a finished run of
    something else there is moved aside first: :func:`clear_run_dir`)."""
    done = finished(run_dir, cfg, faces)
    if done is not None:
        reused.append(str(run_dir))
        err_console.print(f"reused {run_dir} (a finished run of the same config, split and starting checkpoint)")
        return done
    clear_run_dir(run_dir)
    run = train_run(cfg, out_dir=run_dir, faces=faces)
    if cfg.training.init_from is not None:
        atomic_write_json(run_dir / INIT_RECORD, {"init_from": str(cfg.training.init_from), "sha256": _digest(Path(cfg.training.init_from))})
    return {"metrics": run.metrics, "wall_s": run.wall_s}


def _init_digest(cfg: TrainConfig) -> str | None:
    return _digest(Path(cfg.training.init_from)) if cfg.training.init_from is not None else None


def reusable_federated(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The record of a **finished** federated run of ``cfg`` in ``run_dir``, else None: its
    config is ``cfg``'s, it started from the checkpoint ``training.init-from`` names now (by
    digest), and its saved split and site partition are those ``cfg`` makes of the data now."""
    from fedface.common.data import Split
    from fedface.common.data.partition import SitePartition
    from fedface.common.federated import federation_data

    record = run_dir / FEDERATED_RECORD
    if not record.is_file():
        return None
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
        if not done.get("completed") or not _same_config(TrainConfig.from_mapping(done["config"]), cfg):
            return None
        if done.get("init_sha256") != _init_digest(cfg):
            return None
        fed = federation_data(cfg.with_overrides({"data.root": str(Path(cfg.data.root).resolve())}))
        if Split.load(run_dir / "run" / "split.json", fed.faces) != fed.split:
            return None
        if SitePartition.load(run_dir / "run" / "partition.json", fed.train) != fed.partition:
            return None
    except (FedFaceError, OSError, ValueError, KeyError, TypeError):
        return None  # not a record of this run: it is run again
    return done


def federated_or_reuse(cfg: TrainConfig, run_dir: Path, reused: list[str], on_round: Any = None) -> dict[str, Any]:
    """Run the federation of ``cfg`` into ``run_dir``, or reuse the finished run of the same
    config and starting checkpoint there (a finished run of something else there is moved
    aside first: :func:`clear_run_dir`).

    The sites' ledgers live in ``run_dir/ledgers``: a benchmark never spends a lifetime budget
    of the user's own ledgers. A run is finished when it completed every round; only then is
    its record (:data:`FEDERATED_RECORD`, written last and atomically) there to be reused
    (:func:`reusable_federated`).
    """
    from fedface.simulations.simulate import run_federated

    done = reusable_federated(run_dir, cfg)
    if done is not None:
        reused.append(str(run_dir))
        err_console.print(f"reused {run_dir} (a finished federated run of the same config, data, split and starting checkpoint)")
        return done
    clear_run_dir(run_dir)
    res = run_federated(cfg, out_dir=run_dir / "run", on_round=on_round, ledger_dir=run_dir / "ledgers")
    result = {
        "completed": res.completed,
        "error": res.error,
        "config": cfg.to_toml_dict(),
        "init_sha256": _init_digest(cfg),
        "initial": res.initial,
        "final": res.final,
        "history": res.history,
        "wall_s": res.wall_s,
    }
    if res.completed:  # an unfinished run is never reused: the next benchmark runs it again
        atomic_write_json(run_dir / FEDERATED_RECORD, result)
    return result
