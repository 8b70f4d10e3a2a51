"""tsproxy.api: the plugin facade (ATS ts.h). The only module plugins import.

A plugin is a Python module (or file listed in plugin.config) with::

    def plugin_init(api: tsproxy.api.PluginAPI, args: list[str]) -> None: ...

``plugin_init`` runs once in every worker. It registers callbacks with ``api.hook_add``. A TLS
hook callback receives ``(hook_id, vconn)``; it must end each invocation with exactly one of
``vconn.reenable()``, ``vconn.reenable(error=True)`` or ``vconn.tunnel(dest)`` (followed by a
reenable), now or later (e.g. from ``api.schedule_in``). Calls after the connection closed, and
second calls, are harmless. A callback that raises fails that connection only.

Plugins never see sockets, file descriptors, the event loop or internal objects: a ``VConn``
is a facade that is invalidated when its connection ends.

Blocking work (reading files, building SSL contexts) goes to ``api.run_in_thread(fn, on_done)``:
``fn()`` runs in a small per-process thread pool and ``on_done(result_or_exception)`` runs back
on the worker's loop (``EThread.call_soon_threadsafe``), where it may re-enable a hook.

See docs/plugins.md for the hook order, the reenable contract and examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar, cast

from iocore.eventsystem.event import (
    EVENT_INTERVAL,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_READY,
    Continuation,
    Event,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.net.hooks import HookID
from iocore.net.net_vconnection import NetVConnection
from iocore.net.proxy_protocol import ProxyHeader
from iocore.net.ssl_net_vconnection import SSLNetVConnection
from iocore.records.errors import TSError
from tsproxy.api._seams import (
    HookVC,
    HttpTxnSession,
    PluginWorker,
    StreamVC,
    TxnHookCallback,
    UserData,
)
from tsproxy.http.path import TargetRefused, normalize_target

if TYPE_CHECKING:
    from cryptography import x509
    from OpenSSL import SSL

    from iocore.net.tls.client_hello import ClientHello
    from tsproxy.config import ProxyConfig
    from tsproxy.http.parser import RequestReceived, ResponseReceived
    from tsproxy.worker import Worker

__all__ = [
    "HTTP_HOOKS",
    "HeaderView",
    "HookID",
    "PluginAPI",
    "PluginError",
    "ProtocolStream",
    "ProxyHeader",
    "Request",
    "Response",
    "ScheduledCall",
    "Txn",
    "VConn",
    "load_plugins",
]

T = TypeVar("T")
THREAD_POOL_SIZE = 2

# Hooks whose callbacks receive a Txn (the others receive a VConn).
HTTP_HOOKS = frozenset(
    {
        HookID.READ_REQUEST_HDR,
        HookID.PRE_REMAP,
        HookID.POST_REMAP,
        HookID.SEND_REQUEST_HDR,
        HookID.READ_RESPONSE_HDR,
        HookID.SEND_RESPONSE_HDR,
        HookID.TXN_CLOSE,
    }
)

_log = logging.getLogger("tsproxy.plugin")


class PluginError(TSError):
    """A plugin failed to load or to initialise."""


# What api.hook_add takes: a callback of the HTTP hooks (a Txn) or of the VConn hooks (a VConn).
HookCallback = Callable[[HookID, "Txn"], None] | Callable[[HookID, "VConn"], None]


def _ip_port(addr: tuple[object, ...]) -> tuple[str, int] | None:
    """``(ip, port)`` of an IPv4/IPv6 sockaddr; None when there is none (not connected)."""
    if len(addr) < 2 or not isinstance(addr[1], int):
        return None
    return str(addr[0]), addr[1]


class VConn:
    """What a TLS/VConn hook may see and do on one connection (ATS TSVConn).

    Inbound (client) connections: VCONN_START, SSL_CLIENT_HELLO, SSL_SERVERNAME, SSL_CERT,
    SSL_VERIFY_CLIENT, VCONN_CLOSE. Outbound (origin) connections, plain or TLS:
    VCONN_OUTBOUND_START, SSL_VERIFY_SERVER, VCONN_OUTBOUND_CLOSE; there ``client_address`` is
    the origin's address, ``local_address`` ours, ``sni`` the name we send (None for plain
    origins and IP literals), and ``tunnel``/``set_ssl_context``/``protocol_disable`` do nothing.
    """

    __slots__ = ("_vc",)

    def __init__(self, vc: HookVC) -> None:
        self._vc = vc

    @property
    def outbound(self) -> bool:
        """True on origin connections (VCONN_OUTBOUND_START, SSL_VERIFY_SERVER, VCONN_OUTBOUND_CLOSE)."""
        return bool(self._vc.outbound)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate: the client's in SSL_VERIFY_CLIENT, the origin's in
        SSL_VERIFY_SERVER (and after); None when there is none (plain, not yet, no client cert)."""
        return self._vc.peer_certificate

    @property
    def verify_error(self) -> str | None:
        """The chain/name verification result for the peer certificate, None when it passed.
        In SSL_VERIFY_SERVER: what the configured policy found (only ever set under
        PERMISSIVE, since ENFORCED fails such a connection before the hook)."""
        return self._vc.verify_error

    @property
    def closed(self) -> bool:
        return self._vc.closed

    @property
    def client_address(self) -> tuple[str, int] | None:
        return _ip_port(self._vc.remote_addr)

    @property
    def local_address(self) -> tuple[str, int] | None:
        return _ip_port(self._vc.local_addr)

    @property
    def proxy_protocol(self) -> ProxyHeader | None:
        """The PROXY protocol header the connection opened with (``pp`` ports), else None.
        ``client_address`` is then the client it carried; ``proxy_protocol.peer`` is the
        balancer that sent it."""
        vc = self._vc
        return vc.proxy_protocol if isinstance(vc, SSLNetVConnection) else None

    @property
    def sni(self) -> str | None:
        """TSVConnSslSniGet: the server name the client asked for (lower case), if any; on an
        origin connection the SNI tsproxy sends."""
        return self._vc.server_name

    @property
    def sni_policy(self) -> Mapping[str, object] | None:
        """The sni.yaml item the client's SNI matched (from SSL_SERVERNAME on): its keys and
        values as written (``fqdn`` included; read-only), or None when no item matched (and on
        origin connections)."""
        policy = self._vc.sni_policy
        return policy.item.values if policy is not None else None

    @property
    def protocol(self) -> bytes | None:
        """The negotiated ALPN protocol (after the handshake), if any."""
        vc = self._vc
        return vc.negotiated_protocol if isinstance(vc, SSLNetVConnection) else None

    @property
    def tls_version(self) -> str | None:
        """``TLSv1.3`` / ``TLSv1.2`` once the handshake is done (None before, or for plain VCs)."""
        vc = self._vc
        return vc.ssl_version if isinstance(vc, SSLNetVConnection) and vc.ssl_handshake_complete else None

    @property
    def client_hello(self) -> ClientHello | None:
        """TSVConnClientHelloGet: the parsed ClientHello (from SSL_CLIENT_HELLO on)."""
        return self._vc.client_hello

    @property
    def user_data(self) -> UserData:
        """A per-connection dict for the plugin's own state."""
        data = self._vc.plugin_data
        if data is None:
            data = self._vc.plugin_data = {}
        return data

    def reenable(self, *, error: bool = False) -> None:
        """TSVConnReenable / TSVConnReenableEx(TS_EVENT_ERROR): continue, or fail the connection."""
        self._vc.reenable_hook(error=error)

    def tunnel(self, destination: str | None = None) -> None:
        """TSVConnTunnel: blind-tunnel this connection to ``host:port`` (default:
        proxy.config.tunnel.route), replaying what the client sent. Then call ``reenable()``.
        Only from VCONN_START, SSL_SERVERNAME and SSL_CERT; ignored (debug log) elsewhere."""
        self._vc.request_tunnel(destination)

    def set_ssl_context(self, ctx: SSL.Context) -> None:
        """In SSL_CERT: serve this connection with ``ctx`` instead of the configured one."""
        self._vc.ssl_context = ctx

    def protocol_disable(self, protocol: bytes) -> None:
        """TSVConnProtocolDisable: stop offering an ALPN protocol on this connection."""
        self._vc.npn_set = tuple(p for p in self._vc.npn_set if p != protocol)

    def protocol_enable(self, protocol: bytes) -> None:
        """TSVConnProtocolEnable: offer an ALPN protocol on this connection (after the others).

        A protocol with no endpoint that the client then picks fails the connection cleanly
        (counted as ``proxy.process.ssl.ssl_alpn_no_endpoint``).
        """
        if protocol not in self._vc.npn_set:
            self._vc.npn_set = (*self._vc.npn_set, protocol)


class ProtocolStream(Continuation):
    """A TLS connection handed to a plugin's own ALPN protocol (``api.register_protocol``).

    The plugin sees decrypted bytes and writes plain bytes; the TLS layer, backpressure and
    timeouts stay the proxy's. Callbacks run on the worker's loop; one that raises closes the
    connection.
    """

    def __init__(self, vc: StreamVC, plugin: str, inactivity_timeout: float) -> None:
        super().__init__(self._on_event)
        self._vc = vc
        self._plugin = plugin
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self._closing = False
        self._closed = False
        self._rbuf = MIOBuffer(64 * 1024)
        self._reader = self._rbuf.alloc_reader()
        self._wbuf = MIOBuffer(256 * 1024)
        vc.do_io_read(self, INT64_MAX, self._rbuf)
        vc.do_io_write(self, INT64_MAX, self._wbuf.alloc_reader())
        vc.set_inactivity_timeout(inactivity_timeout)

    @property
    def protocol(self) -> bytes | None:
        """The ALPN protocol of an accepted TLS connection; None for ``api.connect`` streams."""
        vc = self._vc
        return vc.negotiated_protocol if isinstance(vc, SSLNetVConnection) else None

    @property
    def sni(self) -> str | None:
        vc = self._vc
        return vc.server_name if isinstance(vc, SSLNetVConnection) else None

    @property
    def client_address(self) -> tuple[str, int] | None:
        return _ip_port(self._vc.remote_addr)

    @property
    def closed(self) -> bool:
        return self._closed

    def on_data(self, callback: Callable[[bytes], None]) -> None:
        """``callback(data)`` for every piece of data the client sends."""
        self._on_data = callback
        if self._reader.read_avail():
            self._deliver()

    def on_close(self, callback: Callable[[], None]) -> None:
        """``callback()`` once, when the connection is gone (either side)."""
        self._on_close = callback

    def write(self, data: bytes) -> None:
        if self._closed or self._closing:
            return
        self._wbuf.write(data)
        self._vc.write.reenable()

    def close(self) -> None:
        """Close after what was written went out."""
        if self._closed:
            return
        self._closing = True
        if not self._wbuf.max_read_avail():
            self._finish()

    def _deliver(self) -> None:
        data = self._reader.read()
        if data and self._on_data is not None:
            try:
                self._on_data(data)
            except Exception:
                _log.exception("plugin %s: protocol data callback raised; closing", self._plugin)
                self._finish()
                return
        if not self._closed:
            self._vc.read.reenable()

    def _on_event(self, event: int, data: object) -> None:
        if self._closed:
            return
        if event in (VC_EVENT_READ_READY, VC_EVENT_READ_COMPLETE):
            if self._on_data is not None:
                self._deliver()
        elif event == VC_EVENT_WRITE_READY:
            if self._closing and not self._wbuf.max_read_avail():
                self._finish()
        else:  # EOS, errors, timeouts
            self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._vc.do_io_close()
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                _log.exception("plugin %s: protocol close callback raised", self._plugin)


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class HeaderView:
    """A mutable view of one message's header fields (names compare case-insensitively)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self._fields = fields

    def get(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for n, v in self._fields:
            if n.lower() == key:
                return v.decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for n, v in self._fields if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._fields]

    def add(self, name: str, value: str) -> None:
        self._fields.append((_b(name), _b(value)))

    def remove(self, name: str) -> int:
        """Remove every field called ``name``; returns how many there were."""
        key = name.lower().encode("latin-1")
        before = len(self._fields)
        self._fields[:] = [(n, v) for n, v in self._fields if n.lower() != key]
        return before - len(self._fields)

    def set(self, name: str, value: str) -> None:
        """Replace every field called ``name`` with one field."""
        self.remove(name)
        self.add(name, value)


class Request:
    """The client's request as a hook sees it (method and target may be rewritten)."""

    __slots__ = ("_txn",)

    def __init__(self, txn: Txn) -> None:
        self._txn = txn

    @property
    def method(self) -> str:
        return self._txn._live_request().method.decode("latin-1")

    @property
    def target(self) -> str:
        """The request-target as received (origin-form path and query, usually)."""
        return self._txn._live_request().target.decode("latin-1")

    @target.setter
    def target(self, value: str) -> None:
        """Rewrite the target; its dot segments are removed as for a client's (PluginError for a
        target that climbs above "/" or hides a dot segment, see tsproxy/http/path.py)."""
        request = self._txn._live_request()
        try:
            target = normalize_target(_b(value))
        except TargetRefused as exc:
            raise PluginError(f"request-target {value!r} refused: {exc.reason}") from None
        self._txn._session.request = replace(request, target=target)

    @property
    def http_version(self) -> str:
        return self._txn._live_request().http_version.decode("latin-1")

    @property
    def headers(self) -> HeaderView:
        return HeaderView(self._txn._live_request().headers)


class Response:
    """The origin's response (READ_RESPONSE_HDR), as it will be sent (SEND_RESPONSE_HDR)."""

    __slots__ = ("_txn",)

    def __init__(self, txn: Txn) -> None:
        self._txn = txn

    @property
    def status(self) -> int:
        return self._txn._live_response().status

    @property
    def reason(self) -> str:
        return self._txn._live_response().reason.decode("latin-1")

    @property
    def headers(self) -> HeaderView:
        return HeaderView(self._txn._live_response().headers)


class Txn:
    """One HTTP transaction as a hook sees it (ATS TSHttpTxn). Valid until TXN_CLOSE returns."""

    __slots__ = ("_session", "user_data")

    def __init__(self, session: HttpTxnSession) -> None:
        self._session = session
        self.user_data: UserData = {}

    def _live_request(self) -> RequestReceived:
        session = self._session
        request = session.request
        if session.txn is not self or request is None:
            raise PluginError("this transaction has ended")
        return request

    def _live_response(self) -> ResponseReceived:
        self._live_request()
        response = self._session.response
        if response is None:
            raise PluginError("the origin has not answered yet")
        return response

    @property
    def alive(self) -> bool:
        return self._session.txn is self and not self._session.closed

    @property
    def client_request(self) -> Request:
        return Request(self)

    @property
    def server_response(self) -> Response | None:
        """From READ_RESPONSE_HDR on; None before the origin answered."""
        return Response(self) if self._session.response is not None else None

    client_response = server_response

    @property
    def status(self) -> int | None:
        """The status the client was sent (origin's, synthetic or error); None before that."""
        return self._session.status_sent or None

    @property
    def remap_target(self) -> str | None:
        """The origin URL the request goes to (from POST_REMAP on)."""
        remap = self._session.remap
        if remap is None:
            return None
        return (
            f"{remap.origin_scheme}://{remap.origin_host}:{remap.origin_port}{remap.path.decode('latin-1')}"
        )

    @property
    def client_address(self) -> tuple[str, int] | None:
        return _ip_port(self._session.vc.remote_addr)

    @property
    def proxy_protocol(self) -> ProxyHeader | None:
        """The client connection's PROXY protocol header (``pp`` ports), else None."""
        return self._session.vc.proxy_protocol

    @property
    def is_tls(self) -> bool:
        return bool(self._session.vc.is_ssl)

    @property
    def sni(self) -> str | None:
        vc = self._session.vc
        return vc.server_name if isinstance(vc, SSLNetVConnection) else None

    @property
    def tls_version(self) -> str | None:
        vc = self._session.vc
        return vc.ssl_version if isinstance(vc, SSLNetVConnection) else None

    @property
    def sni_policy(self) -> Mapping[str, object] | None:
        """The sni.yaml item the connection's SNI matched (see VConn.sni_policy), or None."""
        vc = self._session.vc
        policy = vc.sni_policy if isinstance(vc, SSLNetVConnection) else None
        return policy.item.values if policy is not None else None

    def reenable(self, *, error: bool = False) -> None:
        """TSHttpTxnReenable: continue (or fail with 500 when ``error``)."""
        if self._session.txn is self:
            self._session.hook_reenable(error=error)

    def respond(self, status: int, headers: dict[str, str] | None = None, body: bytes | str = b"") -> bool:
        """Answer the client yourself instead of the origin; then ``reenable()``.

        Allowed in READ_REQUEST_HDR, PRE_REMAP and POST_REMAP; returns False elsewhere.
        """
        if self._session.txn is not self:
            return False
        fields = [(_b(k), _b(v)) for k, v in (headers or {}).items()]
        return self._session.respond(status, fields, _b(body) if isinstance(body, str) else body)

    def hook_add(self, hook: HookID, callback: Callable[[HookID, Txn], None]) -> None:
        """TSHttpTxnHookAdd: a hook for this transaction only (runs after the global ones)."""
        if hook not in HTTP_HOOKS:
            raise PluginError(f"txn.hook_add: {hook.name} is not an HTTP transaction hook")
        if self._session.txn is self:
            self._session.txn_hook_add(hook, _txn_adapter("txn", callback))


def _txn_adapter(
    name: str, callback: Callable[[HookID, Txn], None], on_error: Callable[[], None] | None = None
) -> TxnHookCallback:
    def adapter(hook_id: HookID, session: HttpTxnSession) -> None:
        txn = session.txn
        if not isinstance(txn, Txn):
            txn = Txn(session)
            session.txn = txn
        try:
            callback(hook_id, txn)
        except Exception:
            _log.exception("plugin %s: %s hook raised", name, hook_id.name)
            if on_error is not None:
                on_error()
            raise

    return adapter


class ScheduledCall:
    """Handle of ``api.schedule_in``; ``cancel()`` stops a call that has not run."""

    __slots__ = ("_event",)

    def __init__(self, event: Event) -> None:
        self._event = event

    def cancel(self) -> None:
        self._event.cancel()


class _Call(Continuation):
    __slots__ = ("fn", "plugin")

    def __init__(self, plugin: str, fn: Callable[[], None]) -> None:
        super().__init__(self._run)
        self.fn = fn
        self.plugin = plugin

    def _run(self, event: int, data: object) -> None:
        try:
            self.fn()
        except Exception:
            _log.exception("plugin %s: scheduled call raised", self.plugin)


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    """The per-process helper pool (made on first use, in the worker, after the fork)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(THREAD_POOL_SIZE, thread_name_prefix="tsproxy-plugin")
            _pool_pid = os.getpid()
        return _pool


class PluginAPI:
    """Handed to ``plugin_init``; one per plugin per worker."""

    def __init__(self, name: str, worker: PluginWorker) -> None:
        self.name = name
        self._worker = worker
        self._reload_callbacks: list[Callable[[], None]] = []
        self._errors_stat: int | None = None
        self._ctx_cache: dict[tuple[str, str], SSL.Context] = {}
        self._ctx_lock = threading.Lock()
        self.log = logging.getLogger(f"tsproxy.plugin.{name}")

    def _count_error(self) -> None:
        if self._errors_stat is not None:
            self._worker.slot.incr(self._errors_stat, 1)

    def hook_add(self, hook: HookID, callback: HookCallback) -> None:
        """TSHttpHookAdd: ``callback(hook, vconn)`` for TLS/VConn hooks, ``callback(hook, txn)``
        for HTTP transaction hooks (HTTP_HOOKS). A callback that raises is counted in
        ``proxy.process.plugin.<name>.errors``."""
        name = self.name
        if self._errors_stat is None:
            try:
                self._errors_stat = self.stat_create(f"proxy.process.plugin.{name}.errors")
            except TSError as exc:
                _log.warning("plugin %s: no error counter: %s", name, exc)
        count_error = self._count_error
        if hook in HTTP_HOOKS:
            txn_callback = cast("Callable[[HookID, Txn], None]", callback)
            self._worker.hooks.add(hook, _txn_adapter(name, txn_callback, count_error))
            return
        vconn_callback = cast("Callable[[HookID, VConn], None]", callback)

        def adapter(hook_id: HookID, vc: HookVC) -> None:
            facade = vc.hook_facade
            if not isinstance(facade, VConn):
                facade = VConn(vc)
                vc.hook_facade = facade
            try:
                vconn_callback(hook_id, facade)
            except Exception:
                _log.exception("plugin %s: %s hook raised; failing the connection", name, hook_id.name)
                count_error()
                raise

        self._worker.hooks.add(hook, adapter)

    def schedule_in(self, seconds: float, fn: Callable[[], None]) -> ScheduledCall:
        """Call ``fn()`` on this worker's loop after ``seconds``."""
        return ScheduledCall(self._worker.thread.schedule_in(_Call(self.name, fn), seconds, EVENT_INTERVAL))

    def run_in_thread(self, fn: Callable[[], T], on_done: Callable[[T | BaseException], None]) -> None:
        """Run blocking ``fn()`` in a small helper thread pool, then ``on_done(result)`` (or
        ``on_done(exception)`` when ``fn`` raised) back on this worker's loop. ``fn`` must not
        touch facades (VConn, Txn): only ``on_done`` may, and it may re-enable a paused hook."""
        thread = self._worker.thread
        thread.ensure_wakeup()  # on the loop thread, before any other thread needs it
        plugin = self.name

        def deliver(result: T | BaseException) -> None:
            try:
                on_done(result)
            except Exception:
                _log.exception("plugin %s: run_in_thread callback raised", plugin)

        def finished(future: Future[T]) -> None:
            exc = future.exception()
            outcome: T | BaseException = exc if exc is not None else future.result()
            thread.call_soon_threadsafe(lambda: deliver(outcome))

        _thread_pool().submit(fn).add_done_callback(finished)

    def resolve(
        self, host: str, port: int, on_done: Callable[[tuple[str, int] | BaseException], None]
    ) -> None:
        """Resolve ``host`` without blocking the loop: ``on_done((ip, port))`` or
        ``on_done(exception)`` back on the loop."""

        def lookup() -> tuple[str, int]:
            _family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            return str(addr[0]), int(addr[1])

        self.run_in_thread(lookup, on_done)

    def connect(
        self,
        host: str,
        port: int,
        on_done: Callable[[ProtocolStream | BaseException], None],
        *,
        timeout: float = 10.0,
    ) -> None:
        """Open a TCP connection from this worker's loop (e.g. to ask a policy service from a
        paused hook): ``on_done(stream)`` once connected, or ``on_done(exception)``. The stream
        is the same ``ProtocolStream`` as for ``register_protocol`` (on_data, write, close)."""
        from iocore.eventsystem.event import NET_EVENT_OPEN
        from iocore.net.net_accept import connect as net_connect

        plugin = self.name
        worker = self._worker

        def deliver(result: ProtocolStream | BaseException) -> None:
            try:
                on_done(result)
            except Exception:
                _log.exception("plugin %s: connect callback raised", plugin)
                if isinstance(result, ProtocolStream):
                    result.close()

        class _Opened(Continuation):
            def __init__(self) -> None:
                super().__init__(self._opened)

            def _opened(self, event: int, data: object) -> None:
                if event == NET_EVENT_OPEN and isinstance(data, NetVConnection):
                    deliver(ProtocolStream(data, plugin, timeout))
                else:
                    err = data if isinstance(data, int) else 0
                    deliver(ConnectionError(err, f"connect to {host}:{port} failed: {os.strerror(err)}"))

        def resolved(result: tuple[str, int] | BaseException) -> None:
            if isinstance(result, BaseException):
                deliver(result)
                return
            family = socket.AF_INET6 if ":" in result[0] else socket.AF_INET
            vc = net_connect(worker.nh, _Opened(), result, family)
            if vc is not None:
                vc.set_inactivity_timeout(timeout)  # also bounds the connect itself

        self.resolve(host, port, resolved)

    def ssl_context_from_files(
        self, cert: str | os.PathLike[str], key: str | os.PathLike[str]
    ) -> SSL.Context:
        """A server context for a certificate chain PEM and its key file (relative paths: the
        config directory), with the records' TLS settings, the shared session ticket keys and
        the ALPN selection of configured contexts. Built once, cached until ``tsproxy reload``.
        Blocking (~1-3 ms: file reads, key parsing): call it from ``run_in_thread`` on a hot path.
        Raises ``TSError`` when the files cannot be loaded."""
        from iocore.net.ssl_net_vconnection import alpn_select
        from iocore.net.tls.context import CertKeyPair, build_server_context
        from iocore.net.tls.session_cache import configure_session_cache

        base = Path(self._worker.boot.config_dir)
        cert_path, key_path = base / Path(cert), base / Path(key)
        cache_key = (str(cert_path), str(key_path))
        with self._ctx_lock:
            ctx = self._ctx_cache.get(cache_key)
        if ctx is not None:
            return ctx
        config = self._worker.config
        pair = CertKeyPair(cert_path, key_path)
        ctx = build_server_context(config.ssl_params, [pair], None, config.ticket_keys)
        ctx.set_alpn_select_callback(alpn_select)
        params = config.ssl_params
        configure_session_cache(
            ctx, params.session_cache_mode, params.session_cache_timeout, config.session_cache, str(cert_path)
        )
        with self._ctx_lock:
            return self._ctx_cache.setdefault(cache_key, ctx)

    @property
    def log_dir(self) -> Path:
        """proxy.config.log.logfile_dir (absolute; created if missing)."""
        path = self._worker.config.records.resolve_path("proxy.config.log.logfile_dir")
        path = Path(path) if path is not None else Path(self._worker.boot.config_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def config_dir(self) -> Path:
        return Path(self._worker.boot.config_dir)

    def register_protocol(self, alpn: str | bytes, endpoint: Callable[[ProtocolStream], None]) -> None:
        """Serve an ALPN protocol of your own (call from ``plugin_init``).

        Every ssl port offers it (before http/1.1, unless the port's ``proto=`` leaves it out);
        a TLS connection that negotiates it is handed to ``endpoint(stream)`` instead of the
        HTTP state machine.
        """
        name = _b(alpn)
        plugin = self.name
        timeout = float(self._worker.config.records.get_int("proxy.config.net.default_inactivity_timeout"))

        def accept(vc: SSLNetVConnection) -> None:
            stream = ProtocolStream(vc, plugin, timeout)
            try:
                endpoint(stream)
            except Exception:
                _log.exception("plugin %s: protocol endpoint raised; closing", plugin)
                stream._finish()

        self._worker.register_protocol(name, accept)

    def ssl_context_find_by_addr(self, ip: str, port: int) -> SSL.Context | None:
        """TSSslContextFindByAddr: the context configured for a local address (dest_ip)."""
        lookup = self._worker.config.cert_lookup
        cc = lookup.find_addr(ip, port) if lookup is not None else None
        return cc.ctx if cc is not None else None

    def ssl_context_find_by_name(self, name: str) -> SSL.Context | None:
        """TSSslContextFindByName: the configured context for a server name."""
        lookup = self._worker.config.cert_lookup
        cc = lookup.find(name) if lookup is not None else None
        return cc.ctx if cc is not None else None

    def stat_create(self, name: str) -> int:
        """A plugin counter shown by ``tsproxy metric`` (register in the same order everywhere)."""
        return int(self._worker.boot.stats.register_dynamic(name))

    def stat_increment(self, stat: int, amount: int = 1) -> None:
        self._worker.slot.incr(stat, amount)

    def metrics(self, regex: str = "") -> list[tuple[str, int]]:
        """Every metric (summed over all workers) whose name matches ``regex``, sorted by name."""
        return list(self._worker.boot.stats.match(regex))

    def on_reload(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after ``tsproxy reload`` switched this worker's config."""
        self._reload_callbacks.append(callback)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once when this worker's loop stops (graceful stop, restart):
        the place to flush buffers. Not called when the process is killed."""
        plugin = self.name

        def run() -> None:
            try:
                callback()
            except Exception:
                _log.exception("plugin %s: exit callback raised", plugin)

        self._worker.thread.exit_callbacks.append(run)

    def notify_reload(self) -> None:
        with self._ctx_lock:
            self._ctx_cache.clear()
        for cb in self._reload_callbacks:
            try:
                cb()
            except Exception:
                _log.exception("plugin %s: reload callback raised", self.name)


def _import_plugin(target: str) -> ModuleType:
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        mod_name = f"tsproxy_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def load_plugins(config: ProxyConfig, worker: PluginWorker) -> list[PluginAPI]:
    """Import every plugin.config entry and call its ``plugin_init(api, args)``, in file order."""
    apis: list[PluginAPI] = []
    fatal = bool(config.records.get_int("proxy.config.plugin.load_failure_fatal"))
    for spec in config.plugins:
        name = Path(spec.target).stem if spec.target.endswith(".py") else spec.target
        try:
            module = _import_plugin(spec.target)
            init = getattr(module, "plugin_init", None)
            if init is None:
                raise PluginError(f"{spec.source}: plugin {name} has no plugin_init(api, args)")
            api = PluginAPI(name, worker)
            init(api, list(spec.args))
        except Exception as exc:
            message = f"{spec.source}: plugin {name} failed to load: {exc!r}"
            if fatal:
                raise PluginError(message) from exc
            _log.warning("%s (skipped: proxy.config.plugin.load_failure_fatal is 0)", message)
            continue
        apis.append(api)
    return apis


if TYPE_CHECKING:
    # The worker calls the loader the CLI hands it (through the master, untyped): check here
    # that load_plugins takes what the worker passes.
    _loader: Callable[[ProxyConfig, Worker], list[PluginAPI]] = load_plugins
