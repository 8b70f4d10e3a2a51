"""SSLNetVConnection: TLS on top of NetVConnection, the handshake driver as the seed describes it
(ATS SSLNetVConnection.cc: sslStartHandShake, sslServerHandShakeEvent, read_raw_data, reenable).

Theory of operation
-------------------
The handshake itself is the sans-IO machine of iocore/net/tls/handshake.py (states, a transition
table, bytes in, commands out). This class drives it: ``net_read_io`` on a VC whose handshake is
not complete calls ``ssl_start_handshake`` (the first call arms the handshake timeout and counts
the attempt), which runs the machine until it waits; ``read_raw_data`` feeds it what the socket
has (one read per event), its ``SendBytes`` go to the socket, its ``RunHook`` runs the plugin
hooks on the VC's ``HookChain`` (built only when a plugin registered a TLS hook), and the result
code says what to wait for (``SSL_HANDSHAKE_WANT_READ`` / ``_WRITE``, ``SSL_WAIT_FOR_HOOK``) or
that it ended (``EVENT_DONE``, ``EVENT_ERROR``, or ``EVENT_CONT`` for "this became a blind
tunnel"). The machine is dropped when the handshake ends; the data path (memory BIOs, then the
socket BIO) is the base class, iocore/net/tls_data_path.py.

A hook that has not re-enabled pauses the chain: ``SSL_WAIT_FOR_HOOK`` is returned and read
interest is dropped, so a readable socket does not spin. ``reenable_hook`` (synchronous, from a
timer, from anywhere on the loop) continues it; an asynchronous one puts the VC on the read
ready list (ATS readReschedule), whose ``net_read_io`` advances the chain, then the machine.

Origin connections (``OutboundHooks``, iocore/net/outbound_hooks.py): VCONN_OUTBOUND_START
after the TCP connect and before any byte, SSL_VERIFY_SERVER after the client handshake and the
configured verification, VCONN_OUTBOUND_CLOSE once when the VC closes. The HTTP state machine
drives the first two; the VC's ``do_io_close`` delivers the last.

TS-4075: while a hook is active the VC is never freed under it; a client that went away is
noticed after the hook re-enables (or by the handshake timeout), and VCONN_CLOSE hooks run
exactly once for every VC whose handshake began. A ``reenable`` after close is a no-op.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    EVENT_CONT,
    EVENT_DONE,
    EVENT_ERROR,
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
)
from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookOp
from iocore.net.net_vconnection import EVENT_READ, EVENT_WRITE, NetVConnection
from iocore.net.outbound_hooks import OutboundHooks, OutboundPlainNetVConnection
from iocore.net.tls.context import NoApplicationProtocol, session_reused
from iocore.net.tls.handshake import (
    NEED_DATA,
    PAUSED,
    ClientHandshake,
    Done,
    Fail,
    RunHook,
    SendBytes,
    ServerHandshake,
    SSLAcceptConfig,
    Tunnel,
    alert_record,
    set_read_ahead,
)
from iocore.net.tls.metrics import (
    M_ALPN_NO_ENDPOINT,
    M_ATTEMPTS_IN,
    M_HS_TIME,
    M_SUCCESS_IN,
    M_SUCCESS_OUT,
    M_TICKETS_VERIFIED,
    M_TIMEOUT,
    M_TLSV12,
    M_TLSV13,
)
from iocore.net.tls_data_path import BLIND_TUNNEL, TLSDataPath, Transport

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from iocore.net.net_handler import NetHandler
    from iocore.net.ssl_sni_config import SNIPolicy
    from iocore.net.tls.client_hello import ClientHello

SSL_EVENT_SERVER = 0
SSL_EVENT_CLIENT = 1

# Handshake step results beyond EVENT_DONE / EVENT_ERROR / EVENT_CONT (ATS values).
SSL_HANDSHAKE_WANT_READ = 6
SSL_HANDSHAKE_WANT_WRITE = 7
SSL_WAIT_FOR_HOOK = 9

_dbg = DbgCtl("ssl")
_dbg_err = DbgCtl("ssl.error")
_dbg_sni = DbgCtl("ssl_sni")  # sni.yaml actions (ATS's tag)
_trace_log = logging.getLogger("tsproxy.ssl.trace")  # wire trace lines (INFO, any debug setting)

_PAUSE_TRACED = (HookID.SSL_CLIENT_HELLO, HookID.SSL_SERVERNAME, HookID.SSL_CERT)


def alpn_select(conn: SSL.Connection, offered: list[bytes]) -> Any:
    # -> bytes | SSL.NO_OVERLAPPING_PROTOCOLS (pyOpenSSL's sentinel type is private)
    """ALPN selection with the server's preference (the VC's protocol set, in order).

    No overlap: RFC 7301 section 3.2's fatal no_application_protocol alert, as nginx sends,
    unless proxy.config.ssl.server.alpn.no_overlap_alert is 0 (then no ALPN, the old way). A
    port with no protocol set does not do ALPN at all and ignores the offer."""
    vc: SSLNetVConnection = conn.get_app_data()
    for proto in vc.npn_set:
        if proto in offered:
            return proto
    cfg = vc.config
    if vc.npn_set and (cfg is None or cfg.alpn_no_overlap_alert):
        vc.trace("ALPN: no overlap with %s, sending no_application_protocol", offered)
        raise NoApplicationProtocol(f"no application protocol in common with the client's offer {offered!r}")
    return SSL.NO_OVERLAPPING_PROTOCOLS


class SSLNetVConnection(TLSDataPath):
    """A server-side (accepted) or client-side (origin) TLS connection."""

    __slots__ = (
        "_hooks",
        "_hs",
        "_hs_want_read",
        "_hs_want_write",
        "client_hello",
        "close_hooks_pending",
        "config",
        "hook_facade",
        "negotiated_protocol",
        "npn_set",
        "on_client_handshake",
        "outbound_hooks",
        "plugin_data",
        "server_name",
        "sni_policy",
        "ssl_context",
        "ssl_handshake_begin_time",
        "trace_on",
    )

    is_ssl = True

    def __init__(self, sock: socket.socket, nh: NetHandler, config: SSLAcceptConfig | None = None) -> None:
        super().__init__(sock, nh)
        self.config = config
        self.ssl_handshake_begin_time = 0.0
        self._hs: ServerHandshake | ClientHandshake | None = None  # the machine, during the handshake
        self._hooks: HookChain | None = None  # made when a TLS hook runs
        self._hs_want_read = False
        self._hs_want_write = False
        self.client_hello: ClientHello | None = None
        self.server_name: str | None = None
        self.sni_policy: SNIPolicy | None = None  # the sni.yaml item the SNI matched
        self.ssl_context: SSL.Context | None = None  # a CERT hook may set its own
        self.npn_set: tuple[bytes, ...] = config.protocols if config is not None else ()
        self.negotiated_protocol: bytes | None = None
        self.close_hooks_pending = False
        self.plugin_data: dict[Any, Any] | None = None  # made by the first plugin that asks
        self.hook_facade: Any = None
        self.outbound_hooks: OutboundHooks | None = None  # origin VCs with outbound hooks
        self.trace_on = False  # proxy.config.ssl.wire_trace_* selected this connection
        self.on_client_handshake: Callable[[SSLNetVConnection, bool], None] | None = None

    # -- entry from the acceptor -------------------------------------------------------------
    def start_handshake(self) -> None:
        """Begin the server handshake at accept time: VCONN_START hooks run before any read."""
        self._handshake_step()

    def _wants_read(self) -> bool:
        if self.ssl_handshake_complete or self.attributes is BLIND_TUNNEL:
            buf = self.read.buffer
            return self.read_enabled and buf is not None and not buf.high_water()
        return self._hs_want_read

    def _wants_write(self) -> bool:
        if self._sock_bio:
            # OpenSSL holds a record the socket did not take, or SSL_read has something to send.
            return (self._write_blocked and self.write_enabled) or self._read_wants_write
        if self.attributes is BLIND_TUNNEL:
            return self._write_blocked and self.write_enabled
        return bool(self._out_raw) or self._hs_want_write

    # -- the handshake driver (ATS SSLNetVConnection::net_read_io, handshake part) --------------
    def _handshake_step(self) -> None:
        if self.closed:
            return
        event = SSL_EVENT_CLIENT if self.outbound else SSL_EVENT_SERVER
        ret = self.ssl_start_handshake(event)
        if self.closed:
            return
        self._hs_want_read = ret == SSL_HANDSHAKE_WANT_READ
        self._hs_want_write = ret == SSL_HANDSHAKE_WANT_WRITE
        if ret == EVENT_ERROR:
            self._handshake_failed()
        elif ret == EVENT_DONE:
            self._handshake_done()
        elif ret == EVENT_CONT:
            self._become_tunnel()
        else:
            self._update_interest()

    def ssl_start_handshake(self, event: int) -> int:
        """Set up the handshake on first call, then advance it until it waits or ends."""
        if self.ssl_handshake_begin_time == 0.0:
            self.ssl_handshake_begin_time = time.monotonic()
            cfg = self.config
            if cfg is not None:
                self.set_inactivity_timeout(cfg.handshake_timeout)
            if event == SSL_EVENT_SERVER and cfg is not None:
                self.counters_incr(M_ATTEMPTS_IN)
                self.close_hooks_pending = True
                self._hs = ServerHandshake(self, cfg)
                if _dbg.on:
                    _dbg("IP context for [%s] -> [%s]", self.remote_addr, self.local_addr)
        if event == SSL_EVENT_SERVER:
            return self.ssl_server_handshake_event()
        return self.ssl_client_handshake_event()

    def counters_incr(self, metric: int, n: int = 1) -> None:
        self.nh.counters[metric] += n

    def ssl_server_handshake_event(self) -> int:
        return self._drive()

    def ssl_client_handshake_event(self) -> int:
        return self._drive()

    def _drive(self) -> int:
        """Run the machine until it waits or ends; the step result code."""
        m = self._hs
        if m is None:
            return EVENT_ERROR
        if self._out_raw and not self._flush_raw():
            return SSL_HANDSHAKE_WANT_WRITE
        chain = self._hooks
        if chain is not None and chain.running:
            if not chain.advance():
                return SSL_WAIT_FOR_HOOK
            self._hook_finished(chain)
        did_read = False
        while not self.closed:  # a hook may close the VC
            cmd = m.next_command()
            if cmd is NEED_DATA:
                if not did_read:
                    did_read = True
                    retval = self.read_raw_data()
                    if retval >= 0:  # bytes, or EOF: the machine decides
                        continue
                    if retval != -11:
                        return EVENT_ERROR
                return SSL_HANDSHAKE_WANT_WRITE if self._out_raw else SSL_HANDSHAKE_WANT_READ
            if isinstance(cmd, SendBytes):
                self._out_raw += cmd.data
                self._flush_raw()
            elif isinstance(cmd, RunHook):
                if not self._run_hook(cmd.hook):
                    return SSL_WAIT_FOR_HOOK
            elif cmd is PAUSED:
                return SSL_WAIT_FOR_HOOK
            elif isinstance(cmd, Done):
                return EVENT_DONE
            elif isinstance(cmd, Tunnel):
                return EVENT_CONT
            else:
                assert isinstance(cmd, Fail)
                for metric in cmd.metrics:
                    self.counters_incr(metric)
                if cmd.alert is not None:
                    self._send_raw_alert(cmd.alert)
                return EVENT_ERROR
        return EVENT_ERROR

    def read_raw_data(self) -> int:
        """Read from the socket into the handshake machine (the data path: into the read BIO).

        Returns the byte count, 0 for EOF, or ``-errno`` (``-11`` = EAGAIN: nothing yet).
        """
        m = self._hs
        if m is None:
            return self._read_raw_into_bio()
        view = self._scratch.raw_view
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return -11
        except OSError as exc:
            return -(exc.errno or 5)
        if n:
            m.receive_data(view[0:n])
        else:
            m.receive_eof()
        return n

    def _send_raw_alert(self, description: int) -> None:
        try:
            self.sock.send(alert_record(description))
        except OSError:
            pass

    # -- hooks (the one HookChain) ---------------------------------------------------------------
    def _chain(self) -> HookChain:
        chain = self._hooks
        if chain is None:
            chain = self._hooks = HookChain(self, self._resume_hooks, self._hook_error)
        return chain

    def _resume_hooks(self) -> None:
        # Asynchronous reenable: continue on the loop (ATS readReschedule).
        self.nh.read_ready_list[self] = None

    def _hook_error(self, hook: HookID, exc: Exception) -> None:
        if hook is HookID.VCONN_CLOSE:
            _dbg_err("VCONN_CLOSE hook raised %r", exc)
        else:
            _dbg_err("hook %s raised %r; failing the connection", hook.name, exc)

    def _run_hook(self, hook: HookID) -> bool:
        """Start the machine's hook; False while a callback pauses it."""
        cfg = self.config
        assert cfg is not None
        chain = self._chain()
        if not chain.start(hook, cfg.hooks.get(hook)):
            if hook in _PAUSE_TRACED:
                self.trace("%s hook paused the handshake", hook.name)
            return False
        self._hook_finished(chain)
        return True

    def _hook_finished(self, chain: HookChain) -> None:
        m = self._hs
        op = chain.op
        chain.op = HookOp.DEFAULT  # each phase's request applies to that phase
        if isinstance(m, ServerHandshake):
            m.hook_done(op, chain.tunnel_destination)

    def reenable_hook(self, *, error: bool = False) -> None:
        """TSVConnReenable / TSVConnReenableEx(TS_EVENT_ERROR) from a plugin."""
        chain = self._hooks
        if self.closed or chain is None or not chain.reenable(error=error):
            _dbg("reenable on %s ignored (closed=%s, no hook active)", self, self.closed)

    def request_tunnel(self, destination: str | None) -> None:
        """TSVConnTunnel: turn this VC into a blind tunnel once the current hook re-enables."""
        self._chain().request_tunnel(destination)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate (client certificate inbound, origin certificate outbound)."""
        ssl = self.ssl
        cert = ssl.get_peer_certificate() if ssl is not None else None
        return cert.to_cryptography() if cert is not None else None

    @property
    def verify_error(self) -> str | None:
        """OpenSSL's chain verification result for the peer certificate, None when it passed."""
        ssl = self.ssl
        if ssl is None:
            return None
        from iocore.net.tls.context import verify_result

        code, text = verify_result(ssl)
        return text if code != 0 else None

    def trace(self, fmt: str, *args: Any) -> None:
        """ATS TraceIn: one line of the wire trace, for a traced connection only."""
        if self.trace_on:
            addr = self.remote_addr
            _trace_log.info(
                "ssl trace [%s:%s] <- " + fmt, addr[0] if addr else "?", addr[1] if addr else 0, *args
            )

    # -- client side (origin connections) ---------------------------------------------------
    def start_client_handshake(
        self, ctx: SSL.Context, sni: str | None, done: Callable[[SSLNetVConnection, bool], None]
    ) -> None:
        """ssl_start_handshake(SSL_EVENT_CLIENT) on a connected origin socket."""
        self.outbound = True
        self.on_client_handshake = done
        ssl = SSL.Connection(ctx, None)
        ssl.set_app_data(self)
        if sni:
            try:
                ssl.set_tlsext_host_name(sni.encode("idna"))
            except UnicodeError:
                _dbg_err("SNI %r to %s is not a valid host name", sni, self.remote_addr)
                self._handshake_failed()  # the caller hears of it through done(), as of any failure
                return
        ssl.set_connect_state()
        set_read_ahead(ssl)
        self.ssl = ssl
        self._hs = ClientHandshake(self, ssl)
        self._handshake_step()

    # -- endings ---------------------------------------------------------------------------------
    def _handshake_ended(self) -> None:
        """The machine and the hook chain live only as long as the handshake."""
        self._hs = None
        self._hooks = None
        self.cancel_inactivity_timeout()

    def _handshake_done(self) -> None:
        self.ssl_handshake_complete = True
        self._handshake_ended()
        ssl = self.ssl
        assert ssl is not None
        self._use_socket_bio()
        counters = self.nh.counters
        if self.outbound:
            counters[M_SUCCESS_OUT] += 1
            cb = self.on_client_handshake
            if cb is not None:
                cb(self, True)
            return
        elapsed = time.monotonic() - self.ssl_handshake_begin_time
        counters[M_SUCCESS_IN] += 1
        counters[M_HS_TIME] += int(elapsed * 1e9)
        version = ssl.get_protocol_version_name()
        if version == "TLSv1.3":
            counters[M_TLSV13] += 1
        elif version == "TLSv1.2":
            counters[M_TLSV12] += 1
        reused = session_reused(ssl)
        if reused:
            counters[M_TICKETS_VERIFIED] += 1
        proto = ssl.get_alpn_proto_negotiated()
        if proto:
            self.negotiated_protocol = proto
            if proto not in (self.config.protocols if self.config else ()):
                # Negotiated a protocol nothing serves (ATS PR 7981): fail cleanly.
                _dbg_err("failed to find registered SSL endpoint for '%s'", proto)
                counters[M_ALPN_NO_ENDPOINT] += 1
                self.do_io_close()
                return
        _dbg(
            "SSL server handshake completed: %s %s alpn=%s resumed=%s",
            self.remote_addr,
            version,
            proto,
            reused,
        )
        if self.trace_on:
            self.trace(
                "SSL server handshake completed successfully: sni=%s version=%s cipher=%s resumed=%s",
                self.server_name,
                version,
                ssl.get_cipher_name(),
                reused,
            )
            if proto:
                self.trace("client selected next protocol '%s'", proto.decode("latin-1"))
            else:
                self.trace("client did not select a next protocol")
        assert self.config is not None
        # The hooks that may read the parsed hello have run: do not keep it for the life of an
        # idle keep-alive connection (a few KiB each; the SNI stays in server_name).
        self.client_hello = None
        policy = self.sni_policy
        if policy is not None and policy.route_type is not None and policy.route_type.name == "FORWARD":
            # sni.yaml forward_route: the decrypted bytes go to the route, uninterpreted.
            dest = policy.route_for(self.server_name or "", int(self.local_addr[1]) if self.local_addr else 0)
            if _dbg_sni.on:
                _dbg_sni("%s: forward_route for sni=%s to %s", policy.item.source, self.server_name, dest)
            if dest is None:  # $1 captured something that is no host name
                self.do_io_close()
            else:
                self.config.on_tunnel(self, b"", dest)
            return
        self.config.on_ready(self)

    def _handshake_failed(self) -> None:
        cb = self.on_client_handshake if self.outbound else None
        if cb is not None:
            # Before closing: the callback reads the verify result from the SSL object.
            self.on_client_handshake = None
            cb(self, False)
        self.do_io_close()

    def _become_tunnel(self) -> None:
        m = self._hs
        result = m.result if m is not None else None
        assert isinstance(result, Tunnel) and self.config is not None
        self._handshake_ended()
        self.attributes = Transport.BLIND_TUNNEL
        self.ssl = None
        replay, dest = result.replay, result.destination
        _dbg("blind tunnel for %s to %s (%d bytes to replay)", self.remote_addr, dest, len(replay))
        self.config.on_tunnel(self, replay, dest)

    def on_timeout(self, event: int) -> None:
        if not self.ssl_handshake_complete and self.attributes is Transport.DEFAULT:
            if event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT) and not self.outbound:
                self.counters_incr(M_TIMEOUT)
                _dbg("handshake timeout for %s", self.remote_addr)
                self.trace("SSL server handshake timed out")
            self._handshake_failed()
            return
        NetVConnection.on_timeout(self, event)

    def do_io_close(self, error: int = 0) -> None:
        if self.closed:
            return
        self.close_ssl()
        NetVConnection.do_io_close(self, error)
        chain = self._hooks
        if chain is not None:
            chain.close()  # a paused hook's later reenable is ignored (TS-4075)
        self._hs = None
        outbound_hooks = self.outbound_hooks
        if outbound_hooks is not None:
            outbound_hooks.on_close()  # VCONN_OUTBOUND_CLOSE (it may still read the peer cert)
        if self.close_hooks_pending:
            self.close_hooks_pending = False
            cfg = self.config
            callbacks = cfg.hooks.get(HookID.VCONN_CLOSE) if cfg is not None else ()
            if callbacks:
                self._chain().notify(HookID.VCONN_CLOSE, callbacks)
            self._hooks = None
        self.ssl = None
        cfg = self.config
        if cfg is not None and cfg.on_close is not None:
            cfg.on_close()  # the worker releases the config snapshot this VC was accepted under


__all__ = [
    "EVENT_READ",
    "EVENT_WRITE",
    "SSL_EVENT_CLIENT",
    "SSL_EVENT_SERVER",
    "VC_EVENT_EOS",
    "VC_EVENT_ERROR",
    "OutboundHooks",
    "OutboundPlainNetVConnection",
    "SSLAcceptConfig",
    "SSLNetVConnection",
    "Transport",
    "alpn_select",
]
