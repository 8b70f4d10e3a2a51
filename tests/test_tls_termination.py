"""Issue 3, TLS termination, against the real ``tsproxy start``: certificate selection, handshake
timeout, tr-pass and action=tunnel, ALPN, session resumption across workers, the handshake hooks
(tests/plugins/), malformed and split ClientHellos, TLS versions, client certificates, counters
and debug logging. Clients are Python ``ssl``, ``openssl s_client`` and ``curl``.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
from conftest import ProxyProcess, free_port, wait_for
from origin import TLSBackend
from sansio_tls import SansIOClient

Factory = Callable[..., ProxyProcess]
PLUGINS = Path(__file__).resolve().parent / "plugins"
SSL_PREFIX = "proxy.process.ssl."
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
S_CLIENT_VERSION = {"1.2": "-tls1_2", "1.3": "-tls1_3"}

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# --------------------------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    files: dict[str, bytes]  # config-dir relative name -> PEM (key + chain)
    client: trustme.LeafCert
    rogue_client: trustme.LeafCert
    rogue_ca_file: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    rogue_ca = trustme.CA()
    leaves = {
        "exact": ca.issue_cert("exact.test"),
        "wild": ca.issue_cert("*.wild.test"),
        "ip": ca.issue_cert("ip.test"),
        "ipport": ca.issue_cert("ipport.test"),
        "default": ca.issue_cert("default.test"),
        "dual-ec": ca.issue_cert("dual.test", key_type=trustme.KeyType.ECDSA),
        "dual-rsa": ca.issue_cert("dual.test", key_type=trustme.KeyType.RSA),
    }
    files = {
        f"certs/{name}.pem": leaf.private_key_and_cert_chain_pem.bytes() for name, leaf in leaves.items()
    }
    files["certs/ca.pem"] = ca.cert_pem.bytes()
    d = tmp_path_factory.mktemp("ca")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    rogue_ca.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    return Certs(
        ca,
        d / "ca.pem",
        files,
        ca.issue_cert("client.test"),
        rogue_ca.issue_cert("client.test"),
        d / "rogue-ca.pem",
    )


def client_context(
    certs: Certs,
    version: str | None = None,
    *,
    alpn: list[str] | None = None,
    cert: trustme.LeafCert | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.check_hostname = False  # selection tests look at which certificate came back
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def tls_connect(
    ctx: ssl.SSLContext, port: int, sni: str | None, host: str = "127.0.0.1", timeout: float = 5.0
) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def peer_dns_names(sock: ssl.SSLSocket) -> list[str]:
    cert = sock.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def served_name(
    certs: Certs, port: int, sni: str | None, host: str = "127.0.0.1", version: str = "1.3"
) -> str:
    with tls_connect(client_context(certs, version), port, sni, host) as s:
        names = peer_dns_names(s)
    assert len(names) == 1, names
    return names[0]


def http_get(sock: socket.socket, host: str = "origin.test", path: str = "/") -> bytes:
    """One HTTP/1.1 request with Connection: close; the whole response."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def failure_reason(ctx: ssl.SSLContext, port: int, sni: str | None, timeout: float = 5.0) -> str | None:
    """Why the handshake (or, for TLS 1.3 failures after the client's Finished, the first exchange)
    failed: the OpenSSL reason (the alert the client received), or None when it was served."""
    try:
        with tls_connect(ctx, port, sni, timeout=timeout) as s:
            response = http_get(s)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except ConnectionError as exc:
        return type(exc).__name__
    return None if response.startswith(b"HTTP/1.1 200") else f"bad response {response[:40]!r}"


# --------------------------------------------------------------------------------------------
# origins
# --------------------------------------------------------------------------------------------


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"origin saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    """A plain HTTP origin on 127.0.0.1; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OriginHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_backend(certs: Certs) -> Iterator[TLSBackend]:
    backend = TLSBackend(certs.ca)
    yield backend
    backend.close()


# --------------------------------------------------------------------------------------------
# the proxy
# --------------------------------------------------------------------------------------------


@dataclass
class TLSProxy:
    proxy: ProxyProcess
    ports: list[int]
    config_dir: Path

    def metric(self, name: str) -> int:
        full = name if name.startswith("proxy.") else SSL_PREFIX + name
        result = self.proxy.call("metric.get", {"names": [full]})
        (got,) = result["metrics"]
        return int(got[1])

    def wait_metric(self, name: str, at_least: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        value = self.metric(name)
        while value < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
            value = self.metric(name)
        assert value >= at_least, f"{name} = {value}, expected >= {at_least}"
        return value

    def worker_pids(self) -> list[int]:
        return self.proxy.worker_pids()


def start_proxy(
    factory: Factory,
    certs: Certs,
    *,
    ports: Sequence[str] = ("{p0}:ssl:ip-in=127.0.0.1",),
    multicert: str,
    origin: int | None = None,
    records: dict[str, Any] | None = None,
    plugins: list[str] = (),  # type: ignore[assignment]
    fmt_extra: dict[str, Any] | None = None,
) -> TLSProxy:
    """Start tsproxy with the test certificates in ``certs/``.

    ``ports`` are server_ports descriptors with ``{p0}``, ``{p1}``... for ports allocated here
    (default: one TLS port);
    ``multicert`` and ``plugins`` lines may use the same placeholders plus ``{origin}`` and
    ``{plugins}`` (the tests/plugins directory).
    """
    numbers = [free_port() for _ in range(8)]
    fmt: dict[str, Any] = {f"p{i}": n for i, n in enumerate(numbers)}
    fmt["origin"] = origin or 9
    fmt["plugins"] = str(PLUGINS)
    fmt.update(fmt_extra or {})
    files: dict[str, str | bytes] = dict(certs.files)
    files["ssl_multicert.config"] = multicert.format(**fmt)
    remap = f"map https://origin.test/ http://127.0.0.1:{origin}/\n" if origin else "# none\n"
    files["remap.config"] = remap
    if plugins:
        files["plugin.config"] = "".join(line.format(**fmt) + "\n" for line in plugins)
    recs: dict[str, Any] = {
        "proxy.config.http.server_ports": " ".join(p.format(**fmt) for p in ports),
        "proxy.config.ssl.server.cert.path": ".",
        "proxy.config.ssl.server.private_key.path": ".",
    }
    recs.update(records or {})
    proxy = factory(records=recs, files=files)
    return TLSProxy(proxy, numbers, proxy.config_dir)


def read_lines(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def assert_serves(tp: TLSProxy, certs: Certs, port_index: int = 0, sni: str = "exact.test") -> None:
    """A full handshake plus an HTTP exchange still works on this proxy."""
    with tls_connect(client_context(certs), tp.ports[port_index], sni) as s:
        response = http_get(s)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert response.endswith(b"origin saw /"), response[-200:]


SELECTION_MULTICERT = """\
# exact, wildcard, IP, IP:port and default
ssl_cert_name=certs/exact.pem
ssl_cert_name=certs/wild.pem
dest_ip=127.0.0.2 ssl_cert_name=certs/ip.pem
dest_ip=127.0.0.1:{p2} ssl_cert_name=certs/ipport.pem
dest_ip=* ssl_cert_name=certs/default.pem
"""


# --------------------------------------------------------------------------------------------
# certificate selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_certificate_selection(tsproxy_factory: Factory, certs: Certs, origin: int, version: str) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        ports=["{p0}:ssl:ip-in=127.0.0.1", "{p1}:ssl:ip-in=127.0.0.2", "{p2}:ssl:ip-in=127.0.0.1"],
        multicert=SELECTION_MULTICERT,
        origin=origin,
    )
    p0, p1, p2 = tp.ports[:3]

    def name(port: int, sni: str | None, host: str = "127.0.0.1") -> str:
        return served_name(certs, port, sni, host, version)

    # exact name, case-insensitively; it beats an IP entry
    assert name(p0, "exact.test") == "exact.test"
    assert name(p0, "EXACT.Test") == "exact.test"
    assert name(p1, "exact.test", "127.0.0.2") == "exact.test"
    # one-label wildcard
    assert name(p0, "a.wild.test") == "*.wild.test"
    assert name(p0, "A.WILD.test") == "*.wild.test"
    assert name(p0, "b.a.wild.test") == "default.test"
    assert name(p0, "wild.test") == "default.test"
    # no name match (or no SNI at all): local IP:port, then IP, then the default
    assert name(p2, "unknown.test") == "ipport.test"
    assert name(p2, None) == "ipport.test"
    assert name(p1, "unknown.test", "127.0.0.2") == "ip.test"
    assert name(p1, None, "127.0.0.2") == "ip.test"
    assert name(p0, "unknown.test") == "default.test"
    assert name(p0, None) == "default.test"
    assert tp.wait_metric("total_success_handshake_count_in", 13) == 13
    assert tp.metric("total_attempts_handshake_count_in") == 13
    assert tp.metric("ssl_total_tlsv" + version.replace(".", "")) == 13
    other = "1.2" if version == "1.3" else "1.3"
    assert tp.metric("ssl_total_tlsv" + other.replace(".", "")) == 0
    # and the data path behind it
    assert_serves(tp, certs)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_no_matching_certificate_fails_with_alert(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\nssl_cert_name=certs/wild.pem\n",
        origin=origin,
    )
    worker = tp.worker_pids()
    for sni in ("nomatch.test", "b.a.wild.test", None):
        with pytest.raises(ssl.SSLError) as info:
            tls_connect(client_context(certs, version), tp.ports[0], sni).close()
        # the client got a TLS alert (not just a reset): unrecognized_name, or handshake_failure without SNI
        expected = "TLSV1_UNRECOGNIZED_NAME" if sni else "SSLV3_ALERT_HANDSHAKE_FAILURE"
        assert info.value.reason == expected, info.value
    assert tp.wait_metric("ssl_no_cert_context", 3) == 3
    assert_serves(tp, certs)
    assert_serves(tp, certs, sni="x.wild.test")
    assert tp.worker_pids() == worker


def s_client(
    port: int, *args: str, stdin: bytes = b"", timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    """``openssl s_client -connect 127.0.0.1:PORT ARGS`` with ``stdin``; never raises on failure."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@needs_openssl
@pytest.mark.parametrize(
    ("version", "capability", "key_bits"),
    [
        ("1.2", ("-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), 256),
        ("1.2", ("-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), 2048),
        ("1.3", ("-sigalgs", "ecdsa_secp256r1_sha256"), 256),
        ("1.3", ("-sigalgs", "rsa_pss_rsae_sha256"), 2048),
    ],
)
def test_ecdsa_and_rsa_chains_for_one_name(
    tsproxy_factory: Factory, certs: Certs, version: str, capability: tuple[str, str], key_bits: int
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/dual-ec.pem,certs/dual-rsa.pem\n",
    )
    out = s_client(
        tp.ports[0],
        "-servername",
        "dual.test",
        "-CAfile",
        str(certs.ca_file),
        "-verify_hostname",
        "dual.test",
        "-verify_return_error",
        S_CLIENT_VERSION[version],
        *capability,
    )
    # the chain verifies for dual.test, and its key type is the one the client can use
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr
    assert f"Server public key is {key_bits} bit" in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------
# handshake timeout
# --------------------------------------------------------------------------------------------


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed ``sock`` (EOF or reset); fails after ``timeout``."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the proxy did not close the connection within {timeout} s") from None
    return time.monotonic() - start


def test_handshake_timeout_closes_silent_and_stalled_clients(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.handshake_timeout_in": 1},
    )
    open_metric = "proxy.process.net.connections_currently_open"
    assert_serves(tp, certs)
    base = tp.metric(open_metric)  # the origin connection kept in the pool
    silent = socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5)
    partial = socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5)
    partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    wait_for(lambda: tp.metric(open_metric) == base + 2, "two more open connections", 2)
    # meanwhile, a normal client is served at once
    assert_serves(tp, certs)
    for sock in (silent, partial):
        with sock:
            elapsed = wait_closed(sock, 5.0)
            assert elapsed < 4.0
    assert tp.wait_metric("ssl_handshake_timeout_in", 2) == 2
    assert tp.metric("total_success_handshake_count_in") == 2
    wait_for(lambda: tp.metric(open_metric) == base, "the timed-out connections to be gone", 2)
    assert_serves(tp, certs)


# --------------------------------------------------------------------------------------------
# blind tunnels
# --------------------------------------------------------------------------------------------


def test_tr_pass_port_tunnels_plain_http_to_tunnel_route(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        ports=["{p0}:ssl:tr-pass:ip-in=127.0.0.1", "{p1}:ssl:ip-in=127.0.0.1"],
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.tunnel.route": f"127.0.0.1:{origin}"},
    )
    with socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5) as s:
        response = http_get(s, host="anything.test", path="/through-the-tunnel")
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(b"origin saw /through-the-tunnel"), response
    assert tp.wait_metric("proxy.process.tunnel.total_client_connections_blind_tcp", 1) == 1
    # TLS on the same tr-pass port is still terminated
    assert_serves(tp, certs, 0)
    # plain bytes on a port without tr-pass are a bad ClientHello: closed, not tunnelled
    with socket.create_connection(("127.0.0.1", tp.ports[1]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_closed(s, 5.0)
    assert tp.metric("proxy.process.tunnel.total_client_connections_blind_tcp") == 1


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_multicert_action_tunnel(
    tsproxy_factory: Factory, certs: Certs, origin: int, tls_backend: TLSBackend, version: str
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        ports=["{p0}:ssl:ip-in=127.0.0.1", "{p1}:ssl:ip-in=127.0.0.2"],
        multicert=(
            "ssl_cert_name=certs/exact.pem\n"
            "ssl_cert_name=certs/wild.pem action=tunnel tunnel_route=127.0.0.1:{backend}\n"
            "dest_ip=127.0.0.2 action=tunnel tunnel_route=127.0.0.1:{backend}\n"
            "dest_ip=* ssl_cert_name=certs/default.pem\n"
        ),
        origin=origin,
        fmt_extra={"backend": tls_backend.port},
    )
    cases = [(tp.ports[0], "127.0.0.1", "x.wild.test"), (tp.ports[1], "127.0.0.2", "whatever.test")]
    for port, host, sni in cases:
        # the handshake is the backend's: its certificate, its answer
        with tls_connect(client_context(certs, version), port, sni, host) as s:
            assert peer_dns_names(s) == ["backend.test"]
            s.sendall(b"hello " + sni.encode() + b"\n")
            assert s.recv(1024) == b"backend saw hello " + sni.encode() + b"\n"
    assert tls_backend.handshakes == 2
    # names without action=tunnel are terminated
    assert served_name(certs, tp.ports[0], "exact.test") == "exact.test"
    assert served_name(certs, tp.ports[0], None) == "default.test"
    assert tp.wait_metric("proxy.process.tunnel.total_client_connections_blind_tcp", 2) == 2


# --------------------------------------------------------------------------------------------
# ALPN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize(
    ("offer", "expected"),
    [(["http/1.1"], "http/1.1"), (["spdy/3.1", "http/1.1"], "http/1.1"), (None, None)],
)
def test_alpn(
    tsproxy_factory: Factory,
    certs: Certs,
    origin: int,
    version: str,
    offer: list[str] | None,
    expected: str | None,
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    with tls_connect(client_context(certs, version, alpn=offer), tp.ports[0], "exact.test") as s:
        assert s.selected_alpn_protocol() == expected
        response = http_get(s)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"origin saw /"), response
    assert tp.metric("ssl_alpn_no_endpoint") == 0


# --------------------------------------------------------------------------------------------
# session resumption across workers
# --------------------------------------------------------------------------------------------

GET_CLOSE = b"GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"


@needs_openssl
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_resumption_across_two_workers(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, version: str
) -> None:
    log = tmp_path / "hooks.log"
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.exec_thread.limit": 2},
        plugins=[f"{{plugins}}/record_hooks.py {log}"],
    )
    workers = set(tp.worker_pids())
    assert len(workers) == 2
    sess = tmp_path / "session.pem"
    common = (
        "-servername",
        "exact.test",
        "-CAfile",
        str(certs.ca_file),
        S_CLIENT_VERSION[version],
        "-ign_eof",
    )

    def starts() -> list[int]:
        return [int(words[0]) for words in read_lines(log) if words[1] == "VCONN_START"]

    first = s_client(tp.ports[0], *common, "-sess_out", str(sess), stdin=GET_CLOSE)
    assert "New, " in first.stdout and b"origin saw /" in first.stdout.encode(), first.stdout + first.stderr
    assert sess.stat().st_size > 0
    served_by: list[int] = []
    resumed = 0
    # Repeat until each worker resumed a session the other one (or itself) issued.
    for _ in range(40):
        out = s_client(tp.ports[0], *common, "-sess_in", str(sess), stdin=GET_CLOSE)
        assert "Reused, " in out.stdout, out.stdout + out.stderr
        assert "origin saw /" in out.stdout
        resumed += 1
        served_by = starts()
        if set(served_by) == workers and resumed >= 4:
            break
    assert set(served_by) == workers, f"connections only reached {set(served_by)} of {workers}"
    assert tp.wait_metric("total_tickets_verified", resumed) == resumed
    assert tp.metric("total_success_handshake_count_in") == resumed + 1


# --------------------------------------------------------------------------------------------
# handshake hooks (plugins in tests/plugins)
# --------------------------------------------------------------------------------------------

HOOK_ORDER = ["VCONN_START", "SSL_CLIENT_HELLO", "SSL_SERVERNAME", "SSL_CERT", "VCONN_CLOSE"]


def hooks_of(log: Path, client_port: int) -> list[str]:
    return [words[1] for words in read_lines(log) if words[2] == str(client_port)]


def wait_hooks(log: Path, client_port: int, last: str = "VCONN_CLOSE", timeout: float = 5.0) -> list[str]:
    wait_for(lambda: last in hooks_of(log, client_port), f"{last} for client port {client_port}", timeout)
    time.sleep(0.1)  # a duplicate would show up right behind it
    return hooks_of(log, client_port)


def start_hook_proxy(
    factory: Factory,
    certs: Certs,
    origin: int,
    plugins: list[str],
    records: dict[str, Any] | None = None,
    fmt_extra: dict[str, Any] | None = None,
) -> TLSProxy:
    return start_proxy(
        factory,
        certs,
        ports=["{p0}:ssl:ip-in=127.0.0.1", "{p1}:ssl:ip-in=127.0.0.1"],
        multicert="ssl_cert_name=certs/exact.pem\ndest_ip=* ssl_cert_name=certs/default.pem\n",
        origin=origin,
        plugins=plugins,
        records=records,
        fmt_extra=fmt_extra,
    )


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_hooks_fire_in_order_once_each(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, version: str
) -> None:
    log = tmp_path / "hooks.log"
    tp = start_hook_proxy(tsproxy_factory, certs, origin, [f"{{plugins}}/record_hooks.py {log}"])
    with tls_connect(client_context(certs, version), tp.ports[0], "EXACT.test") as s:
        port = s.getsockname()[1]
        assert http_get(s).endswith(b"origin saw /")
    assert wait_hooks(log, port) == HOOK_ORDER
    lines = [words for words in read_lines(log) if words[2] == str(port)]
    assert lines[0][4] == "-"  # no SNI known at VCONN_START
    assert {words[4] for words in lines[1:]} == {"exact.test"}  # then the name, lower-cased
    # a failed handshake (no certificate for the name) still closes exactly once
    no_cert = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        plugins=[f"{{plugins}}/record_hooks.py {tmp_path / 'fail.log'}"],
    )
    raw = socket.create_connection(("127.0.0.1", no_cert.ports[0]), timeout=5)
    port = raw.getsockname()[1]
    with (
        raw,
        pytest.raises(ssl.SSLError),
        client_context(certs, version).wrap_socket(raw, server_hostname="no.test"),
    ):
        pass
    assert wait_hooks(tmp_path / "fail.log", port) == HOOK_ORDER


@pytest.mark.parametrize("hook", ["VCONN_START", "SSL_CLIENT_HELLO", "SSL_CERT"])
def test_paused_hook_does_not_block_the_worker(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, hook: str
) -> None:
    log = tmp_path / "stall.log"
    tp = start_hook_proxy(
        tsproxy_factory, certs, origin, [f"{{plugins}}/stall_hook.py {hook} port={{p0}} 1.0 {log}"]
    )
    (worker,) = tp.worker_pids()
    cpu = psutil.Process(worker)
    result: dict[str, Any] = {}

    def paused_client() -> None:
        t0 = time.monotonic()
        try:
            with tls_connect(client_context(certs), tp.ports[0], "exact.test") as s:
                result["handshake"] = time.monotonic() - t0
                result["response"] = http_get(s)
        except Exception as exc:  # reported by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=paused_client)
    thread.start()
    try:
        wait_for(lambda: any(w[0] == "paused" for w in read_lines(log)), "the hook to pause", 2)
        t0 = time.monotonic()
        assert_serves(tp, certs, 1)  # same worker, other port: not held up by the paused hook
        assert time.monotonic() - t0 < 0.5
        # while paused, the client's bytes wait in the socket: the worker must not spin on it
        before = sum(cpu.cpu_times()[:2])
        time.sleep(0.4)
        assert sum(cpu.cpu_times()[:2]) - before < 0.15
        assert "handshake" not in result and "error" not in result, result
    finally:
        thread.join(5)
    assert "error" not in result, result
    assert 0.9 <= result["handshake"] < 3.0, result
    assert result["response"].endswith(b"origin saw /"), result
    assert [w[0] for w in read_lines(log)][:2] == ["paused", "reenable"]


@pytest.mark.parametrize("hook", ["VCONN_START", "SSL_CLIENT_HELLO", "SSL_CERT"])
def test_client_closing_while_hook_paused(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, hook: str
) -> None:
    rec, stall = tmp_path / "hooks.log", tmp_path / "stall.log"
    tp = start_hook_proxy(
        tsproxy_factory,
        certs,
        origin,
        [f"{{plugins}}/record_hooks.py {rec}", f"{{plugins}}/stall_hook.py {hook} port={{p0}} 1.0 {stall}"],
    )
    worker = tp.worker_pids()
    client = SansIOClient(client_context(certs), "exact.test")
    with socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5) as raw:
        port = raw.getsockname()[1]
        raw.sendall(client.client_hello)
        wait_for(
            lambda: any(w[:2] == ["paused", str(port)] for w in read_lines(stall)), "the hook to pause", 2
        )
    # the client is gone while the hook is paused; the timer re-enables later (twice, even)
    wait_for(lambda: any(w[:2] == ["reenable", str(port)] for w in read_lines(stall)), "the re-enable", 3)
    assert wait_hooks(rec, port)[-1] == "VCONN_CLOSE"
    assert hooks_of(rec, port).count("VCONN_CLOSE") == 1
    assert [w[0] for w in read_lines(stall) if w[1] == str(port)].count("close") == 1
    assert tp.worker_pids() == worker
    assert_serves(tp, certs, 1)
    assert tp.metric("total_success_handshake_count_in") == 1


@pytest.mark.parametrize("reenable_after", [-1.0, 2.5])
def test_hook_that_never_reenables_is_ended_by_handshake_timeout(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, reenable_after: float
) -> None:
    rec, stall = tmp_path / "hooks.log", tmp_path / "stall.log"
    tp = start_hook_proxy(
        tsproxy_factory,
        certs,
        origin,
        [
            f"{{plugins}}/record_hooks.py {rec}",
            f"{{plugins}}/stall_hook.py SSL_CLIENT_HELLO sni=exact.test {reenable_after} {stall}",
        ],
        records={"proxy.config.ssl.handshake_timeout_in": 1},
    )
    raw = socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5)
    port = raw.getsockname()[1]
    t0 = time.monotonic()
    with raw, pytest.raises((ssl.SSLError, ConnectionError)):
        client_context(certs).wrap_socket(raw, server_hostname="exact.test")
    assert time.monotonic() - t0 < 4.0
    assert wait_hooks(rec, port) == ["VCONN_START", "SSL_CLIENT_HELLO", "VCONN_CLOSE"]
    assert tp.wait_metric("ssl_handshake_timeout_in", 1) == 1
    assert [w[0] for w in read_lines(stall)] == ["paused", "close"]
    if reenable_after > 0:  # the timer fires on a closed connection: harmless
        wait_for(lambda: len(read_lines(stall)) == 3, "the late re-enable", 3)
        assert read_lines(stall)[2][:3] == ["reenable", str(port), "closed=True"]
        assert hooks_of(rec, port).count("VCONN_CLOSE") == 1
    assert_serves(tp, certs, 0, sni="default.test")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_hook_actions_raise_error_swap_tunnel(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, tls_backend: TLSBackend, version: str
) -> None:
    rec = tmp_path / "hooks.log"
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert=(
            "ssl_cert_name=certs/exact.pem\nssl_cert_name=certs/wild.pem\n"
            "dest_ip=* ssl_cert_name=certs/default.pem\n"
        ),
        origin=origin,
        plugins=[
            f"{{plugins}}/record_hooks.py {rec}",
            "{plugins}/sni_actions.py a.wild.test=raise b.wild.test=error c.wild.test=swap:exact.test"
            " d.wild.test=tunnel:127.0.0.1:{backend}",
        ],
        fmt_extra={"backend": tls_backend.port},
    )
    worker = tp.worker_pids()
    ctx = client_context(certs, version)

    def failed_port(sni: str) -> int:
        raw = socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5)
        port = raw.getsockname()[1]
        with raw, pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw, server_hostname=sni)
        return port

    # a raising hook fails only that connection (and CLOSE still runs once)
    port = failed_port("a.wild.test")
    assert wait_hooks(rec, port) == ["VCONN_START", "SSL_CLIENT_HELLO", "VCONN_CLOSE"]
    assert_serves(tp, certs, sni="x.wild.test")
    # reenable(error=True) in SSL_CERT: the client sees a failed handshake
    port = failed_port("b.wild.test")
    assert wait_hooks(rec, port) == HOOK_ORDER
    # a CERT hook that swaps the context: exact.test's certificate for c.wild.test
    assert served_name(certs, tp.ports[0], "c.wild.test", version=version) == "exact.test"
    # a hook that tunnels: the client's handshake is the backend's
    with tls_connect(ctx, tp.ports[0], "d.wild.test") as s:
        assert peer_dns_names(s) == ["backend.test"]
        s.sendall(b"ping\n")
        assert s.recv(1024) == b"backend saw ping\n"
    assert tp.worker_pids() == worker
    assert_serves(tp, certs)
    assert tp.wait_metric("total_success_handshake_count_in", 3) == 3


# --------------------------------------------------------------------------------------------
# ClientHello edge cases, versions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        b"\x16\x03\x01\x00\x04\x63\x00\x00\x00",  # a handshake record that is not a ClientHello
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff",  # a ClientHello of 1 byte, which cannot be
        b"\x16\xff\xff\xff\xff" + b"\x00" * 64,  # a record too long to be TLS
        b"\x16" + os.urandom(300),
    ],
)
def test_malformed_client_hello_is_closed_and_counted(
    tsproxy_factory: Factory, certs: Certs, origin: int, junk: bytes
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    worker = tp.worker_pids()
    with socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5) as s:
        s.sendall(junk)
        assert wait_closed(s, 3.0) < 2.0  # closed at once, not by the (30 s) handshake timeout
    assert tp.wait_metric("ssl_error_ssl", 1) == 1
    # OpenSSL judges what the pre-parser does not read: junk record versions are its
    # "wrong version number" (user_agent_wrong_version), the rest user_agent_other_errors
    assert tp.metric("user_agent_other_errors") + tp.metric("user_agent_wrong_version") == 1
    assert tp.metric("total_success_handshake_count_in") == 0
    assert tp.worker_pids() == worker
    assert_serves(tp, certs)


@pytest.mark.parametrize("records", [1, 3])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_hello_split_across_segments(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str, records: int
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    client = SansIOClient(client_context(certs, version), "exact.test")
    hello = client.client_hello
    assert len(hello) > 150 and hello[0] == 0x16 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    if records > 1:  # the same handshake message fragmented over several TLS records
        body, size = hello[5:], -(-(len(hello) - 5) // records)
        frags = [body[i : i + size] for i in range(0, len(body), size)]
        hello = b"".join(hello[:3] + len(f).to_bytes(2, "big") + f for f in frags)
    with socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # byte by byte through the record header and the first bytes, then in small pieces
        pieces = [hello[i : i + 1] for i in range(12)]
        pieces += [hello[i : i + 37] for i in range(12, len(hello), 37)]
        for piece in pieces:
            s.sendall(piece)
            time.sleep(0.005)
        client.finish_handshake(s)
        assert client.obj.version() == f"TLSv{version}"
        response = client.request(s, GET_CLOSE)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"origin saw /"), response


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_refused_by_default(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: ssl.TLSVersion
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    ctx = client_context(certs)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = version
    with pytest.raises(ssl.SSLError) as info:
        tls_connect(ctx, tp.ports[0], "exact.test").close()
    assert "VERSION" in info.value.reason, info.value  # the server answered protocol_version
    assert tp.wait_metric("user_agent_wrong_version", 1) == 1
    assert tp.metric("total_success_handshake_count_in") == 0
    assert_serves(tp, certs)


# --------------------------------------------------------------------------------------------
# client certificates
# --------------------------------------------------------------------------------------------


def mtls_proxy(factory: Factory, certs: Certs, origin: int, level: int) -> TLSProxy:
    return start_proxy(
        factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={
            "proxy.config.ssl.client.certification_level": level,
            "proxy.config.ssl.CA.cert.filename": "certs/ca.pem",
        },
    )


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_certificate_required(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str
) -> None:
    tp = mtls_proxy(tsproxy_factory, certs, origin, 2)
    port = tp.ports[0]
    missing = "SSLV3_ALERT_HANDSHAKE_FAILURE" if version == "1.2" else "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert failure_reason(client_context(certs, version), port, "exact.test") == missing
    assert tp.wait_metric("user_agent_bad_cert", 1) == 1
    reason = failure_reason(client_context(certs, version, cert=certs.rogue_client), port, "exact.test")
    assert reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert tp.wait_metric("user_agent_cert_verify_failed", 1) == 1
    with tls_connect(client_context(certs, version, cert=certs.client), port, "exact.test") as s:
        assert http_get(s).endswith(b"origin saw /")
    assert tp.wait_metric("total_success_handshake_count_in", 1) == 1
    assert tp.metric("ssl_error_ssl") == 2


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_client_certificate_requested(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str
) -> None:
    tp = mtls_proxy(tsproxy_factory, certs, origin, 1)
    port = tp.ports[0]
    for cert in (None, certs.client):  # none, or a good one: both served
        with tls_connect(client_context(certs, version, cert=cert), port, "exact.test") as s:
            assert http_get(s).endswith(b"origin saw /")
    # one that does not verify is refused
    reason = failure_reason(client_context(certs, version, cert=certs.rogue_client), port, "exact.test")
    assert reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert tp.wait_metric("user_agent_cert_verify_failed", 1) == 1
    assert tp.metric("total_success_handshake_count_in") == 2


# --------------------------------------------------------------------------------------------
# counters, debug log, curl
# --------------------------------------------------------------------------------------------


@needs_curl
def test_curl_counters_and_debug_log(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.diags.debug.enabled": 1, "proxy.config.diags.debug.tags": "ssl"},
    )
    port = tp.ports[0]
    ports = []
    for flag in ("--tlsv1.2 --tls-max 1.2", "--tlsv1.3"):
        base = [
            "curl",
            "-sS",
            *flag.split(),
            "-w",
            "\\n%{local_port}",
            "--resolve",
            f"exact.test:{port}:127.0.0.1",
            "-H",
            "Host: origin.test",
            f"https://exact.test:{port}/curl",
        ]
        # a CA that did not sign our certificate: curl refuses it with an unknown_ca alert
        out = subprocess.run(
            [*base, "--cacert", str(certs.rogue_ca_file)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert out.returncode == 60, out
        out = subprocess.run(
            [*base, "--cacert", str(certs.ca_file)], capture_output=True, text=True, timeout=10, check=False
        )
        assert out.returncode == 0, out
        body, local_port = out.stdout.rsplit("\n", 1)
        assert body == "origin saw /curl"
        ports.append(local_port)
    result = tp.proxy.ctl(
        "metric",
        "get",
        *(
            SSL_PREFIX + n
            for n in (
                "total_attempts_handshake_count_in",
                "total_success_handshake_count_in",
                "ssl_total_tlsv12",
                "ssl_total_tlsv13",
                "user_agent_unknown_ca",
            )
        ),
    )
    assert result.returncode == 0, result.stderr
    values = dict(line.split() for line in result.stdout.splitlines())
    assert values == {
        SSL_PREFIX + "total_attempts_handshake_count_in": "4",
        SSL_PREFIX + "total_success_handshake_count_in": "2",
        SSL_PREFIX + "ssl_total_tlsv12": "1",
        SSL_PREFIX + "ssl_total_tlsv13": "1",
        SSL_PREFIX + "user_agent_unknown_ca": "2",  # the alert curl sent when it did not trust us
    }, result.stdout
    match = tp.proxy.ctl("metric", "match", r"proxy\.process\.ssl\.total_.*handshake.*_in")
    assert match.returncode == 0 and SSL_PREFIX + "total_handshake_time" not in match.stdout
    assert (SSL_PREFIX + "total_success_handshake_count_in 2") in match.stdout.splitlines()
    log = tp.config_dir / "log" / "tsproxy.log"
    text = wait_for(lambda: log.exists() and log.read_text(), "the log file", 5)
    for local_port in ports:
        lines = [line for line in text.splitlines() if f"'127.0.0.1', {local_port})" in line]
        assert any("<ssl> ClientHello from" in line and "sni=exact.test" in line for line in lines), lines
        assert any("<ssl> SSL server handshake completed" in line for line in lines), lines


def test_alpn_offer_restricted_by_port_proto(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        ports=["{p0}:ssl:proto=http/1.0:ip-in=127.0.0.1", "{p1}:ssl:ip-in=127.0.0.1"],
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    offer = ["http/1.1", "http/1.0"]
    with tls_connect(client_context(certs, alpn=offer), tp.ports[0], "exact.test") as s:
        assert s.selected_alpn_protocol() == "http/1.0"
    with tls_connect(client_context(certs, alpn=offer), tp.ports[1], "exact.test") as s:
        assert s.selected_alpn_protocol() == "http/1.1"
    # no protocol in common: RFC 7301's no_application_protocol alert (issue 15)
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        tls_connect(client_context(certs, alpn=["http/1.1"]), tp.ports[0], "exact.test").close()


def _negotiated_group(certs: Certs, port: int, offer: bytes) -> str | None:
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
        conn.set_tlsext_host_name(b"exact.test")
        conn.set_connect_state()
        conn.do_handshake()
        group = conn.get_group_name()
        conn.shutdown()
    return group


def test_key_exchange_groups_from_records(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    """proxy.config.ssl.server.groups_list (ATS): the groups the proxy agrees to, in its order;
    a bad list stops start-up naming the file, line and record."""
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.server.groups_list": "P-384:X25519"},
    )
    port = tp.ports[0]
    # A client that prefers the post-quantum hybrid is held to the configured list (a hello
    # retry moves it to P-384, the proxy's first choice it also offers).
    assert _negotiated_group(certs, port, b"X25519MLKEM768:P-384") == "secp384r1"
    assert _negotiated_group(certs, port, b"X25519") == "x25519"
    p256_only = client_context(certs, "1.3")
    p256_only.set_ecdh_curve("prime256v1")
    assert failure_reason(p256_only, port, "exact.test") is not None
    with pytest.raises(AssertionError, match=r"records.config:\d+: proxy.config.ssl.server.groups_list: "):
        start_proxy(
            tsproxy_factory,
            certs,
            multicert="ssl_cert_name=certs/exact.pem\n",
            records={"proxy.config.ssl.server.groups_list": "X25519:no-such-group"},
        )


def test_tls_versions_and_ciphers_from_records(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={
            "proxy.config.ssl.TLSv1_3": 0,
            "proxy.config.ssl.server.cipher_suite": "ECDHE-ECDSA-CHACHA20-POLY1305",
        },
    )
    with tls_connect(client_context(certs), tp.ports[0], "exact.test") as s:
        assert s.version() == "TLSv1.2"
        assert s.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
        assert http_get(s).endswith(b"origin saw /")
    assert (
        failure_reason(client_context(certs, "1.3"), tp.ports[0], "exact.test")
        == "TLSV1_ALERT_PROTOCOL_VERSION"
    )
    tp13 = start_proxy(
        tsproxy_factory,
        certs,
        multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.server.TLSv1_3.cipher_suites": "TLS_CHACHA20_POLY1305_SHA256"},
    )
    with tls_connect(client_context(certs, "1.3"), tp13.ports[0], "exact.test") as s:
        assert s.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"
