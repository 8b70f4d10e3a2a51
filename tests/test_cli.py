"""The tsproxy command line: config check, errors without tracebacks, metric commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ProxyProcess, run_tsproxy, subprocess_env, write_config_dir

from tsproxy import cli
from tsproxy.exitcodes import EX_CONFIG, EX_UNAVAILABLE


def test_default_config_dir_is_the_shipped_one(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parent.parent
    assert cli.resolve_config_dir(None) == repo / "etc" / "tsproxy"


def test_config_dir_from_environment(tmp_path: Path) -> None:
    config_dir = write_config_dir(tmp_path / "envdir")
    result = run_tsproxy("config", "check", env=subprocess_env(TSPROXY_CONFIG_DIR=str(config_dir)))
    assert result.returncode == 0, result.stderr
    assert str(config_dir) in result.stdout


def test_config_check_ok_prints_warnings_and_starts_nothing(tmp_path: Path) -> None:
    config_dir = write_config_dir(tmp_path / "etc", {"proxy.config.no.such.record": 1})
    result = run_tsproxy("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "unknown record proxy.config.no.such.record" in result.stderr
    assert not (config_dir / "run" / "tsproxy.pid").exists()
    assert not (config_dir / "run" / "tsproxy.sock").exists()


@pytest.mark.parametrize(
    ("record", "value", "needle"),
    [
        ("proxy.config.exec_thread.limit", "many", "proxy.config.exec_thread.limit"),
        ("proxy.config.http.server_ports", "8080:tr-full", "transparent proxy not supported"),
        ("proxy.config.http.server_ports", "8080 8080", "duplicate port"),
        ("proxy.config.http.server_ports", "8080:pp:ppv2", "unknown keyword 'ppv2'"),
        ("proxy.config.http.proxy_protocol_allowlist", "10.0.0.0/8,lb.example", "bad entry 'lb.example'"),
        ("proxy.config.http.proxy_protocol_allowlist", "10.0.0.9-10.0.0.1", "ends before it starts"),
    ],
)
def test_config_check_reports_file_and_line(tmp_path: Path, record: str, value: str, needle: str) -> None:
    config_dir = write_config_dir(tmp_path / "etc", {record: value})
    lines = (config_dir / "records.config").read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if record in t)
    result = run_tsproxy("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == EX_CONFIG
    assert result.stderr.startswith("tsproxy: ")
    assert f"{config_dir / 'records.config'}:{line}: " in result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_warns_of_an_allowlist_without_pp_ports(tmp_path: Path) -> None:
    records = {"proxy.config.http.proxy_protocol_allowlist": "10.0.0.1"}
    config_dir = write_config_dir(tmp_path / "etc", records)
    result = run_tsproxy("config", "check", "--config-dir", str(config_dir))
    assert result.returncode == 0, result.stderr
    assert "proxy.config.http.proxy_protocol_allowlist is set but no port has 'pp'" in result.stderr


def test_missing_config_dir_is_a_config_error(tmp_path: Path) -> None:
    result = run_tsproxy("config", "check", "--config-dir", str(tmp_path / "nowhere"))
    assert result.returncode == EX_CONFIG
    assert "records.config" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("stop",),
        ("reload",),
        ("restart",),
        ("top", "--iterations", "1"),
        ("metric", "get", "proxy.process.http.incoming_requests"),
    ],
)
def test_commands_say_clearly_when_nothing_runs(tmp_path: Path, args: tuple[str, ...]) -> None:
    config_dir = write_config_dir(tmp_path / "etc")
    result = run_tsproxy(*args, "--config-dir", str(config_dir))
    assert result.returncode == EX_UNAVAILABLE
    assert f"tsproxy: no tsproxy running for config dir {config_dir}" in result.stderr
    assert "no control socket at" in result.stderr
    assert "Traceback" not in result.stderr


def test_metric_get_match_zero(tsproxy: ProxyProcess) -> None:
    name = "proxy.process.net.connections_currently_open"
    result = tsproxy.ctl("metric", "get", name, "proxy.process.http.incoming_requests")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name} 0", "proxy.process.http.incoming_requests 0"]

    result = tsproxy.ctl("metric", "match", r"ssl_total_tlsv1[23]$")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "proxy.process.ssl.ssl_total_tlsv12 0",
        "proxy.process.ssl.ssl_total_tlsv13 0",
    ]

    result = tsproxy.ctl("metric", "zero", "proxy.process.http.incoming_requests")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["proxy.process.http.incoming_requests 0"]


def test_metric_unknown_name_and_bad_regex(tsproxy: ProxyProcess) -> None:
    result = tsproxy.ctl("metric", "get", "proxy.process.nope")
    assert result.returncode != 0
    assert "unknown metric proxy.process.nope" in result.stderr
    result = tsproxy.ctl("metric", "match", "(")
    assert result.returncode != 0
    assert "bad regex" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_json(tsproxy: ProxyProcess) -> None:
    import json

    result = tsproxy.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["master"]["pid"] == tsproxy.pid
    assert status["config_dir"] == str(tsproxy.config_dir)


def test_long_config_dir_paths_still_reach_the_control_socket(tsproxy_factory, tmp_path: Path) -> None:
    name = "d" * 60 + "/" + "e" * 60
    proxy = tsproxy_factory(name=name)
    assert len(str(proxy.sock_path)) > 108
    assert proxy.ctl("status").returncode == 0
