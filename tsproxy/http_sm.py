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
504. Their bodies say only the status; the reason goes to the log (``_answer_error``). A
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
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_COMPLETE,
    VC_EVENT_WRITE_READY,
    Continuation,
)
from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookOp, HookRegistry
from iocore.net.ssl_net_vconnection import SSLNetVConnection
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
    E_HOOK_ERROR,
    E_HOOKS_DONE,
    E_KEEP_ALIVE,
    E_ORIGIN_FAILED,
    E_ORIGIN_READY,
    E_REMAP_HIT,
    E_REMAP_MISS,
    E_REQUEST_END,
    E_REQUEST_HEAD,
    E_RESPOND,
    E_RESPONSE_END,
    E_RESPONSE_HEAD,
    E_RETRY,
    RESPOND_STATES,
    TransactionMachine,
)
from tsproxy.http1_session import Http1ClientSession
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
_log = logging.getLogger("tsproxy.http")

_TXN_CLOSE = HookID.TXN_CLOSE
_NONE = BodyMode.NONE
_CHUNKED = BodyMode.CHUNKED
_UNTIL_CLOSE = BodyMode.UNTIL_CLOSE
_TERMINATE = HookOp.TERMINATE
# The hook point of each hook state of the TransactionMachine (None: not a hook state).
_STATE_HOOK: list[HookID | None] = [
    None,
    HookID.READ_REQUEST_HDR,
    HookID.PRE_REMAP,
    None,
    HookID.POST_REMAP,
    None,
    HookID.SEND_REQUEST_HDR,
    None,
    HookID.READ_RESPONSE_HDR,
    HookID.SEND_RESPONSE_HDR,
    None,
    None,
    None,
]

MAX_SPARE_SMS = 256
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
M_REUSED = _m("origin_connections_reused")
M_FC_PAUSED = _m("flow_control.paused_bytes")
M_FC_THROTTLED = _m("flow_control.throttled")
M_FC_CLOSED = _m("flow_control.closed")
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


def _warm(resolver: Resolver, config: ProxyConfig) -> None:
    """Remap targets are resolved when the config loads (blocking, as before the first request)."""
    for rule in config.remap.rules:
        result = resolver.resolve_cached(rule.to_host, rule.to_port)
        if result.error is not None:
            _dbg("cannot resolve %s: %s", rule.to_host, result.error)


class HttpProcessor:
    """Per-worker HTTP state: config, origin pool, resolver."""

    def __init__(self, nh: NetHandler, config: ProxyConfig, hooks: HookRegistry | None = None) -> None:
        self.nh = nh
        self.counters = nh.counters
        self.hooks = hooks if hooks is not None else HookRegistry()
        self.resolver = Resolver(nh.thread, config.records)
        self.pool = OriginPool(self)
        self.sessions: dict[Http1ClientSession, None] = {}
        # A request parser between messages, shared: see Http1ClientSession._parse.
        self.spare_parser: RequestParser | None = None
        self.spare_sms: list[HttpSM] = []  # state machines between transactions (see release_sm)
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
        self.resolver.set_records(config.records)
        _warm(self.resolver, config)

    def new_session(self, vc: NetVConnection, scheme: str, port: int) -> Http1ClientSession:
        return Http1ClientSession(self, vc, scheme, port)

    def new_sm(self, client: ProxyTransaction) -> HttpSM:
        """A state machine for ``client``'s next transaction: a spare one when there is one."""
        spare = self.spare_sms
        if spare:
            sm = spare.pop()
            sm.client = client
            sm.vc = client.vc
            sm.http = self.http  # it may have served a connection of an older config generation
            return sm
        return HttpSM(self, client)

    def release_sm(self, sm: HttpSM) -> None:
        """A keep-alive client side between transactions gives its SM back (an idle connection
        holds none, as with the parser); it serves the worker's next transaction."""
        spare = self.spare_sms
        if len(spare) < MAX_SPARE_SMS:
            spare.append(sm)

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
            held = sm.buffered()
            stalled.append((sm, held))
            total += held
        counters[M_FC_PAUSED] = total
        budget = proc.http.worker_budget
        if not budget or total <= budget >> 1:
            return 0
        for sm, _ in stalled:
            if not sm.throttled:
                sm.throttle()
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
        """A request head: a new transaction."""
        proc = self.proc
        proc.counters[M_INCOMING] += 1
        self.request = req
        self.response = None
        self.retried = False
        self.connect_attempts = 0
        http = self.http
        self.client_keep_alive = req.keep_alive and http.keep_alive_in and not proc.draining
        vc = self.vc
        vc.set_inactivity_timeout(http.txn_timeout_in)
        if http.active_in:
            vc.set_active_timeout(http.active_in)
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
        self._drive(cmd)

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
        self._process_origin_input()

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
            self.proc.active_txns -= 1
            # Client abort, timeout, a plugin that never re-enabled: TXN_CLOSE still fires, once.
            chain = self.chain
            if chain is not None:
                chain.close()
            if self.txn_hooks is not None or self.proc.hooks.has(_TXN_CLOSE):
                self._notify_close()
            self.txn = None
            self.txn_hooks = None
        if self.machine.state != CLOSED:
            self.machine.fire(E_CLIENT_EOF)
        if self.origin_paused:
            self.proc.flow.paused.pop(self, None)
        self._drop_origin()
        self._cancel_connect()
        self.chain = None

    # -- the transaction's steps -----------------------------------------------------------------
    def _drive(self, cmd: int) -> None:
        """Carry out the machine's commands until one waits for an event (C_NONE)."""
        while cmd and not self.closed:
            if cmd == C_RUN_HOOKS:
                cmd = self._run_hooks(self.machine.state)
            elif cmd == C_REMAP:
                cmd = self._do_remap()
            elif cmd == C_CONNECT:
                cmd = self._connect(self._origin_key()) if self.retried else self._get_origin()
            elif cmd == C_SEND_REQUEST:
                cmd = self._send_request_head()
            elif cmd == C_SEND_RESPONSE_HEAD:
                cmd = self._write_response_head()
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
            self._answer_error(404, miss, close=not self.client_keep_alive, public=True)
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
        self._drive(self._get_origin())

    def origin_ready(self, conn: OriginConnection) -> None:
        """The OriginConnector's connection is set up."""
        self.connector = None
        self._drive(self._use_origin(conn))
        self.resume_client()

    def origin_failed(self, status: int, reason: str) -> None:
        """The OriginConnector failed (it closed what it had)."""
        self.connector = None
        self.machine.fire(E_ORIGIN_FAILED)
        self._answer_error(status, reason, close=False)
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

    # -- origin side -----------------------------------------------------------------------------
    def handle_origin_event(self, event: int, data: Any) -> None:
        try:
            if event == VC_EVENT_READ_READY:
                self._process_origin_input()
            elif event == VC_EVENT_WRITE_READY:  # the origin drained the upload buffer
                self.resume_client()  # sent after every request head: a pass only if input waits
            else:
                self._origin_event(event)
        except Exception:
            self.close()  # the VC's guard closes only the VC that raised
            raise

    def _origin_event(self, event: int) -> None:
        if event == VC_EVENT_READ_COMPLETE:
            self._process_origin_input()
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

    def _waiting_on_client(self) -> bool:
        """The origin connection is idle because of the client: response bytes wait for a slow
        reader, or the origin has every request byte so far and more must come from the client.
        Never true together with waiting_on_origin, so one side's timeout always fires."""
        origin = self.origin
        if origin is None:
            return False
        if self.origin_paused and self.client.write_reader.read_avail():
            return True
        return not self.machine.request_done and not origin.write_reader.read_avail()

    def _process_origin_input(self) -> None:
        origin = self.origin
        if origin is None or self.closed:
            return
        chain = self.chain
        if chain is not None and chain.running:
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
                # The origin VC found no room: what it sent still waits for the client (the
                # client write buffer is the origin read buffer's downstream), so the origin read
                # stays off until the client drained it and a slow reader costs high_water, not
                # more. Right after a read the VC is re-enabled regardless: a fast client takes
                # the bytes before the next poll, and nothing is paused.
                self.origin_paused = True
                self.proc.flow.paused[self] = self.proc.nh.thread.now

    def buffered(self) -> int:
        """Response bytes this transaction holds (the client write and origin read buffers)."""
        origin = self.origin
        held = self.client.write_buf.max_read_avail()
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
        client = self.client
        write = client.write_buf.write
        for i, ev in enumerate(events):
            if isinstance(ev, BodyDataReceived):
                enc = self.chunked
                write(enc.encode(ev.data) if enc is not None else ev.data)
            elif isinstance(ev, ResponseReceived):
                req = self.request
                self._response_head(ev)
                chain = self.chain
                if (chain is not None and chain.running) or self.closed:
                    # A response hook is paused: the rest waits for its reenable.
                    self.resp_pending = events[i + 1 :]
                    return
                if self.request is not req:
                    # A response hook ended the transaction (error: a 500 went out instead):
                    # the rest of the origin's response belongs to nobody.
                    client.write_reenable()
                    return
            elif isinstance(ev, MessageEnded):
                if self.chunked is not None:
                    write(self.chunked.end())
                client.write_reenable()
                self._transaction_done()
                return
        client.write_reenable()

    def _response_head(self, ev: ResponseReceived) -> None:
        req = self.request
        assert req is not None
        if ev.status < 200:
            # RFC 9110 15.2: no 1xx to an HTTP/1.0 client (it would take it for the response).
            if (ev.status == 100 or ev.status == 103) and req.http_version == b"1.1":
                self.client.write_buf.write(build_client_response_head(ev, via=None, keep_alive=True))
            return
        self.response = ev
        self._drive(self.machine.fire(E_RESPONSE_HEAD))

    def _write_response_head(self) -> int:
        req = self.request
        ev = self.response
        if req is None or ev is None:
            return C_NONE
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
        self.client.write_buf.write(head)
        self.status_sent = ev.status
        metric = M_STATUS.get(ev.status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        if self.resp_pending:
            pending, self.resp_pending = self.resp_pending, ()
            self._handle_response_events(pending)
        elif self.origin_paused:
            self.client_drained()
        return C_NONE

    def _origin_eof(self) -> None:
        origin = self.origin
        if origin is None:
            return
        try:
            events = origin.parser.feed_eof()
        except HTTPProtocolError as exc:
            req = self.request
            if (
                self.response is None
                and self.origin_bytes == 0
                and origin.requests > 1
                and not self.retried
                and req is not None
                and req.body is _NONE
            ):
                # A pooled connection the origin had closed: retry once on a fresh one.
                self.retried = True
                self._drop_origin()
                self._drive(self.machine.fire(E_RETRY))
                return
            self._origin_failed(502, f"origin closed the connection: {exc.reason}")
            return
        self._handle_response_events(events)
        if self.origin is origin:
            self._drop_origin()

    def _origin_failed(self, status: int, reason: str) -> None:
        self._drop_origin()
        if not self.machine.live:
            return
        if self.response is None and self.request is not None:
            self.machine.fire(E_ORIGIN_FAILED)
            self._answer_error(status, reason, close=True)
            return
        # The head already went out: send what is buffered, then cut the connection, so the
        # client sees the head and a short body rather than nothing at all.
        self._log_failure(0, reason)
        self.client_keep_alive = False
        self.machine.fire(E_ORIGIN_FAILED)
        self.client.abort_response()

    def _drop_origin(self) -> None:
        origin = self.origin
        if origin is not None:
            self.origin = None
            origin.close()

    def _transaction_done(self) -> None:
        self.machine.fire(E_RESPONSE_END)
        proc = self.proc
        proc.counters[M_COMPLETED] += 1
        origin = self.origin
        resp = self.response
        self.origin = None
        if origin is not None:
            if (
                resp is not None
                and resp.keep_alive
                and self.machine.request_done
                and self.http.keep_alive_out
                and origin.parser.reusable
            ):
                proc.pool.put(origin)
            else:
                origin.close()
        self._end_transaction()

    def _end_transaction(self) -> None:
        proc = self.proc
        if self.request is not None:
            proc.active_txns -= 1
        if self.txn_hooks is not None or _TXN_CLOSE in self._hook_table:
            self._notify_close()
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
        self._answer_error(status, reason, close=close, public=public)

    def _answer_error(self, status: int, reason: str, *, close: bool, public: bool = False) -> None:
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
        client.write_buf.write(error_response(status, reason if public else "", close=not keep))
        client.write_reenable()
        self._drop_origin()
        self._cancel_connect()
        if not keep:
            client.discard_input()
        self.proc.counters[M_COMPLETED] += 1
        self._end_transaction()

    def _log_failure(self, status: int, reason: str) -> None:
        """The detail of a failure the client is not told (status 0: the response was cut)."""
        remap = self.remap
        rule = f" (rule {remap.rule.path}:{remap.rule.line})" if remap is not None else ""
        what = f"answered {status}" if status else "response cut"
        _log.warning("%s to client %s%s: %s", what, self.vc.remote_ip, rule, reason)

    # -- HTTP transaction hooks --------------------------------------------------------------------
    def _run_hooks(self, state: int) -> int:
        """Run the global and per-transaction callbacks of ``state``'s hook point; the command
        after them, or C_NONE while a callback pauses the chain (handle_event resumes it)."""
        txn_hooks = self.txn_hooks
        if txn_hooks is None and not self._hook_table:
            return self.machine.fire(E_HOOKS_DONE)  # no plugin hooks any HTTP stage: straight on
        hook = _STATE_HOOK[state]
        assert hook is not None
        callbacks = self.proc.hooks.get(hook)
        if txn_hooks is not None and hook in txn_hooks:
            callbacks = (*callbacks, *txn_hooks[hook])
        if not callbacks:
            return self.machine.fire(E_HOOKS_DONE)
        chain = self.chain
        if chain is None:
            chain = self.chain = HookChain(self, self._schedule_resume, _hook_error)
        if not chain.start(hook, callbacks):
            return C_NONE
        return self._hooks_ended(chain)

    def _hooks_ended(self, chain: HookChain) -> int:
        if self.closed or chain.closed:
            return C_NONE
        if chain.op is _TERMINATE:
            chain.op = HookOp.DEFAULT
            hook = chain.hook
            self.machine.fire(E_HOOK_ERROR)
            self._answer_error(500, f"plugin failed in {hook.name if hook else '?'}", close=True)
            return C_NONE
        if self.synthetic is not None:
            self.machine.fire(E_RESPOND)
            self._send_synthetic()
            return C_NONE
        return self.machine.fire(E_HOOKS_DONE)

    def _schedule_resume(self) -> None:
        self.proc.nh.thread.schedule_imm(self)

    def handle_event(self, event: int, data: Any = None) -> Any:
        """A paused hook re-enabled (the chain's resume, from the loop): continue the chain."""
        chain = self.chain
        if self.closed or chain is None or not chain.running:
            return None  # the transaction ended meanwhile
        try:
            if chain.advance():
                self._drive(self._hooks_ended(chain))
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

    def _send_synthetic(self) -> None:
        assert self.synthetic is not None
        status, headers, body = self.synthetic
        req = self.request
        close = not self.client_keep_alive or (
            req is not None and not self.machine.request_done and req.body is not _NONE
        )
        self.client_keep_alive = not close
        self._drop_origin()
        self.status_sent = status
        client = self.client
        client.write_buf.write(
            synthetic_response(
                status, headers, body, close=close, head_only=req is not None and req.method == b"HEAD"
            )
        )
        client.write_reenable()
        metric = M_STATUS.get(status // 100)
        if metric is not None:
            self.proc.counters[metric] += 1
        self.proc.counters[M_COMPLETED] += 1
        if close:
            client.discard_input()
        self._end_transaction()

    def _notify_close(self) -> None:
        """TXN_CLOSE: every callback once; reenable is not needed."""
        callbacks = self.proc.hooks.get(_TXN_CLOSE)
        if self.txn_hooks is not None and _TXN_CLOSE in self.txn_hooks:
            callbacks = (*callbacks, *self.txn_hooks[_TXN_CLOSE])
        chain = self.chain
        if chain is None:
            chain = HookChain(self, self._schedule_resume, _hook_error)
        chain.notify(_TXN_CLOSE, callbacks)

    def txn_hook_add(self, hook: HookID, callback: Any) -> None:
        if self.txn_hooks is None:
            self.txn_hooks = {}
        self.txn_hooks.setdefault(hook, []).append(callback)
        chain = self.chain
        if chain is not None and chain.running and chain.hook is hook:
            chain.append(callback)


def _hook_error(hook: HookID, exc: Exception) -> None:
    """A plugin's HTTP hook raised (called from inside the chain's except clause)."""
    if hook is _TXN_CLOSE:
        _log.exception("HTTP %s hook raised", hook.name)
    else:
        _log.exception("HTTP %s hook raised; answering 500", hook.name)


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
