"""SecAgg+ masks from a cryptographic stream, in place of Flower 1.42's 32-bit-seeded generator.

Flower 1.42 expands every SecAgg+ mask with ``pseudo_rand_gen``
(``flwr/common/secure_aggregation/secaggplus_utils.py``): it XOR-folds the seed (a site's
32-byte private-mask seed, or the pairwise key two sites agreed by ECDH + HKDF) into 32 bits
and seeds numpy's Mersenne Twister with them. Every mask then comes from one of 2^32 streams,
whatever the key agreement offered, and MT19937 is not a cryptographic generator (its state
follows from 624 outputs). A server that knows a site's masked vector and wants its update
needs only to search 2^32 seeds per neighbour's mask: docs/threat-model.md.

:func:`mask_arrays` keeps Flower's signature and replaces the expansion: the whole seed goes
through HKDF-SHA256 (with a label of its own, so that the mask key is never the key Flower
derived for anything else) to a 256-bit ChaCha20 key, whose keystream gives the masks,
uniform over the whole ring ``[0, num_range)`` (Flower requires a power of two, so a mask is
the stream's 32-bit words reduced by a bit mask, with no bias). Each seed masks one vector
once: the private seed is fresh each round, and so is each pairwise key (new ECDH key pairs
every round), so a zero nonce is safe.

Both sides must expand alike, or the unmasked sum is noise. The server names the scheme in
SecAgg+'s set-up message (:data:`MASK_SCHEME_KEY`) and every site echoes it in its reply: a
site refuses a server that does not ask for it, and the server drops from the round a site
that does not echo it (a plain Flower ClientApp): see :mod:`fedface.client.app` and
:mod:`fedface.server.app`, which install the generator into Flower's mod and workflow
(:func:`install`).

Written here, not taken from a library: ``cryptography`` supplies ChaCha20 and HKDF; what is
fedface's is only the mapping of the stream onto Flower's mask arrays (a dozen lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The mask scheme fedface's SecAgg+ uses; versioned, so that a change is never silent.
MASK_SCHEME = "fedface-chacha20-hkdf-sha256-v1"
#: The key naming it in SecAgg+'s set-up configs (server to site) and in each site's set-up reply.
MASK_SCHEME_KEY = "fedface.mask-scheme"

_HKDF_INFO = b"fedface secagg+ mask v1"
_NONCE = bytes(16)  # ChaCha20 in `cryptography`: a 4-byte counter and a 12-byte nonce, both 0
_MAX_RANGE = 2**32  # Flower's bound on `modulus_range`


def mask_key(seed: bytes) -> bytes:
    """The 256-bit ChaCha20 key of a SecAgg+ seed (HKDF-SHA256 over the whole seed)."""
    if len(seed) < 16:
        raise ValueError(f"a SecAgg+ mask seed must have at least 16 bytes, got {len(seed)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(seed)


def mask_arrays(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks for arrays of the given shapes, uniform over ``[0, num_range)``, as int64.

    A drop-in for Flower's ``pseudo_rand_gen(seed, num_range, dimensions_list)``: the same
    shapes (a 0-d array for ``()``) and dtype; the values come from ChaCha20 keyed by
    :func:`mask_key` of ``seed``. ``num_range`` must be a power of two of at most 2^32 (Flower's
    own rule for SecAgg+'s modulus).
    """
    if num_range < 2 or num_range > _MAX_RANGE or num_range & (num_range - 1):
        raise ValueError(f"the SecAgg+ modulus must be a power of two in [2, 2^32], got {num_range}")
    sizes = [math.prod(shape) for shape in dimensions_list]
    encryptor = Cipher(algorithms.ChaCha20(mask_key(seed), _NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(4 * sum(sizes))), dtype="<u4")
    values = (words & np.uint32(num_range - 1)).astype(np.int64) if num_range < _MAX_RANGE else words.astype(np.int64)
    out: list[np.ndarray] = []
    start = 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        out.append(values[start : start + size].reshape(shape))
        start += size
    return out


def install(module: ModuleType) -> None:
    """Make ``module`` (Flower's SecAgg+ client mod or server workflow) expand its masks with
    :func:`mask_arrays`: both call the ``pseudo_rand_gen`` they imported, by name, at each use.

    Replacing that one name (rather than copying Flower's 1,200 lines of protocol to change a
    call) keeps Flower's protocol code as it is. A Flower release that stops importing the name
    fails here, loudly, instead of masking with its own generator again.
    """
    if not callable(getattr(module, "pseudo_rand_gen", None)):
        raise RuntimeError(
            f"{module.__name__} has no pseudo_rand_gen to replace: this Flower release changed its SecAgg+ code; "
            "fedface's mask generator cannot be installed (use the Flower version pyproject.toml pins)"
        )
    module.pseudo_rand_gen = mask_arrays  # type: ignore[attr-defined]


def installed(module: ModuleType) -> bool:
    """Whether ``module`` masks with :func:`mask_arrays`."""
    return getattr(module, "pseudo_rand_gen", None) is mask_arrays


__all__ = ["MASK_SCHEME", "MASK_SCHEME_KEY", "install", "installed", "mask_arrays", "mask_key"]
