"""`fedface server ...` and `fedface site`: a deployed federation on Flower's SuperLink and
SuperNodes, with TLS and node authentication unless ``--insecure`` (a local demo only).

These commands start Flower's own processes with fedface's settings. Nothing is home-made:
scaling out means adding SuperNodes. Every process gets an environment that switches off
Flower's telemetry, update checks and runtime dependency installation.
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

server_app = typer.Typer(
    help="The coordinator of a deployed federation: start the SuperLink, register sites, launch runs.",
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
) -> None:
    """Start a SuperLink: TLS with the federation's certificate and node authentication (only
    registered sites are admitted) unless --insecure. Runs in the foreground; stop it with Ctrl-C
    or by PID (this process becomes the SuperLink)."""
    setup_logging()
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
    os.execvpe(args[0], args, _env())


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
) -> None:
    """Launch a federated run on the SuperLink (`flwr run` of fedface's App) and wait for it."""
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
        with tempfile.TemporaryDirectory(prefix="fedface-app-") as tmp:
            app_dir = Path(tmp) / "app"
            app_dir.mkdir()
            (app_dir / "pyproject.toml").write_text(resources.files("fedface.simulations").joinpath("flwr_app", "pyproject.toml").read_text())
            overrides = {"scenario-toml": text, "run-dir": str(run_dir), "rounds": rounds or 0, "sites": sites or 0, "epsilon": epsilon or 0.0}
            over_path = Path(tmp) / "run-config.toml"
            over_path.write_text(tomli_w.dumps(overrides))
            done = subprocess.run([_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(over_path)],
                                  env=_env(home), capture_output=True, text=True)
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
    if output_format == "json":
        print_json({"run_id": summary.run_id, "status": summary.status, "rounds": summary.rounds_done, "run_dir": str(run_dir), **last})
    if summary.status != "completed":
        raise typer.Exit(1)


def site(
    config: Annotated[Path, typer.Option("--config", "-c", help="The site's TOML (name, data, state-dir, budget-epsilon).")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")] = "127.0.0.1:8000",
    root_certificates: Annotated[Optional[Path], typer.Option(help="The federation's CA (ca.pem).")] = None,
    key: Annotated[Optional[Path], typer.Option(help="The site's private key (<name>.key from `fedface keys node`).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS and no node authentication: a local demo only.")] = False,
    port: Annotated[int, typer.Option(help="Port of this SuperNode's local API (one per SuperNode on a host).")] = 9094,
) -> None:
    """Join a federation as a site: a SuperNode running fedface's ClientApp on this site's own
    faces, with its ledger and heads in its state directory. Runs in the foreground (this
    process becomes the SuperNode)."""
    setup_logging()
    from fedface.client.siteconfig import SiteConfig

    with user_errors():
        sc = SiteConfig.from_toml(config)
        if not sc.data.is_dir():
            raise DataNotFoundError(f"the site's data directory {sc.data} does not exist: fix `data` in {config}")
        sc.state_dir.mkdir(parents=True, exist_ok=True)
        args = [_tool("flower-supernode"), "--superlink", superlink, "--port", str(port),
                "--node-config", f"site-config={json.dumps(str(config.resolve()))}"]
        if insecure:
            args.append("--insecure")
        else:
            if root_certificates is None or key is None:
                raise ConfigError("pass --root-certificates ca.pem and --key <name>.key, or --insecure for a local demo")
            for f in (root_certificates, key):
                if not f.is_file():
                    raise DataNotFoundError(f"{f} not found: the CA comes from the coordinator, the key from `fedface keys node`")
            args += ["--root-certificates", str(root_certificates), "--auth-supernode-private-key", str(key)]
    err_console.print(f"site {sc.name}: joining {superlink} ({'insecure' if insecure else 'TLS, node authentication'})")
    os.execvpe(args[0], args, _env())


__all__ = ["server_app", "site"]
