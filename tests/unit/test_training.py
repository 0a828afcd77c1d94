"""Unit tests for fedface.common.training: batching, devices, one epoch, embedding, prediction.

Training runs on 40 real ORL faces (4 identities x 10) at 32x32 with a tiny GRU encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedface.common.data import AugmentConfig, load_faces, to_tensor
from fedface.common.errors import ConfigError
from fedface.common.models import ExpressionHead, GRUFaceEncoder, MarginHead
from fedface.common.training import (
    EpochStats,
    embed,
    head_logits,
    predict,
    select_device,
    shift_image,
    shuffled_batches,
    train_epoch,
    tta_views,
)

CPU = torch.device("cpu")
DIM = 8


@pytest.fixture(scope="module")
def orl_four(orl_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All 40 ORL faces of identities s1..s4 at 32x32, and their labels 0..3."""
    faces = load_faces(orl_root, size=(32, 32))
    keep = np.flatnonzero(faces.labels < 4)
    return to_tensor(faces.images[keep]).clone(), torch.from_numpy(faces.labels[keep]).clone()


def _encoder(seed: int = 0) -> GRUFaceEncoder:
    torch.manual_seed(seed)
    return GRUFaceEncoder(image_size=(32, 32), passes=("rows",), hidden_size=8, embedding_dim=DIM, downsample=2)


# --- shuffled_batches --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size"), [(23, 5), (20, 5), (3, 8), (1, 1)])
def test_shuffled_batches_cover_each_index_exactly_once(n: int, batch_size: int) -> None:
    # Act
    batches = list(shuffled_batches(n, batch_size, torch.Generator().manual_seed(0)))

    # Assert
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 1 <= len(batches[-1]) <= batch_size


def test_shuffled_batches_same_seed_gives_same_batches() -> None:
    a = list(shuffled_batches(50, 8, torch.Generator().manual_seed(3)))
    b = list(shuffled_batches(50, 8, torch.Generator().manual_seed(3)))

    assert [x.tolist() for x in a] == [y.tolist() for y in b]


def test_shuffled_batches_shuffle_and_differ_between_seeds() -> None:
    a = torch.cat(list(shuffled_batches(50, 8, torch.Generator().manual_seed(3))))
    b = torch.cat(list(shuffled_batches(50, 8, torch.Generator().manual_seed(4))))

    assert a.tolist() != list(range(50))
    assert a.tolist() != b.tolist()


def test_shuffled_batches_of_nothing_is_empty() -> None:
    assert list(shuffled_batches(0, 4, torch.Generator().manual_seed(0))) == []


# --- select_device -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks CUDA where it is present")
def test_select_device_auto_without_cuda_is_cpu() -> None:
    assert select_device("auto") == CPU


def test_select_device_cpu_is_cpu() -> None:
    assert select_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_select_device_cuda_without_cuda_raises_clear_error() -> None:
    with pytest.raises(ConfigError, match="device 'cuda' requested but CUDA is not available"):
        select_device("cuda")


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x", ""])
def test_select_device_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        select_device(name)


# --- train_epoch -------------------------------------------------------------------------------


def test_train_epoch_lowers_loss_on_real_faces(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, labels = orl_four
    encoder = _encoder()
    head = MarginHead.cosface(DIM, 4, scale=16.0, margin=0.2)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    # Act
    stats = [
        train_epoch(
            encoder=encoder,
            head=head,
            images=images,
            labels=labels,
            optimizer=optimizer,
            batches=shuffled_batches(len(images), 10, generator),
            augment_cfg=None,
            generator=generator,
            device=CPU,
            epoch=epoch,
        )
        for epoch in range(15)
    ]

    # Assert
    assert stats[-1].loss < 0.3 * stats[0].loss
    assert stats[-1].train_accuracy >= 0.9
    assert all(isinstance(s, EpochStats) and s.images == 40 for s in stats)
    assert [s.epoch for s in stats] == list(range(15))
    assert all(np.isfinite(s.loss) and 0.0 <= s.train_accuracy <= 1.0 for s in stats)


def test_train_epoch_with_augmentation_and_scheduler_reports_stats(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, labels = orl_four
    encoder = _encoder()
    head = ExpressionHead(DIM, 4)
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generator = torch.Generator().manual_seed(0)

    # Act: 40 images in batches of 16 -> 3 scheduler steps
    stats = train_epoch(
        encoder=encoder,
        head=head,
        images=images,
        labels=labels,
        optimizer=optimizer,
        batches=shuffled_batches(len(images), 16, generator),
        augment_cfg=AugmentConfig(),
        generator=generator,
        device=CPU,
        epoch=3,
        scheduler=scheduler,
    )

    # Assert
    assert stats.images == 40
    assert stats.epoch == 3
    assert stats.lr == pytest.approx(0.1 * 0.5**3)
    assert np.isfinite(stats.loss)
    assert stats.seconds > 0
    assert stats.images_per_s == pytest.approx(40 / stats.seconds)


def test_train_epoch_skips_empty_batches(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = orl_four
    encoder = _encoder()
    head = MarginHead.cosface(DIM, 4)
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.01)
    batches = [torch.arange(0, 6), torch.zeros(0, dtype=torch.long), torch.arange(6, 10)]

    stats = train_epoch(
        encoder=encoder, head=head, images=images, labels=labels, optimizer=optimizer, batches=batches,
        augment_cfg=None, generator=torch.Generator().manual_seed(0), device=CPU, epoch=0,
    )

    assert stats.images == 10


def test_epoch_stats_images_per_s_with_zero_seconds_is_infinite() -> None:
    stats = EpochStats(epoch=0, loss=1.0, train_accuracy=0.5, lr=0.1, seconds=0.0, images=10)

    assert stats.images_per_s == float("inf")


def test_head_logits_applies_margin_only_to_margin_heads() -> None:
    emb = F.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 1, 2, 0])
    margin_head = MarginHead.cosface(DIM, 3, scale=10.0, margin=0.3)
    plain_head = ExpressionHead(DIM, 3)

    with torch.no_grad():
        assert torch.equal(head_logits(margin_head, emb, labels), margin_head(emb, labels))
        assert torch.equal(head_logits(margin_head, emb, None), margin_head(emb))
        assert torch.equal(head_logits(plain_head, emb, labels), plain_head(emb))


# --- embed and predict -------------------------------------------------------------------------


def test_embed_returns_unit_norm_float_array(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, _ = orl_four

    # Act
    emb = embed(_encoder(), images[:12], device=CPU, flip_tta=False)

    # Assert
    assert isinstance(emb, np.ndarray)
    assert emb.shape == (12, DIM)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_embed_is_deterministic_and_batch_size_independent(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange: dropout on, so train mode would differ between calls
    images, _ = orl_four
    torch.manual_seed(0)
    encoder = GRUFaceEncoder(image_size=(32, 32), passes=("rows",), hidden_size=8, embedding_dim=DIM, dropout=0.5)

    # Act
    first = embed(encoder, images[:12], device=CPU)
    second = embed(encoder, images[:12], device=CPU, batch_size=5)

    # Assert
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_embed_restores_training_mode(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = orl_four
    encoder = _encoder().train()

    embed(encoder, images[:2], device=CPU)

    assert encoder.training


def test_embed_flip_tta_is_normalised_sum_with_mirror_image(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, _ = orl_four
    x = images[:8]
    encoder = _encoder().eval()

    # Act
    emb = embed(encoder, x, device=CPU, flip_tta=True)

    # Assert
    with torch.no_grad():
        expected = F.normalize(encoder(x) + encoder(x.flip(-1)), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert not np.allclose(emb, embed(encoder, x, device=CPU, flip_tta=False), atol=1e-3)


def test_shift_image_moves_content_and_replicates_the_uncovered_edge() -> None:
    # Arrange
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)

    # Act
    down = shift_image(x, 2, 0)
    left = shift_image(x, 0, -1)

    # Assert
    assert torch.equal(down[..., 2:, :], x[..., :-2, :])
    assert torch.equal(down[..., 0, :], x[..., 0, :]) and torch.equal(down[..., 1, :], x[..., 0, :])
    assert torch.equal(left[..., :, :-1], x[..., :, 1:])
    assert torch.equal(left[..., :, -1], x[..., :, -1])
    assert torch.equal(shift_image(x, 0, 0), x)


@pytest.mark.parametrize(("flip", "shift", "count"), [(False, 0, 1), (True, 0, 2), (False, 2, 5), (True, 3, 10)])
def test_tta_views_counts_every_shift_and_mirror(flip: bool, shift: int, count: int) -> None:
    x = torch.rand(2, 1, 8, 8)

    views = tta_views(x, flip_tta=flip, shift_tta=shift)

    assert len(views) == count
    assert torch.equal(views[0], x)
    assert all(v.shape == x.shape for v in views)


def test_embed_shift_tta_is_normalised_sum_over_all_views(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, _ = orl_four
    x = images[:6]
    encoder = _encoder().eval()

    # Act
    emb = embed(encoder, x, device=CPU, flip_tta=True, shift_tta=2)

    # Assert
    with torch.no_grad():
        views = [x] + [shift_image(x, dy, dx) for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2))]
        total = sum(encoder(v) + encoder(v.flip(-1)) for v in views)
        expected = F.normalize(total, dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert not np.allclose(emb, embed(encoder, x, device=CPU, flip_tta=True), atol=1e-4)


def test_embed_of_no_images_is_empty(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = orl_four

    emb = embed(_encoder(), images[:0], device=CPU)

    assert emb.shape[0] == 0


def test_predict_returns_class_index_per_image(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange
    images, _ = orl_four
    encoder = _encoder()
    head = MarginHead.cosface(DIM, 4)
    x = images[::4]

    # Act
    pred = predict(encoder, head, x, device=CPU)

    # Assert
    assert pred.shape == (10,)
    assert np.issubdtype(pred.dtype, np.integer)
    assert pred.min() >= 0 and pred.max() < 4
    emb = torch.from_numpy(embed(encoder, x, device=CPU))
    with torch.no_grad():
        np.testing.assert_array_equal(pred, head.cosine(emb).argmax(dim=1).numpy())


def test_predict_after_training_recognises_training_faces(orl_four: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Arrange: a few epochs on the 40 faces
    images, labels = orl_four
    encoder = _encoder()
    head = ExpressionHead(DIM, 4)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(12):
        train_epoch(
            encoder=encoder, head=head, images=images, labels=labels, optimizer=optimizer,
            batches=shuffled_batches(len(images), 10, generator), augment_cfg=None,
            generator=generator, device=CPU, epoch=epoch,
        )

    # Act
    pred = predict(encoder, head, images, device=CPU, flip_tta=False)

    # Assert
    assert np.mean(pred == labels.numpy()) >= 0.9
