"""`fedface server ...` and `fedface site join`: a deployed federation on Flower's SuperLink and
SuperNodes, with TLS and node authentication unless ``--insecure`` (a local demo only).
(`fedface site`'s encrypted-template commands live in :mod:`fedface.simulations.commands.gallery`.)

These commands start Flower's own processes with fedface's settings. Nothing is home-made:
scaling out means adding SuperNodes. Every process gets an environment that switches off
Flower's telemetry, update checks and runtime dependency installation.

App signing: `fedface server run --publisher-key` signs the app it sends and hands it to the
SuperLink as Flower's app hub would (:mod:`fedface.server.publisher`; the SuperLink of
`fedface server start` takes its apps from ``--app-port``); `fedface site join` starts its SuperNode
with ``--trusted-entities`` made from the site's ``trusted-publishers``, so it runs only apps
those keys signed (and fedface's ClientApp checks the signed run config, :mod:`fedface.client.trust`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import tomli_w
import typer

from fedface.common.errors import ConfigError, DataNotFoundError
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors
from fedface.simulations.simulate import QUIET_ENV

CONNECTION = "fedface"
APP_PORT = 8001  # where `fedface server run` hands a signed app to the SuperLink (127.0.0.1)

server_app = typer.Typer(
    help="The coordinator of a deployed federation: start the SuperLink, register sites, launch runs.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


site_app = typer.Typer(
    help="A site: join a federation, and enroll, revoke, identify and verify faces in the encrypted gallery.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV}
    bin_dir = str(Path(sys.executable).parent)  # Flower's commands live beside this Python
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _tool(name: str) -> str:
    path = shutil.which(name, path=_env()["PATH"])
    if path is None:
        raise DataNotFoundError(f"Flower's `{name}` command is not installed beside fedface: reinstall fedface (it depends on flwr)")
    return path


def _tls_files(keys: Path | None, insecure: bool) -> tuple[Path, Path, Path] | None:
    if insecure:
        return None
    if keys is None:
        raise ConfigError("pass --keys DIR (made by `fedface keys init`) for TLS, or --insecure for a local demo without it")
    files = (keys / "ca.pem", keys / "server.pem", keys / "server.key")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataNotFoundError(f"missing {', '.join(missing)}: create them with `fedface keys init {keys} --host HOST`")
    return files


def _connection_home(flwr_home: Path, superlink: str, root_certificates: Path | None, insecure: bool) -> Path:
    """Write the `flwr` CLI's connection to the SuperLink into ``flwr_home``."""
    if not insecure and (root_certificates is None or not root_certificates.is_file()):
        raise ConfigError("pass --root-certificates ca.pem (the federation's CA), or --insecure for a local demo")
    conn: dict[str, object] = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    else:
        assert root_certificates is not None
        conn["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    return flwr_home


@server_app.command("start")
def start(
    keys: Annotated[Optional[Path], typer.Option(help="Directory from `fedface keys init` (ca.pem, server.pem, server.key).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS and no node authentication: a local demo only.")] = False,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's port (Fleet, Control and ServerApp APIs).")] = 8000,
    database: Annotated[Path, typer.Option(help="The SuperLink's state database.")] = Path("superlink.db"),
    app_port: Annotated[int, typer.Option(help="Port on 127.0.0.1 where `fedface server run` hands this SuperLink its signed apps.")] = APP_PORT,
) -> None:
    """Start a SuperLink: TLS with the federation's certificate and node authentication (only
    registered sites are admitted) unless --insecure. It takes signed apps from `fedface server
    run` on this host (--app-port), never from Flower's platform. Runs in the foreground; stop it
    with Ctrl-C or by PID (this process becomes the SuperLink)."""
    setup_logging()
    from fedface.server.publisher import hub_url

    with user_errors():
        tls = _tls_files(keys, insecure)
        args = [_tool("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database),
                "--disable-runtime-dependency-installation"]
        if tls is None:
            args.append("--insecure")
            err_console.print("[yellow]insecure SuperLink: no TLS, no node authentication (a local demo only)[/]")
        else:
            ca, cert, key = tls
            args += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth"]
    os.execvpe(args[0], args, {**_env(), "FLWR_SUPERGRID_API_URL": hub_url(app_port)})


@server_app.command("register")
def register(
    public_key: Annotated[Path, typer.Argument(help="A site's public key (<name>.pub from `fedface keys node`).")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")] = "127.0.0.1:8000",
    root_certificates: Annotated[Optional[Path], typer.Option(help="The federation's CA (ca.pem).")] = None,
    insecure: Annotated[bool, typer.Option(help="Connect without TLS (a local demo only).")] = False,
    flwr_home: Annotated[Path, typer.Option(help="Where the flwr CLI's connection is written.")] = Path(".fedface-flwr"),
) -> None:
    """Register a site's public key with the SuperLink (node authentication admits only registered sites)."""
    setup_logging()
    with user_errors():
        if not public_key.is_file():
            raise DataNotFoundError(f"public key {public_key} not found: the site creates it with `fedface keys node`")
        home = _connection_home(flwr_home, superlink, root_certificates, insecure)
        done = subprocess.run([_tool("flwr"), "supernode", "register", str(public_key), CONNECTION], env=_env(home),
                              capture_output=True, text=True)
    if done.returncode != 0:
        err_console.print(done.stdout[-2000:] + done.stderr[-2000:])
        err_console.print(f"RegistrationError: the SuperLink at {superlink} did not register {public_key}")
        raise typer.Exit(1)
    err_console.print(f"registered {public_key}")


@server_app.command("run")
def run(
    scenario: Annotated[Optional[Path], typer.Option("--scenario", "-c", help="Scenario TOML (default: the packaged federated one); its text is sent to the sites with the run.")] = None,
    run_dir: Annotated[Path, typer.Option(help="Where the server writes the run store and checkpoints.")] = Path("runs/deployed"),
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")] = "127.0.0.1:8000",
    root_certificates: Annotated[Optional[Path], typer.Option(help="The federation's CA (ca.pem).")] = None,
    insecure: Annotated[bool, typer.Option(help="Connect without TLS (a local demo only).")] = False,
    rounds: Annotated[Optional[int], typer.Option(help="Rounds (default from the scenario).")] = None,
    sites: Annotated[Optional[int], typer.Option(help="Sites expected (default from the scenario).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Each site's epsilon for the run (default from the scenario).")] = None,
    flwr_home: Annotated[Path, typer.Option(help="Where the flwr CLI's connection is written.")] = Path(".fedface-flwr"),
    output_format: Annotated[str, typer.Option("--format", help="text, or json: the run's summary as one JSON object on stdout's last line.")] = "text",
    publisher_key: Annotated[Optional[Path], typer.Option(help="The publisher's signing key (<name>.key from `fedface keys publisher`): the app and its run config are signed with it. Sites that trust publishers refuse unsigned apps.")] = None,
    app_port: Annotated[int, typer.Option(help="The SuperLink's --app-port: the signed app is handed to it there (run this on the SuperLink's host).")] = APP_PORT,
) -> None:
    """Launch a federated run on the SuperLink (`flwr run` of fedface's App) and wait for it.

    With --publisher-key the app (its FAB, and its run config: the scenario's text, rounds,
    sites, epsilon, run directory) is signed and handed to the SuperLink on 127.0.0.1:--app-port;
    without it the app goes unsigned, and sites that trust publishers refuse it."""
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")
    setup_logging()
    with user_errors():
        if scenario is not None:
            if not scenario.is_file():
                raise ConfigError(f"scenario {scenario} not found: pass an existing TOML file")
            text = scenario.read_text()
        else:
            text = resources.files("fedface.simulations").joinpath("scenarios", "federated.toml").read_text()
        home = _connection_home(flwr_home, superlink, root_certificates, insecure)
        run_dir = run_dir.resolve()
        from fedface.common.signing import load_private_key
        from fedface.server.publisher import AppHandover, app_pyproject, build_app

        key = load_private_key(publisher_key) if publisher_key is not None else None
        pyproject = resources.files("fedface.simulations").joinpath("flwr_app", "pyproject.toml").read_text()
        run_config = {"scenario-toml": text, "run-dir": str(run_dir), "rounds": rounds or 0, "sites": sites or 0, "epsilon": epsilon or 0.0}
        with tempfile.TemporaryDirectory(prefix="fedface-app-") as tmp:
            flwr_run = [_tool("flwr"), "run"]
            if key is None:
                err_console.print("[yellow]unsigned app (no --publisher-key): sites that trust publishers refuse it[/]")
                app_dir = Path(tmp) / "app"
                app_dir.mkdir()
                (app_dir / "pyproject.toml").write_text(app_pyproject(pyproject, run_config, None))
                done = subprocess.run([*flwr_run, str(app_dir), CONNECTION, "--stream"], env=_env(home), capture_output=True, text=True, cwd=tmp)
            else:
                app = build_app(pyproject, run_config, key)
                with AppHandover(app, app_port):
                    done = subprocess.run([*flwr_run, app.spec, CONNECTION, "--stream"], env=_env(home), capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0:
            err_console.print(done.stdout[-3000:] + done.stderr[-3000:])
            err_console.print(f"RunError: `flwr run` on {superlink} failed (exit {done.returncode})")
            raise typer.Exit(1)
        from fedface.server.store import RunStore

        with RunStore(run_dir / "runs.sqlite", create=False) as store:
            summary = store.runs()[-1]
            history = store.rounds(summary.run_id)
    last = history[-1].metrics if history else {}
    err_console.print(
        f"run {summary.run_id}: {summary.status}, {summary.rounds_done}/{summary.rounds_planned} rounds; "
        f"final verification acc {last.get('verif_acc', float('nan')):.4f}; run directory {run_dir}"
    )
    if summary.error:
        err_console.print(f"run {summary.run_id} failed: {summary.error}", markup=False)
    if output_format == "json":
        print_json({"run_id": summary.run_id, "status": summary.status, "error": summary.error, "rounds": summary.rounds_done,
                    "run_dir": str(run_dir), **last})
    if summary.status != "completed":
        raise typer.Exit(1)


@site_app.command("join")
def join(
    config: Annotated[Path, typer.Option("--config", "-c", help="The site's TOML (name, data, state-dir, trusted-publishers, and its \\[policy] with budget-epsilon).")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")] = "127.0.0.1:8000",
    root_certificates: Annotated[Optional[Path], typer.Option(help="The federation's CA (ca.pem).")] = None,
    key: Annotated[Optional[Path], typer.Option(help="The site's private key (<name>.key from `fedface keys node`).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS and no node authentication: a local demo only.")] = False,
    port: Annotated[int, typer.Option(help="Port of this SuperNode's local API (one per SuperNode on a host).")] = 9094,
) -> None:
    """Join a federation as a site: a SuperNode running fedface's ClientApp on this site's own
    faces, with its ledger and heads in its state directory. It runs only apps signed by the
    publisher keys of `trusted-publishers` in the site's TOML (required unless --insecure).
    Runs in the foreground (this process becomes the SuperNode)."""
    setup_logging()
    from fedface.client.siteconfig import SiteConfig
    from fedface.common.io import atomic_write_text
    from fedface.common.signing import load_public_key, trusted_entities

    with user_errors():
        sc = SiteConfig.from_toml(config)
        if not sc.data.is_dir():
            raise DataNotFoundError(f"the site's data directory {sc.data} does not exist: fix `data` in {config}")
        sc.state_dir.mkdir(parents=True, exist_ok=True)
        args = [_tool("flower-supernode"), "--superlink", superlink, "--port", str(port),
                "--node-config", f"site-config={json.dumps(str(config.resolve()))}"]
        if sc.trusted_publishers:
            # Flower's own check, before the SuperNode installs or loads anything of an app
            entities = trusted_entities(load_public_key(p) for p in sc.trusted_publishers)
            entities_file = sc.state_dir / "trusted-entities.yaml"
            atomic_write_text(entities_file, f"# written by `fedface site join` from trusted-publishers in {config.resolve()}\n"
                              + json.dumps(entities, indent=2) + "\n")  # JSON is YAML
            args += ["--trusted-entities", str(entities_file)]
        elif not insecure:
            raise ConfigError(f"{config} trusts no publisher: add trusted-publishers = [\"publisher.pub\"] (the coordinator's public key "
                              "from `fedface keys publisher`) so that this site runs only apps it signed, or pass --insecure for a local demo")
        else:
            err_console.print("[yellow]no trusted-publishers: this site runs any app the SuperLink sends (a local demo only)[/]")
        if insecure:
            args.append("--insecure")
        else:
            if root_certificates is None or key is None:
                raise ConfigError("pass --root-certificates ca.pem and --key <name>.key, or --insecure for a local demo")
            for f in (root_certificates, key):
                if not f.is_file():
                    raise DataNotFoundError(f"{f} not found: the CA comes from the coordinator, the key from `fedface keys node`")
            args += ["--root-certificates", str(root_certificates), "--auth-supernode-private-key", str(key)]
    trust = f"apps signed by {len(sc.trusted_publishers)} trusted publisher key(s)" if sc.trusted_publishers else "any app"
    err_console.print(f"site {sc.name}: joining {superlink} ({'insecure' if insecure else 'TLS, node authentication'}; runs {trust})")
    os.execvpe(args[0], args, _env())


__all__ = ["server_app", "site_app"]
