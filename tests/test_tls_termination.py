"""Issue 3, TLS termination, against the real ``tsproxy start``: certificate selection, handshake
timeout, tr-pass and action=tunnel, ALPN, session resumption across workers, the handshake hooks
(tests/plugins/), malformed and split ClientHellos, TLS versions, client certificates, counters
and debug logging. Clients are Python ``ssl``, ``openssl s_client`` and ``curl``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import ProxyProcess, free_port

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
    files = {f"certs/{name}.pem": leaf.private_key_and_cert_chain_pem.bytes() for name, leaf in leaves.items()}
    files["certs/ca.pem"] = ca.cert_pem.bytes()
    d = tmp_path_factory.mktemp("ca")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return Certs(ca, d / "ca.pem", files, ca.issue_cert("client.test"), rogue_ca.issue_cert("client.test"))


def client_context(
    certs: Certs, version: str | None = None, *, alpn: list[str] | None = None, cert: trustme.LeafCert | None = None
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


def served_name(certs: Certs, port: int, sni: str | None, host: str = "127.0.0.1", version: str = "1.3") -> str:
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


def handshake_fails(ctx: ssl.SSLContext, port: int, sni: str | None, timeout: float = 5.0) -> bool:
    """True when the handshake (or, for TLS 1.3 post-handshake failures, the first exchange) fails."""
    try:
        with tls_connect(ctx, port, sni, timeout=timeout) as s:
            return not http_get(s).startswith(b"HTTP/1.1 200")
    except (ssl.SSLError, ConnectionError):
        return True


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


class TLSBackend:
    """A TLS server (the blind-tunnel destination): answers one line with ``backend saw LINE``."""

    def __init__(self, certs: Certs) -> None:
        leaf = certs.ca.issue_cert("backend.test")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(self.ctx)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with contextlib.suppress(OSError), self.ctx.wrap_socket(conn, server_side=True) as s:
            self.handshakes += 1
            line = s.recv(1024)
            s.sendall(b"backend saw " + line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tls_backend(certs: Certs) -> Iterator[TLSBackend]:
    backend = TLSBackend(certs)
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
    ports: list[str],
    multicert: str,
    origin: int | None = None,
    records: dict[str, Any] | None = None,
    plugins: list[str] = (),  # type: ignore[assignment]
    fmt_extra: dict[str, Any] | None = None,
) -> TLSProxy:
    """Start tsproxy with the test certificates in ``certs/``.

    ``ports`` are server_ports descriptors with ``{p0}``, ``{p1}``... for ports allocated here;
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


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


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
        ports=["{p0}:ssl:ip-in=127.0.0.1"],
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


def s_client(port: int, *args: str, stdin: bytes = b"", timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
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
        ports=["{p0}:ssl:ip-in=127.0.0.1"],
        multicert="ssl_cert_name=certs/dual-ec.pem,certs/dual-rsa.pem\n",
    )
    out = s_client(
        tp.ports[0], "-servername", "dual.test", "-CAfile", str(certs.ca_file), "-verify_hostname", "dual.test",
        "-verify_return_error", S_CLIENT_VERSION[version], *capability,
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
        ports=["{p0}:ssl:ip-in=127.0.0.1"],
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
    wait_for(lambda: tp.metric(open_metric) == base + 2, 2, "two more open connections")
    # meanwhile, a normal client is served at once
    assert_serves(tp, certs)
    for sock in (silent, partial):
        with sock:
            elapsed = wait_closed(sock, 5.0)
            assert elapsed < 4.0
    assert tp.wait_metric("ssl_handshake_timeout_in", 2) == 2
    assert tp.metric("total_success_handshake_count_in") == 2
    wait_for(lambda: tp.metric(open_metric) == base, 2, "the timed-out connections to be gone")
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
    [(["http/1.1"], "http/1.1"), (["h2", "http/1.1"], "http/1.1"), (["h2"], None), (None, None)],
)
def test_alpn(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str, offer: list[str] | None, expected: str | None
) -> None:
    tp = start_proxy(
        tsproxy_factory, certs, ports=["{p0}:ssl:ip-in=127.0.0.1"], multicert="ssl_cert_name=certs/exact.pem\n",
        origin=origin,
    )
    with tls_connect(client_context(certs, version, alpn=offer), tp.ports[0], "exact.test") as s:
        assert s.selected_alpn_protocol() == expected
        response = http_get(s)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"origin saw /"), response
    assert tp.metric("ssl_alpn_no_endpoint") == 0
