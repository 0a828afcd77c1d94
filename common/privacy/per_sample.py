"""Per-sample gradients of fedface's encoder and heads, exact and fast.

DP-SGD clips each example's gradient, so it needs one gradient per example. fedface splits
the model where that is cheapest to do:

- the GRUs (almost all the parameters and time): :class:`~fedface.common.privacy.gru.PerSampleGRU`
  turns the gradients at its gate probes into per-sample weight gradients with batched matmuls;
- everything after them (the embedding neck and the head: LayerNorm, Linear, class centres):
  ``torch.func.vmap(grad(...))`` over single examples, which also yields each example's
  gradient with respect to the pooled GRU features; one backward pass carries those into the
  GRUs' probes.

The result is ``p.grad_sample`` (shape ``(N, *p.shape)``) on every trainable parameter, the
form Opacus' ``DPOptimizer`` clips, noises and accumulates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedface.common.models.encoder import GRUFaceEncoder
from fedface.common.models.heads import MarginHead
from fedface.common.privacy.gru import PerSampleGRU


class PerSampleFaceEncoder(GRUFaceEncoder):
    """A :class:`GRUFaceEncoder` whose GRUs are :class:`PerSampleGRU`; made by :func:`to_per_sample`.

    Passes whose GRUs and sequences have the same shape (rows and columns of a square face)
    run in one recurrence loop (:meth:`PerSampleGRU.forward_group`); outputs are unchanged.
    """

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`GRUFaceEncoder.pooled`, with same-shaped passes grouped."""
        seqs = self.sequences(x)
        groups: dict[tuple[object, ...], list[str]] = {}
        for name in self.passes:
            g = self.rnns[name]
            key = (tuple(seqs[name].shape), g.input_size, g.hidden_size, g.num_layers, g.bidirectional)
            groups.setdefault(key, []).append(name)
        results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for names in groups.values():
            outs = PerSampleGRU.forward_group([self.rnns[n] for n in names], [seqs[n] for n in names])
            results.update(zip(names, outs, strict=True))
        return torch.cat([self._pool(*results[name]) for name in self.passes], dim=1)


def to_per_sample(encoder: GRUFaceEncoder) -> PerSampleFaceEncoder:
    """A copy of ``encoder`` whose GRUs are :class:`PerSampleGRU` (same names and weights).

    Its ``state_dict`` loads into a plain :class:`GRUFaceEncoder` of the same config and back.
    """
    new = copy.deepcopy(encoder)
    for name, rnn in list(new.rnns.items()):
        if isinstance(rnn, nn.GRU):
            new.rnns[name] = PerSampleGRU.from_gru(rnn)
    # Same state, one method more: re-classing the copy avoids re-deriving the constructor's
    # arguments from a built encoder.
    new.__class__ = PerSampleFaceEncoder
    return new  # type: ignore[return-value]


def _head_loss(head: nn.Module, params: dict[str, torch.Tensor], emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    args = (emb, y) if isinstance(head, MarginHead) else (emb,)
    logits = functional_call(head, params, args)
    return F.cross_entropy(logits, y, reduction="sum")


@dataclass(frozen=True)
class PerSampleOutput:
    """What a per-sample gradient pass also yields about the batch (detached)."""

    losses: torch.Tensor  # (N,) each example's loss (margin logits)
    predictions: torch.Tensor  # (N,) argmax of the margin-free logits


def compute_grad_samples(encoder: GRUFaceEncoder, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PerSampleOutput:
    """Set ``p.grad_sample`` on every trainable parameter of ``encoder`` and ``head`` for the batch.

    The loss of an example is its cross-entropy on the head's (margin) logits. ``encoder``
    must hold :class:`PerSampleGRU` modules (see :func:`to_per_sample`). Frozen parameters
    (``requires_grad`` False, e.g. GRUs kept fixed while fine-tuning the neck) get none, and
    frozen GRUs cost no per-sample work.
    """
    grus = [m for m in encoder.rnns.values() if isinstance(m, PerSampleGRU)]
    if len(grus) != len(encoder.rnns):
        raise TypeError("compute_grad_samples needs an encoder prepared with to_per_sample()")
    live = [g for g in grus if any(p.requires_grad for p in g.parameters())]
    for g in live:
        g.record(True)
    try:
        if live:
            pooled = encoder.pooled(x)
        else:
            with torch.no_grad():
                pooled = encoder.pooled(x)
        neck_params = {k: v.detach() for k, v in encoder.neck.named_parameters()}
        head_params = {k: v.detach() for k, v in head.named_parameters()}

        def loss_one(npar: dict[str, torch.Tensor], hpar: dict[str, torch.Tensor], zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            emb = functional_call(encoder.neck, npar, (zi.unsqueeze(0),))
            return _head_loss(head, hpar, emb, yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0), randomness="different")
        g_neck, g_head, d_pooled = per_sample(neck_params, head_params, pooled.detach(), y)
        if live:
            probes = [p for g in live for p in g.probes]
            probe_grads = torch.autograd.grad(pooled, probes, grad_outputs=d_pooled)
            start = 0
            for g in live:
                n = len(g.probes)
                g.compute_grad_samples(list(probe_grads[start : start + n]))
                start += n
    finally:
        for g in live:
            g.record(False)
    for name, p in encoder.neck.named_parameters():
        if p.requires_grad:
            p.grad_sample = g_neck[name]
    for name, p in head.named_parameters():
        if p.requires_grad:
            p.grad_sample = g_head[name]
    with torch.no_grad():
        emb = encoder.neck(pooled.detach())
        args = (emb, y) if isinstance(head, MarginHead) else (emb,)
        losses = F.cross_entropy(head(*args), y, reduction="none")
        plain = head(emb) if isinstance(head, MarginHead) else head(*args)
        return PerSampleOutput(losses=losses, predictions=plain.argmax(dim=1))


__all__ = ["PerSampleFaceEncoder", "PerSampleOutput", "compute_grad_samples", "to_per_sample"]
