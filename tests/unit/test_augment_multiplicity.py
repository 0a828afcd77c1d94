"""Augmentation multiplicity (De et al. 2022): several augmentations of one example averaged
before clipping. Each example must still contribute exactly one clipped gradient, the mean of
its copies', or the privacy accounting (one example, sensitivity C) would be wrong."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedface.common.data import load_faces, to_tensor
from fedface.common.models import ExpressionHead, GRUFaceEncoder, prepare_for_dp
from fedface.common.privacy.clipping import Materialized, OuterSum, average_copies
from fedface.common.privacy.per_sample import clip_grad_samples, compute_grad_samples

N, COPIES, DIM = 4, 3, 8


@pytest.fixture(scope="module")
def views(orl_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """COPIES different views (flips and shifts) of N real faces, copy-major, and their labels."""
    faces = to_tensor(load_faces(orl_root, size=(16, 16)).images[:40:10])  # 4 people
    copies = [faces, faces.flip(-1), torch.roll(faces, shifts=2, dims=-2)]
    return torch.cat(copies), torch.tensor([0, 1, 2, 0]).repeat(COPIES)


def _model(*, stem: bool, frozen_grus: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    encoder = prepare_for_dp(
        GRUFaceEncoder(image_size=(16, 16), passes=("rows", "columns"), hidden_size=5, embedding_dim=DIM, downsample=1, stem=(4,) if stem else ())
    )
    if frozen_grus:  # privacy.trainable = "neck"
        for p in [*encoder.rnns.parameters(), *(encoder.stem.parameters() if stem else [])]:  # type: ignore[union-attr]
            p.requires_grad_(False)
    return encoder, ExpressionHead(DIM, 3)


def _mean_of_copies(encoder: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The reference, in float64: for each example, the gradient of its copies' mean loss."""
    enc, hd = copy.deepcopy(encoder).double(), copy.deepcopy(head).double()
    params = [(n, p) for n, p in [*enc.named_parameters(), *(("head." + n, p) for n, p in hd.named_parameters())] if p.requires_grad]
    out = []
    for i in range(N):
        idx = torch.arange(COPIES) * N + i
        loss = F.cross_entropy(hd(enc(x[idx].double())), y[idx], reduction="mean")
        grads = torch.autograd.grad(loss, [p for _, p in params])
        out.append({n: g for (n, _), g in zip(params, grads, strict=True)})
    return out


@pytest.mark.parametrize(("stem", "frozen_grus"), [(False, False), (True, False), (True, True)], ids=["grus", "stem+grus", "neck-only"])
def test_an_examples_gradient_is_the_mean_of_its_copies_gradients(views: tuple[torch.Tensor, torch.Tensor], stem: bool, frozen_grus: bool) -> None:
    x, y = views
    encoder, head = _model(stem=stem, frozen_grus=frozen_grus)
    expected = _mean_of_copies(encoder, head, x, y)

    out = compute_grad_samples(encoder, head, x, y, copies=COPIES)

    assert out.losses.shape == (N,) and out.predictions.shape == (N,)
    named = [*encoder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    assert any(p.requires_grad for _, p in named)
    for name, p in named:
        if not p.requires_grad:
            continue
        assert p.grad_sample.shape == (N, *p.shape), name
        for i in range(N):
            torch.testing.assert_close(p.grad_sample[i].double(), expected[i][name], atol=2e-6, rtol=1e-4, msg=f"{name}[{i}]")


@pytest.mark.parametrize("ghost", [False, True], ids=["formed", "ghost-norms"])
def test_each_example_is_clipped_once_after_averaging(views: tuple[torch.Tensor, torch.Tensor], ghost: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = views
    if ghost:  # the Gram-matrix route for every outer-sum weight (at this size the cost rule forms them)
        monkeypatch.setattr(OuterSum, "_ghost", lambda self: True)
    encoder, head = _model(stem=True, frozen_grus=False)
    expected = _mean_of_copies(encoder, head, x, y)
    clip = 0.05  # below every example's norm here: each one is scaled

    _, norms = clip_grad_samples(encoder, head, x, y, clip, copies=COPIES)

    names = [n for n, p in [*encoder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())] if p.requires_grad]
    ref_norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in e.values())) for e in expected])
    torch.testing.assert_close(norms.double(), ref_norms, atol=1e-6, rtol=1e-4)
    assert (ref_norms > clip).all()
    factors = (clip / (ref_norms + 1e-6)).clamp(max=1.0)
    params = dict([*encoder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())])
    for name in names:
        want = sum(f * e[name] for f, e in zip(factors, expected, strict=True))
        torch.testing.assert_close(params[name].grad.double(), want, atol=1e-7, rtol=1e-4, msg=name)
    # the whole clipped sum is at most N * C: one clipped gradient per example, not per copy
    total = torch.sqrt(sum(params[n].grad.double().square().sum() for n in names))
    assert total <= N * clip + 1e-6


def test_average_copies_regroups_outer_sums_and_averages_materialized_terms() -> None:
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3))
    g, a = torch.randn(1, 5, 2 * N, 3), torch.randn(1, 5, 2 * N, 2)  # 5 positions, 2 copies of N
    bias = torch.randn(1, 2 * N, 3)
    grouped = average_copies([OuterSum([w], (g,), a), Materialized([b], bias)], 2)
    full = torch.einsum("kno,kni->noi", g[0], a[0])  # each input's own gradient
    torch.testing.assert_close(grouped[0].per_example()[0], (full[:N] + full[N:]) / 2)
    torch.testing.assert_close(grouped[1].per_example()[0], (bias[0, :N] + bias[0, N:]) / 2)
    assert average_copies([Materialized([b], bias)], 1)[0].values is bias
    with pytest.raises(ValueError, match="copies"):
        average_copies([Materialized([b], bias[:, :5])], 2)
    # the regrouped outer sum is a view of the same memory, its 1/copies a scale
    assert grouped[0].a.data_ptr() == a.data_ptr() and grouped[0].scale == 0.5
    torch.testing.assert_close(grouped[0].sq_norms(), grouped[0].per_example().square().sum(dim=(2, 3)).sum(dim=0))
    factors = torch.rand(N)
    torch.testing.assert_close(grouped[0].clipped_sum(factors)[0], torch.einsum("n,noi->oi", factors, (full[:N] + full[N:]) / 2))


def test_inputs_that_are_not_copy_major_are_refused(views: tuple[torch.Tensor, torch.Tensor]) -> None:
    # example-major copies (each image's copies side by side) would average different images
    # together: an image could then reach several clipped gradients
    x, y = views
    encoder, head = _model(stem=False, frozen_grus=False)
    wrong = y[:N].repeat_interleave(COPIES)
    with pytest.raises(ValueError, match="copy-major"):
        clip_grad_samples(encoder, head, x, wrong, 1.0, copies=COPIES)
    with pytest.raises(ValueError, match="copy-major"):
        compute_grad_samples(encoder, head, x[:-1], y[:-1], copies=COPIES)


def test_augment_multiplicity_is_for_private_training_with_augmentation() -> None:
    from fedface.common.config import TrainConfig
    from fedface.common.errors import ConfigError

    private = {"privacy.epsilon": 8.0, "privacy.augment-multiplicity": 4}
    assert TrainConfig().with_overrides(private).privacy.augment_multiplicity == 4
    no_augment = {f"augment.{k}": 0.0 for k in ("flip-p", "max-rotate-deg", "max-translate", "brightness", "contrast", "occlusion-p", "band-p")}
    no_augment["augment.scale-range"] = [1.0, 1.0]  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="copies would be identical"):
        TrainConfig().with_overrides({**private, **no_augment})
    # a non-private baseline of a private scenario (epsilon inf) keeps the key: it has no effect there
    assert TrainConfig().with_overrides({**private, **no_augment, "privacy.epsilon": float("inf")}).privacy.augment_multiplicity == 4
