"""Origin connections: the per-worker pool, server groups, and the OriginConnector machine.

Theory of operation
-------------------
An ``HttpSM`` that needs an origin connection first asks the ``OriginPool`` (idle keep-alive
connections per (scheme, host, port, TLS options)); when none is idle it starts an
``OriginConnector``, ATS's ``do_http_server_open`` .. ``state_http_server_open`` as a small machine
of its own::

    start --resolve (off the loop on a cache miss), per_server cap--> CONNECTING
        --NET_EVENT_OPEN--> VCONN_OUTBOUND_START hooks
        --(https)--> TLS handshake --> verification (origin_tls) --> SSL_VERIFY_SERVER hooks
        --> ready: HttpSM.origin_ready(OriginConnection)

A failed connect is retried at once while ``connect_attempts_max_retries`` (less for an origin
marked down, OriginHealth) allows; any other failed step ends in ``HttpSM.origin_failed(502,
reason)``. The steps are bound methods of the connector (the outbound hook runner and the TLS
handshake call them back), so a connect allocates the connector and nothing per step. The SM
holds its connector while it works (``HttpSM.connector``: the transaction is blocked meanwhile);
when the transaction is answered or closed first it ``cancel``s it, which closes the VC being set
up, and every later step of that connector drops what it gets.

``ServerGroups`` keeps ``proxy.config.http.per_server.connection.max`` with its queue; an
``OriginConnection`` is one connection, owned by an SM during a transaction, else by the pool.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    EVENT_IMMEDIATE,
    NET_EVENT_OPEN,
    NET_EVENT_OPEN_FAILED,
    Continuation,
    ignore_event,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.net.hooks import HookID
from iocore.net.net_accept import connect
from iocore.net.net_vconnection import EVENT_READ
from iocore.net.ssl_config import VerifyServerPolicy
from iocore.net.ssl_net_vconnection import OutboundHooks, OutboundPlainNetVConnection, SSLNetVConnection
from iocore.records.errors import TSError
from iocore.records.stats import process_metric
from tsproxy.http.parser import ResponseParser
from tsproxy.origin_tls import M_VERIFY_FAILED, OriginTLS
from tsproxy.remap import OriginKey

if TYPE_CHECKING:
    from iocore.net.net_vconnection import NetVConnection
    from tsproxy.http_sm import HttpProcessor, HttpSM
    from tsproxy.origin_tls import OriginTLSSettings
    from tsproxy.resolver import ResolveResult

_dbg = DbgCtl("http")
_log = logging.getLogger("tsproxy.http")

MAX_IDLE_PER_ORIGIN = 128


M_CUR_SERVER = process_metric("http", "current_server_connections")
M_TOTAL_SERVER = process_metric("http", "total_server_connections")
M_CONNECT_FAIL = process_metric("http", "err_connect_fail_count")
M_THROTTLED_OUT = process_metric("http", "origin_connections_throttled_out")
M_QUEUED = process_metric("http", "origin_connections_queued")


class ServerGroup:
    """The origin connections (open or opening) of one upstream server group, and the
    transactions waiting for one at the per_server.connection.max cap, oldest first."""

    __slots__ = ("vcs", "waiters")

    def __init__(self) -> None:
        self.vcs: dict[NetVConnection, None] = {}
        self.waiters: deque[tuple[HttpSM, OriginConnector, float]] = deque()

    def count(self) -> int:
        vcs = self.vcs
        for vc in [vc for vc in vcs if vc.closed]:
            del vcs[vc]
        return len(vcs)


class ServerGroups(Continuation):
    """``proxy.config.http.per_server.connection.max`` (ATS's OutboundConnTrack), per worker.

    A group is what ``per_server.connection.match`` says (the origin's address, address and
    port, remapped host name, or all three). A transaction that needs a new connection to a
    group already at the cap waits (it is "connecting" meanwhile, so its client reads no
    further) in the group's queue, at most ``per_server.connection.queue_size`` of them
    (-1 unlimited, 0 none). A connection that closes or goes back to the pool wakes the queue
    at once, and it is rechecked every ``queue_delay`` ms besides (a failed connect frees a
    slot without telling anyone). A woken transaction takes an idle pooled connection of its
    origin if there is one, else connects, closing an idle connection of the group to another
    host name if that is what keeps the group full. A transaction still waiting after
    ``proxy.config.http.connect_attempts_timeout`` (the time it may take to get an origin
    connection) is answered 503, counted in ``origin_connections_throttled_out``.
    """

    def __init__(self, proc: HttpProcessor) -> None:
        super().__init__(self._run)
        self.proc = proc
        self.groups: dict[Hashable, ServerGroup] = {}
        self.waiting = 0  # transactions in the queues (stale entries included until a run)
        self._timer = False
        self._kicked = False

    def group_of(self, key: OriginKey, addr: tuple[Any, ...]) -> ServerGroup:
        match = self.proc.http.ps_match
        name: Hashable
        if match == "ip":
            name = addr[0]
        elif match == "port":
            name = (addr[0], addr[1])
        elif match == "host":
            name = key[1]
        else:
            name = (addr[0], addr[1], key[1])
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = ServerGroup()
        return group

    def wait(self, sm: HttpSM, key: OriginKey, group: ServerGroup) -> None:
        http = self.proc.http
        size = http.ps_queue_size
        if size == 0 or (size > 0 and len(group.waiters) >= size):
            self._refuse(sm, key)
            return
        token = sm.connector = OriginConnector(sm, key)  # not started: "connecting" while queued
        thread = self.proc.nh.thread
        group.waiters.append((sm, token, thread.now + http.connect_timeout))
        self.waiting += 1
        self.proc.counters[M_QUEUED] += 1
        _dbg("origin %s:%s at per_server.connection.max: transaction queued", key[1], key[2])
        if not self._timer:
            self._timer = True
            thread.schedule_in(self, http.ps_queue_delay)

    def kick(self) -> None:
        """A connection of some group closed or went idle: run the queues now."""
        if not self._kicked:
            self._kicked = True
            self.proc.nh.thread.schedule_imm(self)

    def _refuse(self, sm: HttpSM, key: OriginKey) -> None:
        self.proc.counters[M_THROTTLED_OUT] += 1
        sm.send_error(
            503, f"too many connections to origin {key[1]}:{key[2]} (per_server.connection.max)", close=False
        )

    def _run(self, event: int, data: Any) -> None:
        if event == EVENT_IMMEDIATE:
            self._kicked = False
        else:
            self._timer = False
        proc = self.proc
        now = proc.nh.thread.now
        waiting = 0
        for name, group in list(self.groups.items()):
            if group.waiters:
                self._run_group(group, now)
                waiting += len(group.waiters)
            elif not group.count():
                del self.groups[name]
        self.waiting = waiting
        if waiting and not self._timer:
            self._timer = True
            proc.nh.thread.schedule_in(self, proc.http.ps_queue_delay)

    def _run_group(self, group: ServerGroup, now: float) -> None:
        proc = self.proc
        cap = proc.http.ps_max
        waiters = group.waiters
        while waiters:
            sm, token, deadline = waiters[0]
            if sm.closed or sm.connector is not token:
                waiters.popleft()  # gone, or answered meanwhile
                continue
            key = token.key
            if cap and not proc.pool.idle.get(key) and group.count() >= cap and not self._free_idle(group):
                break
            waiters.popleft()
            self._resume(sm, None)
        for entry in list(waiters):
            sm, token, deadline = entry
            if sm.closed or sm.connector is not token:
                waiters.remove(entry)
            elif deadline <= now:
                waiters.remove(entry)
                self._resume(sm, token.key)

    def _resume(self, sm: HttpSM, refuse: OriginKey | None) -> None:
        """The transaction's turn: get its origin connection, or (waited too long) a 503."""
        sm.connector = None
        try:
            if refuse is None:
                sm.connect_turn()
            else:
                self._refuse(sm, refuse)
            sm.resume_client()
        except Exception:
            _log.exception("resuming a transaction queued at per_server.connection.max; closing it")
            sm.close()

    def _free_idle(self, group: ServerGroup) -> bool:
        """Close an idle pooled connection of the group (to another host name of it) so that a
        waiting transaction can connect; False when every connection of the group is busy."""
        for vc in group.vcs:
            conn = vc.read.cont
            if isinstance(conn, OriginConnection) and conn.sm is None and not vc.closed:
                self.proc.pool.remove(conn)
                conn.close()
                return True
        return False


class OriginPool:
    """Idle keep-alive origin connections per (scheme, host, port)."""

    def __init__(self, proc: HttpProcessor) -> None:
        self.proc = proc
        self.idle: dict[OriginKey, list[OriginConnection]] = {}

    def get(self, key: OriginKey) -> OriginConnection | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if not conn.vc.closed:
                return conn
        return None

    def put(self, conn: OriginConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns is None:  # not setdefault: that builds a new empty list on every call
            conns = self.idle[conn.key] = []
        if len(conns) >= MAX_IDLE_PER_ORIGIN or self.proc.draining or conn.config is not self.proc.config:
            conn.close()
            return
        conn.park(self.proc.http.ka_timeout_out)
        conns.append(conn)
        if self.proc.servers.waiting:
            self.proc.servers.kick()  # a transaction queued at the cap may take it

    def remove(self, conn: OriginConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()


class OriginConnection(Continuation):
    """One connection to an origin; owned by an HttpSM during a transaction, else by the pool."""

    __slots__ = (
        "config",
        "key",
        "parser",
        "proc",
        "read_buf",
        "reader",
        "requests",
        "sm",
        "vc",
        "write_buf",
        "write_reader",
    )

    def __init__(self, proc: HttpProcessor, key: OriginKey, vc: NetVConnection) -> None:
        super().__init__(self._handle_idle)
        self.proc = proc
        self.key = key
        self.vc = vc
        self.config = proc.config  # the snapshot this connection was opened (and verified) under
        self.sm: HttpSM | None = None
        self.parser = ResponseParser()
        high_water = proc.http.flow_high_water
        # The response: while an HttpSM owns the connection, its client write buffer is this
        # buffer's downstream, so the origin is read only while the two hold less than
        # high_water together (proxy.config.http.flow_control.high_water; see attach).
        self.read_buf = MIOBuffer(high_water)
        self.reader = self.read_buf.alloc_reader()
        self.write_buf = MIOBuffer(high_water)  # the request and its body (uploads)
        self.write_reader = self.write_buf.alloc_reader()
        self.requests = 0
        proc.counters[M_CUR_SERVER] += 1
        proc.counters[M_TOTAL_SERVER] += 1

    def attach(self, sm: HttpSM, client_buf: MIOBuffer) -> None:
        self.sm = sm
        self.handler = sm.handle_origin_event  # set_handler, without the call
        self.read_buf.downstream = client_buf
        vc = self.vc
        rvio = vc.read
        if (
            vc._mask == EVENT_READ
            and vc.read_enabled
            and rvio.cont is self
            and rvio.buffer is self.read_buf
            and rvio.nbytes == INT64_MAX
            and not self.read_buf.high_water()
            and not vc._has_buffered_input()
        ):
            # A pooled connection park() left reading (and polled for reading only) into
            # read_buf: do_io_read would only reset ndone, as its reschedule would find no
            # buffered input and compute the interest already registered.
            rvio.ndone = 0
        else:
            vc.do_io_read(self, INT64_MAX, self.read_buf)
        vc.do_io_write(self, INT64_MAX, self.write_reader)
        vc.set_inactivity_timeout(self.proc.http.txn_timeout_out)

    def park(self, timeout: float) -> None:
        self.sm = None
        read_buf = self.read_buf
        read_buf.downstream = None
        read_buf.water_mark = self.proc.http.flow_high_water  # after a throttled transaction
        self.handler = self._handle_idle  # set_handler, without the call
        self.vc.set_inactivity_timeout(timeout)
        self.vc.set_active_timeout(0)  # transaction_active_timeout_out ends with the transaction
        if not self.vc.read_enabled:
            self.vc.do_io_read(self, INT64_MAX, self.read_buf)

    def _handle_idle(self, event: int, data: Any) -> None:
        # Anything from an idle origin (close, junk, timeout) retires the connection.
        self.proc.pool.remove(self)
        self.close()

    def close(self) -> None:
        if not self.vc.closed:
            self.vc.do_io_close()
            self.proc.counters[M_CUR_SERVER] -= 1
            if self.proc.servers.waiting:
                self.proc.servers.kick()  # a slot of its server group is free
        self.sm = None
        # Free what refers back to itself (see Continuation): gone at once, not at the next GC.
        self.handler = ignore_event
        self.parser.close()
        self.read_buf.downstream = None
        self.read_buf.dealloc_all_readers()
        self.write_buf.dealloc_all_readers()


class OriginConnector(Continuation):
    """One new origin connection being set up for ``sm`` (see the module docstring)."""

    __slots__ = ("key", "settings", "sm", "vc")

    def __init__(self, sm: HttpSM, key: OriginKey) -> None:
        super().__init__()  # the handler is set per connect (start): no cycle while queued
        self.sm: HttpSM | None = sm
        self.key = key
        self.vc: NetVConnection | None = None  # the VC being set up (closed by cancel)
        self.settings: OriginTLSSettings | None = None

    def start(self) -> None:
        """Resolve and connect (or queue at the server group's cap); a retry starts here again."""
        sm = self.sm
        assert sm is not None
        key = self.key
        # A cache miss resolves on the resolver's threads: the loop goes on, _resolved follows.
        result = sm.proc.resolver.lookup(key[1], key[2], self._resolved)
        if result is not None:
            self._connect(sm, result)

    def _resolved(self, result: ResolveResult) -> None:
        """The resolver's answer, later on the loop."""
        sm = self.sm
        if sm is None or sm.connector is not self or sm.closed:
            return
        self._connect(sm, result)

    def _connect(self, sm: HttpSM, result: ResolveResult) -> None:
        key = self.key
        proc = sm.proc
        if result.error is not None:
            sm.connect_attempts += 1
            self._fail(sm, result.error)
            return
        family, addr = result.family, result.addr
        group: ServerGroup | None = None
        cap = sm.http.ps_max
        if cap:
            group = proc.servers.group_of(key, addr)
            if group.count() >= cap:
                proc.servers.wait(sm, key, group)  # no attempt yet: it is counted when made
                return
        sm.connect_attempts += 1
        # Plain origins get the VC that delivers VCONN_OUTBOUND_CLOSE (one attribute check per close).
        make_vc = SSLNetVConnection if key[0] == "https" else OutboundPlainNetVConnection
        self.handler = self._opened  # one event per connect, then ignore_event (see Continuation)
        vc = self.vc = connect(proc.nh, self, addr, family, make_vc=make_vc)
        if vc is not None:
            if group is not None:
                group.vcs[vc] = None
            # Covers the connect and, for https, the TLS handshake (no net activity is counted
            # before the handshake completes).
            vc.set_inactivity_timeout(sm.http.connect_timeout)

    def cancel(self) -> None:
        """The transaction no longer wants this connection: close what is being set up."""
        self.sm = None
        vc = self.vc
        self.vc = None
        if vc is not None:
            vc.do_io_close()

    def _claim(self) -> HttpSM | None:
        """The SM still wants this step's result; else the VC is closed and None returned."""
        sm = self.sm
        if sm is None or sm.connector is not self or sm.closed:
            vc = self.vc
            self.vc = None
            if vc is not None:
                vc.do_io_close()
            return None
        return sm

    def _fail(self, sm: HttpSM, reason: str) -> None:
        self.sm = None
        self.vc = None
        sm.origin_failed(502, reason)

    def _ready(self, sm: HttpSM, vc: NetVConnection) -> None:
        self.sm = None
        self.vc = None
        sm.origin_ready(OriginConnection(sm.proc, self.key, vc))

    def _opened(self, event: int, data: Any) -> None:
        """NET_EVENT_OPEN / NET_EVENT_OPEN_FAILED of the connect."""
        self.handler = ignore_event
        sm = self.sm
        if sm is None or sm.connector is not self or sm.closed:
            if event == NET_EVENT_OPEN:
                data.do_io_close()
            return
        self.vc = None
        key = self.key
        proc = sm.proc
        if event == NET_EVENT_OPEN_FAILED:
            proc.counters[M_CONNECT_FAIL] += 1
            err = data if isinstance(data, int) else 0
            _dbg("connect to %s:%s failed: errno %s", key[1], key[2], err)
            http = sm.http
            health = proc.health
            allowed = health.attempts_allowed(key[1], key[2], http.connect_retries, http.connect_retries_dead)
            if sm.connect_attempts < allowed:
                self.start()  # connect_attempts_max_retries: at once, as ATS
                return
            health.mark_down(key[1], key[2], http.down_time, sm.connect_attempts, _strerror(err))
            self._fail(sm, f"origin {key[1]}:{key[2]} unreachable ({_strerror(err)})")
            return
        if sm.connect_attempts > 1 or proc.health.any_down:
            proc.health.mark_up(key[1], key[2])
        vc: NetVConnection = data
        settings: OriginTLSSettings | None = None
        if key[0] == "https":
            assert sm.remap is not None
            try:
                settings = proc.origin_tls.settings_for(sm.remap, sm.sni_outbound())
            except TSError as exc:
                vc.do_io_close()
                self._fail(sm, f"origin TLS configuration: {exc}")
                return
        self.vc = vc
        self.settings = settings
        hooks = proc.hooks
        if (
            hooks.has(HookID.VCONN_OUTBOUND_START)
            or hooks.has(HookID.VCONN_OUTBOUND_CLOSE)
            or hooks.has(HookID.SSL_VERIFY_SERVER)
        ) and isinstance(vc, (SSLNetVConnection, OutboundPlainNetVConnection)):
            # VCONN_OUTBOUND_START: after the connect, before any byte (for TLS: before the
            # ClientHello). The SM stays blocked on this connector while a hook pauses.
            runner = vc.outbound_hooks = OutboundHooks(vc, hooks, settings.sni if settings else None)
            runner.run(HookID.VCONN_OUTBOUND_START, self._outbound_started)
            return
        self._connected(sm, vc)

    def _outbound_started(self, ok: bool) -> None:
        sm = self._claim()
        vc = self.vc
        if sm is None or vc is None:
            return
        if not ok:
            vc.do_io_close()
            key = self.key
            self._fail(sm, f"origin {key[1]}:{key[2]}: connection failed in VCONN_OUTBOUND_START")
            return
        self._connected(sm, vc)

    def _connected(self, sm: HttpSM, vc: NetVConnection) -> None:
        settings = self.settings
        if settings is None:
            self._ready(sm, vc)
            return
        # ssl_start_handshake(SSL_EVENT_CLIENT); the SM stays blocked until it is done.
        assert isinstance(vc, SSLNetVConnection)
        vc.start_client_handshake(settings.ctx, settings.sni, self._tls_done)

    def _tls_done(self, vc: SSLNetVConnection, ok: bool) -> None:
        sm = self._claim()
        settings = self.settings
        if sm is None or settings is None:
            return
        proc = sm.proc
        counters = proc.counters
        key = self.key
        origin = f"{key[1]}:{key[2]}"
        if not ok:
            reason, metric = OriginTLS.classify_handshake_failure(vc.ssl)
            if metric is not None:
                counters[metric] += 1
            vc.do_io_close()
            self._fail(sm, f"TLS to origin {origin} failed: {reason}")
            return
        assert vc.ssl is not None
        outcome = proc.origin_tls.check(vc.ssl, settings, vc.remote_ip)
        if outcome.metric is not None:
            counters[outcome.metric] += 1
        if not outcome.ok:
            vc.do_io_close()
            self._fail(sm, f"origin {origin} certificate rejected: {outcome.reason}")
            return
        if outcome.reason is not None:
            _log.warning(
                "origin %s certificate problem (policy PERMISSIVE, continuing): %s", origin, outcome.reason
            )
        runner = vc.outbound_hooks
        if (
            runner is not None
            and settings.policy is not VerifyServerPolicy.DISABLED
            and proc.hooks.has(HookID.SSL_VERIFY_SERVER)
        ):
            # SSL_VERIFY_SERVER: the configured checks passed (or PERMISSIVE let them go); the
            # plugin sees the certificate and may still refuse it, before any request byte.
            runner.verify_error = outcome.reason
            vc.set_inactivity_timeout(sm.http.connect_timeout)  # a hook that never re-enables
            runner.run(HookID.SSL_VERIFY_SERVER, self._verified)
            return
        self._ready(sm, vc)

    def _verified(self, ok: bool) -> None:
        sm = self._claim()
        vc = self.vc
        if sm is None or vc is None:
            return
        if not ok:
            if not vc.closed:  # refused by a plugin (a timeout while paused is not a verify failure)
                sm.proc.counters[M_VERIFY_FAILED] += 1
            vc.do_io_close()
            key = self.key
            self._fail(sm, f"origin {key[1]}:{key[2]} certificate rejected in SSL_VERIFY_SERVER")
            return
        self._ready(sm, vc)


def _strerror(err: int) -> str:
    try:
        return os.strerror(err)
    except ValueError:
        return str(err)


__all__ = ["OriginConnection", "OriginConnector", "OriginPool", "ServerGroup", "ServerGroups"]
