"""records.config parsing: what an operator sees for good and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from iocore.records.errors import ConfigError
from iocore.records.parser import RecordsConfig, load_records, parse_records_text
from iocore.records.spec import RECORDS, RecUpdate


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "records.config").write_text(text, encoding="utf-8")
    return tmp_path


def test_values_comments_and_blank_lines(tmp_path: Path) -> None:
    rec = load_records(
        write(
            tmp_path,
            "# a comment\n\n"
            "CONFIG proxy.config.http.server_ports STRING 9080 9443:ssl   \n"
            "   CONFIG proxy.config.exec_thread.limit INT 4\n"
            "LOCAL proxy.config.ssl.number.threads INT 2\n",
        )
    )
    assert rec["proxy.config.http.server_ports"] == "9080 9443:ssl"
    assert rec.get_int("proxy.config.exec_thread.limit") == 4
    assert rec.get_int("proxy.config.ssl.number.threads") == 2
    assert rec.line_of("proxy.config.exec_thread.limit") == 4
    assert rec.line_of("proxy.config.ssl.TLSv1_3") is None
    assert rec.get("proxy.config.ssl.TLSv1_3") == 1  # untouched records keep their defaults
    assert rec.warnings == ()


_MAX = "proxy.config.http.request_header_max_size"


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        (_MAX, "64K", 65536),
        (_MAX, "2M", 2 << 20),
        (_MAX, "1g", 1 << 30),
        (_MAX, "1T", 1 << 40),
        ("proxy.config.ssl.client.verify.server", "-1", -1),
        ("proxy.config.ssl.client.verify.depth", "+7", 7),
    ],
)
def test_int_suffixes_and_signs(name: str, text: str, value: int) -> None:
    parsed = parse_records_text(f"CONFIG {name} INT {text}\n", "r.config")
    assert parsed.values[name] == value


def test_counter_is_read_as_int() -> None:
    parsed = parse_records_text("CONFIG proxy.config.exec_thread.limit COUNTER 3\n", "r")
    assert parsed.values["proxy.config.exec_thread.limit"] == 3


def test_null_and_missing_string_mean_empty() -> None:
    parsed = parse_records_text(
        "CONFIG proxy.config.proxy_name STRING NULL\nCONFIG proxy.config.diags.debug.tags STRING\n", "r"
    )
    assert parsed.values["proxy.config.proxy_name"] == ""
    assert parsed.values["proxy.config.diags.debug.tags"] == ""


def test_unknown_record_is_a_warning_not_an_error(tmp_path: Path) -> None:
    rec = load_records(write(tmp_path, "\nCONFIG proxy.config.no.such.thing INT 5\n"))
    assert rec.warnings == (
        f"{tmp_path / 'records.config'}:2: unknown record proxy.config.no.such.thing "
        "(ignored; ATS has no such record either)",
    )


def test_ats_records_not_implemented_are_one_warning_per_subsystem() -> None:
    parsed = parse_records_text(
        "CONFIG proxy.config.cache.ram_cache.size INT -1\n"
        "CONFIG proxy.config.http.cache.http INT 1\n"
        "CONFIG proxy.config.http.parent_proxy.retry_time INT 300\n"
        "CONFIG proxy.config.exec_thread.limit INT 2\n",
        "records.config",
    )
    assert parsed.values == {"proxy.config.exec_thread.limit": 2}
    see = "see docs/records.md#ats"
    assert parsed.warnings == (
        f"records.config: ATS cache: ignored, not implemented: 2 records (lines 1, 2), {see}",
        f"records.config: ATS parent proxy: ignored, not implemented: 1 record (line 3), {see}",
    )


def test_duplicate_warns_and_last_wins() -> None:
    parsed = parse_records_text(
        "CONFIG proxy.config.exec_thread.limit INT 2\nCONFIG proxy.config.exec_thread.limit INT 3\n", "r"
    )
    assert parsed.values["proxy.config.exec_thread.limit"] == 3
    assert parsed.lines["proxy.config.exec_thread.limit"] == 2
    assert len(parsed.warnings) == 1
    assert parsed.warnings[0].startswith("r:2: proxy.config.exec_thread.limit is also set at line 1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("CONFIG proxy.config.ssl.TLSv1_2 INT 7", "r:3: proxy.config.ssl.TLSv1_2: expected 0 or 1, got 7"),
        ("CONFIG proxy.config.exec_thread.limit INT 0", "r:3: proxy.config.exec_thread.limit: expected an"),
        (
            "CONFIG proxy.config.exec_thread.limit STRING 4",
            "r:3: proxy.config.exec_thread.limit: declared STRING",
        ),
        (
            "CONFIG proxy.config.exec_thread.limit INT four",
            "r:3: proxy.config.exec_thread.limit: expected an",
        ),
        (
            "CONFIG proxy.config.exec_thread.limit INT 4 # four",
            "r:3: proxy.config.exec_thread.limit: expected",
        ),
        ("CONFIG proxy.config.exec_thread.limit INT", "r:3: proxy.config.exec_thread.limit: missing value"),
        ("CONFIG proxy.config.exec_thread.limit BOOL 1", "r:3: proxy.config.exec_thread.limit: unknown type"),
        ("SET proxy.config.exec_thread.limit INT 1", "r:3: expected 'CONFIG name TYPE value'"),
        ("proxy.config.exec_thread.limit=1", "r:3: expected 'CONFIG name TYPE value'"),
        (
            "CONFIG proxy.config.ssl.client.verify.server.policy STRING enforced",
            "r:3: proxy.config.ssl.client.verify.server.policy: expected one of DISABLED|PERMISSIVE|ENFORCED",
        ),
        (
            "CONFIG proxy.config.diags.debug.tags STRING ssl|(",
            "r:3: proxy.config.diags.debug.tags: not a valid",
        ),
        (
            "CONFIG proxy.config.tunnel.route STRING origin",
            "r:3: proxy.config.tunnel.route: expected host:port",
        ),
        (  # empty used to mean "stay root": now it must say so (#-1) or name a user
            "CONFIG proxy.config.admin.user_id STRING NULL",
            "r:3: proxy.config.admin.user_id: empty: name the user to run as (default nobody), or #-1",
        ),
        (
            "CONFIG proxy.config.admin.user_id STRING #nobody",
            "r:3: proxy.config.admin.user_id: expected a user name, #UID or #-1, got '#nobody'",
        ),
        (
            "CONFIG proxy.config.ssl.wire_trace_addr STRING client.example",
            "r:3: proxy.config.ssl.wire_trace_addr: expected an IP address",
        ),
        (
            "CONFIG proxy.config.ssl.wire_trace_percentage INT 101",
            "r:3: proxy.config.ssl.wire_trace_percentage: expected",
        ),
        (
            "CONFIG proxy.config.ssl.client_hello.max_size INT 131397",
            "r:3: proxy.config.ssl.client_hello.max_size: expected",
        ),
        ("CONFIG proxy.config.ssl.session_cache INT 3", "r:3: proxy.config.ssl.session_cache: expected"),
    ],
)
def test_errors_name_file_and_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_records_text(f"# header\n\n{line}\n", "r")
    assert str(info.value).startswith(message)
    assert info.value.line == 3


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"records\.config: cannot read: No such file"):
        load_records(tmp_path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "records.config").write_bytes(b"CONFIG proxy.config.proxy_name STRING \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_records(tmp_path)


def test_defaults_are_the_table_and_pass_their_own_checks(tmp_path: Path) -> None:
    rec = load_records(write(tmp_path, ""))
    for spec in RECORDS:
        assert rec[spec.name] == spec.default
        assert spec.check is None or spec.check(spec.default) is None, spec.name
    with pytest.raises(KeyError):
        rec.get("proxy.config.no.such.thing")


def test_resolve_path_against_config_dir(tmp_path: Path) -> None:
    rec = RecordsConfig.from_text(
        "CONFIG proxy.config.log.logfile_dir STRING /var/log/tsproxy\n", tmp_path / "records.config"
    )
    assert rec.resolve_path("proxy.config.local_state_dir") == tmp_path / "run"
    assert rec.resolve_path("proxy.config.log.logfile_dir") == Path("/var/log/tsproxy")
    assert rec.resolve_path("proxy.config.ssl.server.ticket_key.filename") is None
    with pytest.raises(TypeError):
        rec.resolve_path("proxy.config.exec_thread.limit")


def test_diff_and_restart_required(tmp_path: Path) -> None:
    old = RecordsConfig.from_values(tmp_path, {})
    new = RecordsConfig.from_values(
        tmp_path,
        {"proxy.config.exec_thread.limit": 2, "proxy.config.ssl.handshake_timeout_in": 5},
    )
    assert old.diff(new) == ["proxy.config.exec_thread.limit", "proxy.config.ssl.handshake_timeout_in"]
    assert old.restart_required(new) == ["proxy.config.exec_thread.limit"]
    assert old.diff(RecordsConfig.from_values(tmp_path, {})) == []
    assert all(spec.update is RecUpdate.RESTART for spec in RECORDS if spec.name in old.restart_required(new))


def test_from_values_checks_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected 0 or 1, got 2"):
        RecordsConfig.from_values(tmp_path, {"proxy.config.ssl.TLSv1_3": 2})
    with pytest.raises(ConfigError, match="expected INT"):
        RecordsConfig.from_values(tmp_path, {"proxy.config.ssl.TLSv1_3": "1"})
    with pytest.raises(ConfigError, match="unknown record"):
        RecordsConfig.from_values(tmp_path, {"proxy.config.bogus": 1})
