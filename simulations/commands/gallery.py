"""The encrypted gallery's commands: `fedface gallery ...` (the server), `fedface keyholder serve`,
and the site's `fedface site enroll / revoke / identify / verify / fetch-keys`.

Three parties, each on its own host in a deployment:

- the **key holder** (`fedface keys templates`, then `fedface keyholder serve`) holds the
  template secret key and answers decision requests with sealed decisions;
- the **gallery server** (`fedface gallery serve`) stores encrypted templates, scores queries
  under encryption and asks the key holder for the decision, over TLS verified against the
  key holder's CA;
- each **site** (`fedface keys site`, `fedface site ...`, configured by the ``[templates]``
  table of its site.toml) encrypts and signs its templates and queries.

Both services run uvicorn with TLS (a certificate from `fedface keys init DIR --host HOST`);
``--insecure`` (plain HTTP) is for a local demo only. The HTTP API is in
:mod:`fedface.server.services`, the site's client in :mod:`fedface.client.gallery_client`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from fedface.common.errors import ConfigError, DataNotFoundError, KeyFileError, TemplateError
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

if TYPE_CHECKING:
    from fedface.client.enroll import Encoder
    from fedface.client.gallery_client import GalleryClient

gallery_app = typer.Typer(
    help="The encrypted gallery's server: serve it, register sites' signing keys, show what it holds.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
keyholder_app = typer.Typer(
    help="The key holder: the only holder of the template secret key; it turns protected search results into sealed decisions.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_FORMAT_HELP = "text, or json: the result as one JSON object on stdout."
_INSECURE_HELP = "Allow a plain-HTTP gallery URL (no TLS): a local demo only."
_CONFIG_HELP = "The site's TOML with its \\[templates] table (gallery, root-certificates, signing-key, public-keys, encoder, wire-log)."


def _check_format(output_format: str) -> None:
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")


def _tls(tls_cert: Path | None, tls_key: Path | None, insecure: bool) -> dict[str, str]:
    """uvicorn's TLS settings, or none with --insecure; ConfigError naming what is missing."""
    if insecure:
        return {}
    if tls_cert is None or tls_key is None:
        raise ConfigError("pass --tls-cert server.pem and --tls-key server.key (from `fedface keys init DIR --host HOST`), "
                          "or --insecure for a local demo")
    for f in (tls_cert, tls_key):
        if not f.is_file():
            raise DataNotFoundError(f"{f} not found: create the certificate with `fedface keys init DIR --host HOST`")
    return {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}


def _serve(app: Any, host: str, port: int, tls: dict[str, str]) -> None:
    import uvicorn

    if not tls:
        err_console.print("[yellow]insecure: plain HTTP, no TLS (a local demo only)[/]")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, **tls)  # type: ignore[arg-type]


# -- the gallery server ------------------------------------------------------------------------


@gallery_app.command("serve")
def gallery_serve(
    store: Annotated[Path, typer.Option(help="The gallery's directory (gallery.sqlite and its nonces; created).")],
    public_keys: Annotated[Path, typer.Option(help="templates.pub from the key holder (public keys only: the server refuses a secret key).")],
    sites: Annotated[Path, typer.Option(help="Directory of the sites' <site>.pub signing keys (`fedface gallery register`).")],
    keyholder: Annotated[str, typer.Option(help="The key holder's URL, https://HOST:PORT (`fedface keyholder serve`).")],
    threshold: Annotated[float, typer.Option(help="Cosine score above which a template matches: the verification threshold measured for "
                                             "this encoder on held-out faces (`verif_threshold` of `fedface evaluate ENCODER --format json`).")],
    signing_key: Annotated[Path, typer.Option(help="The server's Ed25519 key that signs its requests to the key holder (`fedface keys site DIR --name gallery`; give the key holder its .pub).")],
    keyholder_ca: Annotated[Optional[Path], typer.Option(help="The CA that signed the key holder's certificate (its ca.pem).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    tls_cert: Annotated[Optional[Path], typer.Option(help="This server's TLS certificate (server.pem of `fedface keys init`).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Its private key (server.key).")] = None,
    insecure: Annotated[bool, typer.Option(help="Serve plain HTTP and allow an http:// key holder: a local demo only.")] = False,
    max_queries_per_hour: Annotated[int, typer.Option(help="Most queries (identify, verify) a site may send per hour, so that decisions cannot be mined faster.", min=1)] = 1000,
) -> None:
    """Serve the encrypted gallery: POST /v1/enroll, /v1/revoke, /v1/search; GET /v1/status.

    The server never holds the template secret key: it stores and scores ciphertexts, and
    relays decisions sealed to the querying site. Runs in the foreground."""
    setup_logging()
    from fedface.common.crypto.keyfiles import SiteKeys, load_signing_key, load_template_context
    from fedface.server.gallery import Gallery
    from fedface.server.services import KeyHolderLink, KeyHolderUnreachable, gallery_app as make_app

    with user_errors():
        tls = _tls(tls_cert, tls_key, insecure)
        context = load_template_context(public_keys)
        link = KeyHolderLink.connect(keyholder, ca=keyholder_ca, insecure=insecure)
        try:
            served = link.context_id()
        except KeyHolderUnreachable as exc:
            err_console.print(f"[yellow]warning: {exc}; searches fail until it answers[/]", soft_wrap=True)
        else:
            if served != context.id:
                raise KeyFileError(f"{public_keys} is key set {context.id}, but the key holder serves {served}: "
                                   "take templates.pub from the key holder")
        gallery = Gallery(store, context, SiteKeys(sites), keyholder=link, signing_key=load_signing_key(signing_key),
                          threshold=threshold, max_queries_per_hour=max_queries_per_hour)
    scheme = "http" if insecure else "https"
    err_console.print(f"gallery server on {scheme}://{host}:{port}: key set {context.id}, threshold {threshold}, "
                      f"{gallery.template_count()} templates, key holder {keyholder}", soft_wrap=True)
    _serve(make_app(gallery), host, port, tls)


@gallery_app.command("register")
def gallery_register(
    sites: Annotated[Path, typer.Option(help="The sites directory of `fedface gallery serve` or `fedface keyholder serve` (created).")],
    site: Annotated[str, typer.Option(help="The site's name (the name in its site.toml).")],
    key: Annotated[Path, typer.Option(help="The site's public signing key (<name>.pub of `fedface keys site`).")],
) -> None:
    """Register a site's template signing key, as <site>.pub in a sites directory. The gallery
    server and the key holder each keep their own: register the site with both. A registered
    key is never replaced by another (remove the file first)."""
    setup_logging()
    from fedface.common.crypto.keyfiles import SiteKeys, fingerprint, load_verify_key

    with user_errors():
        sites.mkdir(parents=True, exist_ok=True)
        target = SiteKeys(sites).register(site, key)
        fp = fingerprint(load_verify_key(target))
    err_console.print(f"registered {site} as {target} (fingerprint {fp})", soft_wrap=True)


@gallery_app.command("status")
def gallery_status(
    store: Annotated[Path, typer.Option(help="The gallery's directory (--store of `fedface gallery serve`).")],
    events: Annotated[int, typer.Option(help="How many recent events to show.", min=0)] = 20,
    output_format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "text",
) -> None:
    """What a gallery holds: its versions (key set, encoder) with template counts per site, and
    its recent events (read from the store; no keys needed, nothing secret shown)."""
    _check_format(output_format)
    setup_logging()
    from fedface.server.gallery import read_status

    with user_errors():
        status = read_status(store, events)
    if output_format == "json":
        print_json(status)
        return
    err_console.print(f"{status['templates']} templates", soft_wrap=True)
    for v in status["versions"]:
        err_console.print(f"  key set {v['context']} encoder {v['encoder']}: {v['site']} {v['templates']} templates in {v['blocks']} blocks",
                          soft_wrap=True, markup=False)
    for e in status["events"]:
        err_console.print(f"  {e['time']:.0f} {e['site']} {e['kind']} {e['outcome']}: {e['detail']}", soft_wrap=True, markup=False)


# -- the key holder ----------------------------------------------------------------------------


@keyholder_app.command("serve")
def keyholder_serve(
    keys: Annotated[Path, typer.Option(help="The key directory of `fedface keys templates` (templates.pub and templates.secret).")],
    sites: Annotated[Path, typer.Option(help="Directory of the sites' <site>.pub signing keys (`fedface gallery register --sites`).")],
    state: Annotated[Path, typer.Option(help="Directory for the key holder's replay-protection state (created).")],
    server_key: Annotated[Path, typer.Option(help="The gallery server's public signing key (the .pub of its --signing-key): only requests it signed are answered.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8444,
    tls_cert: Annotated[Optional[Path], typer.Option(help="This server's TLS certificate (server.pem of `fedface keys init`).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Its private key (server.key).")] = None,
    insecure: Annotated[bool, typer.Option(help="Serve plain HTTP: a local demo only.")] = False,
    max_queries_per_hour: Annotated[int, typer.Option(help="Most decisions per site per hour.", min=1)] = 1000,
) -> None:
    """Serve the key holder: POST /v1/decide (a request signed by the gallery server in, a
    signed decision sealed to the site out), POST /v1/check (an enrollment's norm check) and
    GET /v1/context (the public template keys the sites fetch). It verifies each site's signed
    query itself, refuses queries that are not one unit template, and releases only decisions. FEDFACE_KEY_PASSPHRASE unlocks a
    protected secret key. Runs in the foreground."""
    setup_logging()
    from fedface.common.crypto.keyfiles import SiteKeys, load_template_context, load_verify_key
    from fedface.server.keyholder import KeyHolder
    from fedface.server.services import keyholder_app as make_app

    with user_errors():
        tls = _tls(tls_cert, tls_key, insecure)
        context = load_template_context(keys, keys)
        holder = KeyHolder(state, context, SiteKeys(sites), load_verify_key(server_key), max_queries_per_hour=max_queries_per_hour)
    scheme = "http" if insecure else "https"
    err_console.print(f"key holder on {scheme}://{host}:{port}: key set {context.id} (dim {context.params.dim})", soft_wrap=True)
    _serve(make_app(holder), host, port, tls)


# -- the site ----------------------------------------------------------------------------------


def _site_client(config: Path, insecure: bool) -> tuple[GalleryClient, Path]:
    """The site's gallery client from its site.toml, and the encoder path."""
    from fedface.client.enroll import TemplateClient
    from fedface.client.gallery_client import GalleryClient
    from fedface.client.siteconfig import SiteConfig
    from fedface.common.crypto.keyfiles import load_signing_key, load_template_context

    sc = SiteConfig.from_toml(config)
    t = sc.require_templates(config)
    key = load_signing_key(t.signing_key)
    context = load_template_context(t.public_keys)
    client = GalleryClient(t.gallery, TemplateClient(sc.name, key, context), root_certificates=t.root_certificates,
                           wire_log=t.wire_log, insecure=insecure)
    return client, t.encoder


def _encoder(path: Path, client: GalleryClient) -> Encoder:
    from fedface.client.enroll import Encoder

    encoder = Encoder.from_checkpoint(path)
    dim = client.templates.context.params.dim
    probe = encoder.embed(_blank(encoder.image_size))
    if probe.shape[1] != dim:
        raise TemplateError(f"the encoder {path} makes {probe.shape[1]}-d templates, but the key set {client.templates.context.id} "
                            f"is for {dim}-d: use the federation's encoder, or ask the key holder for a {probe.shape[1]}-d key set")
    return encoder


def _blank(size: tuple[int, int]) -> Any:
    import numpy as np

    return np.zeros((1, *size), dtype=np.float32)


def _templates_of(encoder: Encoder, people: Path, layout: str, only: set[str] | None = None) -> tuple[list[str], Any]:
    """(person ids, unit templates) of the identities under ``people`` (all, or those in ``only``)."""
    from fedface.client.enroll import person_templates
    from fedface.common.data.sources import load_faces

    faces = load_faces(people, layout=layout, size=encoder.image_size)  # type: ignore[arg-type]
    import numpy as np

    keep = [i for i, name in enumerate(faces.identity_names) if only is None or name in only]
    mask = np.isin(faces.labels, keep)
    images, labels = faces.images[mask], faces.labels[mask]
    if len(images) == 0:
        return [], None
    return person_templates(encoder.embed(images), labels, faces.identity_names)


def site_enroll(
    config: Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)],
    people: Annotated[Path, typer.Option(help="The faces to enroll: one identity per person (ImageFolder <person>/<image>, ORL, Yale ...).")],
    layout: Annotated[str, typer.Option(help="Layout of --people: auto, orl, yale-a, extended-yale-b, image-folder.")] = "auto",
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
    output_format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "text",
) -> None:
    """Enroll people: each identity's template (the normalised mean of its images' embeddings
    under the site's encoder) is encrypted with the key holder's public keys, signed with the
    site's key and sent to the gallery. The person ids are the identity names (folder names)."""
    _check_format(output_format)
    setup_logging()
    with user_errors():
        client, encoder_path = _site_client(config, insecure)
        with client:
            encoder = _encoder(encoder_path, client)
            names, templates = _templates_of(encoder, people, layout)
            blocks = client.enroll(names, templates, encoder.id)
    err_console.print(f"enrolled {len(names)} people of {client.templates.site} in {len(blocks)} block(s) under encoder {encoder.id}",
                      soft_wrap=True)
    if output_format == "json":
        print_json({"site": client.templates.site, "encoder": encoder.id, "people": names, "blocks": blocks})


def site_revoke(
    config: Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)],
    person: Annotated[Optional[list[str]], typer.Argument(help="Person ids to revoke (their identity names).", show_default=False)] = None,
    everyone: Annotated[bool, typer.Option("--all", help="Revoke every person this site enrolled.")] = False,
    people: Annotated[Optional[Path], typer.Option(help="The enrollment faces: re-enroll the others that were in the deleted blocks.")] = None,
    layout: Annotated[str, typer.Option(help="Layout of --people.")] = "auto",
    key_set: Annotated[Optional[list[str]], typer.Option("--key-set", help="Only blocks enrolled under this key-set id (repeat for several): e.g. the old set after a key rotation.")] = None,
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
    output_format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "text",
) -> None:
    """Revoke people: the server deletes every block of this site holding a named person (under
    every encoder and key set, or only those of --key-set). Others in those blocks are re-enrolled from --people under the site's
    encoder; without --people they are listed, to be re-enrolled with `fedface site enroll`."""
    _check_format(output_format)
    if not person and not everyone:
        raise typer.BadParameter("name the people to revoke, or pass --all", param_hint="PERSON")
    setup_logging()
    re_enrolled: list[str] = []
    with user_errors():
        client, encoder_path = _site_client(config, insecure)
        with client:
            result = client.revoke(person or [], everyone=everyone, contexts=key_set)
            if people is not None and result["re_enroll"]:
                encoder = _encoder(encoder_path, client)
                names, templates = _templates_of(encoder, people, layout, only=set(result["re_enroll"]))
                if names:
                    client.enroll(names, templates, encoder.id)
                re_enrolled = names
    missing = sorted(set(result["re_enroll"]) - set(re_enrolled))
    err_console.print(f"revoked {len(result['revoked'])} people ({result['blocks']} block(s) deleted); "
                      f"re-enrolled {len(re_enrolled)}", soft_wrap=True)
    if result["unknown"]:
        err_console.print(f"not enrolled: {', '.join(result['unknown'])}", soft_wrap=True, markup=False)
    if missing:
        where = f"not found under {people}" if people is not None else "pass --people to re-enroll them"
        err_console.print(f"to re-enroll ({where}): {', '.join(missing)}", soft_wrap=True, markup=False)
    if output_format == "json":
        print_json({**result, "re_enrolled": re_enrolled, "still_to_re_enroll": missing})


def _query_templates(encoder: Encoder, images: list[Path]) -> Any:
    import numpy as np

    from fedface.common.data.sources import load_image

    return encoder.embed(np.stack([load_image(p, encoder.image_size) for p in images]))


def site_identify(
    config: Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)],
    images: Annotated[list[Path], typer.Argument(help="Face images to identify (each preprocessed as the data loaders do).")],
    top_k: Annotated[int, typer.Option(help="Report up to this many identities above the threshold, best first.", min=1, max=10)] = 1,
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
    output_format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "text",
) -> None:
    """1:N search: which enrolled people (SITE/PERSON) each image matches, or "no match". The
    query is encrypted; the site learns only the decision, never a score."""
    _check_format(output_format)
    setup_logging()
    results = []
    with user_errors():
        client, encoder_path = _site_client(config, insecure)
        with client:
            encoder = _encoder(encoder_path, client)
            for path, template in zip(images, _query_templates(encoder, images), strict=True):
                decision = client.identify(template, encoder.id, top_k=top_k)
                results.append({"image": str(path), "match": decision.match, "identities": list(decision.identities)})
    if output_format == "json":
        print_json({"encoder": encoder.id, "results": results})
        return
    for r in results:
        typer.echo(f"{r['image']}: {', '.join(r['identities']) if r['match'] else 'no match'}")


def site_verify(
    config: Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)],
    image: Annotated[Path, typer.Argument(help="The face image to check.")],
    claim: Annotated[str, typer.Option(help="The claimed identity, SITE/PERSON (as identify reports it).")],
    insecure: Annotated[bool, typer.Option(help=_INSECURE_HELP)] = False,
    output_format: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "text",
) -> None:
    """1:1 check: does the image match the claimed enrolled person? Prints match or no match
    (exit 0 either way); a refused request (unknown claim, bad keys ...) exits non-zero."""
    _check_format(output_format)
    if claim.count("/") != 1 or not all(claim.split("/")):
        raise typer.BadParameter(f"expected SITE/PERSON, got {claim!r}", param_hint="--claim")
    setup_logging()
    with user_errors():
        client, encoder_path = _site_client(config, insecure)
        with client:
            encoder = _encoder(encoder_path, client)
            decision = client.verify(_query_templates(encoder, [image])[0], encoder.id, claim)
    if output_format == "json":
        print_json({"image": str(image), "claim": claim, "match": decision.match})
    else:
        typer.echo(f"{image}: {'match' if decision.match else 'no match'} ({claim})")


def site_fetch_keys(
    config: Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)],
    keyholder: Annotated[str, typer.Option(help="The key holder's URL, https://HOST:PORT (never the gallery server's).")],
    context: Annotated[Optional[str], typer.Option(help="The key set id the key holder gave you out of band: refuse any other.")] = None,
    keyholder_ca: Annotated[Optional[Path], typer.Option(help="The CA of the key holder's certificate (default: root-certificates of \\[templates]).")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a plain-HTTP key holder URL: a local demo only.")] = False,
) -> None:
    """Fetch the key holder's public template keys (GET /v1/context) into the public-keys path
    of \\[templates]. Compare the printed key set id with the key holder's out of band (or pass
    --context); a file of another key set is never replaced."""
    setup_logging()
    from fedface.client.gallery_client import fetch_public_keys
    from fedface.client.siteconfig import SiteConfig

    with user_errors():
        t = SiteConfig.from_toml(config).require_templates(config)
        ctx = fetch_public_keys(keyholder, t.public_keys, root_certificates=keyholder_ca or t.root_certificates,
                                insecure=insecure, expect=context)
    err_console.print(f"key set {ctx.id} (dim {ctx.params.dim}) written to {t.public_keys}"
                      + ("" if context else ": compare the id with the key holder's"), soft_wrap=True)


__all__ = [
    "gallery_app",
    "keyholder_app",
    "site_enroll",
    "site_fetch_keys",
    "site_identify",
    "site_revoke",
    "site_verify",
]
