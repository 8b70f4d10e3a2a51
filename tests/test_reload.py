"""Hot reload with the real processes (issue 6): certificates swapped by ``tsproxy reload`` reach
new handshakes on every worker, open connections keep theirs, a broken reload changes nothing,
and reloading under a handshake loop loses nothing."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
from conftest import http_origin, wait_for

BODY = b"hello from the origin\n" * 10


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    with http_origin(_Handler) as port:
        yield port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> str:
    """Issue a fresh cert for ``names`` into directory/server.pem + server.key; return its serial."""
    cert = ca.issue_cert(*names)
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    from cryptography import x509

    return str(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number)


def tls_files(origin_port: int) -> dict[str, str]:
    return {
        "ssl_multicert.config": "ssl_cert_name=server.pem ssl_key_name=server.key dest_ip=*\n",
        "remap.config": f"map https://a.test/ http://127.0.0.1:{origin_port}/\n",
    }


TLS_RECORDS = {"proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1"}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def served_serial(port: int, ctx: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="a.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return str(x509.load_der_x509_certificate(der).serial_number)


def start(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path, **records: Any
) -> tuple[Any, str]:
    etc = tmp_path / "etc"
    etc.mkdir()
    serial = write_cert(ca, etc, "a.test")
    proxy = tsproxy_factory(records={**TLS_RECORDS, **records}, files=tls_files(origin), name="etc")
    return proxy, serial


def test_reload_swaps_certificate_for_new_handshakes_only(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    proxy, old_serial = start(tsproxy_factory, ca, origin, tmp_path)
    ctx = client_context(ca)
    assert served_serial(proxy.port(), ctx) == old_serial

    # A connection opened before the reload keeps working afterwards.
    raw = socket.create_connection(("127.0.0.1", proxy.port()), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="a.test")
    before = tls.getpeercert(binary_form=True)

    new_serial = write_cert(ca, proxy.config_dir, "a.test")
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr + result.stdout

    deadline = time.monotonic() + 1.0 + 2.0  # issue: within 1 s; slack for a loaded CI box
    while served_serial(proxy.port(), ctx) != new_serial:
        assert time.monotonic() < deadline, "new certificate not served after reload"
        time.sleep(0.05)

    tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    reply = b""
    while BODY not in reply:
        chunk = tls.recv(65536)
        assert chunk, f"open connection dropped by reload: {reply!r}"
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert tls.getpeercert(binary_form=True) == before
    tls.close()


def test_replaced_tls_config_is_released_when_its_last_connection_closes(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    """ConfigProcessor in the worker: a TLS connection holds the snapshot it was accepted under;
    after a reload the old generation is released only once that connection closed (debug tag
    ssl_config), and a generation no connection holds is released at once."""
    proxy, _ = start(
        tsproxy_factory,
        ca,
        origin,
        tmp_path,
        **{"proxy.config.diags.debug.enabled": 1, "proxy.config.diags.debug.tags": "ssl_config"},
    )
    log = proxy.config_dir / "log" / "tsproxy.log"
    ctx = client_context(ca)
    raw = socket.create_connection(("127.0.0.1", proxy.port()), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="a.test")  # holds generation 1

    def released(generation: int) -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return f"TLS config generation {generation} released" in text

    write_cert(ca, proxy.config_dir, "a.test")
    assert proxy.ctl("reload").returncode == 0
    served_serial(proxy.port(), ctx)  # a new handshake on generation 2, closed again
    time.sleep(0.5)
    assert not released(1), "generation 1 released while a connection still holds it"

    tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := tls.recv(65536):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    tls.close()
    wait_for(lambda: released(1), "generation 1 released after its last connection closed")

    assert proxy.ctl("reload").returncode == 0  # nobody holds generation 2 now
    wait_for(lambda: released(2), "an unheld generation released at the reload")
    assert not released(3)


def test_bad_reload_keeps_old_config_and_says_where(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    proxy, serial = start(tsproxy_factory, ca, origin, tmp_path)
    ctx = client_context(ca)
    (proxy.config_dir / "ssl_multicert.config").write_text(
        "ssl_cert_name=server.pem ssl_key_name=server.key dest_ip=*\nssl_cert_name=missing.pem\n"
    )
    result = proxy.ctl("reload")
    assert result.returncode != 0
    assert "ssl_multicert.config:2:" in result.stderr + result.stdout
    assert served_serial(proxy.port(), ctx) == serial
    # A key that does not match its certificate is refused as well, naming the file.
    other = ca.issue_cert("a.test")
    other.private_key_pem.write_to_path(str(proxy.config_dir / "server.key"))
    (proxy.config_dir / "ssl_multicert.config").write_text(
        "ssl_cert_name=server.pem ssl_key_name=server.key dest_ip=*\n"
    )
    result = proxy.ctl("reload")
    assert result.returncode != 0
    assert "ssl_multicert.config:1:" in result.stderr + result.stdout
    assert served_serial(proxy.port(), ctx) == serial
    assert proxy.proc.poll() is None


def test_reload_under_handshake_loop_loses_nothing(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    proxy, _ = start(tsproxy_factory, ca, origin, tmp_path, **{"proxy.config.exec_thread.limit": 2})
    ctx = client_context(ca)
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def loop() -> None:
        while not done.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname="a.test") as tls,
                ):
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data.startswith(b"HTTP/1.1 200") or BODY not in data:
                        failures.append(repr(data[:80]))
                count[0] += 1
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            write_cert(ca, proxy.config_dir, "a.test")
            result = proxy.ctl("reload")
            assert result.returncode == 0, result.stderr
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert count[0] > 20
    assert failures == []


def worker_rss(proxy: Any) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in proxy.worker_pids())


def test_memory_does_not_grow_with_reloads(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    proxy, _ = start(tsproxy_factory, ca, origin, tmp_path)
    for _ in range(10):
        proxy.call("reload")
    warm = worker_rss(proxy)
    for _ in range(90):
        proxy.call("reload")
    grown = worker_rss(proxy) - warm
    print(f"worker RSS after 10 reloads {warm / 2**20:.1f} MiB, growth over 90 more: {grown / 2**20:.2f} MiB")
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 90 reloads"


def test_sighup_reloads(tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path) -> None:
    proxy, old = start(tsproxy_factory, ca, origin, tmp_path)
    ctx = client_context(ca)
    new = write_cert(ca, proxy.config_dir, "a.test")
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while served_serial(proxy.port(), ctx) != new:
        assert time.monotonic() < deadline, "SIGHUP did not reload the certificate"
        time.sleep(0.05)
    assert old != new


def test_metrics_sum_over_workers_and_survive_a_worker_kill(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path
) -> None:
    proxy, _ = start(tsproxy_factory, ca, origin, tmp_path, **{"proxy.config.exec_thread.limit": 2})
    ctx = client_context(ca)
    for _ in range(20):
        served_serial(proxy.port(), ctx)
    name = "proxy.process.ssl.total_success_handshake_count_in"

    def metric() -> int:
        out = proxy.ctl("metric", "get", name)
        assert out.returncode == 0, out.stderr
        key, value = out.stdout.split()
        assert key == name
        return int(value)

    assert metric() == 20
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while victim in proxy.worker_pids() or len(proxy.worker_pids()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric() == 20
    served_serial(proxy.port(), ctx)
    assert metric() == 21


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_sessions_resume_across_a_reload(
    tsproxy_factory: Any, ca: trustme.CA, origin: int, tmp_path: Path, version: str
) -> None:
    """Ticket keys belong to the master, not to a config generation: a session from before a
    reload (new contexts, new certificate) still resumes after it."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    proxy, _ = start(tsproxy_factory, ca, origin, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sess = tmp_path / "session.pem"

    def s_client(*extra: str) -> str:
        done = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{proxy.port()}",
                "-servername",
                "a.test",
                "-CAfile",
                str(ca_file),
                version,
                "-ign_eof",  # read until the server closes: TLS 1.3 tickets come after the handshake
                *extra,
            ],
            input=b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            capture_output=True,
            timeout=20,
            check=False,
        )
        return done.stdout.decode(errors="replace")

    first = s_client("-sess_out", str(sess))
    assert "New," in first and sess.stat().st_size > 0
    write_cert(ca, proxy.config_dir, "a.test")  # the reload builds every context anew
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr
    again = s_client("-sess_in", str(sess))
    assert "Reused," in again, again[-1500:]


# -- the HTTP config per transaction (HttpSM acquires HttpConfig, ATS-style) ------------------------
PLUGINS = Path(__file__).resolve().parent / "plugins"


class _PathHandler(BaseHTTPRequestHandler):
    """Answers with the path it was asked for: which remap rule a request went through."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def path_origin() -> Iterator[int]:
    with http_origin(_PathHandler) as port:
        yield port


def _remap_to(port: int, prefix: str) -> str:
    return f"map http://a.test/ http://127.0.0.1:{port}/{prefix}/\n"


def _get(conn: http.client.HTTPConnection, path: str, **headers: str) -> str:
    conn.request("GET", path, headers={"Host": "a.test", **headers})
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 200, (resp.status, body)
    return body


def _fresh_get(proxy: Any, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    try:
        return _get(conn, path)
    finally:
        conn.close()


def _reload_remap(proxy: Any, port: int, prefix: str) -> None:
    (proxy.config_dir / "remap.config").write_text(_remap_to(port, prefix))
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr + result.stdout
    want = f"/{prefix}/probe"
    wait_for(lambda: _fresh_get(proxy, "/probe") == want, what=f"new connections use /{prefix}/")


def test_a_transaction_keeps_its_config_across_a_reload(
    tsproxy_factory: Any, path_origin: int, tmp_path: Path
) -> None:
    """A transaction paused in a hook (before its remap) across ``tsproxy reload`` finishes with
    the old remap rules; new transactions get the new ones; the old HttpConfig is released only
    after the paused transaction ended."""
    hold = tmp_path / "hold"
    hold.mkdir()
    proxy = tsproxy_factory(
        records={"proxy.config.diags.debug.enabled": 1, "proxy.config.diags.debug.tags": "http_config"},
        files={
            "remap.config": _remap_to(path_origin, "old"),
            "plugin.config": f"{PLUGINS / 'hold_txn.py'} {hold}\n",
        },
    )
    assert _fresh_get(proxy, "/before") == "/old/before"
    held: dict[str, str] = {}

    def paused_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=30)
        try:
            held["body"] = _get(conn, "/held", **{"X-Hold": "one"})
        finally:
            conn.close()

    thread = threading.Thread(target=paused_request)
    thread.start()
    log = hold / "hold.log"
    wait_for(lambda: log.exists() and "held one" in log.read_text(), what="the transaction held")
    _reload_remap(proxy, path_origin, "new")
    assert _fresh_get(proxy, "/after") == "/new/after"
    released = "HttpConfig generation 1 released"
    time.sleep(0.3)  # time for a wrong early release to reach the log
    assert released not in proxy.output()
    (hold / "one").touch()
    thread.join(10)
    assert held.get("body") == "/old/held"  # remapped after the reload, by the config it started with
    wait_for(lambda: released in proxy.output(), what="the old HttpConfig released")
    text = log.read_text()
    assert text.index("held one") < text.index("released one")
    assert "HttpConfig generation 2 released" not in proxy.output()  # the current one is kept


def test_a_keep_alive_connection_takes_a_reload_at_its_next_request(
    tsproxy_factory: Any, path_origin: int
) -> None:
    """The config is per transaction, not per connection (as in ATS): a keep-alive connection
    opened before a reload sends its next request through the new remap rules."""
    proxy = tsproxy_factory(
        records={"proxy.config.http.keep_alive_no_activity_timeout_in": 60},
        files={"remap.config": _remap_to(path_origin, "old")},
    )
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    try:
        assert _get(conn, "/first") == "/old/first"
        sock = conn.sock
        _reload_remap(proxy, path_origin, "new")
        assert _get(conn, "/second") == "/new/second"
        assert conn.sock is sock and sock is not None  # the same connection, not a reconnect
    finally:
        conn.close()
