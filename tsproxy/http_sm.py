"""The HTTP transaction state machine (ATS HttpSM), and the per-worker HttpProcessor.

Theory of operation
-------------------
A client session of some protocol (``Http1ClientSession``, tsproxy/http1_session.py) parses the
client's bytes and hands each request to its ``HttpSM``, which runs the transaction without
knowing the protocol: it talks to its client side through ``ProxyTransaction``
(tsproxy/proxy_transaction.py). The order of the steps is the sans-IO ``TransactionMachine``
(tsproxy/http/transaction.py): the SM fires an event (request head, hooks done, remap hit,
origin ready, response head, response end ...) and executes the command it gets back (run the
next stage's hooks, remap, connect, send the request head, answer 404 ...); commands that need
their event's details (an error's reason, a synthetic response) are carried out by the code that
fired the event.

The SM is split along its two other seams, as module functions taking the SM so that they read
its slots directly: the response side (origin input, the relay to the client, flow-control
pauses, origin failures) is tsproxy/http_response.py; the hook stages and the answers a plugin
makes are tsproxy/http_txn_hooks.py. This module keeps the request side (start, remap, getting
an origin connection, the request head), the transaction's end and the local answers.

The hook points READ_REQUEST_HDR, PRE_REMAP, POST_REMAP, SEND_REQUEST_HDR, READ_RESPONSE_HDR and
SEND_RESPONSE_HDR run on one ``HookChain`` (iocore/net/hook_chain.py), built for a transaction
only when some plugin hooks it: a proxy without HTTP plugins pays one truth test per stage. A
callback that has not re-enabled when it returns pauses the transaction; a later ``reenable``
puts the SM itself on the loop (``schedule_imm``) and ``handle_event`` continues the chain.
``respond()`` stops the chain with a synthetic answer; a raising callback or ``reenable(error)``
answers 500; TXN_CLOSE is a notification, once per transaction, however it ended.

An origin connection comes from the per-worker ``OriginPool`` or an ``OriginConnector``
(tsproxy/origin_connector.py). The response flows back through the ``OriginConnection``: its
bytes go to a ``ResponseParser``; the head, then each body piece, is written to the client's
``write_buf``, which is the origin read buffer's ``downstream``: the two share one water mark
(``proxy.config.http.flow_control.high_water``), so the origin VC reads only while they hold less
together; when it finds no room (a READ_READY with nothing new) the transaction is paused, and
the client's drained buffer resumes it (``client_drained``). ``FlowControl`` keeps the worker's
budget over the paused transactions.

A transaction ends with the response's ``MessageEnded``: the origin connection returns to the
pool when both sides allow keep-alive, and the client side reads its next request or closes.
Errors map to answers: no remap rule 404, malformed request 400/413/414/431 (then close), origin
unreachable 502, origin silent past ``proxy.config.http.transaction_no_activity_timeout_out``
504. Their bodies say only the status; the reason goes to the log (``answer_error``). A
request-target's dot segments are resolved (tsproxy/http/path.py) before the first hook and the
remap lookup see it.

An inactivity timeout counts against the side that keeps the transaction waiting: an origin
idle only because backpressure from a slow client stopped its reads (or because it waits for
request body bytes the client has not sent) is re-armed, not answered 504; a client idle only
because the origin has not answered yet is re-armed likewise. The two conditions exclude each
other, so a stalled transaction always ends by one side's timeout.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_READY,
    Continuation,
)
from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookRegistry
from iocore.net.ssl_net_vconnection import SSLNetVConnection
from iocore.records.config_processor import ConfigHandle, ConfigProcessor
from iocore.records.stats import process_metric
from tsproxy.http.message import (
    ChunkedEncoder,
    build_origin_request_head,
)
from tsproxy.http.parser import (
    BodyMode,
    RequestParser,
    RequestReceived,
    ResponseReceived,
)
from tsproxy.http.path import TargetRefused, normalize_target
from tsproxy.http.transaction import (
    C_CONNECT,
    C_NONE,
    C_REMAP,
    C_RUN_HOOKS,
    C_SEND_REQUEST,
    C_SEND_RESPONSE_HEAD,
    CLOSED,
    E_CLIENT_EOF,
    E_CLOSE,
    E_ERROR,
    E_HOOKS_DONE,
    E_KEEP_ALIVE,
    E_ORIGIN_FAILED,
    E_ORIGIN_READY,
    E_REMAP_HIT,
    E_REMAP_MISS,
    E_REQUEST_END,
    E_REQUEST_HEAD,
    RESPOND_STATES,
    TransactionMachine,
)
from tsproxy.http1_session import Http1ClientSession
from tsproxy.http2_session import Http2ClientSession
from tsproxy.http_response import (
    M_COMPLETED,
    M_STATUS,
    buffered,
    origin_event,
    process_origin_input,
    throttle,
    write_response_head,
)
from tsproxy.http_txn_hooks import hooks_ended, notify_close, run_hooks
from tsproxy.origin_connector import OriginConnection, OriginConnector, OriginPool, ServerGroups
from tsproxy.origin_health import OriginHealth
from tsproxy.remap import OriginKey, describe_miss, forward_result
from tsproxy.resolver import Resolver

if TYPE_CHECKING:
    from iocore.net.net_handler import NetHandler
    from iocore.net.net_vconnection import NetVConnection
    from iocore.net.ssl_sni_config import SNIConfigParams, SNIItem
    from tsproxy.config import ProxyConfig
    from tsproxy.proxy_transaction import ProxyTransaction
    from tsproxy.remap import RemapResult

_dbg = DbgCtl("http")
_dbg_config = DbgCtl("http_config")
_log = logging.getLogger("tsproxy.http")

_TXN_CLOSE = HookID.TXN_CLOSE
_NONE = BodyMode.NONE
_CHUNKED = BodyMode.CHUNKED

MAX_SPARE_SMS = 256
# Flow control (proxy.config.http.flow_control.*, see FlowControl): a transaction stalled by a
# slow client for STALLED_AFTER seconds counts against its worker's budget; past half of it the
# stalled transactions buffer at most THROTTLED_WATER_MARK (tsproxy/http_response.py), past all
# of it the longest-stalled are closed.
STALLED_AFTER = 1.0
FLOW_CONTROL_PERIOD = 0.5


M_INCOMING = process_metric("http", "incoming_requests")
M_OUTGOING = process_metric("http", "outgoing_requests")
M_REUSED = process_metric("http", "origin_connections_reused")
M_FC_PAUSED = process_metric("http", "flow_control.paused_bytes")
M_FC_CLOSED = process_metric("http", "flow_control.closed")


class HttpConfig:
    """The HTTP records a transaction needs, read once per config generation (ATS HttpConfig).

    An immutable snapshot kept in the worker's ConfigProcessor (``HttpProcessor.http_handle``):
    each transaction acquires the current one when it starts and releases it when it ends, so a
    reload reaches every transaction that starts after it, and a transaction in progress keeps
    its own to the end. ``on_release`` runs when a replaced snapshot's last transaction ended.
    """

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
        "generation",
        "h2_header_table",
        "h2_max_continuation",
        "h2_max_frame",
        "h2_max_header_list",
        "h2_max_ping",
        "h2_max_priority",
        "h2_max_rst",
        "h2_max_settings_frames",
        "h2_max_settings_per_frame",
        "h2_max_settings_per_minute",
        "h2_max_streams",
        "h2_timeout",
        "h2_window",
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
        self.generation = config.generation  # the master's count of config loads (as SSLSnapshot's)
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
        # HTTP/2 (tsproxy/http2_session.py): the SETTINGS a new connection sends, its limits
        self.h2_max_streams = g("proxy.config.http2.max_concurrent_streams_in")
        self.h2_window = g("proxy.config.http2.initial_window_size_in")
        self.h2_max_frame = g("proxy.config.http2.max_frame_size")
        self.h2_header_table = g("proxy.config.http2.header_table_size")
        self.h2_max_header_list = g("proxy.config.http2.max_header_list_size")
        self.h2_timeout = g("proxy.config.http2.no_activity_timeout_in")
        self.h2_max_settings_per_frame = g("proxy.config.http2.max_settings_per_frame")
        self.h2_max_settings_per_minute = g("proxy.config.http2.max_settings_per_minute")
        self.h2_max_settings_frames = g("proxy.config.http2.max_settings_frames_per_minute")
        self.h2_max_ping = g("proxy.config.http2.max_ping_frames_per_minute")
        self.h2_max_priority = g("proxy.config.http2.max_priority_frames_per_minute")
        self.h2_max_rst = g("proxy.config.http2.max_rst_stream_frames_per_minute")
        self.h2_max_continuation = g("proxy.config.http2.max_continuation_frames_per_minute")
        # sni.yaml, when host_sni_policy has something to protect (an item with an inbound policy)
        sni = config.sni
        self.sni = sni if sni is not None and sni.has_host_policy else None

    def on_release(self) -> None:
        """ConfigProcessor: replaced, and the last transaction that held it has ended."""
        _dbg_config("HttpConfig generation %d released", self.generation)


def _warm(resolver: Resolver, config: ProxyConfig) -> None:
    """Remap targets are resolved when the config loads (blocking, as before the first request)."""
    for rule in config.remap.rules:
        result = resolver.resolve_cached(rule.to_host, rule.to_port)
        if result.error is not None:
            _dbg("cannot resolve %s: %s", rule.to_host, result.error)


class HttpProcessor:
    """Per-worker HTTP state: config, origin pool, resolver.

    The current ``HttpConfig`` is in ``http_handle``, one id of the worker's ConfigProcessor
    (iocore/records/config_processor.py; the worker hands over its own, beside its TLS
    snapshots; without one the processor makes its own): ``set_config`` installs a new one
    on reload, ``HttpSM.start`` acquires it and the transaction's end releases it. ``http`` is
    the current one too, for what is not a transaction (sessions, the pool, FlowControl).
    """

    def __init__(
        self,
        nh: NetHandler,
        config: ProxyConfig,
        hooks: HookRegistry | None = None,
        config_processor: ConfigProcessor[object] | None = None,
    ) -> None:
        self.nh = nh
        self.counters = nh.counters
        self.hooks = hooks if hooks is not None else HookRegistry()
        self.resolver = Resolver(nh.thread, config.records)
        self.pool = OriginPool(self)
        self.sessions: dict[Http1ClientSession | Http2ClientSession, None] = {}
        # A request parser between messages, shared: see Http1ClientSession._parse.
        self.spare_parser: RequestParser | None = None
        self.spare_sms: list[HttpSM] = []  # state machines between transactions (see release_sm)
        self.draining = False
        self.active_txns = 0  # transactions in progress (proxy.config.net.max_requests_in)
        self.request_share = 1  # workers sharing the listeners: max_requests_in is split over them
        self.health = OriginHealth()
        if config_processor is None:
            config_processor = ConfigProcessor()
        self.http_handle: ConfigHandle[HttpConfig] = ConfigHandle(config_processor, "http")
        self.set_config(config)
        self.flow = FlowControl(self)
        self.servers = ServerGroups(self)

    def set_config(self, config: ProxyConfig) -> None:
        self.config = config
        http = self.http = HttpConfig(config)
        # The old one is dropped now, or when the last transaction holding it ends.
        self.http_handle.set(http)
        # This proxy's own addresses: remap_required 0 never forwards a request to itself.
        self.listen_ports = {p.port for p in config.ports}
        self.listen_ips = {p.ip_in for p in config.ports if p.ip_in is not None}
        # Idle origin connections were opened (and verified) under the old config: a reload that
        # tightens verification or changes the CA must not keep reusing them. Busy ones are not
        # pooled again (OriginPool.put checks the config they were opened under).
        self.pool.close_all()
        self.origin_tls = config.origin_tls
        self.resolver.set_records(config.records)
        _warm(self.resolver, config)

    def new_session(self, vc: NetVConnection, scheme: str, port: int) -> Http1ClientSession:
        return Http1ClientSession(self, vc, scheme, port)

    def new_h2_session(self, vc: NetVConnection, port: int) -> Http2ClientSession:
        """A TLS connection that negotiated h2."""
        return Http2ClientSession(self, vc, port)

    def new_sm(self, client: ProxyTransaction) -> HttpSM:
        """A state machine for ``client``'s next transaction: a spare one when there is one."""
        spare = self.spare_sms
        if spare:
            sm = spare.pop()
            sm.client = client
            sm.vc = client.vc
            return sm
        return HttpSM(self, client)

    def release_sm(self, sm: HttpSM) -> None:
        """A keep-alive client side between transactions gives its SM back (an idle connection
        holds none, as with the parser); it serves the worker's next transaction."""
        spare = self.spare_sms
        if len(spare) < MAX_SPARE_SMS:
            spare.append(sm)

    def drain(self) -> None:
        """Graceful stop: idle sessions close now, busy ones after their current response (HTTP/2:
        GOAWAY, then the open streams finish)."""
        self.draining = True
        for session in list(self.sessions):
            session.drain()
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
        self.paused: dict[HttpSM, float] = {}
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
        stalled: list[tuple[HttpSM, int]] = []
        total = 0
        for sm, since in paused.items():  # oldest pause first
            if since > old:
                break
            held = buffered(sm)
            stalled.append((sm, held))
            total += held
        counters[M_FC_PAUSED] = total
        budget = proc.http.worker_budget
        if not budget or total <= budget >> 1:
            return 0
        for sm, _ in stalled:
            if not sm.throttled:
                throttle(sm)
        for sm, held in stalled:
            if total <= budget:
                break
            _dbg("over the worker's buffer budget (%d > %d): closing a slow reader", total, budget)
            counters[M_FC_CLOSED] += 1
            total -= held
            sm.close()
        counters[M_FC_PAUSED] = total
        return 0


class HttpSM(Continuation):
    """The transactions of one client side, one at a time (see the module docstring)."""

    __slots__ = (
        "_hook_table",
        "chain",
        "chunked",
        "chunked_up",
        "client",
        "client_keep_alive",
        "closed",
        "connect_attempts",
        "connector",
        "framing",
        "http",
        "machine",
        "origin",
        "origin_bytes",
        "origin_paused",
        "proc",
        "remap",
        "request",
        "resp_pending",
        "response",
        "retried",
        "status_sent",
        "synthetic",
        "throttled",
        "txn",
        "txn_hooks",
        "vc",
    )

    def __init__(self, proc: HttpProcessor, client: ProxyTransaction) -> None:
        super().__init__()  # handle_event is overridden: it resumes a paused hook chain
        self.proc = proc
        self.http = proc.http
        self.client = client
        self.vc = client.vc
        self.machine = TransactionMachine()
        self.closed = False
        self.request: RequestReceived | None = None
        self.remap: RemapResult | None = None
        self.origin: OriginConnection | None = None
        self.connector: OriginConnector | None = None  # a new origin connection being set up
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
        self.txn: Any = None  # the plugin facade of the current transaction, made on demand
        self.txn_hooks: dict[HookID, list[Any]] | None = None
        # The worker's global hooks by id (the registry's own dict, mutated in place); empty
        # means no plugin hooks any HTTP stage, and the stages then run straight through.
        self._hook_table = proc.hooks.by_id
        self.chain: HookChain | None = None  # built when a stage has callbacks
        self.synthetic: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        # Response events held back while a response hook pauses (a tuple when there are none).
        self.resp_pending: Sequence[Any] = ()
        self.status_sent = 0  # the status the client got for the current transaction (0: none yet)

    @property
    def request_done(self) -> bool:
        return self.machine.request_done

    # -- the client side's calls -----------------------------------------------------------------
    def start(self, req: RequestReceived) -> None:
        """A request head: a new transaction. It holds the current HttpConfig to its end
        (released where ``request`` goes back to None: end_transaction, client_closed)."""
        proc = self.proc
        proc.counters[M_INCOMING] += 1
        self.http = proc.http_handle.acquire()
        self.request = req
        self.response = None
        self.retried = False
        self.connect_attempts = 0
        http = self.http
        self.client_keep_alive = req.keep_alive and http.keep_alive_in and not proc.draining
        self.client.txn_start(http)
        proc.active_txns += 1
        cmd = self.machine.fire(E_REQUEST_HEAD)
        if http.max_requests_in and proc.active_txns > -(-http.max_requests_in // proc.request_share):
            self.send_error(503, "too many requests in progress; try again", close=True)
            return
        if req.method == b"CONNECT":
            self.send_error(501, "CONNECT is not supported", close=True)
            return
        # Dot segments go before anything looks at the path (hooks, the remap prefix match).
        try:
            target = normalize_target(req.target)
        except TargetRefused as exc:
            self.send_error(400, f"request-target refused: {exc.reason}", close=True)
            return
        if target is not req.target:
            self.request = replace(req, target=target)
        self.drive(cmd)

    def blocked(self) -> bool:
        """The client's input waits: for the origin connection, a plugin, or the upload buffer."""
        if self.connector is not None:
            return True
        chain = self.chain
        if chain is not None and chain.running:
            return True
        origin = self.origin
        return origin is not None and origin.write_buf.high_water()

    def request_body(self, data: bytes) -> None:
        origin = self.origin
        if origin is None:
            return  # the transaction already failed; drop the body
        enc = self.chunked_up
        origin.write_buf.write(enc.encode(data) if enc is not None else data)
        origin.vc.write.reenable()

    def request_end(self) -> None:
        machine = self.machine
        if machine.live:
            machine.fire(E_REQUEST_END)
        origin = self.origin
        if origin is not None and self.chunked_up is not None:
            origin.write_buf.write(self.chunked_up.end())
            origin.vc.write.reenable()

    def client_drained(self) -> None:
        """The client took the buffered response bytes: read the origin again."""
        self.origin_paused = False
        self.proc.flow.paused.pop(self, None)
        process_origin_input(self)

    def waiting_on_origin(self) -> bool:
        """A transaction is in progress and nothing waits for the client: the whole request was
        read (or reading it waits for the origin) and no response bytes wait to be sent."""
        chain = self.chain
        return (
            self.request is not None
            and (chain is None or not chain.running)  # a plugin holding it: the client's timeout governs
            and not self.client.write_reader.read_avail()
            and (self.machine.request_done or self.blocked())
        )

    def close(self) -> None:
        """Close the whole client connection (FlowControl, a failed queued transaction)."""
        self.client.close()

    def client_closed(self) -> None:
        """The client side closed: the transaction (if any) dies with it."""
        self.closed = True
        if self.request is not None:
            proc = self.proc
            proc.active_txns -= 1
            proc.http_handle.release(self.http)
            # Client abort, timeout, a plugin that never re-enabled: TXN_CLOSE still fires, once.
            chain = self.chain
            if chain is not None:
                chain.close()
            if self.txn_hooks is not None or self.proc.hooks.has(_TXN_CLOSE):
                notify_close(self)
            self.txn = None
            self.txn_hooks = None
        if self.machine.state != CLOSED:
            self.machine.fire(E_CLIENT_EOF)
        if self.origin_paused:
            self.proc.flow.paused.pop(self, None)
        self.drop_origin()
        self._cancel_connect()
        self.chain = None

    # -- the transaction's steps -----------------------------------------------------------------
    def drive(self, cmd: int) -> None:
        """Carry out the machine's commands until one waits for an event (C_NONE)."""
        while cmd and not self.closed:
            if cmd == C_RUN_HOOKS:
                if self.txn_hooks is None and not self._hook_table:
                    cmd = self.machine.fire(E_HOOKS_DONE)  # no plugin hooks any HTTP stage: straight on
                else:
                    cmd = run_hooks(self, self.machine.state)
            elif cmd == C_REMAP:
                cmd = self._do_remap()
            elif cmd == C_CONNECT:
                cmd = self._connect(self._origin_key()) if self.retried else self._get_origin()
            elif cmd == C_SEND_REQUEST:
                cmd = self._send_request_head()
            elif cmd == C_SEND_RESPONSE_HEAD:
                cmd = write_response_head(self)
            else:
                raise AssertionError(f"HttpSM: command {cmd} has no step")

    def resume_client(self) -> None:
        """After a step that came from the loop (not from the client's input): the client's held
        input goes on."""
        if not self.closed:
            self.client.resume_input()

    def _do_remap(self) -> int:
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
        http = self.http
        client = self.client
        sni = http.sni
        if sni is not None and host and _host_sni_mismatch(self.vc, sni, host):
            self.send_error(403, "Access Denied", close=not self.client_keep_alive, public=True)
            return C_NONE
        remap = http.remap.lookup(client.scheme, host, client.port, target)
        if remap is None and not http.remap_required:
            remap = _forward_target(self, req, host, target)
        if remap is None:
            _dbg("no remap rule for %s://%s%s", client.scheme, host, target)
            self.machine.fire(E_REMAP_MISS)
            miss = describe_miss(client.scheme, host, client.port)  # the client's own Host: public
            self.answer_error(404, miss, close=not self.client_keep_alive, public=True)
            return C_NONE
        self.remap = remap
        return self.machine.fire(E_REMAP_HIT)

    def sni_outbound(self) -> SNIItem | None:
        """The sni.yaml item of this client connection, when it sets origin-side keys."""
        vc = self.vc
        policy = vc.sni_policy if isinstance(vc, SSLNetVConnection) else None
        return policy.outbound if policy is not None else None

    def _origin_key(self) -> OriginKey:
        r = self.remap
        assert r is not None
        key = r.rule.origin_key  # computed once per remap rule (it includes the rule's TLS options)
        if key[0] == "https":
            item = self.sni_outbound()
            if item is not None:
                # Another client certificate or verification policy: another pool.
                key = (key[0], key[1], key[2], (*key[3], ("sni.yaml", item.source)))
        return key

    def _get_origin(self) -> int:
        key = self._origin_key()
        proc = self.proc
        conn = proc.pool.get(key) if self.http.keep_alive_out else None
        if conn is not None:
            proc.counters[M_REUSED] += 1
            return self._use_origin(conn)
        return self._connect(key)

    def _connect(self, key: OriginKey) -> int:
        connector = self.connector = OriginConnector(self, key)
        connector.start()
        return C_NONE

    def connect_turn(self) -> None:
        """ServerGroups: a transaction queued at per_server.connection.max may connect now."""
        self.drive(self._get_origin())

    def origin_ready(self, conn: OriginConnection) -> None:
        """The OriginConnector's connection is set up."""
        self.connector = None
        self.drive(self._use_origin(conn))
        self.resume_client()

    def origin_failed(self, status: int, reason: str) -> None:
        """The OriginConnector failed (it closed what it had)."""
        self.connector = None
        self.machine.fire(E_ORIGIN_FAILED)
        self.answer_error(status, reason, close=False)
        self.resume_client()

    def _cancel_connect(self) -> None:
        connector = self.connector
        if connector is not None:
            self.connector = None
            connector.cancel()

    def _use_origin(self, conn: OriginConnection) -> int:
        self.origin = conn
        self.origin_bytes = 0
        conn.attach(self, self.client.write_buf)
        if self.http.active_out:
            conn.vc.set_active_timeout(self.http.active_out)
        conn.requests += 1
        return self.machine.fire(E_ORIGIN_READY)

    def _send_request_head(self) -> int:
        req = self.request
        remap = self.remap
        conn = self.origin
        if req is None or remap is None or conn is None:
            return C_NONE
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
            self.machine.fire(E_REQUEST_END)
        return C_NONE

    # -- origin side (the response: tsproxy/http_response.py) -----------------------------------
    def handle_origin_event(self, event: int, data: Any) -> None:
        try:
            if event == VC_EVENT_READ_READY:
                process_origin_input(self)
            elif event == VC_EVENT_WRITE_READY:  # the origin drained the upload buffer
                self.resume_client()  # sent after every request head: a pass only if input waits
            else:
                origin_event(self, event)
        except Exception:
            self.close()  # the VC's guard closes only the VC that raised
            raise

    def drop_origin(self) -> None:
        origin = self.origin
        if origin is not None:
            self.origin = None
            origin.close()

    def end_transaction(self) -> None:
        proc = self.proc
        if self.request is not None:
            proc.active_txns -= 1
            proc.http_handle.release(self.http)
        if self.txn_hooks is not None or _TXN_CLOSE in self._hook_table:
            notify_close(self)
        chain = self.chain
        if chain is not None:
            self.chain = None
            chain.close()
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
            proc.flow.paused.pop(self, None)
        self.throttled = False
        keep = self.client_keep_alive and not proc.draining
        self.machine.fire(E_KEEP_ALIVE if keep else E_CLOSE)
        self.client.txn_done(keep)

    def send_error(self, status: int, reason: str, *, close: bool, public: bool = False) -> None:
        """A local answer (400, 403, 501, 503 ...) instead of the origin's."""
        self.machine.fire(E_ERROR)
        self.answer_error(status, reason, close=close, public=public)

    def answer_error(self, status: int, reason: str, *, close: bool, public: bool = False) -> None:
        """Answer the current transaction with a ``status`` tsproxy makes itself. ``reason`` is
        for the log (a warning for a 502/504, an origin failure the operator must see; the
        ``http`` debug tag for the rest, which a client or a plugin chose and could repeat at
        will); the client gets a generic body, with ``reason`` in it only when ``public`` (the
        text names nothing but the client's own input)."""
        if status == 502 or status == 504:
            self.log_failure(status, reason)
        else:
            _dbg("answering %d to %s: %s", status, self.vc.remote_ip, reason)
        metric = M_STATUS.get(status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        req = self.request
        if req is None or (not self.machine.request_done and req.body is not _NONE):
            close = True  # we cannot find the next request's start in an unread body
        keep = self.client_keep_alive and not close
        self.client_keep_alive = keep
        chain = self.chain
        if chain is not None:
            chain.close()  # a paused hook's late reenable is ignored
        self.status_sent = status
        client = self.client
        client.write_error(status, reason if public else "", close=not keep)
        client.write_reenable()
        self.drop_origin()
        self._cancel_connect()
        if not keep:
            client.discard_input()
        self.proc.counters[M_COMPLETED] += 1
        self.end_transaction()

    def log_failure(self, status: int, reason: str) -> None:
        """The detail of a failure the client is not told (status 0: the response was cut)."""
        remap = self.remap
        rule = f" (rule {remap.rule.path}:{remap.rule.line})" if remap is not None else ""
        what = f"answered {status}" if status else "response cut"
        _log.warning("%s to client %s%s: %s", what, self.vc.remote_ip, rule, reason)

    # -- HTTP transaction hooks (the stages: tsproxy/http_txn_hooks.py) ---------------------------
    def schedule_resume(self) -> None:
        self.proc.nh.thread.schedule_imm(self)

    def handle_event(self, event: int, data: Any = None) -> Any:
        """A paused hook re-enabled (the chain's resume, from the loop): continue the chain."""
        chain = self.chain
        if self.closed or chain is None or not chain.running:
            return None  # the transaction ended meanwhile
        try:
            if chain.advance():
                self.drive(hooks_ended(self, chain))
            self.resume_client()
        except Exception:
            self.close()
            raise
        return None

    def hook_reenable(self, *, error: bool = False) -> None:
        """TSHttpTxnReenable(txn, TS_EVENT_HTTP_CONTINUE | TS_EVENT_HTTP_ERROR)."""
        chain = self.chain
        if self.closed or chain is None or not chain.reenable(error=error):
            _dbg("txn reenable ignored (closed=%s, no hook active)", self.closed)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A synthetic response instead of the origin's; only before the request went out."""
        chain = self.chain
        if self.closed or chain is None or not chain.running or self.machine.state not in RESPOND_STATES:
            return False
        self.synthetic = (status, headers, body)
        chain.stop()
        return True

    def txn_hook_add(self, hook: HookID, callback: Any) -> None:
        if self.txn_hooks is None:
            self.txn_hooks = {}
        self.txn_hooks.setdefault(hook, []).append(callback)
        chain = self.chain
        if chain is not None and chain.running and chain.hook is hook:
            chain.append(callback)


def _forward_target(sm: HttpSM, req: RequestReceived, host: bytes, target: bytes) -> RemapResult | None:
    """remap_required 0: the host the request names, for a client in unmapped_clients, unless
    that is this proxy itself (a request sent round in a loop)."""
    try:
        client = ipaddress.ip_address(sm.vc.remote_ip)
    except ValueError:
        return None
    http = sm.http
    if not any(client in net for net in http.unmapped_clients):
        return None
    result = forward_result(sm.client.scheme, host, target)
    if result is None:
        return None
    via = http.request_via
    if via is not None and any(n.lower() == b"via" and via in v for n, v in req.headers):
        return None  # it has been through this proxy (by name) already
    proc = sm.proc
    if result.origin_port in proc.listen_ports:
        # Blocking on a cache miss (rare: remap_required 0 to one of this proxy's own ports).
        resolved = proc.resolver.resolve_cached(result.origin_host, result.origin_port)
        try:
            addr = ipaddress.ip_address(resolved.addr[0] if resolved.error is None else "")
        except ValueError:
            return result  # the connect reports it
        if addr.is_loopback or addr.is_unspecified or str(addr) in proc.listen_ips:
            return None
    return result


def _host_sni_mismatch(vc: NetVConnection, sni: SNIConfigParams, host: bytes) -> bool:
    """host_sni_policy (ATS HttpSM): a TLS request whose Host names an sni.yaml item with an
    inbound policy that the item of its SNI (or, without SNI, nothing) does not share is
    logged (1) or refused (2): the policy of the Host was never applied to this connection."""
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


__all__ = ["FlowControl", "HttpConfig", "HttpProcessor", "HttpSM"]
