"""A small threaded HTTP/1.1 origin server for the proxy integration tests.

One thread accepts, one thread per connection serves requests with keep-alive. It binds
127.0.0.1 port 0 and records what it saw (connections, request heads, body digests), so a test
can assert what the proxy forwarded. Endpoints (the path selects, query arguments tune):

* ``/bytes?n=N``            N bytes of ``pattern(N)`` with Content-Length (also ``/`` = 5 bytes)
* ``/chunked?n=N&chunk=C``  N bytes of the pattern as chunks of C bytes
* ``/big?n=N``              N bytes with Content-Length, written in 64 KiB pieces (blocking sends)
* ``/slow?delay=S&n=N``     waits S seconds, then answers N bytes
* ``/silent``               reads the request and never answers (until the peer or stop())
* ``/echo``                 JSON of the request: method, target, version, headers, body length,
                            body sha256, whether it came chunked; the body is never held whole
* ``/cut?n=N&send=K``       announces N bytes, sends K, then closes the connection
* ``/cutchunked``           one 1000-byte chunk, then closes without the last chunk
* ``/stale``                answers like /bytes on a fresh connection; on a reused one it
                            closes without answering (an origin that dropped an idle connection)
* ``/stall?n=N&send=K``     announces N bytes, sends K, then falls silent
* ``/status?code=C``        answers status C (204/304: no body; 304 keeps a Content-Length)
* ``/close``                answers 5 bytes with ``Connection: close`` and closes
* ``/untilclose?n=N``       N bytes with neither Content-Length nor chunked, ended by close

Everything the server does is bounded: sockets have timeouts, stop() closes every socket and
joins every thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    import trustme

IO_TIMEOUT = 20.0
PIECE = 65536


def pattern(n: int) -> bytes:
    """n deterministic bytes whose content depends on the offset (catches reordering/loss)."""
    block = bytes(range(256)) * 256  # 64 KiB
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


def pattern_digest(n: int) -> str:
    h = hashlib.sha256()
    block = bytes(range(256)) * 256
    reps, rest = divmod(n, len(block))
    for _ in range(reps):
        h.update(block)
    h.update(block[:rest])
    return h.hexdigest()


@dataclass
class SeenRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_len: int = 0
    body_sha256: str = ""
    body_chunked: bool = False
    conn_id: int = 0

    def header(self, name: str) -> str | None:
        """The value of the first header called ``name``, or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class _Closed(Exception):
    """The peer closed the connection (or the server is stopping)."""


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.served = 0  # responses finished on this connection

    def _fill(self) -> None:
        data = self.sock.recv(PIECE)
        if not data:
            raise _Closed
        self.buf += data

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > 65536:
                raise _Closed
            self._fill()

    def read_some(self, limit: int) -> bytes:
        if not self.buf:
            self._fill()
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data


@dataclass
class OriginServer:
    """Start with ``start()`` (or as a context manager); ``stop()`` always."""

    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    # Set when a request head has been read (lets a test wait for "the origin has it").
    request_seen: threading.Event = field(default_factory=threading.Event)
    # Connections on which the server saw the peer close while it was still sending.
    send_failures: int = 0
    # Seconds to pause after each 64 KiB piece of a request body (a slow origin).
    read_pause: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> OriginServer:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.host, self.port))  # 0 (the default): any free port
        lst.listen(128)
        lst.settimeout(0.1)
        self._listener = lst
        self.port = lst.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="origin-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[SeenRequest]:
        """Until the server has read at least n request heads (AssertionError otherwise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"origin saw {len(self.requests)} requests, wanted {n}")

    # -- serving ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        lst = self._listener
        assert lst is not None
        while not self._stop.is_set():
            try:
                sock, _ = lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT)
            with self._lock:
                self.connections += 1
                conn_id = self.connections
                self._socks.add(sock)
            t = threading.Thread(target=self._serve, args=(sock, conn_id), name="origin-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn_id: int) -> None:
        conn = _Conn(sock)
        try:
            while not self._stop.is_set():
                if not self._one_request(conn, conn_id):
                    break
                conn.served += 1
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    def _one_request(self, conn: _Conn, conn_id: int) -> bool:
        line = conn.read_line()
        while line == b"":  # tolerate stray CRLF between requests
            line = conn.read_line()
        method, target, version = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = conn.read_line()
            if not h:
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        seen = SeenRequest(method, target, version, headers, conn_id=conn_id)
        self._read_body(conn, seen)
        with self._lock:
            self.requests.append(seen)
        self.request_seen.set()
        url = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        handler = getattr(self, "_ep_" + (url.path.strip("/").split("/")[0] or "bytes"), self._ep_bytes)
        keep = seen.header("connection") != "close" and version == "HTTP/1.1"
        if url.path == "/stale" and conn.served:
            return False  # as if the origin had timed out this idle connection: close, no answer
        return bool(handler(conn.sock, seen, q)) and keep

    def _read_body(self, conn: _Conn, seen: SeenRequest) -> None:
        h = hashlib.sha256()
        te = seen.header("transfer-encoding")
        if te is not None and te.lower() == "chunked":
            seen.body_chunked = True
            while True:
                size = int(conn.read_line().split(b";")[0], 16)
                if size == 0:
                    while conn.read_line():  # trailers
                        pass
                    break
                left = size
                while left:
                    piece = conn.read_some(left)
                    h.update(piece)
                    seen.body_len += len(piece)
                    left -= len(piece)
                if conn.read_line() != b"":
                    raise _Closed
        else:
            left = int(seen.header("content-length") or 0)
            while left:
                piece = conn.read_some(min(left, PIECE))
                h.update(piece)
                seen.body_len += len(piece)
                left -= len(piece)
                if self.read_pause:
                    time.sleep(self.read_pause)
        seen.body_sha256 = h.hexdigest()

    # -- endpoints (return True to keep the connection) -------------------------------------
    @staticmethod
    def _head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_body(self, sock: socket.socket, seen: SeenRequest, head: bytes, n: int) -> bool:
        sock.sendall(head)
        if seen.method == "HEAD":
            return True
        sent = 0
        block = pattern(PIECE)
        try:
            while sent < n:
                piece = block[: min(PIECE, n - sent)]
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            with self._lock:
                self.send_failures += 1
            raise
        return True

    def _ep_bytes(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        n = int(q.get("n", 5))
        head = self._head(
            200, "OK", [("Content-Length", str(n)), ("Content-Type", "application/octet-stream")]
        )
        return self._send_body(sock, seen, head, n)

    _ep_big = _ep_bytes

    def _ep_chunked(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        n = int(q.get("n", 1000))
        chunk = int(q.get("chunk", 100))
        sock.sendall(self._head(200, "OK", [("Transfer-Encoding", "chunked")]))
        if seen.method == "HEAD":
            return True
        body = pattern(n)
        for i in range(0, n, chunk):
            part = body[i : i + chunk]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        return True

    def _ep_slow(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        if self._stop.wait(float(q.get("delay", 1))):
            return False
        return self._ep_bytes(sock, seen, q)

    def _ep_silent(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        # Hold the connection without answering until the peer closes it or the server stops.
        while not self._stop.is_set():
            r, _, _ = select.select([sock], [], [], 0.05)
            if r:
                try:
                    if not sock.recv(PIECE):
                        return False
                except OSError:
                    return False
        return False

    def _ep_echo(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        body = json.dumps(
            {
                "method": seen.method,
                "target": seen.target,
                "version": seen.version,
                "headers": seen.headers,
                "body_len": seen.body_len,
                "body_sha256": seen.body_sha256,
                "body_chunked": seen.body_chunked,
                "conn_id": seen.conn_id,
            }
        ).encode()
        sock.sendall(
            self._head(200, "OK", [("Content-Length", str(len(body))), ("Content-Type", "application/json")])
            + body
        )
        return True

    def _ep_cut(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        n = int(q.get("n", 100000))
        send = int(q.get("send", 1000))
        sock.sendall(self._head(200, "OK", [("Content-Length", str(n))]) + pattern(send))
        return False

    def _ep_cutchunked(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        sock.sendall(
            self._head(200, "OK", [("Transfer-Encoding", "chunked")]) + b"3e8\r\n" + pattern(1000) + b"\r\n"
        )
        return False

    _ep_stale = _ep_bytes

    def _ep_stall(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        # Announce n bytes, send k, then fall silent (until the peer closes or the server stops).
        n = int(q.get("n", 100000))
        sock.sendall(self._head(200, "OK", [("Content-Length", str(n))]) + pattern(int(q.get("send", 1000))))
        return self._ep_silent(sock, seen, q)

    def _ep_status(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        code = int(q.get("code", 200))
        if code in (204, 304):
            headers = [("ETag", '"x"')] + ([("Content-Length", "1234")] if code == 304 else [])
            sock.sendall(self._head(code, "No Content" if code == 204 else "Not Modified", headers))
            return True
        body = f"status {code}\n".encode()
        sock.sendall(self._head(code, "Whatever", [("Content-Length", str(len(body)))]) + body)
        return True

    def _ep_close(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        sock.sendall(self._head(200, "OK", [("Content-Length", "5"), ("Connection", "close")]) + b"close")
        return False

    def _ep_untilclose(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        n = int(q.get("n", 1000))
        sock.sendall(self._head(200, "OK", [("Connection", "close")]) + pattern(n))
        return False


class TLSBackend:
    """A TLS server for backend.test (a blind tunnel's destination): answers one line with
    ``backend saw LINE``; ``handshakes`` counts completed TLS handshakes."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("backend.test").configure_cert(self.ctx)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

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
            s.sendall(b"backend saw " + s.recv(1024))

    def close(self) -> None:
        self.sock.close()
