"""One local training loop, shared by the centralized baseline and (later) each federated site.

The loop works on in-memory tensors (face data sets are small: hundreds to a few thousand
64x64 images), augments whole batches at once on the training device, and reports per-epoch
statistics. Batches are drawn by an iterator of index tensors, so a caller can swap the
shuffled fixed-size batches used here for the Poisson sampling that DP-SGD accounting assumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.common.data.transforms import AugmentConfig, augment
from fedface.common.errors import ConfigError
from fedface.common.models.heads import MarginHead

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training did."""

    epoch: int
    loss: float
    train_accuracy: float  # on the augmented training batches, margin-free logits
    lr: float
    seconds: float
    images: int

    @property
    def images_per_s(self) -> float:
        """Training throughput."""
        return self.images / self.seconds if self.seconds > 0 else math.inf


def select_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` (or ``cuda:N``) fails clearly when absent.

    Raises
    ------
    ConfigError
        For a name other than auto, cpu, cuda or cuda:N, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here: use --device auto or cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a seeded permutation of ``range(n)``; the last batch may be short."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast on ``device`` for ``precision = "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def head_logits(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Training logits: margin heads take the labels (to apply the margin), others do not."""
    if isinstance(head, MarginHead):
        return head(embeddings, labels)
    return head(embeddings)


def train_epoch(
    *,
    encoder: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    augment_cfg: AugmentConfig | None,
    generator: torch.Generator,
    device: torch.device,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    label_smoothing: float = 0.0,
    precision: str = "fp32",
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """Train encoder and head for one pass over ``batches``.

    Parameters
    ----------
    images, labels
        All training images (N, 1, H, W) in [0, 1] and their class indices, on ``device``.
    batches
        Index tensors selecting each batch (see :func:`shuffled_batches`).
    augment_cfg
        Augmentation applied to every batch, or None for none.
    generator
        Seeded generator for augmentation (on the CPU; draws are moved to the device).
    scheduler
        Stepped once per batch when given.
    label_smoothing
        Cross-entropy label smoothing.
    precision
        ``"bf16"`` runs the forward pass under bfloat16 autocast (the loss in float32).
    on_step
        Called after each optimizer step (e.g. to update a weight average).
    """
    encoder.train()
    head.train()
    t0 = time.perf_counter()
    total_loss = 0.0
    correct = 0
    seen = 0
    for idx in batches:
        if idx.numel() == 0:
            continue
        idx = idx.to(images.device)
        xb = images[idx]
        yb = labels[idx]
        if augment_cfg is not None:
            xb = augment(xb, augment_cfg, generator=generator)
        with autocast(device, precision):
            emb = encoder(xb)
            logits = head_logits(head, emb, yb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        with torch.no_grad():
            plain = head_logits(head, emb.float(), None)
            correct += int((plain.argmax(dim=1) == yb).sum())
        total_loss += float(loss.detach()) * len(idx)
        seen += len(idx)
    seconds = time.perf_counter() - t0
    lr = float(optimizer.param_groups[0]["lr"])
    stats = EpochStats(
        epoch=epoch,
        loss=total_loss / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        lr=lr,
        seconds=seconds,
        images=seen,
    )
    logger.debug("epoch %d: loss %.4f, %.0f img/s", epoch, stats.loss, stats.images_per_s)
    return stats


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images (N, C, H, W) moved by (dy, dx) pixels, the uncovered border replicating the edge."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(x: torch.Tensor, *, flip_tta: bool, shift_tta: int) -> list[torch.Tensor]:
    """The test-time views of a batch: itself, its shifts by ``shift_tta`` px up/down/left/right, and their mirrors."""
    views = [x]
    if shift_tta > 0:
        s = shift_tta
        views += [shift_image(x, dy, dx) for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s))]
    if flip_tta:
        views += [v.flip(-1) for v in views]
    return views


@torch.no_grad()
def embed(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    flip_tta: bool = True,
    shift_tta: int = 0,
) -> np.ndarray:
    """Unit-length embeddings (N, D) of images (N, 1, H, W), in evaluation mode.

    Test-time augmentation: a face's embedding is the normalised sum of the embeddings of its
    views, its mirror image with ``flip_tta`` (standard in face recognition) and, with
    ``shift_tta`` > 0, copies moved by that many pixels up, down, left and right (and their
    mirrors): small misalignments of the crop then matter less (docs/models.md).
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        xb = images[start : start + batch_size].to(device)
        views = tta_views(xb, flip_tta=flip_tta, shift_tta=shift_tta)
        e = encoder(views[0])
        if len(views) > 1:
            e = F.normalize(sum((encoder(v) for v in views[1:]), e), dim=1)
        out.append(e.float().cpu())
    encoder.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


@torch.no_grad()
def predict(
    encoder: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    flip_tta: bool = True,
    shift_tta: int = 0,
) -> np.ndarray:
    """Predicted class indices from ``head`` on the (test-time augmented, see :func:`embed`) embeddings."""
    emb = torch.from_numpy(
        embed(encoder, images, device=device, batch_size=batch_size, flip_tta=flip_tta, shift_tta=shift_tta)
    )
    was_training = head.training
    head.eval()
    logits = head_logits(head, emb.to(device), None)
    head.train(was_training)
    return logits.argmax(dim=1).cpu().numpy()


__all__ = [
    "EpochStats",
    "autocast",
    "embed",
    "head_logits",
    "predict",
    "select_device",
    "shift_image",
    "shuffled_batches",
    "train_epoch",
    "tta_views",
]
