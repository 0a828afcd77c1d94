"""Per-example clipping without materialising every per-example gradient when that is cheaper.

DP-SGD needs, per step, each example's gradient norm (over all parameters) and the sum of the
examples' gradients after each is scaled to norm at most ``C``. Opacus' ``DPOptimizer`` gets
there from ``p.grad_sample`` (one full gradient per example); Opacus' ghost-clipping engine gets
there with a second backward pass. fedface's models expose their per-example gradients in a
form that allows both figures directly:

- :class:`OuterSum`: a weight whose per-example gradient is a sum of outer products,
  ``G_n = sum_k g[k, n] (x) a[k, n]`` (a GRU weight: over time steps; a linear layer: over
  positions). Its squared norm is ``sum_{k,l} (g_k . g_l)(a_k . a_l)`` (two small Gram
  matrices, the "ghost norm" of Goodfellow 2015 and Li et al. 2022) when that is cheaper than
  forming ``G_n``, and its clipped sum is one large matrix product, ``sum_{n,k} c_n g[n,k] (x)
  a[k,n]``: the per-example gradients are never formed (Bu et al.'s "mixed" rule picks the
  cheaper route per weight).
- :class:`Materialized`: the per-example gradients themselves (biases, norms, class centres).

:func:`clip_and_sum` applies Opacus' clipping rule (``min(1, C / (||G_n|| + 1e-6))``) and
leaves the clipped sum in ``p.grad``, the input Opacus' ``DPOptimizerFastGradientClipping``
expects: Opacus then adds the noise and scales, exactly as for its own ghost clipping.

Why hand-written: Opacus' ghost clipping works from per-layer hooks and a second backward pass,
and has no rule for fedface's GRU (the time loop is what makes Opacus' ``DPGRU`` slow); the
closed forms above need only what fedface's backward pass already kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Opacus' DPOptimizer.clip_and_accumulate uses the same constant.
_NORM_EPS = 1e-6


class GramCache:
    """Gram matrices already computed in this step, shared between terms (keyed by tensor)."""

    def __init__(self) -> None:
        self._grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def has(self, x: torch.Tensor) -> bool:
        """Whether the Gram matrices of ``x`` are already computed."""
        hit = self._grams.get(id(x))
        return hit is not None and hit[0] is x

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """Per row and example, ``x[r, :, n] @ x[r, :, n].T``: (R, K, N, X) -> (R, N, K, K)."""
        hit = self._grams.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        # one strided bmm per row: (N, K, X) views with row stride N*X, no copy
        value = torch.stack([torch.bmm(x[r].transpose(0, 1), x[r].permute(1, 2, 0)) for r in range(x.shape[0])])
        self._grams[id(x)] = (x, value)
        return value


@dataclass
class OuterSum:
    """``R`` weights whose per-example gradients are ``sum_k g[r, k, n] (x) a[r, k, n]``.

    ``g`` is given as blocks along the output dimension, each (R, K, N, O_j) (weight ``r`` has
    shape (sum O_j, I)), ``a`` as (R, K, N, I). ``grams`` shares Gram matrices of blocks that
    several terms have in common.
    """

    params: list[nn.Parameter]
    g: tuple[torch.Tensor, ...]
    a: torch.Tensor
    grams: GramCache = field(default_factory=GramCache)
    scale: float = 1.0  # every per-example gradient times this (1 / copies: average_copies)
    _full: torch.Tensor | None = field(default=None, repr=False)

    def _ghost(self) -> bool:
        k = self.a.shape[1]
        o = sum(b.shape[-1] for b in self.g)
        i = self.a.shape[-1]
        # Gram matrices cost K*K per example and unit not already in the cache, the gradient
        # itself K*O*I (Bu et al.'s rule, counting shared Gram matrices once)
        fresh = sum(x.shape[-1] for x in (*self.g, self.a) if not self.grams.has(x))
        return k > 1 and k * fresh < o * i

    def per_example(self) -> torch.Tensor:
        """The per-example gradients, (R, N, O, I)."""
        if self._full is None:
            rows = self.a.shape[0]
            self._full = torch.stack(
                [torch.cat([torch.bmm(b[r].permute(1, 2, 0), self.a[r].transpose(0, 1)) for b in self.g], dim=1) for r in range(rows)]
            )
            if self.scale != 1.0:
                self._full = self._full * self.scale
        return self._full

    def sq_norms(self) -> torch.Tensor:
        """Each example's squared gradient norm over the ``R`` weights, (N,)."""
        if self.a.shape[1] == 1:
            g2 = sum(b.square().sum(-1) for b in self.g)
            return (g2 * self.a.square().sum(-1)).sum(dim=(0, 1)) * self.scale**2  # type: ignore[union-attr]
        if not self._ghost():
            return self.per_example().square().sum(dim=(2, 3)).sum(dim=0)
        gram_g = sum(self.grams.gram(b) for b in self.g)
        return (gram_g * self.grams.gram(self.a)).sum(dim=(2, 3)).sum(dim=0) * self.scale**2  # type: ignore[operator]

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``sum_n factors[n] G_n`` for each weight, (R, O, I)."""
        if self._full is not None:
            return torch.einsum("n,rnoi->roi", factors, self._full)
        rows, k, n, i = self.a.shape
        # scale the smaller side by the factors, then one matmul over (step, example)
        a = (self.a * (factors * self.scale).view(1, 1, n, 1)).view(rows, k * n, i)
        return torch.cat([torch.bmm(b.reshape(rows, k * n, -1).transpose(1, 2), a) for b in self.g], dim=1)


@dataclass
class Materialized:
    """``R`` parameters with their per-example gradients, (R, N, *shape)."""

    params: list[nn.Parameter]
    values: torch.Tensor

    def per_example(self) -> torch.Tensor:
        """The per-example gradients, (R, N, *shape)."""
        return self.values

    def sq_norms(self) -> torch.Tensor:
        """Each example's squared gradient norm over the ``R`` parameters, (N,)."""
        r, n = self.values.shape[:2]
        return self.values.reshape(r, n, -1).square().sum(dim=2).sum(dim=0)

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``sum_n factors[n] g_n`` for each parameter, (R, *shape)."""
        r, n = self.values.shape[:2]
        return torch.mm(factors.view(1, n), self.values.transpose(0, 1).reshape(n, -1)).view(r, *self.values.shape[2:])


Term = OuterSum | Materialized


def average_copies(terms: list[Term], copies: int) -> list[Term]:
    """Terms of ``N * copies`` inputs as terms of ``N`` examples, each example's gradient the
    mean of its copies' (augmentation multiplicity, De et al. 2022: several augmentations of
    one example averaged *before* clipping, so that the example still contributes one clipped
    gradient and the privacy accounting is unchanged).

    The inputs must be laid out copy-major: input ``k * N + n`` is copy ``k`` of example ``n``.
    An :class:`OuterSum`'s copies become more positions of the same example (its per-example
    gradient is a sum over positions; the ``1 / copies`` is the term's ``scale``): a reshape,
    a view of the same memory wherever the block's layout allows. A :class:`Materialized` term is averaged.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if copies == 1:
        return terms
    regrouped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # keep shared blocks shared

    def positions(x: torch.Tensor) -> torch.Tensor:
        hit = regrouped.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        rows, k, nk, d = x.shape
        if nk % copies:
            raise ValueError(f"{nk} inputs are not {copies} copies of each example")
        # (R, K, copies * N, D) -> (R, K * copies, N, D): position p of copy c is position
        # p * copies + c of its example (the order of positions does not matter in a sum)
        value = x.reshape(rows, k * copies, nk // copies, d)
        regrouped[id(x)] = (x, value)
        return value

    out: list[Term] = []
    grams = GramCache()
    for term in terms:
        if isinstance(term, OuterSum):
            out.append(OuterSum(term.params, tuple(positions(b) for b in term.g), positions(term.a), grams=grams, scale=term.scale / copies))
        else:
            r, nk = term.values.shape[:2]
            if nk % copies:
                raise ValueError(f"{nk} inputs are not {copies} copies of each example")
            out.append(Materialized(term.params, term.values.reshape(r, copies, nk // copies, *term.values.shape[2:]).mean(dim=1)))
    return out


def set_grad_samples(terms: list[Term]) -> None:
    """Set ``p.grad_sample`` (N, *p.shape) on every parameter of ``terms`` (Opacus' form)."""
    for term in terms:
        full = term.per_example()
        for r, p in enumerate(term.params):
            p.grad_sample = full[r]


def clip_and_sum(terms: list[Term], max_grad_norm: float) -> torch.Tensor:
    """Clip each example's whole gradient to ``max_grad_norm`` and put the sum in ``p.grad``.

    Returns the per-example gradient norms before clipping, (N,).
    """
    if not terms:
        raise ValueError("clip_and_sum: no trainable parameters")
    norms = torch.stack([t.sq_norms() for t in terms]).sum(dim=0).sqrt()
    factors = (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)
    for term in terms:
        summed = term.clipped_sum(factors)
        for r, p in enumerate(term.params):
            p.grad = summed[r].reshape(p.shape).to(p.dtype).contiguous()
    return norms


__all__ = ["GramCache", "Materialized", "OuterSum", "Term", "average_copies", "clip_and_sum", "set_grad_samples"]
