"""Operations with the real processes (issue 6): per-worker rates in ``tsproxy status``,
``tsproxy top``, ``tsproxy restart`` under a keep-alive client, and the drain of ``tsproxy stop``.

The origin is a tiny ThreadingHTTPServer (HTTP/1.1, Content-Length). ``/slow`` sends its body
in 10 pieces over about 2 s. Every wait is a polling loop with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import psutil
import pytest
from conftest import TSPROXY_CMD, ProxyProcess, http_origin, subprocess_env

from tsproxy.exitcodes import EX_FAILURE, EX_OK, EX_UNAVAILABLE

Factory = Callable[..., ProxyProcess]

BODY = b"hello from the origin\n" * 20
SLOW_PIECE = b"s" * 200
SLOW_PIECES = 10
SLOW_DELAY = 0.2  # seconds between pieces: the whole body takes ~2 s
HOST = "origin.test"


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            self.send_response(200)
            self.send_header("Content-Length", str(SLOW_PIECES * len(SLOW_PIECE)))
            self.end_headers()
            self.wfile.flush()
            for _ in range(SLOW_PIECES):
                time.sleep(SLOW_DELAY)
                self.wfile.write(SLOW_PIECE)
                self.wfile.flush()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def origin_port() -> Iterator[int]:
    with http_origin(_Origin) as port:
        yield port


def _start(
    factory: Factory, origin_port: int, records: dict[str, Any] | None = None, **kw: Any
) -> ProxyProcess:
    remap = f"map http://{HOST}/ http://127.0.0.1:{origin_port}/\n"
    files = {"remap.config": remap, **kw.pop("files", {})}
    return factory(records=records, files=files, **kw)


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


# -- a small HTTP/1.1 client that tells "closed between responses" from real failures --------


class ClosedBetweenResponses(Exception):
    """The connection was closed (FIN or RST) before any byte of the response: retry is safe."""


class MidResponseFailure(Exception):
    """The connection broke after part of a response: never acceptable."""


def _recv_response(sock: socket.socket) -> tuple[int, bytes, bool]:
    """Read one response: (status, body, connection-close). Content-Length framing only."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as exc:
            if buf:
                raise MidResponseFailure(f"reset after {len(buf)} header bytes") from exc
            raise ClosedBetweenResponses("reset") from exc
        if not chunk:
            if buf:
                raise MidResponseFailure(f"EOF after {len(buf)} header bytes")
            raise ClosedBetweenResponses("EOF")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as exc:
            raise MidResponseFailure(f"reset after {len(body)} of {length} body bytes") from exc
        if not chunk:
            raise MidResponseFailure(f"EOF after {len(body)} of {length} body bytes")
        body += chunk
    return status, body, headers.get("connection", "").lower() == "close"


def _request(sock: socket.socket, path: str = "/") -> tuple[int, bytes, bool]:
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ClosedBetweenResponses(f"send failed: {exc}") from exc
    return _recv_response(sock)


class KeepAliveLoop(threading.Thread):
    """Sends GET / in a loop on one keep-alive connection, reconnecting only when it was closed
    between two responses (what any HTTP client does for an idempotent request)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop_event = threading.Event()
        self.ok = 0
        self.connections = 0
        self.reconnects: list[str] = []
        self.failures: list[str] = []

    def run(self) -> None:
        sock: socket.socket | None = None
        while not self.stop_event.is_set():
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                except OSError as exc:
                    self.failures.append(f"connect: {exc!r}")
                    time.sleep(0.05)
                    continue
                self.connections += 1
            try:
                status, body, close = _request(sock)
            except ClosedBetweenResponses as exc:
                self.reconnects.append(str(exc))
                sock.close()
                sock = None
                continue
            except (MidResponseFailure, OSError) as exc:
                self.failures.append(repr(exc))
                sock.close()
                sock = None
                continue
            if status != 200 or body != BODY:
                self.failures.append(f"status {status}, {len(body)} body bytes")
            else:
                self.ok += 1
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive()


# -- status rates and top -----------------------------------------------------------------------


def test_status_shows_handshake_and_request_rates_per_worker(
    tsproxy_factory: Factory, origin_port: int
) -> None:
    proxy = _start(
        tsproxy_factory,
        origin_port,
        {"proxy.config.http.server_ports": "{0}:ip-in=127.0.0.1 {1}:ssl:ip-in=127.0.0.1"},
    )
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        try:
            with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=5) as plain:
                while not stop.is_set():
                    status = _request(plain)[0]
                    if status != 200:
                        errors.append(f"status {status}")
                    with (
                        socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=5) as raw,
                        ctx.wrap_socket(raw, server_hostname="localhost"),
                    ):
                        pass
        except Exception as exc:
            errors.append(repr(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:

        def busy() -> dict[str, Any] | None:
            (w,) = proxy.status()["workers"]
            return w if (w["handshakes_per_s"] or 0) > 0 and (w["requests_per_s"] or 0) > 0 else None

        worker = _wait_for(lambda: errors or busy(), 5.0, "non-zero handshake and request rates")
        table = proxy.ctl("status")
    finally:
        stop.set()
        thread.join(10)
    assert errors == [], errors
    assert worker["handshakes_per_s"] > 0 and worker["requests_per_s"] > 0
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header[:3] == ["ROLE", "SLOT", "PID"]
    assert "HS/S" in header and "REQ/S" in header
    assert "requests/s (rates over the last 1 s)" in table.stdout
    # Once the load stops, the rates fall back to 0 within a sample period or two.
    _wait_for(
        lambda: proxy.status()["workers"][0]["requests_per_s"] == 0.0, 4.0, "the request rate back at 0"
    )


def test_top_refreshes_a_bounded_number_of_times(tsproxy: ProxyProcess) -> None:
    started = time.monotonic()
    result = tsproxy.ctl("top", "--interval", "0.2", "--iterations", "3")
    assert result.returncode == EX_OK, result.stderr
    assert result.stdout.count("tsproxy top - ") == 3
    assert result.stdout.count("REQ/S") == 3
    assert f"master  -     {tsproxy.pid}" in result.stdout
    assert time.monotonic() - started < 10


def test_top_exits_0_on_ctrl_c(tsproxy: ProxyProcess) -> None:
    proc = subprocess.Popen(
        [*TSPROXY_CMD, "top", "--interval", "0.2", "--config-dir", str(tsproxy.config_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the first frame is out
        assert first.startswith(b"tsproxy top - ")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EX_OK, err
    assert b"Traceback" not in err and b"Aborted" not in err


def test_top_and_restart_say_clearly_when_nothing_runs(tsproxy: ProxyProcess) -> None:
    tsproxy.stop()
    for args in (("top", "--iterations", "1"), ("restart",)):
        result = tsproxy.ctl(*args)
        assert result.returncode == EX_UNAVAILABLE
        assert "no tsproxy running for config dir" in result.stderr
        assert "Traceback" not in result.stderr


# -- restart --------------------------------------------------------------------------------------


def _listen_fds(pid: int, port: int) -> set[int]:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return {c.fd for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_restart_under_a_keep_alive_client_loses_nothing(tsproxy_factory: Factory, origin_port: int) -> None:
    proxy = _start(tsproxy_factory, origin_port, {"proxy.config.exec_thread.limit": 2})
    before = proxy.status()["workers"]
    listen_fds = _listen_fds(proxy.pid, proxy.port(0))
    assert listen_fds
    client = KeepAliveLoop(proxy.port(0))
    client.start()
    try:
        _wait_for(lambda: client.ok >= 20, 10, "the client's first requests")
        first = proxy.ctl("restart", timeout=60)
        middle = proxy.status()["workers"]
        mark = client.ok
        _wait_for(lambda: client.ok >= mark + 20, 10, "requests between the restarts")
        second = proxy.ctl("restart", timeout=60)
        mark = client.ok
        _wait_for(lambda: client.ok >= mark + 20, 10, "requests after the restarts")
    finally:
        client.finish()

    assert client.failures == [], client.failures
    for result in (first, second):
        assert result.returncode == EX_OK, result.stderr
        assert "restarted 2 workers in" in result.stdout
    old_pids = [w["pid"] for w in before]
    mid_pids = [w["pid"] for w in middle]
    for i, (old, new) in enumerate(zip(old_pids, mid_pids, strict=True)):
        assert f"ET_NET[{i}]: pid {old} -> pid {new}" in first.stdout
    after = proxy.status()
    new_pids = [w["pid"] for w in after["workers"]]
    assert not set(old_pids) & set(mid_pids) and not set(mid_pids) & set(new_pids)
    assert not any(_alive(pid) for pid in old_pids + mid_pids)
    assert all(w["ready"] for w in after["workers"]) and after["draining"] == []
    assert not after["restarting"]
    # Replacements write to the spare stats slots, then back to the freed ones.
    assert [w["stats_slot"] for w in middle] != [w["stats_slot"] for w in before]
    # The master's listening socket was never closed or re-created.
    assert _listen_fds(proxy.pid, proxy.port(0)) == listen_fds
    # Each answered request was counted once, across the old and the new workers.
    metric = proxy.ctl("metric", "get", "proxy.process.http.incoming_requests")
    assert metric.stdout.split() == ["proxy.process.http.incoming_requests", str(client.ok)]
    # At most the idle connection of each old worker was closed between two responses.
    assert len(client.reconnects) <= 4, client.reconnects


def test_restart_waits_for_an_in_flight_response_and_refuses_a_second_restart(
    tsproxy_factory: Factory, origin_port: int
) -> None:
    proxy = _start(tsproxy_factory, origin_port)
    (old_pid,) = proxy.worker_pids()
    slow = socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10)
    slow.sendall(f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    _wait_for(lambda: proxy.status()["workers"][0]["connections"] >= 2, 5, "the slow transaction in flight")
    started = time.monotonic()
    restart = subprocess.Popen(
        [*TSPROXY_CMD, "restart", "--config-dir", str(proxy.config_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        _wait_for(lambda: proxy.status()["draining"], 10, "the old worker draining")
        status = proxy.status()
        assert status["restarting"]
        assert [d["pid"] for d in status["draining"]] == [old_pid]
        table = proxy.ctl("status")
        assert f"{old_pid}~" in table.stdout and "(restarting)" in table.stdout
        second = proxy.ctl("restart")
        assert second.returncode == EX_UNAVAILABLE
        assert "a restart is already in progress" in second.stderr
        # The old worker finishes the slow response in full, then closes the connection.
        code, body, _close = _recv_response(slow)
        assert code == 200 and body == SLOW_PIECE * SLOW_PIECES
        assert slow.recv(1) == b""
        out, err = restart.communicate(timeout=20)
    finally:
        slow.close()
        if restart.poll() is None:
            restart.kill()
            restart.wait()
    assert restart.returncode == EX_OK, err
    assert f"pid {old_pid} -> pid " in out
    assert time.monotonic() - started >= SLOW_PIECES * SLOW_DELAY * 0.5
    assert not _alive(old_pid)


def test_restart_keeps_the_old_worker_when_the_replacement_cannot_boot(
    tsproxy_factory: Factory, origin_port: int
) -> None:
    plugin = (
        "import os\n"
        "def plugin_init(api, args):\n"
        "    if os.path.exists(os.path.join(os.path.dirname(__file__), 'fail-now')):\n"
        "        raise RuntimeError('replacement cannot boot on purpose')\n"
    )
    proxy = _start(
        tsproxy_factory,
        origin_port,
        {"proxy.config.exec_thread.limit": 2},
        files={"plugin.config": "flaky.py\n", "plugins/flaky.py": plugin},
    )
    before = proxy.worker_pids()
    (proxy.config_dir / "plugins" / "fail-now").write_text("")
    result = proxy.ctl("restart")
    assert result.returncode == EX_FAILURE, result.stderr
    assert "exited before it was ready" in result.stderr
    assert f"the old worker pid {before[0]} keeps serving; restart stopped" in result.stderr
    assert "Traceback" not in result.stderr
    status = proxy.status()
    assert [w["pid"] for w in status["workers"]] == before
    assert all(w["ready"] for w in status["workers"]) and status["draining"] == []
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=5) as sock:
        assert _request(sock)[0] == 200
    # Fixed: the next restart goes through.
    (proxy.config_dir / "plugins" / "fail-now").unlink()
    result = proxy.ctl("restart")
    assert result.returncode == EX_OK, result.stderr
    assert not set(before) & set(proxy.worker_pids())


# -- stop drains ----------------------------------------------------------------------------------


def test_stop_finishes_in_flight_closes_idle_and_refuses_new(
    tsproxy_factory: Factory, origin_port: int
) -> None:
    proxy = _start(tsproxy_factory, origin_port, {"proxy.config.stop.shutdown_timeout": 8})
    idle = socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10)
    assert _request(idle)[0] == 200  # now an idle keep-alive connection
    slow = socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10)
    slow.sendall(f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    _wait_for(lambda: proxy.status()["workers"][0]["connections"] >= 3, 5, "the slow transaction in flight")
    stop = subprocess.Popen(
        [*TSPROXY_CMD, "stop", "--config-dir", str(proxy.config_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        # The idle keep-alive connection is closed at once (well before the slow body ends).
        begun = time.monotonic()
        idle.settimeout(SLOW_PIECES * SLOW_DELAY)
        with contextlib.suppress(ConnectionResetError):
            assert idle.recv(1) == b""
        assert time.monotonic() - begun < SLOW_PIECES * SLOW_DELAY / 2

        # New connections are refused once the stop has begun.
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        _wait_for(refused, 2, "new connections to be refused")
        assert stop.poll() is None  # still draining the slow response
        # The in-flight response completes in full.
        code, body, _close = _recv_response(slow)
        assert code == 200 and body == SLOW_PIECE * SLOW_PIECES
        out, err = stop.communicate(timeout=20)
    finally:
        idle.close()
        slow.close()
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == EX_OK, err
    assert f"tsproxy stopped (master pid {proxy.pid})" in out
    assert proxy.wait_exit(10) == EX_OK


def test_status_json_has_rates_stats_slots_and_draining(tsproxy: ProxyProcess) -> None:
    result = tsproxy.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    (worker,) = status["workers"]
    assert {"handshakes_per_s", "requests_per_s", "stats_slot"} <= set(worker)
    assert status["draining"] == [] and status["restarting"] is False
    assert status["rate_period"] == 1.0
