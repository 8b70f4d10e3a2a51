"""Plugin-served ALPN protocols (``api.register_protocol``) and ALPN offers edited by plugins,
against the real proxy with Python ``ssl`` clients."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

PLUGIN = Path(__file__).parent / "plugins" / "echo_protocol.py"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def start(factory: Callable[..., Any], ca: trustme.CA, tmp_path: Path, *plugin_args: str) -> Any:
    cert = ca.issue_cert("echo.test")
    etc = tmp_path / "etc"
    etc.mkdir()
    cert.private_key_and_cert_chain_pem.write_to_path(str(etc / "server.pem"))
    (etc / "server.pem").chmod(0o600)
    return factory(
        name="etc",
        records={"proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1"},
        files={
            "ssl_multicert.config": "dest_ip=* ssl_cert_name=server.pem\n",
            "plugin.config": f"{PLUGIN} {' '.join(plugin_args)}\n",
        },
    )


def connect(proxy: Any, ca: trustme.CA, alpn: list[str]) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", proxy.port()), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="echo.test")


def recv_until(sock: ssl.SSLSocket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_plugin_serves_its_own_alpn_protocol(
    tsproxy_factory: Callable[..., Any], ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = start(tsproxy_factory, ca, tmp_path)
    with connect(proxy, ca, ["echo/1"]) as tls:
        assert tls.selected_alpn_protocol() == "echo/1"
        assert recv_until(tls, b"\n") == b"hi echo/1\n"
        tls.sendall(b"hello\n")
        assert recv_until(tls, b"\n") == b"HELLO\n"
        tls.sendall(b"again\n")
        assert recv_until(tls, b"\n") == b"AGAIN\n"
        tls.sendall(b"BYE\n")
        assert recv_until(tls, b"bye\n") == b"bye\n"
        assert tls.recv(10) == b""  # the plugin closed it
    # The server's preference puts the plugin protocol first...
    with connect(proxy, ca, ["http/1.1", "echo/1"]) as tls:
        assert tls.selected_alpn_protocol() == "echo/1"
        assert recv_until(tls, b"\n") == b"hi echo/1\n"
    # The VCONN_CLOSE hook saw what was negotiated.
    assert "closed: alpn=b'echo/1' version=TLSv1.3" in proxy.output()
    # ...and HTTP on the same port is untouched.
    with connect(proxy, ca, ["http/1.1"]) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        tls.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
        assert recv_until(tls, b"\n").startswith(b"HTTP/1.1 404")


def test_a_protocol_enabled_without_an_endpoint_fails_cleanly(
    tsproxy_factory: Callable[..., Any], ca: trustme.CA, tmp_path: Path
) -> None:
    """ATS PR 7981: a negotiated protocol nothing serves must fail the connection, counted, and
    never crash the worker."""
    proxy = start(tsproxy_factory, ca, tmp_path, "enable-unserved")
    pids = proxy.worker_pids()
    with connect(proxy, ca, ["spdy/3.1"]) as tls:
        assert tls.selected_alpn_protocol() == "spdy/3.1"
        with pytest.raises((ConnectionError, ssl.SSLError)):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            if tls.recv(10) == b"":
                raise ConnectionResetError("closed by the proxy")
    out = proxy.ctl("metric", "get", "proxy.process.ssl.ssl_alpn_no_endpoint")
    assert out.stdout.split() == ["proxy.process.ssl.ssl_alpn_no_endpoint", "1"]
    with connect(proxy, ca, ["echo/1"]) as tls:
        assert recv_until(tls, b"\n") == b"hi echo/1\n"
        tls.sendall(b"still up\n")
        assert recv_until(tls, b"\n") == b"STILL UP\n"
    assert proxy.worker_pids() == pids


def test_a_paused_hook_talks_to_a_service_without_blocking_the_loop(
    tsproxy_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """api.connect from a paused hook: the answer comes from a TCP service that replies after a
    delay, and meanwhile other clients on the same worker are served."""
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def service() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn:
            line = conn.makefile("rb").readline()
            if b"slow" in line:
                time.sleep(0.8)
            conn.sendall(b"allowed " + line)

    thread = threading.Thread(target=service, daemon=True)
    thread.start()
    plugin = Path(__file__).parent / "plugins" / "ask_policy.py"
    proxy = tsproxy_factory(files={"plugin.config": f"{plugin} 127.0.0.1 {port}\n"})
    try:
        results: dict[str, tuple[float, bytes]] = {}

        def get(path: str) -> None:
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x.test\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            results[path] = (time.monotonic() - t0, data)

        slow = threading.Thread(target=get, args=("/slow",))
        slow.start()
        time.sleep(0.2)
        get("/fast")  # while /slow's hook waits for the service
        slow.join(10)
        fast_time, fast = results["/fast"]
        slow_time, slow_reply = results["/slow"]
        assert fast.startswith(b"HTTP/1.1 200") and fast.endswith(b"allowed /fast\n"), fast
        assert slow_reply.startswith(b"HTTP/1.1 200") and slow_reply.endswith(b"allowed /slow\n"), slow_reply
        assert slow_time >= 0.8
        assert fast_time < 0.6, "the paused hook blocked another client"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    # An unreachable service is an ordinary failure the plugin can answer.
    closed_port = socket.create_server(("127.0.0.1", 0))
    dead = closed_port.getsockname()[1]
    closed_port.close()
    proxy2 = tsproxy_factory(files={"plugin.config": f"{plugin} 127.0.0.1 {dead}\n"})
    with socket.create_connection(("127.0.0.1", proxy2.port()), timeout=5) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503") and b"policy unreachable" in data, data
