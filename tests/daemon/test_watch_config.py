"""The [watch] section: defaults, validation, loading from TOML and the environment; configs/daemon.toml and the
example systemd unit agree with each other."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from atlaspatch_stream.config import PipelineConfig, WatchConfig, load_config
from atlaspatch_stream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_derived_paths() -> None:
    """Issue defaults (settle 30 s, rescan 60 s, auto mode, 3 attempts, drain 120 s, no metrics); the state folder
    folder defaults to a local one per output under $XDG_STATE_HOME; the key file stays with the output."""
    watch = PipelineConfig().watch
    assert (watch.settle_s, watch.rescan_s, watch.watch_mode, watch.max_attempts, watch.drain_timeout_s) == (
        30.0, 60.0, "auto", 3, 120.0)
    assert watch.metrics is None and watch.pseudonymize is False and watch.log_format == "text"
    state = watch.state_path(Path("/out"))
    assert state.parent == Path(os.environ["XDG_STATE_HOME"]) / "atlaspatch" and len(state.name) == 16
    assert watch.state_path(Path("/out/../out")) == state != watch.state_path(Path("/out2"))
    assert watch.key_path(Path("/out")) == Path("/out/.atlaspatch/pseudonym.key")
    assert WatchConfig(state_dir=Path("/var/lib/a")).key_path(Path("/out")) == Path("/var/lib/a/pseudonym.key")


def test_default_state_folder_without_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No (or a relative) $XDG_STATE_HOME: ~/.local/state, as the XDG base directory spec says."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (None, "relative/dir"):
        if value is None:
            monkeypatch.delenv("XDG_STATE_HOME")
        else:
            monkeypatch.setenv("XDG_STATE_HOME", value)
        assert WatchConfig().state_path(Path("/out")).parent == tmp_path / ".local" / "state" / "atlaspatch"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"settle_s": -1}, "--settle-s"),
        ({"rescan_s": 0}, "--rescan-s"),
        ({"watch_mode": "inotify"}, "--watch-mode"),
        ({"max_attempts": 0}, "--max-attempts"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"backoff_base_s": 100, "backoff_max_s": 10}, "backoff_max_s"),
        ({"drain_timeout_s": -1}, "--drain-timeout"),
        ({"log_format": "xml"}, "--log-format"),
        ({"metrics": "0.0.0.0:9464"}, "refused"),
        ({"ignore": ("",)}, "--ignore"),
        ({"settle_s": 100, "settle_max_wait_s": 50}, "settle_max_wait_s"),
    ],
)
def test_invalid_watch_settings(kwargs: dict, needle: str) -> None:
    """Each bad value is refused at construction with a message naming the flag or key."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        WatchConfig(**kwargs)


def test_watch_section_from_toml_and_environment(tmp_path: Path) -> None:
    """TOML lists become tuples and paths Paths; ATLASPATCH_WATCH__* wins over the file; unknown keys fail."""
    toml = tmp_path / "d.toml"
    toml.write_text('[watch]\nsettle_s = 5\nignore = ["*.ini"]\nstate_dir = "/var/lib/x"\nmetrics = "unix:/run/m.sock"\n')
    config = load_config(toml_path=toml, environ={"ATLASPATCH_WATCH__SETTLE_S": "7.5",
                                                  "ATLASPATCH_WATCH__WATCH_MODE": "poll"})
    assert config.watch.settle_s == 7.5 and config.watch.watch_mode == "poll"
    assert config.watch.ignore == ("*.ini",) and config.watch.state_dir == Path("/var/lib/x")
    assert config.watch.metrics == "unix:/run/m.sock"
    toml.write_text("[watch]\nsettle = 5\n")
    with pytest.raises(ConfigError, match="watch.settle"):
        load_config(toml_path=toml, environ={})


def test_daemon_toml_lists_every_watch_setting() -> None:
    """configs/daemon.toml loads, and names every [watch] field (the optional ones commented out)."""
    path = ROOT / "configs" / "daemon.toml"
    config = load_config(toml_path=path, environ={})
    assert config.watch.log_format == "json"
    text = path.read_text()
    for name in WatchConfig.__dataclass_fields__:
        assert re.search(rf"^#? ?{name} = ", text, re.MULTILINE), name


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (ROOT / "examples" / "atlaspatch-watch.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit_matches_the_daemon() -> None:
    """The example unit: Type=notify, a non-root user, its state in StateDirectory=, watchdog, mixed kill mode with a stop timeout longer than the
    drain deadline of daemon.toml, and the sandbox of the reference (no network, no capabilities, read-only system)."""
    unit = _unit()
    drain = load_config(toml_path=ROOT / "configs" / "daemon.toml", environ={}).watch.drain_timeout_s
    assert unit["Type"] == ["notify"] and unit["User"][0] not in ("root", "0")
    assert "atlaspatch watch" in unit["ExecStart"][0]
    # The state folder is systemd's StateDirectory (local, this unit's own), passed to the daemon as --state.
    assert unit["StateDirectory"] == ["atlaspatch"] and "--state ${STATE_DIRECTORY}" in unit["ExecStart"][0]
    assert int(unit["WatchdogSec"][0]) > 0 and unit["KillMode"] == ["mixed"]
    assert int(unit["TimeoutStopSec"][0]) >= drain + 30
    for key, value in [("UMask", "0027"), ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("CapabilityBoundingSet", ""), ("IPAddressDeny", "any"), ("RestrictAddressFamilies", "AF_UNIX"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes"), ("DevicePolicy", "closed")]:
        assert unit[key] == [value], key


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (with ExecStart pointed at an existing program)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    text = (ROOT / "examples" / "atlaspatch-watch.service").read_text()
    unit = tmp_path / "atlaspatch-watch.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.MULTILINE))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
