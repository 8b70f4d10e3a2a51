"""NetVConnection: a non-blocking socket driven by one EThread (ATS UnixNetVConnection.cc).

Theory of operation
-------------------
A state machine asks for I/O with ``do_io_read(cont, nbytes, buf)`` and
``do_io_write(cont, nbytes, reader)``; each returns a VIO. The NetHandler calls
``net_read_io`` when the socket is readable and ``write_to_net_io`` when it is writable (or when
the VC is on a ready list). After moving bytes, the VC calls the VIO's continuation back with
``VC_EVENT_READ_READY`` / ``READ_COMPLETE`` / ``WRITE_READY`` / ``WRITE_COMPLETE`` / ``EOS`` /
``ERROR``.

Backpressure is reenable-driven: ``net_read_io`` reads only while the read buffer is below its
water mark; once it is full the VC drops read interest and stays quiet until the consumer drains
the buffer and calls ``vio.reenable()`` (``read_reschedule``). Writes are coalesced: a
``reenable`` on the write VIO only puts the VC on the write ready list, which the NetHandler
flushes once per loop iteration, so a header and a small body leave in one ``send``.

Selector interest follows from state (``_update_interest``) and the selector is touched only
when the wanted mask changes. Closing is idempotent; after ``do_io_close`` no callback fires.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.event import (
    NET_EVENT_OPEN_FAILED,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_COMPLETE,
    VC_EVENT_WRITE_READY,
    Continuation,
)
from iocore.eventsystem.iobuffer import VIO, IOBufferReader, MIOBuffer

if TYPE_CHECKING:
    from iocore.net.net_handler import NetHandler
    from iocore.net.proxy_protocol import ProxyHeader

_log = logging.getLogger("tsproxy.net")
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
READ_CHUNK = 65536


class NetVConnection(Continuation):
    """A TCP connection with a read VIO and a write VIO."""

    # Slots: thousands of these live at once (an idle keep-alive connection is one of them).
    __slots__ = (
        "_mask",
        "_registered",
        "_write_blocked",
        "active_at",
        "closed",
        "connect_waiter",
        "eos",
        "fd",
        "inactivity_at",
        "inactivity_timeout",
        "local_addr",
        "nh",
        "outbound",
        "proxy_protocol",
        "read",
        "read_enabled",
        "remote_addr",
        "sock",
        "stats",
        "user_data",
        "write",
        "write_enabled",
    )
    is_ssl = False

    def __init__(self, sock: socket.socket, nh: NetHandler, *, outbound: bool = False) -> None:
        super().__init__()
        self.sock = sock
        self.fd = sock.fileno()
        self.nh = nh
        self.outbound = outbound
        self.read = VIO(VIO.READ)
        self.read.vc = self
        self.write = VIO(VIO.WRITE)
        self.write.vc = self
        self.read_enabled = False
        self.write_enabled = False
        self.closed = False
        self.eos = False
        self._mask = 0
        self._registered = False
        self._write_blocked = False  # the socket did not take all we offered: wait for EVENT_WRITE
        # Timeouts: absolute monotonic deadlines checked by the NetHandler's inactivity cop.
        self.inactivity_timeout = 0.0
        self.inactivity_at = 0.0
        self.active_at = 0.0
        self.remote_addr: tuple[Any, ...] = ()
        self.local_addr: tuple[Any, ...] = ()
        self.user_data: Any = None
        # The PROXY protocol header this connection opened with (pp ports only; its ``peer``
        # is the balancer's address, remote_addr the client's it carried).
        self.proxy_protocol: ProxyHeader | None = None
        # Who waits for NET_EVENT_OPEN while an outbound connect is in progress (set by connect):
        # a timeout before the connect finished is reported to it as NET_EVENT_OPEN_FAILED.
        self.connect_waiter: Continuation | None = None
        self.stats = nh.stats

    # -- addresses --------------------------------------------------------------------------
    def set_addrs(self) -> None:
        try:
            self.remote_addr = self.sock.getpeername()
            self.local_addr = self.sock.getsockname()
        except OSError:
            pass

    @property
    def remote_ip(self) -> str:
        return str(self.remote_addr[0]) if self.remote_addr else ""

    # -- the VConnection API ---------------------------------------------------------------
    def do_io_read(self, cont: Continuation | None, nbytes: int, buf: MIOBuffer | None) -> VIO:
        vio = self.read
        vio.cont = cont
        vio.nbytes = nbytes
        vio.ndone = 0
        vio.buffer = buf
        self.read_enabled = cont is not None and buf is not None and nbytes > 0
        if not self.closed:
            self.read_reschedule()
        return vio

    def do_io_write(self, cont: Continuation | None, nbytes: int, reader: IOBufferReader | None) -> VIO:
        vio = self.write
        vio.cont = cont
        vio.nbytes = nbytes
        vio.ndone = 0
        vio.reader = reader
        self.write_enabled = cont is not None and reader is not None and nbytes > 0
        if not self.closed and self.write_enabled:
            self.nh.write_ready_list[self] = None
        return vio

    def do_io_close(self, error: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self.read_enabled = self.write_enabled = False
        read, write = self.read, self.write
        read.cont = write.cont = None
        read.vc = write.vc = None  # VIO <-> VC is a cycle; a closed VC is freed by refcount
        self.nh.remove_vc(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def do_io_shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reenable(self, vio: VIO) -> None:
        if self.closed:
            return
        if vio is self.read:
            self.read_enabled = vio.cont is not None
            self.read_reschedule()
        else:
            self.write_enabled = vio.cont is not None
            self.nh.write_ready_list[self] = None

    def disable(self, vio: VIO) -> None:
        if vio is self.read:
            self.read_enabled = False
        else:
            self.write_enabled = False
        self._update_interest()

    def read_reschedule(self) -> None:
        """Continue reading: poll for readability, or run now when bytes are already buffered."""
        if self._has_buffered_input():
            self.nh.read_ready_list[self] = None
        # The interest is recomputed only when reading may have to start or stop; the common
        # case (polling for reads already) leaves the selector alone. A full buffer is noticed
        # at the next read (_read_no_room): its downstream may drain before the next poll.
        if not self.read_enabled or self.read.buffer is None or not self._mask & EVENT_READ:
            self._update_interest()

    # -- timeouts --------------------------------------------------------------------------
    def set_inactivity_timeout(self, seconds: float) -> None:
        self.inactivity_timeout = seconds
        self.inactivity_at = self.nh.thread.now + seconds if seconds > 0 else 0.0

    def cancel_inactivity_timeout(self) -> None:
        self.inactivity_timeout = 0.0
        self.inactivity_at = 0.0

    def set_active_timeout(self, seconds: float) -> None:
        self.active_at = self.nh.thread.now + seconds if seconds > 0 else 0.0

    def on_timeout(self, event: int) -> None:
        """Deliver an inactivity/active timeout to whoever listens, or close the VC."""
        cont = self.read.cont if self.read.cont is not None else self.write.cont
        if cont is None:
            waiter = self.connect_waiter
            self.connect_waiter = None
            self.do_io_close()
            if waiter is not None:
                waiter.handle_event(NET_EVENT_OPEN_FAILED, errno.ETIMEDOUT)
        else:
            cont.handle_event(event, self.read if self.read.cont is not None else self.write)

    def net_activity(self) -> None:
        if self.inactivity_timeout:
            self.inactivity_at = self.nh.thread.now + self.inactivity_timeout

    # -- interest ----------------------------------------------------------------------------
    def _has_buffered_input(self) -> bool:
        return False

    def _wants_read(self) -> bool:
        vio = self.read
        return self.read_enabled and vio.buffer is not None and not vio.buffer.high_water()

    def _wants_write(self) -> bool:
        return False

    def _update_interest(self) -> None:
        if self.closed:
            return
        mask = (EVENT_READ if self._wants_read() else 0) | (EVENT_WRITE if self._wants_write() else 0)
        if mask == self._mask:
            return
        thread = self.nh.thread
        if mask == 0:
            thread.unregister(self.fd)
            self._registered = False
        elif self._registered:
            thread.modify(self.fd, mask)
        else:
            thread.register_handler(self.fd, mask, self)
            self._registered = True
        self._mask = mask

    def on_io(self, mask: int) -> None:
        """Readiness of the socket (the poller holds the VC itself, see IOHandler)."""
        # The body of guarded(), here directly: on_io runs once per readiness event.
        try:
            self._on_io_unguarded(mask)
        except Exception:
            _log.exception("unexpected error on %r; closing it", self)
            self.do_io_close()

    def guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of this VC; an unexpected exception (ours or a plugin's) fails this
        connection, never the worker."""
        try:
            fn(*args)
        except Exception:
            _log.exception("unexpected error on %r; closing it", self)
            self.do_io_close()

    def _on_io_unguarded(self, mask: int) -> None:
        if mask & EVENT_READ:
            self.net_read_io()
        if mask & EVENT_WRITE and not self.closed:
            self.write_to_net_io()

    # -- reading -----------------------------------------------------------------------------
    def _signal(self, vio: VIO, event: int) -> None:
        cont = vio.cont
        if cont is not None and not self.closed:
            cont.handle_event(event, vio)

    def net_read_io(self) -> None:
        """Read what the socket has into the read VIO's buffer and call the consumer back."""
        vio = self.read
        buf = vio.buffer
        if self.closed or not self.read_enabled or buf is None:
            self._update_interest()
            return
        room = min(buf.write_avail(), vio.nbytes - vio.ndone)
        if room <= 0:
            self._read_no_room()
            return
        try:
            data = self.sock.recv(min(room, READ_CHUNK))
        except BlockingIOError:
            return
        except InterruptedError:
            return
        except OSError:
            self.read_enabled = False
            self._signal(vio, VC_EVENT_ERROR)
            return
        if not data:
            self.eos = True
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_EOS)
            return
        self._deliver(data)

    def _read_no_room(self) -> None:
        """The socket is readable but the buffer is full: stop polling for reads until the
        consumer re-enables. When the buffer is full because of its downstream buffer (see
        MIOBuffer), the consumer may not know the read stopped (it handed the bytes on and
        re-enabled): it gets a READ_READY with nothing new, to wait for its downstream."""
        self._update_interest()
        buf = self.read.buffer
        if buf is not None and buf.downstream is not None:
            self._signal(self.read, VC_EVENT_READ_READY)

    def _deliver(self, data: bytes) -> None:
        vio = self.read
        buf = vio.buffer
        assert buf is not None
        buf.write(data)
        vio.ndone += len(data)
        self.net_activity()
        if vio.ndone >= vio.nbytes:
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_READ_COMPLETE)
        else:
            # A full buffer is noticed at the next read (_read_no_room), not here: the consumer
            # usually drains it in this callback, and a downstream buffer (see MIOBuffer)
            # drains before the next poll; dropping and restoring the interest around that
            # would cost two system calls per read.
            self._signal(vio, VC_EVENT_READ_READY)

    # -- writing -----------------------------------------------------------------------------
    def write_to_net_io(self) -> None:
        """Send what the write VIO's reader holds; signal WRITE_READY when drained, or COMPLETE."""
        vio = self.write
        reader = vio.reader
        if self.closed or not self.write_enabled or reader is None:
            self._update_interest()
            return
        avail = reader.read_avail()
        todo = vio.nbytes - vio.ndone
        if avail > todo:
            avail = todo
        if avail:
            try:
                with reader.peek(avail) as view:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.write_enabled = False
                self._signal(vio, VC_EVENT_ERROR)
                return
            if n:
                reader.consume(n)
                vio.ndone += n
                self.net_activity()
            if n < avail:
                self._set_write_blocked(True)
                return
        if self._write_blocked:
            self._set_write_blocked(False)
        if vio.ndone >= vio.nbytes:
            self.write_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_WRITE_COMPLETE)
        elif avail:
            self._signal(vio, VC_EVENT_WRITE_READY)

    def _set_write_blocked(self, blocked: bool) -> None:
        if blocked != self._write_blocked:
            self._write_blocked = blocked
            self._update_interest()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd} {self.remote_addr}>"


class PlainNetVConnection(NetVConnection):
    """A cleartext TCP connection."""

    __slots__ = ()

    def _wants_write(self) -> bool:
        return self._write_blocked and self.write_enabled
