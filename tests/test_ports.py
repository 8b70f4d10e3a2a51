"""proxy.config.http.server_ports parsing (ATS HttpProxyPort syntax)."""

from __future__ import annotations

import pytest

from iocore.net.ports import PortDescriptor, parse_server_ports
from iocore.records.errors import ConfigError


def test_plain_and_ssl_ports_separated_by_spaces() -> None:
    assert parse_server_ports("8080 8443:ssl") == [
        PortDescriptor(port=8080),
        PortDescriptor(port=8443, ssl=True),
    ]


def test_commas_and_mixed_whitespace_separate_descriptors() -> None:
    ports = parse_server_ports(" 80,\t443:ssl ,\n 8080 ")
    assert [p.port for p in ports] == [80, 443, 8080]


def test_keywords_in_any_order() -> None:
    (p,) = parse_server_ports("ssl:tr-pass:proto=http/1.1;h2:4443:ip-in=127.0.0.1")
    assert p == PortDescriptor(
        port=4443, ssl=True, tr_pass=True, protocols=("http/1.1", "h2"), ip_in="127.0.0.1"
    )
    assert p.bind_address == "127.0.0.1"


def test_default_binds_all_addresses_like_ats() -> None:
    (v4, v6) = parse_server_ports("8080 8080:ipv6")
    assert v4.bind_address == "0.0.0.0" and not v4.ipv6
    assert v6.bind_address == "::" and v6.ipv6


@pytest.mark.parametrize("text", ["8443:ssl:ip-in=[::1]", "8443:ssl:ip-in=::1", "8443:ip-in=::1:ssl"])
def test_ipv6_bind_address_with_and_without_brackets(text: str) -> None:
    (p,) = parse_server_ports(text)
    assert p.ip_in == "::1" and p.ipv6 and p.ssl


def test_blind_port() -> None:
    (p,) = parse_server_ports("9000:blind")
    assert p.blind and not p.ssl


def test_empty_value_means_no_ports() -> None:
    assert parse_server_ports("  ") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("8080:bogus", "unknown keyword 'bogus'"),
        ("ssl", "no port number"),
        ("0", "out of range"),
        ("65536", "out of range"),
        ("80:81", "more than one port"),
        ("8080:tr-full", "transparent proxy not supported"),
        ("8080:tr-in", "transparent proxy not supported"),
        ("8080:tr-out", "transparent proxy not supported"),
        ("8080:ip-in=999.1.1.1", "bad address"),
        ("8080:ipv4:ipv6", "mixes IPv4 and IPv6"),
        ("8080:ipv6:ip-in=127.0.0.1", "mixes IPv4 and IPv6"),
        ("8080:proto=", "bad protocol list"),
        ("8080:ssl:blind", "cannot be both"),
        ("8080::ssl", "empty keyword"),
        ("8080 8080:ssl", "duplicate port"),
        ("8080 8080:ip-in=127.0.0.1", "duplicate port"),
    ],
)
def test_junk_is_a_config_error_with_file_and_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_ports(text, path="/etc/records.config", line=7)
    message = str(info.value)
    assert message.startswith("/etc/records.config:7: proxy.config.http.server_ports: ")
    assert needle in message


def test_same_port_on_distinct_addresses_or_families_is_fine() -> None:
    ports = parse_server_ports("8080:ip-in=127.0.0.1 8080:ip-in=127.0.0.2 8080:ipv6")
    assert len(ports) == 3


def test_describe_round_trips() -> None:
    text = "8443:ssl:tr-pass:proto=http/1.1:ip-in=127.0.0.1 9000:blind 8080:ipv6:ip-in=[::1]"
    ports = parse_server_ports(text)
    assert parse_server_ports(" ".join(p.describe() for p in ports)) == ports


def test_pp_keyword_on_plain_and_ssl_ports() -> None:
    plain, tls = parse_server_ports("8080:pp 8443:pp:ssl")
    assert plain == PortDescriptor(port=8080, proxy_protocol=True)
    assert tls == PortDescriptor(port=8443, ssl=True, proxy_protocol=True)
    assert tls.describe() == "8443:pp:ssl"
    assert parse_server_ports(tls.describe()) == [tls]
    assert not parse_server_ports("8080")[0].proxy_protocol
