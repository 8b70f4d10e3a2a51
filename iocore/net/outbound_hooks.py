"""OutboundHooks: the plugin hooks of one origin connection (VCONN_OUTBOUND_START,
SSL_VERIFY_SERVER, VCONN_OUTBOUND_CLOSE), run on the one HookChain.

Theory of operation
-------------------
Made only when a plugin registered one of those hooks. The HTTP state machine calls
``run(hook, then)``; the callbacks run in registration order, each once (HookChain), and
``then(ok)`` is called when they all re-enabled (``ok`` False: one failed with
``reenable(error=True)`` or raised, or the VC closed while a hook was paused). An asynchronous
``reenable`` continues from the loop (``schedule_imm``). The VC's ``do_io_close`` calls
``on_close``, which delivers VCONN_OUTBOUND_CLOSE once if VCONN_OUTBOUND_START ran, and a chain
paused at that moment hears ``then(False)`` from the loop, never from inside the close.

It quacks like the VC for the plugin facade: addresses, ``server_name`` (the SNI we send, None
for plain origins), ``plugin_data``, ``peer_certificate`` and ``verify_error``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import Continuation
from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookOp, HookRegistry
from iocore.net.net_vconnection import NetVConnection, PlainNetVConnection

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509
    from OpenSSL import SSL

    from iocore.net.ssl_sni_config import SNIPolicy
    from iocore.net.tls.client_hello import ClientHello

_dbg = DbgCtl("ssl")
_dbg_err = DbgCtl("ssl.error")


class OutboundHooks(Continuation):
    """The hook target of one origin connection (plain or TLS), as ATS fires them on its
    outbound VCs."""

    client_hello: ClientHello | None = None
    sni_policy: SNIPolicy | None = None  # sni.yaml items match client connections only
    ssl_context: SSL.Context | None = None  # set_ssl_context has no meaning on origin VCs
    npn_set: tuple[bytes, ...] = ()
    outbound = True

    def __init__(self, vc: NetVConnection, hooks: HookRegistry, sni: str | None) -> None:
        super().__init__(self._resume)
        self.vc = vc
        self.hooks = hooks
        self.server_name = sni
        self.plugin_data: dict[Any, Any] | None = None
        self.hook_facade: Any = None
        self.verify_error: str | None = None
        self.started = False
        self._close_delivered = False
        self._chain = HookChain(self, self._schedule, self._hook_error)
        self._then: Callable[[bool], None] | None = None

    @property
    def closed(self) -> bool:
        return self.vc.closed

    @property
    def remote_addr(self) -> tuple[Any, ...]:
        return self.vc.remote_addr

    @property
    def local_addr(self) -> tuple[Any, ...]:
        return self.vc.local_addr

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        vc: Any = self.vc
        return vc.peer_certificate if vc.is_ssl else None

    def run(self, hook: HookID, then: Callable[[bool], None]) -> None:
        self._then = then
        if hook is HookID.VCONN_OUTBOUND_START:
            self.started = True
        chain = self._chain
        chain.op = HookOp.DEFAULT
        if chain.start(hook, self.hooks.get(hook)):
            self._finish()

    def _finish(self) -> None:
        then = self._then
        self._then = None
        if then is not None:
            then(self._chain.op is not HookOp.TERMINATE and not self.vc.closed)

    def _schedule(self) -> None:
        self.vc.nh.thread.schedule_imm(self)

    def _hook_error(self, hook: HookID, exc: Exception) -> None:
        if hook is HookID.VCONN_OUTBOUND_CLOSE:
            _dbg_err("VCONN_OUTBOUND_CLOSE hook raised %r", exc)
        else:
            _dbg_err("hook %s raised %r; failing the origin connection", hook.name, exc)

    def _resume(self, event: int, data: Any) -> None:
        chain = self._chain
        if self._then is not None and not chain.active and chain.advance():
            self._finish()

    def reenable_hook(self, *, error: bool = False) -> None:
        if self.vc.closed or not self._chain.reenable(error=error):
            _dbg("outbound reenable on %s ignored (closed=%s, no hook active)", self.vc, self.vc.closed)

    def request_tunnel(self, destination: str | None) -> None:
        _dbg("tunnel(%s) on an origin connection ignored", destination)

    def on_close(self) -> None:
        chain = self._chain
        if chain.close():
            # Closed while a hook was paused (timeout, the client went away): the waiting state
            # machine hears ``then(False)`` from the loop, never from inside do_io_close.
            self._schedule()
        if self.started and not self._close_delivered:
            self._close_delivered = True
            callbacks = self.hooks.get(HookID.VCONN_OUTBOUND_CLOSE)
            if callbacks:
                chain.notify(HookID.VCONN_OUTBOUND_CLOSE, callbacks)


class OutboundPlainNetVConnection(PlainNetVConnection):
    """A cleartext origin connection: a PlainNetVConnection that delivers VCONN_OUTBOUND_CLOSE."""

    outbound_hooks: OutboundHooks | None = None

    def do_io_close(self, error: int = 0) -> None:
        if self.closed:
            return
        PlainNetVConnection.do_io_close(self, error)
        outbound_hooks = self.outbound_hooks
        if outbound_hooks is not None:
            outbound_hooks.on_close()


__all__ = ["OutboundHooks", "OutboundPlainNetVConnection"]
