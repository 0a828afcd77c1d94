"""A GRU with ``nn.GRU``'s maths and parameter names whose per-sample gradients are cheap.

Why hand-written: Opacus trains GRUs through ``DPGRU``, whose per-time-step hooks cost 8-14x a
fused ``nn.GRU`` step (see ``../shared/docs/STACK.md``), and its functorch and ghost-clipping
modes are no faster. Per-sample gradients of a GRU's weights are sums over time of outer
products of the gate-pre-activation gradients with the step inputs (for ``weight_ih``) or the
previous hidden states (for ``weight_hh``). So this module, when asked to
(:meth:`PerSampleGRU.record`), adds zero *probe* tensors to the gate pre-activations; one
backward pass to the probes yields every step's gate gradients, and one batched matrix product
per weight turns them into per-sample gradients (:meth:`PerSampleGRU.compute_grad_samples`).

Parameters are named as in ``nn.GRU`` (``weight_ih_l0``, ``bias_hh_l0_reverse``, ...), in the
same gate order (reset, update, new), so state dicts load either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Trace:
    """What one (layer, direction) recorded for per-sample gradients."""

    inputs: torch.Tensor  # (N, T, I)   step inputs
    h_prev: torch.Tensor  # (N, T, H)   hidden state before each step
    probe_ih: torch.Tensor  # (N, T, 3H) zero, requires grad
    probe_hh: torch.Tensor  # (N, T, 3H) zero, requires grad
    suffix: str


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
        return [t for tr in self._traces for t in (tr.probe_ih, tr.probe_hh)]

    def _direction(self, x: torch.Tensor, layer: int, suffix: str, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w_ih = getattr(self, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
        b_ih = getattr(self, f"bias_ih_l{layer}{suffix}")
        b_hh = getattr(self, f"bias_hh_l{layer}{suffix}")
        n, steps, _ = x.shape
        hdim = self.hidden_size
        seq = x.flip(1) if reverse else x
        gi_all = torch.addmm(b_ih, seq.reshape(n * steps, -1), w_ih.t()).view(n, steps, 3 * hdim)
        probe_hh = None
        if self._recording:
            probe_ih = torch.zeros_like(gi_all, requires_grad=True)
            probe_hh = torch.zeros_like(gi_all, requires_grad=True)
            gi_all = gi_all + probe_ih
        h = x.new_zeros(n, hdim)
        outs = []
        prevs = []
        for t in range(steps):
            gi = gi_all[:, t]
            gh = torch.addmm(b_hh, h, w_hh.t())
            if probe_hh is not None:
                gh = gh + probe_hh[:, t]
                prevs.append(h)
            i_r, i_z, i_n = gi.chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            cand = torch.tanh(i_n + r * h_n)
            h = cand + z * (h - cand)  # (1 - z) * n + z * h
            outs.append(h)
        out = torch.stack(outs, dim=1)
        if self._recording:
            assert probe_hh is not None
            self._traces.append(
                _Trace(inputs=seq.detach(), h_prev=torch.stack(prevs, dim=1).detach(), probe_ih=probe_ih, probe_hh=probe_hh, suffix=f"l{layer}{suffix}")
            )
        if reverse:
            out = out.flip(1)
        return out, h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, input_size) -> outputs (N, T, H * directions), final states (layers * directions, N, H)."""
        finals = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for suffix in self._suffixes():
                out, h = self._direction(layer_in, layer, suffix, reverse=suffix == "_reverse")
                outs.append(out)
                finals.append(h)
            layer_in = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return layer_in, torch.stack(finals, dim=0)

    def compute_grad_samples(self, probe_grads: list[torch.Tensor]) -> None:
        """Set ``p.grad_sample`` (N, *p.shape) for every parameter from the probes' gradients.

        ``probe_grads`` are the gradients of the summed per-sample losses with respect to
        :attr:`probes`, in that order.
        """
        if len(probe_grads) != 2 * len(self._traces):
            raise ValueError(f"expected {2 * len(self._traces)} probe gradients, got {len(probe_grads)}")
        for k, tr in enumerate(self._traces):
            d_ih, d_hh = probe_grads[2 * k], probe_grads[2 * k + 1]
            getattr(self, f"weight_ih_{tr.suffix}").grad_sample = torch.bmm(d_ih.transpose(1, 2), tr.inputs)
            getattr(self, f"bias_ih_{tr.suffix}").grad_sample = d_ih.sum(dim=1)
            getattr(self, f"weight_hh_{tr.suffix}").grad_sample = torch.bmm(d_hh.transpose(1, 2), tr.h_prev)
            getattr(self, f"bias_hh_{tr.suffix}").grad_sample = d_hh.sum(dim=1)
        self._traces = []
