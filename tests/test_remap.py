"""Tests for tsproxy.remap: remap.config parsing (errors with file:line) and request lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from iocore.records.errors import ConfigError
from tsproxy.remap import RemapTable, load_remap, parse_remap

CONFIG = """\
# tsproxy remap.config
map http://www.example.com/static/ http://static-origin:8080/assets/
map http://www.example.com/api http://api.internal/v2
map http://www.example.com/ http://web.internal/
map https://www.example.com/ https://secure.internal/ @ssl_verify=permissive @sni=secure.example
map http://alt.example.com:8080/ http://alt-origin/
map_with_recv_port http://recv.example.com:8888/ http://recv-origin:81/

map http://Cont.Example.COM/ \\
    https://cont-origin:443/base @client_cert=/etc/c.pem
reverse_map http://web.internal/ http://www.example.com/
"""


@pytest.fixture
def table() -> RemapTable:
    return parse_remap(CONFIG, "remap.config")


def test_rules_parsed(table: RemapTable) -> None:
    assert [r.line for r in table.rules] == [2, 3, 4, 5, 6, 7, 9]
    assert table.warnings == ["remap.config:11: reverse_map is ignored (Location headers are not rewritten)"]
    rule = table.rules[3]
    assert dict(rule.options) == {"ssl_verify": "permissive", "sni": "secure.example"}
    assert str(rule).startswith("remap.config:5: map https://www.example.com/")


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        (
            "www.example.com",
            b"/static/a.js?v=1",
            ("static-origin", 8080, b"/assets/a.js?v=1", b"static-origin:8080"),
        ),
        ("www.example.com", b"/api", ("api.internal", 80, b"/v2", b"api.internal")),
        ("www.example.com", b"/api/users?id=3", ("api.internal", 80, b"/v2/users?id=3", b"api.internal")),
        ("www.example.com", b"/api?x=1", ("api.internal", 80, b"/v2?x=1", b"api.internal")),
        ("www.example.com", b"/apix", ("web.internal", 80, b"/apix", b"web.internal")),
        ("www.example.com", b"/static", ("web.internal", 80, b"/static", b"web.internal")),
        ("WWW.Example.Com", b"/", ("web.internal", 80, b"/", b"web.internal")),
        ("www.example.com.", b"/", ("web.internal", 80, b"/", b"web.internal")),
        ("www.example.com:80", b"/x?y", ("web.internal", 80, b"/x?y", b"web.internal")),
        ("alt.example.com:8080", b"/p", ("alt-origin", 80, b"/p", b"alt-origin")),
        ("cont.example.com", b"/x", ("cont-origin", 443, b"/base/x", b"cont-origin")),
    ],
)
def test_lookup(table: RemapTable, host: str, path: bytes, expected: tuple[str, int, bytes, bytes]) -> None:
    res = table.lookup("http", host, 80, path)
    assert res is not None
    assert (res.origin_host, res.origin_port, res.path, res.host_header) == expected


def test_lookup_takes_bytes_host(table: RemapTable) -> None:
    res = table.lookup("http", b"www.example.com", 80, b"/")
    assert res is not None and res.origin_host == "web.internal"


def test_https_scheme_selects_https_rules(table: RemapTable) -> None:
    res = table.lookup("https", "www.example.com", 443, b"/a")
    assert res is not None
    assert (res.origin_scheme, res.origin_host, res.origin_port) == ("https", "secure.internal", 443)
    assert res.options["sni"] == "secure.example"
    assert table.lookup("https", "alt.example.com:8080", 443, b"/") is None


@pytest.mark.parametrize(
    "host",
    [
        "www.example.com:8080",  # rule has no port: only the default port matches
        "alt.example.com",  # rule says :8080
        "unknown.example.com",
        "",
        "www.example.com:x",
    ],
)
def test_lookup_misses(table: RemapTable, host: str) -> None:
    assert table.lookup("http", host, 8080, b"/") is None


def test_map_with_recv_port_uses_listening_port(table: RemapTable) -> None:
    res = table.lookup("http", "recv.example.com", 8888, b"/q")
    assert res is not None and res.host_header == b"recv-origin:81" and res.path == b"/q"
    assert table.lookup("http", "recv.example.com:8888", 80, b"/q") is None


def test_first_match_in_file_order() -> None:
    t = parse_remap(
        "map http://a.com/ http://first/\nmap http://a.com/x http://second/\n",
        "r",
    )
    res = t.lookup("http", "a.com", 80, b"/x/y")
    assert res is not None and res.origin_host == "first"


def test_ipv6_hosts() -> None:
    t = parse_remap("map http://[::1]:8080/ http://[2001:db8::1]:81/\n", "r")
    res = t.lookup("http", "[::1]:8080", 8080, b"/")
    assert res is not None and res.host_header == b"[2001:db8::1]:81"
    assert t.lookup("http", "[::1]", 80, b"/") is None


def test_origin_key_per_rule_includes_tls_options() -> None:
    # The origin pool's key is computed once per rule; rules to the same origin share it only
    # when their TLS options match (option order in the file does not matter).
    table = parse_remap(
        "map http://a/ http://o:81/\n"
        "map http://b/ http://o:81/x/\n"
        "map http://c/ https://o/ @sni=n @ssl_verify=disabled\n"
        "map http://d/ https://o/ @ssl_verify=disabled @sni=n\n"
        "map http://e/ https://o/ @sni=m\n",
        "remap.config",
    )
    a, b, c, d, e = (r.origin_key for r in table.rules)
    assert a == b == ("http", "o", 81, ())
    assert c == d == ("https", "o", 443, (("sni", "n"), ("ssl_verify", "disabled")))
    assert e == ("https", "o", 443, (("sni", "m"),))
    hit = table.lookup("http", "d", 8080, b"/p")
    assert hit is not None and hit.rule.origin_key == d


def test_load_remap(tmp_path: Path) -> None:
    f = tmp_path / "remap.config"
    f.write_bytes(b"map http://a/ http://b/\n")
    assert len(load_remap(f).rules) == 1
    with pytest.raises(ConfigError) as info:
        load_remap(tmp_path / "missing.config")
    assert str(info.value).startswith(str(tmp_path / "missing.config") + ": cannot read")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("map http://a/ http://b/ @plugin=x.so", 1, "unknown option @plugin"),
        ("\n\nmap http://a/ http://b/ @ssl_verify=sometimes", 3, "@ssl_verify must be one of"),
        ("map http://a/ https://b/ @sni", 1, "option @sni needs a value"),
        ("map http://a/ https://b/ @sni=x @sni=y", 1, "option @sni given twice"),
        ("map http://a/ http://b/ @sni=x", 1, "need an https:// origin"),
        ("map http://a/ http://b/ extra", 1, "unexpected 'extra'"),
        ("# c\nmap http://a:99999/ http://b/", 2, "bad port '99999'"),
        ("map http://a:0/ http://b/", 1, "bad port '0'"),
        ("map http://a/ http://b:x/", 1, "bad port 'x'"),
        ("map ftp://a/ http://b/", 1, "scheme must be http or https"),
        ("map http:/a/ http://b/", 1, "is not scheme://host"),
        ("map http:/// http://b/", 1, "has no host"),
        ("map http://a_b!/ http://b/", 1, "bad host name"),
        ("map http://a/?q=1 http://b/", 1, "query strings and fragments"),
        ("map http://a/", 1, "needs a FROM and a TO"),
        ("map_with_referer http://a/ http://b/ http://c/", 1, "map_with_referer is not supported"),
        ("redirect http://a/ http://b/", 1, "redirect is not supported"),
        ("regex_map http://a/ http://b/", 1, "regex_map is not supported"),
        ("mapp http://a/ http://b/", 1, "unknown directive 'mapp'"),
        ("map http://a/ \\\n  http://b/\nbogus", 3, "unknown directive"),
    ],
)
def test_config_errors(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_remap(text, "etc/remap.config")
    assert info.value.line == line
    assert str(info.value).startswith(f"etc/remap.config:{line}: ")
    assert message in str(info.value)
