"""What the plugin facade needs from the core, as ``typing.Protocol``\\ s.

The facade (``tsproxy.api``) wraps core objects it does not own: the HTTP state machine of a
transaction (``Txn``), the TLS or origin connection of a VConn hook (``VConn``), the connection
handed to a plugin's own protocol (``ProtocolStream``) and the worker (``PluginAPI``). Each
Protocol lists exactly the members the facade touches, read-only ones as properties, so a core
refactor that drops or retypes one fails mypy here rather than in a plugin at run time. The
function at the end, seen only by mypy, checks that the core classes satisfy them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cryptography import x509
    from OpenSSL import SSL

    from iocore.eventsystem.ethread import EThread
    from iocore.eventsystem.event import Continuation
    from iocore.eventsystem.iobuffer import VIO, IOBufferReader, MIOBuffer
    from iocore.net.hooks import HookID, HookRegistry
    from iocore.net.net_handler import NetHandler
    from iocore.net.net_vconnection import NetVConnection
    from iocore.net.proxy_protocol import ProxyHeader
    from iocore.net.ssl_net_vconnection import OutboundHooks, SSLNetVConnection
    from iocore.net.ssl_sni_config import SNIPolicy
    from iocore.net.tls.client_hello import ClientHello
    from tsproxy.config import ProxyConfig
    from tsproxy.http.parser import RequestReceived, ResponseReceived
    from tsproxy.http_sm import HttpSM
    from tsproxy.remap import RemapResult
    from tsproxy.worker import Worker

# A plugin's per-connection / per-transaction dict (VConn.user_data, Txn.user_data).
UserData = dict[str, object]


class ClientVC(Protocol):
    """The client connection of a transaction, as ``Txn`` reads it (TLS details: isinstance)."""

    @property
    def remote_addr(self) -> tuple[object, ...]: ...
    @property
    def proxy_protocol(self) -> ProxyHeader | None: ...
    @property
    def is_ssl(self) -> bool: ...


class HttpTxnSession(Protocol):
    """The HTTP transaction a transaction hook runs on: its state machine (``tsproxy.http_sm.HttpSM``)."""

    txn: object  # the Txn of the current transaction (made on its first hook), else None
    request: RequestReceived | None  # Request.target's setter replaces it

    @property
    def vc(self) -> ClientVC: ...
    @property
    def response(self) -> ResponseReceived | None: ...
    @property
    def remap(self) -> RemapResult | None: ...
    @property
    def status_sent(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def hook_reenable(self, *, error: bool = False) -> None: ...
    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool: ...
    def txn_hook_add(self, hook: HookID, callback: TxnHookCallback) -> None: ...


TxnHookCallback = Callable[["HookID", HttpTxnSession], None]


class HookVC(Protocol):
    """A connection a TLS / VConn hook runs on: a client ``SSLNetVConnection`` or an origin
    connection's ``OutboundHooks``."""

    plugin_data: UserData | None  # VConn.user_data, made on first use
    hook_facade: object  # the VConn of this connection, made on the first hook
    ssl_context: SSL.Context | None  # VConn.set_ssl_context (SSL_CERT)
    npn_set: tuple[bytes, ...]  # VConn.protocol_enable / protocol_disable

    @property
    def outbound(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def remote_addr(self) -> tuple[object, ...]: ...
    @property
    def local_addr(self) -> tuple[object, ...]: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def sni_policy(self) -> SNIPolicy | None: ...
    @property
    def client_hello(self) -> ClientHello | None: ...
    @property
    def peer_certificate(self) -> x509.Certificate | None: ...
    @property
    def verify_error(self) -> str | None: ...
    def reenable_hook(self, *, error: bool = False) -> None: ...
    def request_tunnel(self, destination: str | None) -> None: ...


class StreamVC(Protocol):
    """A connection whose bytes a plugin reads and writes (``ProtocolStream``): a TLS
    connection that negotiated a plugin's ALPN protocol, or one ``api.connect`` opened."""

    @property
    def read(self) -> VIO: ...
    @property
    def write(self) -> VIO: ...
    @property
    def remote_addr(self) -> tuple[object, ...]: ...
    def do_io_read(self, cont: Continuation | None, nbytes: int, buf: MIOBuffer | None) -> VIO: ...
    def do_io_write(self, cont: Continuation | None, nbytes: int, reader: IOBufferReader | None) -> VIO: ...
    def do_io_close(self, error: int = 0) -> None: ...
    def set_inactivity_timeout(self, seconds: float) -> None: ...


class PluginStats(Protocol):
    """The shared stats region: plugin counters and ``api.metrics``."""

    def register_dynamic(self, name: str) -> int: ...
    def match(self, regex: str) -> list[tuple[str, int]]: ...


class PluginStatsSlot(Protocol):
    """This worker's slot of the stats region."""

    def incr(self, metric_id: int, n: int = 1) -> None: ...


class PluginBoot(Protocol):
    """What the worker was started with."""

    @property
    def config_dir(self) -> Path: ...
    @property
    def stats(self) -> PluginStats: ...


class PluginWorker(Protocol):
    """The worker process a plugin is loaded into (``tsproxy.worker.Worker``)."""

    @property
    def nh(self) -> NetHandler: ...
    @property
    def hooks(self) -> HookRegistry: ...
    @property
    def thread(self) -> EThread: ...
    @property
    def config(self) -> ProxyConfig: ...
    @property
    def boot(self) -> PluginBoot: ...
    @property
    def slot(self) -> PluginStatsSlot: ...
    def register_protocol(self, name: bytes, endpoint: Callable[[SSLNetVConnection], None]) -> None: ...


if TYPE_CHECKING:

    def _core_satisfies_the_seams(
        worker: Worker,
        session: HttpSM,
        tls: SSLNetVConnection,
        origin: OutboundHooks,
        plain: NetVConnection,
    ) -> tuple[PluginWorker, HttpTxnSession, HookVC, HookVC, StreamVC, StreamVC, ClientVC]:
        """Never called: mypy checks that each core class satisfies its Protocol."""
        return worker, session, tls, origin, tls, plain, plain
