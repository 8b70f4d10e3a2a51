"""SSLConfigParams.from_records: defaults, path resolution, the legacy verify switch, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from iocore.net.ssl_config import SSLConfigParams, VerifyServerPolicy, VerifyServerProperties
from iocore.records.errors import ConfigError


def test_defaults(tmp_path: Path) -> None:
    p = SSLConfigParams.from_records({}, tmp_path)
    root = tmp_path.resolve()
    assert p.server_cert_path == root and p.server_private_key_path == root
    assert p.multicert_filename == root / "ssl_multicert.config"
    assert (p.tls_v1, p.tls_v1_1, p.tls_v1_2, p.tls_v1_3) == (False, False, True, True)
    assert p.honor_cipher_order and p.session_ticket_enabled and p.session_ticket_number == 2
    assert p.ticket_key_filename is None and p.ca_cert_filename is None and p.keylog_file is None
    assert p.certification_level == 0 and p.handshake_timeout_in == 30 and not p.allow_client_renegotiation
    assert p.tunnel_route == ""
    assert p.client_verify_policy is VerifyServerPolicy.ENFORCED
    assert p.client_verify_properties is VerifyServerProperties.ALL
    assert p.client_verify_depth == 7 and p.client_sni_policy == "host"
    assert "TLS_AES_128_GCM_SHA256" in p.server_tls13_cipher_suites


def test_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    p = SSLConfigParams.from_records(
        {
            "proxy.config.ssl.server.cert.path": "certs",
            "proxy.config.ssl.server.private_key.path": "/abs/keys",
            "proxy.config.ssl.server.multicert.filename": "conf/multi.config",
            "proxy.config.ssl.server.ticket_key.filename": "ticket.key",
            "proxy.config.ssl.CA.cert.path": "cas",
            "proxy.config.ssl.CA.cert.filename": "ca.pem",
            "proxy.config.ssl.client.cert.filename": "client.pem",
            "proxy.config.ssl.keylog_file": "keys.log",
        },
        tmp_path,
    )
    root = tmp_path.resolve()
    assert p.server_cert_path == root / "certs"
    assert p.server_private_key_path == Path("/abs/keys")
    assert p.multicert_filename == root / "conf" / "multi.config"
    assert p.ticket_key_filename == root / "certs" / "ticket.key"
    assert p.ca_cert_filename == root / "cas" / "ca.pem" and p.ca_cert_path == root / "cas"
    assert p.client_cert_filename == root / "client.pem" and p.client_private_key_filename is None
    assert p.keylog_file == root / "keys.log"


@pytest.mark.parametrize(
    ("legacy", "policy", "expected"),
    [
        (-1, "PERMISSIVE", VerifyServerPolicy.PERMISSIVE),
        (0, "ENFORCED", VerifyServerPolicy.DISABLED),
        (1, "disabled", VerifyServerPolicy.ENFORCED),
        (-1, "disabled", VerifyServerPolicy.DISABLED),
    ],
)
def test_legacy_verify_switch_only_when_set(
    tmp_path: Path, legacy: int, policy: str, expected: object
) -> None:
    rec = {
        "proxy.config.ssl.client.verify.server": legacy,
        "proxy.config.ssl.client.verify.server.policy": policy,
    }
    assert SSLConfigParams.from_records(rec, tmp_path).client_verify_policy is expected


def test_string_values_for_ints(tmp_path: Path) -> None:
    p = SSLConfigParams.from_records(
        {"proxy.config.ssl.TLSv1": "1", "proxy.config.ssl.server.session_ticket.number": "4"}, tmp_path
    )
    assert p.tls_v1 and p.session_ticket_number == 4


@pytest.mark.parametrize(
    ("rec", "message"),
    [
        ({"proxy.config.ssl.client.certification_level": 3}, "certification_level: expected 0, 1 or 2"),
        ({"proxy.config.ssl.TLSv1_2": 2}, "TLSv1_2: expected 0 or 1"),
        ({"proxy.config.ssl.TLSv1_3": "yes"}, "TLSv1_3: expected an INT"),
        ({"proxy.config.ssl.client.verify.server.policy": "SOMETIMES"}, "DISABLED|PERMISSIVE|ENFORCED"),
        ({"proxy.config.ssl.client.verify.server.properties": "X"}, "NONE|SIGNATURE|NAME|ALL"),
        ({"proxy.config.ssl.client.verify.server": 2}, "expected -1, 0 or 1"),
        ({"proxy.config.tunnel.route": "nohost"}, "expected host:port"),
        ({"proxy.config.ssl.server.session_ticket.number": -1}, "negative"),
        ({"proxy.config.ssl.server.cipher_suite": 5}, "expected a STRING"),
    ],
)
def test_bad_values(tmp_path: Path, rec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        SSLConfigParams.from_records(rec, tmp_path)
    assert message in str(err.value) and str(err.value).startswith("records.config: proxy.config.")


def test_tunnel_route(tmp_path: Path) -> None:
    assert SSLConfigParams.from_records(
        {"proxy.config.tunnel.route": "o.example:443"}, tmp_path
    ).tunnel_route == ("o.example:443")
