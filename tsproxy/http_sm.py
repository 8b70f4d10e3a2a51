"""The HTTP/1.1 reverse-proxy state machine (ATS HttpSM, Http1ClientSession, HttpSessionManager).

Theory of operation
-------------------
An ``HttpClientSession`` owns one client VC (plain or TLS). It reads with a read VIO whose
buffer has a water mark, feeds the bytes to the sans-IO ``RequestParser`` and processes the
resulting events in order from ``pending``. Processing stops (``_blocked``) while

* the transaction waits for its origin connection,
* the origin's write buffer is above its water mark (a large upload), or
* a pipelined request arrives before the current response ended.

When nothing is consumed, the client buffer fills up, the VC stops reading, and TCP pushes back
on the client: memory stays bounded by the water marks, never by body sizes.

Responses flow the other way through an ``OriginConnection``: its bytes go to a
``ResponseParser``; the head, then each body piece, is written to the client buffer. The client
buffer is the origin read buffer's ``downstream``: the two share one water mark
(``proxy.config.http.flow_control.high_water``), so the origin VC reads only while they hold
less together; when it finds no room it tells the session (a READ_READY with nothing new),
which marks the transaction paused, and the client VC's ``WRITE_READY`` (buffer drained)
resumes it. ``FlowControl`` keeps the worker's budget over the paused transactions, and
``ServerGroups`` the ``per_server.connection.max`` cap and its queue.

Transactions end with the response's ``MessageEnded``: the origin connection returns to the
per-worker ``OriginPool`` when both sides allow keep-alive, the client session then reads its
next request or closes. Errors map to answers: no remap rule 404, malformed request 400/413/414/431
(then close), origin unreachable 502, origin silent past
``proxy.config.http.transaction_no_activity_timeout_out`` 504. Their bodies say only the status;
the reason goes to the log (``_send_error``). A request-target's dot segments are resolved
(tsproxy/http/path.py) before the first hook and the remap lookup see it.

An inactivity timeout counts against the side that keeps the transaction waiting: an origin
idle only because backpressure from a slow client stopped its reads (or because it waits for
request body bytes the client has not sent) is re-armed, not answered 504; a client idle only
because the origin has not answered yet is re-armed likewise. The two conditions exclude each
other, so a stalled transaction always ends by one side's timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    EVENT_IMMEDIATE,
    NET_EVENT_OPEN,
    NET_EVENT_OPEN_FAILED,
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_COMPLETE,
    VC_EVENT_WRITE_READY,
    Continuation,
    ignore_event,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.net.hooks import HookID, HookRegistry
from iocore.net.net_accept import connect
from iocore.net.net_vconnection import EVENT_READ
from iocore.net.ssl_config import VerifyServerPolicy
from iocore.net.ssl_net_vconnection import OutboundHooks, OutboundPlainNetVConnection, SSLNetVConnection
from iocore.records.errors import TSError
from iocore.records.stats import METRIC_ID
from tsproxy.http.message import (
    ChunkedEncoder,
    build_client_response_head,
    build_origin_request_head,
    client_framing,
    error_response,
    synthetic_response,
)
from tsproxy.http.parser import (
    BodyDataReceived,
    BodyMode,
    HTTPProtocolError,
    MessageEnded,
    RequestParser,
    RequestReceived,
    ResponseParser,
    ResponseReceived,
)
from tsproxy.http.path import TargetRefused, normalize_target
from tsproxy.origin_health import OriginHealth
from tsproxy.origin_tls import M_VERIFY_FAILED, OriginTLS
from tsproxy.remap import OriginKey, describe_miss, forward_result

if TYPE_CHECKING:
    from iocore.net.net_handler import NetHandler
    from iocore.net.net_vconnection import NetVConnection
    from iocore.net.ssl_sni_config import SNIConfigParams, SNIItem
    from tsproxy.config import ProxyConfig
    from tsproxy.origin_tls import OriginTLSSettings
    from tsproxy.remap import RemapResult

_dbg = DbgCtl("http")
_log = logging.getLogger("tsproxy.http")

# Enum members as module globals: on Python 3.11 ``HookID.X`` / ``BodyMode.X`` goes through the
# enum class's attribute lookup (~35 ns, ~7x a global), and the hot path names several per request.
_READ_REQUEST_HDR = HookID.READ_REQUEST_HDR
_POST_REMAP = HookID.POST_REMAP
_SEND_REQUEST_HDR = HookID.SEND_REQUEST_HDR
_READ_RESPONSE_HDR = HookID.READ_RESPONSE_HDR
_TXN_CLOSE = HookID.TXN_CLOSE
_NONE = BodyMode.NONE
_CHUNKED = BodyMode.CHUNKED
_UNTIL_CLOSE = BodyMode.UNTIL_CLOSE

CLIENT_WATER_MARK = 64 * 1024
MAX_IDLE_PER_ORIGIN = 128
RESOLVER_CACHE_MAX = 4096
# Flow control (proxy.config.http.flow_control.*, see FlowControl): a transaction stalled by a
# slow client for STALLED_AFTER seconds counts against its worker's budget; past half of it the
# stalled transactions buffer at most THROTTLED_WATER_MARK, past all of it the longest-stalled
# are closed.
THROTTLED_WATER_MARK = 16 * 1024
STALLED_AFTER = 1.0
FLOW_CONTROL_PERIOD = 0.5


def _m(name: str) -> int:
    return METRIC_ID["proxy.process.http." + name]


M_INCOMING = _m("incoming_requests")
M_OUTGOING = _m("outgoing_requests")
M_COMPLETED = _m("completed_requests")
M_CUR_CLIENT = _m("current_client_connections")
M_TOTAL_CLIENT = _m("total_client_connections")
M_CUR_SERVER = _m("current_server_connections")
M_TOTAL_SERVER = _m("total_server_connections")
M_REUSED = _m("origin_connections_reused")
M_CLIENT_ABORT = _m("err_client_abort_count")
M_CONNECT_FAIL = _m("err_connect_fail_count")
M_THROTTLED_OUT = _m("origin_connections_throttled_out")
M_QUEUED = _m("origin_connections_queued")
M_FC_PAUSED = _m("flow_control.paused_bytes")
M_FC_THROTTLED = _m("flow_control.throttled")
M_FC_CLOSED = _m("flow_control.closed")
M_UNDERSCORE_DROPPED = _m("underscore_headers_dropped")
M_STATUS = {2: _m("2xx_responses"), 3: _m("3xx_responses"), 4: _m("4xx_responses"), 5: _m("5xx_responses")}


class HttpConfig:
    """The HTTP records a session needs, read once per config generation."""

    __slots__ = (
        "accept_timeout",
        "active_in",
        "active_out",
        "client_ip",
        "connect_retries",
        "connect_retries_dead",
        "connect_timeout",
        "down_time",
        "flow_high_water",
        "ka_timeout_in",
        "ka_timeout_out",
        "keep_alive_in",
        "keep_alive_out",
        "max_header_size",
        "max_requests_in",
        "pristine_host",
        "ps_match",
        "ps_max",
        "ps_queue_delay",
        "ps_queue_size",
        "remap",
        "remap_required",
        "request_via",
        "response_via",
        "sni",
        "txn_timeout_in",
        "txn_timeout_out",
        "underscores_in_headers",
        "unmapped_clients",
        "worker_budget",
        "xff",
    )

    def __init__(self, config: ProxyConfig) -> None:
        rec = config.records
        g = rec.get_int
        name = rec.get_str("proxy.config.proxy_name").encode("ascii", "replace")
        self.remap = config.remap
        self.txn_timeout_in = g("proxy.config.http.transaction_no_activity_timeout_in")
        self.txn_timeout_out = g("proxy.config.http.transaction_no_activity_timeout_out")
        self.ka_timeout_in = g("proxy.config.http.keep_alive_no_activity_timeout_in")
        self.ka_timeout_out = g("proxy.config.http.keep_alive_no_activity_timeout_out")
        self.connect_timeout = g("proxy.config.http.connect_attempts_timeout")
        self.keep_alive_in = bool(g("proxy.config.http.keep_alive_enabled_in"))
        self.keep_alive_out = bool(g("proxy.config.http.keep_alive_enabled_out"))
        self.request_via = name if g("proxy.config.http.insert_request_via_str") else None
        self.response_via = name if g("proxy.config.http.insert_response_via_str") else None
        self.xff = bool(g("proxy.config.http.insert_squid_x_forwarded_for"))
        self.max_header_size = g("proxy.config.http.request_header_max_size")
        self.active_in = g("proxy.config.http.transaction_active_timeout_in")
        self.active_out = g("proxy.config.http.transaction_active_timeout_out")
        accept = g("proxy.config.http.accept_no_activity_timeout")
        self.accept_timeout = accept if accept > 0 else g("proxy.config.net.default_inactivity_timeout")
        self.connect_retries = g("proxy.config.http.connect_attempts_max_retries")
        self.connect_retries_dead = g("proxy.config.http.connect_attempts_max_retries_dead_server")
        self.down_time = g("proxy.config.http.down_server.cache_time")
        self.max_requests_in = g("proxy.config.net.max_requests_in")
        self.client_ip = bool(g("proxy.config.http.insert_client_ip"))
        self.pristine_host = bool(g("proxy.config.url_remap.pristine_host_hdr"))
        self.remap_required = bool(g("proxy.config.url_remap.remap_required"))
        clients = rec.get_str("proxy.config.url_remap.unmapped_clients").split()
        self.unmapped_clients = [ipaddress.ip_network(w, strict=False) for w in clients]
        self.flow_high_water = g("proxy.config.http.flow_control.high_water")
        self.worker_budget = g("proxy.config.http.flow_control.worker_budget")
        self.ps_max = g("proxy.config.http.per_server.connection.max")
        self.ps_match = rec.get_str("proxy.config.http.per_server.connection.match")
        self.ps_queue_size = g("proxy.config.http.per_server.connection.queue_size")
        self.ps_queue_delay = g("proxy.config.http.per_server.connection.queue_delay") / 1000.0
        self.underscores_in_headers = bool(g("proxy.config.http.underscores_in_headers"))
        # sni.yaml, when host_sni_policy has something to protect (an item with an inbound policy)
        sni = config.sni
        self.sni = sni if sni is not None and sni.has_host_policy else None


class Resolver:
    """Host name -> address cache. Remap targets are resolved when the config loads; a miss
    resolves synchronously (getaddrinfo blocks the loop: keep origins in remap.config)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[int, tuple[Any, ...]]] = {}

    def resolve(self, host: str, port: int) -> tuple[int, tuple[Any, ...]]:
        key = (host, port)
        hit = self._cache.get(key)
        if hit is None:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            if len(self._cache) >= RESOLVER_CACHE_MAX:  # remap_required 0: any host may come
                self._cache.clear()
            hit = self._cache[key] = (family, addr)
        return hit

    def warm(self, config: ProxyConfig) -> None:
        for rule in config.remap.rules:
            try:
                self.resolve(rule.to_host, rule.to_port)
            except OSError as exc:
                _dbg("cannot resolve %s: %s", rule.to_host, exc)


class HttpProcessor:
    """Per-worker HTTP state: config, origin pool, resolver."""

    def __init__(self, nh: NetHandler, config: ProxyConfig, hooks: HookRegistry | None = None) -> None:
        self.nh = nh
        self.counters = nh.counters
        self.hooks = hooks if hooks is not None else HookRegistry()
        self.resolver = Resolver()
        self.pool = OriginPool(self)
        self.sessions: dict[HttpClientSession, None] = {}
        # A request parser between messages, shared: see HttpClientSession._process_client_input.
        self.spare_parser: RequestParser | None = None
        self.draining = False
        self.active_txns = 0  # transactions in progress (proxy.config.net.max_requests_in)
        self.request_share = 1  # workers sharing the listeners: max_requests_in is split over them
        self.health = OriginHealth()
        self.set_config(config)
        self.flow = FlowControl(self)
        self.servers = ServerGroups(self)

    def set_config(self, config: ProxyConfig) -> None:
        self.config = config
        self.http = HttpConfig(config)
        # This proxy's own addresses: remap_required 0 never forwards a request to itself.
        self.listen_ports = {p.port for p in config.ports}
        self.listen_ips = {p.ip_in for p in config.ports if p.ip_in is not None}
        # Idle origin connections were opened (and verified) under the old config: a reload that
        # tightens verification or changes the CA must not keep reusing them. Busy ones are not
        # pooled again (OriginPool.put checks the config they were opened under).
        self.pool.close_all()
        self.origin_tls = config.origin_tls
        self.resolver = Resolver()
        self.resolver.warm(config)

    def new_session(self, vc: NetVConnection, scheme: str, port: int) -> HttpClientSession:
        return HttpClientSession(self, vc, scheme, port)

    def drain(self) -> None:
        """Graceful stop: idle sessions close now, busy ones after their current response."""
        self.draining = True
        for session in list(self.sessions):
            if session.idle():
                session.close()
        self.pool.close_all()


class FlowControl(Continuation):
    """The worker's budget for bytes buffered for slow clients
    (``proxy.config.http.flow_control.worker_budget``).

    Each transaction buffers at most ``flow_control.high_water`` of response bytes (the origin
    read buffer and the client write buffer share that water mark, see MIOBuffer.downstream).
    A transaction whose origin read waits for its client is in ``paused``, in the order of its
    pause (it leaves when the client drained the buffer, and goes to the back when it pauses
    again), so the front holds the slowest readers. Pausing and resuming cost a dict insert
    and pop; the budget is checked by a timer every FLOW_CONTROL_PERIOD seconds over the
    transactions paused for STALLED_AFTER seconds or more: a fast client's momentary pause is
    never counted. Past half the budget each stalled transaction buffers at most
    THROTTLED_WATER_MARK from its next read on (counted once per transaction); past the whole
    budget the longest-stalled are closed (counted) until the rest fits.
    """

    def __init__(self, proc: HttpProcessor) -> None:
        super().__init__(self._check)
        self.proc = proc
        self.paused: dict[HttpClientSession, float] = {}
        proc.nh.thread.schedule_every(self, FLOW_CONTROL_PERIOD)

    def _check(self, event: int, data: Any) -> int:
        proc = self.proc
        counters = proc.counters
        paused = self.paused
        if not paused:
            if counters[M_FC_PAUSED]:
                counters[M_FC_PAUSED] = 0
            return 0
        old = proc.nh.thread.now - STALLED_AFTER
        stalled: list[tuple[HttpClientSession, int]] = []
        total = 0
        for session, since in paused.items():  # oldest pause first
            if since > old:
                break
            held = session.buffered()
            stalled.append((session, held))
            total += held
        counters[M_FC_PAUSED] = total
        budget = proc.http.worker_budget
        if not budget or total <= budget >> 1:
            return 0
        for session, _ in stalled:
            if not session.throttled:
                session.throttle()
        for session, held in stalled:
            if total <= budget:
                break
            _dbg("over the worker's buffer budget (%d > %d): closing a slow reader", total, budget)
            counters[M_FC_CLOSED] += 1
            total -= held
            session.close()
        counters[M_FC_PAUSED] = total
        return 0


class ServerGroup:
    """The origin connections (open or opening) of one upstream server group, and the
    transactions waiting for one at the per_server.connection.max cap, oldest first."""

    __slots__ = ("vcs", "waiters")

    def __init__(self) -> None:
        self.vcs: dict[NetVConnection, None] = {}
        self.waiters: deque[tuple[HttpClientSession, _Connecting, float]] = deque()

    def count(self) -> int:
        vcs = self.vcs
        for vc in [vc for vc in vcs if vc.closed]:
            del vcs[vc]
        return len(vcs)


class ServerGroups(Continuation):
    """``proxy.config.http.per_server.connection.max`` (ATS's OutboundConnTrack), per worker.

    A group is what ``per_server.connection.match`` says (the origin's address, address and
    port, remapped host name, or all three). A transaction that needs a new connection to a
    group already at the cap waits (it is "connecting" meanwhile, so its session reads no
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

    def wait(self, session: HttpClientSession, key: OriginKey, group: ServerGroup) -> None:
        http = self.proc.http
        size = http.ps_queue_size
        if size == 0 or (size > 0 and len(group.waiters) >= size):
            self._refuse(session, key)
            return
        token = _Connecting(session, key)
        session.connecting = token
        session.connect_vc = None
        thread = self.proc.nh.thread
        group.waiters.append((session, token, thread.now + http.connect_timeout))
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

    def _refuse(self, session: HttpClientSession, key: OriginKey) -> None:
        self.proc.counters[M_THROTTLED_OUT] += 1
        session._send_error(
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
            session, token, deadline = waiters[0]
            if session.closed or session.connecting is not token:
                waiters.popleft()  # gone, or answered meanwhile
                continue
            key = token.key
            if cap and not proc.pool.idle.get(key) and group.count() >= cap and not self._free_idle(group):
                break
            waiters.popleft()
            self._resume(session, None)
        for entry in list(waiters):
            session, token, deadline = entry
            if session.closed or session.connecting is not token:
                waiters.remove(entry)
            elif deadline <= now:
                waiters.remove(entry)
                self._resume(session, token.key)

    def _resume(self, session: HttpClientSession, refuse: OriginKey | None) -> None:
        """The transaction's turn: get its origin connection, or (waited too long) a 503."""
        session.connecting = None
        try:
            if refuse is None:
                session._get_origin()
            else:
                self._refuse(session, refuse)
            session._process_client_input()
        except Exception:
            _log.exception("resuming a transaction queued at per_server.connection.max; closing it")
            session.close()

    def _free_idle(self, group: ServerGroup) -> bool:
        """Close an idle pooled connection of the group (to another host name of it) so that a
        waiting transaction can connect; False when every connection of the group is busy."""
        for vc in group.vcs:
            conn = vc.read.cont
            if isinstance(conn, OriginConnection) and conn.session is None and not vc.closed:
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
    """One connection to an origin; owned by a session during a transaction, else by the pool."""

    __slots__ = (
        "config",
        "key",
        "parser",
        "proc",
        "read_buf",
        "reader",
        "requests",
        "session",
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
        self.session: HttpClientSession | None = None
        self.parser = ResponseParser()
        high_water = proc.http.flow_high_water
        # The response: while a session owns the connection, its client write buffer is this
        # buffer's downstream, so the origin is read only while the two hold less than
        # high_water together (proxy.config.http.flow_control.high_water; see attach).
        self.read_buf = MIOBuffer(high_water)
        self.reader = self.read_buf.alloc_reader()
        self.write_buf = MIOBuffer(high_water)  # the request and its body (uploads)
        self.write_reader = self.write_buf.alloc_reader()
        self.requests = 0
        proc.counters[M_CUR_SERVER] += 1
        proc.counters[M_TOTAL_SERVER] += 1

    def attach(self, session: HttpClientSession) -> None:
        self.session = session
        self.handler = session.handle_origin_event  # set_handler, without the call
        self.read_buf.downstream = session.write_buf
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
        self.session = None
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
        self.session = None
        # Free what refers back to itself (see Continuation): gone at once, not at the next GC.
        self.handler = ignore_event
        self.parser.close()
        self.read_buf.downstream = None
        self.read_buf.dealloc_all_readers()
        self.write_buf.dealloc_all_readers()


class _Connecting(Continuation):
    """Receives NET_EVENT_OPEN / OPEN_FAILED for a session's new origin connection."""

    __slots__ = ("key", "session")

    def __init__(self, session: HttpClientSession, key: OriginKey) -> None:
        super().__init__(self._handle)
        self.session = session
        self.key = key

    def _handle(self, event: int, data: Any) -> None:
        self.handler = ignore_event  # one event, then done (see Continuation)
        self.session.origin_opened(event, data, self.key, self)


class HttpClientSession(Continuation):
    """One client connection and its sequence of transactions."""

    # Slots, not an instance dict: a dict of this many attributes costs ~1.6 KiB per connection,
    # and idle keep-alive connections are what a proxy holds most of.
    __slots__ = (
        "_client_held",
        "_hook_active",
        "_hook_failed",
        "_hook_id",
        "_hook_queue",
        "_hook_table",
        "_hook_then",
        "_in_client_input",
        "_in_hook",
        "_resumer",
        "chunked",
        "chunked_up",
        "client_keep_alive",
        "close_after_write",
        "closed",
        "connect_attempts",
        "connect_vc",
        "connecting",
        "framing",
        "head_timer",
        "http",
        "origin",
        "origin_bytes",
        "origin_paused",
        "parser",
        "pending",
        "port",
        "proc",
        "read_buf",
        "reader",
        "remap",
        "request",
        "request_done",
        "resp_pending",
        "response",
        "retried",
        "scheme",
        "status_sent",
        "synthetic",
        "throttled",
        "txn",
        "txn_hooks",
        "vc",
        "write_buf",
        "write_reader",
    )

    def __init__(self, proc: HttpProcessor, vc: NetVConnection, scheme: str, port: int) -> None:
        super().__init__()  # handle_event is overridden: no bound method held per connection
        self.proc = proc
        self.http = proc.http
        self.vc = vc
        self.scheme = scheme
        self.port = port
        # Only while a request is partly read: between requests the parser goes back to the
        # processor's spare (see _process_client_input), so an idle connection holds none.
        self.parser: RequestParser | None = None
        self.read_buf = MIOBuffer(CLIENT_WATER_MARK)
        self.reader = self.read_buf.alloc_reader()
        # The response side: proxy.config.http.flow_control.high_water bounds what the transaction
        # buffers for a slow client (see _process_origin_input).
        self.write_buf = MIOBuffer(self.http.flow_high_water)
        self.write_reader = self.write_buf.alloc_reader()
        # Parsed client events not processed yet; rarely more than a few, so a list (an empty
        # deque costs ~600 bytes per idle connection), and None while there are none.
        self.pending: list[Any] | None = None
        self.closed = False
        self.close_after_write = False
        self.head_timer = False
        # current transaction
        self.request: RequestReceived | None = None
        self.remap: RemapResult | None = None
        self.origin: OriginConnection | None = None
        self.connecting: _Connecting | None = None
        self.connect_vc: NetVConnection | None = None
        self.request_done = False
        self.response: ResponseReceived | None = None
        self.framing = BodyMode.NONE
        self.chunked: ChunkedEncoder | None = None
        self.chunked_up: ChunkedEncoder | None = None
        self.client_keep_alive = True
        self.origin_paused = False
        self.throttled = False  # limited to THROTTLED_WATER_MARK by the worker budget
        self.retried = False
        self.connect_attempts = 0
        self.origin_bytes = 0
        # HTTP transaction hooks (see _run_hooks)
        self.txn: Any = None  # the plugin facade of the current transaction, made on demand
        self.txn_hooks: dict[HookID, list[Any]] | None = None
        # The worker's global hooks by id (the registry's own dict, mutated in place); empty
        # means no plugin hooks any HTTP stage, and the stages then run straight through.
        self._hook_table = proc.hooks.by_id
        self._hook_queue: list[Any] | None = None  # the callbacks still to run while a stage runs
        self._hook_id = HookID.TXN_CLOSE
        self._hook_then: Callable[[], None] | None = None
        self._hook_active = False
        self._in_hook = False
        self._hook_failed = False
        self._resumer: Continuation | None = None
        self.synthetic: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        # Response events held back while a response hook pauses; a tuple when there are none,
        # so ending a transaction allocates nothing.
        self.resp_pending: Sequence[Any] = ()
        self.status_sent = 0  # the status the client got for the current transaction (0: none yet)
        self._in_client_input = False  # _process_client_input is on the stack
        self._client_held = False  # a _process_client_input pass ended blocked (read re-enable owed)
        proc.sessions[self] = None
        counters = proc.counters
        counters[M_CUR_CLIENT] += 1
        counters[M_TOTAL_CLIENT] += 1
        vc.do_io_read(self, INT64_MAX, self.read_buf)
        vc.do_io_write(self, INT64_MAX, self.write_reader)
        vc.set_inactivity_timeout(self.http.accept_timeout)  # until the first request

    def idle(self) -> bool:
        """Between transactions with nothing left to send: safe to close on drain."""
        return self.request is None and not self.pending and not self.write_reader.read_avail()

    # -- client side -----------------------------------------------------------------------------
    def handle_event(self, event: int, data: Any = None) -> Any:
        """Every event of the client VC. A method rather than a ``handler`` attribute: a bound
        method per session cost 88 bytes per idle connection and a reference cycle."""
        if self.closed:
            return None  # late events after close are dropped (ignore_event's job elsewhere)
        try:
            if event == VC_EVENT_READ_READY:  # the common event, without _client_event's dispatch
                self._process_client_input()
            elif event == VC_EVENT_WRITE_READY and not self.close_after_write and not self.origin_paused:
                pass  # the response was sent on; nothing waits for the client buffer to drain
            else:
                self._client_event(event)
        except Exception:
            # The VC's guard closes only the VC that raised: fail the whole session so neither
            # the client nor the origin connection is left waiting for a transaction that died.
            self.close()
            raise

    def _client_event(self, event: int) -> None:
        if event in (VC_EVENT_READ_READY, VC_EVENT_READ_COMPLETE):
            self._process_client_input()
        elif event == VC_EVENT_WRITE_READY:
            if self.close_after_write and not self.write_reader.read_avail():
                self.close()
            elif self.origin_paused:
                self._resume_origin()
        elif event == VC_EVENT_EOS:
            if self.request is None and not self.pending:
                self.close()
            elif self.response is None and self.request is not None and self.request_done:
                # Half-close after a complete request: answer, then close.
                self.client_keep_alive = False
            else:
                self.proc.counters[M_CLIENT_ABORT] += 1
                self.close()
        elif event == VC_EVENT_INACTIVITY_TIMEOUT and self._waiting_on_origin():
            # The client is idle because the origin is: the origin side's timeout governs.
            self.vc.set_inactivity_timeout(self.http.txn_timeout_in)
        elif event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT, VC_EVENT_ERROR):
            if event == VC_EVENT_ERROR:
                self.proc.counters[M_CLIENT_ABORT] += 1
            self.close()

    def _process_client_input(self) -> None:
        if self.closed or self._in_client_input:
            # _in_client_input: called again from inside a step of the call on the stack (a
            # request head sent, a local answer ended the transaction). No bytes are read in
            # between, and that call goes on with the pending events and the reenable as soon
            # as this step returns, so a second pass would find nothing to do.
            return
        if self._blocked():
            self._client_held = True
            return
        self._in_client_input = True
        try:
            reader = self.reader
            if reader.read_avail():
                data = reader.read()
                parser = self.parser
                proc = self.proc
                if parser is None:
                    parser = proc.spare_parser
                    http = self.http
                    if (
                        parser is None
                        or parser.max_header_size != http.max_header_size
                        or parser.allow_underscores is not http.underscores_in_headers
                    ):
                        parser = RequestParser(http.max_header_size, http.underscores_in_headers)
                    else:
                        proc.spare_parser = None
                pending = self.pending
                if pending is None:
                    pending = self.pending = []
                try:
                    pending.extend(parser.feed(data))
                except HTTPProtocolError as exc:
                    pending.extend(exc.events_before)
                    pending.append(exc.with_traceback(None))  # kept: its frames hold us
                if parser.underscores_dropped:
                    proc.counters[M_UNDERSCORE_DROPPED] += parser.underscores_dropped
                    parser.underscores_dropped = 0
                if parser.between_messages:
                    # Nothing of a next request read yet: the next one may start on any parser,
                    # so this one serves every connection of the worker (one llhttp, not one each).
                    self.parser = None
                    proc.spare_parser = parser
                    in_head = False
                else:
                    self.parser = parser
                    in_head = parser.in_head
                # The inactivity timer restarts with every byte, so a head dripped one byte at a
                # time would never time out: the whole head must arrive within
                # transaction_no_activity_timeout_in of its first byte (an active timeout).
                if in_head:
                    if not self.head_timer:
                        self.head_timer = True
                        self.vc.set_active_timeout(self.http.txn_timeout_in)
                elif self.head_timer:
                    self.head_timer = False
                    self.vc.set_active_timeout(0)
            self._run_pending()
        finally:
            self._in_client_input = False
        if not self.closed:
            if self._blocked():
                self._client_held = True  # the read re-enable is owed (see _client_side_waits)
            else:
                self._client_held = False
                self.vc.read.reenable()

    def _client_side_waits(self) -> bool:
        """Client input may be held back: events or bytes not processed yet, or a pass that ended
        blocked and skipped the read re-enable. Otherwise a pass of _process_client_input would
        do nothing but re-enable an already running read."""
        return self._client_held or bool(self.pending) or bool(self.reader.read_avail())

    def _blocked(self) -> bool:
        if self.connecting is not None or self._hook_then is not None:
            return True
        origin = self.origin
        return bool(origin is not None and origin.write_buf.high_water())

    def _run_pending(self) -> None:
        pending = self.pending
        while pending and not self.closed:
            ev = pending[0]
            if isinstance(ev, RequestReceived):
                if self.request is not None:
                    return  # pipelined: wait for the current response to end
                del pending[0]
                self._start_transaction(ev)
            elif isinstance(ev, BodyDataReceived):
                if self._blocked():
                    return
                del pending[0]
                self._send_request_body(ev.data)
            elif isinstance(ev, MessageEnded):
                if self._blocked():
                    return
                del pending[0]
                self._request_ended()
            else:  # HTTPProtocolError: answered after the requests in front of it
                if self.request is not None:
                    return
                pending.clear()
                self._send_error(ev.status, ev.reason, close=True)
                return
        if pending is not None and not pending and pending is self.pending:
            self.pending = None  # all done: an idle connection holds no list

    def _start_transaction(self, req: RequestReceived) -> None:
        proc = self.proc
        proc.counters[M_INCOMING] += 1
        self.request = req
        self.request_done = False
        self.response = None
        self.retried = False
        self.connect_attempts = 0
        http = self.http
        self.client_keep_alive = req.keep_alive and http.keep_alive_in and not proc.draining
        self.vc.set_inactivity_timeout(http.txn_timeout_in)
        if http.active_in:
            self.vc.set_active_timeout(http.active_in)
        proc.active_txns += 1
        if http.max_requests_in and proc.active_txns > -(-http.max_requests_in // proc.request_share):
            self._send_error(503, "too many requests in progress; try again", close=True)
            return
        if req.method == b"CONNECT":
            self._send_error(501, "CONNECT is not supported", close=True)
            return
        # Dot segments go before anything looks at the path (hooks, the remap prefix match).
        try:
            target = normalize_target(req.target)
        except TargetRefused as exc:
            self._send_error(400, f"request-target refused: {exc.reason}", close=True)
            return
        if target is not req.target:
            req = self.request = replace(req, target=target)
        self._run_hooks(_READ_REQUEST_HDR, self._pre_remap)

    def _pre_remap(self) -> None:
        self._run_hooks(HookID.PRE_REMAP, self._do_remap)

    def _do_remap(self) -> None:
        req = self.request
        assert req is not None
        host = b""
        for name, value in req.headers:
            if len(name) == 4 and name.lower() == b"host":
                host = value
                break
        target = req.target
        if not target.startswith(b"/"):
            # absolute-form: take the authority and path from the URL
            scheme_end = target.find(b"://")
            if scheme_end > 0:
                rest = target[scheme_end + 3 :]
                slash = rest.find(b"/")
                host = rest if slash < 0 else rest[:slash]
                target = b"/" if slash < 0 else rest[slash:]
        sni = self.http.sni
        if sni is not None and host and self._host_sni_mismatch(sni, host):
            self._send_error(403, "Access Denied", close=not self.client_keep_alive, public=True)
            return
        remap = self.http.remap.lookup(self.scheme, host, self.port, target)
        if remap is None and not self.http.remap_required:
            remap = self._forward_target(req, host, target)
        if remap is None:
            _dbg("no remap rule for %s://%s%s", self.scheme, host, target)
            miss = describe_miss(self.scheme, host, self.port)  # the client's own Host: public
            self._send_error(404, miss, close=not self.client_keep_alive, public=True)
            return
        self.remap = remap
        self._run_hooks(_POST_REMAP, self._get_origin)

    def _forward_target(self, req: RequestReceived, host: bytes, target: bytes) -> RemapResult | None:
        """remap_required 0: the host the request names, for a client in unmapped_clients, unless
        that is this proxy itself (a request sent round in a loop)."""
        try:
            client = ipaddress.ip_address(self.vc.remote_ip)
        except ValueError:
            return None
        if not any(client in net for net in self.http.unmapped_clients):
            return None
        result = forward_result(self.scheme, host, target)
        if result is None:
            return None
        via = self.http.request_via
        if via is not None and any(n.lower() == b"via" and via in v for n, v in req.headers):
            return None  # it has been through this proxy (by name) already
        if result.origin_port in self.proc.listen_ports:
            try:
                _, sockaddr = self.proc.resolver.resolve(result.origin_host, result.origin_port)
                addr = ipaddress.ip_address(sockaddr[0])
            except (OSError, ValueError):
                return result  # the connect reports it
            if addr.is_loopback or addr.is_unspecified or str(addr) in self.proc.listen_ips:
                return None
        return result
    def _host_sni_mismatch(self, sni: SNIConfigParams, host: bytes) -> bool:
        """host_sni_policy (ATS HttpSM): a TLS request whose Host names an sni.yaml item with an
        inbound policy that the item of its SNI (or, without SNI, nothing) does not share is
        logged (1) or refused (2): the policy of the Host was never applied to this connection."""
        vc = self.vc
        if not isinstance(vc, SSLNetVConnection):
            return False
        name = host.decode("latin-1").strip().lower()
        if name.startswith("["):
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".")
        server_name = vc.server_name
        if server_name is not None and server_name.lower() == name:
            return False
        level = sni.host_check(name, vc.sni_policy)
        if level == 0:
            return False
        action = "terminate" if level == 2 else "continue"
        if server_name is None:
            _log.warning("No SNI for TLS request with hostname %s action=%s", name, action)
        else:
            _log.warning("SNI/hostname mismatch sni=%s host=%s action=%s", server_name, name, action)
        return level == 2

    def _sni_outbound(self) -> SNIItem | None:
        """The sni.yaml item of this client connection, when it sets origin-side keys."""
        vc = self.vc
        policy = vc.sni_policy if isinstance(vc, SSLNetVConnection) else None
        return policy.outbound if policy is not None else None

    def _origin_key(self) -> OriginKey:
        r = self.remap
        assert r is not None
        key = r.rule.origin_key  # computed once per remap rule (it includes the rule's TLS options)
        if key[0] == "https":
            item = self._sni_outbound()
            if item is not None:
                # Another client certificate or verification policy: another pool.
                key = (key[0], key[1], key[2], (*key[3], ("sni.yaml", item.source)))
        return key

    def _get_origin(self) -> None:
        key = self._origin_key()
        proc = self.proc
        conn = proc.pool.get(key) if self.http.keep_alive_out else None
        if conn is not None:
            proc.counters[M_REUSED] += 1
            self._use_origin(conn)
            return
        self._connect_origin(key)

    def _connect_origin(self, key: OriginKey) -> None:
        proc = self.proc
        try:
            family, addr = proc.resolver.resolve(key[1], key[2])
        except OSError as exc:
            self.connect_attempts += 1
            self._send_error(502, f"cannot resolve origin {key[1]}: {exc.strerror or exc}", close=False)
            return
        group: ServerGroup | None = None
        cap = self.http.ps_max
        if cap:
            group = proc.servers.group_of(key, addr)
            if group.count() >= cap:
                proc.servers.wait(self, key, group)  # no attempt yet: it is counted when made
                return
        self.connect_attempts += 1
        # Plain origins get the VC that delivers VCONN_OUTBOUND_CLOSE (one attribute check per close).
        make_vc = SSLNetVConnection if key[0] == "https" else OutboundPlainNetVConnection
        self.connecting = _Connecting(self, key)
        self.connect_vc = connect(proc.nh, self.connecting, addr, family, make_vc=make_vc)
        if group is not None and self.connect_vc is not None:
            group.vcs[self.connect_vc] = None
        if self.connect_vc is not None:
            # Covers the connect and, for https, the TLS handshake (no net activity is counted
            # before the handshake completes).
            self.connect_vc.set_inactivity_timeout(self.http.connect_timeout)

    def origin_opened(self, event: int, data: Any, key: OriginKey, token: _Connecting) -> None:
        if token is not self.connecting:
            if event == NET_EVENT_OPEN:
                data.do_io_close()
            return
        self.connecting = None
        self.connect_vc = None
        if self.closed:
            if event == NET_EVENT_OPEN:
                data.do_io_close()
            return
        if event == NET_EVENT_OPEN_FAILED:
            proc = self.proc
            proc.counters[M_CONNECT_FAIL] += 1
            err = data if isinstance(data, int) else 0
            _dbg("connect to %s:%s failed: errno %s", key[1], key[2], err)
            http = self.http
            health = proc.health
            allowed = health.attempts_allowed(key[1], key[2], http.connect_retries, http.connect_retries_dead)
            if self.connect_attempts < allowed:
                self._connect_origin(key)  # connect_attempts_max_retries: at once, as ATS
                return
            health.mark_down(key[1], key[2], http.down_time, self.connect_attempts, _strerror(err))
            self._send_error(502, f"origin {key[1]}:{key[2]} unreachable ({_strerror(err)})", close=False)
            self._process_client_input()
            return
        if self.connect_attempts > 1 or self.proc.health.any_down:
            self.proc.health.mark_up(key[1], key[2])
        vc: NetVConnection = data
        settings: OriginTLSSettings | None = None
        if key[0] == "https":
            assert self.remap is not None
            try:
                settings = self.proc.origin_tls.settings_for(self.remap, self._sni_outbound())
            except TSError as exc:
                vc.do_io_close()
                self._send_error(502, f"origin TLS configuration: {exc}", close=False)
                return
        hooks = self.proc.hooks
        if (
            hooks.has(HookID.VCONN_OUTBOUND_START)
            or hooks.has(HookID.VCONN_OUTBOUND_CLOSE)
            or hooks.has(HookID.SSL_VERIFY_SERVER)
        ) and isinstance(vc, (SSLNetVConnection, OutboundPlainNetVConnection)):
            # VCONN_OUTBOUND_START: after the connect, before any byte (for TLS: before the
            # ClientHello). Still "connecting" while a hook pauses: the session stays blocked.
            runner = vc.outbound_hooks = OutboundHooks(vc, hooks, settings.sni if settings else None)
            self.connecting = token
            self.connect_vc = vc

            def started(ok: bool) -> None:
                self._outbound_started(vc, key, token, settings, ok)

            runner.run(HookID.VCONN_OUTBOUND_START, started)
            return
        self._origin_connected(vc, key, token, settings)

    def _outbound_started(
        self,
        vc: NetVConnection,
        key: OriginKey,
        token: _Connecting,
        settings: OriginTLSSettings | None,
        ok: bool,
    ) -> None:
        if not self._claim_connect(vc, token):
            return
        if not ok:
            vc.do_io_close()
            self._send_error(
                502, f"origin {key[1]}:{key[2]}: connection failed in VCONN_OUTBOUND_START", close=False
            )
            self._process_client_input()
            return
        self._origin_connected(vc, key, token, settings)

    def _claim_connect(self, vc: NetVConnection, token: _Connecting) -> bool:
        """This connect step still belongs to the current transaction: take the connection.
        Otherwise (superseded, or the session closed) the connection is dropped."""
        if token is not self.connecting or self.closed:
            vc.do_io_close()
            return False
        self.connecting = None
        self.connect_vc = None
        return True

    def _origin_connected(
        self, vc: NetVConnection, key: OriginKey, token: _Connecting, settings: OriginTLSSettings | None
    ) -> None:
        if settings is not None:
            self._start_origin_tls(vc, key, token, settings)
            return
        self._use_origin(OriginConnection(self.proc, key, vc))
        self._process_client_input()

    def _start_origin_tls(
        self, vc: NetVConnection, key: OriginKey, token: _Connecting, settings: OriginTLSSettings
    ) -> None:
        """ssl_start_handshake(SSL_EVENT_CLIENT) on the new origin connection."""
        assert isinstance(vc, SSLNetVConnection)
        # Still "connecting" until the handshake is done: the session stays blocked meanwhile.
        self.connecting = token
        self.connect_vc = vc

        def done(tls_vc: SSLNetVConnection, ok: bool) -> None:
            self._origin_tls_done(tls_vc, ok, key, token, settings)

        vc.start_client_handshake(settings.ctx, settings.sni, done)

    def _origin_tls_done(
        self, vc: SSLNetVConnection, ok: bool, key: OriginKey, token: _Connecting, settings: OriginTLSSettings
    ) -> None:
        if not self._claim_connect(vc, token):
            return
        counters = self.proc.counters
        origin = f"{key[1]}:{key[2]}"
        if not ok:
            reason, metric = OriginTLS.classify_handshake_failure(vc.ssl)
            if metric is not None:
                counters[metric] += 1
            vc.do_io_close()
            self._send_error(502, f"TLS to origin {origin} failed: {reason}", close=False)
            self._process_client_input()
            return
        assert vc.ssl is not None
        outcome = self.proc.origin_tls.check(vc.ssl, settings, vc.remote_ip)
        if outcome.metric is not None:
            counters[outcome.metric] += 1
        if not outcome.ok:
            vc.do_io_close()
            self._send_error(502, f"origin {origin} certificate rejected: {outcome.reason}", close=False)
            self._process_client_input()
            return
        if outcome.reason is not None:
            _log.warning(
                "origin %s certificate problem (policy PERMISSIVE, continuing): %s", origin, outcome.reason
            )
        runner = vc.outbound_hooks
        if (
            runner is not None
            and settings.policy is not VerifyServerPolicy.DISABLED
            and self.proc.hooks.has(HookID.SSL_VERIFY_SERVER)
        ):
            # SSL_VERIFY_SERVER: the configured checks passed (or PERMISSIVE let them go); the
            # plugin sees the certificate and may still refuse it, before any request byte.
            runner.verify_error = outcome.reason
            self.connecting = token
            self.connect_vc = vc
            vc.set_inactivity_timeout(self.http.connect_timeout)  # a hook that never re-enables

            def verified(ok: bool) -> None:
                self._origin_verified(vc, key, token, ok)

            runner.run(HookID.SSL_VERIFY_SERVER, verified)
            return
        self._use_origin(OriginConnection(self.proc, key, vc))
        self._process_client_input()

    def _origin_verified(self, vc: SSLNetVConnection, key: OriginKey, token: _Connecting, ok: bool) -> None:
        if not self._claim_connect(vc, token):
            return
        if not ok:
            if not vc.closed:  # refused by a plugin (a timeout while paused is not a verify failure)
                self.proc.counters[M_VERIFY_FAILED] += 1
            vc.do_io_close()
            self._send_error(
                502, f"origin {key[1]}:{key[2]} certificate rejected in SSL_VERIFY_SERVER", close=False
            )
            self._process_client_input()
            return
        self._use_origin(OriginConnection(self.proc, key, vc))
        self._process_client_input()

    def _use_origin(self, conn: OriginConnection) -> None:
        req = self.request
        remap = self.remap
        assert req is not None and remap is not None
        self.origin = conn
        self.origin_bytes = 0
        conn.attach(self)
        if self.http.active_out:
            conn.vc.set_active_timeout(self.http.active_out)
        conn.requests += 1
        self._run_hooks(_SEND_REQUEST_HDR, self._send_request_head)

    def _send_request_head(self) -> None:
        req = self.request
        remap = self.remap
        conn = self.origin
        if req is None or remap is None or conn is None:
            return
        conn.parser.start(req.method)
        http = self.http
        host_header = remap.host_header
        if http.pristine_host:
            for name, value in req.headers:
                if len(name) == 4 and name.lower() == b"host":
                    host_header = value
                    break
        head = build_origin_request_head(
            req,
            path=remap.path,
            host_header=host_header,
            client_ip=self.vc.remote_ip,
            via=http.request_via,
            xff=http.xff,
            client_ip_header=http.client_ip,
        )
        self.proc.counters[M_OUTGOING] += 1
        self.chunked_up = ChunkedEncoder() if req.body is _CHUNKED else None
        conn.write_buf.write(head)
        conn.vc.write.reenable()
        if req.body is _NONE:
            self.request_done = True
        if not self._in_client_input:  # else the _process_client_input on the stack goes on
            self._process_client_input()  # body bytes that waited for the head

    def _send_request_body(self, data: bytes) -> None:
        origin = self.origin
        if origin is None:
            return  # the transaction already failed; drop the body
        enc = self.chunked_up
        origin.write_buf.write(enc.encode(data) if enc is not None else data)
        origin.vc.write.reenable()

    def _request_ended(self) -> None:
        self.request_done = True
        origin = self.origin
        if origin is not None and self.chunked_up is not None:
            origin.write_buf.write(self.chunked_up.end())
            origin.vc.write.reenable()

    # -- origin side --------------------------------------------------------------------------
    def handle_origin_event(self, event: int, data: Any) -> None:
        try:
            # the common events, without _origin_event's dispatch
            if event == VC_EVENT_READ_READY:
                self._process_origin_input()
            elif event == VC_EVENT_WRITE_READY:  # the origin drained the upload buffer
                # Sent after every request head: a pass is needed only if the client side waits.
                if self._client_side_waits():
                    self._process_client_input()
            else:
                self._origin_event(event)
        except Exception:
            self.close()  # as in handle_event
            raise

    def _origin_event(self, event: int) -> None:
        if event in (VC_EVENT_READ_READY, VC_EVENT_READ_COMPLETE):
            self._process_origin_input()
        elif event == VC_EVENT_WRITE_READY:
            # The origin drained the upload buffer: resume the client's body.
            self._process_client_input()
        elif event == VC_EVENT_WRITE_COMPLETE:
            pass
        elif event == VC_EVENT_EOS:
            self._origin_eof()
        elif event == VC_EVENT_INACTIVITY_TIMEOUT and self._waiting_on_client():
            # The origin is idle because the client is (a slow reader, a slow upload): not a 504;
            # the client side's timeout governs.
            origin = self.origin
            if origin is not None:
                origin.vc.set_inactivity_timeout(self.http.txn_timeout_out)
        elif event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT):
            self._origin_failed(504, "origin did not answer in time")
        elif event == VC_EVENT_ERROR:
            self._origin_failed(502, "origin connection failed")

    def _waiting_on_origin(self) -> bool:
        """A transaction is in progress and nothing waits for the client: the whole request was
        read (or reading it waits for the origin) and no response bytes wait to be sent."""
        return (
            self.request is not None
            and self._hook_then is None  # a plugin holding the transaction: the client's timeout governs
            and not self.write_reader.read_avail()
            and (self.request_done or self._blocked())
        )

    def _waiting_on_client(self) -> bool:
        """The origin connection is idle because of the client: response bytes wait for a slow
        reader, or the origin has every request byte so far and more must come from the client.
        Never true together with _waiting_on_origin, so one side's timeout always fires."""
        origin = self.origin
        if origin is None:
            return False
        if self.origin_paused and self.write_reader.read_avail():
            return True
        return not self.request_done and not origin.write_reader.read_avail()

    def _process_origin_input(self) -> None:
        origin = self.origin
        if origin is None or self.closed:
            return
        if self._hook_then is not None:
            # A response hook holds the transaction: the origin is not consumed meanwhile (its
            # read stops by itself at the water mark); the hook's reenable resumes it.
            self.origin_paused = True
            return
        reader = origin.reader
        got = reader.read_avail()
        if got:
            data = reader.read()
            self.origin_bytes += len(data)
            try:
                events = origin.parser.feed(data)
            except HTTPProtocolError as exc:
                self._origin_failed(502, f"bad response from origin: {exc.reason}")
                return
            self._handle_response_events(events)
        if self.origin is origin and not origin.vc.closed:
            if got or not origin.read_buf.high_water():
                origin.vc.read.reenable()
            elif not self.origin_paused:
                # The origin VC found no room (a READ_READY with nothing new, _read_no_room):
                # what the origin sent still waits for the client (the client write buffer is
                # the origin read buffer's downstream), so the origin read stays off until the
                # client drained it (WRITE_READY) and a slow reader costs high_water, not more.
                # Right after a read the VC is re-enabled regardless: a fast client takes the
                # bytes before the next poll, and nothing is paused.
                self.origin_paused = True
                self.proc.flow.paused[self] = self.proc.nh.thread.now

    def _resume_origin(self) -> None:
        """The client took the buffered response bytes (or a response hook re-enabled)."""
        self.origin_paused = False
        self.proc.flow.paused.pop(self, None)
        self._process_origin_input()

    def buffered(self) -> int:
        """Response bytes this transaction holds (the client write and origin read buffers)."""
        origin = self.origin
        held = self.write_buf.max_read_avail()
        return held + origin.read_buf.max_read_avail() if origin is not None else held

    def throttle(self) -> None:
        """Over half the worker's budget: buffer at most THROTTLED_WATER_MARK from now on, until
        the transaction ends (FlowControl)."""
        origin = self.origin
        if origin is not None:
            self.throttled = True
            origin.read_buf.water_mark = THROTTLED_WATER_MARK
            self.proc.counters[M_FC_THROTTLED] += 1

    def _handle_response_events(self, events: Sequence[Any]) -> None:
        write = self.write_buf.write
        for i, ev in enumerate(events):
            if isinstance(ev, BodyDataReceived):
                enc = self.chunked
                write(enc.encode(ev.data) if enc is not None else ev.data)
            elif isinstance(ev, ResponseReceived):
                req = self.request
                self._response_head(ev)
                if self._hook_then is not None or self.closed:
                    # A response hook is paused: the rest waits for its reenable.
                    self.resp_pending = events[i + 1 :]
                    return
                if self.request is not req:
                    # A response hook ended the transaction (error: a 500 went out instead):
                    # the rest of the origin's response belongs to nobody.
                    self.vc.write.reenable()
                    return
            elif isinstance(ev, MessageEnded):
                if self.chunked is not None:
                    write(self.chunked.end())
                self.vc.write.reenable()
                self._transaction_done()
                return
        self.vc.write.reenable()

    def _response_head(self, ev: ResponseReceived) -> None:
        req = self.request
        assert req is not None
        if ev.status < 200:
            # RFC 9110 15.2: no 1xx to an HTTP/1.0 client (it would take it for the response).
            if (ev.status == 100 or ev.status == 103) and req.http_version == b"1.1":
                self.write_buf.write(build_client_response_head(ev, via=None, keep_alive=True))
            return
        self.response = ev
        self._run_hooks(_READ_RESPONSE_HDR, self._send_response_hooks)

    def _send_response_hooks(self) -> None:
        self._run_hooks(HookID.SEND_RESPONSE_HDR, self._write_response_head)

    def _write_response_head(self) -> None:
        req = self.request
        ev = self.response
        if req is None or ev is None:
            return
        framing = client_framing(ev.body, req.http_version)
        if req.method == b"HEAD" or ev.body is _NONE:
            framing = _NONE
        if framing is _UNTIL_CLOSE:
            self.client_keep_alive = False
        self.framing = framing
        # The parser hands bodies over de-chunked, so a chunked client body is always re-encoded.
        self.chunked = ChunkedEncoder() if framing is _CHUNKED else None
        head = build_client_response_head(
            ev,
            via=self.http.response_via,
            keep_alive=self.client_keep_alive,
            framing=framing,
            client_http_version=req.http_version,
        )
        self.write_buf.write(head)
        self.status_sent = ev.status
        metric = M_STATUS.get(ev.status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        if self.resp_pending:
            pending, self.resp_pending = self.resp_pending, ()
            self._handle_response_events(pending)
        elif self.origin_paused:
            self._resume_origin()

    def _origin_eof(self) -> None:
        origin = self.origin
        if origin is None:
            return
        try:
            events = origin.parser.feed_eof()
        except HTTPProtocolError as exc:
            if (
                self.response is None
                and self.origin_bytes == 0
                and origin.requests > 1
                and not self.retried
                and self.request is not None
                and self.request.body is BodyMode.NONE
            ):
                # A pooled connection the origin had closed: retry once on a fresh one.
                self.retried = True
                self._drop_origin()
                self._connect_origin(self._origin_key())
                return
            self._origin_failed(502, f"origin closed the connection: {exc.reason}")
            return
        self._handle_response_events(events)
        if self.origin is origin:
            self._drop_origin()

    def _origin_failed(self, status: int, reason: str) -> None:
        self._drop_origin()
        if self.response is None and self.request is not None:
            self._send_error(status, reason, close=True)
            return
        # The head already went out: send what is buffered, then cut the connection, so the
        # client sees the head and a short body rather than nothing at all.
        self._log_failure(0, reason)
        self.client_keep_alive = False
        self.close_after_write = True
        if self.pending is not None:
            self.pending.clear()
        self.vc.read.disable()
        if not self.write_reader.read_avail():
            self.close()
        else:
            self.vc.write.reenable()

    def _drop_origin(self) -> None:
        origin = self.origin
        if origin is not None:
            self.origin = None
            origin.close()

    def _transaction_done(self) -> None:
        proc = self.proc
        proc.counters[M_COMPLETED] += 1
        origin = self.origin
        resp = self.response
        self.origin = None
        if origin is not None:
            if (
                resp is not None
                and resp.keep_alive
                and self.request_done
                and self.http.keep_alive_out
                and origin.parser.reusable
            ):
                proc.pool.put(origin)
            else:
                origin.close()
        self._end_transaction()

    def _end_transaction(self) -> None:
        if self.request is not None:
            self.proc.active_txns -= 1
            if self.http.active_in and not self.head_timer:
                self.vc.set_active_timeout(0)
        if self.txn_hooks is not None or _TXN_CLOSE in self._hook_table:
            self._notify(_TXN_CLOSE)
        self.txn = None
        self.txn_hooks = None
        self.synthetic = None
        self.status_sent = 0
        self.resp_pending = ()
        self.request = None
        self.remap = None
        self.response = None
        self.chunked = None
        if self.origin_paused:
            self.origin_paused = False
            self.proc.flow.paused.pop(self, None)
        self.throttled = False
        if not self.client_keep_alive or self.proc.draining:
            self.close_after_write = True
            self.vc.read.disable()
            if not self.write_reader.read_avail():
                self.close()
            return
        self.vc.set_inactivity_timeout(self.http.ka_timeout_in)
        if self.pending or self.reader.read_avail():
            self._process_client_input()

    def _send_error(self, status: int, reason: str, *, close: bool, public: bool = False) -> None:
        """Answer the current transaction with a ``status`` tsproxy makes itself. ``reason`` is
        for the log (a warning for a 502/504, an origin failure the operator must see; the
        ``http`` debug tag for the rest, which a client or a plugin chose and could repeat at
        will); the client gets a generic body, with ``reason`` in it only when ``public`` (the
        text names nothing but the client's own input)."""
        if status == 502 or status == 504:
            self._log_failure(status, reason)
        else:
            _dbg("answering %d to %s: %s", status, self.vc.remote_ip, reason)
        metric = M_STATUS.get(status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        if self.request is None or (not self.request_done and self.request.body is not BodyMode.NONE):
            close = True  # we cannot find the next request's start in an unread body
        keep = self.client_keep_alive and not close
        self.client_keep_alive = keep
        self._hook_then = None
        self._hook_queue = None
        self.status_sent = status
        self.write_buf.write(error_response(status, reason if public else "", close=not keep))
        self.vc.write.reenable()
        self._drop_origin()
        if self.connecting is not None:
            if self.connect_vc is not None:
                self.connect_vc.do_io_close()
            self.connecting = None
            self.connect_vc = None
        if not keep and self.pending is not None:
            self.pending.clear()
        self.proc.counters[M_COMPLETED] += 1
        self._end_transaction()

    def _log_failure(self, status: int, reason: str) -> None:
        """The detail of a failure the client is not told (status 0: the response was cut)."""
        remap = self.remap
        rule = f" (rule {remap.rule.path}:{remap.rule.line})" if remap is not None else ""
        what = f"answered {status}" if status else "response cut"
        _log.warning("%s to client %s%s: %s", what, self.vc.remote_ip, rule, reason)

    # -- HTTP transaction hooks ----------------------------------------------------------------
    def _run_hooks(self, hook: HookID, then: Callable[[], None]) -> None:
        """Run the global and per-transaction callbacks of ``hook`` in order, then ``then()``.

        Each callback must call ``reenable()`` (now or later); until it does, the transaction
        waits (``_blocked``) and the loop serves everyone else. ``respond()`` or an error ends
        the hook chain with a local answer instead of ``then``.
        """
        txn_hooks = self.txn_hooks
        if txn_hooks is None and not self._hook_table:
            then()  # no plugin hooks any HTTP stage (the common case): straight on
            return
        callbacks = self.proc.hooks.get(hook)
        if txn_hooks is not None and hook in txn_hooks:
            callbacks = (*callbacks, *txn_hooks[hook])
        if not callbacks:
            then()
            return
        self._hook_id = hook
        self._hook_queue = list(callbacks)
        self._hook_then = then
        self._hook_next()

    def _hook_next(self) -> None:
        queue = self._hook_queue
        hook = self._hook_id
        while queue and not self.closed:
            callback = queue.pop(0)
            self._hook_active = True
            self._in_hook = True
            try:
                callback(hook, self)
            except Exception:
                _log.exception("HTTP %s hook raised; answering 500", hook.name)
                self._hook_failed = True
                self._hook_active = False
            finally:
                self._in_hook = False
            if self._hook_failed or self.synthetic is not None:
                break
            if self._hook_active:
                return  # paused until reenable()
        then = self._hook_then
        self._hook_then = None
        self._hook_queue = None
        if self.closed or then is None:
            return
        if self._hook_failed:
            self._hook_failed = False
            self._send_error(500, f"plugin failed in {hook.name}", close=True)
            return
        if self.synthetic is not None:
            self._send_synthetic()
            return
        then()

    def hook_reenable(self, *, error: bool = False) -> None:
        """TSHttpTxnReenable(txn, TS_EVENT_HTTP_CONTINUE | TS_EVENT_HTTP_ERROR)."""
        if self.closed or not self._hook_active:
            _dbg("txn reenable ignored (closed=%s, no hook active)", self.closed)
            return
        self._hook_active = False
        if error:
            self._hook_failed = True
        if not self._in_hook:
            if self._resumer is None:
                self._resumer = Continuation(lambda event, data: self._hook_next())
            self.proc.nh.thread.schedule_imm(self._resumer)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A synthetic response instead of the origin's; only before the request went out."""
        if self.closed or self._hook_id not in _RESPOND_HOOKS or self._hook_then is None:
            return False
        self.synthetic = (status, headers, body)
        return True

    def _send_synthetic(self) -> None:
        assert self.synthetic is not None
        status, headers, body = self.synthetic
        req = self.request
        close = not self.client_keep_alive or (
            req is not None and not self.request_done and req.body is not BodyMode.NONE
        )
        self.client_keep_alive = not close
        self._drop_origin()
        self.status_sent = status
        self.write_buf.write(
            synthetic_response(
                status, headers, body, close=close, head_only=req is not None and req.method == b"HEAD"
            )
        )
        self.vc.write.reenable()
        metric = M_STATUS.get(status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        self.proc.counters[M_COMPLETED] += 1
        if close and self.pending is not None:
            self.pending.clear()
        self._end_transaction()

    def _notify(self, hook: HookID) -> None:
        """Notification hooks (TXN_CLOSE): every callback once; reenable is not needed."""
        callbacks = self.proc.hooks.get(hook)
        if self.txn_hooks is not None and hook in self.txn_hooks:
            callbacks = (*callbacks, *self.txn_hooks[hook])
        self._hook_id = hook
        for callback in callbacks:
            try:
                callback(hook, self)
            except Exception:
                _log.exception("HTTP %s hook raised", hook.name)
        self._hook_active = False

    def txn_hook_add(self, hook: HookID, callback: Any) -> None:
        if self.txn_hooks is None:
            self.txn_hooks = {}
        self.txn_hooks.setdefault(hook, []).append(callback)
        if hook is self._hook_id and self._hook_then is not None and self._hook_queue is not None:
            self._hook_queue.append(callback)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.request is not None:
            self.proc.active_txns -= 1
            # The transaction dies with the connection (client abort, timeout, a plugin that
            # never re-enabled): TXN_CLOSE still fires, once, as in ATS.
            self._hook_then = None
            self._hook_queue = None
            if self.txn_hooks is not None or self.proc.hooks.has(HookID.TXN_CLOSE):
                self._notify(HookID.TXN_CLOSE)
            self.txn = None
            self.txn_hooks = None
        if self.origin_paused:
            self.proc.flow.paused.pop(self, None)
        self._drop_origin()
        if self.connect_vc is not None:
            self.connect_vc.do_io_close()
        self.connecting = None
        self.vc.do_io_close()
        proc = self.proc
        proc.sessions.pop(self, None)
        proc.counters[M_CUR_CLIENT] -= 1
        # Free what refers back to the session (see Continuation): gone at once, not at the
        # next GC.
        self._resumer = None
        if self.parser is not None:
            self.parser.close()
            self.parser = None
        self.read_buf.dealloc_all_readers()
        self.write_buf.dealloc_all_readers()


_RESPOND_HOOKS = frozenset({HookID.READ_REQUEST_HDR, HookID.PRE_REMAP, HookID.POST_REMAP})


def _strerror(err: int) -> str:
    import os

    try:
        return os.strerror(err)
    except ValueError:
        return str(err)
