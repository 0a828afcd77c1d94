"""Encrypted templates (issue #11): every privacy claim of docs/templates.md, and every refusal.

Templates are real faces: eigenface projections (128 components, unit length) of ORL images,
fitted on the first 20 identities. Each property is checked where it is enforced: the CKKS
engine, the envelope, the gallery server, the key holder and the site's client.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from fedface.client.enroll import TemplateClient, person_templates
from fedface.common.crypto import keyfiles as kf
from fedface.common.crypto.ckks import TemplateEngine, TemplateParams, generate_keys
from fedface.common.crypto.envelope import (
    MAX_AGE_S,
    REQUEST_CONTEXT,
    NonceStore,
    new_signing_key,
    open_signed_frame,
    pack_frame,
    sign_frame,
    make_envelope,
    open_envelope,
    parse_envelope,
    unpack_frame,
)
from fedface.common.data.sources import load_faces
from fedface.common.eigenfaces import Eigenfaces
from fedface.common.errors import KeyFileError, TemplateError
from fedface.server.gallery import Gallery
from fedface.server.keyholder import FLOOD_SIGMA, KeyHolder, decide

ENCODER = "eigenfaces-orl-20"
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> dict[str, np.ndarray]:
    """ORL embeddings: 40 people, images 0-4 of each enrolled, 5-9 as probes."""
    fs = load_faces(orl_root)
    fit = np.isin(fs.labels, np.arange(20))
    emb = Eigenfaces(n_components=128).fit(fs.images[fit]).embed(fs.images)
    idx = np.arange(len(fs.labels))
    order = np.argsort(fs.labels, kind="stable")
    rank = np.empty_like(idx)
    for k in range(fs.num_identities):
        members = order[fs.labels[order] == k]
        rank[members] = np.arange(len(members))
    enrolled = rank < 5
    names = [f"p{k}" for k in range(fs.num_identities)]
    people, templates = person_templates(emb[enrolled], fs.labels[enrolled], names)
    return {"emb": emb, "labels": fs.labels, "probe": idx[~enrolled], "people": np.array(people), "templates": templates}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("keys")
    kf.create_template_keys(d / "holder", dim=128)
    sites = d / "sites"
    sites.mkdir()
    registry = kf.SiteKeys(sites)
    signing = {}
    for name in ("hospital-a", "campus-b"):
        pair = kf.create_signing_key(d / name, "site-signing")
        registry.register(name, pair.public_key)
        signing[name] = kf.load_signing_key(pair.private_key)
    return {
        "public": kf.load_template_context(d / "holder"),
        "secret": kf.load_template_context(d / "holder", d / "holder"),
        "dir": d,
        "registry": registry,
        "signing": signing,
        "server_key": new_signing_key(),
    }


class Recording:
    """The key holder as the gallery reaches it, keeping every request it was sent."""

    def __init__(self, holder: KeyHolder) -> None:
        self.holder = holder
        self.requests: list[bytes] = []

    def check_enrollment(self, data: bytes) -> None:
        self.requests.append(data)
        self.holder.check_enrollment(data)

    def decide(self, data: bytes) -> bytes:
        self.requests.append(data)
        return self.holder.decide(data)


def _gallery(path: Path, keys: dict[str, object], port: object, **kw: object) -> Gallery:
    return Gallery(path, keys["public"], keys["registry"], keyholder=port, signing_key=keys["server_key"], threshold=THRESHOLD, **kw)


@pytest.fixture
def world(tmp_path: Path, keys: dict[str, object], faces: dict[str, np.ndarray]) -> dict[str, object]:
    """A gallery with hospital-a's first 20 people and campus-b's other 20, and a key holder."""
    holder = KeyHolder(tmp_path / "holder", keys["secret"], keys["registry"], keys["server_key"].public_key(), seed=0)
    port = Recording(holder)
    gallery = _gallery(tmp_path / "server", keys, port)
    clients = {s: TemplateClient(s, keys["signing"][s], keys["public"]) for s in ("hospital-a", "campus-b")}
    people, templates = faces["people"], faces["templates"]
    for site, part in (("hospital-a", slice(0, 20)), ("campus-b", slice(20, 40))):
        for env in clients[site].enroll_envelopes(list(people[part]), templates[part], ENCODER):
            gallery.enroll(env)
    yield {"gallery": gallery, "holder": holder, "port": port, "clients": clients, **keys}
    gallery.close()
    holder.close()


def _identify(world: dict[str, object], template: np.ndarray, site: str = "hospital-a", top_k: int = 1):
    client = world["clients"][site]
    pending = client.query(template, ENCODER, top_k=top_k)
    result = world["gallery"].search(pending.envelope)
    return client.read_decision(pending, result.sealed_decision, result.sealed_label_key)


def _plain_decision(faces: dict[str, np.ndarray], template: np.ndarray) -> str | None:
    scores = faces["templates"] @ template
    best = int(scores.argmax())
    if scores[best] <= THRESHOLD:
        return None
    site = "hospital-a" if best < 20 else "campus-b"
    return f"{site}/{faces['people'][best]}"


# -- the engine ------------------------------------------------------------------------------


def test_encrypted_scores_equal_plaintext_cosines_on_real_faces(faces: dict[str, np.ndarray], keys: dict[str, object]) -> None:
    engine = keys["secret"].engine()
    block = [engine.load(c, "gallery") for c in engine.encrypt_block(faces["templates"])]
    q = faces["emb"][faces["probe"][7]]
    scores = engine.decrypt(engine.score_block(engine.rotations(engine.load(engine.encrypt_query(q), "query")), block))
    plain = faces["templates"] @ q
    assert np.max(np.abs(scores[:40] - plain)) < 1e-3
    assert np.max(np.abs(scores[40:])) < 1e-3  # empty slots score zero
    assert int(scores[:40].argmax()) == int(plain.argmax())


def test_protected_result_is_masked_and_shifted_score(faces: dict[str, np.ndarray], keys: dict[str, object]) -> None:
    engine = keys["secret"].engine()
    block = [engine.load(c, "gallery") for c in engine.encrypt_block(faces["templates"])]
    q = faces["emb"][faces["probe"][0]]
    raw = engine.score_block(engine.rotations(engine.load(engine.encrypt_query(q), "query")), block)
    out = engine.decrypt(engine.protect(raw, 11, 0.4))[:40]
    np.testing.assert_allclose(out, 11 * (faces["templates"] @ q - 0.4), atol=11e-3)


def test_without_the_secret_key_nothing_decrypts(faces: dict[str, np.ndarray], keys: dict[str, object]) -> None:
    """The server and the sites hold templates.pub only: no key there decrypts, and a party's own
    fresh key pair decrypts another's ciphertexts to noise uncorrelated with the template."""
    public = keys["public"].engine()
    assert not public.can_decrypt
    ct = public.load(public.encrypt_block(faces["templates"][:1])[0], "gallery")
    with pytest.raises(TemplateError, match="only the key holder decrypts"):
        public.decrypt(ct)
    bundle = (keys["dir"] / "holder" / kf.PUBLIC_BUNDLE).read_bytes()
    assert keys["secret"].keys.secret_key not in bundle
    assert keys["secret"].keys.secret_key[64:128] not in bundle
    from cryptography.hazmat.primitives import serialization

    signer = keys["secret"].decision_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert signer not in bundle and keys["public"].decision_key is None
    # another party's own key set: same parameters, other secret
    other = TemplateEngine(TemplateParams(dim=128), generate_keys(128))
    wrong = other.decrypt(ct)
    assert np.abs(wrong).max() > 1e3  # not a template coordinate in [-1, 1]: noise


def test_ciphertexts_of_other_parameters_levels_or_scales_are_refused(faces: dict[str, np.ndarray], keys: dict[str, object]) -> None:
    engine = keys["public"].engine()
    gallery_ct = engine.encrypt_block(faces["templates"][:2])[0]
    query_ct = engine.encrypt_query(faces["templates"][0])
    with pytest.raises(TemplateError, match="wrong level, size or scale"):
        engine.load(query_ct, "gallery")
    with pytest.raises(TemplateError, match="wrong level, size or scale"):
        engine.load(gallery_ct, "query")
    with pytest.raises(TemplateError, match="malformed gallery ciphertext"):
        engine.load(gallery_ct[: len(gallery_ct) // 2], "gallery")
    with pytest.raises(TemplateError, match="unit length"):
        engine.encrypt_block(faces["templates"][:2] * 2)
    with pytest.raises(TemplateError, match="expected"):
        engine.encrypt_block(faces["templates"][:2, :64])
    with pytest.raises(TemplateError, match="unsupported template parameters"):
        TemplateParams(dim=128, scale_bits=40)


# -- envelopes -------------------------------------------------------------------------------


def test_envelope_refuses_tampering_forgery_replay_staleness_and_strangers(keys: dict[str, object]) -> None:
    key = keys["signing"]["hospital-a"]
    env = make_envelope(key, "enroll", "hospital-a", [b"x" * 100], context="c", encoder="e")
    assert open_envelope(env, keys["registry"], NonceStore()).header["encoder"] == "e"

    hb, sig, parts = parse_envelope(env)
    tampered = env[:-1] + bytes([env[-1] ^ 1])
    with pytest.raises(TemplateError, match="altered"):
        open_envelope(tampered, keys["registry"], NonceStore())
    # header edited (encoder renamed), signature kept
    forged_header = hb.replace(b'"encoder":"e"', b'"encoder":"f"')
    forged = env.replace(struct.pack(">I", len(hb)) + hb, struct.pack(">I", len(forged_header)) + forged_header)
    with pytest.raises(TemplateError, match="no valid signature"):
        open_envelope(forged, keys["registry"], NonceStore())
    # signed by campus-b's key, claiming to be hospital-a
    impostor = make_envelope(keys["signing"]["campus-b"], "enroll", "hospital-a", [b"x"], context="c", encoder="e")
    with pytest.raises(TemplateError, match="no valid signature"):
        open_envelope(impostor, keys["registry"], NonceStore())
    unsigned = env.replace(sig, bytes(64))
    with pytest.raises(TemplateError, match="no valid signature"):
        open_envelope(unsigned, keys["registry"], NonceStore())
    stranger = make_envelope(key, "enroll", "mallory", [b"x"], context="c", encoder="e")
    with pytest.raises(TemplateError, match="unknown site 'mallory'"):
        open_envelope(stranger, keys["registry"], NonceStore())
    nonces = NonceStore()
    open_envelope(env, keys["registry"], nonces)
    with pytest.raises(TemplateError, match="replay"):
        open_envelope(env, keys["registry"], nonces)
    with pytest.raises(TemplateError, match="s old"):
        open_envelope(env, keys["registry"], NonceStore(), now=json.loads(hb)["time"] + MAX_AGE_S + 1)
    with pytest.raises(TemplateError, match="not a fedface envelope"):
        open_envelope(b"hello", keys["registry"], NonceStore())
    import types

    from fedface.common.crypto import envelope as envelope_module

    for bad_time in (float("nan"), float("inf"), 1):  # NaN would be fresh forever; an int is not a time
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(envelope_module, "time", types.SimpleNamespace(time=lambda t=bad_time: t))
            odd = make_envelope(key, "enroll", "hospital-a", [b"x"], context="c", encoder="e")
        with pytest.raises(TemplateError, match="lacks kind|non-finite time"):
            open_envelope(odd, keys["registry"], NonceStore())
    with pytest.raises(TemplateError, match="truncated"):
        open_envelope(env[:-10], keys["registry"], NonceStore())


def test_a_replay_is_refused_across_a_restart(tmp_path: Path, keys: dict[str, object]) -> None:
    env = make_envelope(keys["signing"]["hospital-a"], "revoke", "hospital-a", [], context="c", encoder="*", labels=["p1"])
    first = NonceStore(tmp_path / "n.sqlite")
    open_envelope(env, keys["registry"], first)
    first.close()
    with pytest.raises(TemplateError, match="replay"):
        open_envelope(env, keys["registry"], NonceStore(tmp_path / "n.sqlite"))


# -- search: decisions only ------------------------------------------------------------------


def test_identify_returns_the_plaintext_decision_across_sites(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    probes = faces["probe"][::20]
    for i in probes:
        q = faces["emb"][i]
        decision = _identify(world, q, site="campus-b")
        expected = _plain_decision(faces, q)
        assert decision.match == (expected is not None)
        assert decision.identities == ((expected,) if expected else ())


def test_verify_answers_only_match_or_not(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    i = faces["probe"][3]
    q = faces["emb"][i]
    person = int(faces["labels"][i])
    client = world["clients"]["hospital-a"]
    for claim in (person, (person + 7) % 20):
        pending = client.query(q, ENCODER, claim=f"hospital-a/p{claim}")
        result = world["gallery"].search(pending.envelope)
        decision = client.read_decision(pending, result.sealed_decision)
        assert decision.match == bool(faces["templates"][claim] @ q > THRESHOLD)
        assert decision.identities == ()
    pending = client.query(q, ENCODER, claim="hospital-a/nobody")
    with pytest.raises(TemplateError, match="not enrolled"):
        world["gallery"].search(pending.envelope)


def test_the_querier_learns_the_decision_not_a_score(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    """The sealed decision, opened by the site, holds a match flag and label chunks, no number
    that could be a score; the key holder's request holds no label in the clear."""
    from fedface.common.crypto.envelope import open_sealed

    client = world["clients"]["hospital-a"]
    pending = client.query(faces["emb"][faces["probe"][0]], ENCODER, top_k=3)
    result = world["gallery"].search(pending.envelope)
    opened = json.loads(open_sealed(pending.reply_key, result.sealed_decision[64:], pending.digest))
    assert set(opened) == {"match", "chunks"}
    assert all(isinstance(slot, int) and isinstance(chunk, str) for slot, chunk in opened["chunks"])

    def numbers(obj: object) -> list[object]:
        if isinstance(obj, dict):
            return [n for v in obj.values() for n in numbers(v)]
        if isinstance(obj, list):
            return [n for v in obj for n in numbers(v)]
        return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []

    assert not [n for n in numbers(opened) if isinstance(n, float)]  # slot indices only, no score
    assert all(0 <= n < 40 for n in numbers(opened))
    request = world["port"].requests[-1]
    assert b"hospital-a/p" not in request and b"campus-b/p" not in request


def test_decisions_are_flooded_before_they_are_made() -> None:
    """A protected value a hair above zero is decided on flooded noise, not on the exact value."""
    rng = np.random.default_rng(1)
    values = [np.array([FLOOD_SIGMA * 1e-3, -5.0])]
    outcomes = {decide(values, top_k=1, candidates=[(0, 0)], rng=rng)["match"] for _ in range(64)}
    assert outcomes == {True, False}
    far = [np.array([50 * FLOOD_SIGMA, -5.0])]
    assert all(decide(far, top_k=1, candidates=[(0, 0)], rng=rng)["match"] for _ in range(64))
    top = decide([np.array([0.5, 2.0, -1.0, 1.0])], top_k=2, candidates=None, rng=rng)
    assert top == {"match": True, "slots": [[0, 1], [0, 3]]}


def _last_request(world: dict[str, object]) -> tuple[dict[str, object], list[bytes]]:
    frame = open_signed_frame(world["server_key"].public_key(), world["port"].requests[-1], REQUEST_CONTEXT, "request")
    return unpack_frame(frame, "request")


def _resign(world: dict[str, object], header: dict[str, object], parts: list[bytes]) -> bytes:
    return sign_frame(world["server_key"], pack_frame({k: v for k, v in header.items() if k != "sizes"}, parts), REQUEST_CONTEXT)


def test_the_key_holder_decides_only_for_the_server_and_signed_fresh_queries(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    client = world["clients"]["hospital-a"]
    pending = client.query(faces["emb"][faces["probe"][0]], ENCODER)
    world["gallery"].search(pending.envelope)
    request = world["port"].requests[-1]
    with pytest.raises(TemplateError, match="replay"):
        world["holder"].decide(request)
    header, parts = _last_request(world)
    # a site (or anyone) posting straight to the key holder: not signed by the server's key
    with pytest.raises(TemplateError, match="not signed by the expected key"):
        world["holder"].decide(sign_frame(new_signing_key(), pack_frame(header, parts), REQUEST_CONTEXT))
    with pytest.raises(TemplateError, match="not signed by the expected key"):
        world["holder"].decide(request[64:])
    # the server asking about a query of its own making: it has no site's signing key
    fields = {k: v for k, v in json.loads(parse_envelope(parts[0])[0]).items() if k in ("context", "encoder", "reply_key", "top_k")}
    own = make_envelope(new_signing_key(), "identify", "hospital-a", parts[0:1], **fields)
    with pytest.raises(TemplateError, match="no valid signature"):
        world["holder"].decide(_resign(world, header, [own, *parts[1:]]))
    # a site's own fresh query asking for more than MAX_TOP_K decisions
    greedy = make_envelope(world["signing"]["hospital-a"], "identify", "hospital-a", parts[0:1], **{**fields, "top_k": 10**6})
    with pytest.raises(TemplateError, match="top_k must be an integer from 1 to 10"):
        world["holder"].decide(_resign(world, header, [greedy, *parts[1:]]))
    with pytest.raises(TemplateError, match="not signed by the expected key|malformed"):
        world["holder"].decide(b"junk")


def _forged_query(world: dict[str, object], values: np.ndarray, *, claim: str | None = None) -> bytes:
    """What a site that skips its client can send: any slot values, encrypted and signed."""
    engine = world["public"].engine()
    encode = engine._encoder.encode_complex if np.iscomplexobj(values) else engine._encoder.encode
    ct = engine._encryptor.encrypt(encode(np.ascontiguousarray(values), engine.query_scale)).to_string()
    client = world["clients"]["hospital-a"]
    fields: dict[str, object] = {"context": world["public"].id, "encoder": ENCODER, "reply_key": "11" * 32, "top_k": 1}
    if claim:
        fields["claim"] = claim
    return make_envelope(client.key, "verify" if claim else "identify", "hospital-a", [ct], **fields)


def test_a_scaled_or_mixed_query_is_refused_before_anything_is_decided(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    """The coordinate-reading attack: with a scaled basis vector c * e_k, threshold decisions
    give |t_k| = threshold / c by bisection on c; with tiles of different templates, many queries
    in one. The key holder refuses both; a unit template tiled passes."""
    t = faces["templates"][4]
    e0 = np.zeros(128)
    e0[0] = 1.0
    tiles = 4096 // 128
    honest = np.tile(t, tiles)
    mixed = np.concatenate([np.tile(t, tiles // 2), np.tile(faces["templates"][5], tiles // 2)])
    # 5 e_0 with an imaginary part sqrt(24) e_1: the squares sum to 25 - 24 + 0i = 1, so the norm
    # check alone would pass it, and the real part (what the scores count) is five times too long
    e1 = np.roll(e0, 1)
    hidden = np.tile(5.0 * e0 + 1j * np.sqrt(24.0) * e1, tiles)
    # sqrt(1 + 256) e_0: its squares sum to 257, which a square taken modulo the headroom (about
    # 256 in score units) reads as 1; the scores (16 t_k) do not wrap: a norm must come from linear values
    wrapped = np.tile(np.sqrt(1.0 + 2.0 ** 60 / 2.0 ** 52) * e0, tiles)
    cases = {"scaled basis vector": np.tile(5.0 * e0, tiles), "1.05 x a template": 1.05 * honest, "mixed tiles": mixed,
             "scaled, hidden by an imaginary part": hidden, "scaled to wrap a sum of squares": wrapped}
    before = len(world["port"].requests)
    for name, values in cases.items():
        with pytest.raises(TemplateError, match="not one unit-length template, tiled"):
            world["gallery"].search(_forged_query(world, values, claim="campus-b/p25"))
        assert len(world["port"].requests) == before + 1, name
        before += 1
    world["gallery"].search(_forged_query(world, honest, claim="campus-b/p25"))  # decided
    refused = [e for e in world["gallery"].events(10) if e["outcome"] == "refused"]
    assert any("by the key holder" in e["detail"] for e in refused)


def test_an_enrollment_of_non_unit_templates_is_refused(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    """A site that could enroll 10 x a mean face would match every other site's queries."""
    engine = world["public"].engine()
    client = world["clients"]["hospital-a"]
    j = np.arange(3)

    def block(values: np.ndarray) -> list[bytes]:
        cts = []
        for k in range(128):
            v = np.zeros(4096, dtype=values.dtype)
            v[:3] = values[j, (j + k) % 128]
            encode = engine._encoder.encode_complex if np.iscomplexobj(v) else engine._encoder.encode
            plain = encode(np.ascontiguousarray(v), engine.scale)
            engine._eval.mod_switch_to_inplace(plain, engine._last)
            cts.append(engine._encryptor.encrypt(plain).to_string())
        return cts

    t = faces["templates"][:3]
    strong = 10.0 * t
    # the same, with imaginary parts orthogonal to each template, of squared norm 99: the sum of
    # squares is 100 - 99 + 0i = 1, exactly what a unit template gives; the signed sums catch it
    other = faces["templates"][10:13] - np.sum(faces["templates"][10:13] * t, axis=1, keepdims=True) * t
    masked = strong + 1j * np.sqrt(99.0) * other / np.linalg.norm(other, axis=1, keepdims=True)
    before = _count(world)
    for values in (strong, masked):
        env = make_envelope(client.key, "enroll", "hospital-a", block(values), labels=["x0", "x1", "x2"], context=world["public"].id,
                            encoder=ENCODER, dim=128)
        with pytest.raises(TemplateError, match="not unit length"):
            world["gallery"].enroll(env)
        assert _count(world) == before
    # slots beyond the named people must be empty too
    sneaky = client.enroll_envelopes(["y0", "y1"], faces["templates"][:2], ENCODER)[0]
    hb = json.loads(parse_envelope(sneaky)[0])
    one = make_envelope(client.key, "enroll", "hospital-a", parse_envelope(sneaky)[2], labels=["y0"], context=hb["context"], encoder=ENCODER, dim=128)
    with pytest.raises(TemplateError, match="data in empty slots"):
        world["gallery"].enroll(one)


def test_match_and_no_match_look_alike_on_the_wire(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    """The server relays the decision: its length must not tell it the answer."""
    client = world["clients"]["hospital-a"]
    q = faces["templates"][2]
    sizes = {}
    for name, claim, kwargs in (("verify match", "hospital-a/p2", {}), ("verify no match", "hospital-a/p9", {}),
                                ("identify match", None, {}), ("identify no match", None, {"negate": True})):
        vec = -q if kwargs.get("negate") else q
        pending = client.query(vec, ENCODER, claim=claim)
        result = world["gallery"].search(pending.envelope)
        decision = client.read_decision(pending, result.sealed_decision, result.sealed_label_key)
        assert decision.match == ("no match" not in name), name
        sizes[name] = (len(result.sealed_decision), len(result.sealed_label_key))
    assert sizes["verify match"] == sizes["verify no match"]
    assert sizes["identify match"] == sizes["identify no match"]


def test_a_decision_the_key_holder_did_not_sign_is_refused_by_the_site(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    """A server that skips the key holder and seals its own "match" to the site's reply key."""
    from fedface.common.crypto.envelope import seal_to

    client = world["clients"]["hospital-a"]
    pending = client.query(faces["templates"][2], ENCODER, claim="hospital-a/p9")
    world["gallery"].search(pending.envelope)
    reply = bytes.fromhex(json.loads(parse_envelope(pending.envelope)[0])["reply_key"])
    made_up = bytes(64) + seal_to(reply, b'{"match":true}'.ljust(32), pending.digest)
    with pytest.raises(TemplateError, match="not signed by the key holder"):
        client.read_decision(pending, made_up)


# -- the gallery's refusals leave it intact -----------------------------------------------------


def _count(world: dict[str, object]) -> int:
    return world["gallery"].template_count(ENCODER)


def test_bad_uploads_are_refused_and_the_gallery_stays_searchable(world: dict[str, object], faces: dict[str, np.ndarray], tmp_path: Path) -> None:
    gallery, client = world["gallery"], world["clients"]["hospital-a"]
    new = faces["templates"][:2]
    good = client.enroll_envelopes(["q0", "q1"], new, ENCODER)[0]
    hb, sig, parts = parse_envelope(good)
    tampered = bytearray(good)
    tampered[-500] ^= 0xFF  # inside the last ciphertext
    cases = {
        "tampered ciphertext": (bytes(tampered), "altered"),
        "missing signature": (good.replace(sig, bytes(64)), "no valid signature"),
        "forged signature": (make_envelope(world["signing"]["campus-b"], "enroll", "hospital-a", parts,
                                           **{k: v for k, v in json.loads(hb).items() if k in ("labels", "context", "encoder", "dim")}),
                             "no valid signature"),
        "unknown site": (TemplateClient("mallory", world["signing"]["hospital-a"], world["public"]).enroll_envelopes(["x"], new[:1], ENCODER)[0],
                         "unknown site"),
        "already enrolled": (client.enroll_envelopes(["p0"], new[:1], ENCODER)[0], "already enrolled"),
    }
    other_keys = tmp_path / "other"
    kf.create_template_keys(other_keys, dim=128)
    cases["wrong parameter set"] = (TemplateClient("hospital-a", world["signing"]["hospital-a"], kf.load_template_context(other_keys))
                                    .enroll_envelopes(["q9"], new[:1], ENCODER)[0], "key set")
    kf.create_template_keys(tmp_path / "dim64", dim=64)
    small = kf.load_template_context(tmp_path / "dim64")
    cases["wrong dimension"] = (make_envelope(world["signing"]["hospital-a"], "enroll", "hospital-a", small.engine().encrypt_block(new[:1, :64] / np.linalg.norm(new[:1, :64])),
                                              labels=["q8"], context=world["public"].id, encoder=ENCODER, dim=64), "dimension")
    before = _count(world)
    for name, (data, message) in cases.items():
        with pytest.raises(TemplateError, match=message):
            gallery.enroll(data)
        assert _count(world) == before, name
    gallery.enroll(good)
    with pytest.raises(TemplateError, match="replay"):
        gallery.enroll(good)
    assert _count(world) == before + 2
    refused = [e for e in gallery.events(50) if e["outcome"] == "refused"]
    # every refusal of content is logged; refusals of the sender (no key needed to cause them:
    # bad signatures, unknown sites, replays) once a minute per claimed site, so junk cannot fill the log
    assert len(refused) == 4 + 2
    assert {e["site"] for e in refused} == {"hospital-a", "mallory"}
    q = faces["emb"][faces["probe"][0]]
    assert _identify(world, q).identities == ((_plain_decision(faces, q),) if _plain_decision(faces, q) else ())


def test_the_event_log_is_append_only(world: dict[str, object]) -> None:
    conn = sqlite3.connect(world["gallery"].path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET outcome = 'accepted'")


def test_a_version_is_searched_only_with_its_own_encoder(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    client = world["clients"]["hospital-a"]
    rng = np.random.default_rng(0)
    other = rng.standard_normal((3, 128))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    for env in client.enroll_envelopes(["p0", "p1", "p2"], other, "encoder-v2"):  # same people, new encoder
        world["gallery"].enroll(env)
    assert world["gallery"].template_count("encoder-v2") == 3
    pending = client.query(other[1], "encoder-v2")
    result = world["gallery"].search(pending.envelope)
    assert result.slots == 3
    assert client.read_decision(pending, result.sealed_decision, result.sealed_label_key).identities == ("hospital-a/p1",)
    pending = client.query(other[1], "encoder-v3")
    with pytest.raises(TemplateError, match="nobody is enrolled under encoder encoder-v3"):
        world["gallery"].search(pending.envelope)


def test_revocation_deletes_the_blocks_and_their_bytes(world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    gallery, client = world["gallery"], world["clients"]["hospital-a"]
    stored = gallery._conn.execute("SELECT ciphertexts FROM blocks WHERE site = 'hospital-a'").fetchone()[0]
    probe = stored[200_000:200_064]
    result = gallery.revoke(client.revoke_envelope(["p3"]))
    assert result["revoked"] == ["p3"] and "p4" in result["re_enroll"] and result["unknown"] == []
    assert gallery.template_count(ENCODER) == 20  # campus-b's 20 remain
    wal = gallery.path.with_name(gallery.path.name + "-wal")
    assert probe not in gallery.path.read_bytes()  # secure_delete: the bytes are overwritten
    assert not wal.exists() or probe not in wal.read_bytes()  # and checkpointed out of the WAL
    q = faces["templates"][25]
    assert _identify(world, q).identities == ("campus-b/p25",)
    assert "hospital-a/p3" not in _identify(world, faces["templates"][3], top_k=10).identities
    with pytest.raises(TemplateError, match="names nobody"):
        gallery.revoke(client.revoke_envelope([]))


def test_revocation_can_be_limited_to_a_key_set(world: dict[str, object]) -> None:
    """After a key rotation, a site revokes its old blocks only: --key-set OLD."""
    gallery, client = world["gallery"], world["clients"]["campus-b"]
    kept = gallery.revoke(client.revoke_envelope([], everyone=True, contexts=["some-old-key-set"]))
    assert kept["blocks"] == 0 and gallery.template_count(ENCODER) == 40
    gone = gallery.revoke(client.revoke_envelope([], everyone=True, contexts=[world["public"].id]))
    assert gone["blocks"] == 1 and gallery.template_count(ENCODER) == 20


def test_queries_beyond_the_hourly_limit_are_refused(tmp_path: Path, world: dict[str, object], faces: dict[str, np.ndarray]) -> None:
    gallery = _gallery(tmp_path / "limited", world, world["port"], max_queries_per_hour=2)
    client = world["clients"]["campus-b"]
    gallery.enroll(client.enroll_envelopes(["z"], faces["templates"][:1], ENCODER)[0])  # uploads do not count as queries
    gallery.revoke(client.revoke_envelope(["nobody"]))
    q = faces["templates"][0]
    gallery.search(client.query(q, ENCODER).envelope)
    gallery.search(client.query(q, ENCODER, claim="campus-b/z").envelope)
    with pytest.raises(TemplateError, match="more than 2 queries") as refused:
        gallery.search(client.query(q, ENCODER).envelope)
    assert refused.value.reason == "limit"
    gallery.close()


def test_the_gallery_server_refuses_the_secret_key(tmp_path: Path, keys: dict[str, object]) -> None:
    with pytest.raises(TemplateError, match="must not hold the template secret key"):
        Gallery(tmp_path, keys["secret"], keys["registry"], keyholder=None, signing_key=keys["server_key"], threshold=THRESHOLD)


# -- key files -------------------------------------------------------------------------------


def test_key_files_are_private_never_overwritten_and_passphrase_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kf.PASSPHRASE_ENV, "correct horse")
    ctx = kf.create_template_keys(tmp_path / "h", dim=128)
    pair = kf.create_signing_key(tmp_path / "s", "site-signing")
    assert (tmp_path / "h" / kf.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert pair.private_key.stat().st_mode & 0o777 == 0o600
    assert kf.load_template_context(tmp_path / "h", tmp_path / "h").keys.secret_key is not None
    kf.load_signing_key(pair.private_key)
    with pytest.raises(KeyFileError, match="never overwritten"):
        kf.create_template_keys(tmp_path / "h", dim=128)
    with pytest.raises(KeyFileError, match="never overwritten"):
        kf.create_signing_key(tmp_path / "s", "site-signing")
    monkeypatch.setenv(kf.PASSPHRASE_ENV, "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        kf.load_template_context(tmp_path / "h", tmp_path / "h")
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        kf.load_signing_key(pair.private_key)
    monkeypatch.delenv(kf.PASSPHRASE_ENV)
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        kf.load_template_context(tmp_path / "h", tmp_path / "h")
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        kf.load_signing_key(pair.private_key)
    # rotation: the old set is retired, the new one has another id
    monkeypatch.setenv(kf.PASSPHRASE_ENV, "correct horse")
    kf.create_template_keys(tmp_path / "h64", dim=64)
    assert kf.rotate_template_keys(tmp_path / "h64")[1].params.dim == 64  # rotation keeps the dimension
    old_id, new = kf.rotate_template_keys(tmp_path / "h")
    assert old_id == ctx.id != new.id
    assert kf.load_template_context(tmp_path / "h", tmp_path / "h").id == new.id
    assert (tmp_path / "h" / "retired" / old_id / kf.SECRET_FILE).is_file()
    old_fp = kf.fingerprint(kf.load_verify_key(pair.public_key))
    rotated = kf.rotate_signing_key(tmp_path / "s", "site-signing")
    assert kf.fingerprint(kf.load_verify_key(rotated.public_key)) != old_fp
    assert (tmp_path / "s" / "retired" / f"site-signing-{old_fp}.key").is_file()


def test_damaged_or_mismatched_key_files_are_refused(tmp_path: Path) -> None:
    kf.create_template_keys(tmp_path / "a", dim=128)
    kf.create_template_keys(tmp_path / "b", dim=128)
    with pytest.raises(KeyFileError, match="belongs to key set"):
        kf.load_template_context(tmp_path / "a", tmp_path / "b")
    bundle = tmp_path / "a" / kf.PUBLIC_BUNDLE
    bundle.write_bytes(bundle.read_bytes()[:-100])
    with pytest.raises(KeyFileError, match="not a fedface key file"):
        kf.load_template_context(bundle)
    with pytest.raises(KeyFileError, match="not found"):
        kf.load_template_context(tmp_path / "missing")
    registry = kf.SiteKeys(tmp_path / "b")
    assert registry("../a/x") is None and registry("nobody") is None


# -- the wire audit, extended to template traffic ----------------------------------------------


def test_nothing_a_site_sends_contains_a_plaintext_template(world: dict[str, object], faces: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Every envelope of an enrollment, a revocation and both kinds of query, as the site's wire
    log records it and byte for byte: the header holds scalars and lists of person ids only, and
    no template (the enrolled ones, the query) appears in any common encoding: float64, float32,
    or decimal text of its coordinates."""
    from fedface.client.wire_log import log_envelope

    client = world["clients"]["campus-b"]
    q = faces["emb"][faces["probe"][11]]
    sent = [
        *client.enroll_envelopes(["w0", "w1", "w2"], faces["templates"][:3], ENCODER),
        client.query(q, ENCODER).envelope,
        client.query(q, ENCODER, claim="hospital-a/p1").envelope,
        client.revoke_envelope(["w1"]),
    ]
    log = tmp_path / "wire.jsonl"
    for env in sent:
        log_envelope(log, "campus-b", env)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["message_type"] for e in lines] == ["gallery.enroll", "gallery.identify", "gallery.verify", "gallery.revoke"]
    for entry in lines:
        for key, value in entry["header"].items():
            assert isinstance(value, (str, int, bool)) or (isinstance(value, float) and key == "time") or (
                isinstance(value, dict) and value.get("of") in (["str"], [])
            ), (key, value)
    secrets_ = [*faces["templates"][:3], q]
    for env in sent:
        for t in secrets_:
            for dtype in (np.float64, np.float32):
                assert t[:4].astype(dtype).tobytes() not in env
            for k in range(3):  # the decimal text JSON would hold (repr), cut to 8 significant characters
                assert repr(float(t[k]))[:9].encode() not in env
