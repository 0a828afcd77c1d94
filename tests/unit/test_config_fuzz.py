"""Malformed and extreme configs, generated (hypothesis): every config fedface reads either loads
or fails with one ConfigError line that names the source; nothing else escapes, and a config
that loads holds no NaN and no infinity outside the one key where infinity means something
(`privacy.epsilon = inf`: not private).

The generated configs start from the packaged scenarios and a valid site config, and change one
to three keys: to values of the wrong type, empty, negative, huge, NaN or infinite, to unknown
keys, or whole sections to scalars. They go through TOML text and the file readers, as a user's
file does. Derandomised: CI runs the same examples every time.
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedface.client.siteconfig import SiteConfig
from fedface.common.config import TrainConfig
from fedface.common.errors import ConfigError

SCENARIOS = sorted(p.name for p in resources.files("fedface.simulations").joinpath("scenarios").iterdir() if p.name.endswith(".toml"))

SITE = {
    "name": "hospital-a",
    "data": "faces",
    "state-dir": "state",
    "policy": {"budget-epsilon": 10.0, "delta": 1e-5, "epsilon-per-run": 8.0, "min-peers": 3},
}

# Values a user (or a careless script) can put in a TOML file.
EXTREME = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 0.0, -0.0, 1e-320, 1e308, -1e308]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "../../../etc/passwd", "ünïcödé", "a" * 10_000, "inf", "nan", "1e-5", "true"]),
    st.booleans(),
    st.lists(st.integers(-5, 5), max_size=5),
    st.lists(st.floats(allow_nan=True), max_size=4),
    st.builds(lambda: [[1, 2], [3]]),
    st.builds(lambda: {"nested": 1}),  # a fresh table each time (a later change may write into it)
)

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _scenario(name: str) -> dict[str, Any]:
    ref = resources.files("fedface.simulations").joinpath("scenarios", name)
    return tomllib.loads(ref.read_text())


@st.composite
def _mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with one to three keys changed, added or replaced by an extreme value."""
    raw: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for _ in range(draw(st.integers(1, 3))):
        sections = sorted(raw) + ["no-such-section"]
        section = draw(st.sampled_from(sections))
        current = raw.get(section)
        if isinstance(current, dict) and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(current) + ["no-such-key"]))
            current[key] = draw(EXTREME)
        else:
            raw[section] = draw(EXTREME)
    return raw


def _toml(tmp: Path, raw: dict[str, Any]) -> Path | None:
    """``raw`` written as a TOML file, or None when TOML cannot hold it (e.g. an integer past
    64 bits): a user cannot write that file either."""
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def _finite_except(raw: Any, allowed: set[str], where: str = "") -> list[str]:
    """The dotted keys of ``raw`` holding NaN, or infinity outside ``allowed``."""
    bad: list[str] = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            bad += _finite_except(v, allowed, f"{where}.{k}" if where else str(k))
    elif isinstance(raw, (list, tuple)):
        for v in raw:
            bad += _finite_except(v, allowed, where)
    elif isinstance(raw, float) and (math.isnan(raw) or (math.isinf(raw) and where not in allowed)):
        bad.append(where)
    return bad


def _assert_one_line(exc: ConfigError, source: Path) -> None:
    text = str(exc)
    assert "\n" not in text, text
    assert str(source) in text, text


def _load_or_one_line(tmp: Path, raw: dict[str, Any], read: Callable[[Path], Any]) -> Any:
    """``read`` of ``raw`` as a TOML file: the config it loads, or None when it failed with one
    ConfigError line naming the file (or when TOML cannot hold ``raw``)."""
    path = _toml(tmp, raw)
    if path is None:
        return None
    try:
        return read(path)
    except ConfigError as exc:
        _assert_one_line(exc, path)
        return None


@pytest.mark.parametrize("name", SCENARIOS)
@SETTINGS
@given(data=st.data())
def test_a_mutated_scenario_loads_or_fails_with_one_config_error_line(tmp_path_factory: pytest.TempPathFactory, name: str, data: st.DataObject) -> None:
    cfg = _load_or_one_line(tmp_path_factory.mktemp("cfg"), data.draw(_mutated(_scenario(name))), TrainConfig.from_toml)
    if cfg is None:
        return
    # it loaded: nothing NaN, nothing infinite but a non-private epsilon, and it round-trips
    assert _finite_except(cfg.model_dump(by_alias=True), {"privacy.epsilon"}) == []
    assert TrainConfig.from_mapping(cfg.to_toml_dict()) == cfg


@SETTINGS
@given(data=st.data())
def test_a_mutated_site_config_loads_or_fails_with_one_config_error_line(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    site = _load_or_one_line(tmp_path_factory.mktemp("site"), data.draw(_mutated(SITE)), SiteConfig.from_toml)
    if site is None:
        return
    assert _finite_except(site.model_dump(by_alias=True), set()) == []


def _float_keys() -> list[tuple[str, str]]:
    """Every (section, key) of TrainConfig whose value is or holds a float."""
    out = []
    for section, field in TrainConfig.model_fields.items():
        model = field.annotation
        for name, sub in getattr(model, "model_fields", {}).items():
            if "float" in str(sub.annotation):
                out.append((section.replace("_", "-"), name.replace("_", "-")))
    return out


@pytest.mark.parametrize(("section", "key"), _float_keys(), ids=lambda v: str(v))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_no_float_key_takes_nan_or_infinity_but_a_non_private_epsilon(tmp_path: Path, section: str, key: str, value: float) -> None:
    # Each key on its own, so that none is missed: a NaN learning rate or an infinite clipping
    # norm (no clipping: no privacy) must not reach training.
    raw = _scenario("baseline.toml")
    current = raw.setdefault(section, {}).get(key)
    raw[section][key] = [value] * len(current) if isinstance(current, list) else value
    if isinstance(current, list) is False and key in ("crop", "scale-range"):
        raw[section][key] = [value] * (4 if key == "crop" else 2)
    path = _toml(tmp_path, raw)
    assert path is not None

    if (section, key, value) == ("privacy", "epsilon", math.inf):
        assert not TrainConfig.from_toml(path).privacy.enabled
        return
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)
    _assert_one_line(info.value, path)


@pytest.mark.parametrize(
    "text",
    ["[data\nroot = 1", "data = 5", "= 1", "\x00", "[privacy]\nepsilon = nan", "[training]\nlr = inf", "[privacy]\nmax-grad-norm = inf"],
    ids=["unclosed-table", "a-section-as-a-number", "no-key", "a-nul-byte", "nan-epsilon", "infinite-lr", "infinite-clipping-norm"],
)
def test_hand_picked_bad_files_are_one_config_error_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(path)

    _assert_one_line(info.value, path)


@pytest.mark.parametrize("command", [["train"], ["simulate"]])
def test_the_cli_exits_3_with_one_line_and_writes_no_run_directory(tmp_path: Path, command: list[str]) -> None:
    from typer.testing import CliRunner

    from fedface.simulations.cli import app

    raw = _scenario("baseline.toml" if command == ["train"] else "federated.toml")
    raw.setdefault("privacy", {})["max-grad-norm"] = math.inf  # no clipping: no privacy
    path = _toml(tmp_path, raw)
    out = tmp_path / "run"

    result = CliRunner().invoke(app, [*command, "-c", str(path), "--out", str(out)])

    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ConfigError: ") and "privacy.max-grad-norm" in lines[0], lines
    assert not out.exists()
