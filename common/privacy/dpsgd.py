"""DP-SGD for fedface's encoder and local head, on Opacus.

One private training session at a site is:

1. **planned** (:func:`plan_mechanism`): the Poisson sample rate ``q = batch_size / n``, the
   number of steps, and the noise multiplier calibrated *once* for the whole session
   (:func:`~fedface.common.privacy.accounting.calibrate_noise`), or given explicitly;
2. **charged** to the site's privacy ledger before any training starts (the caller does it:
   see :mod:`fedface.common.privacy.ledger`), so that a crash can only over-count;
3. **run** step by step (:func:`train_epoch_dp`): each step draws a Poisson batch (every
   example joins independently with probability ``q``: the sampling the accountants assume;
   an empty batch is a real step that still adds noise), clips each example's exact gradient
   to ``max_grad_norm`` and sums them (:func:`~fedface.common.privacy.per_sample.clip_grad_samples`:
   per-example norms in closed form, without forming per-example GRU gradients where that is
   cheaper; :mod:`fedface.common.privacy.clipping`), and hands the clipped sum to Opacus'
   ``DPOptimizerFastGradientClipping`` (the optimizer of Opacus' own ghost clipping), which
   adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` and divides
   by the *expected* batch size before the wrapped optimizer's step.

Outside secure mode, fedface's training seeds the sampling and noise generators from the
operating system once per run, never from ``training.seed`` (which is saved with the
checkpoint: noise regenerated from it could be subtracted from the released weights).

``secure_mode`` (for production): Poisson sampling draws from the operating system's CSPRNG
(``os.urandom``), and the noise uses Opacus' defence against floating-point attacks (each
noise value is a sum of four Gaussians) from a torch generator re-seeded from ``os.urandom``
at every step; user seeds are ignored. Opacus' own secure mode needs ``torchcsprng``, which is
unmaintained and has no build for current torch, hence this arrangement (docs/privacy.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedface.common.data.transforms import AugmentConfig, augment
from fedface.common.privacy.accounting import Accountant, Mechanism, calibrate_noise, compute_epsilon
from fedface.common.privacy.per_sample import PerSampleOutput, clip_grad_samples
from fedface.common.training import EpochStats

logger = logging.getLogger(__name__)


def secure_seed() -> int:
    """A 63-bit seed from the operating system's CSPRNG."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def poisson_batches(
    n: int, sample_rate: float, steps: int, *, generator: torch.Generator | None = None, secure: bool = False
) -> Iterator[torch.Tensor]:
    """``steps`` Poisson batches of ``range(n)``: each index joins each batch independently with
    probability ``sample_rate`` (batches vary in size and may be empty).

    With ``secure`` the draws come from ``os.urandom`` (``generator`` is ignored): a uniform
    64-bit integer per example, below ``sample_rate * 2**64``.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    threshold = min(int(sample_rate * 2.0**64), 2**64 - 1)
    for _ in range(steps):
        if secure:
            draws = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
            mask = torch.from_numpy(draws < np.uint64(threshold)) if sample_rate < 1 else torch.ones(n, dtype=torch.bool)
        else:
            mask = torch.rand(n, generator=generator) < sample_rate
        yield torch.nonzero(mask, as_tuple=False).flatten()


class _SecureNoise:
    """Mixin: the noise generator is re-seeded from ``os.urandom`` before each step."""

    generator: torch.Generator | None

    def add_noise(self) -> None:  # noqa: D102 (Opacus' documented method)
        if self.generator is not None:
            self.generator.manual_seed(secure_seed())
        super().add_noise()  # type: ignore[misc]


class _SecureDPOptimizer(_SecureNoise, DPOptimizer):
    """``DPOptimizer`` with OS-reseeded noise."""


class _SecurePresummedDPOptimizer(_SecureNoise, DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` with OS-reseeded noise."""


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    secure_mode: bool = False,
    generator: torch.Generator | None = None,
    presummed: bool = True,
) -> DPOptimizer:
    """Opacus' DP optimizer around ``optimizer`` (mean loss over the *expected* batch size).

    ``presummed`` (fedface's :func:`dp_step`): ``p.grad`` already holds the sum of the clipped
    per-example gradients, and Opacus' ``DPOptimizerFastGradientClipping`` noises and scales
    it. Without it, Opacus' ``DPOptimizer`` clips ``p.grad_sample`` itself (for per-example
    gradients from Opacus' own hooks, e.g. ``GradSampleModule``).

    Without ``secure_mode`` the noise comes from ``generator`` (seeded: reproducible research
    runs); with it, from a generator re-seeded from the OS at every step.
    """
    kwargs = {"noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "expected_batch_size": expected_batch_size}
    if secure_mode:
        device = optimizer.param_groups[0]["params"][0].device
        cls: type[DPOptimizer] = _SecurePresummedDPOptimizer if presummed else _SecureDPOptimizer
        return cls(optimizer, generator=torch.Generator(device=device), secure_mode=True, **kwargs)
    cls = DPOptimizerFastGradientClipping if presummed else DPOptimizer
    return cls(optimizer, generator=generator, **kwargs)


def dp_step(
    encoder: nn.Module,
    head: nn.Module,
    optimizer: DPOptimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    copies: int = 1,
) -> PerSampleOutput:
    """One DP-SGD step on a (possibly empty) batch; returns the per-example losses and predictions.

    ``optimizer`` comes from :func:`make_dp_optimizer` (``presummed``). With ``copies`` > 1,
    ``images`` and ``labels`` hold that many augmentations of each example of the batch,
    copy-major, and each example's gradient is the mean of its copies' before it is clipped
    (augmentation multiplicity; :func:`~fedface.common.privacy.clipping.average_copies`).
    """
    if not isinstance(optimizer, DPOptimizerFastGradientClipping):
        raise TypeError("dp_step needs make_dp_optimizer(..., presummed=True)")
    optimizer.zero_grad(set_to_none=True)
    if len(images) == 0:
        # An empty Poisson batch is still a step: nothing to clip, add the noise, step.
        for p in optimizer.params:
            p.grad = torch.zeros_like(p)
        out = PerSampleOutput(losses=images.new_zeros(0), predictions=labels.new_zeros(0))
    else:
        out, _ = clip_grad_samples(
            encoder, head, images, labels, optimizer.max_grad_norm, label_smoothing=label_smoothing, copies=copies  # type: ignore[arg-type]
        )
    optimizer.step()
    return out


def train_epoch_dp(
    *,
    encoder: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: DPOptimizer,
    batches: Iterator[torch.Tensor],
    augment_cfg: AugmentConfig | None,
    generator: torch.Generator,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    label_smoothing: float = 0.0,
    augment_multiplicity: int = 1,
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """DP-SGD over ``batches`` (index tensors from :func:`poisson_batches`); as
    :func:`~fedface.common.training.train_epoch`, with per-example clipping and noise.

    ``augment_multiplicity`` > 1 (De et al. 2022): each example of a batch is augmented that
    many times independently, and the mean of its copies' gradients is what is clipped, so
    the step's sensitivity (one clipped gradient per sampled example) and the accounting are
    those of a single copy. ``on_step`` is called after each step (a weight average: it reads
    only the released, noised weights).
    """
    if augment_multiplicity > 1 and augment_cfg is None:
        raise ValueError("augment_multiplicity > 1 needs augmentation: identical copies average to the gradient of one")
    encoder.train()
    head.train()
    t0 = time.perf_counter()
    total_loss = 0.0
    correct = 0
    seen = 0
    for idx in batches:
        idx = idx.to(images.device)
        xb, yb = images[idx], labels[idx]
        copies = augment_multiplicity if len(idx) > 0 else 1
        if augment_cfg is not None and len(idx) > 0:
            # copy-major: copy k of example n is input k * len(idx) + n
            xb = torch.cat([augment(xb, augment_cfg, generator=generator) for _ in range(copies)])
        out = dp_step(encoder, head, optimizer, xb, yb.repeat(copies), label_smoothing=label_smoothing, copies=copies)
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step()
        total_loss += float(out.losses.sum())
        correct += int((out.predictions == yb).sum())
        seen += len(idx)
    seconds = time.perf_counter() - t0
    return EpochStats(
        epoch=epoch,
        loss=total_loss / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        lr=float(optimizer.param_groups[0]["lr"]),
        seconds=seconds,
        images=seen,
    )


@dataclass(frozen=True)
class DPPlan:
    """A planned private training session: its mechanism and the epsilon it spends on its own."""

    mechanism: Mechanism
    epsilon: float  # of this session alone, by the mechanism's accountant at its delta
    steps_per_epoch: int
    expected_batch_size: int


def plan_mechanism(
    *,
    examples: int,
    batch_size: int,
    epochs: int,
    delta: float,
    max_grad_norm: float,
    accountant: Accountant,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    secure_mode: bool = False,
) -> DPPlan:
    """Sample rate, steps and noise for ``epochs`` of DP-SGD over ``examples`` examples.

    Exactly one of ``epsilon`` (the noise is calibrated so the session spends at most that)
    or ``noise_multiplier`` (the epsilon is then computed) must be given.
    """
    if (epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of epsilon or noise_multiplier")
    if examples < 1:
        raise ValueError("DP-SGD needs at least one training example")
    expected = min(batch_size, examples)
    q = expected / examples
    steps_per_epoch = max(1, round(1 / q))
    steps = epochs * steps_per_epoch
    if noise_multiplier is None:
        assert epsilon is not None
        noise_multiplier = calibrate_noise(
            target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
        )
    mech = Mechanism(
        noise_multiplier=noise_multiplier,
        sample_rate=q,
        steps=steps,
        max_grad_norm=max_grad_norm,
        delta=delta,
        accountant=accountant,
        secure_mode=secure_mode,
    )
    spent = compute_epsilon([mech.history_entry()], delta=delta, accountant=accountant)
    return DPPlan(mechanism=mech, epsilon=spent, steps_per_epoch=steps_per_epoch, expected_batch_size=expected)


__all__ = [
    "DPPlan",
    "dp_step",
    "make_dp_optimizer",
    "plan_mechanism",
    "poisson_batches",
    "secure_seed",
    "train_epoch_dp",
]
