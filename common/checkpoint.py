"""Checkpoints of a trained encoder (and its local head), written atomically.

A checkpoint holds everything needed to evaluate or continue: the resolved config, the encoder
and head weights, the optimizer and scheduler state, the epoch, the task and its class count.
It is read with ``torch.load(weights_only=True)``: no code is unpickled from a checkpoint file.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedface.common.config import TrainConfig
from fedface.common.errors import CheckpointError, ConfigError
from fedface.common.io import atomic_torch_save

CHECKPOINT_FORMAT = "fedface-checkpoint/1"


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
        If the file is missing, not a torch file, or not a fedface checkpoint.
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
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {p} is unreadable ({type(exc).__name__}): it is corrupt or truncated; use another checkpoint"
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
            encoder_state=raw["encoder"],
            head_state=raw["head"],
            optimizer_state=raw.get("optimizer", {}),
            scheduler_state=raw.get("scheduler", {}),
            class_names=tuple(raw.get("class_names", ())),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {p} is incomplete or malformed: {exc}") from None


__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint"]
