"""Issues 4 and 5, the origin-side and certificate hooks against the real ``tsproxy start``
(tests/plugins/outbound_verify.py): VCONN_OUTBOUND_START / VCONN_OUTBOUND_CLOSE once per origin
connection, plain and TLS, pooled or not; a paused OUTBOUND_START re-enabled from a timer while
other clients are served; an error or a raising callback gives the client a 502; SSL_VERIFY_SERVER
sees the origin certificate and may refuse it; SSL_VERIFY_CLIENT sees the client certificate
(certification_level 2) and may refuse it.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import ProxyProcess
from origin import OriginServer
from test_origin_tls import tls_origin

Factory = Callable[..., ProxyProcess]
PLUGIN = Path(__file__).resolve().parent / "plugins" / "outbound_verify.py"
M_VERIFY_FAILED = "proxy.process.ssl.origin_server_cert_verify_failed"
M_UA_VERIFY = "proxy.process.ssl.user_agent_cert_verify_failed"
M_PLUGIN_ERRORS = "proxy.process.plugin.outbound_verify.errors"


@dataclass
class PKI:
    ca: trustme.CA
    client_ca: trustme.CA
    good_client: trustme.LeafCert
    bad_client: trustme.LeafCert
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca, client_ca = trustme.CA(), trustme.CA()
    front = ca.issue_cert("front.test")
    files = {
        "origin-ca.pem": ca.cert_pem.bytes(),
        "client-ca.pem": client_ca.cert_pem.bytes(),
        "certs/front.pem": front.private_key_and_cert_chain_pem.bytes(),
    }
    good = client_ca.issue_cert("good-client.test", common_name="good-client.test")
    bad = client_ca.issue_cert("bad-client.test", common_name="bad-client.test")
    return PKI(ca, client_ca, good, bad, files)


@pytest.fixture(scope="module")
def origins(pki: PKI) -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {
        "plain": OriginServer().start(),
        "plain2": OriginServer().start(),
        # Both certificates are valid for "localhost"; they differ in their subject CN.
        "good": tls_origin(pki.ca.issue_cert("localhost", common_name="good-origin.test")),
        "blocked": tls_origin(pki.ca.issue_cert("localhost", common_name="blocked-origin.test")),
        "wrongname": tls_origin(pki.ca.issue_cert("other.test", common_name="other.test")),
    }
    yield made
    for o in made.values():
        o.stop()


def start(
    factory: Factory,
    pki: PKI,
    origins: dict[str, Any],
    log: Path,
    actions: str = "",
    records: dict[str, Any] | None = None,
    *,
    https_front: bool = False,
) -> ProxyProcess:
    rules = [f"map http://plain.test/ http://127.0.0.1:{origins['plain'].port}/"]
    rules.append(f"map http://plain2.test/ http://127.0.0.1:{origins['plain2'].port}/")
    for name in ("good", "blocked", "wrongname"):
        rules.append(f"map http://{name}.test/ https://localhost:{origins[name].port}/")
    rules.append(f"map https://front.test/ https://localhost:{origins['good'].port}/")
    files: dict[str, str | bytes] = dict(pki.files)
    files["remap.config"] = "".join(r + "\n" for r in rules)
    files["plugin.config"] = f"{PLUGIN} {log} {actions}\n"
    recs: dict[str, Any] = {
        "proxy.config.ssl.client.CA.cert.filename": "origin-ca.pem",
        "proxy.config.http.connect_attempts_timeout": 5,
    }
    if https_front:
        recs["proxy.config.http.server_ports"] = "{0}:ip-in=127.0.0.1 {1}:ssl:ip-in=127.0.0.1"
        recs["proxy.config.ssl.server.cert.path"] = "."
        recs["proxy.config.ssl.server.private_key.path"] = "."
        files["ssl_multicert.config"] = "dest_ip=* ssl_cert_name=certs/front.pem\n"
    recs.update(records or {})
    return factory(records=recs, files=files)


def get(proxy: ProxyProcess, host: str, c: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = c is None
    conn = c if c is not None else http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    try:
        conn.request("GET", "/bytes?n=100", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def last_502_log_line(proxy: ProxyProcess) -> str:
    """The log line with the reason of the latest 502 (the client's body has none)."""
    return [ln for ln in proxy.output().splitlines() if "answered 502" in ln][-1]


def metric(proxy: ProxyProcess, name: str) -> int:
    return int(proxy.call("metric.get", {"names": [name]})["metrics"][0][1])


def records_of(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def wait_records(log: Path, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    recs = records_of(log)
    while not pred(recs) and time.monotonic() < deadline:
        time.sleep(0.02)
        recs = records_of(log)
    return recs


def hooks_for(recs: list[dict[str, Any]], port: int, hook: str) -> list[dict[str, Any]]:
    return [r for r in recs if r["hook"] == hook and r["peer_port"] == port]


def assert_once_per_connection(recs: list[dict[str, Any]], port: int, n: int) -> None:
    """n OUTBOUND_STARTs and n OUTBOUND_CLOSEs on distinct local ports, each START first."""
    starts = hooks_for(recs, port, "VCONN_OUTBOUND_START")
    closes = hooks_for(recs, port, "VCONN_OUTBOUND_CLOSE")
    assert len(starts) == n and len(closes) == n, (starts, closes)
    assert len({r["local_port"] for r in starts}) == n
    assert sorted(r["local_port"] for r in starts) == sorted(r["local_port"] for r in closes)
    by_port = {r["local_port"]: r["t"] for r in starts}
    for c in closes:
        assert c["started"] is True and c["outbound"] is True
        assert c["t"] >= by_port[c["local_port"]]


# --------------------------------------------------------------------------------------------
# VCONN_OUTBOUND_START / VCONN_OUTBOUND_CLOSE
# --------------------------------------------------------------------------------------------


def test_outbound_start_and_close_once_per_origin_connection_plain_and_tls(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(tsproxy_factory, pki, origins, log, records={"proxy.config.http.keep_alive_enabled_out": 0})
    plain, good = origins["plain"], origins["good"]
    good_handshakes = good.handshakes
    for _ in range(3):
        assert get(proxy, "plain.test") == (200, bytes(range(100)))
        assert get(proxy, "good.test") == (200, bytes(range(100)))
    recs = wait_records(log, lambda r: sum(x["hook"] == "VCONN_OUTBOUND_CLOSE" for x in r) >= 6)
    assert_once_per_connection(recs, plain.port, 3)
    assert_once_per_connection(recs, good.port, 3)
    assert good.handshakes - good_handshakes == 3
    for r in hooks_for(recs, plain.port, "VCONN_OUTBOUND_START"):
        assert r["sni"] is None and r["cn"] is None and r["outbound"] is True
    for r in hooks_for(recs, good.port, "VCONN_OUTBOUND_START"):
        assert r["sni"] == "localhost" and r["cn"] is None  # before the ClientHello: no certificate yet
    # SSL_VERIFY_SERVER: once per TLS connection, after OUTBOUND_START, with the origin's certificate.
    verifies = hooks_for(recs, good.port, "SSL_VERIFY_SERVER")
    assert len(verifies) == 3
    starts = {r["local_port"]: r["t"] for r in hooks_for(recs, good.port, "VCONN_OUTBOUND_START")}
    for v in verifies:
        assert v["cn"] == "good-origin.test" and v["verify_error"] is None and v["started"] is True
        assert v["t"] >= starts[v["local_port"]]
    assert not hooks_for(recs, plain.port, "SSL_VERIFY_SERVER")
    assert not [r for r in recs if r["hook"] == "SSL_VERIFY_CLIENT"]


def test_pooled_origin_connection_gets_one_start_and_one_close(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(tsproxy_factory, pki, origins, log)
    plain, good = origins["plain"], origins["good"]
    for _ in range(5):
        assert get(proxy, "plain.test")[0] == 200
        assert get(proxy, "good.test")[0] == 200
    recs = records_of(log)
    for port in (plain.port, good.port):
        assert len(hooks_for(recs, port, "VCONN_OUTBOUND_START")) == 1, recs
        assert hooks_for(recs, port, "VCONN_OUTBOUND_CLOSE") == []  # still pooled
    assert len(hooks_for(recs, good.port, "SSL_VERIFY_SERVER")) == 1
    proxy.stop()  # the graceful stop retires the pool: each pooled connection closes once
    recs = records_of(log)
    assert_once_per_connection(recs, plain.port, 1)
    assert_once_per_connection(recs, good.port, 1)


def test_paused_outbound_start_waits_while_other_clients_are_served(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(tsproxy_factory, pki, origins, log, "pause_start=0.5")
    plain = origins["plain"]
    seen = len(plain.requests)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    t0 = time.monotonic()
    conn.request("GET", "/bytes?n=100", headers={"Host": "plain.test"})
    wait_records(log, lambda r: bool(r))  # the hook has paused
    # Meanwhile the worker answers another client (no remap rule: 404 at once).
    other = http.client.HTTPConnection("127.0.0.1", proxy.port(0), timeout=10)
    other.request("GET", "/", headers={"Host": "nowhere.test"})
    resp = other.getresponse()
    resp.read()
    assert resp.status == 404
    assert time.monotonic() - t0 < 0.45
    assert len(plain.requests) == seen  # no request byte reached the origin during the pause
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, bytes(range(100)))
    assert time.monotonic() - t0 >= 0.5
    conn.close()
    other.close()
    # TLS: the ClientHello waits for the hook too.
    good = origins["good"]
    t0 = time.monotonic()
    assert get(proxy, "good.test")[0] == 200
    assert time.monotonic() - t0 >= 0.5
    start_t = hooks_for(records_of(log), good.port, "VCONN_OUTBOUND_START")[0]["t"]
    verify_t = hooks_for(records_of(log), good.port, "SSL_VERIFY_SERVER")[0]["t"]
    assert verify_t - start_t >= 0.5


def test_outbound_start_error_and_raise_give_502(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    plain, good = origins["plain"], origins["good"]
    proxy = start(
        tsproxy_factory, pki, origins, log, f"fail_start_port={plain.port} raise_start_port={good.port}"
    )
    seen, handshakes = len(plain.requests), good.handshakes
    for host in ("plain.test", "good.test"):
        status, body = get(proxy, host)
        assert (status, body) == (502, b"502 Bad Gateway\n")  # the hook's name goes to the log only
        assert "VCONN_OUTBOUND_START" in last_502_log_line(proxy)
    assert get(proxy, "plain2.test") == (200, bytes(range(100)))  # other origins are untouched
    assert len(plain.requests) == seen and good.handshakes == handshakes  # nothing was sent
    assert metric(proxy, M_PLUGIN_ERRORS) == 1
    recs = wait_records(log, lambda r: sum(x["hook"] == "VCONN_OUTBOUND_CLOSE" for x in r) >= 2)
    # A connection failed in OUTBOUND_START still gets its OUTBOUND_CLOSE, once.
    assert_once_per_connection(recs, plain.port, 1)
    assert_once_per_connection(recs, good.port, 1)
    assert not hooks_for(recs, good.port, "SSL_VERIFY_SERVER")


# --------------------------------------------------------------------------------------------
# SSL_VERIFY_SERVER
# --------------------------------------------------------------------------------------------


def test_verify_server_sees_the_certificate_and_may_reject_it(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(tsproxy_factory, pki, origins, log, "reject_server_cn=blocked-origin.test pause_verify=0.2")
    good, blocked = origins["good"], origins["blocked"]
    blocked_seen = len(blocked.requests)
    status, body = get(proxy, "blocked.test")
    assert (status, body) == (502, b"502 Bad Gateway\n")
    assert "SSL_VERIFY_SERVER" in last_502_log_line(proxy)
    assert metric(proxy, M_VERIFY_FAILED) == 1
    assert len(blocked.requests) == blocked_seen  # the request never went to the refused origin
    assert get(proxy, "good.test") == (200, bytes(range(100)))
    assert metric(proxy, M_VERIFY_FAILED) == 1
    # ENFORCED + a name mismatch: refused by the policy before the hook runs.
    status, body = get(proxy, "wrongname.test")
    assert status == 502, body
    recs = wait_records(log, lambda r: sum(x["hook"] == "VCONN_OUTBOUND_CLOSE" for x in r) >= 3)
    verifies = [r for r in recs if r["hook"] == "SSL_VERIFY_SERVER"]
    assert [(r["peer_port"], r["cn"], r["sni"]) for r in verifies] == [
        (blocked.port, "blocked-origin.test", "localhost"),
        (good.port, "good-origin.test", "localhost"),
    ]
    assert_once_per_connection(recs, blocked.port, 1)
    assert_once_per_connection(recs, origins["wrongname"].port, 1)


def test_verify_server_under_permissive_sees_the_verify_error_and_disabled_skips_it(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(
        tsproxy_factory,
        pki,
        origins,
        log,
        records={"proxy.config.ssl.client.verify.server.policy": "PERMISSIVE"},
    )
    wrong = origins["wrongname"]
    assert get(proxy, "wrongname.test")[0] == 200  # the plugin accepts, PERMISSIVE goes on
    (v,) = hooks_for(records_of(log), wrong.port, "SSL_VERIFY_SERVER")
    assert v["cn"] == "other.test"
    assert "does not match host localhost" in v["verify_error"]
    proxy.stop()

    log2 = tmp_path / "hooks2.log"
    proxy = start(
        tsproxy_factory,
        pki,
        origins,
        log2,
        records={"proxy.config.ssl.client.verify.server.policy": "DISABLED"},
    )
    assert get(proxy, "good.test")[0] == 200
    recs = records_of(log2)
    assert len(hooks_for(recs, origins["good"].port, "VCONN_OUTBOUND_START")) == 1
    assert not [r for r in recs if r["hook"] == "SSL_VERIFY_SERVER"]


# --------------------------------------------------------------------------------------------
# SSL_VERIFY_CLIENT
# --------------------------------------------------------------------------------------------


def _client_ctx(pki: PKI, leaf: trustme.LeafCert | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(ctx)
    if leaf is not None:
        leaf.configure_cert(ctx)
    return ctx


def _https_get(proxy: ProxyProcess, ctx: ssl.SSLContext) -> bytes:
    """One request over TLS to the https port; everything the proxy sent back (b"" = closed)."""
    with (
        socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="front.test") as s,
    ):
        s.sendall(b"GET /bytes?n=100 HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n")
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
        return out


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_verify_client_sees_the_client_certificate_and_may_reject_it(
    tsproxy_factory: Factory, pki: PKI, origins: dict[str, Any], tmp_path: Path, version: str
) -> None:
    log = tmp_path / "hooks.log"
    proxy = start(
        tsproxy_factory,
        pki,
        origins,
        log,
        "reject_client_cn=bad-client.test pause_verify=0.2",
        records={
            "proxy.config.ssl.client.certification_level": 2,
            "proxy.config.ssl.CA.cert.filename": "client-ca.pem",
            "proxy.config.ssl.TLSv1_2": 1,
            "proxy.config.ssl.TLSv1_3": 1 if version == "1.3" else 0,
        },
        https_front=True,
    )
    t0 = time.monotonic()
    out = _https_get(proxy, _client_ctx(pki, pki.good_client))
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert out.endswith(bytes(range(100)))
    assert time.monotonic() - t0 >= 0.2  # the paused hook held the session back
    assert metric(proxy, M_UA_VERIFY) == 0
    out = _https_get(proxy, _client_ctx(pki, pki.bad_client))
    assert out == b""  # closed before the HTTP session started: no response at all
    assert metric(proxy, M_UA_VERIFY) == 1
    recs = [r for r in records_of(log) if r["hook"] == "SSL_VERIFY_CLIENT"]
    assert [(r["cn"], r["outbound"], r["sni"], r["verify_error"]) for r in recs] == [
        ("good-client.test", False, "front.test", None),
        ("bad-client.test", False, "front.test", None),
    ]
    assert all(r["local_port"] == proxy.port(1) for r in recs)
    # Without a client certificate the handshake fails in OpenSSL (level 2): no hook call.
    assert _https_get_fails(proxy, _client_ctx(pki, None))
    assert len([r for r in records_of(log) if r["hook"] == "SSL_VERIFY_CLIENT"]) == 2


def _https_get_fails(proxy: ProxyProcess, ctx: ssl.SSLContext) -> bool:
    try:
        return _https_get(proxy, ctx) == b""
    except (ssl.SSLError, OSError):
        return True
