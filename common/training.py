"""One local training loop, shared by the centralized baseline and (later) each federated site.

The loop works on in-memory tensors (face data sets are small: hundreds to a few thousand
64x64 images), augments whole batches at once on the training device, and reports per-epoch
statistics. Batches are drawn by an iterator of index tensors, so a caller can swap the
shuffled fixed-size batches used here for the Poisson sampling that DP-SGD accounting assumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.common.data.transforms import AugmentConfig, augment
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
    """``auto`` is CUDA when present, else CPU; ``cuda`` fails clearly when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available: use --device auto or cpu")
    return torch.device(name)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a seeded permutation of ``range(n)``; the last batch may be short."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


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
        emb = encoder(xb)
        logits = head_logits(head, emb, yb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            plain = head_logits(head, emb, None)
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


@torch.no_grad()
def embed(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    flip_tta: bool = True,
) -> np.ndarray:
    """Unit-length embeddings (N, D) of images (N, 1, H, W), in evaluation mode.

    With ``flip_tta`` each face's embedding is the normalised sum of its own and its mirror
    image's embedding (standard test-time augmentation in face recognition).
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        xb = images[start : start + batch_size].to(device)
        e = encoder(xb)
        if flip_tta:
            e = F.normalize(e + encoder(xb.flip(-1)), dim=1)
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
) -> np.ndarray:
    """Predicted class indices from ``head`` on the (optionally flip-averaged) embeddings."""
    emb = torch.from_numpy(embed(encoder, images, device=device, batch_size=batch_size, flip_tta=flip_tta))
    was_training = head.training
    head.eval()
    logits = head_logits(head, emb.to(device), None)
    head.train(was_training)
    return logits.argmax(dim=1).cpu().numpy()


__all__ = [
    "EpochStats",
    "embed",
    "head_logits",
    "predict",
    "select_device",
    "shuffled_batches",
    "train_epoch",
]
