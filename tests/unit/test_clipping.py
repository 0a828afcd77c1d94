"""Clipping terms: ghost norms and clipped sums equal those of the formed per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedface.common.privacy.clipping import GramCache, Materialized, OuterSum, clip_and_sum, set_grad_samples


def _reference(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # per-example gradient of weight r: sum over k of outer(g[r, k, n], a[r, k, n])
    return torch.einsum("rkno,rkni->rnoi", g, a)


# (K, O, I): the first is cheaper through Gram matrices (ghost), the second formed, the third K=1
@pytest.mark.parametrize(("k", "o", "i"), [(6, 24, 16), (12, 6, 3), (1, 5, 7)])
def test_outer_sum_norms_and_clipped_sums_equal_the_formed_gradients(k: int, o: int, i: int) -> None:
    # Arrange: 2 weights, 5 examples, float64
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, k, 5, o, generator=gen, dtype=torch.float64)
    a = torch.randn(2, k, 5, i, generator=gen, dtype=torch.float64)
    full = _reference(g, a)
    factors = torch.rand(5, generator=gen, dtype=torch.float64)
    params = [nn.Parameter(torch.zeros(o, i)), nn.Parameter(torch.zeros(o, i))]
    # the weight's gradient given in two blocks of its output rows, as fedface's GRU gives them
    term = OuterSum(params, (g[..., : o // 2], g[..., o // 2 :]), a)

    # Act / Assert
    torch.testing.assert_close(term.sq_norms(), full.square().sum(dim=(2, 3)).sum(dim=0), atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(term.clipped_sum(factors), torch.einsum("n,rnoi->roi", factors, full), atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(term.per_example(), full, atol=1e-12, rtol=0)


def test_clip_and_sum_clips_each_example_over_all_parameters_and_sums() -> None:
    # Arrange: a weight (ghost route) and a bias; example 0 small, example 1 large
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(1, 4, 2, 20, generator=gen, dtype=torch.float64)
    a = torch.randn(1, 4, 2, 10, generator=gen, dtype=torch.float64)
    g[:, :, 0] *= 1e-3
    a[:, :, 0] *= 1e-3
    bias = torch.randn(1, 2, 20, generator=gen, dtype=torch.float64)
    bias[:, 0] *= 1e-3
    w, b = nn.Parameter(torch.zeros(20, 10, dtype=torch.float64)), nn.Parameter(torch.zeros(20, dtype=torch.float64))
    full = _reference(g, a)[0]
    norms = (full.square().sum(dim=(1, 2)) + bias[0].square().sum(dim=1)).sqrt()
    clip = float(norms[1]) / 4  # example 1 is clipped, example 0 is not

    # Act
    term = OuterSum([w], (g,), a)
    assert term._ghost()
    got = clip_and_sum([term, Materialized([b], bias)], clip)

    # Assert
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert factors[0] == 1.0 and factors[1] < 0.3
    torch.testing.assert_close(got, norms)
    torch.testing.assert_close(w.grad, torch.einsum("n,noi->oi", factors, full))
    torch.testing.assert_close(b.grad, torch.einsum("n,nj->j", factors, bias[0]))
    total = (w.grad.square().sum() + b.grad.square().sum()).sqrt()
    assert float(total) <= float(norms[0]) + clip + 1e-9  # example 0 unclipped, example 1 at most clip


def test_set_grad_samples_gives_each_parameter_its_per_example_gradients() -> None:
    g, a = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 6)
    w1, w2 = nn.Parameter(torch.zeros(5, 6)), nn.Parameter(torch.zeros(5, 6))

    set_grad_samples([OuterSum([w1, w2], (g,), a)])

    torch.testing.assert_close(w2.grad_sample, _reference(g, a)[1])


def test_gram_cache_reuses_a_block_shared_by_two_terms() -> None:
    x = torch.randn(2, 4, 3, 5)
    cache = GramCache()

    first = cache.gram(x)

    assert cache.gram(x) is first
    torch.testing.assert_close(first, torch.einsum("rkno,rlno->rnkl", x, x))


def test_clip_and_sum_without_terms_is_an_error() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        clip_and_sum([], 1.0)
