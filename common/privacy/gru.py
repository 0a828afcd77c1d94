"""A GRU with ``nn.GRU``'s maths and parameter names whose per-sample gradients are cheap.

Why hand-written: Opacus trains GRUs through ``DPGRU``, whose per-time-step hooks cost 8-14x a
fused ``nn.GRU`` step (see ``../shared/docs/STACK.md``), and its functorch and ghost-clipping
modes are no faster. Per-sample gradients of a GRU's weights are sums over time of outer
products of the gate-pre-activation gradients with the step inputs (for ``weight_ih``) or the
previous hidden states (for ``weight_hh``). So this module, when asked to
(:meth:`PerSampleGRU.record`), runs each layer as :class:`_RecordedGRULayer`, whose
hand-written backward pass (BPTT) keeps every step's gate gradients; one batched matrix
product per weight then turns them into per-sample gradients
(:meth:`PerSampleGRU.compute_grad_samples`). Outside recording, the forward pass is an
ordinary differentiable time loop.

Parameters are named as in ``nn.GRU`` (``weight_ih_l0``, ``bias_hh_l0_reverse``, ...), in the
same gate order (reset, update, new), so state dicts load either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedface.common.privacy.clipping import GramCache, Materialized, OuterSum, Term, set_grad_samples


@dataclass
class _Trace:
    """What one layer (all its rows, i.e. GRUs x directions, at once) recorded for per-sample
    gradients, each tensor laid out (R, T, N, .): rows, time steps, examples, units.

    The forward pass fills ``inputs`` and ``h_prev``; the backward pass through
    :class:`_RecordedGRULayer` fills the gate gradients.
    """

    inputs: torch.Tensor  # (R, T, N, I)  step inputs, time-reversed for the reverse direction
    h_prev: torch.Tensor  # (R, T, N, H)  hidden state before each step
    layer: int
    d_r: torch.Tensor | None = None  # (R, T, N, H) reset gate gradient (pre-sigmoid, both sides)
    d_z: torch.Tensor | None = None  # (R, T, N, H) update gate gradient (pre-sigmoid, both sides)
    d_n: torch.Tensor | None = None  # (R, T, N, H) candidate gradient, input side (pre-tanh)
    d_hn: torch.Tensor | None = None  # (R, T, N, H) candidate gradient, hidden side (d_n * r)


class _RecordedGRULayer(torch.autograd.Function):
    """One GRU layer, every row (GRU x direction) at once, with a hand-written backward pass.

    Why hand-written: autograd's backward of a Python time loop replays a dozen small ops per
    step and, for a weight used at every step, an outer product per step; DP-SGD needs neither
    the summed weight gradients nor autograd's bookkeeping, only the gate gradients of every
    step (from which per-sample norms and clipped sums follow, see
    :mod:`fedface.common.privacy.clipping`). This backward is the GRU's BPTT: each step is a
    few elementwise ops and one batched matmul to the previous hidden state. It writes the gate
    gradients into the layer's :class:`_Trace` and returns the gradient of the input sequence
    (for the layer below); the weights, passed in detached, get none here: their per-sample
    gradients are the product. ``token`` (a zero scalar that
    requires grad) lets a caller differentiate the loss to this layer even when nothing below
    it requires grad.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        seq: torch.Tensor,  # (R, N, T, I)
        w_ih: torch.Tensor,  # (R, 3H, I)
        w_hh: torch.Tensor,  # (R, 3H, H)
        b_ih: torch.Tensor,  # (R, 3H)
        b_hh: torch.Tensor,  # (R, 3H)
        token: torch.Tensor,
        trace: _Trace,
    ) -> torch.Tensor:
        # Speed notes (CPU): every step works on slices of a few tens of kB that stay in cache;
        # passes over whole (R, T, N, H) tensors are memory-bound and cost more than they save.
        rows, n, steps, n_in = seq.shape
        hdim = w_hh.shape[2]
        inputs = seq.transpose(1, 2).contiguous()  # (R, T, N, I)
        # input projections of every step at once; the reset/update gates' hidden-side biases
        # are added here too (they enter the sigmoid as a plain sum)
        bias = torch.cat([b_ih[:, : 2 * hdim] + b_hh[:, : 2 * hdim], b_ih[:, 2 * hdim :]], dim=1)
        gi = torch.bmm(inputs.view(rows, steps * n, n_in), w_ih.transpose(1, 2)).add_(bias.unsqueeze(1))
        gi = gi.view(rows, steps, n, 3 * hdim)
        b_hn = b_hh[:, 2 * hdim :].unsqueeze(1)
        hs = seq.new_empty(rows, steps + 1, n, hdim)  # hs[:, t] is the state before step t
        hs[:, 0].zero_()
        rz = seq.new_empty(steps, rows, n, 2 * hdim)  # reset and update gates
        gh_n = seq.new_empty(steps, rows, n, hdim)  # hidden-side pre-activation of the candidate
        cand = seq.new_empty(steps, rows, n, hdim)  # candidate state
        w_hh_t = w_hh.transpose(1, 2)
        for t in range(steps):
            gh = torch.bmm(hs[:, t], w_hh_t)
            rz_t = torch.add(gi[:, t, :, : 2 * hdim], gh[..., : 2 * hdim], out=rz[t]).sigmoid_()
            torch.add(gh[..., 2 * hdim :], b_hn, out=gh_n[t])
            c = torch.addcmul(gi[:, t, :, 2 * hdim :], rz_t[..., :hdim], gh_n[t], out=cand[t])
            c.mul_(2).sigmoid_().mul_(2).sub_(1)  # tanh, as 2 sigmoid(2x) - 1: torch's CPU tanh is ~8x slower
            # h = (1 - z) * n + z * h_prev
            torch.lerp(c, hs[:, t], rz_t[..., hdim:], out=hs[:, t + 1])
        ctx.save_for_backward(w_ih, w_hh, hs, gh_n, rz, cand)
        ctx.trace = trace  # type: ignore[attr-defined]
        trace.inputs = inputs
        trace.h_prev = hs[:, :-1]
        return hs[:, 1:].transpose(1, 2)  # (R, N, T, H)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        w_ih, w_hh, hs, gh_n, rz, cand = ctx.saved_tensors  # type: ignore[attr-defined]
        steps, rows, n, hdim = cand.shape
        one = torch.ones((), dtype=cand.dtype, device=cand.device)
        # gate gradients, row-major (R, T, N, H) for the per-sample terms
        d_r, d_z, d_n, d_hn = (cand.new_empty(rows, steps, n, hdim) for _ in range(4))
        carry = None
        for t in range(steps - 1, -1, -1):
            dh = d_out[:, :, t] if carry is None else carry.add_(d_out[:, :, t])
            rz_t, c = rz[t], cand[t]
            slope = torch.addcmul(rz_t, rz_t, rz_t, value=-1)  # sigmoid' = s (1 - s)
            dhz = dh * rz_t[..., hdim:]
            # candidate (pre-tanh): dh * (1 - z) * (1 - n^2)
            dn = torch.mul(dh - dhz, torch.addcmul(one, c, c, value=-1), out=d_n[:, t])
            # reset (pre-sigmoid): d_n * gh_n * r (1 - r); hidden-side candidate: d_n * r
            dr = torch.mul(dn * gh_n[t], slope[..., :hdim], out=d_r[:, t])
            dhn = torch.mul(dn, rz_t[..., :hdim], out=d_hn[:, t])
            # update (pre-sigmoid): dh * (h_prev - n) * z (1 - z)
            dz = torch.mul((hs[:, t] - c).mul_(dh), slope[..., hdim:], out=d_z[:, t])
            carry = torch.baddbmm(dhz, torch.cat([dr, dz, dhn], dim=-1), w_hh)  # dh_prev = dh * z + d_gh @ W_hh
        trace: _Trace = ctx.trace  # type: ignore[attr-defined]
        trace.d_r, trace.d_z, trace.d_n, trace.d_hn = d_r, d_z, d_n, d_hn
        d_seq = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            flat = (rows, steps * n, hdim)
            d_seq = torch.bmm(d_r.view(flat), w_ih[:, :hdim])
            d_seq.baddbmm_(d_z.view(flat), w_ih[:, hdim : 2 * hdim]).baddbmm_(d_n.view(flat), w_ih[:, 2 * hdim :])
            d_seq = d_seq.view(rows, steps, n, -1).transpose(1, 2)
        return d_seq, None, None, None, None, torch.zeros((), dtype=hs.dtype, device=hs.device), None


def _recorded_layer(grus: Sequence[PerSampleGRU], seq: torch.Tensor, layer: int) -> torch.Tensor:
    """Run one layer of ``grus`` through :class:`_RecordedGRULayer`; outputs (G*D, N, T, H)."""
    directions = len(grus[0]._suffixes())
    w_ih = torch.stack([w.detach() for g in grus for w in g._stacked("weight_ih", layer)])
    w_hh = torch.stack([w.detach() for g in grus for w in g._stacked("weight_hh", layer)])
    b_ih = torch.stack([b.detach() for g in grus for b in g._stacked("bias_ih", layer)])
    b_hh = torch.stack([b.detach() for g in grus for b in g._stacked("bias_hh", layer)])
    token = seq.new_zeros((), requires_grad=True)
    trace = _Trace(inputs=seq.new_empty(0), h_prev=seq.new_empty(0), layer=layer)
    out = _RecordedGRULayer.apply(seq, w_ih, w_hh, b_ih, b_hh, token, trace)
    for k, g in enumerate(grus):
        g._traces.append(trace)
        g._parts.append(slice(k * directions, (k + 1) * directions))
        g._tokens.append(token)
    return out


def _group_layer(grus: Sequence[PerSampleGRU], xs: Sequence[torch.Tensor], layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer of several GRUs, every direction of each in one time loop.

    Each GRU's input (N, T, I) gives its outputs (N, T, D*H) and final states (D, N, H).
    Speed matters here (one Python iteration per time step): all directions run as one
    batched matmul per step, the input projections of all steps are one matmul, and per-step
    slices come from ``unbind``/``split`` (whose backward is one stack or cat, where indexing
    ``[:, t]`` would allocate a zero-filled full-size gradient per step). When recording
    (DP-SGD), the layer runs as :class:`_RecordedGRULayer` instead.
    """
    first = grus[0]
    directions = len(first._suffixes())
    n, steps, n_in = xs[0].shape
    hdim = first.hidden_size
    groups = len(grus)
    recording = [g._recording for g in grus]
    if any(recording) and not all(recording):
        raise ValueError("forward_group: either every GRU records or none does")
    seqs = [s for x in xs for s in ((x, x.flip(1)) if directions == 2 else (x,))]
    seq = torch.stack(seqs)  # (G*D, N, T, I)
    rows = groups * directions
    if recording[0]:
        out = _recorded_layer(grus, seq, layer)
    else:
        w_ih = torch.stack([w for g in grus for w in g._stacked("weight_ih", layer)])  # (G*D, 3H, I)
        w_hh_t = torch.stack([w for g in grus for w in g._stacked("weight_hh", layer)]).transpose(1, 2)  # (G*D, H, 3H)
        b_ih = torch.stack([b for g in grus for b in g._stacked("bias_ih", layer)]).unsqueeze(1)  # (G*D, 1, 3H)
        b_hh = torch.stack([b for g in grus for b in g._stacked("bias_hh", layer)]).unsqueeze(1)
        gi_all = torch.baddbmm(b_ih, seq.reshape(rows, n * steps, n_in), w_ih.transpose(1, 2))
        gi_steps = gi_all.view(rows, n, steps, 3 * hdim).unbind(2)
        h = xs[0].new_zeros(rows, n, hdim)
        outs = []
        for t in range(steps):
            gh = torch.baddbmm(b_hh, h, w_hh_t)
            gi_rz, gi_n = gi_steps[t].split((2 * hdim, hdim), dim=-1)
            gh_rz, gh_n = gh.split((2 * hdim, hdim), dim=-1)
            r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=-1)
            cand = torch.tanh(gi_n + r * gh_n)
            h = cand + z * (h - cand)  # (1 - z) * n + z * h
            outs.append(h)
        out = torch.stack(outs, dim=2)  # (G*D, N, T, H)
    # per-row views through unbind (whose backward is one stack), not indexing (whose backward
    # fills a zero tensor of the full size per index)
    per_row = out.unbind(0)
    results = []
    for k in range(groups):
        mine = per_row[k * directions : (k + 1) * directions]
        h_last = torch.stack([o[:, -1] for o in mine])
        if directions == 2:
            results.append((torch.cat([mine[0], mine[1].flip(1)], dim=2), h_last))
        else:
            results.append((mine[0], h_last))
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
        self._parts: list[slice] = []  # this GRU's rows in each (possibly shared) trace
        self._tokens: list[torch.Tensor] = []

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
        """Record the next forward passes for :meth:`compute_grad_samples` (DP-SGD).

        While recording, the weights get no ``.grad`` from a backward pass: differentiate the
        loss to :attr:`probes`, then :meth:`compute_grad_samples` sets each weight's
        ``grad_sample``.
        """
        self._recording = enabled
        self._traces = []
        self._parts = []
        self._tokens = []

    @property
    def probes(self) -> list[torch.Tensor]:
        """Tensors to differentiate the loss to (one per recorded layer): their backward fills the traces."""
        return list(self._tokens)

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

    def per_sample_terms(self) -> list[Term]:
        """This GRU's per-example gradients from the recorded pass, as clipping terms.

        Call after differentiating the summed per-sample losses to :attr:`probes` (or to
        anything below this GRU). Each weight's per-example gradient is a sum over time of
        outer products (gate gradients x step inputs or previous states): an
        :class:`~fedface.common.privacy.clipping.OuterSum` per weight kind, over directions,
        sharing the reset/update gates' Gram matrix; each bias's is a sum over time. The
        recording is consumed.
        """
        if not self._traces:
            raise RuntimeError("per-sample gradients: record(True) and run a forward pass first")
        terms: list[Term] = []
        for tr, part in zip(self._traces, self._parts, strict=True):
            if tr.d_r is None or tr.d_z is None or tr.d_n is None or tr.d_hn is None:
                raise RuntimeError("per-sample gradients: differentiate the loss to the probes first")
            d_r, d_z, d_n, d_hn = tr.d_r[part], tr.d_z[part], tr.d_n[part], tr.d_hn[part]  # (D, T, N, H)
            names = [f"l{tr.layer}{suffix}" for suffix in self._suffixes()]

            def params(kind: str, names: list[str] = names) -> list[nn.Parameter]:
                return [getattr(self, f"{kind}_{name}") for name in names]

            # weight_hh first: weight_ih then reuses the reset/update Gram matrices (cache)
            grams = GramCache()
            rz_sums = torch.cat([d_r.sum(dim=1), d_z.sum(dim=1)], dim=-1)  # shared by both biases
            terms += [
                OuterSum(params("weight_hh"), (d_r, d_z, d_hn), tr.h_prev[part], grams),
                OuterSum(params("weight_ih"), (d_r, d_z, d_n), tr.inputs[part], grams),
                Materialized(params("bias_ih"), torch.cat([rz_sums, d_n.sum(dim=1)], dim=-1)),
                Materialized(params("bias_hh"), torch.cat([rz_sums, d_hn.sum(dim=1)], dim=-1)),
            ]
        self._traces, self._parts, self._tokens = [], [], []
        return terms

    def compute_grad_samples(self) -> None:
        """Set ``p.grad_sample`` (N, *p.shape) for every parameter from the recorded pass.

        The per-example gradients themselves (Opacus' form); :meth:`per_sample_terms` gives
        the same without forming them where DP-SGD does not need to.
        """
        set_grad_samples(self.per_sample_terms())
