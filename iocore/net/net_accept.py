"""NetAccept and outbound connects: how sockets become NetVConnections (ATS UnixNetAccept.cc,
UnixNetProcessor::connect_re).

NetAccept watches one listening socket. Each readiness accepts up to ``ACCEPT_BATCH`` sockets
(non-blocking, TCP_NODELAY), enforces ``proxy.config.net.max_connections_in`` (over the limit:
closed at once and counted as throttled), and hands each new VC to the ``on_accept`` callback.
EMFILE/ENFILE pause accepting for a short back-off instead of spinning on a readable listener.

On a ``pp`` port the acceptor's callback is wrapped by ``read_proxy_header``: a peer outside
``proxy.config.http.proxy_protocol_allowlist`` is closed before any read; otherwise a
``ProxyProtocolAccept`` owns the socket until the PROXY header is in (a header already in the
socket at accept is read at once, without polling). It peeks, feeds the
sans-IO parser and consumes exactly the header's bytes (what follows stays in the socket for
the TLS handshake or the HTTP session, which therefore need no replay), so a header that comes
byte by byte never makes the loop spin and never swallows a byte of the payload. Once the
header is complete the client address it carries becomes ``vc.remote_addr`` (X-Forwarded-For,
logs, plugins), the header is kept in ``vc.proxy_protocol``, and the VC goes on to the port's
own accept callback (VCONN_START hooks and the handshake, or the HTTP session). Anything else
(other bytes, a malformed header, EOF, no whole header within the accept timeout) closes the
connection and counts it. Nothing of this runs on ports without ``pp``.

``connect`` starts a non-blocking connect and calls back ``NET_EVENT_OPEN`` with the VC or
``NET_EVENT_OPEN_FAILED`` with the errno (ETIMEDOUT when the VC's inactivity timeout, the
caller's connect timeout, expires first).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import sys
from collections.abc import Callable
from typing import Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import EVENT_IMMEDIATE, NET_EVENT_OPEN, NET_EVENT_OPEN_FAILED, Continuation
from iocore.net.net_handler import NetHandler
from iocore.net.net_vconnection import NetVConnection, PlainNetVConnection
from iocore.net.proxy_protocol import IPAllowlist, ProxyProtocolError, ProxyProtocolParser
from iocore.records.stats import METRIC_ID

ACCEPT_BATCH = 64
_M_ACCEPTS = METRIC_ID["proxy.process.net.accepts_total"]
_M_THROTTLED = METRIC_ID["proxy.process.net.connections_throttled_in"]
_M_PP_V1 = METRIC_ID["proxy.process.net.proxy_protocol_v1_in"]
_M_PP_V2 = METRIC_ID["proxy.process.net.proxy_protocol_v2_in"]
_M_PP_UNTRUSTED = METRIC_ID["proxy.process.net.proxy_protocol_untrusted_in"]
_M_PP_BAD = METRIC_ID["proxy.process.net.proxy_protocol_bad_header_in"]
_M_PP_TIMEOUT = METRIC_ID["proxy.process.net.proxy_protocol_timeout_in"]
_dbg = DbgCtl("net_accept")
_dbg_pp = DbgCtl("proxyprotocol")
_log = logging.getLogger("tsproxy.net")


class NetAccept(Continuation):
    """Accepts connections on one listening socket for one EThread."""

    def __init__(
        self,
        nh: NetHandler,
        sock: socket.socket,
        make_vc: Callable[[socket.socket, NetHandler], NetVConnection],
        on_accept: Callable[[NetVConnection], None],
        max_connections: Callable[[], int],
    ) -> None:
        super().__init__(self._resume)
        self.nh = nh
        self.sock = sock
        self.make_vc = make_vc
        self.on_accept = on_accept
        self.max_connections = max_connections
        self.paused = False
        sock.setblocking(False)
        self._family = sock.family
        # Every socket accepted on a listener bound to one address has that local address: no
        # getsockname per connection. A wildcard listener must ask.
        bound = sock.getsockname()
        self._local_addr: tuple[Any, ...] | None = None if bound[0] in ("0.0.0.0", "::") else bound
        # A wildcard listener's local addresses, one tuple each: the connections share it.
        self._local_addrs: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        nh.thread.register(sock.fileno(), selectors.EVENT_READ, self._on_readable)

    def _on_readable(self, mask: int) -> None:
        nh = self.nh
        counters = nh.counters
        raw_accept = self.sock._accept  # type: ignore[attr-defined]  # socket.accept without its wrapper
        family = self._family
        local_addr = self._local_addr
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = raw_accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _dbg("accept: %s, backing off", exc.strerror)
                    self._pause(0.25)
                return
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            counters[_M_ACCEPTS] += 1
            if len(nh.open_vcs) >= self.max_connections():
                counters[_M_THROTTLED] += 1
                conn.close()
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            vc = self.make_vc(conn, nh)
            # What getpeername would say, with the host interned: one client's connections
            # share its address string (an idle connection is mostly such small objects).
            vc.remote_addr = (sys.intern(addr[0]), *addr[1:]) if type(addr[0]) is str else addr
            if local_addr is None:
                try:
                    here = conn.getsockname()
                except OSError:
                    pass
                else:
                    vc.local_addr = self._local_addrs.setdefault(here, here)
            else:
                vc.local_addr = local_addr
            nh.add_vc(vc)
            self.on_accept(vc)

    def _pause(self, seconds: float) -> None:
        if not self.paused:
            self.paused = True
            self.nh.thread.unregister(self.sock.fileno())
            self.nh.thread.schedule_in(self, seconds)

    def _resume(self, event: int, data: Any) -> int:
        if self.paused:
            self.paused = False
            self.nh.thread.register(self.sock.fileno(), selectors.EVENT_READ, self._on_readable)
        return 0

    def stop(self) -> None:
        """Stop accepting (graceful shutdown); the listening socket itself belongs to the master."""
        if not self.paused:
            self.nh.thread.unregister(self.sock.fileno())
        self.paused = True


def read_proxy_header(
    vc: NetVConnection,
    allowlist: IPAllowlist | None,
    timeout: float,
    then: Callable[[NetVConnection], None],
) -> None:
    """The accept callback of a ``pp`` port: check the peer, then read the PROXY header."""
    if allowlist and vc.remote_ip not in allowlist:
        vc.nh.counters[_M_PP_UNTRUSTED] += 1
        _dbg_pp("closing %s: not in proxy_protocol_allowlist", vc.remote_addr)
        vc.do_io_close()
        return
    reader = ProxyProtocolAccept(vc, timeout, then)
    # A balancer sends the header with the first segment: it is usually in the socket already,
    # and then the connection goes on without ever being polled for it.
    reader.on_io(selectors.EVENT_READ)
    if reader.vc is not None:
        reader.wait()


class ProxyProtocolAccept:
    """Owns one accepted socket until its PROXY protocol header is in (see the module doc).

    While it waits, the fd is registered with this object as its handler (the VC itself is not
    registered yet), and the NetHandler's once-a-second cop holds it in
    ``nh.proxy_protocol_pending`` to enforce the deadline: no timer object per connection, and
    a reader is freed the moment its header is in."""

    __slots__ = ("deadline", "parser", "then", "vc", "waiting")

    def __init__(self, vc: NetVConnection, timeout: float, then: Callable[[NetVConnection], None]) -> None:
        self.vc: NetVConnection | None = vc
        self.then: Callable[[NetVConnection], None] | None = then
        self.parser = ProxyProtocolParser()
        self.deadline = vc.nh.thread.now + timeout
        self.waiting = False

    def wait(self) -> None:
        """Not all of the header is in: poll for the rest, under the deadline."""
        vc = self.vc
        assert vc is not None
        nh = vc.nh
        nh.proxy_protocol_pending[self] = None
        nh.thread.register_handler(vc.fd, selectors.EVENT_READ, self)
        self.waiting = True

    def on_io(self, mask: int) -> None:
        vc = self.vc
        if vc is None:
            return
        if vc.closed:
            self._finish(vc)
            return
        try:
            self._read(vc)
        except Exception:  # never the worker: this connection only
            _log.exception("unexpected error reading the PROXY header of %r; closing it", vc)
            self._fail(vc, _M_PP_BAD)

    def _read(self, vc: NetVConnection) -> None:
        parser = self.parser
        try:
            data = vc.sock.recv(parser.want, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            _dbg_pp("closing %s: %s before a whole PROXY header", vc.remote_addr, exc.strerror)
            self._fail(vc, _M_PP_BAD)
            return
        if not data:
            _dbg_pp("closing %s: EOF before a whole PROXY header", vc.remote_addr)
            self._fail(vc, _M_PP_BAD)
            return
        try:
            header = parser.feed(data)
        except ProxyProtocolError as exc:
            _dbg_pp("closing %s: %s", vc.remote_addr, exc.reason)
            self._fail(vc, _M_PP_BAD)
            return
        take = len(data) - len(parser.trailing) if header is not None else len(data)
        if len(vc.sock.recv(take)) != take:  # bytes already peeked: recv returns them all
            self._fail(vc, _M_PP_BAD)
            return
        if header is None:
            return
        vc.nh.counters[_M_PP_V1 if header.version == 1 else _M_PP_V2] += 1
        peer = vc.remote_addr
        source = header.source
        if source is not None:
            vc.remote_addr = (sys.intern(source[0]), source[1])
        vc.proxy_protocol = header.with_peer((str(peer[0]), int(peer[1])) if peer else None)
        if _dbg_pp.on:
            _dbg_pp("PROXY v%d from %s: client %s", header.version, peer, vc.remote_addr)
        then = self.then
        self._finish(vc)
        assert then is not None
        then(vc)

    def expire(self) -> None:
        """The deadline passed (the NetHandler's cop): no whole header in time."""
        vc = self.vc
        if vc is not None and not vc.closed:
            _dbg_pp("closing %s: no whole PROXY header in time", vc.remote_addr)
            self._fail(vc, _M_PP_TIMEOUT)
        elif vc is not None:
            self._finish(vc)

    def abort(self) -> None:
        """Close the connection uncounted (a graceful stop: no request has started on it)."""
        vc = self.vc
        if vc is not None:
            self._finish(vc)
            vc.do_io_close()

    def _fail(self, vc: NetVConnection, metric: int) -> None:
        vc.nh.counters[metric] += 1
        self._finish(vc)
        vc.do_io_close()

    def _finish(self, vc: NetVConnection) -> None:
        if self.waiting:
            self.waiting = False
            nh = vc.nh
            nh.proxy_protocol_pending.pop(self, None)
            if not vc.closed:
                nh.thread.unregister(vc.fd)
        self.vc = self.then = None


class _Connector:
    """Waits for a non-blocking connect to finish."""

    __slots__ = ("cont", "nh", "sock", "vc")

    def __init__(self, nh: NetHandler, cont: Continuation, sock: socket.socket, vc: NetVConnection) -> None:
        self.nh = nh
        self.cont = cont
        self.sock = sock
        self.vc = vc

    def on_io(self, mask: int) -> None:
        """The socket became writable: the connect finished (or failed)."""
        nh = self.nh
        nh.thread.unregister(self.sock.fileno())
        self.vc.connect_waiter = None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if self.vc.closed:  # the caller gave up (timeout) before the connect finished
            return
        if err:
            self.vc.do_io_close()
            self.cont.handle_event(NET_EVENT_OPEN_FAILED, err)
            return
        self.vc.set_addrs()
        self.cont.handle_event(NET_EVENT_OPEN, self.vc)


class _Failed(Continuation):
    def __init__(self, cont: Continuation, err: int) -> None:
        super().__init__(self._fire)
        self.cont = cont
        self.err = err

    def _fire(self, event: int, data: Any) -> int:
        self.cont.handle_event(NET_EVENT_OPEN_FAILED, self.err)
        return 0


def connect(
    nh: NetHandler,
    cont: Continuation,
    addr: tuple[Any, ...],
    family: int = socket.AF_INET,
    make_vc: Callable[[socket.socket, NetHandler], NetVConnection] = PlainNetVConnection,
) -> NetVConnection | None:
    """Start a connect to ``addr``; ``cont`` gets NET_EVENT_OPEN(vc) or NET_EVENT_OPEN_FAILED(errno).

    Returns the VC (so the caller can close it on a connect timeout), or None when the connect
    failed at once (the failure is still delivered as an event, never synchronously).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex(addr)
    except OSError as exc:
        sock.close()
        nh.thread.schedule_imm(_Failed(cont, exc.errno or errno.EINVAL), EVENT_IMMEDIATE)
        return None
    if rc not in (0, errno.EINPROGRESS):
        sock.close()
        nh.thread.schedule_imm(_Failed(cont, rc), EVENT_IMMEDIATE)
        return None
    vc = make_vc(sock, nh)
    vc.outbound = True
    nh.add_vc(vc)
    vc.connect_waiter = cont  # an inactivity timeout before the connect finishes fails it
    connector = _Connector(nh, cont, sock, vc)
    nh.thread.register_handler(sock.fileno(), selectors.EVENT_WRITE, connector)
    return vc
