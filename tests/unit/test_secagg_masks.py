"""SecAgg+ masks from ChaCha20 (fedface.common.crypto.masks) and the check of an unmasked sum
(fedface.server.secagg.check_unmasked_sum)."""

from __future__ import annotations

import importlib
import os
import types

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_generator

from fedface.common.crypto import masks
from fedface.server.secagg import UnmaskedSumError, _SumBounds, check_unmasked_sum

# the modules (their packages export same-named objects)
flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
flower_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

SHAPES = [(3, 4), (), (7,), (2, 2, 2)]


def test_masks_have_flowers_shapes_and_dtype_and_cover_the_ring() -> None:
    out = masks.mask_arrays(os.urandom(32), 2**22, SHAPES)

    assert [a.shape for a in out] == SHAPES
    assert all(a.dtype == np.int64 for a in out)
    assert all(0 <= int(a.min()) and int(a.max()) < 2**22 for a in out)


@pytest.mark.parametrize("num_range", [2**22, 2**32])
def test_masks_are_uniform_over_the_whole_ring(num_range: int) -> None:
    # 200,000 draws: the mean within 1 % of the middle, every top-eighth of the ring reached.
    (values,) = masks.mask_arrays(os.urandom(32), num_range, [(200_000,)])

    assert abs(values.mean() / (num_range / 2) - 1) < 0.01
    assert np.bincount(values * 8 // num_range, minlength=8).min() > 200_000 / 8 * 0.95
    assert int(values.max()) > num_range * 0.999  # Flower's randint(0, n - 1) never draws n - 1; these reach the top


def test_the_same_seed_gives_the_same_masks_and_another_seed_others() -> None:
    seed = os.urandom(32)

    a, b = masks.mask_arrays(seed, 2**32, [(1000,)]), masks.mask_arrays(seed, 2**32, [(1000,)])
    c = masks.mask_arrays(os.urandom(32), 2**32, [(1000,)])

    np.testing.assert_array_equal(a[0], b[0])
    assert np.count_nonzero(a[0] == c[0]) < 5


def test_seeds_that_flower_folds_alike_give_flower_the_same_mask_and_fedface_different_ones() -> None:
    # Flower XOR-folds the seed to 32 bits: flipping the same bits in two 4-byte words keeps the
    # fold, so two unrelated-looking keys give Flower one mask. The whole key keys fedface's.
    seed = bytearray(os.urandom(32))
    other = bytearray(seed)
    for i in range(4):
        other[i] ^= 0x5A
        other[8 + i] ^= 0x5A

    flower_a, flower_b = flower_generator(bytes(seed), 2**32, [(64,)]), flower_generator(bytes(other), 2**32, [(64,)])
    ours_a, ours_b = masks.mask_arrays(bytes(seed), 2**32, [(64,)]), masks.mask_arrays(bytes(other), 2**32, [(64,)])

    np.testing.assert_array_equal(flower_a[0], flower_b[0])
    assert np.count_nonzero(ours_a[0] == ours_b[0]) == 0
    assert np.count_nonzero(ours_a[0] == flower_a[0]) == 0  # and they are not Flower's masks


def test_pairwise_masks_from_flowers_key_agreement_cancel_exactly() -> None:
    # Three sites with Flower's ECDH keys: each adds the masks of its pairs with a higher id and
    # subtracts those with a lower one, plus its private mask; the ring sum less the private masks
    # is the plain sum, to the integer.
    mod, shapes = 2**32, [(5, 3), ()]
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    values = [[np.arange(15, dtype=np.int64).reshape(5, 3) * (i + 1), np.array(7 * i, dtype=np.int64)] for i in range(3)]
    private = [os.urandom(32) for _ in range(3)]
    total = [np.zeros(s, dtype=np.int64) for s in shapes]
    for i in range(3):
        vec = [v + m for v, m in zip(values[i], masks.mask_arrays(private[i], mod, shapes), strict=True)]
        for j in range(3):
            if j != i:
                pair = masks.mask_arrays(generate_shared_key(keys[i], keys[j].public_key()), mod, shapes)
                vec = [v + m if i > j else v - m for v, m in zip(vec, pair, strict=True)]
        total = [(t + v) % mod for t, v in zip(total, vec, strict=True)]
    for i in range(3):
        total = [(t - m) % mod for t, m in zip(total, masks.mask_arrays(private[i], mod, shapes), strict=True)]

    for t, expected in zip(total, [sum(v[k] for v in values) for k in range(2)], strict=True):
        np.testing.assert_array_equal(t, expected)


@pytest.mark.parametrize(("num_range", "seed"), [(3 * 2**20, b"k" * 32), (2**33, b"k" * 32), (2**22, b"short")])
def test_a_modulus_that_is_not_a_power_of_two_or_a_short_seed_is_refused(num_range: int, seed: bytes) -> None:
    with pytest.raises(ValueError, match="power of two|at least 16 bytes"):
        masks.mask_arrays(seed, num_range, [(4,)])


def test_fedface_installs_its_generator_into_flowers_mod_and_workflow() -> None:
    import fedface.client.app  # noqa: F401  (installs into the mod)
    import fedface.server.app  # noqa: F401  (installs into the workflow)

    assert masks.installed(flower_mod) and masks.installed(flower_workflow)
    assert flower_mod.pseudo_rand_gen is not flower_generator


def test_installing_into_a_flower_without_the_generator_fails_loudly() -> None:
    changed = types.ModuleType("flwr.changed_secaggplus")

    with pytest.raises(RuntimeError, match="no pseudo_rand_gen to replace"):
        masks.install(changed)


# --- the unmasked sum ----------------------------------------------------------------------------

QR = 2**22
BOUNDS = _SumBounds(vectors=3, factor=3 * 1000, quantization_range=QR, mod_range=2**32)


def test_an_honest_sum_passes() -> None:
    vector = [np.array([0, 3 * QR, QR], dtype=np.int64)]

    check_unmasked_sum(BOUNDS, 3000, vector)  # the extremes are honest


@pytest.mark.parametrize(
    ("factor", "vector", "match"),
    [
        pytest.param(3001, [np.array([5], dtype=np.int64)], "weight factor is 3001, not the 3000", id="factor"),
        pytest.param(3000, [np.array([3 * QR + 1, 0], dtype=np.int64)], "1 of 2 unmasked values lie outside", id="above"),
        pytest.param(3000, [np.array([2**31, 2**31 + 5], dtype=np.int64)], "2 of 2 unmasked values", id="wrapped"),
    ],
)
def test_a_sum_honest_sites_cannot_produce_is_refused(factor: int, vector: list[np.ndarray], match: str) -> None:
    with pytest.raises(UnmaskedSumError, match=match):
        check_unmasked_sum(BOUNDS, factor, vector)
