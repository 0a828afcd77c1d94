"""Unit tests for fedface.common.models: the GRU face encoder, the heads and DP preparation.

Every model runs on a handful of real ORL faces at 32x32 with a tiny encoder (hidden size 4,
embedding size 8).
"""

from __future__ import annotations

import copy

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedface.common.config import HeadConfig, ModelConfig
from fedface.common.data import load_faces, to_tensor
from fedface.common.models import (
    ExpressionHead,
    GRUFaceEncoder,
    MarginHead,
    build_encoder,
    build_margin_head,
    prepare_for_dp,
    standardize,
)
from fedface.common.privacy import PerSampleGRU
from fedface.common.privacy.per_sample import compute_grad_samples, to_per_sample

SIZE = (32, 32)
PASSES = ("rows", "columns", "patches")
POOLINGS = ("mean", "max", "meanmax", "last")
DIM = 8


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> torch.Tensor:
    """Six real faces of three ORL identities, (6, 1, 32, 32) in [0, 1]."""
    fs = load_faces(orl_root, size=SIZE)
    idx = np.concatenate([np.flatnonzero(fs.labels == k)[:2] for k in range(3)])
    return to_tensor(fs.images[idx]).clone()


@pytest.fixture(scope="module")
def face_labels() -> torch.Tensor:
    return torch.tensor([0, 0, 1, 1, 2, 2])


def _encoder(passes: Sequence[str] = ("rows", "columns"), *, seed: int = 0, **kwargs: object) -> GRUFaceEncoder:
    torch.manual_seed(seed)
    options: dict[str, object] = {"hidden_size": 4, "embedding_dim": DIM, "patch_size": 8, **kwargs}
    return GRUFaceEncoder(image_size=SIZE, passes=tuple(passes), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def embeddings(faces: torch.Tensor) -> torch.Tensor:
    """Unit embeddings of the real faces from a tiny (untrained) encoder."""
    with torch.no_grad():
        return _encoder().eval()(faces)


def _per_example_grads(
    module: nn.Module, loss_fn: object, inputs: torch.Tensor, labels: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Gradients of each example's own loss, by one backward pass per example."""
    grads = []
    for i in range(inputs.shape[0]):
        module.zero_grad(set_to_none=True)
        loss_fn(module, inputs[i : i + 1], labels[i : i + 1]).backward()  # type: ignore[operator]
        grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters()})
    return grads


def _margin_loss(head: nn.Module, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(emb, y), y, reduction="sum")


# --- encoder: shapes, norms, options -----------------------------------------------------------


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("passes", PASSES)
def test_encoder_output_is_unit_norm_of_embedding_dim(faces: torch.Tensor, passes: str, pooling: str) -> None:
    # Arrange
    encoder = _encoder((passes,), pooling=pooling).eval()

    # Act
    with torch.no_grad():
        out = encoder(faces)

    # Assert
    assert out.shape == (faces.shape[0], DIM)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(faces.shape[0]))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_encoder_unidirectional_two_layers_output_is_unit_norm(faces: torch.Tensor, pooling: str) -> None:
    encoder = _encoder(("rows", "patches"), pooling=pooling, bidirectional=False, num_layers=2).eval()

    with torch.no_grad():
        out = encoder(faces)

    assert out.shape == (faces.shape[0], DIM)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(faces.shape[0]))


def test_encoder_distinguishes_different_faces(faces: torch.Tensor) -> None:
    # A constant or collapsed encoder would pass the shape checks
    with torch.no_grad():
        out = _encoder().eval()(faces)

    assert torch.pdist(out).min() > 1e-4


def test_encoder_embeds_each_image_independently_of_its_batch(faces: torch.Tensor) -> None:
    encoder = _encoder(("rows", "patches")).eval()

    with torch.no_grad():
        together = encoder(faces)
        alone = torch.cat([encoder(faces[i : i + 1]) for i in range(faces.shape[0])])

    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_encoder_downsample_reads_the_average_pooled_image(faces: torch.Tensor) -> None:
    # Arrange: same weights, one encoder pools itself, the other gets a pooled input
    torch.manual_seed(0)
    pooled_inside = GRUFaceEncoder(image_size=SIZE, passes=("rows", "patches"), hidden_size=4, embedding_dim=DIM, patch_size=4, downsample=2)
    plain = GRUFaceEncoder(image_size=(16, 16), passes=("rows", "patches"), hidden_size=4, embedding_dim=DIM, patch_size=4)
    plain.load_state_dict(pooled_inside.state_dict())

    # Act
    with torch.no_grad():
        a = pooled_inside.eval()(faces)
        b = plain.eval()(F.avg_pool2d(faces, 2))

    # Assert
    assert pooled_inside.image_size == (16, 16)
    assert a.shape == (faces.shape[0], DIM)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"passes": ("patches",), "patch_size": 5}, "patch_size 5 must divide"),
        ({"passes": ("patches",), "patch_size": 16, "downsample": 4}, "patch_size 16 must divide"),
        ({"downsample": 0}, "downsample 0"),
        ({"downsample": 3}, "downsample 3"),
        ({"passes": ()}, "at least one"),
        ({"passes": ("patches",), "stem": (4,)}, "cannot follow a convolutional stem"),
        ({"stem": (4, 4, 4, 4, 4, 4)}, "must be divisible by 64"),
    ],
    ids=["patches", "patch-after-downsample", "downsample-0", "downsample-3", "no-passes", "stem-patches", "stem-too-deep"],
)
def test_encoder_invalid_geometry_raises_value_error(kwargs: dict[str, object], match: str) -> None:
    options: dict[str, object] = {"image_size": SIZE, "hidden_size": 4, "embedding_dim": DIM, **kwargs}

    with pytest.raises(ValueError, match=match):
        GRUFaceEncoder(**options)  # type: ignore[arg-type]


def test_standardize_gives_zero_mean_unit_std_per_image(faces: torch.Tensor) -> None:
    # Arrange: real faces with different brightness and contrast
    x = torch.cat([faces, 0.2 + 0.5 * faces])

    # Act
    z = standardize(x)

    # Assert
    flat = z.flatten(1)
    torch.testing.assert_close(flat.mean(dim=1), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(dim=1, unbiased=False), torch.ones(12), atol=1e-3, rtol=0)
    assert z.shape == x.shape


def test_standardize_removes_affine_lighting_changes(faces: torch.Tensor) -> None:
    torch.testing.assert_close(standardize(0.1 + 0.6 * faces), standardize(faces), atol=1e-3, rtol=0)


def test_standardize_constant_image_stays_finite() -> None:
    z = standardize(torch.full((1, 1, 8, 8), 0.5))

    assert torch.isfinite(z).all()


def test_stem_encoder_reads_the_feature_map_rows_and_stays_unit_norm(faces: torch.Tensor) -> None:
    # Arrange: two stages of 4 and 6 channels turn 32x32 into an 8x8 grid of 6 features
    encoder = _encoder(("rows", "columns"), stem=(4, 6))

    # Act
    seqs = encoder.sequences(faces[:3])
    emb = encoder(faces[:3])

    # Assert: each row step holds one feature-map row of every channel
    assert seqs["rows"].shape == (3, 8, 6 * 8)
    assert seqs["columns"].shape == (3, 8, 6 * 8)
    assert encoder.rnns["rows"].input_size == 48
    assert emb.shape == (3, DIM)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_stem_rows_are_the_feature_map_rows(faces: torch.Tensor) -> None:
    encoder = _encoder(("rows",), stem=(4,))
    fmap = encoder.stem(standardize(faces[:2]))  # type: ignore[misc]

    rows = encoder.sequences(faces[:2])["rows"]

    # step 5 = row 5 of channel 0, then row 5 of channel 1, ...
    assert torch.equal(rows[:, 5], torch.cat([fmap[:, c, 5] for c in range(4)], dim=1))


def test_encoder_without_stem_keeps_its_state_dict_keys() -> None:
    # checkpoints written before the stem existed must still load
    keys = set(_encoder(("rows", "columns")).state_dict())

    assert not any(k.startswith("stem") for k in keys)
    assert {k for k in _encoder(("rows",), stem=(4,)).state_dict() if k.startswith("stem")}


def test_no_batch_norm_in_encoder_or_heads() -> None:
    # Arrange
    modules: list[nn.Module] = [
        _encoder(PASSES),
        _encoder(("rows",), stem=(4, 8)),
        MarginHead(DIM, 5),
        ExpressionHead(DIM, 6, hidden=4, dropout=0.1),
    ]

    # Act
    found = [type(m).__name__ for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]

    # Assert
    assert found == []


# --- prepare_for_dp ----------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [("rows", "columns"), ("patches",)], ids="+".join)
def test_prepare_for_dp_passes_strict_opacus_validation(passes: tuple[str, ...]) -> None:
    # Act
    prepared = prepare_for_dp(_encoder(passes))

    # Assert
    assert ModuleValidator.validate(prepared, strict=True) == []
    assert not any(isinstance(m, nn.GRU) for m in prepared.modules())


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("passes", [("rows", "columns"), ("patches",)], ids="+".join)
def test_prepare_for_dp_keeps_weights_and_outputs(faces: torch.Tensor, passes: tuple[str, ...], pooling: str) -> None:
    # Arrange
    original = _encoder(passes, pooling=pooling)

    # Act
    prepared = prepare_for_dp(original)

    # Assert: same parameter names and values, same outputs
    assert dict(prepared.named_parameters()).keys() == dict(original.named_parameters()).keys()
    for name, p in original.named_parameters():
        assert torch.equal(dict(prepared.named_parameters())[name], p), name
    with torch.no_grad():
        expected = original.eval()(faces)
        actual = prepared.eval()(faces)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_prepare_for_dp_leaves_the_original_untouched() -> None:
    # Arrange
    original = _encoder(("rows", "patches"))
    before = {k: v.clone() for k, v in original.state_dict().items()}

    # Act
    prepared = prepare_for_dp(original)
    with torch.no_grad():
        for p in prepared.parameters():
            p.add_(1.0)

    # Assert
    assert prepared is not original
    assert type(original.rnns["rows"]) is nn.GRU
    assert isinstance(prepared.rnns["rows"], PerSampleGRU)
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_prepared_encoder_state_dict_loads_into_a_plain_encoder(faces: torch.Tensor) -> None:
    # Arrange: the weights a DP site would send back to the server
    prepared = prepare_for_dp(_encoder(("rows",), seed=0))
    plain = _encoder(("rows",), seed=1)

    # Act
    plain.load_state_dict(prepared.state_dict())

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(faces), prepared.eval()(faces), atol=1e-5, rtol=0)


def test_prepare_for_dp_accepts_an_encoder_in_eval_mode() -> None:
    encoder = _encoder().eval()

    prepared = prepare_for_dp(encoder)

    assert ModuleValidator.validate(prepared.train(), strict=True) == []


# --- per-sample gradients (Opacus) -------------------------------------------------------------


@pytest.mark.parametrize("passes", [("rows", "columns"), ("patches",), ("rows", "patches")], ids="+".join)
@pytest.mark.parametrize("pooling", ["meanmax", "last"])
def test_prepared_encoder_per_sample_grads_match_per_example_backward_in_float32(
    faces: torch.Tensor, face_labels: torch.Tensor, passes: tuple[str, ...], pooling: str
) -> None:
    # Arrange: the encoder and a CosFace head as fedface trains them under DP-SGD, float32.
    # The reference is the per-example loop in float64 (the exact gradients): a float32 loop
    # through nn.GRU is itself several 1e-6 off them, so float32 against float32 would measure
    # two roundings rather than fedface's error.
    prepared = prepare_for_dp(_encoder(passes, pooling=pooling, num_layers=2))
    torch.manual_seed(4)
    head = MarginHead.cosface(DIM, 3, scale=8.0)
    exact_encoder, exact_head = copy.deepcopy(prepared).double(), copy.deepcopy(head).double()

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(exact_head(m(x), y), y, reduction="sum")

    expected = _per_example_grads(exact_encoder, loss_fn, faces.double(), face_labels)

    # Act
    compute_grad_samples(prepared, head, faces, face_labels)

    # Assert: every parameter, every example, max abs difference <= 1e-5
    for name, p in prepared.named_parameters():
        assert p.grad_sample.shape == (faces.shape[0], *p.shape), name
        for i in range(faces.shape[0]):
            torch.testing.assert_close(p.grad_sample[i].double(), expected[i][name], atol=1e-5, rtol=0, msg=f"{name}[{i}]")


@pytest.mark.parametrize("passes", [("rows",), ("rows", "columns")], ids="+".join)
def test_stem_encoder_per_sample_grads_match_per_example_backward(
    faces: torch.Tensor, face_labels: torch.Tensor, passes: tuple[str, ...]
) -> None:
    # Arrange: a conv-stem encoder with an expression head, as DP-SGD trains it; the
    # reference is the per-example float64 loop
    torch.manual_seed(5)
    prepared = prepare_for_dp(_encoder(passes, stem=(4, 8)))
    head = ExpressionHead(DIM, 3)
    exact_encoder, exact_head = copy.deepcopy(prepared).double(), copy.deepcopy(head).double()

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(exact_head(m(x)), y, reduction="sum")

    expected = _per_example_grads(exact_encoder, loss_fn, faces.double(), face_labels)

    # Act
    compute_grad_samples(prepared, head, faces, face_labels)

    # Assert: the stem's convolutions and GroupNorms too, every example
    names = [n for n, _ in prepared.named_parameters()]
    assert any(n.startswith("stem.") and n.endswith("weight") for n in names)
    for name, p in prepared.named_parameters():
        assert p.grad_sample.shape == (faces.shape[0], *p.shape), name
        for i in range(faces.shape[0]):
            torch.testing.assert_close(p.grad_sample[i].double(), expected[i][name], atol=2e-5, rtol=1e-4, msg=f"{name}[{i}]")


def test_frozen_stem_gets_no_per_sample_grads(faces: torch.Tensor, face_labels: torch.Tensor) -> None:
    prepared = prepare_for_dp(_encoder(("rows",), stem=(4,)))
    for p in prepared.stem.parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)

    compute_grad_samples(prepared, ExpressionHead(DIM, 3), faces, face_labels)

    assert all(getattr(p, "grad_sample", None) is None for p in prepared.stem.parameters())  # type: ignore[union-attr]
    assert prepared.rnns["rows"].weight_ih_l0.grad_sample is not None


def test_a_frozen_stem_in_bf16_leaves_every_per_sample_gradient_exact(faces: torch.Tensor, face_labels: torch.Tensor) -> None:
    # Arrange: training.precision = "bf16" under DP-SGD: the frozen stem runs in bfloat16.
    # The reference is the float64 per-example loop through the *same* bf16 stem features,
    # so the clipped gradients are exactly those of the function the model computes.
    torch.manual_seed(6)
    plain = _encoder(("rows",), stem=(4, 8))
    fast = to_per_sample(plain, frozen_stem_precision="bf16")
    for p in fast.stem.parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)
    head = ExpressionHead(DIM, 3)
    x = standardize(faces)
    bf16_features = fast._run_stem(x)  # training mode: the bf16 route
    with torch.no_grad():
        fp32_features = plain.stem(x)  # type: ignore[misc]
    assert bf16_features.dtype == torch.float32 and bf16_features.shape == fp32_features.shape
    assert not torch.equal(bf16_features, fp32_features)  # it did run in bf16 ...
    torch.testing.assert_close(bf16_features, fp32_features, atol=0.1, rtol=0.05)  # ... and computes the same stem
    exact_encoder, exact_head = copy.deepcopy(fast).double(), copy.deepcopy(head).double()
    expected = []
    for i in range(len(faces)):  # one float64 backward pass per example, from its bf16 features
        exact_encoder.zero_grad(set_to_none=True)
        exact_encoder._run_stem = lambda _x, i=i: bf16_features[i : i + 1].double()  # type: ignore[method-assign]
        F.cross_entropy(exact_head(exact_encoder(faces[i : i + 1].double())), face_labels[i : i + 1], reduction="sum").backward()
        expected.append({n: p.grad.detach().clone() for n, p in exact_encoder.named_parameters() if p.grad is not None})

    # Act
    compute_grad_samples(fast, head, faces, face_labels)

    # Assert: every trainable parameter, every example, as exact as in float32
    trained = [(n, p) for n, p in fast.named_parameters() if p.requires_grad]
    assert trained and not any(n.startswith("stem.") for n, _ in trained)
    for name, p in trained:
        for i in range(faces.shape[0]):
            torch.testing.assert_close(p.grad_sample[i].double(), expected[i][name], atol=1e-5, rtol=1e-4, msg=f"{name}[{i}]")


def test_bf16_applies_to_a_frozen_stem_in_training_only(faces: torch.Tensor) -> None:
    torch.manual_seed(7)
    plain = _encoder(("rows",), stem=(4, 8))
    fast = to_per_sample(plain, frozen_stem_precision="bf16")
    x = standardize(faces)
    with torch.no_grad():
        reference = plain.stem(x)  # type: ignore[misc]
        # a trainable stem (privacy.trainable = "all"): per-sample gradients flow there, float32
        assert torch.equal(fast.train()._run_stem(x), reference)
        for p in fast.stem.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
        # a stem frozen in part only still takes per-sample gradients: float32
        next(iter(fast.stem.parameters())).requires_grad_(True)  # type: ignore[union-attr]
        assert torch.equal(fast.train()._run_stem(x), reference)
        next(iter(fast.stem.parameters())).requires_grad_(False)  # type: ignore[union-attr]
        # evaluation stays float32, frozen or not
        assert torch.equal(fast.eval()._run_stem(x), reference)
        assert not torch.equal(fast.train()._run_stem(x), reference)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        to_per_sample(plain, frozen_stem_precision="fp16")


@pytest.mark.parametrize(
    "head_factory",
    [
        MarginHead.cosface,
        MarginHead.arcface,
    ],
    ids=["cosface", "arcface"],
)
def test_margin_head_per_sample_grads_match_per_example_backward(
    embeddings: torch.Tensor, face_labels: torch.Tensor, head_factory: object
) -> None:
    # Arrange
    torch.manual_seed(1)
    head = head_factory(DIM, 3, scale=8.0)  # type: ignore[operator]
    expected = _per_example_grads(head, _margin_loss, embeddings, face_labels)
    model = GradSampleModule(head, loss_reduction="sum")
    head.zero_grad(set_to_none=True)

    # Act
    _margin_loss(model, embeddings.clone().requires_grad_(True), face_labels).backward()

    # Assert
    assert head.weight.grad_sample.shape == (6, 3, DIM)
    for i in range(6):
        torch.testing.assert_close(head.weight.grad_sample[i], expected[i]["centres.weight"], atol=1e-4, rtol=1e-3)


def test_expression_head_has_per_sample_grads_matching_per_example_backward(embeddings: torch.Tensor) -> None:
    # Arrange
    torch.manual_seed(2)
    head = ExpressionHead(DIM, 3, hidden=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss_fn(m: nn.Module, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(e), y, reduction="sum")

    expected = _per_example_grads(head, loss_fn, embeddings, labels)
    model = GradSampleModule(head, loss_reduction="sum")
    head.zero_grad(set_to_none=True)

    # Act
    loss_fn(model, embeddings.clone().requires_grad_(True), labels).backward()

    # Assert
    for name, p in head.named_parameters():
        assert p.grad_sample.shape[0] == 6, name
        for i in range(6):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], atol=1e-5, rtol=1e-4)


# --- MarginHead logits -------------------------------------------------------------------------


def test_cosface_target_logit_is_scaled_cos_minus_margin(embeddings: torch.Tensor, face_labels: torch.Tensor) -> None:
    # Arrange
    torch.manual_seed(3)
    head = MarginHead.cosface(DIM, 3, scale=30.0, margin=0.35)
    cos = head.cosine(embeddings)
    target = F.one_hot(face_labels, 3).bool()

    # Act
    logits = head(embeddings, face_labels)

    # Assert
    torch.testing.assert_close(logits[target], 30.0 * (cos[target] - 0.35))
    torch.testing.assert_close(logits[~target], 30.0 * cos[~target])


def test_margin_head_without_labels_gives_scaled_cosines(embeddings: torch.Tensor) -> None:
    for head in (MarginHead.cosface(DIM, 3, scale=16.0), MarginHead.arcface(DIM, 3, scale=16.0)):
        torch.testing.assert_close(head(embeddings), 16.0 * head.cosine(embeddings))


def test_margin_head_cosine_is_cosine_similarity_to_class_centres(embeddings: torch.Tensor) -> None:
    head = MarginHead(DIM, 3)

    cos = head.cosine(embeddings)

    expected = F.cosine_similarity(embeddings[:, None, :], head.weight[None, :, :], dim=2)
    torch.testing.assert_close(cos, expected)


def _head_with_axes(num_classes: int, *, scale: float, m2: float) -> MarginHead:
    """An ArcFace head whose class centres are the first coordinate axes."""
    head = MarginHead(DIM, num_classes, scale=scale, m1=1.0, m2=m2, m3=0.0)
    with torch.no_grad():
        head.weight.copy_(torch.eye(num_classes, DIM))
    return head


def test_arcface_target_logit_is_scaled_cos_of_theta_plus_margin() -> None:
    # Arrange: embeddings at known angles theta to class 0 (rotating towards axis 3)
    thetas = torch.tensor([0.1, 0.6, 1.2, 2.0])
    emb = torch.zeros(4, DIM)
    emb[:, 0], emb[:, 3] = torch.cos(thetas), torch.sin(thetas)
    head = _head_with_axes(3, scale=30.0, m2=0.5)
    labels = torch.zeros(4, dtype=torch.long)

    # Act
    logits = head(emb, labels)

    # Assert
    torch.testing.assert_close(logits[:, 0], 30.0 * torch.cos(thetas + 0.5), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits[:, 1:], torch.zeros(4, 2), atol=1e-5, rtol=0)


def test_arcface_target_logit_past_pi_minus_margin_uses_monotonic_fallback() -> None:
    # Arrange: theta = 3.0 > pi - 0.5, where cos(theta + m) would turn back up
    theta = 3.0
    emb = torch.zeros(1, DIM)
    emb[0, 0], emb[0, 3] = math.cos(theta), math.sin(theta)
    head = _head_with_axes(2, scale=10.0, m2=0.5)

    # Act
    with torch.no_grad():
        logit = head(emb, torch.tensor([0]))[0, 0]

    # Assert
    expected = 10.0 * (math.cos(theta) - 0.5 * math.sin(0.5))
    assert float(logit) == pytest.approx(expected, abs=1e-4)
    assert float(logit) < 10.0 * math.cos(theta)


def test_margin_head_margin_lowers_target_logit(embeddings: torch.Tensor, face_labels: torch.Tensor) -> None:
    head = MarginHead.arcface(DIM, 3, scale=30.0, margin=0.5)

    with_margin = head(embeddings, face_labels).gather(1, face_labels.view(-1, 1))
    plain = head(embeddings).gather(1, face_labels.view(-1, 1))

    assert (with_margin < plain).all()


# --- builders ----------------------------------------------------------------------------------


def test_build_margin_head_arcface_maps_margin_to_m2() -> None:
    # Act
    head = build_margin_head(HeadConfig(kind="arcface", margin=0.5, scale=20.0), embedding_dim=DIM, num_classes=7)

    # Assert
    assert (head.m1, head.m2, head.m3) == (1.0, 0.5, 0.0)
    assert head.scale == 20.0
    assert head.weight.shape == (7, DIM)


def test_build_margin_head_cosface_maps_margin_to_m3() -> None:
    head = build_margin_head(HeadConfig(kind="cosface", margin=0.3), embedding_dim=DIM, num_classes=2)

    assert (head.m1, head.m2, head.m3) == (1.0, 0.0, 0.3)


def test_build_margin_head_combined_uses_given_margins() -> None:
    head = build_margin_head(HeadConfig(kind="combined", m1=1.1, m2=0.2, m3=0.05), embedding_dim=DIM, num_classes=2)

    assert (head.m1, head.m2, head.m3) == (1.1, 0.2, 0.05)


def test_build_encoder_maps_model_config_fields(faces: torch.Tensor) -> None:
    # Arrange
    cfg = ModelConfig(
        passes=("columns", "patches"),
        hidden_size=6,
        num_layers=2,
        bidirectional=False,
        pooling="last",
        patch_size=4,
        embedding_dim=DIM,
        dropout=0.1,
        downsample=2,
    )

    # Act
    encoder = build_encoder(cfg, image_size=SIZE)

    # Assert
    assert encoder.passes == ("columns", "patches")
    assert encoder.pooling == "last"
    assert encoder.patch_size == 4
    gru = encoder.rnns["patches"]
    assert (gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional) == (16, 6, 2, False)
    assert encoder.downsample == 2
    # columns of the image read at half size
    assert encoder.rnns["columns"].input_size == SIZE[0] // 2
    assert isinstance(encoder.neck.dropout, nn.Dropout)
    assert encoder.neck.dropout.p == pytest.approx(0.1)
    assert encoder.eval()(faces).shape == (faces.shape[0], DIM)


@pytest.mark.parametrize(
    ("trainable", "frozen"),
    [("all", set()), ("gru", {"stem"}), ("neck", {"stem", "rnns"})],
)
def test_freeze_for_keeps_the_named_parts_fixed(trainable: str, frozen: set[str]) -> None:
    from fedface.common.models import freeze_for

    encoder = _encoder(("rows",), stem=(4,))

    freeze_for(trainable, encoder)

    for name, p in encoder.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name


@pytest.mark.parametrize(
    ("trainable", "stem", "initialised", "warned"),
    [
        ("gru", (4,), False, "the convolutional stem at the random start"),
        ("neck", (4,), False, "the convolutional stem and the GRUs at the random start"),
        ("neck", (), False, "the GRUs at the random start"),
        ("gru", (), False, None),  # no stem: nothing is frozen
        ("gru", (4,), True, None),  # a checkpoint initialises what stays frozen
        ("all", (4,), False, None),
    ],
)
def test_parts_frozen_at_their_random_start_are_warned_about(
    trainable: str, stem: tuple[int, ...], initialised: bool, warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    from fedface.common.models import warn_frozen_at_random

    with caplog.at_level("WARNING", logger="fedface.common.models"):
        warn_frozen_at_random(trainable, _encoder(("rows",), stem=stem), initialised=initialised)

    if warned is None:
        assert not caplog.records
    else:
        [record] = caplog.records
        assert warned in record.getMessage() and "--init-from" in record.getMessage()


def test_load_shared_weights_of_another_head_size_names_the_mismatch() -> None:
    from fedface.common.models import load_shared_weights, shared_weights

    encoder = _encoder(("rows",))
    weights = shared_weights(encoder, ExpressionHead(DIM, 6))

    with pytest.raises(ValueError, match="server and site configs differ"):
        load_shared_weights(encoder, ExpressionHead(DIM, 7), weights)
