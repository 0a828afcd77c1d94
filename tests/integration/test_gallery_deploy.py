"""The encrypted gallery deployed on 127.0.0.1 with fedface's commands, each a real process:
`fedface keys init` (one CA and certificate for the key holder, another for the gallery server),
`fedface keys templates`, `fedface keys site`, `fedface gallery register`, `fedface keyholder
serve` and `fedface gallery serve` with TLS, then the site: `fedface site fetch-keys` (from the
key holder), `enroll` of 10 ORL people with an encoder trained here, `identify` and `verify`
(the decisions the plaintext scores give), `revoke` with re-enrollment, and its wire log
(headers and sizes only, no number arrays).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from test_deploy import BIN, REPO, Processes, _free_port, _wait_for_port, deploy_env

from fedface.client.enroll import Encoder, person_templates
from fedface.common.data.sources import load_faces
from fedface.common.metrics import verify

pytestmark = pytest.mark.integration

SITE = "hospital-a"
PEOPLE = [f"s{k}" for k in range(1, 11)]  # enrolled: images 1-5 of each; probes: 6-10
STRANGER = "s30"  # never enrolled
TINY = {
    "data": {"image-size": [32, 32]},
    "model": {"hidden-size": 32, "embedding-dim": 32},
    "training": {"epochs": 12, "threads": 1, "eval-every": 12},
    "evaluation": {"occlusion-box": 8, "occlusion-placements": 1},
}
#: Decisions within this of the threshold could flip under the key holder's flooding noise
#: (sigma at most 2^-11 in score units): six sigma.
MARGIN = 0.003


@dataclass
class Deployment:
    work: Path
    env: dict[str, str]
    config: Path
    threshold: float
    templates: np.ndarray  # plaintext templates of PEOPLE, for the expected decisions
    encoder: Encoder
    context: str
    people_dir: Path
    kh_ca: Path

    def fedface(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / "fedface"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        if ok:
            assert done.returncode == 0, f"fedface {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.fedface(*args, "--format", "json").stdout.strip().splitlines()[-1])

    def expected(self, image: Path, alive: list[int]) -> list[str] | None:
        """The plaintext decision over the enrolled people ``alive`` (indices into PEOPLE); None if
        the best score is too close to the threshold (or to the runner-up) for flooding to leave it alone."""
        q = self.encoder.embed(_load(self, image)[None])[0]
        scores = np.sort(self.templates[alive] @ q)[::-1]
        if abs(scores[0] - self.threshold) < MARGIN or (len(scores) > 1 and scores[0] - scores[1] < MARGIN):
            return None
        best = alive[int(np.argmax(self.templates[alive] @ q))]
        return [f"{SITE}/{PEOPLE[best]}"] if scores[0] > self.threshold else []


def _agree(results: list[dict[str, Any]], expected: list[list[str] | None]) -> None:
    """Every decision the plaintext scores settle is the encrypted one (at least half are settled)."""
    settled = [(r["identities"], e) for r, e in zip(results, expected, strict=True) if e is not None]
    assert len(settled) >= len(results) // 2, expected
    assert [r for r, _ in settled] == [e for _, e in settled]


def _probe(orl_root: Path, person: str, n: int = 6) -> Path:
    return orl_root / person / f"{n}.pgm"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("gallery-deploy")
    env = deploy_env(work)
    procs = Processes(env, work)

    def run(*args: str) -> str:
        done = subprocess.run([str(BIN / "fedface"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"fedface {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    # the federation's encoder (a tiny one, trained here) and the site's enrollment faces
    (work / "tiny.toml").write_text(tomli_w.dumps(TINY))
    run("train", "-c", str(work / "tiny.toml"), "--data", str(orl_root), "--out", str(work / "encoder"), "-q")
    people_dir = work / "people"
    for person in PEOPLE:
        (people_dir / person).mkdir(parents=True)
        for n in range(1, 6):
            (people_dir / person / f"{n}.pgm").symlink_to(orl_root / person / f"{n}.pgm")
    encoder = Encoder.from_checkpoint(work / "encoder")
    faces = load_faces(people_dir, size=encoder.image_size)
    emb = encoder.embed(faces.images)
    names, templates = person_templates(emb, faces.labels, faces.identity_names)
    assert names == PEOPLE
    orl = load_faces(orl_root, size=encoder.image_size)
    threshold = round(float(verify(encoder.embed(orl.images), orl.labels, seed=0).threshold), 3)  # the encoder's verification threshold

    # keys: TLS for each service, the key holder's template keys, the site's signing key
    run("keys", "init", str(work / "kh-tls"), "--host", "127.0.0.1")
    run("keys", "init", str(work / "gallery-tls"), "--host", "127.0.0.1")
    context = json.loads(run("keys", "templates", str(work / "kh-keys"), "--dim", "32", "--format", "json"))["context"]
    run("keys", "site", str(work / "site-keys"), "--name", SITE)
    run("keys", "site", str(work / "server-keys"), "--name", "gallery")  # the server's key for its requests to the key holder
    for sites in ("gallery-sites", "kh-sites"):
        run("gallery", "register", "--sites", str(work / sites), "--site", SITE, "--key", str(work / "site-keys" / f"{SITE}.pub"))

    kh_port, gallery_port = _free_port(), _free_port()
    procs.start("keyholder", str(BIN / "fedface"), "keyholder", "serve", "--keys", str(work / "kh-keys"), "--sites", str(work / "kh-sites"),
                "--state", str(work / "kh-state"), "--port", str(kh_port), "--server-key", str(work / "server-keys" / "gallery.pub"),
                "--tls-cert", str(work / "kh-tls" / "server.pem"), "--tls-key", str(work / "kh-tls" / "server.key"))
    try:
        _wait_for_port(kh_port)
        procs.start("gallery", str(BIN / "fedface"), "gallery", "serve", "--store", str(work / "store"),
                    "--public-keys", str(work / "kh-keys" / "templates.pub"), "--sites", str(work / "gallery-sites"),
                    "--keyholder", f"https://127.0.0.1:{kh_port}", "--keyholder-ca", str(work / "kh-tls" / "ca.pem"),
                    "--threshold", str(threshold), "--port", str(gallery_port), "--signing-key", str(work / "server-keys" / "gallery.key"),
                    "--tls-cert", str(work / "gallery-tls" / "server.pem"), "--tls-key", str(work / "gallery-tls" / "server.key"))
        _wait_for_port(gallery_port)
        config = work / "site" / "site.toml"
        (work / "site" / "faces").mkdir(parents=True)
        config.write_text(tomli_w.dumps({
            "name": SITE, "data": "faces", "state-dir": "state", "policy": {"budget-epsilon": 10.0},
            "templates": {"gallery": f"https://127.0.0.1:{gallery_port}", "root-certificates": str(work / "gallery-tls" / "ca.pem"),
                          "signing-key": str(work / "site-keys" / f"{SITE}.key"), "public-keys": "templates.pub",
                          "encoder": str(work / "encoder"), "wire-log": "wire.jsonl"},
        }))
        run("site", "fetch-keys", "-c", str(config), "--keyholder", f"https://127.0.0.1:{kh_port}",
            "--keyholder-ca", str(work / "kh-tls" / "ca.pem"), "--context", context)
        yield Deployment(work, env, config, threshold, templates, encoder, context, people_dir, work / "kh-tls" / "ca.pem")
    finally:
        left = procs.stop_all()
        assert not left, f"processes still running: {left}"


def test_the_site_fetched_the_key_holders_public_keys(deployment: Deployment) -> None:
    assert (deployment.config.parent / "templates.pub").read_bytes() == (deployment.work / "kh-keys" / "templates.pub").read_bytes()


def test_enroll_identify_verify_and_revoke_over_tls(deployment: Deployment, orl_root: Path) -> None:
    d = deployment
    enrolled = d.json("site", "enroll", "-c", str(d.config), "--people", str(d.people_dir))
    assert enrolled["people"] == PEOPLE and len(enrolled["blocks"]) == 1
    status = d.json("gallery", "status", "--store", str(d.work / "store"))
    assert [(v["site"], v["templates"]) for v in status["versions"]] == [(SITE, 10)]

    # 1:N: every probe gets the plaintext decision; most are the right person
    probes = [_probe(orl_root, p) for p in PEOPLE] + [_probe(orl_root, STRANGER)]
    everyone = list(range(len(PEOPLE)))
    found = d.json("site", "identify", "-c", str(d.config), *map(str, probes))["results"]
    _agree(found, [d.expected(p, everyone) for p in probes])
    assert [r["image"] for r in found] == list(map(str, probes))
    assert sum(r["identities"] == [f"{SITE}/{p}"] for r, p in zip(found, PEOPLE, strict=False)) >= 7
    text = d.fedface("site", "identify", "-c", str(d.config), str(probes[0])).stdout
    assert text.strip() == f"{probes[0]}: {', '.join(found[0]['identities']) or 'no match'}"

    # 1:1: the claim holds or not, as the plaintext score says; exit 0 either way
    own = d.json("site", "verify", "-c", str(d.config), "--claim", f"{SITE}/s2", str(_probe(orl_root, "s2")))
    other = d.fedface("site", "verify", "-c", str(d.config), "--claim", f"{SITE}/s2", str(_probe(orl_root, STRANGER)))
    q = d.encoder.embed(np.stack([_load(d, _probe(orl_root, "s2")), _load(d, _probe(orl_root, STRANGER))]))
    assert own["match"] == bool(d.templates[1] @ q[0] > d.threshold)
    assert other.stdout.strip().endswith(("match" if d.templates[1] @ q[1] > d.threshold else "no match") + f" ({SITE}/s2)")
    refused = d.fedface("site", "verify", "-c", str(d.config), "--claim", f"{SITE}/nobody", str(probes[0]), ok=False)
    assert refused.returncode == 12 and refused.stderr.strip().splitlines()[-1].startswith("TemplateError:")
    assert "is not enrolled" in refused.stderr

    # revoke s1: its block goes, the other nine are re-enrolled from --people
    revoked = d.json("site", "revoke", "-c", str(d.config), "s1", "--people", str(d.people_dir))
    assert revoked["revoked"] == ["s1"] and sorted(revoked["re_enrolled"]) == sorted(PEOPLE[1:]) and revoked["still_to_re_enroll"] == []
    rest = list(range(1, len(PEOPLE)))
    after = d.json("site", "identify", "-c", str(d.config), *map(str, probes[:3]))["results"]
    _agree(after, [d.expected(p, rest) for p in probes[:3]])
    assert all(f"{SITE}/s1" not in r["identities"] for r in after)


def _load(d: Deployment, path: Path) -> np.ndarray:
    from fedface.common.data.sources import load_image

    return load_image(path, d.encoder.image_size)


def test_a_gallery_certificate_from_another_ca_is_refused(deployment: Deployment, orl_root: Path) -> None:
    d = deployment
    raw = d.config.read_text().replace(str(d.work / "gallery-tls" / "ca.pem"), str(d.kh_ca))
    wrong = d.config.parent / "wrong-ca.toml"
    wrong.write_text(raw)

    done = d.fedface("site", "identify", "-c", str(wrong), str(_probe(orl_root, "s3")), ok=False)

    assert done.returncode == 12
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("TemplateError: the gallery at https://127.0.0.1:") and "CERTIFICATE_VERIFY_FAILED" in line


def test_the_wire_log_holds_only_envelope_headers(deployment: Deployment, orl_root: Path) -> None:
    d = deployment
    log = d.config.parent / "wire.jsonl"
    if not log.exists():  # this test alone: make some traffic first
        d.fedface("site", "enroll", "-c", str(d.config), "--people", str(d.people_dir))
        d.fedface("site", "identify", "-c", str(d.config), str(_probe(orl_root, "s4")))

    lines = [json.loads(x) for x in log.read_text().splitlines()]

    assert {x["message_type"] for x in lines} >= {"gallery.enroll", "gallery.identify"}
    for line in lines:
        assert set(line) == {"node", "message_type", "stage", "header", "parts", "bytes"} and line["node"] == SITE
        assert all(isinstance(n, int) for n in line["parts"])
        for key, value in line["header"].items():
            scalar = isinstance(value, (str, int, float, bool)) or value is None
            assert scalar or (set(value) == {"list", "of"} and set(value["of"]) <= {"str"}), (key, value)
