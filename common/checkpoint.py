"""Checkpoints of a trained encoder (and its local head), written atomically.

A checkpoint holds everything needed to evaluate or continue: the resolved config, the encoder
and head weights, the optimizer and scheduler state, the epoch, the task and its class count.
It is read with ``torch.load(weights_only=True)``: no code is unpickled from a checkpoint file.

Two kinds are written: a ``fedface train`` run's ``checkpoint.pt`` (encoder and head) and the
federated server's ``checkpoints/round-NNNN.pt`` (encoder only: ``head_state`` empty,
``num_classes`` 0; the heads stay at the sites). :func:`find_checkpoint` picks a run
directory's final model and :func:`checkpoint_run_dir` the run directory of a checkpoint file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedface.common.config import TrainConfig
from fedface.common.errors import CheckpointError, ConfigError
from fedface.common.io import atomic_torch_save

CHECKPOINT_FORMAT = "fedface-checkpoint/1"

#: File name of a ``fedface train`` run's checkpoint.
RUN_CHECKPOINT = "checkpoint.pt"
#: Folder of a ``fedface simulate`` run's round checkpoints, named ``round-NNNN.pt``.
ROUNDS_DIR = "checkpoints"
_ROUND_FILE = re.compile(r"round-(\d+)\.pt")


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint as stored on disk."""

    config: TrainConfig
    task: str
    epoch: int
    num_classes: int
    encoder_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] = field(default_factory=dict)
    scheduler_state: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    def save(self, path: str | Path) -> None:
        """Write atomically to ``path``."""
        atomic_torch_save(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": self.config.to_toml_dict(),
                "task": self.task,
                "epoch": self.epoch,
                "num_classes": self.num_classes,
                "class_names": list(self.class_names),
                "encoder": self.encoder_state,
                "head": self.head_state,
                "optimizer": self.optimizer_state,
                "scheduler": self.scheduler_state,
            },
        )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :meth:`Checkpoint.save`.

    Raises
    ------
    CheckpointError
        If the file is missing, not a torch file (text, random bytes, truncated...), not a
        fedface checkpoint, or malformed (a field missing or of the wrong type, weights that
        are not named tensors or not finite).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found: pass the checkpoint.pt of a run directory")
    try:
        with warnings.catch_warnings():
            # torch warns about legacy pickle files before refusing them; the refusal is ours to report.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=True refuses anything but tensors and plain containers: a corrupt file,
        # or one holding arbitrary Python objects, which fedface never loads.
        raise CheckpointError(
            f"checkpoint {p} is unreadable: corrupt, or not a fedface checkpoint (only tensors and plain data are loaded)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load has no error contract for bytes it cannot parse
        # zipfile.BadZipFile, RuntimeError, EOFError, OSError, and for text or other foreign
        # bytes IndexError, ValueError, UnicodeDecodeError...: all say the file is not a checkpoint.
        raise CheckpointError(
            f"checkpoint {p} is unreadable ({type(exc).__name__}): it is corrupt, truncated or not a checkpoint; use another checkpoint"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a fedface checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    try:
        config = TrainConfig.from_mapping(raw["config"], source=f"{p} (embedded config)")
        return Checkpoint(
            config=config,
            task=str(raw["task"]),
            epoch=int(raw["epoch"]),
            num_classes=int(raw["num_classes"]),
            encoder_state=_tensors(raw["encoder"], "encoder"),
            head_state=_tensors(raw["head"], "head"),
            optimizer_state=_mapping(raw.get("optimizer", {}), "optimizer"),
            scheduler_state=_mapping(raw.get("scheduler", {}), "scheduler"),
            class_names=tuple(str(n) for n in raw.get("class_names", ())),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {p} is incomplete or malformed: {exc}") from None


def _mapping(value: object, name: str) -> dict[str, Any]:
    """``value`` if it is a dict, else a TypeError naming the field."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} state is a {type(value).__name__}, expected a mapping")
    return value


def _tensors(value: object, name: str) -> dict[str, torch.Tensor]:
    """``value`` if it maps parameter names to finite tensors, else a TypeError or ValueError naming the field."""
    state = _mapping(value, name)
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"{name} state holds {len(bad)} entries that are not named tensors (first: {bad[0]!r})")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{name} state holds NaN or infinite weights in {len(nonfinite)} tensors (first: {nonfinite[0]!r})")
    return state


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: itself, or a run directory's final model.

    Parameters
    ----------
    path
        A checkpoint file, or a run directory: a ``fedface train`` run's (its
        ``checkpoint.pt``) or a ``fedface simulate`` run's (its last round checkpoint, the
        highest round number under ``checkpoints/``).

    Returns
    -------
    Path
        The checkpoint file (not yet read: see :func:`load_checkpoint`).

    Raises
    ------
    CheckpointError
        If ``path`` does not exist, or is a directory holding neither kind of checkpoint.
    """
    p = Path(path)
    if not p.is_dir():
        if not p.exists():
            raise CheckpointError(f"checkpoint {p} not found: pass a checkpoint file or a run directory")
        return p
    if (p / RUN_CHECKPOINT).is_file():
        return p / RUN_CHECKPOINT
    rounds = [
        (int(m.group(1)), f) for f in (p / ROUNDS_DIR).glob("round-*.pt") if (m := _ROUND_FILE.fullmatch(f.name)) and f.is_file()
    ]
    if not rounds:
        raise CheckpointError(
            f"no checkpoint in {p}: expected {RUN_CHECKPOINT} (a `fedface train` run) or "
            f"{ROUNDS_DIR}/round-NNNN.pt (a `fedface simulate` run with a finished round)"
        )
    return max(rounds)[1]


def checkpoint_run_dir(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint file: its folder, or for a round checkpoint in
    ``checkpoints/`` the folder above (where the run's ``split.json`` and ``config.toml`` are)."""
    p = Path(checkpoint)
    return p.parent.parent if p.parent.name == ROUNDS_DIR and _ROUND_FILE.fullmatch(p.name) else p.parent


__all__ = ["CHECKPOINT_FORMAT", "ROUNDS_DIR", "RUN_CHECKPOINT", "Checkpoint", "checkpoint_run_dir", "find_checkpoint", "load_checkpoint"]
