"""The control socket: JSON-RPC 2.0 over a Unix socket, as ATS 10's ``traffic_ctl`` uses.

Theory of operation: the master owns one listening Unix socket,
``proxy.config.local_state_dir/tsproxy.sock`` (mode 0600, so only the proxy's own user can
steer it). Each request and each response is one JSON object on one line. The server side
here only frames and dispatches: ``ControlServer`` is driven by the master's selectors loop
(never blocks) and hands each request to a ``dispatch(method, params, responder)`` callable;
the responder may answer at once or later (``reload`` waits for the workers, ``stop`` answers
once the master has stopped). ``call`` is the small blocking client used by the CLI.

Methods (served by tsproxy.master): ``status``, ``stop``, ``reload``, ``restart`` (answers
once every old worker has exited; E_WORKERS when a replacement failed to boot, E_BUSY while
stopping, reloading or restarting), ``metric.get`` (``{"names": [...]}``), ``metric.match``
(``{"regex": "..."}``), ``metric.zero`` (``{"names": [...]}``).

Unix socket paths are limited to 107 bytes; longer paths are reached through
``/proc/self/fd/N/`` of the directory, so a deep config dir still works.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from iocore.records.errors import TSError
from tsproxy.exitcodes import EX_FAILURE, EX_TEMPFAIL, EX_UNAVAILABLE

SOCKET_NAME = "tsproxy.sock"
MAX_REQUEST = 1 << 20

# JSON-RPC 2.0 error codes, plus tsproxy's own (positive) application codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
E_CONFIG = 1  # data: {"path", "line"}; the message is FILE:LINE: reason
E_BUSY = 2  # e.g. a reload or restart is already in progress, or the master is stopping
E_NOT_FOUND = 3  # unknown metric name
E_WORKERS = 4  # some worker rejected or missed a command (or a restart's replacement died)


class NotRunningError(TSError):
    """No master is listening on the control socket."""

    exit_code = EX_UNAVAILABLE


class ControlTimeoutError(TSError):
    """The master did not answer in time."""

    exit_code = EX_TEMPFAIL


class RPCError(TSError):
    """The master answered with a JSON-RPC error; ``exit_code`` comes from its data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data
        exit_code = data.get("exit_code") if isinstance(data, dict) else None
        self.exit_code: int = exit_code if isinstance(exit_code, int) else EX_FAILURE


def encode_line(obj: Any) -> bytes:
    """One message on a control channel (the control socket, master <-> worker): JSON, one line."""
    return json.dumps(obj).encode() + b"\n"


def recv_ready(sock: socket.socket) -> bytes | None:
    """A non-blocking read: None when nothing is there yet, b"" when the peer closed (or the
    socket failed), else the bytes."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def pop_lines(buf: bytearray) -> list[bytes]:
    """Remove the complete lines from ``buf`` and return them (without newlines); a partial
    last line stays in ``buf`` for the next read."""
    end = buf.rfind(b"\n")
    if end < 0:
        return []
    lines = bytes(buf[:end]).split(b"\n")
    del buf[: end + 1]
    return lines


def socket_path(local_state_dir: Path) -> Path:
    return local_state_dir / SOCKET_NAME


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A string that bind()/connect() accept for ``path``, even past the 107-byte limit."""
    text = os.fsencode(path)
    if len(text) < 100:
        yield str(path)
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


def is_listening(path: Path) -> bool:
    """Whether some process accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        with _addressable(path) as address:
            probe.connect(address)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_control_socket(path: Path) -> socket.socket:
    """Listen on ``path`` with mode 0600; a stale socket file (nobody listening) is removed.

    Raises NotRunningError's sibling ``TSError`` when another process already listens there.
    """
    if path.exists() or path.is_symlink():
        if is_listening(path):
            raise _AlreadyServingError(f"another tsproxy master is already listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with _addressable(path) as address:
            sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TSError(f"cannot create control socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    # No chmod: the umask made it 0600 at bind, and a chmod by path would follow a link that
    # whoever may write the state directory swapped in meanwhile (tsproxy.safefs). The socket
    # stays owned by the user who started tsproxy (root: only root may steer it).
    sock.listen(64)
    sock.setblocking(False)
    return sock


class _AlreadyServingError(TSError):
    exit_code = EX_UNAVAILABLE


class Responder:
    """Answers one request, now or later; answering twice is ignored."""

    def __init__(self, conn: _Connection, request_id: Any) -> None:
        self._conn = conn
        self._id = request_id
        self.done = False

    @property
    def alive(self) -> bool:
        return not self._conn.closed

    def result(self, value: Any) -> None:
        self._send({"jsonrpc": "2.0", "id": self._id, "result": value})

    def error(self, code: int, message: str, data: Any = None) -> None:
        err: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        self._send({"jsonrpc": "2.0", "id": self._id, "error": err})

    def _send(self, obj: dict[str, Any]) -> None:
        if self.done:
            return
        self.done = True
        if self._id is None:  # a notification: no answer wanted
            return
        self._conn.send(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


Dispatch = Callable[[str, Any, Responder], None]


class _Connection:
    def __init__(self, sock: socket.socket, server: ControlServer) -> None:
        self.sock = sock
        self.server = server
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.wbuf += data
        self.flush()

    def flush(self) -> None:
        while self.wbuf and not self.closed:
            try:
                n = self.sock.send(self.wbuf)
            except BlockingIOError:
                break
            except OSError:
                self.server.drop(self)
                return
            del self.wbuf[:n]
        self.server.update_interest(self)


class ControlServer:
    """The non-blocking server side, driven by the master's selector."""

    def __init__(self, sock: socket.socket, path: Path, dispatch: Dispatch, selector: selectors.BaseSelector):
        self.sock = sock
        self.path = path
        self.dispatch = dispatch
        self.selector = selector
        self.conns: set[_Connection] = set()
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def fileno_set(self) -> list[int]:
        """Every fd the server owns (closed in forked workers)."""
        return [self.sock.fileno(), *(c.sock.fileno() for c in self.conns if not c.closed)]

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            conn = _Connection(sock, self)
            self.conns.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, lambda mask, c=conn: self._on_io(c, mask))

    def _on_io(self, conn: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.flush()
        if not mask & selectors.EVENT_READ or conn.closed:
            return
        data = recv_ready(conn.sock)
        if data is None:
            return
        if not data:
            self.drop(conn)
            return
        conn.rbuf += data
        if len(conn.rbuf) > MAX_REQUEST:
            Responder(conn, None).done = True
            conn.send(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"request too large"}}\n')
            self.drop(conn)
            return
        for line in pop_lines(conn.rbuf):
            if conn.closed:
                break
            if line.strip():
                self._handle_line(conn, line)

    def _handle_line(self, conn: _Connection, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            Responder(conn, 0).error(PARSE_ERROR, "parse error")
            return
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            Responder(conn, req.get("id") if isinstance(req, dict) else 0).error(
                INVALID_REQUEST, "invalid request"
            )
            return
        responder = Responder(conn, req.get("id"))
        try:
            self.dispatch(req["method"], req.get("params"), responder)
        except Exception as exc:  # a bug in a method must not take the master down
            responder.error(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
            raise

    def update_interest(self, conn: _Connection) -> None:
        if conn.closed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wbuf else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(conn.sock, events, lambda mask, c=conn: self._on_io(c, mask))

    def drop(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def close(self, unlink: bool = True) -> None:
        """Flush what can be flushed, close everything, remove the socket file."""
        for conn in list(self.conns):
            if conn.wbuf:
                with contextlib.suppress(OSError):
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(1.0)
                    conn.sock.sendall(conn.wbuf)
            self.drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()
        if unlink:
            with contextlib.suppress(OSError):  # gone already, or not ours to remove any more
                self.path.unlink()

    def close_in_child(self) -> None:
        """Close the fds in a forked worker without touching the shared selector or the file."""
        for conn in self.conns:
            conn.sock.close()
        self.sock.close()


def call(
    sock_path: Path,
    method: str,
    params: Any = None,
    timeout: float = 10.0,
    *,
    config_dir: Path | None = None,
) -> Any:
    """Send one request to the master and wait for its answer (blocking).

    Raises NotRunningError when nobody listens on ``sock_path``, ControlTimeoutError when
    the answer takes longer than ``timeout`` seconds, RPCError for an error answer.
    """
    where = f" for config dir {config_dir}" if config_dir is not None else ""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout, 5.0))
        try:
            with _addressable(sock_path) as address:
                sock.connect(address)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                reason = f"no control socket at {sock_path}"
            elif exc.errno == errno.ECONNREFUSED:
                reason = f"nobody is listening on {sock_path}"
            else:
                reason = f"cannot connect to {sock_path}: {exc.strerror or exc}"
            raise NotRunningError(f"no tsproxy running{where} ({reason})") from None
        request = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            request["params"] = params
        sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        buf = bytearray()
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlTimeoutError(f"tsproxy did not answer '{method}' within {timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise NotRunningError(f"tsproxy{where} closed the control connection: {exc}") from None
            if not chunk:
                raise NotRunningError(f"tsproxy{where} closed the control connection without answering")
            buf += chunk
    finally:
        sock.close()
    reply = json.loads(bytes(buf).partition(b"\n")[0])
    if "error" in reply:
        err = reply["error"]
        raise RPCError(int(err.get("code", INTERNAL_ERROR)), str(err.get("message")), err.get("data"))
    return reply.get("result")
