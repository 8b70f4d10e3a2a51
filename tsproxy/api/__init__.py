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
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from iocore.eventsystem.event import EVENT_INTERVAL, Continuation, Event
from iocore.net.hooks import HookID
from iocore.records.errors import TSError

if TYPE_CHECKING:
    from OpenSSL import SSL

    from iocore.net.ssl_net_vconnection import SSLNetVConnection
    from iocore.net.tls.client_hello import ClientHello

__all__ = ["HookID", "PluginAPI", "PluginError", "ScheduledCall", "VConn", "load_plugins"]

_log = logging.getLogger("tsproxy.plugin")


class PluginError(TSError):
    """A plugin failed to load or to initialise."""


class _WorkerLike(Protocol):
    hooks: Any
    thread: Any
    config: Any


class VConn:
    """What a TLS/VConn hook may see and do on one client connection (ATS TSVConn)."""

    __slots__ = ("_vc",)

    def __init__(self, vc: SSLNetVConnection) -> None:
        self._vc = vc

    @property
    def closed(self) -> bool:
        return self._vc.closed

    @property
    def client_address(self) -> tuple[str, int] | None:
        addr = self._vc.remote_addr
        return (str(addr[0]), int(addr[1])) if addr else None

    @property
    def local_address(self) -> tuple[str, int] | None:
        addr = self._vc.local_addr
        return (str(addr[0]), int(addr[1])) if addr else None

    @property
    def sni(self) -> str | None:
        """TSVConnSslSniGet: the server name the client asked for (lower case), if any."""
        return self._vc.server_name

    @property
    def client_hello(self) -> ClientHello | None:
        """TSVConnClientHelloGet: the parsed ClientHello (from SSL_CLIENT_HELLO on)."""
        return self._vc.client_hello

    @property
    def user_data(self) -> dict[Any, Any]:
        """A per-connection dict for the plugin's own state."""
        return self._vc.plugin_data

    def reenable(self, *, error: bool = False) -> None:
        """TSVConnReenable / TSVConnReenableEx(TS_EVENT_ERROR): continue, or fail the connection."""
        self._vc.reenable_hook(error=error)

    def tunnel(self, destination: str | None = None) -> None:
        """TSVConnTunnel: blind-tunnel this connection to ``host:port`` (default:
        proxy.config.tunnel.route), replaying what the client sent. Then call ``reenable()``."""
        self._vc.request_tunnel(destination)

    def set_ssl_context(self, ctx: SSL.Context) -> None:
        """In SSL_CERT: serve this connection with ``ctx`` instead of the configured one."""
        self._vc.ssl_context = ctx

    def protocol_disable(self, protocol: bytes) -> None:
        """TSVConnProtocolDisable: stop offering an ALPN protocol on this connection."""
        self._vc.npn_set = tuple(p for p in self._vc.npn_set if p != protocol)


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

    def _run(self, event: int, data: Any) -> None:
        try:
            self.fn()
        except Exception:
            _log.exception("plugin %s: scheduled call raised", self.plugin)


class PluginAPI:
    """Handed to ``plugin_init``; one per plugin per worker."""

    def __init__(self, name: str, worker: _WorkerLike) -> None:
        self.name = name
        self._worker = worker
        self._reload_callbacks: list[Callable[[], None]] = []
        self.log = logging.getLogger(f"tsproxy.plugin.{name}")

    def hook_add(self, hook: HookID, callback: Callable[[HookID, VConn], None]) -> None:
        """TSHttpHookAdd for TLS/VConn hooks: ``callback(hook, vconn)``."""
        name = self.name

        def adapter(hook_id: HookID, vc: SSLNetVConnection) -> None:
            facade = vc.hook_facade
            if facade is None:
                facade = vc.hook_facade = VConn(vc)
            try:
                callback(hook_id, facade)
            except Exception:
                _log.exception("plugin %s: %s hook raised; failing the connection", name, hook_id.name)
                raise

        self._worker.hooks.add(hook, adapter)

    def schedule_in(self, seconds: float, fn: Callable[[], None]) -> ScheduledCall:
        """Call ``fn()`` on this worker's loop after ``seconds``."""
        return ScheduledCall(self._worker.thread.schedule_in(_Call(self.name, fn), seconds, EVENT_INTERVAL))

    def ssl_context_find_by_name(self, name: str) -> SSL.Context | None:
        """TSSslContextFindByName: the configured context for a server name."""
        lookup = self._worker.config.cert_lookup
        cc = lookup.find(name) if lookup is not None else None
        return cc.ctx if cc is not None else None

    def on_reload(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after ``tsproxy reload`` switched this worker's config."""
        self._reload_callbacks.append(callback)

    def notify_reload(self) -> None:
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


def load_plugins(config: Any, worker: _WorkerLike) -> list[PluginAPI]:
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
