"""NetHandler: per-EThread bookkeeping of NetVConnections (ATS UnixNet.cc, InactivityCop).

It owns the read and write *ready lists* (dicts used as ordered sets), which the EThread runs
before and after polling: a VC lands on the read ready list when it is re-enabled while bytes
are already buffered (decrypted TLS records, a replayed ClientHello), and on the write ready
list whenever its producer added data (so writes are coalesced into one send per iteration).

The inactivity cop sweeps the open VCs once per second, as ATS does, instead of arming one
timer per VC: a VC past its inactivity or active deadline gets ``VC_EVENT_INACTIVITY_TIMEOUT``
/ ``VC_EVENT_ACTIVE_TIMEOUT`` on its read (else write) continuation, or is closed when nobody
listens. The same sweep expires the PROXY protocol readers of ``pp`` ports that are still
waiting for their header (``proxy_protocol_pending``, empty unless such a port is busy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.ethread import EThread
from iocore.eventsystem.event import (
    EVENT_INTERVAL,
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_INACTIVITY_TIMEOUT,
    Continuation,
)
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
    from iocore.net.net_accept import ProxyProtocolAccept
    from iocore.net.net_vconnection import NetVConnection

_log = logging.getLogger("tsproxy.net")

_M_OPEN = METRIC_ID["proxy.process.net.connections_currently_open"]
_M_INACTIVITY = METRIC_ID["proxy.process.net.inactivity_timeouts"]


class NetHandler(Continuation):
    """Ready lists, the open-VC set and the inactivity cop of one EThread."""

    def __init__(self, thread: EThread, stats: Any) -> None:
        super().__init__(self._inactivity_cop)
        self.thread = thread
        self.stats = stats  # SlotStats of this worker (counters memoryview at .counters)
        self.counters = stats.counters
        self.open_vcs: dict[NetVConnection, None] = {}
        self.read_ready_list: dict[NetVConnection, None] = {}
        self.write_ready_list: dict[NetVConnection, None] = {}
        self.ssl_scratch: Any = None  # the TLS data path's scratch memory (tls_data_path)
        self.proxy_protocol_pending: dict[ProxyProtocolAccept, None] = {}
        thread.ready_callbacks.append(self._process_read_ready)
        thread.post_io_callbacks.append(self._process_write_ready)
        thread.schedule_every(self, 1.0, EVENT_INTERVAL)

    def add_vc(self, vc: NetVConnection) -> None:
        self.open_vcs[vc] = None
        self.counters[_M_OPEN] += 1

    def remove_vc(self, vc: NetVConnection) -> None:
        # Unconditionally: a connect in progress registered the fd on the VC's behalf.
        self.thread.unregister(vc.fd)
        vc._registered = False
        vc._mask = 0
        self.read_ready_list.pop(vc, None)
        self.write_ready_list.pop(vc, None)
        if self.open_vcs.pop(vc, 0) is None:
            self.counters[_M_OPEN] -= 1

    def _process_read_ready(self) -> bool:
        """The read ready list, before the poll. True while the poll must not sleep: more VCs
        are read-ready, or writes are queued (by this pass or a timer) that only the flush
        after the poll sends. Sleeping then held a response until the next timer: up to half
        a second for a request that came in the same packet as the client's Finished."""
        if not self.read_ready_list:
            return bool(self.write_ready_list)
        ready = self.read_ready_list
        self.read_ready_list = {}
        for vc in ready:
            if not vc.closed:
                try:  # as vc.guarded(vc.net_read_io)
                    vc.net_read_io()
                except Exception:
                    _log.exception("unexpected error on %r; closing it", vc)
                    vc.do_io_close()
        return bool(self.read_ready_list) or bool(self.write_ready_list)

    def _process_write_ready(self) -> None:
        # Writes queued by callbacks run during this flush are flushed in the same pass.
        while self.write_ready_list:
            ready = self.write_ready_list
            self.write_ready_list = {}
            for vc in ready:
                if not vc.closed:
                    try:  # as vc.guarded(vc.write_to_net_io)
                        vc.write_to_net_io()
                    except Exception:
                        _log.exception("unexpected error on %r; closing it", vc)
                        vc.do_io_close()

    def _inactivity_cop(self, event: int, data: Any) -> int:
        now = self.thread.now
        expired: list[tuple[NetVConnection, int]] = []
        for vc in self.open_vcs:
            if vc.inactivity_at and vc.inactivity_at <= now:
                expired.append((vc, VC_EVENT_INACTIVITY_TIMEOUT))
            elif vc.active_at and vc.active_at <= now:
                expired.append((vc, VC_EVENT_ACTIVE_TIMEOUT))
        for vc, ev in expired:
            if vc.closed:
                continue
            if ev == VC_EVENT_INACTIVITY_TIMEOUT:
                self.counters[_M_INACTIVITY] += 1
            vc.inactivity_at = vc.active_at = 0.0
            vc.guarded(vc.on_timeout, ev)
        if self.proxy_protocol_pending:
            for reader in [r for r in self.proxy_protocol_pending if r.deadline <= now]:
                reader.expire()
        return 0

    def close_all(self) -> None:
        for vc in list(self.open_vcs):
            vc.do_io_close()
