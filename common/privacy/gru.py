"""A GRU with ``nn.GRU``'s maths and parameter names whose per-sample gradients are cheap.

Why hand-written: Opacus trains GRUs through ``DPGRU``, whose per-time-step hooks cost 8-14x a
fused ``nn.GRU`` step (see ``../shared/docs/STACK.md``), and its functorch and ghost-clipping
modes are no faster. Per-sample gradients of a GRU's weights are sums over time of outer
products of the gate-pre-activation gradients with the step inputs (for ``weight_ih``) or the
previous hidden states (for ``weight_hh``). So this module, when asked to
(:meth:`PerSampleGRU.record`), adds a zero *probe* tensor to the input-side gate
pre-activations of every step; one backward pass to the probes yields every step's gate
gradients (the hidden side's follow from them and the saved reset gates), and one batched
matrix product per weight turns them into per-sample gradients
(:meth:`PerSampleGRU.compute_grad_samples`).

Parameters are named as in ``nn.GRU`` (``weight_ih_l0``, ``bias_hh_l0_reverse``, ...), in the
same gate order (reset, update, new), so state dicts load either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Trace:
    """What one layer (all its directions at once) recorded for per-sample gradients."""

    inputs: torch.Tensor  # (D, N, T, I)  step inputs, time-reversed for the reverse direction
    h_prev: torch.Tensor  # (D, N, T, H)  hidden state before each step
    reset: torch.Tensor  # (D, N, T, H)  reset gate r of each step
    probe: torch.Tensor  # (D, N, T, 3H) zero, requires grad: added to the input-side pre-activations
    layer: int


def _group_layer(grus: Sequence[PerSampleGRU], xs: Sequence[torch.Tensor], layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer of several GRUs, every direction of each in one time loop.

    Each GRU's input (N, T, I) gives its outputs (N, T, D*H) and final states (D, N, H).
    Speed matters here (one Python iteration per time step): all directions run as one
    batched matmul per step, the input projections of all steps are one matmul, and per-step
    slices come from ``unbind``/``split`` (whose backward is one stack or cat, where indexing
    ``[:, t]`` would allocate a zero-filled full-size gradient per step).
    """
    first = grus[0]
    directions = len(first._suffixes())
    n, steps, n_in = xs[0].shape
    hdim = first.hidden_size
    groups = len(grus)
    seqs = [s for x in xs for s in ((x, x.flip(1)) if directions == 2 else (x,))]
    seq = torch.stack(seqs)  # (G*D, N, T, I)
    w_ih = torch.stack([w for g in grus for w in g._stacked("weight_ih", layer)])  # (G*D, 3H, I)
    w_hh_t = torch.stack([w for g in grus for w in g._stacked("weight_hh", layer)]).transpose(1, 2)  # (G*D, H, 3H)
    b_ih = torch.stack([b for g in grus for b in g._stacked("bias_ih", layer)]).unsqueeze(1)  # (G*D, 1, 3H)
    b_hh = torch.stack([b for g in grus for b in g._stacked("bias_hh", layer)]).unsqueeze(1)
    rows = groups * directions
    gi_all = torch.baddbmm(b_ih, seq.reshape(rows, n * steps, n_in), w_ih.transpose(1, 2))
    gi_all = gi_all.view(rows, n, steps, 3 * hdim)
    recording = [g._recording for g in grus]
    if any(recording) and not all(recording):
        raise ValueError("forward_group: either every GRU records probes or none does")
    # Only the input side needs a probe: the hidden-side pre-activation gradient equals it on
    # the reset and update gates (they are summed before the sigmoid) and is it times r on the
    # candidate (``tanh(gi_n + r * gh_n)``), so it is derived from the probe's and the saved r.
    probes: list[torch.Tensor] = []
    if recording[0]:
        # one leaf per GRU (so each can be differentiated to), joined for the loop
        shape = (directions, n, steps, 3 * hdim)
        probes = [gi_all.new_zeros(shape, requires_grad=True) for _ in grus]
        gi_all = gi_all + (torch.cat(probes) if groups > 1 else probes[0])
    gi_steps = gi_all.unbind(2)
    h = xs[0].new_zeros(rows, n, hdim)
    outs = []
    prevs = []
    resets = []
    for t in range(steps):
        gh = torch.baddbmm(b_hh, h, w_hh_t)
        gi_rz, gi_n = gi_steps[t].split((2 * hdim, hdim), dim=-1)
        gh_rz, gh_n = gh.split((2 * hdim, hdim), dim=-1)
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=-1)
        if recording[0]:
            prevs.append(h)
            resets.append(r)
        cand = torch.tanh(gi_n + r * gh_n)
        h = cand + z * (h - cand)  # (1 - z) * n + z * h
        outs.append(h)
    out = torch.stack(outs, dim=2)  # (G*D, N, T, H)
    if recording[0]:
        inputs = seq.detach()
        h_prev = torch.stack(prevs, dim=2).detach()
        reset = torch.stack(resets, dim=2).detach()
        for k, g in enumerate(grus):
            part = slice(k * directions, (k + 1) * directions)
            g._traces.append(_Trace(inputs=inputs[part], h_prev=h_prev[part], reset=reset[part], probe=probes[k], layer=layer))
    results = []
    for k in range(groups):
        if directions == 2:
            results.append((torch.cat([out[2 * k], out[2 * k + 1].flip(1)], dim=2), h[2 * k : 2 * k + 2]))
        else:
            results.append((out[k], h[k : k + 1]))
    return results


class PerSampleGRU(nn.Module):
    """Drop-in for ``nn.GRU(..., batch_first=True)`` with cheap per-sample gradients.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bidirectional
        As for ``nn.GRU``. Inputs and outputs are always batch-first.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, bidirectional: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.batch_first = True
        directions = 2 if bidirectional else 1
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * directions
            for suffix in self._suffixes():
                name = f"l{layer}{suffix}"
                self.register_parameter(f"weight_ih_{name}", nn.Parameter(torch.empty(3 * hidden_size, layer_in)))
                self.register_parameter(f"weight_hh_{name}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
                self.register_parameter(f"bias_ih_{name}", nn.Parameter(torch.empty(3 * hidden_size)))
                self.register_parameter(f"bias_hh_{name}", nn.Parameter(torch.empty(3 * hidden_size)))
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)  # nn.GRU's initialisation
        self._recording = False
        self._traces: list[_Trace] = []

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @classmethod
    def from_gru(cls, gru: nn.GRU) -> PerSampleGRU:
        """The same GRU (weights copied) as a :class:`PerSampleGRU`; ``gru`` must be batch-first."""
        if not gru.batch_first:
            raise ValueError("PerSampleGRU.from_gru needs a batch_first nn.GRU")
        if gru.proj_size or not gru.bias:
            raise ValueError("PerSampleGRU supports GRUs with biases and no projection")
        new = cls(gru.input_size, gru.hidden_size, gru.num_layers, bidirectional=gru.bidirectional)
        ref = next(gru.parameters())
        new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(gru.state_dict())
        return new

    def record(self, enabled: bool = True) -> None:
        """Record probes in the next forward passes (for :meth:`compute_grad_samples`)."""
        self._recording = enabled
        self._traces = []

    @property
    def probes(self) -> list[torch.Tensor]:
        """The probe tensors of the last recorded forward pass, to differentiate the loss to."""
        return [tr.probe for tr in self._traces]

    def _stacked(self, kind: str, layer: int) -> list[torch.Tensor]:
        """One parameter kind of a layer, one tensor per direction."""
        return [getattr(self, f"{kind}_l{layer}{suffix}") for suffix in self._suffixes()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, input_size) -> outputs (N, T, H * directions), final states (layers * directions, N, H)."""
        return PerSampleGRU.forward_group([self], [x])[0]

    @staticmethod
    def forward_group(grus: Sequence[PerSampleGRU], xs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run several GRUs of the same shape on same-shaped inputs in one time loop.

        Equivalent to ``[g(x) for g, x in zip(grus, xs)]``, but every direction of every GRU
        advances in the same batched matmul per time step: an encoder reading a face by rows
        and by columns (same length and width) pays for one recurrence loop, not two.
        """
        first = grus[0]
        for g, x in zip(grus, xs, strict=True):
            if (g.input_size, g.hidden_size, g.num_layers, g.bidirectional) != (
                first.input_size,
                first.hidden_size,
                first.num_layers,
                first.bidirectional,
            ) or x.shape != xs[0].shape:
                raise ValueError("forward_group needs GRUs of one shape and inputs of one shape")
        finals: list[list[torch.Tensor]] = [[] for _ in grus]
        layer_in = list(xs)
        for layer in range(first.num_layers):
            results = _group_layer(grus, layer_in, layer)
            layer_in = [out for out, _ in results]
            for k, (_, h) in enumerate(results):
                finals[k].append(h)
        return [(out, torch.cat(fin, dim=0)) for out, fin in zip(layer_in, finals, strict=True)]

    def compute_grad_samples(self, probe_grads: list[torch.Tensor]) -> None:
        """Set ``p.grad_sample`` (N, *p.shape) for every parameter from the probes' gradients.

        ``probe_grads`` are the gradients of the summed per-sample losses with respect to
        :attr:`probes`, in that order.
        """
        if len(probe_grads) != len(self._traces):
            raise ValueError(f"expected {len(self._traces)} probe gradient(s), got {len(probe_grads)}")
        hdim = self.hidden_size
        for tr, d_ih in zip(self._traces, probe_grads, strict=True):
            # (D, N, T, 3H): input-side gate gradients; hidden side as explained in _group_layer
            d_hh = torch.cat([d_ih[..., : 2 * hdim], d_ih[..., 2 * hdim :] * tr.reset], dim=-1)
            directions, n, steps, gates = d_ih.shape
            # sum over time of outer products, as one batched matmul over (direction, example)
            g_ih = torch.bmm(d_ih.reshape(-1, steps, gates).transpose(1, 2), tr.inputs.reshape(directions * n, steps, -1))
            g_hh = torch.bmm(d_hh.reshape(-1, steps, gates).transpose(1, 2), tr.h_prev.reshape(directions * n, steps, -1))
            g_ih = g_ih.view(directions, n, gates, -1)
            g_hh = g_hh.view(directions, n, gates, -1)
            b_ih, b_hh = d_ih.sum(dim=2), d_hh.sum(dim=2)
            for d, suffix in enumerate(self._suffixes()):
                name = f"l{tr.layer}{suffix}"
                getattr(self, f"weight_ih_{name}").grad_sample = g_ih[d]
                getattr(self, f"bias_ih_{name}").grad_sample = b_ih[d]
                getattr(self, f"weight_hh_{name}").grad_sample = g_hh[d]
                getattr(self, f"bias_hh_{name}").grad_sample = b_hh[d]
        self._traces = []
