"""Blind tunnels: relay bytes both ways without looking at them (ATS blind tunnel / HttpSM
tunnel for TRANSPORT_BLIND_TUNNEL).

Each direction uses one MIOBuffer as the source VC's read buffer *and* (through a reader) the
destination VC's write buffer, so backpressure needs no code: when the destination is slow the
buffer reaches its water mark and the source VC stops reading; the destination's WRITE_READY
(drained) re-enables the source. Bytes read before the tunnel was decided (a ClientHello on a
``tr-pass`` port, or one a plugin tunnels) are replayed first. EOS on one side half-closes the
other once the buffered bytes went out; the tunnel ends when both directions ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    NET_EVENT_OPEN,
    VC_EVENT_EOS,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_COMPLETE,
    VC_EVENT_WRITE_READY,
    Continuation,
    ignore_event,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.net.net_accept import connect
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
    from iocore.net.net_handler import NetHandler
    from iocore.net.net_vconnection import NetVConnection
    from tsproxy.resolver import Resolver

_dbg = DbgCtl("tunnel")
M_TOTAL = METRIC_ID["proxy.process.tunnel.total_client_connections_blind_tcp"]
M_CURRENT = METRIC_ID["proxy.process.tunnel.current_client_connections_blind_tcp"]
WATER_MARK = 128 * 1024


def parse_destination(dest: str) -> tuple[str, int]:
    host, sep, port = dest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"tunnel destination {dest!r} is not host:port")
    return host.strip("[]"), int(port)


class _Direction:
    __slots__ = ("buf", "dst", "eos", "src")

    def __init__(self, src: NetVConnection, dst: NetVConnection) -> None:
        self.src = src
        self.dst = dst
        self.buf = MIOBuffer(WATER_MARK)
        self.eos = False


class BlindTunnel(Continuation):
    """Relays a client VC to a destination, replaying ``replay`` first."""

    def __init__(
        self,
        nh: NetHandler,
        client: NetVConnection,
        replay: bytes,
        dest: str | None,
        resolver: Resolver,
        inactivity_timeout: float,
    ) -> None:
        super().__init__(self._connected)
        self.nh = nh
        self.client = client
        self.replay = replay
        self.timeout = inactivity_timeout
        self.dirs: list[_Direction] = []
        self.server: NetVConnection | None = None
        self.done = False
        nh.counters[M_TOTAL] += 1
        nh.counters[M_CURRENT] += 1
        client.do_io_read(None, 0, None)
        if not dest:
            _dbg("no tunnel destination for %s (set proxy.config.tunnel.route)", client.remote_addr)
            self._close()
            return
        try:
            host, port = parse_destination(dest)
            resolved = resolver.resolve_cached(host, port)  # blocking on a miss, as before
            if resolved.error is not None:
                raise OSError(resolved.error)
            family, addr = resolved.family, resolved.addr
        except (OSError, ValueError) as exc:
            _dbg("bad tunnel destination %s: %s", dest, exc)
            self._close()
            return
        vc = connect(nh, self, addr, family)
        if vc is not None:
            vc.set_inactivity_timeout(inactivity_timeout)
            self.server = vc

    def _connected(self, event: int, data: Any) -> None:
        if event != NET_EVENT_OPEN or self.client.closed:
            self._close()
            return
        server: NetVConnection = data
        self.server = server
        up = _Direction(self.client, server)
        down = _Direction(server, self.client)
        self.dirs = [up, down]
        self.set_handler(self._relay)
        up_reader = up.buf.alloc_reader()
        if self.replay:
            up.buf.write(self.replay)
        self.client.do_io_read(self, INT64_MAX, up.buf)
        server.do_io_write(self, INT64_MAX, up_reader)
        server.do_io_read(self, INT64_MAX, down.buf)
        self.client.do_io_write(self, INT64_MAX, down.buf.alloc_reader())
        for vc in (self.client, server):
            vc.set_inactivity_timeout(self.timeout)

    def _relay(self, event: int, vio: Any) -> None:
        if self.done:
            return
        vc = vio.vc
        if event in (VC_EVENT_READ_READY, VC_EVENT_READ_COMPLETE):
            for d in self.dirs:
                if d.src is vc:
                    d.dst.write.reenable()
        elif event == VC_EVENT_WRITE_READY:
            for d in self.dirs:
                if d.dst is vc:
                    if d.eos:
                        d.dst.do_io_shutdown_write()
                    else:
                        d.src.read.reenable()
        elif event == VC_EVENT_EOS:
            for d in self.dirs:
                if d.src is vc:
                    d.eos = True
                    if not d.buf.max_read_avail():
                        d.dst.do_io_shutdown_write()
            if all(d.eos for d in self.dirs):
                self._close()
        elif event == VC_EVENT_WRITE_COMPLETE:
            pass
        else:  # errors and timeouts end the tunnel
            self._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        self.nh.counters[M_CURRENT] -= 1
        self.client.do_io_close()
        if self.server is not None:
            self.server.do_io_close()
        self.handler = ignore_event  # free at once (see Continuation)
        for d in self.dirs:
            d.buf.dealloc_all_readers()
