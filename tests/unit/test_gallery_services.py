"""The encrypted gallery over HTTP (fedface.server.services, fedface.client.gallery_client) and
the CLI's refusals of bad input.

The apps run in-process through Starlette's TestClient; the gallery server reaches the key
holder through another TestClient, so every request crosses both HTTP APIs as deployed.
Templates are real faces: eigenface projections (64 components, unit length) of ORL images,
fitted on the first 20 identities; images 0-4 of each person are enrolled, 5-9 are probes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tomli_w
from typer.testing import CliRunner

from fedface.client.enroll import TemplateClient, person_templates
from fedface.client.gallery_client import GalleryClient, fetch_public_keys
from fedface.client.siteconfig import SiteConfig
from fedface.common.crypto import keyfiles as kf
from fedface.common.crypto.envelope import new_signing_key, unpack_frame
from fedface.common.data.sources import load_faces, load_image
from fedface.common.eigenfaces import Eigenfaces
from fedface.common.errors import ConfigError, CorruptImageError, KeyFileError, TemplateError
from fedface.server.gallery import Gallery
from fedface.server.keyholder import KeyHolder
from fedface.server.services import MAX_ENVELOPE_BYTES, KeyHolderLink, gallery_app, keyholder_app
from fedface.simulations.cli import app

with warnings.catch_warnings():  # Starlette 1.x warns that its TestClient will move to httpx2 (third-party)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ENCODER = "eigenfaces-orl-20"
THRESHOLD = 0.5
SITE = "hospital-a"
runner = CliRunner()


@pytest.fixture(scope="module")
def faces(orl_root: Path) -> dict[str, Any]:
    fs = load_faces(orl_root)
    emb = Eigenfaces(n_components=64).fit(fs.images[fs.labels < 20]).embed(fs.images)
    rank = np.zeros(len(fs.labels), dtype=int)
    for k in range(fs.num_identities):
        members = np.flatnonzero(fs.labels == k)
        rank[members] = np.arange(len(members))
    enrolled = rank < 5
    people, templates = person_templates(emb[enrolled], fs.labels[enrolled], [f"p{k}" for k in range(fs.num_identities)])
    return {"emb": emb, "labels": fs.labels, "probes": np.flatnonzero(~enrolled), "people": people, "templates": templates,
            "sources": fs.sources}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("keys")
    kf.create_template_keys(d / "holder", dim=64)
    for registry in ("gallery-sites", "holder-sites"):
        (d / registry).mkdir()
    pairs = {name: kf.create_signing_key(d / name, name) for name in (SITE, "campus-b")}
    for registry in ("gallery-sites", "holder-sites"):
        for name, pair in pairs.items():
            kf.SiteKeys(d / registry).register(name, pair.public_key)
    return {"dir": d, "public": kf.load_template_context(d / "holder"), "secret": kf.load_template_context(d / "holder", d / "holder"),
            "pairs": pairs, "signing": {n: kf.load_signing_key(p.private_key) for n, p in pairs.items()}}


@pytest.fixture
def world(tmp_path: Path, keys: dict[str, Any], faces: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Both services in-process, and hospital-a's 40 people enrolled over HTTP."""
    server_key = new_signing_key()
    holder = KeyHolder(tmp_path / "holder", keys["secret"], kf.SiteKeys(keys["dir"] / "holder-sites"), server_key.public_key(), seed=0)
    holder_http = TestClient(keyholder_app(holder))
    gallery = Gallery(tmp_path / "gallery", keys["public"], kf.SiteKeys(keys["dir"] / "gallery-sites"), keyholder=KeyHolderLink(holder_http),
                      signing_key=server_key, threshold=THRESHOLD)
    gallery_http = TestClient(gallery_app(gallery))
    site = GalleryClient("http://testserver", TemplateClient(SITE, keys["signing"][SITE], keys["public"]), client=gallery_http,
                         wire_log=tmp_path / "wire.jsonl")
    site.enroll(faces["people"], faces["templates"], ENCODER)
    yield {"gallery": gallery, "holder": holder, "gallery_http": gallery_http, "holder_http": holder_http, "site": site, **keys}
    gallery.close()
    holder.close()


def _plain(faces: dict[str, Any], template: np.ndarray) -> tuple[str, ...]:
    scores = faces["templates"] @ template
    best = int(scores.argmax())
    return (f"{SITE}/{faces['people'][best]}",) if scores[best] > THRESHOLD else ()


def _post(client: TestClient, route: str, body: bytes) -> httpx.Response:
    return client.post(route, content=body, headers={"content-type": "application/octet-stream"})


def _assert_refused(reply: httpx.Response, status: int, fragment: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert "\n" not in error and fragment in error, error


# -- the protocol over HTTP -----------------------------------------------------------------------


def test_identify_over_http_gives_the_plaintext_decision(world: dict[str, Any], faces: dict[str, Any]) -> None:
    probes = faces["probes"][::25]  # 8 probes of 8 people
    decisions = [world["site"].identify(faces["emb"][i], ENCODER).identities for i in probes]

    assert decisions == [_plain(faces, faces["emb"][i]) for i in probes]
    assert sum(d == (f"{SITE}/p{faces['labels'][i]}",) for d, i in zip(decisions, probes, strict=True)) >= 6


def test_search_reply_is_one_frame_of_the_sealed_decision_and_label_key(world: dict[str, Any], faces: dict[str, Any]) -> None:
    pending = world["site"].templates.query(faces["emb"][faces["probes"][0]], ENCODER)

    reply = _post(world["gallery_http"], "/v1/search", pending.envelope)

    header, parts = unpack_frame(reply.content, "reply")
    assert reply.status_code == 200 and header["kind"] == "identify" and len(parts) == 2
    assert b"hospital-a" not in reply.content  # labels travel encrypted, under a key sealed to the site
    assert world["site"].templates.read_decision(pending, parts[0], parts[1]).identities == _plain(faces, faces["emb"][faces["probes"][0]])


def test_verify_over_http_answers_match_or_no_match(world: dict[str, Any], faces: dict[str, Any]) -> None:
    probe = faces["emb"][faces["probes"][0]]  # a person of label 0
    scores = faces["templates"] @ probe
    impostor = int(np.argmin(scores))

    genuine = world["site"].verify(probe, ENCODER, f"{SITE}/p0")
    other = world["site"].verify(probe, ENCODER, f"{SITE}/{faces['people'][impostor]}")

    assert (genuine.match, other.match) == (bool(scores[0] > THRESHOLD), False)
    assert genuine.identities == () and other.identities == ()


def test_revoke_over_http_deletes_the_person_and_names_who_to_re_enroll(world: dict[str, Any], faces: dict[str, Any]) -> None:
    probe = faces["emb"][faces["probes"][0]]
    assert world["site"].identify(probe, ENCODER).identities == (f"{SITE}/p0",)

    result = world["site"].revoke(["p0"])

    assert result["revoked"] == ["p0"] and result["blocks"] == 1
    assert sorted(result["re_enroll"]) == sorted(faces["people"][1:])
    with pytest.raises(TemplateError, match=r"HTTP 400\): nobody is enrolled"):
        world["site"].identify(probe, ENCODER)
    world["site"].enroll(faces["people"][1:], faces["templates"][1:], ENCODER)
    assert f"{SITE}/p0" not in world["site"].identify(probe, ENCODER, top_k=3).identities


def test_status_shows_counts_per_site_without_events_or_secrets(world: dict[str, Any]) -> None:
    status = world["site"].status()

    assert status["templates"] == 40 and status["context"] == world["public"].id
    assert status["versions"] == [{"context": world["public"].id, "encoder": ENCODER, "site": SITE, "blocks": 1, "templates": 40}]
    assert "events" not in status  # the event log is read at the server (`fedface gallery status --store`), not over HTTP
    assert "p0" not in json.dumps(status)


# -- refusals: one line, a 4xx, and the gallery still searchable ----------------------------------


def _still_searchable(world: dict[str, Any], faces: dict[str, Any]) -> None:
    probe = faces["emb"][faces["probes"][0]]
    assert world["gallery"].template_count(ENCODER) == 40
    assert world["site"].identify(probe, ENCODER).identities == _plain(faces, probe)


def test_a_tampered_body_is_refused_with_400(world: dict[str, Any], faces: dict[str, Any]) -> None:
    body = bytearray(world["site"].templates.enroll_envelopes(["q0"], faces["templates"][:1], ENCODER)[0])
    body[-300] ^= 0xFF

    _assert_refused(_post(world["gallery_http"], "/v1/enroll", bytes(body)), 400, "was altered")
    _assert_refused(_post(world["gallery_http"], "/v1/search", b"not an envelope"), 400, "not a fedface envelope")
    _still_searchable(world, faces)


def test_an_unknown_site_is_refused_with_403(world: dict[str, Any], faces: dict[str, Any]) -> None:
    stranger = TemplateClient("mallory", world["signing"][SITE], world["public"])

    _assert_refused(_post(world["gallery_http"], "/v1/enroll", stranger.enroll_envelopes(["m0"], faces["templates"][:1], ENCODER)[0]),
                    403, "unknown site 'mallory'")
    _assert_refused(_post(world["gallery_http"], "/v1/search", stranger.query(faces["templates"][0], ENCODER).envelope), 403, "unknown site")
    _still_searchable(world, faces)


def test_a_replay_is_refused_with_403(world: dict[str, Any], faces: dict[str, Any]) -> None:
    enroll = world["site"].templates.enroll_envelopes(["q0"], faces["templates"][:1], ENCODER)[0]
    query = world["site"].templates.query(faces["templates"][0], ENCODER).envelope
    assert _post(world["gallery_http"], "/v1/enroll", enroll).status_code == 200
    assert _post(world["gallery_http"], "/v1/search", query).status_code == 200

    _assert_refused(_post(world["gallery_http"], "/v1/enroll", enroll), 403, "a replay")
    _assert_refused(_post(world["gallery_http"], "/v1/search", query), 403, "a replay")
    assert world["gallery"].template_count(ENCODER) == 41


def test_the_client_reports_a_refusal_as_one_template_error_line(world: dict[str, Any], faces: dict[str, Any]) -> None:
    with pytest.raises(TemplateError) as info:
        world["site"].enroll(faces["people"][:1], faces["templates"][:1], ENCODER)

    assert str(info.value) == ("the gallery at http://testserver refused (HTTP 400): enroll from 'hospital-a': p0 already enrolled "
                               "under this encoder; revoke them first (`fedface site revoke`)")


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(world: dict[str, Any]) -> None:
    reply = world["gallery_http"].post("/v1/enroll", content=b"x", headers={"content-length": str(MAX_ENVELOPE_BYTES + 1)})

    _assert_refused(reply, 413, "over the limit")


def test_a_site_the_key_holder_does_not_know_gets_the_key_holders_refusal(tmp_path: Path, world: dict[str, Any], faces: dict[str, Any]) -> None:
    campus = TemplateClient("campus-b", world["signing"]["campus-b"], world["public"])
    (world["dir"] / "holder-sites" / "campus-b.pub").rename(tmp_path / "campus-b.pub")
    try:
        reply = _post(world["gallery_http"], "/v1/search", campus.query(faces["templates"][3], ENCODER).envelope)
    finally:
        (tmp_path / "campus-b.pub").rename(world["dir"] / "holder-sites" / "campus-b.pub")

    _assert_refused(reply, 403, "the key holder refused: unknown site 'campus-b'")


def test_an_unreachable_key_holder_is_a_502(world: dict[str, Any], faces: dict[str, Any]) -> None:
    world["gallery"].keyholder = KeyHolderLink(httpx.Client(base_url="http://127.0.0.1:9", timeout=5))
    dead = TestClient(gallery_app(world["gallery"]))

    reply = _post(dead, "/v1/search", world["site"].templates.query(faces["templates"][0], ENCODER).envelope)

    _assert_refused(reply, 502, "the key holder at http://127.0.0.1:9 did not answer")


def test_the_link_to_the_key_holder_needs_its_ca_for_https_and_insecure_for_http(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="pass --keyholder-ca"):
        KeyHolderLink.connect("https://kh.example.org:8444", ca=None)
    with pytest.raises(TemplateError, match="plain HTTP"):
        KeyHolderLink.connect("http://127.0.0.1:8444", ca=None)
    with pytest.raises(TemplateError, match="must start with https://"):
        KeyHolderLink.connect("kh.example.org:8444", ca=tmp_path / "ca.pem")


# -- the public keys come from the key holder only ------------------------------------------------


def test_only_the_key_holder_serves_the_public_keys(tmp_path: Path, world: dict[str, Any]) -> None:
    assert world["gallery_http"].get("/v1/context").status_code == 404

    ctx = fetch_public_keys("http://testserver", tmp_path / "site" / "templates.pub", client=world["holder_http"],
                            expect=world["public"].id)

    assert ctx.id == world["public"].id
    assert kf.load_template_context(tmp_path / "site" / "templates.pub").keys.secret_key is None
    assert (tmp_path / "site" / "templates.pub").read_bytes() == (world["dir"] / "holder" / "templates.pub").read_bytes()


def test_public_keys_of_another_key_set_are_refused(tmp_path: Path, world: dict[str, Any]) -> None:
    with pytest.raises(KeyFileError, match="not 0000000000000000"):
        fetch_public_keys("http://testserver", tmp_path / "a.pub", client=world["holder_http"], expect="0000000000000000")
    kf.create_template_keys(tmp_path / "other", dim=64)
    with pytest.raises(KeyFileError, match="remove the old file"):
        fetch_public_keys("http://testserver", tmp_path / "other" / "templates.pub", client=world["holder_http"])
    assert not (tmp_path / "a.pub").exists()


def test_the_wire_log_holds_headers_and_sizes_only(world: dict[str, Any], faces: dict[str, Any]) -> None:
    world["site"].identify(faces["emb"][faces["probes"][0]], ENCODER)

    lines = [json.loads(x) for x in (world["site"].wire_log).read_text().splitlines()]

    assert [x["message_type"] for x in lines] == ["gallery.enroll", "gallery.identify"]
    for line in lines:
        for value in line["header"].values():
            assert isinstance(value, (str, int, float)) or set(value["of"]) <= {"str"}, value


# -- single images and the CLI's refusals ---------------------------------------------------------


def test_load_image_preprocesses_as_the_loader_does(tmp_path: Path, orl_root: Path) -> None:
    fs = load_faces(orl_root, size=(32, 32))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")

    assert np.array_equal(load_image(fs.sources[7], (32, 32)), fs.images[7])
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_image(bad)


def _site_toml(tmp_path: Path, templates: dict[str, Any] | None) -> Path:
    (tmp_path / "faces").mkdir(exist_ok=True)
    body: dict[str, Any] = {"name": SITE, "data": "faces", "state-dir": "state", "policy": {"budget-epsilon": 10.0}}
    if templates is not None:
        body["templates"] = templates
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(body))
    return path


TEMPLATES = {"gallery": "https://127.0.0.1:8443", "root-certificates": "ca.pem", "signing-key": "keys/hospital-a.key",
             "public-keys": "templates.pub", "encoder": "runs/fed"}


def _one_line_error(done: Any, code: int, start: str) -> str:
    assert done.exit_code == code, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), done.stderr
    return lines[0]


def test_templates_paths_are_relative_to_the_site_config(tmp_path: Path) -> None:
    cfg = SiteConfig.from_toml(_site_toml(tmp_path, {**TEMPLATES, "wire-log": "wire.jsonl"}))

    t = cfg.require_templates("site.toml")
    assert (t.signing_key, t.public_keys, t.encoder, t.root_certificates, t.wire_log) == (
        tmp_path / "keys/hospital-a.key", tmp_path / "templates.pub", tmp_path / "runs/fed", tmp_path / "ca.pem", tmp_path / "wire.jsonl")
    with pytest.raises(ConfigError, match="no \\[templates\\] table"):
        SiteConfig.from_toml(_site_toml(tmp_path, None)).require_templates("site.toml")


@pytest.mark.parametrize("command", [["enroll", "--people", "faces"], ["identify", "x.png"], ["verify", "--claim", "a/b", "x.png"], ["revoke", "p0"]])
def test_site_commands_without_a_templates_table_say_what_to_add(tmp_path: Path, command: list[str]) -> None:
    config = _site_toml(tmp_path, None)

    done = runner.invoke(app, ["site", command[0], "-c", str(config), *command[1:]])

    assert "add one with gallery, root-certificates, signing-key, public-keys and encoder" in _one_line_error(done, 3, "ConfigError:")


def test_site_command_with_a_missing_signing_key_names_it(tmp_path: Path) -> None:
    config = _site_toml(tmp_path, TEMPLATES)

    done = runner.invoke(app, ["site", "identify", "-c", str(config), "x.png"])

    assert f"signing key {tmp_path / 'keys/hospital-a.key'} not found" in _one_line_error(done, 13, "KeyFileError:")


def test_site_command_with_missing_public_keys_names_them(tmp_path: Path, keys: dict[str, Any]) -> None:
    config = _site_toml(tmp_path, {**TEMPLATES, "signing-key": str(keys["pairs"][SITE].private_key)})

    done = runner.invoke(app, ["site", "enroll", "-c", str(config), "--people", "faces"])

    assert "templates.pub not found" in _one_line_error(done, 13, "KeyFileError:")


def test_site_command_with_a_wrong_config_path_or_bad_table_fails_with_one_line(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["site", "identify", "-c", str(tmp_path / "nope.toml"), "x.png"])
    typo = runner.invoke(app, ["site", "identify", "-c", str(_site_toml(tmp_path, {**TEMPLATES, "gallary": "x"})), "x.png"])

    assert "nope.toml not found" in _one_line_error(missing, 3, "ConfigError:")
    assert "gallary" in _one_line_error(typo, 3, "ConfigError:")


def test_site_verify_needs_a_site_and_person_claim(tmp_path: Path) -> None:
    done = runner.invoke(app, ["site", "verify", "-c", str(_site_toml(tmp_path, TEMPLATES)), "--claim", "p0", "x.png"])

    assert done.exit_code == 2 and "SITE/PERSON" in done.output


def test_keys_templates_and_site_create_keys_and_print_the_context_id(tmp_path: Path) -> None:
    made = runner.invoke(app, ["keys", "templates", str(tmp_path / "holder"), "--dim", "64", "--format", "json"])
    again = runner.invoke(app, ["keys", "templates", str(tmp_path / "holder"), "--dim", "64"])
    rotated = runner.invoke(app, ["keys", "templates", str(tmp_path / "holder"), "--rotate", "--format", "json"])
    site = runner.invoke(app, ["keys", "site", str(tmp_path / "site"), "--name", SITE, "--format", "json"])

    assert made.exit_code == 0, made.output
    first = json.loads(made.stdout)
    assert kf.load_template_context(tmp_path / "holder" / "retired" / first["context"]).id == first["context"]  # kept, retired
    assert "keys are never overwritten" in _one_line_error(again, 13, "KeyFileError:")
    second = json.loads(rotated.stdout)
    assert second["retired"] == first["context"] and second["context"] == kf.load_template_context(tmp_path / "holder").id
    assert json.loads(site.stdout)["fingerprint"] == kf.fingerprint(kf.load_verify_key(tmp_path / "site" / f"{SITE}.pub"))


def test_gallery_commands_refuse_bad_input_with_one_line(tmp_path: Path, keys: dict[str, Any]) -> None:
    no_tls = runner.invoke(app, ["gallery", "serve", "--store", str(tmp_path / "g"), "--public-keys", str(keys["dir"] / "holder"),
                                 "--sites", str(tmp_path), "--keyholder", "https://127.0.0.1:1", "--threshold", "0.5",
                                 "--signing-key", str(tmp_path / "gallery.key")])
    no_key = runner.invoke(app, ["gallery", "register", "--sites", str(tmp_path / "s"), "--site", SITE, "--key", str(tmp_path / "x.pub")])
    no_store = runner.invoke(app, ["gallery", "status", "--store", str(tmp_path / "empty")])
    holder = runner.invoke(app, ["keyholder", "serve", "--keys", str(tmp_path / "none"), "--sites", str(tmp_path), "--state",
                                 str(tmp_path / "st"), "--server-key", str(tmp_path / "gallery.pub"), "--insecure"])

    assert "pass --tls-cert server.pem and --tls-key server.key" in _one_line_error(no_tls, 3, "ConfigError:")
    assert "x.pub not found" in _one_line_error(no_key, 13, "KeyFileError:")
    assert "no gallery at" in _one_line_error(no_store, 12, "TemplateError:")
    assert f"template public keys {tmp_path / 'none'} not found" in _one_line_error(holder, 13, "KeyFileError:")
