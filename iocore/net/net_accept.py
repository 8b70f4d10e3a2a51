"""NetAccept and outbound connects: how sockets become NetVConnections (ATS UnixNetAccept.cc,
UnixNetProcessor::connect_re).

NetAccept watches one listening socket. Each readiness accepts up to ``ACCEPT_BATCH`` sockets
(non-blocking, TCP_NODELAY), enforces ``proxy.config.net.max_connections_in`` (over the limit:
closed at once and counted as throttled), and hands each new VC to the ``on_accept`` callback.
EMFILE/ENFILE pause accepting for a short back-off instead of spinning on a readable listener.

``connect`` starts a non-blocking connect and calls back ``NET_EVENT_OPEN`` with the VC or
``NET_EVENT_OPEN_FAILED`` with the errno (ETIMEDOUT when the VC's inactivity timeout, the
caller's connect timeout, expires first).
"""

from __future__ import annotations

import errno
import selectors
import socket
import sys
from collections.abc import Callable
from typing import Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import EVENT_IMMEDIATE, NET_EVENT_OPEN, NET_EVENT_OPEN_FAILED, Continuation
from iocore.net.net_handler import NetHandler
from iocore.net.net_vconnection import NetVConnection, PlainNetVConnection
from iocore.records.stats import METRIC_ID

ACCEPT_BATCH = 64
_M_ACCEPTS = METRIC_ID["proxy.process.net.accepts_total"]
_M_THROTTLED = METRIC_ID["proxy.process.net.connections_throttled_in"]
_dbg = DbgCtl("net_accept")


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
