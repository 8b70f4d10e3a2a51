"""Slow clients against the real proxy (issue 14, item 4): what a slow reader may cost in memory,
the worker-wide budget for buffered bytes, and ``proxy.config.http.per_server.connection.max``
holding slow uploads to a bounded number of origin connections.

Everything runs ``tsproxy start`` (one worker) on 127.0.0.1 in front of ``tests/origin.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from conftest import ProxyProcess, wait_for
from origin import OriginServer, pattern

Factory = Callable[..., ProxyProcess]
KiB = 1024
MiB = 1024 * KiB
CLIENT_RCVBUF = 8 * KiB  # the client's kernel must not swallow the body for it


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


def start(factory: Factory, origin: OriginServer, records: dict[str, Any] | None = None) -> ProxyProcess:
    return factory(
        records={
            "proxy.config.http.transaction_no_activity_timeout_in": 60,
            "proxy.config.http.transaction_no_activity_timeout_out": 60,
            **(records or {}),
        },
        files={"remap.config": f"map http://origin.test/ http://{origin.authority}/\n"},
    )


def metric(proxy: ProxyProcess, name: str) -> int:
    result = proxy.call("metric.get", {"names": [name]})
    return int(result["metrics"][0][1])


def worker_rss(proxy: ProxyProcess) -> int:
    (pid,) = proxy.worker_pids()
    return int(psutil.Process(pid).memory_info().rss)


def settle_rss(proxy: ProxyProcess, limit: float = 20.0) -> int:
    """The worker's RSS once it stopped growing (no change above 1 % for 2 s)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now, rss = time.monotonic(), worker_rss(proxy)
        samples.append((now, rss))
        old = [r for t, r in samples if now - t >= 2.0]
        if old and abs(rss - old[-1]) <= rss // 100:
            return rss
    return samples[-1][1]


class SlowReader:
    """GET a big body, read the head and a little, then stop reading."""

    def __init__(self, port: int, size: int) -> None:
        self.size = size
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET /bytes?n={size} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, "closed before the response head"
            data += chunk
        head, _, self.body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head

    def finish(self, digest: bool = False) -> tuple[int, str]:
        """Read the rest: (body bytes received, sha256 when asked)."""
        h = hashlib.sha256(self.body)
        got = len(self.body)
        self.sock.settimeout(30)
        with contextlib.suppress(OSError):
            while got < self.size:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
                if digest:
                    h.update(chunk)
        self.sock.close()
        return got, h.hexdigest() if digest else ""


def test_slow_readers_cost_at_most_128_kib_each(tsproxy_factory: Factory, origin: OriginServer) -> None:
    """100 clients stop reading a 4 MiB response each: the worker grows by at most 128 KiB per
    connection (it grew ~660 KiB each when the origin read buffer and the client write buffer
    filled to 256 KiB apiece), and every body still arrives whole once they read."""
    n, size = 100, 4 * MiB
    proxy = start(tsproxy_factory, origin)
    for _ in range(3):  # warm up: the first requests allocate what every request reuses
        SlowReader(proxy.port(), 256 * KiB).finish()
    time.sleep(0.5)
    rss0 = worker_rss(proxy)
    readers = [SlowReader(proxy.port(), size) for _ in range(n)]
    rss1 = settle_rss(proxy)
    per_conn = (rss1 - rss0) / n
    print(f"worker RSS +{per_conn / KiB:.1f} KiB per slow reader ({n} x {size >> 20} MiB)")
    assert per_conn <= 128 * KiB, f"{per_conn / KiB:.1f} KiB per slow-reader connection"
    assert metric(proxy, "proxy.process.http.flow_control.closed") == 0  # the default budget: 64 MiB
    results = [r.finish(digest=i < 3) for i, r in enumerate(readers)]
    assert [got for got, _ in results] == [size] * n
    want = hashlib.sha256(pattern(size)).hexdigest()
    assert all(digest == want for _, digest in results[:3])


def test_worker_budget_throttles_then_closes_the_longest_stalled(
    tsproxy_factory: Factory, origin: OriginServer
) -> None:
    """A 1 MiB budget and 40 stalled readers (64 KiB each): past half the budget the stalled
    transactions are throttled, past all of it the longest-stalled are closed (counted) until
    the rest fits; the first readers are the ones cut, the worker keeps serving."""
    size = 16 * MiB
    proxy = start(tsproxy_factory, origin, {"proxy.config.http.flow_control.worker_budget": MiB})
    early = [SlowReader(proxy.port(), size) for _ in range(10)]
    time.sleep(1.5)
    late = [SlowReader(proxy.port(), size) for _ in range(30)]
    wait_for(lambda: metric(proxy, "proxy.process.http.flow_control.closed") > 0, "slow readers closed", 10)
    time.sleep(1.5)  # a few more budget checks
    closed = metric(proxy, "proxy.process.http.flow_control.closed")
    assert metric(proxy, "proxy.process.http.flow_control.throttled") > 0
    assert 0 < closed < 40
    assert metric(proxy, "proxy.process.http.flow_control.paused_bytes") <= MiB
    # the longest-stalled are cut: every early reader before any late one
    got_early = [r.finish()[0] for r in early]
    assert all(g < size for g in got_early), got_early
    # the worker still serves: a fresh request, whole
    fresh = SlowReader(proxy.port(), 100 * KiB)
    assert fresh.finish()[0] == 100 * KiB
    got_late = [r.finish()[0] for r in late]
    assert sum(1 for g in got_early + got_late if g < size) == closed


def slow_post(port: int, body_len: int = 1000, first: int = 10) -> socket.socket:
    """A POST whose head and first bytes are sent; the rest of the body is held back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(
        f"POST /echo HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {body_len}\r\n\r\n".encode()
        + b"x" * first
    )
    return s


def response(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(TimeoutError):
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_per_server_max_queues_then_503(tsproxy_factory: Factory, origin: OriginServer) -> None:
    """per_server.connection.max 2: two slow POSTs hold both origin connections; a request that
    comes meanwhile waits instead of opening a third, and gets 503 once it waited
    connect_attempts_timeout (3 s); one that is waiting when a POST ends is served on that
    POST's connection. The origin never sees more than two connections."""
    proxy = start(
        tsproxy_factory,
        origin,
        {"proxy.config.http.per_server.connection.max": 2, "proxy.config.http.connect_attempts_timeout": 3},
    )
    a = slow_post(proxy.port())
    b = slow_post(proxy.port())
    wait_for(lambda: origin.connections == 2, "two origin connections", 5)
    c = socket.create_connection(("127.0.0.1", proxy.port()), timeout=20)
    t0 = time.monotonic()
    c.sendall(b"GET /bytes?n=7 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    got_c = response(c)
    waited = time.monotonic() - t0
    assert got_c.startswith(b"HTTP/1.1 503"), got_c
    assert waited > 2.0, waited  # it waited for a connection (3 s), it was not refused at once
    assert origin.connections == 2
    assert metric(proxy, "proxy.process.http.origin_connections_throttled_out") == 1
    d = socket.create_connection(("127.0.0.1", proxy.port()), timeout=20)
    d.sendall(b"GET /bytes?n=9 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    wait_for(lambda: metric(proxy, "proxy.process.http.origin_connections_queued") == 2, "D queued", 5)
    time.sleep(0.3)
    assert not origin.requests, "nothing reached the origin while both connections were held"
    a.sendall(b"x" * 990)  # A's body is complete: its answer, then its connection is free for D
    assert response(a).startswith(b"HTTP/1.1 200"), "the slow POST lost its answer"
    got_d = response(d)
    assert got_d.startswith(b"HTTP/1.1 200"), got_d
    b.sendall(b"x" * 990)
    assert response(b).startswith(b"HTTP/1.1 200")
    assert origin.connections == 2  # D was served on A's connection, not on a new one
    assert [r.conn_id for r in origin.requests if r.method == "GET"] == [
        r.conn_id for r in origin.requests if r.method == "POST"
    ][:1]
    for s in (a, b, c, d):
        s.close()


def test_per_server_queue_size_0_refuses_at_once(tsproxy_factory: Factory, origin: OriginServer) -> None:
    """queue_size 0 (ATS: never wait): at the cap a new transaction gets 503 at once."""
    proxy = start(
        tsproxy_factory,
        origin,
        {
            "proxy.config.http.per_server.connection.max": 1,
            "proxy.config.http.per_server.connection.queue_size": 0,
            "proxy.config.http.connect_attempts_timeout": 30,
        },
    )
    a = slow_post(proxy.port())
    wait_for(lambda: origin.connections == 1, "one origin connection", 5)
    c = socket.create_connection(("127.0.0.1", proxy.port()), timeout=5)
    c.sendall(b"GET /bytes?n=7 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert response(c).startswith(b"HTTP/1.1 503")  # within the 5 s socket timeout, not after 30 s
    assert metric(proxy, "proxy.process.http.origin_connections_queued") == 0
    a.sendall(b"x" * 990)
    assert response(a).startswith(b"HTTP/1.1 200")
    assert origin.connections == 1
    a.close()
    c.close()


def test_pipelined_responses_behind_a_stalled_client_all_arrive(
    tsproxy_factory: Factory, origin: OriginServer
) -> None:
    """Three pipelined GETs (2 MiB, 5 bytes, 1 MiB; the last with Connection: close) from a
    client that reads nothing for a second: the later transactions start while the client
    buffer is still full (their origin read finds no room at once), and each is resumed by the
    client's drain; all three arrive whole, in order. A guard for the pause/resume path of the
    bounded buffer (the code before had no such pause, and passes it too)."""
    proxy = start(tsproxy_factory, origin)
    sizes = [2 * MiB, 5, MiB]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    s.settimeout(20)
    s.connect(("127.0.0.1", proxy.port()))
    s.sendall(
        b"".join(
            f"GET /bytes?n={n} HTTP/1.1\r\nHost: origin.test\r\n{'Connection: close' if i == 2 else 'X: y'}"
            f"\r\n\r\n".encode()
            for i, n in enumerate(sizes)
        )
    )
    time.sleep(1.0)
    chunks = []
    while chunk := s.recv(1 << 20):  # until the proxy closes after the third response
        chunks.append(chunk)
    s.close()
    rest = b"".join(chunks)
    for n in sizes:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 200"), head[:60]
        assert f"content-length: {n}".encode() in head.lower()
        assert rest[:n] == pattern(n)
        rest = rest[n:]
    assert rest == b""
