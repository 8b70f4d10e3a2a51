"""PROXY protocol on ``pp`` ports, against the real tsproxy: raw v1/v2 headers, curl's
``--haproxy-protocol`` and haproxy's ``send-proxy`` / ``send-proxy-v2`` in front.

The clients bind other loopback addresses (127.0.0.5, ...) so that the address a header carries
differs from the peer tsproxy sees; every check is about what a user notices: the origin's
X-Forwarded-For, the access log line, what a plugin is told, and connections being closed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import free_port, wait_for
from origin import OriginServer

from iocore.net.proxy_protocol import PP2_SIGNATURE

PLUGINS = Path(__file__).parent / "plugins"
HOST = "pp.test"
Factory = Callable[..., Any]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


def start(
    factory: Factory,
    tmp_path: Path,
    ca: trustme.CA,
    origin: OriginServer,
    records: dict[str, Any] | None = None,
) -> Any:
    """Ports: 0 plain pp, 1 TLS pp, 2 plain without pp. Access log and client_addr plugin on."""
    leaf = ca.issue_cert(HOST)
    files: dict[str, str | bytes] = {
        "leaf.pem": b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes(),
        "ssl_multicert.config": "dest_ip=* ssl_cert_name=leaf.pem\n",
        "remap.config": (
            f"map http://{HOST}/ http://{origin.authority}/\nmap https://{HOST}/ http://{origin.authority}/\n"
        ),
        "plugin.config": (
            f"plugins.access_log {tmp_path / 'access.log'}\n"
            f"{PLUGINS / 'client_addr.py'} {tmp_path / 'hooks.log'}\n"
        ),
    }
    recs: dict[str, Any] = {
        "proxy.config.http.server_ports": (
            "{0}:pp:ip-in=127.0.0.1 {1}:pp:ssl:ip-in=127.0.0.1 {2}:ip-in=127.0.0.1"
        ),
        "proxy.config.ssl.server.cert.path": ".",
        "proxy.config.ssl.server.private_key.path": ".",
    }
    recs.update(records or {})
    return factory(records=recs, files=files)


def _metric(proxy: Any, name: str) -> int:
    out = proxy.ctl("metric", "get", name)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def v1_header(s: socket.socket, client: tuple[str, int] = ("203.0.113.7", 51000)) -> bytes:
    dst = s.getpeername()
    return f"PROXY TCP4 {client[0]} {dst[0]} {client[1]} {dst[1]}\r\n".encode()


def v2_header(s: socket.socket, client: tuple[str, int] = ("2001:db8::7", 51000)) -> bytes:
    dst = s.getpeername()
    src = ipaddress.ip_address(client[0])
    if src.version == 6:
        fam, addrs = 0x21, src.packed + ipaddress.IPv6Address("::ffff:" + dst[0]).packed
    else:
        fam, addrs = 0x11, src.packed + socket.inet_aton(dst[0])
    tlv = b"\x02" + struct.pack("!H", len(HOST)) + HOST.encode()  # PP2_TYPE_AUTHORITY
    body = addrs + struct.pack("!HH", client[1], dst[1]) + tlv
    return PP2_SIGNATURE + bytes((0x21, fam)) + struct.pack("!H", len(body)) + body


def echo_request(path: str = "/echo") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def echoed_headers(response: bytes) -> dict[str, str]:
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    return {k.lower(): v for k, v in body["headers"]}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def exchange(
    port: int,
    header: Callable[[socket.socket], bytes] | None,
    tls: ssl.SSLContext | None,
    source: str = "127.0.0.1",
) -> bytes:
    """Connect, send the PROXY header (if any), then a request in the clear or over TLS."""
    with connect(port, source) as raw:
        if header is not None:
            raw.sendall(header(raw))
        if tls is None:
            raw.sendall(echo_request())
            return read_all(raw)
        with tls.wrap_socket(raw, server_hostname=HOST) as s:
            s.sendall(echo_request())
            return read_all(s)


def closed_without_answer(s: socket.socket) -> bool:
    """True when the proxy closes the connection without sending a byte."""
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


# -- the carried address becomes the client address ------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_carried_address_is_the_client_everywhere(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer, version: int, tls: bool
) -> None:
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    client = ("203.0.113.7", 51000) if version == 1 else ("2001:db8::7", 51000)
    make = (lambda s: v1_header(s, client)) if version == 1 else (lambda s: v2_header(s, client))
    port = proxy.port(1 if tls else 0)
    response = exchange(port, make, client_context(ca) if tls else None, source="127.0.0.5")
    assert echoed_headers(response)["x-forwarded-for"] == client[0]
    # The access log plugin (txn.client_address) logs the client, not the balancer.
    line = wait_for(
        lambda: (tmp_path / "access.log").exists() and (tmp_path / "access.log").read_text(), "log"
    )
    assert line.split()[0] == client[0]
    # Plugins: VCONN_START (TLS) and READ_REQUEST_HDR see the client; the header names the peer.
    hooks = (tmp_path / "hooks.log").read_text().splitlines()
    expected = [f"READ_REQUEST_HDR {client[0]} {client[1]} {version} 127.0.0.5"]
    if tls:
        expected.insert(0, f"VCONN_START {client[0]} {client[1]} {version} 127.0.0.5")
    assert hooks == expected
    assert _metric(proxy, f"proxy.process.net.proxy_protocol_v{version}_in") == 1


def test_v1_unknown_and_v2_local_keep_the_peer_address(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    unknown = exchange(proxy.port(0), lambda s: b"PROXY UNKNOWN\r\n", None, source="127.0.0.6")
    assert echoed_headers(unknown)["x-forwarded-for"] == "127.0.0.6"
    local = PP2_SIGNATURE + b"\x20\x00\x00\x00"  # v2 LOCAL: a health check from the balancer
    health = exchange(proxy.port(1), lambda s: local, client_context(ca), source="127.0.0.6")
    assert echoed_headers(health)["x-forwarded-for"] == "127.0.0.6"


def test_header_split_byte_by_byte_then_tls(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    """A header that arrives a byte per segment loses nothing, neither of itself nor of the
    ClientHello that follows it in the same stream."""
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    with connect(proxy.port(1)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in v2_header(raw, ("198.51.100.9", 4000)):
            raw.send(bytes((b,)))
            time.sleep(0.002)
        with client_context(ca).wrap_socket(raw, server_hostname=HOST) as s:
            s.sendall(echo_request())
            assert echoed_headers(read_all(s))["x-forwarded-for"] == "198.51.100.9"


def test_non_pp_port_is_untouched(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    assert echoed_headers(exchange(proxy.port(2), None, None, "127.0.0.8"))["x-forwarded-for"] == "127.0.0.8"
    # A PROXY line there is no header but a bad request line.
    assert exchange(proxy.port(2), v1_header, None).startswith(b"HTTP/1.1 400")


def test_blind_pp_port_tunnels_what_follows_the_header(tsproxy_factory: Factory) -> None:
    """On ``pp:blind`` the header is consumed and only the bytes after it reach the tunnel."""
    seen: list[bytes] = []
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen(1)
        backend.settimeout(10)
        proxy = tsproxy_factory(
            records={
                "proxy.config.http.server_ports": "{0}:pp:blind:ip-in=127.0.0.1",
                "proxy.config.tunnel.route": f"127.0.0.1:{backend.getsockname()[1]}",
            }
        )
        with connect(proxy.port(0)) as client:
            client.sendall(v2_header(client) + b"not http at all\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(10)
                while sum(map(len, seen)) < len(b"not http at all\n"):
                    seen.append(conn.recv(4096))
                conn.sendall(b"pong")
            assert client.recv(4) == b"pong"
    assert b"".join(seen) == b"not http at all\n"
    assert _metric(proxy, "proxy.process.net.proxy_protocol_v2_in") == 1


# -- refused connections -------------------------------------------------------------------------


def test_connections_without_a_valid_header_are_closed_and_counted(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    # Plain HTTP straight to the pp port: closed, no response.
    with connect(proxy.port(0)) as s:
        s.sendall(echo_request())
        assert closed_without_answer(s)
    # A TLS client with no header: its ClientHello is not a PROXY header; the handshake fails.
    with connect(proxy.port(1)) as raw, pytest.raises((ssl.SSLError, OSError)):
        client_context(ca).wrap_socket(raw, server_hostname=HOST)
    # A malformed header (address out of range), then EOF half-way through a header.
    with connect(proxy.port(0)) as s:
        s.sendall(b"PROXY TCP4 203.0.113.300 127.0.0.1 1 2\r\n" + echo_request())
        assert closed_without_answer(s)
    with connect(proxy.port(1)) as s:
        s.sendall(PP2_SIGNATURE)
        s.shutdown(socket.SHUT_WR)
        assert closed_without_answer(s)
    assert wait_for(lambda: _metric(proxy, "proxy.process.net.proxy_protocol_bad_header_in") == 4, "count")
    assert _metric(proxy, "proxy.process.http.incoming_requests") == 0
    assert (tmp_path / "hooks.log").exists() is False  # no plugin ever saw these connections
    # The worker is fine: a good connection right after is served.
    assert echoed_headers(exchange(proxy.port(0), v1_header, None))["x-forwarded-for"] == "203.0.113.7"


def test_peers_outside_the_allowlist_are_closed_at_accept(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(
        tsproxy_factory,
        tmp_path,
        ca,
        origin,
        records={"proxy.config.http.proxy_protocol_allowlist": "127.0.0.2-127.0.0.9, 10.0.0.0/8"},
    )
    for port in (proxy.port(0), proxy.port(1)):
        with connect(port, source="127.0.0.1") as s:
            s.sendall(v1_header(s) + echo_request())
            assert closed_without_answer(s)
    assert _metric(proxy, "proxy.process.net.proxy_protocol_untrusted_in") == 2
    ok = exchange(proxy.port(1), v1_header, client_context(ca), source="127.0.0.5")
    assert echoed_headers(ok)["x-forwarded-for"] == "203.0.113.7"
    # The allowlist is reloadable: now 127.0.0.1 is trusted and 127.0.0.5 is not.
    records = proxy.config_dir / "records.config"
    text = records.read_text().replace("127.0.0.2-127.0.0.9, 10.0.0.0/8", "127.0.0.1")
    records.write_text(text)
    assert proxy.ctl("reload").returncode == 0
    assert echoed_headers(exchange(proxy.port(0), v1_header, None))["x-forwarded-for"] == "203.0.113.7"
    with connect(proxy.port(0), source="127.0.0.5") as s:
        s.sendall(v1_header(s) + echo_request())
        assert closed_without_answer(s)
    assert _metric(proxy, "proxy.process.net.proxy_protocol_untrusted_in") == 3


def test_header_that_does_not_arrive_in_time_is_closed(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(
        tsproxy_factory, tmp_path, ca, origin, records={"proxy.config.http.accept_no_activity_timeout": 1}
    )
    with connect(proxy.port(0)) as silent, connect(proxy.port(1)) as partial:
        partial.sendall(b"PROXY TCP4 203.0.")
        # Both are closed by the proxy (the socket timeout of 10 s would raise first otherwise).
        assert closed_without_answer(silent)
        assert closed_without_answer(partial)
    assert _metric(proxy, "proxy.process.net.proxy_protocol_timeout_in") == 2
    assert _metric(proxy, "proxy.process.net.connections_currently_open") == 0


def test_graceful_stop_closes_connections_still_waiting_for_their_header(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    # Nothing is in flight on them: like idle keep-alive connections, they do not hold the
    # stop for shutdown_timeout (60 s here, longer than the stop command waits).
    proxy = start(tsproxy_factory, tmp_path, ca, origin, records={"proxy.config.stop.shutdown_timeout": 60})
    with connect(proxy.port(0)) as waiting, connect(proxy.port(1)) as partial:
        partial.sendall(b"PROXY TCP4 ")
        wait_for(lambda: _metric(proxy, "proxy.process.net.connections_currently_open") == 2, "both accepted")
        result = proxy.ctl("stop", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert closed_without_answer(waiting) and closed_without_answer(partial)


# -- real senders: curl and haproxy ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_curl_haproxy_protocol(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer, tls: bool
) -> None:
    proxy = start(tsproxy_factory, tmp_path, ca, origin)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    scheme, port = ("https", proxy.port(1)) if tls else ("http", proxy.port(0))
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--haproxy-protocol",
            "--interface",
            "127.0.0.9",
            "-H",
            f"Host: {HOST}",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"{HOST}:{port}:127.0.0.1",
            f"{scheme}://{HOST}:{port}/echo",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    headers = {k.lower(): v for k, v in json.loads(out.stdout)["headers"]}
    # curl's v1 header carries its own end of the connection: 127.0.0.9, the peer too, but
    # the counter shows the header was read and used.
    assert headers["x-forwarded-for"] == "127.0.0.9"
    assert _metric(proxy, "proxy.process.net.proxy_protocol_v1_in") == 1


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@contextlib.contextmanager
def haproxy_in_front(tmp_path: Path, targets: dict[str, int]) -> Iterator[dict[str, int]]:
    """haproxy in TCP mode: one frontend per ``send-proxy`` / ``send-proxy-v2`` target port."""
    assert HAPROXY is not None
    fronts = {name: free_port() for name in targets}
    cfg = [
        "global",
        "  maxconn 64",
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 10s",
        "  timeout server 10s",
    ]
    for name, port in targets.items():
        option = name.split("@")[0]
        cfg += [
            f"listen {name.replace('@', '_')}",
            f"  bind 127.0.0.1:{fronts[name]}",
            f"  server ts 127.0.0.1:{port} {option} source 127.0.0.1",
        ]
    conf = tmp_path / "haproxy.cfg"
    conf.write_text("\n".join(cfg) + "\n")
    with (tmp_path / "haproxy.out").open("wb") as out:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        for port in fronts.values():
            wait_for(lambda p=port: _listening(p), f"haproxy on {port}")  # type: ignore[misc]
        yield fronts
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")
def test_haproxy_send_proxy_and_send_proxy_v2_in_front(
    tsproxy_factory: Factory, tmp_path: Path, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(
        tsproxy_factory,
        tmp_path,
        ca,
        origin,
        records={"proxy.config.http.proxy_protocol_allowlist": "127.0.0.1"},
    )
    targets = {
        "send-proxy@http": proxy.port(0),
        "send-proxy-v2@http": proxy.port(0),
        "send-proxy@https": proxy.port(1),
        "send-proxy-v2@https": proxy.port(1),
    }
    with haproxy_in_front(tmp_path, targets) as fronts:
        # _listening() probes made haproxy open (and drop) connections: count from here.
        base = {v: _metric(proxy, f"proxy.process.net.proxy_protocol_v{v}_in") for v in (1, 2)}
        for i, (name, front) in enumerate(fronts.items()):
            source = f"127.0.0.{20 + i}"
            tls = client_context(ca) if name.endswith("https") else None
            response = exchange(front, None, tls, source=source)
            assert echoed_headers(response)["x-forwarded-for"] == source, name
    log = tmp_path / "access.log"
    lines = wait_for(
        lambda: log.exists() and len(log.read_text().splitlines()) >= 4 and log.read_text().splitlines(),
        "log",
    )
    assert sorted(line.split()[0] for line in lines) == [f"127.0.0.{20 + i}" for i in range(4)]
    assert {v: _metric(proxy, f"proxy.process.net.proxy_protocol_v{v}_in") - base[v] for v in (1, 2)} == {
        1: 2,
        2: 2,
    }
