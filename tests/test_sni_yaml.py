"""Issue 18 item 1, sni.yaml (ATS 9.2 format): the parser's FILE:LINE errors and warnings and the
first-match lookup (sans-IO), then every supported key against the real ``tsproxy start`` with
real clients (Python ``ssl``, ``openssl s_client``, ``curl``): verify_client and
verify_client_ca_certs, valid_tls_versions_in, ip_allow, tunnel_route and forward_route,
host_sni_policy, the origin-side keys, reload (atomic with ssl_multicert.config, a bad file keeps
the old pair), ``tsproxy config check`` and what plugins see.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_tls_termination
import trustme
from conftest import ProxyProcess, run_tsproxy, write_config_dir
from origin import TLSBackend, pattern
from test_origin_tls import tls_origin
from test_tls_termination import (
    Certs,
    TLSProxy,
    client_context,
    failure_reason,
    http_get,
    peer_dns_names,
    s_client,
    tls_connect,
)

from iocore.net.ssl_sni_config import parse_sni_yaml
from iocore.records.errors import ConfigError

Factory = Callable[..., ProxyProcess]
# The TLS termination tests' module fixtures: the trustme CA and certificates, a plain origin.
certs = test_tls_termination.certs
origin = test_tls_termination.origin
PLUGINS = Path(__file__).resolve().parent / "plugins"
MULTICERT = "ssl_cert_name=certs/wild.pem\ndest_ip=* ssl_cert_name=certs/default.pem\n"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# --------------------------------------------------------------------------------------------
# the parser and the lookup (sans-IO)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("sni:\n- fqdn: a.test\n  verify_client: SOMETIMES\n", 3, "verify_client: expected NONE | MODERATE"),
        ("sni:\n- fqdn: a.test\n- fqdn: b.*.test\n", 3, "only a whole leftmost label"),
        ("sni:\n- fqdn: 'f*.test'\n", 2, "only a whole leftmost label"),
        ("sni:\n- verify_client: NONE\n", 2, "item without fqdn"),
        ("sni:\n- fqdn: a.test\n  valid_tls_versions_in: [TLSv1_2, SSLv3]\n", 3, "got 'SSLv3'"),
        ("sni:\n- fqdn: a.test\n  ip_allow: 10.0.0.0/8, 10.1.2.300\n", 3, "bad address or range"),
        ("sni:\n- fqdn: a.test\n  ip_allow: 10.0.0.9-10.0.0.1\n", 3, "bad address or range"),
        ("sni:\n- fqdn: a.test\n  tunnel_route: backend\n", 3, "expected host:port"),
        ("sni:\n- fqdn: a.test\n  tunnel_route: b:1\n  forward_route: c:2\n", 4, "exclude each other"),
        ("sni:\n- fqdn: a.test\n  tunnel_route: $1.b:1\n", 2, "needs a wildcard fqdn"),
        ("sni:\n- fqdn: a.test\n  host_sni_policy: 7\n", 3, "host_sni_policy: expected"),
        ("sni:\n- fqdn: a.test\n  verify_server_policy: STRICT\n", 3, "expected DISABLED | PERMISSIVE"),
        ("sni:\n- fqdn: a.test\n  client_key: k.pem\n", 3, "client_key needs client_cert"),
        ("sni:\n- fqdn: a.test\n  partial_blind_route: b:1\n", 3, "not supported"),
        ("sni:\n- fqdn: a.test\n  fqdn: b.test\n", 3, "fqdn given twice"),
        ("sni:\n- fqdn: a.test\n  http2: maybe\n", 3, "http2: expected on | off"),
        ("sni:\n  fqdn: a.test\n", 2, "expected a list of items"),
        ("sni:\n- fqdn: [a.test\n", 3, "not valid YAML"),
        ("items: []\n", 1, "expected a top-level 'sni' node"),
    ],
)
def test_bad_items_name_their_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sni_yaml(text, "/etc/ts/sni.yaml")
    assert info.value.path == "/etc/ts/sni.yaml"
    assert info.value.line == line, str(info.value)
    assert message in info.value.message, str(info.value)


def test_unknown_and_ignored_keys_warn_with_their_line() -> None:
    result = parse_sni_yaml(
        "sni:\n"
        "- fqdn: a.test\n"
        "  verify_clinet: STRICT\n"  # a typo: warned, not silently taken
        "  tunnel_prewarm: true\n"
        "  http2: on\n"
        "- fqdn: A.TEST\n",
        "sni.yaml",
    )
    assert [item.fqdn for item in result.items] == ["a.test", "a.test"]
    assert result.warnings == (
        "sni.yaml:3: unknown key 'verify_clinet' ignored",
        "sni.yaml:4: tunnel_prewarm has no effect in tsproxy; ignored",
        "sni.yaml:6: fqdn 'a.test' never matches: the item on line 2 matches it first (first match wins)",
    )


def test_first_match_wins_one_label_wildcards_case_insensitive() -> None:
    from iocore.net.ssl_sni_config import SNIConfigParams, SNIPolicy

    parsed = parse_sni_yaml(
        "sni:\n"
        "- fqdn: '*.example.com'\n"  # 0: listed first, so it wins over the exact name below
        "  verify_client: NONE\n"
        "- fqdn: www.example.com\n"  # 1: never reached
        "- fqdn: Exact.Test\n"  # 2
        "- fqdn: '*'\n"  # 3: everything not matched above
        "- fqdn: late.test\n",  # 4: shadowed by '*'
        "sni.yaml",
    )
    items = parsed.items
    assert parsed.warnings == (
        "sni.yaml:4: fqdn 'www.example.com' never matches: the item on line 2 matches it first "
        "(first match wins)",
        "sni.yaml:7: fqdn 'late.test' never matches: the item on line 6 matches it first (first match wins)",
    )
    table = SNIConfigParams(items=tuple(SNIPolicy(i, item, None) for i, item in enumerate(items)))

    def line(name: str) -> int | None:
        policy = table.get(name)
        return policy.item.line if policy is not None else None

    assert line("www.example.com") == 2
    assert line("WWW.Example.COM.") == 2
    assert line("exact.test") == 5
    assert line("a.b.example.com") == 6  # '*.example.com' covers one label only: '*' catches it
    assert line("example.com") == 6
    assert line("late.test") == 6


def test_ip_allow_ranges_and_route_substitution() -> None:
    from iocore.net.ssl_sni_config import SNIPolicy

    (item, wild) = parse_sni_yaml(
        "sni:\n"
        "- fqdn: a.test\n"
        "  ip_allow: [10.0.0.0/8, '192.168.10.1-192.168.10.4', '2001:db8::/32']\n"
        "- fqdn: '*.tun.test'\n"
        "  tunnel_route: '$1.internal:{inbound_local_port}'\n",
        "sni.yaml",
    ).items
    policy = SNIPolicy(0, item, None)
    assert policy.allows("10.200.0.1") and policy.allows("192.168.10.4") and policy.allows("2001:db8::1")
    assert policy.allows("::ffff:10.1.1.1")  # an IPv4 client on a dual-stack socket
    assert not policy.allows("192.168.10.5") and not policy.allows("127.0.0.1")
    tunnel = SNIPolicy(1, wild, None)
    assert tunnel.route_for("Shop.tun.test", 4443) == "shop.internal:4443"
    # the client chose the label: anything but a host name label never reaches the resolver
    for label in ("a_b", "-a", "x" * 64, "%41", "a b"):
        assert tunnel.route_for(f"{label}.tun.test", 4443) is None, label


def test_ip_allow_from_a_file_and_version_bounds(tmp_path: Path) -> None:
    (tmp_path / "ips").mkdir()
    (tmp_path / "ips" / "office.txt").write_text("# the office\n10.1.0.0/16\n10.2.0.1, 10.2.0.2\n")
    (item,) = parse_sni_yaml(
        'sni:\n- fqdn: a.test\n  ip_allow: "@ips/office.txt"\n  valid_tls_version_min_in: TLSv1_2\n',
        "sni.yaml",
        tmp_path,
    ).items
    assert [(r.first & 0xFF, r.last & 0xFF) for r in item.ip_allow or ()] == [(0, 255), (1, 1), (2, 2)]
    assert item.tls_versions == ("TLSv1_2", "TLSv1_3")
    with pytest.raises(ConfigError, match=r"sni.yaml:3: ip_allow: cannot read .*missing.txt"):
        parse_sni_yaml("sni:\n- fqdn: a.test\n  ip_allow: '@missing.txt'\n", "sni.yaml", tmp_path)


# --------------------------------------------------------------------------------------------
# the proxy
# --------------------------------------------------------------------------------------------


def start_sni(
    factory: Factory,
    certs: Certs,
    sni_yaml: str,
    *,
    origin: int,
    hosts: tuple[str, ...] = (),
    records: dict[str, Any] | None = None,
    files: dict[str, str | bytes] | None = None,
) -> TLSProxy:
    """tsproxy with one TLS port, the test certificates (``*.wild.test`` and a default), the
    given sni.yaml, and remap rules sending ``https://HOST/`` for each of ``hosts`` to ``origin``."""
    all_files: dict[str, str | bytes] = dict(certs.files)
    all_files["ssl_multicert.config"] = MULTICERT
    all_files["sni.yaml"] = sni_yaml
    all_files["remap.config"] = "".join(f"map https://{h}/ http://127.0.0.1:{origin}/\n" for h in hosts)
    all_files.update(files or {})
    recs: dict[str, Any] = {
        "proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1",
        "proxy.config.ssl.server.cert.path": ".",
        "proxy.config.ssl.server.private_key.path": ".",
    }
    recs.update(records or {})
    proxy = factory(records=recs, files=all_files)
    return TLSProxy(proxy, [proxy.port(0)], proxy.config_dir)


def served(certs: Certs, port: int, sni: str, version: str | None = None, **kw: Any) -> bytes:
    with tls_connect(client_context(certs, version, **kw), port, sni) as s:
        return http_get(s, sni)


def ok(response: bytes) -> bool:
    return response.startswith(b"HTTP/1.1 200") and response.endswith(b"origin saw /")


# --------------------------------------------------------------------------------------------
# verify_client, verify_client_ca_certs
# --------------------------------------------------------------------------------------------

VERIFY_CLIENT_YAML = """\
sni:
- fqdn: strict.wild.test
  verify_client: STRICT
- fqdn: moderate.wild.test
  verify_client: MODERATE
- fqdn: own-ca.wild.test
  verify_client: STRICT
  verify_client_ca_certs: {rogue_ca}
"""


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_verify_client_per_name(tsproxy_factory: Factory, certs: Certs, origin: int, version: str) -> None:
    names = ("open.wild.test", "strict.wild.test", "moderate.wild.test", "own-ca.wild.test")
    tp = start_sni(
        tsproxy_factory,
        certs,
        VERIFY_CLIENT_YAML.format(rogue_ca=certs.rogue_ca_file),
        origin=origin,
        hosts=names,
        records={"proxy.config.ssl.CA.cert.filename": "certs/ca.pem"},  # certification_level stays 0
    )
    port = tp.ports[0]
    missing = "SSLV3_ALERT_HANDSHAKE_FAILURE" if version == "1.2" else "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    # a name without an item asks for nothing
    assert ok(served(certs, port, "open.wild.test", version))
    # STRICT: no certificate fails the handshake; the CA's client certificate is served
    assert failure_reason(client_context(certs, version), port, "strict.wild.test") == missing
    assert ok(served(certs, port, "strict.wild.test", version, cert=certs.client))
    # MODERATE: asks, accepts none, refuses one that does not verify
    assert ok(served(certs, port, "moderate.wild.test", version))
    rogue = client_context(certs, version, cert=certs.rogue_client)
    assert failure_reason(rogue, port, "moderate.wild.test") == "TLSV1_ALERT_UNKNOWN_CA"
    # verify_client_ca_certs replaces the CA for that name only
    assert ok(served(certs, port, "own-ca.wild.test", version, cert=certs.rogue_client))
    good = client_context(certs, version, cert=certs.client)
    assert failure_reason(good, port, "own-ca.wild.test") == "TLSV1_ALERT_UNKNOWN_CA"
    assert tp.wait_metric("user_agent_bad_cert", 1) == 1
    assert tp.wait_metric("user_agent_cert_verify_failed", 2) == 2


def test_verify_client_none_relaxes_the_records_for_one_name(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n- fqdn: public.wild.test\n  verify_client: NONE\n",
        origin=origin,
        hosts=("public.wild.test", "private.wild.test"),
        records={
            "proxy.config.ssl.client.certification_level": 2,
            "proxy.config.ssl.CA.cert.filename": "certs/ca.pem",
        },
    )
    port = tp.ports[0]
    assert ok(served(certs, port, "public.wild.test"))
    reason = failure_reason(client_context(certs), port, "private.wild.test")
    assert reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert ok(served(certs, port, "private.wild.test", cert=certs.client))


@needs_openssl
def test_verify_client_strict_with_openssl_s_client(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path
) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n- fqdn: '*.wild.test'\n  verify_client: STRICT\n",
        origin=origin,
        hosts=("api.wild.test",),
        records={"proxy.config.ssl.CA.cert.filename": "certs/ca.pem"},
    )
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    certs.client.cert_chain_pems[0].write_to_path(str(cert))
    certs.client.private_key_pem.write_to_path(str(key))
    request = b"GET / HTTP/1.1\r\nHost: api.wild.test\r\nConnection: close\r\n\r\n"
    common = ("-servername", "api.wild.test", "-CAfile", str(certs.ca_file), "-ign_eof")
    with_cert = s_client(tp.ports[0], *common, "-cert", str(cert), "-key", str(key), stdin=request)
    assert "HTTP/1.1 200" in with_cert.stdout, with_cert.stdout + with_cert.stderr
    without = s_client(tp.ports[0], *common, stdin=request)
    assert "HTTP/1.1 200" not in without.stdout
    assert "certificate required" in without.stderr or "handshake failure" in without.stderr, without.stderr
    # a name the wildcard does not cover (the default certificate) asks for nothing
    other = s_client(tp.ports[0], "-servername", "other.test", "-ign_eof", stdin=request)
    assert "Acceptable client certificate CA names" not in other.stdout
    assert "Acceptable client certificate CA names" in with_cert.stdout


def resumed(ctx: ssl.SSLContext, port: int, sni: str, session: ssl.SSLSession) -> bool | str:
    """Offer ``session`` under ``sni``: whether it was resumed, or why the exchange failed."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw, server_hostname=sni, session=session) as s:
            assert ok(http_get(s, sni))
            return s.session_reused
    except ssl.SSLError as exc:
        return str(exc.reason)
    finally:
        raw.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resuming_a_session_of_another_name_does_not_skip_verify_client(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str
) -> None:
    """A session from a name that asked for no certificate, offered under a STRICT name: no
    resumption, a full handshake that asks for the certificate."""
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n- fqdn: strict.wild.test\n  verify_client: STRICT\n",
        origin=origin,
        hosts=("open.wild.test", "strict.wild.test"),
        records={"proxy.config.ssl.CA.cert.filename": "certs/ca.pem"},
    )
    port = tp.ports[0]
    ctx = client_context(certs, version)
    with tls_connect(ctx, port, "open.wild.test") as s:
        assert ok(http_get(s, "open.wild.test"))  # TLS 1.3: the ticket comes after the handshake
        session = s.session
    assert session is not None
    assert resumed(ctx, port, "open.wild.test", session) is True  # good for its own name
    missing = "SSLV3_ALERT_HANDSHAKE_FAILURE" if version == "1.2" else "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert resumed(ctx, port, "strict.wild.test", session) == missing
    # a session of the STRICT name itself (certificate checked) resumes there as usual
    with_cert = client_context(certs, version, cert=certs.client)
    with tls_connect(with_cert, port, "strict.wild.test") as s:
        assert ok(http_get(s, "strict.wild.test"))
        strict_session = s.session
    assert strict_session is not None
    assert resumed(with_cert, port, "strict.wild.test", strict_session) is True


# --------------------------------------------------------------------------------------------
# valid_tls_versions_in
# --------------------------------------------------------------------------------------------


@needs_openssl
def test_valid_tls_versions_in_per_name(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n"
        "- fqdn: legacy.wild.test\n  valid_tls_versions_in: [TLSv1_2]\n"
        "- fqdn: modern.wild.test\n  valid_tls_versions_in: [TLSv1_3]\n",
        origin=origin,
        hosts=("legacy.wild.test", "modern.wild.test", "open.wild.test"),
    )
    port = tp.ports[0]
    # an unconstrained client gets the highest version each name allows
    expected = {"legacy.wild.test": "TLSv1.2", "modern.wild.test": "TLSv1.3", "open.wild.test": "TLSv1.3"}
    for sni, version in expected.items():
        with tls_connect(client_context(certs), port, sni) as s:
            assert s.version() == version
            assert ok(http_get(s, sni))
    reason = failure_reason(client_context(certs, "1.3"), port, "legacy.wild.test")
    assert reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert ok(served(certs, port, "legacy.wild.test", "1.2"))
    refused = s_client(port, "-tls1_2", "-servername", "modern.wild.test")
    assert refused.returncode != 0 and "protocol version" in refused.stderr, refused.stderr
    accepted = s_client(port, "-tls1_3", "-servername", "modern.wild.test")
    assert "Protocol: TLSv1.3" in accepted.stdout or "TLSv1.3" in accepted.stdout, accepted.stdout
    assert tp.wait_metric("user_agent_wrong_version", 2) == 2


def negotiated_group(certs: Certs, port: int, sni: str, offer: bytes) -> str | None:
    """Handshake with a pyOpenSSL client offering the groups ``offer``; the group agreed on."""
    from OpenSSL import SSL
    from OpenSSL._util import lib

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(certs.ca_file))
    assert lib.SSL_CTX_set1_curves_list(ctx._context, offer) == 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.setblocking(True)  # pyOpenSSL wants a blocking socket; the kernel bounds the wait
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        conn.do_handshake()
        group = conn.get_group_name()
        conn.shutdown()
    return group


def test_ciphers_and_groups_per_name(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n"
        "- fqdn: aes256.wild.test\n"
        "  server_cipher_suite: ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA384\n"
        "  server_TLSv1_3_cipher_suites: TLS_AES_256_GCM_SHA384\n"
        "  server_groups_list: P-384\n",
        origin=origin,
        hosts=("aes256.wild.test", "open.wild.test"),
    )
    port = tp.ports[0]
    for version, cipher in (("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"), ("1.3", "TLS_AES_256_GCM_SHA384")):
        with tls_connect(client_context(certs, version), port, "aes256.wild.test") as s:
            assert s.cipher()[0] == cipher
            assert ok(http_get(s, "aes256.wild.test"))
        with tls_connect(client_context(certs, version), port, "open.wild.test") as s:
            assert "AES128" in s.cipher()[0] or "AES_128" in s.cipher()[0]  # the records' first choice
    assert negotiated_group(certs, port, "aes256.wild.test", b"X25519:P-384") == "secp384r1"
    assert negotiated_group(certs, port, "open.wild.test", b"X25519:P-384") == "x25519"


# --------------------------------------------------------------------------------------------
# ip_allow
# --------------------------------------------------------------------------------------------


def connect_from(ctx: ssl.SSLContext, port: int, sni: str, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def test_ip_allow_refuses_other_clients_at_the_handshake(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n"
        "- fqdn: lan.wild.test\n  ip_allow: 10.0.0.0/8,192.168.0.0/16\n"
        "- fqdn: range.wild.test\n  ip_allow: 127.0.0.2-127.0.0.9\n",
        origin=origin,
        hosts=("lan.wild.test", "range.wild.test", "open.wild.test"),
        records={"proxy.config.diags.debug.enabled": 1, "proxy.config.diags.debug.tags": "ssl_sni"},
    )
    port = tp.ports[0]
    ctx = client_context(certs)
    assert failure_reason(ctx, port, "lan.wild.test") == "TLSV1_ALERT_ACCESS_DENIED"
    assert failure_reason(ctx, port, "range.wild.test") == "TLSV1_ALERT_ACCESS_DENIED"  # from 127.0.0.1
    with connect_from(ctx, port, "range.wild.test", "127.0.0.5") as s:
        assert ok(http_get(s, "range.wild.test"))
    assert ok(served(certs, port, "open.wild.test"))
    assert tp.wait_metric("ssl_sni_ip_allow_denied", 2) == 2
    log = tp.proxy.output()
    assert "<ssl_sni> sni=lan.wild.test matched sni.yaml:2 (fqdn lan.wild.test)" in log, log[-2000:]
    assert "<ssl_sni> sni.yaml:2: 127.0.0.1 is not allowed - denying connection" in log


# --------------------------------------------------------------------------------------------
# tunnel_route, forward_route
# --------------------------------------------------------------------------------------------


class PlainEcho:
    """A plain TCP server answering one line with ``plain saw LINE``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.sendall(b"plain saw " + conn.recv(1024))
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def plain_echo() -> Iterator[PlainEcho]:
    echo = PlainEcho()
    yield echo
    echo.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tunnel_route_and_forward_route(
    tsproxy_factory: Factory, certs: Certs, origin: int, plain_echo: PlainEcho, version: str
) -> None:
    backend = TLSBackend(certs.ca)
    try:
        tp = start_sni(
            tsproxy_factory,
            certs,
            f"sni:\n"
            f"- fqdn: tunnel.wild.test\n  tunnel_route: 127.0.0.1:{backend.port}\n"
            f"- fqdn: forward.wild.test\n  forward_route: 127.0.0.1:{plain_echo.port}\n",
            origin=origin,
            hosts=("open.wild.test",),
        )
        port = tp.ports[0]
        ctx = client_context(certs, version)
        # tunnel_route: the TLS is the backend's, end to end
        with tls_connect(ctx, port, "tunnel.wild.test") as s:
            assert peer_dns_names(s) == ["backend.test"]
            s.sendall(b"hello\n")
            assert s.recv(1024) == b"backend saw hello\n"
        assert backend.handshakes == 1
        # forward_route: tsproxy terminates (its certificate), the route gets the plain bytes
        with tls_connect(ctx, port, "forward.wild.test") as s:
            assert peer_dns_names(s) == ["*.wild.test"]
            s.sendall(b"not even http\n")
            assert s.recv(1024) == b"plain saw not even http\n"
        assert ok(served(certs, port, "open.wild.test", version))
        assert tp.wait_metric("proxy.process.tunnel.total_client_connections_blind_tcp", 2) == 2
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# host_sni_policy
# --------------------------------------------------------------------------------------------


def curl_status(port: int, certs: Certs, sni: str, host: str) -> tuple[int, str]:
    done = subprocess.run(
        [
            "curl", "-s", "--max-time", "10", "--cacert", str(certs.ca_file),
            "--resolve", f"{sni}:{port}:127.0.0.1", "-H", f"Host: {host}",
            "-o", "-", "-w", "\n%{http_code}", f"https://{sni}:{port}/",
        ],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body.strip()


@needs_curl
def test_host_sni_policy(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n"
        "- fqdn: strict.wild.test\n  verify_client: STRICT\n"
        "- fqdn: lenient.wild.test\n  verify_client: STRICT\n  host_sni_policy: PERMISSIVE\n"
        "- fqdn: twin.wild.test\n  verify_client: NONE\n"
        "- fqdn: open2.wild.test\n  verify_client: NONE\n",
        origin=origin,
        hosts=tuple(f"{h}.wild.test" for h in ("open", "strict", "lenient", "twin", "open2")),
        records={"proxy.config.ssl.CA.cert.filename": "certs/ca.pem"},
    )
    port = tp.ports[0]
    # Host names a STRICT item, the SNI did not: proxy.config.http.host_sni_policy 2 (the default)
    status, body = curl_status(port, certs, "open.wild.test", "strict.wild.test")
    assert (status, body) == (403, "403 Forbidden: Access Denied"), body
    # the item's own host_sni_policy: log and go on
    assert curl_status(port, certs, "open.wild.test", "lenient.wild.test")[0] == 200
    # the same policy under two names is no bypass; a name with no item has nothing to protect
    assert curl_status(port, certs, "twin.wild.test", "open2.wild.test")[0] == 200
    assert curl_status(port, certs, "strict.wild.test", "open.wild.test")[0] == 0  # no client cert
    assert curl_status(port, certs, "open.wild.test", "open.wild.test")[0] == 200
    log = tp.proxy.output()
    assert "SNI/hostname mismatch sni=open.wild.test host=strict.wild.test action=terminate" in log
    assert "SNI/hostname mismatch sni=open.wild.test host=lenient.wild.test action=continue" in log
    assert "host=open2.wild.test" not in log
    # the record is the default for every item: 0 turns the check off (a reload applies it)
    records = tp.config_dir / "records.config"
    records.write_text(records.read_text() + "CONFIG proxy.config.http.host_sni_policy INT 0\n")
    assert tp.proxy.ctl("reload").returncode == 0
    assert curl_status(port, certs, "open.wild.test", "strict.wild.test")[0] == 200


# --------------------------------------------------------------------------------------------
# the origin side: verify_server_policy, verify_server_properties, client_cert / client_key
# --------------------------------------------------------------------------------------------


def test_origin_side_keys_per_name(tsproxy_factory: Factory, certs: Certs) -> None:
    origin_ca, rogue_ca, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    untrusted = tls_origin(rogue_ca.issue_cert("localhost"))
    wrong_name = tls_origin(origin_ca.issue_cert("other.test"))
    mtls = tls_origin(origin_ca.issue_cert("localhost"), client_ca=client_ca)
    client = client_ca.issue_cert("tsproxy-client.test")
    try:
        hosts = {
            "open.wild.test": untrusted,
            "lax.wild.test": untrusted,
            "name.wild.test": wrong_name,
            "sig.wild.test": wrong_name,
            "mtls.wild.test": mtls,
            "nocert.wild.test": mtls,
        }
        remap = "".join(f"map https://{h}/ https://localhost:{o.port}/\n" for h, o in hosts.items())
        tp = start_sni(
            tsproxy_factory,
            certs,
            "sni:\n"
            "- fqdn: lax.wild.test\n  verify_server_policy: DISABLED\n"
            "- fqdn: sig.wild.test\n  verify_server_properties: SIGNATURE\n"
            "- fqdn: mtls.wild.test\n  client_cert: client/cert.pem\n  client_key: client/key.pem\n"
            "  client_sni_policy: remap\n",
            origin=9,
            files={
                "remap.config": remap,
                "origin-ca.pem": origin_ca.cert_pem.bytes(),
                "client/cert.pem": b"".join(b.bytes() for b in client.cert_chain_pems),
                "client/key.pem": client.private_key_pem.bytes(),
            },
            records={"proxy.config.ssl.client.CA.cert.filename": "origin-ca.pem"},
        )
        port = tp.ports[0]

        def status(sni: str) -> bytes:
            with tls_connect(client_context(certs), port, sni) as s:
                s.sendall(f"GET /bytes?n=10 HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
                return s.recv(65536).split(b"\r\n", 1)[0]

        # DISABLED for one name: its connection to the untrusted origin goes through; the same
        # origin under another name (and then the pooled connection) is still refused
        assert status("lax.wild.test") == b"HTTP/1.1 200 OK"
        assert status("open.wild.test") == b"HTTP/1.1 502 Bad Gateway"
        # SIGNATURE only: a certificate for another name passes; ALL (the records) refuses it
        assert status("sig.wild.test") == b"HTTP/1.1 200 OK"
        assert status("name.wild.test") == b"HTTP/1.1 502 Bad Gateway"
        # client_cert / client_key for one name: the origin that requires one serves it only there
        assert status("mtls.wild.test") == b"HTTP/1.1 200 OK"
        assert mtls.client_certs[-1] is True
        assert status("nocert.wild.test") == b"HTTP/1.1 502 Bad Gateway"
        with tls_connect(client_context(certs), port, "mtls.wild.test") as s:
            assert http_get(s, "mtls.wild.test", "/bytes?n=10").endswith(pattern(10))
    finally:
        for o in (untrusted, wrong_name, mtls):
            o.stop()


# --------------------------------------------------------------------------------------------
# reload, config check, plugins
# --------------------------------------------------------------------------------------------


def test_reload_is_atomic_with_ssl_multicert_and_a_bad_file_keeps_the_old_pair(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n- fqdn: strict.wild.test\n  verify_client: STRICT\n",
        origin=origin,
        hosts=("strict.wild.test",),
        records={"proxy.config.ssl.CA.cert.filename": "certs/ca.pem"},
    )
    port = tp.ports[0]
    missing = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert failure_reason(client_context(certs), port, "strict.wild.test") == missing
    # new certificates plus a broken sni.yaml: neither is taken
    (tp.config_dir / "ssl_multicert.config").write_text("dest_ip=* ssl_cert_name=certs/exact.pem\n")
    (tp.config_dir / "sni.yaml").write_text("sni:\n- fqdn: strict.wild.test\n  verify_client: NEVER\n")
    bad = tp.proxy.ctl("reload")
    assert bad.returncode == 78, bad.stdout + bad.stderr
    assert "sni.yaml:3: verify_client: expected NONE | MODERATE | STRICT, got 'NEVER'" in bad.stderr
    with tls_connect(client_context(certs), port, "strict.wild.test", timeout=5) as s:
        assert peer_dns_names(s) == ["*.wild.test"]  # still the old certificate table
    assert failure_reason(client_context(certs), port, "strict.wild.test") == missing
    # fixed: both switch together
    (tp.config_dir / "sni.yaml").write_text("sni:\n- fqdn: strict.wild.test\n  verify_client: NONE\n")
    good = tp.proxy.ctl("reload")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "file changed: sni.yaml" in good.stdout and "file changed: ssl_multicert.config" in good.stdout
    with tls_connect(client_context(certs), port, "strict.wild.test") as s:
        assert peer_dns_names(s) == ["exact.test"]
        http_get(s, "strict.wild.test")  # no certificate asked for


def test_config_check_validates_sni_yaml(certs: Certs, tmp_path: Path) -> None:
    files: dict[str, str | bytes] = dict(certs.files)
    files["ssl_multicert.config"] = MULTICERT
    recs = {
        "proxy.config.http.server_ports": "8443:ssl",
        "proxy.config.ssl.server.cert.path": ".",
        "proxy.config.ssl.server.private_key.path": ".",
    }
    cases = [
        ("sni:\n- fqdn: a.test\n  ip_allow: 10.0.0.0/33\n", 78, "sni.yaml:3: ip_allow: bad address"),
        # STRICT without any CA to check the certificates against
        ("sni:\n- fqdn: a.test\n  verify_client: STRICT\n", 78, "sni.yaml:2: verify_client STRICT needs"),
        ("sni:\n- fqdn: a.test\n  verify_client_ca_certs: {file: nope.pem}\n  verify_client: MODERATE\n",
         78, "sni.yaml:2: /"),  # then the CA file's path and why it cannot be read
        ("sni:\n- fqdn: a.test\n  verify_client_ca_certs: nope.pem\n  verify_client: MODERATE\n",
         78, "/nope.pem: cannot read CA certificate file: No such file"),
        ("sni:\n- fqdn: a.test\n  client_cert: missing.pem\n", 78, "sni.yaml:2:"),
        ("sni:\n- fqdn: a.test\n  server_groups_list: X25519:no-such-group\n", 78,
         "sni.yaml:2: server_groups_list: OpenSSL does not accept 'X25519:no-such-group'"),
        ("sni:\n- fqdn: a.test\n  server_cipher_suite: NO-SUCH-CIPHER\n", 78,
         "sni.yaml:2: server_cipher_suite: OpenSSL does not accept"),
        ("sni:\n- fqdn: a.test\n  tunel_route: b:1\n", 0, "sni.yaml:3: unknown key 'tunel_route' ignored"),
    ]  # fmt: skip
    for i, (text, code, message) in enumerate(cases):
        config_dir = write_config_dir(tmp_path / f"c{i}", recs, {**files, "sni.yaml": text})
        done = run_tsproxy("config", "check", "--config-dir", str(config_dir))
        assert done.returncode == code, (text, done.stdout, done.stderr)
        assert message in done.stdout + done.stderr, (text, done.stdout, done.stderr)


def test_plugins_see_the_matched_item(tsproxy_factory: Factory, certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "seen.log"
    tp = start_sni(
        tsproxy_factory,
        certs,
        "sni:\n- fqdn: '*.wild.test'\n  valid_tls_versions_in: [TLSv1_2, TLSv1_3]\n  http2: off\n",
        origin=9,
        files={"plugin.config": f"{PLUGINS / 'sni_policy.py'} {log}\n"},
    )
    expected = {"fqdn": "*.wild.test", "valid_tls_versions_in": ["TLSv1_2", "TLSv1_3"], "http2": False}
    for sni, item in (("api.wild.test", expected), ("other.test", None)):
        with tls_connect(client_context(certs), tp.ports[0], sni) as s:
            response = http_get(s, sni)
        assert json.loads(response.partition(b"\r\n\r\n")[2]) == item
    deadline = time.monotonic() + 5
    while log.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = log.read_text().splitlines()
    assert lines == [f"api.wild.test {json.dumps(expected)}", "other.test null"]


def test_an_ats_directory_s_sni_yaml_is_read_not_reported_as_ignored(tmp_path: Path) -> None:
    from tsproxy.config import unread_ats_file_warning

    (tmp_path / "sni.yaml").write_text("sni:\n- fqdn: a.test\n  verify_client: NONE\n")
    (tmp_path / "ip_allow.yaml").write_text("ip_allow:\n- apply: in\n  ip_addrs: 0/0\n  action: allow\n")
    warning = unread_ats_file_warning(tmp_path)
    assert warning is not None and "ip_allow.yaml" in warning
    assert "sni.yaml" not in warning
