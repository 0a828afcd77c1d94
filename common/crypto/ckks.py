"""CKKS encryption of face templates and the encrypted 1:N score computation (Microsoft SEAL).

Why SEAL through ``seal-python`` and not a higher-level wrapper: TenSEAL's vector-matrix
product is about 4x slower for this packing, OpenFHE's wheel does not import on Python 3.11 and
Pyfhel has no 3.11 wheel (docs/templates.md, "Why these parameters"). What is written here by
hand is only the packing, which no library offers for this shape of search.

Parameters (:class:`TemplateParams`)
    Ring 8192 (4,096 slots), coefficient modulus [60, 40, 60] bits: SEAL's own check passes it
    as 128-bit secure (the ring allows 218 bits). Templates are encoded at scale 2^26; a query
    at 2^26 times the 40-bit prime, so that after its rotations one rescale brings it to the
    gallery's level at scale exactly 2^26. A score is then at scale 2^52 in a 60-bit modulus:
    room for values up to about 128 in magnitude, which the protected result
    (:meth:`TemplateEngine.protect`, at most 32) stays well inside.

Packing (diagonal, after Halevi and Shoup)
    A *block* holds up to 4,096 templates of dimension ``d`` (a power of two; shorter
    embeddings are padded with zeros, which changes no dot product) as ``d`` ciphertexts:
    ciphertext ``k`` holds, in slot ``j``, coordinate ``(j + k) mod d`` of template ``j``.
    The query is one ciphertext holding the template tiled ``4096 / d`` times. Its rotation
    by ``k`` puts coordinate ``(j + k) mod d`` of the query in slot ``j``, so the sum over
    ``k`` of rotation ``k`` times ciphertext ``k`` has the dot product of the query with
    template ``j`` in slot ``j``: ``d - 1`` rotations once per query (one Galois key, step 1,
    applied in a chain), then ``d`` ciphertext products and one relinearisation per block.

Nothing here decides who holds which key: :class:`TemplateEngine` does what the keys it is
given allow (sites and the server get the public bundle; only the key holder the secret key).
Ciphertexts are checked against the context when they are read (:meth:`load`): a ciphertext
of another parameter set, level or scale is refused with one line. seal-python silently
misreads non-contiguous numpy arrays, so every array is made contiguous before it is encoded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import seal

from fedface.common.errors import TemplateError

#: Slots per ciphertext, hence templates per block.
RING = 8192
SLOTS = RING // 2
#: Bits of the coefficient modulus primes: data, rescale, special (key switching).
MODULI = (60, 40, 60)
SCALE_BITS = 26
#: The largest magnitude a protected result may have (16 * 2): well inside 2^59 / 2^52.
MAX_PROTECTED = 32.0
#: Largest mask multiplier (the mask is a random integer in [2, MAX_MASK]).
MAX_MASK = 16

Level = Literal["gallery", "query", "result"]


def padded_dim(dim: int) -> int:
    """The packing's dimension for ``dim``-long templates: the next power of two."""
    if not 1 <= dim <= SLOTS:
        raise TemplateError(f"template dimension {dim} is not between 1 and {SLOTS}")
    return 1 << (dim - 1).bit_length()


@dataclass(frozen=True)
class TemplateParams:
    """A template encryption parameter set; :attr:`id` names it in every upload and query."""

    dim: int
    ring: int = RING
    moduli: tuple[int, ...] = MODULI
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if (self.ring, tuple(self.moduli), self.scale_bits) != (RING, MODULI, SCALE_BITS):
            raise TemplateError(
                f"unsupported template parameters ring={self.ring} moduli={list(self.moduli)} scale_bits={self.scale_bits}: "
                f"fedface uses ring {RING}, moduli {list(MODULI)}, scale 2^{SCALE_BITS}"
            )
        padded_dim(self.dim)

    @property
    def id(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical parameter JSON (and the scheme)."""
        text = json.dumps({"scheme": "ckks-diagonal/1", **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return {"dim": self.dim, "ring": self.ring, "moduli": list(self.moduli), "scale_bits": self.scale_bits}

    @classmethod
    def from_json(cls, obj: object) -> TemplateParams:
        if not isinstance(obj, dict) or not isinstance(obj.get("dim"), int):
            raise TemplateError(f"malformed template parameters {obj!r}: expected an object with dim, ring, moduli, scale_bits")
        try:
            return cls(dim=obj["dim"], ring=int(obj.get("ring", 0)), moduli=tuple(obj.get("moduli", ())), scale_bits=int(obj.get("scale_bits", 0)))
        except (TypeError, ValueError):
            raise TemplateError(f"malformed template parameters {obj!r}") from None


def _context() -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.scheme_type.ckks)
    parms.set_poly_modulus_degree(RING)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(RING, list(MODULI)))
    ctx = seal.SEALContext(parms, True, seal.sec_level_type.tc128)
    if not ctx.parameters_set():  # SEAL's own 128-bit security check
        raise TemplateError(f"SEAL refused the template parameters: {ctx.parameter_error_message()}")
    return ctx


@dataclass(frozen=True)
class KeyMaterial:
    """Serialised SEAL keys: the public bundle every party gets, and the secret key (key holder only)."""

    public_key: bytes
    relin_keys: bytes
    galois_keys: bytes
    secret_key: bytes | None = None


def generate_keys(dim: int = 128) -> KeyMaterial:
    """A fresh key set: public, relinearisation and three Galois keys (rotation by 1, for the
    packing; by the padded dimension, for the query's tiling check; complex conjugation, step 0,
    for the checks that slots are real), and the secret key."""
    ctx = _context()
    kg = seal.KeyGenerator(ctx)
    galois = seal.GaloisKeys()
    kg.create_galois_keys(sorted({0, 1, padded_dim(dim)}), galois)
    return KeyMaterial(
        public_key=kg.create_public_key().to_string(),
        relin_keys=kg.create_relin_keys().to_string(),
        galois_keys=galois.to_string(),
        secret_key=kg.secret_key().to_string(),
    )


class TemplateEngine:
    """Encryption, encrypted scoring and (with the secret key) decryption of templates."""

    def __init__(self, params: TemplateParams, keys: KeyMaterial) -> None:
        self.params = params
        self.dim = padded_dim(params.dim)
        self.ctx = _context()
        self._encoder = seal.CKKSEncoder(self.ctx)
        self._eval = seal.Evaluator(self.ctx)
        try:
            self._public = self.ctx.from_public_str(keys.public_key)
            self._relin = self.ctx.from_relin_str(keys.relin_keys)
            self._galois = self.ctx.from_galois_str(keys.galois_keys)
            secret = self.ctx.from_secret_str(keys.secret_key) if keys.secret_key is not None else None
        except Exception as exc:  # SEAL raises ValueError/RuntimeError/std exceptions on bad key bytes
            raise TemplateError(f"template keys do not fit the parameters {params.id}: {exc}") from None
        # rotation by 1 and by d, and conjugation (Galois element 2N - 1): key sets made before the
        # query checks lack some; refuse them here, not with an error in the middle of a search
        needed = {pow(3, 1, 2 * RING), pow(3, self.dim, 2 * RING), 2 * RING - 1}
        if not all(self._galois.has_key(e) for e in needed):
            raise TemplateError(f"the template keys of parameters {params.id} lack a Galois key the search needs (an older key set): "
                                "make a new one with `fedface keys templates --rotate` and re-enroll")
        self._encryptor = seal.Encryptor(self.ctx, self._public)
        self._decryptor = seal.Decryptor(self.ctx, secret) if secret is not None else None
        first = self.ctx.first_context_data()
        self._rescale_prime = float(first.parms().coeff_modulus()[-1].value())
        self._first = self.ctx.first_parms_id()
        self._last = self.ctx.last_parms_id()
        self.scale = float(2**SCALE_BITS)
        self.query_scale = self.scale * self._rescale_prime
        self.result_scale = self.scale * self.scale

    @property
    def can_decrypt(self) -> bool:
        return self._decryptor is not None

    # -- the site's side -------------------------------------------------------------------

    def _check_templates(self, templates: np.ndarray) -> np.ndarray:
        t = np.asarray(templates, dtype=np.float64)
        if t.ndim != 2 or t.shape[1] != self.params.dim:
            raise TemplateError(f"templates have shape {t.shape}, expected (n, {self.params.dim}) for parameters {self.params.id}")
        if not np.all(np.isfinite(t)):
            raise TemplateError("templates hold NaN or infinite values: recompute them with a valid encoder")
        norms = np.linalg.norm(t, axis=1)
        if np.any(np.abs(norms - 1.0) > 1e-3):
            raise TemplateError("templates must be unit length (cosine scores): normalise them first")
        if t.shape[1] < self.dim:
            t = np.pad(t, ((0, 0), (0, self.dim - t.shape[1])))
        return t

    def encrypt_block(self, templates: np.ndarray) -> list[bytes]:
        """``d`` ciphertexts (serialised) holding up to 4,096 unit templates in the diagonal packing."""
        t = self._check_templates(templates)
        n = len(t)
        if not 1 <= n <= SLOTS:
            raise TemplateError(f"a block holds 1 to {SLOTS} templates, got {n}")
        j = np.arange(n)
        out = []
        for k in range(self.dim):
            v = np.zeros(SLOTS)
            v[:n] = t[j, (j + k) % self.dim]
            plain = self._encoder.encode(np.ascontiguousarray(v), self.scale)
            self._eval.mod_switch_to_inplace(plain, self._last)
            out.append(self._encryptor.encrypt(plain).to_string())
        return out

    def encrypt_query(self, template: np.ndarray) -> bytes:
        """One ciphertext: the unit query template tiled over every slot, at the top level."""
        t = self._check_templates(np.asarray(template, dtype=np.float64).reshape(1, -1))[0]
        tiled = np.ascontiguousarray(np.tile(t, SLOTS // self.dim))
        return self._encryptor.encrypt(self._encoder.encode(tiled, self.query_scale)).to_string()

    # -- reading ciphertexts ---------------------------------------------------------------

    def load(self, data: bytes, level: Level) -> seal.Ciphertext:
        """Deserialise and validate a ciphertext of the given role; TemplateError if it does not fit."""
        ct = seal.Ciphertext()
        try:
            ct.load_bytes(self.ctx, data)  # SEAL validates it against the context
        except Exception as exc:
            raise TemplateError(f"malformed {level} ciphertext for parameters {self.params.id}: {exc}") from None
        want_parms, want_scale, want_size = {
            "gallery": (self._last, self.scale, 2),
            "query": (self._first, self.query_scale, 2),
            "result": (self._last, self.result_scale, 2),
        }[level]
        if ct.parms_id() != want_parms or ct.size() != want_size or not math.isclose(ct.scale(), want_scale, rel_tol=1e-9):
            raise TemplateError(
                f"{level} ciphertext has the wrong level, size or scale for parameters {self.params.id} "
                f"(scale 2^{math.log2(ct.scale()):.2f}, expected 2^{math.log2(want_scale):.2f}): it was made with other parameters"
            )
        return ct

    # -- the server's side -----------------------------------------------------------------

    def rotations(self, query: seal.Ciphertext) -> list[seal.Ciphertext]:
        """The query's ``d`` rotations (0 .. d-1), rescaled to the gallery's level: once per query."""
        rots = [query]
        cur = query
        for _ in range(1, self.dim):
            cur = self._eval.rotate_vector(cur, 1, self._galois)
            rots.append(cur)
        return [self._eval.rescale_to_next(r) for r in rots]

    def score_block(self, rotations: Sequence[seal.Ciphertext], block: Sequence[seal.Ciphertext]) -> seal.Ciphertext:
        """Encrypted scores of one block: slot ``j`` holds the query's cosine with template ``j``."""
        if len(block) != self.dim or len(rotations) != self.dim:
            raise TemplateError(f"a block has {self.dim} ciphertexts for parameters {self.params.id}, got {len(block)}")
        acc = self._eval.multiply(rotations[0], block[0])
        for k in range(1, self.dim):
            self._eval.add_inplace(acc, self._eval.multiply(rotations[k], block[k]))
        self._eval.relinearize_inplace(acc, self._relin)
        return acc

    def _sum_of_squares_minus_one(self, cts: Sequence[seal.Ciphertext]) -> seal.Ciphertext:
        acc = self._eval.square(cts[0])
        for ct in cts[1:]:
            self._eval.add_inplace(acc, self._eval.square(ct))
        self._eval.relinearize_inplace(acc, self._relin)
        one = self._encoder.encode(np.full(SLOTS, -1.0), acc.scale())
        self._eval.mod_switch_to_inplace(one, acc.parms_id())
        self._eval.add_plain_inplace(acc, one)
        return acc

    def rotated_query(self, rotations: Sequence[seal.Ciphertext], rotation: np.ndarray) -> seal.Ciphertext:
        """``rotation @ q`` under encryption, in slot ``j`` its coordinate ``j mod d`` (for a tiled
        query): the diagonal method again, with plaintext diagonals. Linear, so unlike a sum of
        squares it cannot wrap around the modulus into a plausible value; with a random
        orthogonal ``rotation`` kept secret by the server, the key holder learns from it the
        query's norm and nothing of its direction."""
        r = np.asarray(rotation, dtype=np.float64)
        if r.shape != (self.dim, self.dim):
            raise TemplateError(f"a query rotation is {self.dim} x {self.dim}, got {r.shape}")
        j = np.arange(SLOTS)
        acc = None
        for k in range(self.dim):
            diag = self._encoder.encode(np.ascontiguousarray(r[j % self.dim, (j + k) % self.dim]), self.scale)
            self._eval.mod_switch_to_inplace(diag, rotations[k].parms_id())
            term = self._eval.multiply_plain(rotations[k], diag)
            acc = term if acc is None else self._eval.add(acc, term)
        assert acc is not None
        return acc

    def query_checks(self, query: seal.Ciphertext, rotations: Sequence[seal.Ciphertext]) -> tuple[seal.Ciphertext, ...]:
        """What lets the key holder refuse a query that is not one unit template, tiled.

        CKKS slots are complex numbers, and a site that skips its client can put anything in
        them. ``tiling``: the query minus its rotation by ``d`` (zero in every slot when every
        tile is the same template). ``imag``: the query minus its complex conjugate (zero in
        every slot when every slot is real). With :meth:`rotated_query` (the norm, which a sum of
        squares cannot give safely: it is only known modulo the headroom, so ``sqrt(1 + 256)``
        times a basis vector would pass it) these stop a site from sending a scaled or mixed
        query and reading a template back coordinate by coordinate from threshold decisions.
        """
        tiling = self._eval.sub(query, self._eval.rotate_vector(query, self.dim, self._galois))
        imag = self._eval.sub(query, self._eval.complex_conjugate(query, self._galois))
        return tiling, imag

    def block_checks(self, block: Sequence[seal.Ciphertext], signs: Sequence[Sequence[int]]) -> list[seal.Ciphertext]:
        """What lets the key holder refuse an enrollment that is not unit templates.

        First: in slot ``j`` the sum of the squares of template ``j``'s coordinates, minus one
        (-1 in an empty slot). CKKS slots are complex, and ``(a + ib)^2 = a^2 - b^2 + 2iab``
        lets an imaginary part cancel a scaled-up real part in that sum; so then, for each
        row of ``signs`` (random +-1 per ciphertext, drawn by the server after the upload), the
        signed sum of the block's ciphertexts: its imaginary part is zero in every slot only if
        the templates are real (a site cannot cancel a sign pattern it does not know).
        Additions only, no key switching: the checks are as precise as the ciphertexts.
        """
        if len(block) != self.dim or any(len(row) != self.dim or any(s not in (-1, 1) for s in row) for row in signs):
            raise TemplateError(f"a block has {self.dim} ciphertexts for parameters {self.params.id}, got {len(block)}")
        out = [self._sum_of_squares_minus_one(block)]
        for row in signs:
            acc = seal.Ciphertext(block[0]) if row[0] > 0 else self._eval.negate(block[0])
            for s, ct in zip(row[1:], block[1:], strict=True):
                if s > 0:
                    self._eval.add_inplace(acc, ct)
                else:
                    self._eval.sub_inplace(acc, ct)
            out.append(acc)
        return out

    def protect(self, scores: seal.Ciphertext, mask: int, threshold: float) -> seal.Ciphertext:
        """``mask * (score - threshold)`` under encryption: the key holder sees the sign, not the score.

        ``mask`` is a fresh random integer in [2, 16] per query, encoded exactly (scale 1), so the
        result stays at the scores' level and scale.
        """
        if not 2 <= mask <= MAX_MASK or not -1.0 <= threshold <= 1.0:
            raise TemplateError(f"mask {mask} or threshold {threshold} out of range")
        factor = self._encoder.encode(int(mask))
        self._eval.mod_switch_to_inplace(factor, scores.parms_id())
        out = self._eval.multiply_plain(scores, factor)
        shift = self._encoder.encode(np.full(SLOTS, -mask * threshold), out.scale())
        self._eval.mod_switch_to_inplace(shift, out.parms_id())
        self._eval.add_plain_inplace(out, shift)
        return out

    # -- the key holder's side -------------------------------------------------------------

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        """The slots' values, real parts (key holder only; never hand these out: see fedface.server.keyholder)."""
        if self._decryptor is None:
            raise TemplateError("this party holds no template secret key: only the key holder decrypts")
        return np.asarray(self._encoder.decode(self._decryptor.decrypt(ct)), dtype=np.float64)

    def decrypt_complex(self, ct: seal.Ciphertext) -> np.ndarray:
        """The slots' complex values (key holder only: for the checks that slots are real)."""
        if self._decryptor is None:
            raise TemplateError("this party holds no template secret key: only the key holder decrypts")
        return np.asarray(self._encoder.decode_complex(self._decryptor.decrypt(ct)), dtype=np.complex128)


def encoder_id(state: dict[str, object]) -> str:
    """A gallery version's name: first 16 hex digits of the SHA-256 of an encoder's weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        arr = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else np.asarray(value)
        h.update(name.encode() + b"\0" + str(arr.dtype).encode() + str(arr.shape).encode() + b"\0")
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "MAX_MASK",
    "MAX_PROTECTED",
    "MODULI",
    "RING",
    "SCALE_BITS",
    "SLOTS",
    "KeyMaterial",
    "Level",
    "TemplateEngine",
    "TemplateParams",
    "encoder_id",
    "generate_keys",
    "padded_dim",
]
