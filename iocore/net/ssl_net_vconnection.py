"""SSLNetVConnection: TLS on top of NetVConnection, handshake as the seed describes it
(ATS SSLNetVConnection.cc: sslStartHandShake, sslServerHandShakeEvent, read_raw_data, reenable).

Theory of operation
-------------------
``net_read_io`` on a VC whose handshake is not complete calls
``ssl_start_handshake(SSL_EVENT_SERVER)``; every readiness event advances the handshake by one
step and the result code says what to wait for (``SSL_HANDSHAKE_WANT_READ`` / ``_WRITE``,
``SSL_WAIT_FOR_HOOK``) or that it ended (``EVENT_DONE``, ``EVENT_ERROR``, or ``EVENT_CONT`` for
"this became a blind tunnel").

pyOpenSSL cannot pause inside OpenSSL's own callbacks, so the server side runs the hook phases
*before* OpenSSL sees a byte: ``read_raw_data`` fills the handshake buffer from the socket, the
sans-IO ClientHello parser says "need more" until the hello is complete, the hooks run, the
certificate context is chosen (``set_context_cert``: SNI exact, SNI wildcard, local IP:port, IP,
default), and only then the ``SSL.Connection`` is created with that context and the buffered
bytes are replayed into its memory BIO. Bytes the parser does not read as a hello (it is never
stricter than OpenSSL) go to OpenSSL at once, with the context of the local address, and OpenSSL
answers them; the parser itself refuses only a record over 2^14 bytes and a hello over
proxy.config.ssl.client_hello.max_size, with OpenSSL's alerts. From there ``do_handshake`` runs
over memory BIOs; the ciphertext it produces is flushed to the socket. Once the handshake is
done and both memory BIOs are empty, the SSL gets the socket itself (``_use_socket_bio``, ATS's
switch to the fd BIO once the handshake buffer is drained): SSL_read/SSL_write then do the reads
and writes, with read-ahead on so one read(2) takes every queued record.

Hook state (data, not flags): the pre-accept phase follows the seed's
``SSLHookState`` INIT -> INVOKE -> ACTIVE -> DONE; the handshake phases follow
``HandshakeHookState`` PRE -> CLIENT_HELLO -> SNI -> CERT -> DONE. Within a phase the hooks run
in registration order, each exactly once. A hook that has not re-enabled leaves the VC in
ACTIVE: ``SSL_WAIT_FOR_HOOK`` is returned and read interest is dropped, so a readable socket
does not spin. ``reenable`` (synchronous, from a timer, from anywhere on the loop) moves it back
to INVOKE and puts the VC on the read ready list.

Client certificates (SSL_VERIFY_CLIENT): pyOpenSSL cannot pause inside OpenSSL's verify
callback, so OpenSSL's own chain check runs in the handshake (certification_level 1/2) and the
SSL_VERIFY_CLIENT hooks run right after ``do_handshake`` succeeded and before the VC is handed
to the HTTP session, when the client presented a certificate. They may pause (nothing is read
meanwhile) or fail the connection (closed, ``user_agent_cert_verify_failed``).

Origin connections (``OutboundHooks``): VCONN_OUTBOUND_START after the TCP connect and before
any byte (before the ClientHello for TLS), SSL_VERIFY_SERVER after the client handshake and the
configured verification, VCONN_OUTBOUND_CLOSE once when the VC closes. The HTTP state machine
drives the first two; the VC's ``do_io_close`` delivers the last.

TS-4075: while a hook is active the VC is never freed under it; a client that went away is
noticed after the hook re-enables (or by the handshake timeout), and VCONN_CLOSE hooks run
exactly once for every VC whose VCONN_START phase began. A ``reenable`` after close is a no-op.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import sys
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
    Continuation,
)
from iocore.net.hooks import HookID, HookOp, HookRegistry
from iocore.net.net_vconnection import EVENT_READ, EVENT_WRITE, NetVConnection, PlainNetVConnection
from iocore.net.tls._openssl import HAVE_SOCKET_BIO as _HAVE_SOCKET_BIO
from iocore.net.tls._openssl import NULL as _NULL
from iocore.net.tls._openssl import SSL_ERROR_WANT_READ as _SSL_ERROR_WANT_READ
from iocore.net.tls._openssl import SSL_ERROR_WANT_WRITE as _SSL_ERROR_WANT_WRITE
from iocore.net.tls._openssl import SSL_ERROR_ZERO_RETURN as _SSL_ERROR_ZERO_RETURN
from iocore.net.tls._openssl import BIO_get_mem_data as _BIO_get_mem_data
from iocore.net.tls._openssl import BIO_read as _BIO_read
from iocore.net.tls._openssl import BIO_write as _BIO_write
from iocore.net.tls._openssl import SSL_do_handshake as _SSL_do_handshake
from iocore.net.tls._openssl import SSL_get_error as _SSL_get_error
from iocore.net.tls._openssl import SSL_has_pending as _has_pending
from iocore.net.tls._openssl import SSL_pending as _SSL_pending
from iocore.net.tls._openssl import SSL_read as _SSL_read
from iocore.net.tls._openssl import SSL_set_fd as _ssl_set_fd
from iocore.net.tls._openssl import SSL_write as _SSL_write
from iocore.net.tls._openssl import ffi_buffer as _ffi_buffer
from iocore.net.tls._openssl import ffi_from_buffer as _ffi_from_buffer
from iocore.net.tls._openssl import ffi_new as _ffi_new
from iocore.net.tls._openssl import handle_bio_errors as _handle_bio_errors
from iocore.net.tls._openssl import raise_ssl_error as _raise_ssl_error
from iocore.net.tls._openssl import read_bio as _read_bio
from iocore.net.tls._openssl import set_read_ahead as _openssl_set_read_ahead
from iocore.net.tls._openssl import ssl_pointer as _ssl_pointer
from iocore.net.tls._openssl import write_bio as _write_bio
from iocore.net.tls.client_hello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloParser,
    looks_like_tls_handshake,
)
from iocore.net.tls.context import NoApplicationProtocol, session_reused
from iocore.net.tls.errors import ClientHelloRefused, TLSProtocolError
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from iocore.eventsystem.iobuffer import VIO, IOBufferReader
    from iocore.net.net_handler import NetHandler
    from iocore.net.ssl_cert_lookup import SSLCertContext, SSLCertLookup
    from iocore.net.ssl_config import WireTrace
    from iocore.net.ssl_sni_config import SNIConfigParams, SNIPolicy

SSL_EVENT_SERVER = 0
SSL_EVENT_CLIENT = 1

# Handshake step results beyond EVENT_DONE / EVENT_ERROR / EVENT_CONT (ATS values).
SSL_HANDSHAKE_WANT_READ = 6
SSL_HANDSHAKE_WANT_WRITE = 7
SSL_WAIT_FOR_HOOK = 9

TLS_RECORD_MAX = 16384
RAW_READ = 65536

_dbg = DbgCtl("ssl")
_dbg_err = DbgCtl("ssl.error")
_dbg_sni = DbgCtl("ssl_sni")  # sni.yaml actions (ATS's tag)
_trace_log = logging.getLogger("tsproxy.ssl.trace")  # wire trace lines (INFO, any debug setting)
_log = logging.getLogger("tsproxy.ssl")

# A handshake refused for want of a certificate is logged at warning level once per SNI name
# per interval (an operator must see it; a client retrying must not flood the log).
NO_CERT_LOG_INTERVAL = 60.0
_NO_CERT_LOG_MAX = 1024  # names remembered; beyond that (a scan of random names) stay quiet
_no_cert_logged: dict[str, float] = {}


def _warn_no_cert(name: str | None, local: Any) -> None:
    key = name or ""
    now = time.monotonic()
    last = _no_cert_logged.get(key)
    if last is not None and now - last < NO_CERT_LOG_INTERVAL:
        return
    if last is None and len(_no_cert_logged) >= _NO_CERT_LOG_MAX:
        for old in [k for k, t in _no_cert_logged.items() if now - t >= NO_CERT_LOG_INTERVAL]:
            del _no_cert_logged[old]
        if len(_no_cert_logged) >= _NO_CERT_LOG_MAX:
            return
    _no_cert_logged[key] = now
    sni = f"SNI {name[:255]!r}" if name else "no SNI"
    where = f"{local[0]}:{local[1]}" if local else "?"
    _log.warning(
        "TLS handshake on %s refused: no certificate for %s and no default certificate "
        "(a dest_ip=* line in ssl_multicert.config); logged once a minute per name",
        where,
        sni,
    )


def _m(name: str) -> int:
    return METRIC_ID["proxy.process.ssl." + name]


M_ATTEMPTS_IN = _m("total_attempts_handshake_count_in")
M_SUCCESS_IN = _m("total_success_handshake_count_in")
M_HS_TIME = _m("total_handshake_time")
M_ERROR_SSL = _m("ssl_error_ssl")
M_ERROR_SYSCALL = _m("ssl_error_syscall")
M_ERROR_ZERO_RETURN = _m("ssl_error_zero_return")
M_TIMEOUT = _m("ssl_handshake_timeout_in")
M_NO_CERT = _m("ssl_no_cert_context")
M_ALPN_NO_ENDPOINT = _m("ssl_alpn_no_endpoint")
M_UA_OTHER = _m("user_agent_other_errors")
M_UA_WRONG_VERSION = _m("user_agent_wrong_version")
M_UA_UNKNOWN_CA = _m("user_agent_unknown_ca")
M_UA_EXPIRED = _m("user_agent_expired_cert")
M_UA_BAD_CERT = _m("user_agent_bad_cert")
M_UA_DECRYPT = _m("user_agent_decryption_failed")
M_UA_VERIFY = _m("user_agent_cert_verify_failed")
M_TLSV12 = _m("ssl_total_tlsv12")
M_TLSV13 = _m("ssl_total_tlsv13")
M_TICKETS_VERIFIED = _m("total_tickets_verified")
M_SNI_IP_DENIED = _m("ssl_sni_ip_allow_denied")

# A fatal TLS alert record, sent raw when we refuse a hello before any SSL object exists:
# content type 21 (alert), TLS 1.2 record version, length 2, level fatal (2), description.
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_UNRECOGNIZED_NAME = 112


def _alert_record(description: int) -> bytes:
    return bytes((21, 3, 3, 0, 2, 2, description))


# OpenSSL reason strings -> the user_agent_* counter they belong to (checked in order).
_UA_ERROR_COUNTERS: tuple[tuple[str, int], ...] = (
    ("unsupported protocol", M_UA_WRONG_VERSION),
    ("wrong version", M_UA_WRONG_VERSION),
    ("version too low", M_UA_WRONG_VERSION),
    ("alert protocol version", M_UA_WRONG_VERSION),
    ("unknown ca", M_UA_UNKNOWN_CA),
    ("unable to get local issuer", M_UA_UNKNOWN_CA),
    ("certificate expired", M_UA_EXPIRED),
    ("certificate has expired", M_UA_EXPIRED),
    ("peer did not return a certificate", M_UA_BAD_CERT),
    ("bad certificate", M_UA_BAD_CERT),
    ("certificate verify failed", M_UA_VERIFY),
    ("decrypt", M_UA_DECRYPT),
    ("bad record mac", M_UA_DECRYPT),
)


class SSLHookState(enum.Enum):
    """Pre-accept (VCONN_START) hook phase, as the seed's sslPreAcceptHookState."""

    INIT = 0
    INVOKE = 1
    ACTIVE = 2
    DONE = 3


class HandshakeHookState(enum.Enum):
    """Phases after the ClientHello arrived (ATS sslHandshakeHookState)."""

    PRE = 0
    CLIENT_HELLO = 1
    SNI = 2
    CERT = 3
    DONE = 4


class Transport(enum.Enum):
    DEFAULT = 0
    BLIND_TUNNEL = 1


_BLIND_TUNNEL = Transport.BLIND_TUNNEL  # a global: an enum member lookup costs ~35 ns per data event

_PHASE_HOOK = {
    HandshakeHookState.CLIENT_HELLO: HookID.SSL_CLIENT_HELLO,
    HandshakeHookState.SNI: HookID.SSL_SERVERNAME,
    HandshakeHookState.CERT: HookID.SSL_CERT,
}
_NEXT_PHASE = {
    HandshakeHookState.PRE: HandshakeHookState.CLIENT_HELLO,
    HandshakeHookState.CLIENT_HELLO: HandshakeHookState.SNI,
    HandshakeHookState.SNI: HandshakeHookState.CERT,
    HandshakeHookState.CERT: HandshakeHookState.DONE,
}


class SSLAcceptConfig:
    """Everything a server-side SSL VC needs, fixed for the VC's life (its config snapshot).

    A reload builds a new one; handshakes in flight keep the one they started with.
    """

    __slots__ = (
        "alpn_no_overlap_alert",
        "fallback_ctx",
        "handshake_timeout",
        "hooks",
        "lookup",
        "max_client_hello",
        "on_error",
        "on_ready",
        "on_tunnel",
        "protocols",
        "sni",
        "tr_pass",
        "tunnel_route",
        "wire_trace",
    )

    def __init__(
        self,
        *,
        lookup: SSLCertLookup,
        hooks: HookRegistry,
        protocols: tuple[bytes, ...],
        handshake_timeout: float,
        tr_pass: bool,
        tunnel_route: str | None,
        on_ready: Callable[[SSLNetVConnection], None],
        on_tunnel: Callable[[NetVConnection, bytes, str | None], None],
        max_client_hello: int = MAX_CLIENT_HELLO,
        alpn_no_overlap_alert: bool = True,
        wire_trace: WireTrace | None = None,
        fallback_ctx: SSL.Context | None = None,
        sni: SNIConfigParams | None = None,
    ) -> None:
        self.lookup = lookup
        self.sni = sni  # sni.yaml of the same generation as lookup (None: no item)
        self.max_client_hello = max_client_hello
        self.alpn_no_overlap_alert = alpn_no_overlap_alert
        self.wire_trace = wire_trace
        self.fallback_ctx = fallback_ctx  # certificate-less: OpenSSL's answer when no cert applies
        self.hooks = hooks
        self.protocols = protocols
        self.handshake_timeout = handshake_timeout
        self.tr_pass = tr_pass
        self.tunnel_route = tunnel_route
        self.on_ready = on_ready
        self.on_tunnel = on_tunnel


def _mem_pending(bio: Any) -> int:
    """Bytes waiting in a memory BIO (BIO_get_mem_data with no out pointer = BIO_pending)."""
    return int(_BIO_get_mem_data(bio, _NULL))


_OUT_SCRATCH = 65536
# _has_pending is SSL_has_pending when available (_HAVE_SOCKET_BIO); without it read-ahead stays
# off, _has_pending answers 0 and SSL_pending suffices.


def _set_read_ahead(ssl: SSL.Connection) -> None:
    """Before the handshake (see _openssl.set_read_ahead): lets one read(2) fetch every record."""
    if _HAVE_SOCKET_BIO:
        _openssl_set_read_ahead(ssl)


class _SSLScratch:
    """Per-EThread scratch memory of the TLS data path: the raw socket read lands in ``raw``
    and goes to the read BIO from there, decrypted records land in ``rec``, ciphertext is
    drained through ``out``. The data is copied out before the loop runs anything else, so one
    set per thread suffices and no read allocates a buffer of its own size."""

    __slots__ = ("out", "raw", "raw_view", "rec")

    def __init__(self) -> None:
        self.raw = _ffi_new("char[]", RAW_READ)
        self.raw_view = _ffi_buffer(self.raw)
        self.rec = _ffi_new("char[]", TLS_RECORD_MAX)
        self.out = _ffi_new("char[]", _OUT_SCRATCH)


def _scratch_of(nh: Any) -> _SSLScratch:
    scratch = getattr(nh, "ssl_scratch", None)
    if scratch is None:
        scratch = _SSLScratch()
        with contextlib.suppress(AttributeError):
            nh.ssl_scratch = scratch
    return scratch


def _drain_out(ssl: SSL.Connection, pending: int, scratch: _SSLScratch, out: bytearray) -> None:
    """Append ``pending`` bytes of the write BIO to ``out`` (ssl.bio_read without its copy)."""
    if pending > _OUT_SCRATCH:
        out += ssl.bio_read(pending)
        return
    n = _BIO_read(_write_bio(ssl), scratch.out, pending)
    if n <= 0:
        _handle_bio_errors(ssl, _write_bio(ssl), n)
        return
    out += _ffi_buffer(scratch.out, n)


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
        vc._trace("ALPN: no overlap with %s, sending no_application_protocol", offered)
        raise NoApplicationProtocol(f"no application protocol in common with the client's offer {offered!r}")
    return SSL.NO_OVERLAPPING_PROTOCOLS


class SSLNetVConnection(NetVConnection):
    """A server-side (accepted) or client-side (origin) TLS connection."""

    __slots__ = (
        "_accept_done",
        "_hello_parser",
        "_hook_active",
        "_hook_index",
        "_hs_want_read",
        "_hs_want_write",
        "_in_hook_call",
        "_out_raw",
        "_raw_eof",
        "_read_wants_write",
        "_scratch",
        "_sock_bio",
        "_ssl_bio_has_data",
        "_ssl_started",
        "_trace_on",
        "_verify_client_done",
        "attributes",
        "cert_context",
        "client_handshake_error",
        "client_hello",
        "close_hooks_pending",
        "config",
        "handshake_buffer",
        "hook_facade",
        "hook_op_requested",
        "negotiated_protocol",
        "npn_set",
        "on_client_handshake",
        "outbound_hooks",
        "plugin_data",
        "server_name",
        "sni_policy",
        "ssl",
        "ssl_context",
        "ssl_handshake_begin_time",
        "ssl_handshake_complete",
        "ssl_handshake_hook_state",
        "ssl_pre_accept_hook_state",
        "tunnel_destination",
    )

    is_ssl = True

    def __init__(self, sock: socket.socket, nh: NetHandler, config: SSLAcceptConfig | None = None) -> None:
        super().__init__(sock, nh)
        self.config = config
        self._scratch = _scratch_of(nh)
        self.ssl: SSL.Connection | None = None
        self.ssl_handshake_complete = False
        self.ssl_handshake_begin_time = 0.0
        self.handshake_buffer: bytearray | None = None  # the raw ClientHello bytes, until the SSL exists
        self._hello_parser: ClientHelloParser | None = None
        self.client_hello: ClientHello | None = None
        self.server_name: str | None = None
        self.sni_policy: SNIPolicy | None = None  # the sni.yaml item the SNI matched
        self.ssl_pre_accept_hook_state = SSLHookState.INIT
        self.ssl_handshake_hook_state = HandshakeHookState.PRE
        self._hook_index = 0
        self._hook_active = False
        self._in_hook_call = False
        self.hook_op_requested = HookOp.DEFAULT
        self.tunnel_destination: str | None = None
        self.cert_context: SSLCertContext | None = None
        self.ssl_context: SSL.Context | None = None  # a CERT hook may set its own
        self.attributes = Transport.DEFAULT
        self.npn_set: tuple[bytes, ...] = config.protocols if config is not None else ()
        self.negotiated_protocol: bytes | None = None
        self.close_hooks_pending = False
        self._out_raw = bytearray()
        self._sock_bio = False  # OpenSSL reads and writes the socket itself (_use_socket_bio)
        self._read_wants_write = False  # SSL_read must send first (socket BIO): retry on EVENT_WRITE
        self._hs_want_read = False
        self._hs_want_write = False
        self._raw_eof = False
        self.plugin_data: dict[Any, Any] | None = None  # made by the first plugin that asks
        self.hook_facade: Any = None
        self.outbound_hooks: OutboundHooks | None = None  # origin VCs with outbound hooks
        self._accept_done = False  # OpenSSL's handshake finished; SSL_VERIFY_CLIENT may still run
        self._verify_client_done = False
        self._ssl_bio_has_data = False
        self._trace_on = False  # proxy.config.ssl.wire_trace_* selected this connection
        # Client side (origin connections): see start_client_handshake.
        self._ssl_started = False
        self.client_handshake_error: str | None = None
        self.on_client_handshake: Callable[[SSLNetVConnection, bool], None] | None = None

    # -- entry from the acceptor -------------------------------------------------------------
    def start_handshake(self) -> None:
        """Begin the server handshake at accept time: VCONN_START hooks run before any read."""
        self._handshake_step()

    # -- net_read_io / write_to_net_io ---------------------------------------------------------
    def _on_io_unguarded(self, mask: int) -> None:
        if self.ssl_handshake_complete and self.attributes is not _BLIND_TUNNEL:
            # The TLS data path: net_read_io / write_to_net_io resolved without their dispatch.
            if self._sock_bio:
                if mask & EVENT_READ or self._read_wants_write:
                    self._ssl_read_sock()
                if mask & EVENT_WRITE and not self.closed:
                    self._ssl_write_sock()
                return
            if mask & EVENT_WRITE and self._out_raw and not self._flush_raw():
                return
            if mask & EVENT_READ:
                self._ssl_read()
            if mask & EVENT_WRITE and not self.closed:
                self.write_to_net_io()
            return
        if self.attributes is _BLIND_TUNNEL or self.ssl_handshake_complete:
            if mask & EVENT_WRITE and self._out_raw and not self._flush_raw():
                return
            NetVConnection._on_io_unguarded(self, mask)
            return
        self._handshake_step()

    def net_read_io(self) -> None:
        if self.attributes is _BLIND_TUNNEL:
            NetVConnection.net_read_io(self)
        elif not self.ssl_handshake_complete:
            self._handshake_step()
        elif self._sock_bio:
            self._ssl_read_sock()
        else:
            self._ssl_read()

    def write_to_net_io(self) -> None:
        if self.attributes is _BLIND_TUNNEL:
            NetVConnection.write_to_net_io(self)
        elif self._sock_bio:
            self._ssl_write_sock()
        elif self.ssl_handshake_complete:
            self._ssl_write()

    def _wants_read(self) -> bool:
        if self.ssl_handshake_complete or self.attributes is _BLIND_TUNNEL:
            # NetVConnection._wants_read, inlined (runs on every reenable)
            buf = self.read.buffer
            return self.read_enabled and buf is not None and not buf.high_water()
        return self._hs_want_read

    def _wants_write(self) -> bool:
        if self._sock_bio:
            # OpenSSL holds a record the socket did not take, or SSL_read has something to send.
            return (self._write_blocked and self.write_enabled) or self._read_wants_write
        if self.attributes is _BLIND_TUNNEL:
            return self._write_blocked and self.write_enabled
        return bool(self._out_raw) or self._hs_want_write

    def _has_buffered_input(self) -> bool:
        # Record bytes OpenSSL already holds (decrypted or not), or, on the memory BIO,
        # ciphertext it has not looked at yet (application data that came with the Finished).
        ssl = self.ssl
        if not self.ssl_handshake_complete or ssl is None:
            return False
        if self._sock_bio:
            return bool(_has_pending(_ssl_pointer(ssl)))
        return (
            _SSL_pending(_ssl_pointer(ssl)) > 0
            or self._raw_eof
            or _BIO_get_mem_data(_read_bio(ssl), _NULL) > 0
            or _has_pending(_ssl_pointer(ssl)) > 0
        )

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
        elif ret in (EVENT_DONE, EVENT_CONT):
            if self.attributes is Transport.BLIND_TUNNEL:
                self._become_tunnel()
            elif self.hook_op_requested is HookOp.TERMINATE:
                self._handshake_failed()
            else:
                self._handshake_done()
        else:
            self._update_interest()

    def ssl_start_handshake(self, event: int) -> int:
        """Set up the handshake on first call, then advance it one step."""
        if self.ssl_handshake_begin_time == 0.0:
            self.ssl_handshake_begin_time = time.monotonic()
            cfg = self.config
            if cfg is not None:
                self.set_inactivity_timeout(cfg.handshake_timeout)
            if event == SSL_EVENT_SERVER:
                self.counters_incr(M_ATTEMPTS_IN)
                self.close_hooks_pending = True
                if _dbg.on:
                    _dbg("IP context for [%s] -> [%s]", self.remote_addr, self.local_addr)
        if event == SSL_EVENT_SERVER:
            return self.ssl_server_handshake_event()
        return self.ssl_client_handshake_event()

    def counters_incr(self, metric: int, n: int = 1) -> None:
        self.nh.counters[metric] += n

    # -- hooks ---------------------------------------------------------------------------------
    def _invoke_hooks(self, hook: HookID) -> bool:
        """Run the remaining hooks of ``hook`` in order; False when one of them is still active."""
        cfg = self.config
        callbacks = cfg.hooks.get(hook) if cfg is not None else ()
        while self._hook_index < len(callbacks):
            callback = callbacks[self._hook_index]
            self._hook_index += 1
            self._hook_active = True
            self._in_hook_call = True
            try:
                callback(hook, self)
            except Exception as exc:  # a plugin bug fails this connection, never the worker
                _dbg_err("hook %s raised %r; failing the connection", hook.name, exc)
                self.hook_op_requested = HookOp.TERMINATE
                self._hook_active = False
            finally:
                self._in_hook_call = False
            if self.hook_op_requested is HookOp.TERMINATE:
                self._hook_active = False
                self._hook_index = len(callbacks)
            if self._hook_active:
                return False
        self._hook_index = 0
        return True

    def reenable_hook(self, *, error: bool = False) -> None:
        """TSVConnReenable / TSVConnReenableEx(TS_EVENT_ERROR) from a plugin."""
        if self.closed or not self._hook_active:
            _dbg("reenable on %s ignored (closed=%s, no hook active)", self, self.closed)
            return
        self._hook_active = False
        if error:
            self.hook_op_requested = HookOp.TERMINATE
        if self.ssl_pre_accept_hook_state is SSLHookState.ACTIVE:
            self.ssl_pre_accept_hook_state = SSLHookState.INVOKE
        if not self._in_hook_call:
            # Asynchronous reenable: continue on the loop (ATS readReschedule).
            self.nh.read_ready_list[self] = None

    def request_tunnel(self, destination: str | None) -> None:
        """TSVConnTunnel: turn this VC into a blind tunnel once the current hook re-enables."""
        self.hook_op_requested = HookOp.TUNNEL
        self.tunnel_destination = destination

    def net_read_io_ready(self) -> None:
        self.nh.read_ready_list[self] = None

    # -- server side ---------------------------------------------------------------------------
    def ssl_server_handshake_event(self) -> int:
        # Pre-accept (VCONN_START) hooks: once per VC, before any byte is read.
        state = self.ssl_pre_accept_hook_state
        if state is not SSLHookState.DONE:
            if state is SSLHookState.ACTIVE and self._hook_active:
                return SSL_WAIT_FOR_HOOK
            self.ssl_pre_accept_hook_state = SSLHookState.INVOKE
            if not self._invoke_hooks(HookID.VCONN_START):
                self.ssl_pre_accept_hook_state = SSLHookState.ACTIVE
                return SSL_WAIT_FOR_HOOK
            self.ssl_pre_accept_hook_state = SSLHookState.DONE
            if self.hook_op_requested is HookOp.TUNNEL:
                # No data has been read yet: a tunnel with nothing to replay.
                self.attributes = Transport.BLIND_TUNNEL
                return EVENT_DONE
            if self.hook_op_requested is HookOp.TERMINATE:
                return EVENT_ERROR

        if self._accept_done:
            return self._verify_client_step()

        if self.ssl is None:
            ret = self._server_pre_ssl()
            if ret is not None:
                return ret

        assert self.ssl is not None
        if not self._ssl_bio_has_data:
            retval = self.read_raw_data()
            if retval == 0:
                _dbg("SSL handshake error: EOF from %s", self.remote_addr)
                self.counters_incr(M_ERROR_SYSCALL)
                return EVENT_ERROR
            if retval < 0 and retval != -11:
                return EVENT_ERROR
        ret = self._ssl_accept_step()
        if ret == EVENT_DONE:
            self._accept_done = True
            return self._verify_client_step()
        return ret

    def _verify_client_step(self) -> int:
        """SSL_VERIFY_CLIENT hooks, after OpenSSL's handshake and before the HTTP session.

        They run when a plugin registered one and the client presented a certificate (the
        server asks for one only with proxy.config.ssl.client.certification_level >= 1, and
        OpenSSL has already checked its chain). pyOpenSSL cannot pause inside OpenSSL's verify
        callback, so unlike ATS the hooks run once, for the leaf, after the handshake: an error
        reenable closes the connection (no alert: the handshake is over) and counts
        ``user_agent_cert_verify_failed``.
        """
        if self._out_raw:
            self._flush_raw()  # session tickets: never leave them behind while a hook pauses
        if self._hook_active:
            return SSL_WAIT_FOR_HOOK
        if self._verify_client_done:
            return EVENT_DONE
        cfg = self.config
        ssl = self.ssl
        if (
            cfg is not None
            and ssl is not None
            and cfg.hooks.has(HookID.SSL_VERIFY_CLIENT)
            and ssl.get_peer_certificate() is not None
        ):
            if not self._invoke_hooks(HookID.SSL_VERIFY_CLIENT):
                return SSL_WAIT_FOR_HOOK
            if self.hook_op_requested is HookOp.TERMINATE:
                self.counters_incr(M_UA_VERIFY)
                _dbg_err("SSL_VERIFY_CLIENT hook rejected the certificate of %s", self.remote_addr)
                return EVENT_ERROR
            if self.hook_op_requested is HookOp.TUNNEL:
                _dbg("tunnel requested in SSL_VERIFY_CLIENT ignored (handshake already done)")
                self.hook_op_requested = HookOp.DEFAULT
        self._verify_client_done = True
        return EVENT_DONE

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

    def _server_pre_ssl(self) -> int | None:
        """ClientHello, hooks and context selection; None when the SSL object now exists."""
        cfg = self.config
        assert cfg is not None
        if self.client_hello is None:
            retval = self.read_raw_data()
            if retval == 0:
                _dbg("SSL handshake error: EOF before ClientHello from %s", self.remote_addr)
                return EVENT_ERROR
            if retval < 0:
                return SSL_HANDSHAKE_WANT_READ if retval == -11 else EVENT_ERROR
            if self._hello_parser is None:
                self._hello_parser = ClientHelloParser(cfg.max_client_hello)
            raw = self.handshake_buffer
            assert raw is not None  # read_raw_data made it
            try:
                hello = self._hello_parser.feed(raw[-retval:])
            except ClientHelloRefused as exc:
                if cfg.wire_trace is not None:
                    self._select_trace(cfg.wire_trace, None)
                # A resource bound (record over 2^14, hello over the cap): the alert OpenSSL
                # would send for the same bytes, without buffering the rest.
                _dbg_err("ClientHello from %s refused: %s", self.remote_addr, exc.reason)
                self._trace("ClientHello refused: %s (alert %d)", exc.reason, exc.alert)
                self.counters_incr(M_ERROR_SSL)
                self.counters_incr(M_UA_OTHER)
                self._send_raw_alert(exc.alert)
                return EVENT_ERROR
            except TLSProtocolError as exc:
                if cfg.tr_pass and not looks_like_tls_handshake(bytes(raw[:1])):
                    _dbg("data does not look like SSL handshake, starting blind tunnel")
                    self.attributes = Transport.BLIND_TUNNEL
                    self.tunnel_destination = cfg.tunnel_route
                    return EVENT_CONT
                # Not a hello the pre-parser reads: OpenSSL gets the bytes and decides (its
                # alert, or a handshake) with the context of the address; no hello hooks run.
                _dbg("ClientHello from %s left to OpenSSL: %s", self.remote_addr, exc.reason)
                if cfg.wire_trace is not None:
                    self._select_trace(cfg.wire_trace, None)
                self._trace("ClientHello not pre-parsed (%s): left to OpenSSL", exc.reason)
                self._hello_parser = None
                self.ssl_handshake_hook_state = HandshakeHookState.DONE
                ret = self.set_context_cert()
                if ret is not None:
                    return ret
                return self._create_ssl(cfg.fallback_ctx)
            if hello is None:
                return SSL_HANDSHAKE_WANT_READ
            self.client_hello = hello
            # Interned: the connections to one site share the name instead of a copy each.
            self.server_name = sys.intern(hello.server_name) if hello.server_name else None
            self.ssl_handshake_hook_state = HandshakeHookState.CLIENT_HELLO
            _dbg(
                "ClientHello from %s: sni=%s alpn=%s",
                self.remote_addr,
                hello.server_name,
                hello.alpn_protocols,
            )
            if cfg.wire_trace is not None:
                self._select_trace(cfg.wire_trace, self.server_name)
                self._trace(
                    "ClientHello: sni=%s alpn=%s versions=%s max_version=0x%04x %d cipher suites, %d bytes",
                    hello.server_name,
                    [p.decode("latin-1") for p in hello.alpn_protocols],
                    [f"0x{v:04x}" for v in hello.supported_versions],
                    hello.max_version(),
                    len(hello.cipher_suites),
                    hello.record_bytes,
                )

        # CLIENT_HELLO -> (set_context_cert) SNI -> CERT, each phase's hooks in order.
        hooks = cfg.hooks
        if (
            self.ssl_handshake_hook_state is HandshakeHookState.CLIENT_HELLO
            and not hooks.has(HookID.SSL_CLIENT_HELLO)
            and not hooks.has(HookID.SSL_SERVERNAME)
            and not hooks.has(HookID.SSL_CERT)
        ):
            # No plugin hooks any phase (the common case): only the certificate choice.
            ret = self.set_context_cert()
            if ret is not None:
                return ret
            self.ssl_handshake_hook_state = HandshakeHookState.DONE
        while self.ssl_handshake_hook_state is not HandshakeHookState.DONE:
            phase = self.ssl_handshake_hook_state
            if self._hook_active:
                return SSL_WAIT_FOR_HOOK
            if phase is HandshakeHookState.SNI and self._hook_index == 0 and self.cert_context is None:
                ret = self.set_context_cert()
                if ret is not None:
                    return ret
            if not self._invoke_hooks(_PHASE_HOOK[phase]):
                self._trace("%s hook paused the handshake", _PHASE_HOOK[phase].name)
                return SSL_WAIT_FOR_HOOK
            if self.hook_op_requested is HookOp.TERMINATE:
                self._trace("%s hook failed the handshake", _PHASE_HOOK[phase].name)
                return EVENT_ERROR
            if self.hook_op_requested is HookOp.TUNNEL:
                self._trace("%s hook turned the connection into a blind tunnel", _PHASE_HOOK[phase].name)
                self.attributes = Transport.BLIND_TUNNEL
                return EVENT_CONT
            self.ssl_handshake_hook_state = _NEXT_PHASE[phase]

        return self._create_ssl(None)

    def _create_ssl(self, fallback: SSL.Context | None) -> int | None:
        """The SSL object for the chosen context, with the buffered bytes replayed into it.

        ``fallback`` serves when no context has a certificate (the certificate-less context of
        this config, for a hello the pre-parser left to OpenSSL); None when the SSL exists."""
        ctx = self.ssl_context or (self.cert_context.ctx if self.cert_context is not None else None)
        if ctx is None:
            ctx = fallback
        if ctx is None:
            _warn_no_cert(self.server_name, self.local_addr)
            self._trace("no certificate for sni=%s: handshake failed", self.server_name)
            self.counters_incr(M_NO_CERT)
            self.counters_incr(M_ERROR_SSL)
            self._send_raw_alert(ALERT_UNRECOGNIZED_NAME if self.server_name else ALERT_HANDSHAKE_FAILURE)
            return EVENT_ERROR
        try:
            ssl = SSL.Connection(ctx, None)
        except SSL.Error:
            _dbg_err("failed to create SSL server session")
            return EVENT_ERROR
        ssl.set_app_data(self)
        ssl.set_accept_state()
        _set_read_ahead(ssl)
        policy = self.sni_policy
        if policy is not None and policy.inbound is not None:
            policy.inbound.apply(ssl)  # verify_client, valid_tls_versions_in
        if self.handshake_buffer:
            ssl.bio_write(bytes(self.handshake_buffer))
        self._ssl_bio_has_data = True
        self.handshake_buffer = None
        self._hello_parser = None
        self.ssl = ssl
        return None

    def _select_trace(self, wire_trace: WireTrace, server_name: str | None) -> None:
        """ATS computeSSLTrace, once per connection (when the SNI is known)."""
        addr = self.remote_addr
        self._trace_on = wire_trace.select(str(addr[0]) if addr else "", server_name)

    def _trace(self, fmt: str, *args: Any) -> None:
        """ATS TraceIn: one line of the wire trace, for a traced connection only."""
        if self._trace_on:
            addr = self.remote_addr
            _trace_log.info(
                "ssl trace [%s:%s] <- " + fmt, addr[0] if addr else "?", addr[1] if addr else 0, *args
            )

    def set_context_cert(self) -> int | None:
        """Choose the certificate context: SNI exact, SNI wildcard, then local IP:port, IP, default.

        Returns a handshake result to stop with (tunnel), or None to go on.
        """
        cfg = self.config
        assert cfg is not None
        name = self.server_name
        if cfg.sni is not None and name:
            ret = self.perform_sni_action(cfg.sni, name)
            if ret is not None:
                return ret
        lookup = cfg.lookup
        cc = None
        if name:
            cc = lookup.find(name)
            if cc is not None and cc.ctx is None and cc.opt.name != "TUNNEL":
                cc = None
        if cc is None and self.local_addr:
            cc = lookup.find_addr(str(self.local_addr[0]), int(self.local_addr[1]))
        if cc is None:
            cc = lookup.default_context
        self.cert_context = cc
        if self._trace_on:
            self._trace(
                "certificate context %s for sni=%s",
                cc.source if cc is not None and cc.ctx is not None else None,
                name,
            )
        if cc is not None and cc.opt.name == "TUNNEL":
            _dbg("action=tunnel for sni=%s", name)
            self.hook_op_requested = HookOp.TUNNEL
            self.tunnel_destination = cc.tunnel_route or cfg.tunnel_route
            self.attributes = Transport.BLIND_TUNNEL
            return EVENT_CONT
        if _dbg.on:
            _dbg(
                "set_context_cert: %s context %s for requested name '%s'",
                "found" if cc is not None and cc.ctx is not None else "no",
                cc and cc.source,
                name,
            )
        return None

    def perform_sni_action(self, sni: SNIConfigParams, name: str) -> int | None:
        """sni.yaml (ATS SNIAction at the servername callback): match the item, refuse a client
        ip_allow does not list, start a tunnel_route. The item's TLS settings are applied once
        the SSL object exists; forward_route acts after the handshake."""
        policy = sni.get(name)
        if policy is None:
            return None
        self.sni_policy = policy
        if _dbg_sni.on:
            _dbg_sni("sni=%s matched %s (fqdn %s)", name, policy.item.source, policy.item.fqdn)
        if policy.ip_allow and not policy.allows(self.remote_ip):
            if _dbg_sni.on:
                _dbg_sni("%s: %s is not allowed - denying connection", policy.item.source, self.remote_ip)
            self.counters_incr(M_SNI_IP_DENIED)
            self._send_raw_alert(ALERT_ACCESS_DENIED)
            return EVENT_ERROR
        if policy.route_type is not None and policy.route_type.name == "BLIND":
            dest = policy.route_for(name, int(self.local_addr[1]) if self.local_addr else 0)
            if _dbg_sni.on:
                _dbg_sni("%s: tunnel_route for sni=%s to %s", policy.item.source, name, dest)
            if dest is None:  # $1 captured something that is no host name
                self._send_raw_alert(ALERT_UNRECOGNIZED_NAME)
                return EVENT_ERROR
            self.hook_op_requested = HookOp.TUNNEL
            self.tunnel_destination = dest
            self.attributes = Transport.BLIND_TUNNEL
            return EVENT_CONT
        return None

    def read_raw_data(self) -> int:
        """Read from the socket into the handshake buffer (or the SSL read BIO).

        Returns the byte count, 0 for EOF, or ``-errno`` (``-11`` = EAGAIN: nothing yet).
        """
        scratch = self._scratch
        try:
            n = self.sock.recv_into(scratch.raw_view)
        except (BlockingIOError, InterruptedError):
            return -11
        except OSError as exc:
            return -(exc.errno or 5)
        if not n:
            return 0
        ssl = self.ssl
        if ssl is None:
            if self.handshake_buffer is None:
                self.handshake_buffer = bytearray(scratch.raw_view[0:n])
            else:
                self.handshake_buffer += scratch.raw_view[0:n]
        else:
            # ssl.bio_write, straight from the scratch buffer (a memory BIO takes it all)
            result = _BIO_write(_read_bio(ssl), scratch.raw, n)
            if result <= 0:
                _handle_bio_errors(ssl, _read_bio(ssl), result)
            self._ssl_bio_has_data = True
        return n

    def _ssl_accept_step(self) -> int:
        ssl = self.ssl
        assert ssl is not None
        try:
            # ssl.do_handshake(), without raising WantReadError on the first step of every
            # handshake (the exception costs more than the check)
            result = _SSL_do_handshake(_ssl_pointer(ssl))
            if result <= 0:
                if _SSL_get_error(_ssl_pointer(ssl), result) == _SSL_ERROR_WANT_READ:
                    self._ssl_bio_has_data = False
                    self._flush_ssl_output()
                    if self._trace_on:
                        self._trace("SSL server handshake ERROR_WANT_READ")
                    return SSL_HANDSHAKE_WANT_WRITE if self._out_raw else SSL_HANDSHAKE_WANT_READ
                _raise_ssl_error(ssl, _ssl_pointer(ssl), result)  # any error but WANT_READ
        except SSL.ZeroReturnError:
            self.counters_incr(M_ERROR_ZERO_RETURN)
            self._trace("SSL server handshake ERROR_ZERO_RETURN")
            return EVENT_ERROR
        except SSL.SysCallError as exc:
            self.counters_incr(M_ERROR_SYSCALL)
            _dbg_err("SSL server handshake ERROR_SYSCALL from %s: %s", self.remote_addr, exc)
            self._trace("SSL server handshake ERROR_SYSCALL: %s", exc)
            return EVENT_ERROR
        except SSL.Error as exc:
            self._flush_ssl_output()  # the alert OpenSSL queued
            self._count_ssl_error(exc)
            self._trace("SSL server handshake ERROR_SSL: %s", exc)
            return EVENT_ERROR
        # The read BIO may still hold records that came after the client's Finished (a client
        # that sends its request in the same flight): keep the flag so the first read looks.
        self._ssl_bio_has_data = True
        self._flush_ssl_output()
        return EVENT_DONE

    def _count_ssl_error(self, exc: SSL.Error) -> None:
        self.counters_incr(M_ERROR_SSL)
        text = str(exc).lower()
        for needle, metric in _UA_ERROR_COUNTERS:
            if needle in text:
                self.counters_incr(metric)
                break
        else:
            self.counters_incr(M_UA_OTHER)
        _dbg_err("SSL server handshake ERROR_SSL from %s: %s", self.remote_addr, exc)

    def _send_raw_alert(self, description: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(_alert_record(description))

    # -- client side (origin connections) ---------------------------------------------------
    def ssl_client_handshake_event(self) -> int:
        ssl = self.ssl
        if ssl is None:
            return EVENT_ERROR
        if self._out_raw and not self._flush_raw():
            return SSL_HANDSHAKE_WANT_WRITE
        if self._ssl_started:
            retval = self.read_raw_data()
            if retval == 0:
                self.counters_incr(M_ERROR_SYSCALL)
                return EVENT_ERROR
            if retval < 0 and retval != -11:
                return EVENT_ERROR
        self._ssl_started = True
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            self._flush_ssl_output()
            return SSL_HANDSHAKE_WANT_WRITE if self._out_raw else SSL_HANDSHAKE_WANT_READ
        except SSL.ZeroReturnError:
            self.counters_incr(M_ERROR_ZERO_RETURN)
            return EVENT_ERROR
        except SSL.SysCallError:
            self.counters_incr(M_ERROR_SYSCALL)
            return EVENT_ERROR
        except SSL.Error as exc:
            self._flush_ssl_output()
            self.counters_incr(M_ERROR_SSL)
            self.client_handshake_error = str(exc)
            _dbg_err("SSL client handshake ERROR_SSL to %s: %s", self.remote_addr, exc)
            return EVENT_ERROR
        self._flush_ssl_output()
        self.counters_incr(_m("total_success_handshake_count_out"))
        return EVENT_DONE

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
        _set_read_ahead(ssl)
        self.ssl = ssl
        self._handshake_step()

    # -- endings ---------------------------------------------------------------------------------
    def _handshake_done(self) -> None:
        self.ssl_handshake_complete = True
        self.cancel_inactivity_timeout()
        ssl = self.ssl
        assert ssl is not None
        self._use_socket_bio()
        if self.outbound:
            cb = self.on_client_handshake
            if cb is not None:
                cb(self, True)
            return
        elapsed = time.monotonic() - self.ssl_handshake_begin_time
        counters = self.nh.counters
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
        if self._trace_on:
            self._trace(
                "SSL server handshake completed successfully: sni=%s version=%s cipher=%s resumed=%s",
                self.server_name,
                version,
                ssl.get_cipher_name(),
                reused,
            )
            if proto:
                self._trace("client selected next protocol '%s'", proto.decode("latin-1"))
            else:
                self._trace("client did not select a next protocol")
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
        replay = bytes(self.handshake_buffer or b"")
        self.handshake_buffer = None
        self.ssl = None
        self.cancel_inactivity_timeout()
        dest = self.tunnel_destination
        if dest is None and self.config is not None:
            dest = self.config.tunnel_route
        _dbg("blind tunnel for %s to %s (%d bytes to replay)", self.remote_addr, dest, len(replay))
        assert self.config is not None
        self.config.on_tunnel(self, replay, dest)

    def on_timeout(self, event: int) -> None:
        if not self.ssl_handshake_complete and self.attributes is Transport.DEFAULT:
            if event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT) and not self.outbound:
                self.counters_incr(M_TIMEOUT)
                _dbg("handshake timeout for %s", self.remote_addr)
                self._trace("SSL server handshake timed out")
            self._handshake_failed()
            return
        NetVConnection.on_timeout(self, event)

    def do_io_close(self, error: int = 0) -> None:
        if self.closed:
            return
        ssl = self.ssl
        if ssl is not None and self.ssl_handshake_complete:
            # OpenSSL drops a session from its cache when the SSL is freed without
            # SSL_SENT_SHUTDOWN (ssl_clear_bad_session), so a client that closed first could
            # never resume. As nginx: send close_notify unless the peer has gone with a bare
            # EOF, and then mark the shutdown done without writing (a quiet shutdown).
            if not self.eos or ssl.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
                with contextlib.suppress(SSL.Error):
                    ssl.shutdown()
                self._flush_ssl_output()
            ssl.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        NetVConnection.do_io_close(self, error)
        self._hook_active = False
        outbound_hooks = self.outbound_hooks
        if outbound_hooks is not None:
            outbound_hooks.on_close()  # VCONN_OUTBOUND_CLOSE (it may still read the peer cert)
        if self.close_hooks_pending:
            self.close_hooks_pending = False
            cfg = self.config
            for callback in cfg.hooks.get(HookID.VCONN_CLOSE) if cfg is not None else ():
                try:
                    callback(HookID.VCONN_CLOSE, self)
                except Exception as exc:
                    _dbg_err("VCONN_CLOSE hook raised %r", exc)
        self.ssl = None

    # -- TLS data path -----------------------------------------------------------------------
    def _flush_ssl_output(self) -> None:
        ssl = self.ssl
        if ssl is None or self._sock_bio:
            return
        out = self._out_raw
        pending = _BIO_get_mem_data(_write_bio(ssl), _NULL)  # _mem_pending, inlined
        if pending:
            _drain_out(ssl, pending, self._scratch, out)
        if out:
            self._flush_raw()

    def _flush_raw(self) -> bool:
        """Send pending ciphertext; True when all of it went out."""
        out = self._out_raw
        try:
            n = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._out_raw = bytearray()
            return True  # the read side will see the error
        if n == len(out):
            out.clear()
            if self._mask & EVENT_WRITE:
                self._update_interest()
            return True
        del out[:n]
        if not self._mask & EVENT_WRITE:
            self._update_interest()
        return False

    def _ssl_read(self) -> None:
        vio = self.read
        buf = vio.buffer
        ssl = self.ssl
        if self.closed or not self.read_enabled or buf is None or ssl is None:
            self._update_interest()
            return
        got_raw = False
        chunks: list[bytes] = []
        room = min(buf.write_avail(), vio.nbytes - vio.ndone)
        if room <= 0:
            self._read_no_room()
            return
        eos = False
        error = False
        rec = self._scratch.rec
        ssl_ptr = _ssl_pointer(ssl)
        into = _read_bio(ssl)
        while room > 0:
            # ssl.pending() / _mem_pending(), inlined
            if (
                self._raw_eof
                or _SSL_pending(ssl_ptr)
                or _BIO_get_mem_data(into, _NULL)
                or _has_pending(ssl_ptr)  # read-ahead: records OpenSSL already took from the BIO
            ):
                try:
                    # ssl.recv() without its per-call buffer allocation; errors as in pyOpenSSL
                    n = _SSL_read(ssl_ptr, rec, min(room, TLS_RECORD_MAX))
                    if n > 0:
                        data = _ffi_buffer(rec, n)[:]
                    else:
                        _raise_ssl_error(ssl, ssl_ptr, n)
                        data = b""
                except SSL.WantReadError:  # a partial record: more ciphertext is needed
                    self._ssl_bio_has_data = False
                    if self._raw_eof:
                        eos = True
                        break
                except SSL.ZeroReturnError:
                    eos = True
                    break
                except SSL.SysCallError:
                    eos = True  # EOF without close_notify: treat as end of stream
                    break
                except SSL.Error as exc:
                    _dbg_err("SSL read error from %s: %s", self.remote_addr, exc)
                    error = True
                    break
                else:
                    if not data:
                        break  # SSL_read gave nothing and no error: never spin on it
                    chunks.append(data)
                    room -= len(data)
                    continue
            # Nothing (whole) buffered in OpenSSL: one read from the socket per event. Checking
            # the BIOs first spares the WantReadError that SSL_read would raise.
            if got_raw:
                break
            got_raw = True
            retval = self.read_raw_data()
            if retval == -11:
                break
            if retval <= 0:
                self._raw_eof = True
                ssl.bio_shutdown()
        # Reading can make OpenSSL write (an alert for a renegotiation attempt, a KeyUpdate
        # reply): whatever it queued in the write BIO goes out now.
        self._flush_ssl_output()
        if chunks:
            data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
            self._deliver(data)
            if self.closed:
                return
        if error:
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_ERROR)
        elif eos and not (ssl.pending() > 0):
            self.eos = True
            self.read_enabled = False
            self._raw_eof = False
            self._update_interest()
            self._signal(vio, VC_EVENT_EOS)
        elif not self.closed:
            self._use_socket_bio()

    def _ssl_write(self) -> None:
        vio = self.write
        reader = vio.reader
        ssl = self.ssl
        if self.closed or ssl is None:
            return
        if self._out_raw and not self._flush_raw():
            return
        if not self.write_enabled or reader is None:
            self._update_interest()
            return
        todo = vio.nbytes - vio.ndone
        avail = min(reader.read_avail(), todo)
        wrote = 0
        scratch = self._scratch
        while avail > 0 and len(self._out_raw) < 262144:
            n = self._ssl_write_record(ssl, reader, avail)
            if n <= 0:  # a memory BIO takes every record: only an error stops it
                return
            reader.consume(n)
            vio.ndone += n
            avail -= n
            wrote += n
            pending = _BIO_get_mem_data(_write_bio(ssl), _NULL)  # _mem_pending, inlined
            if pending:
                _drain_out(ssl, pending, scratch, self._out_raw)
        if wrote:
            self.net_activity()
        if self._out_raw and not self._flush_raw():
            return
        self._use_socket_bio()
        self._ssl_wrote(vio, reader, wrote)

    def _ssl_write_record(self, ssl: SSL.Connection, reader: IOBufferReader, avail: int) -> int:
        """SSL_write of up to one record from the reader's front; nothing is consumed here.

        Returns the bytes OpenSSL took, 0 when the socket is full (WANT_WRITE: the same bytes
        are offered again later, and may have moved: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, set
        by pyOpenSSL), or -1 after signalling VC_EVENT_ERROR."""
        ssl_ptr = _ssl_pointer(ssl)
        with (
            reader.peek(avail if avail < TLS_RECORD_MAX else TLS_RECORD_MAX) as chunk,
            _ffi_from_buffer(chunk) as cdata,
        ):
            n = _SSL_write(ssl_ptr, cdata, len(chunk))
        if n > 0:
            return int(n)
        if _SSL_get_error(ssl_ptr, n) == _SSL_ERROR_WANT_WRITE:
            return 0
        try:  # pyOpenSSL's mapping of the error, which also clears OpenSSL's error queue
            _raise_ssl_error(ssl, ssl_ptr, n)
        except SSL.Error as exc:
            _dbg_err("SSL write error to %s: %s", self.remote_addr, exc)
        self.write_enabled = False
        self._signal(self.write, VC_EVENT_ERROR)
        return -1

    def _ssl_wrote(self, vio: VIO, reader: IOBufferReader, wrote: int) -> None:
        """After a write pass that was not held up: WRITE_COMPLETE, or WRITE_READY once the
        reader is drained (with bytes left, another pass is queued)."""
        if vio.ndone >= vio.nbytes:
            self.write_enabled = False
            self._update_interest()
            self._signal(vio, 103)  # VC_EVENT_WRITE_COMPLETE
        elif wrote:
            if reader.read_avail():
                self.nh.write_ready_list[self] = None
            else:
                self._signal(vio, 101)  # VC_EVENT_WRITE_READY

    # -- the socket-BIO data path (ATS: the fd BIO once the handshake buffer is drained) ------------
    def _use_socket_bio(self) -> None:
        """Hand the socket to OpenSSL once both memory BIOs are empty.

        The memory BIOs exist for the handshake (the ClientHello is read and parsed before
        OpenSSL sees it). Afterwards they only cost copies: SSL_read and SSL_write on the
        socket save a recv/send from Python, a BIO copy each way, and the BIOs' memory. Bytes
        OpenSSL already took from the read BIO stay in its record layer across the switch.
        """
        ssl = self.ssl
        if (
            self._sock_bio
            or ssl is None
            or self._out_raw
            or self._raw_eof
            or _BIO_get_mem_data(_read_bio(ssl), _NULL)
            or _BIO_get_mem_data(_write_bio(ssl), _NULL)
            or not _HAVE_SOCKET_BIO
        ):
            return
        # frees both memory BIOs; pyOpenSSL's bookkeeping (its reverse map) follows in _openssl
        if not _ssl_set_fd(ssl, self.fd):
            return
        self._sock_bio = True

    def _ssl_read_sock(self) -> None:
        vio = self.read
        buf = vio.buffer
        ssl = self.ssl
        if self._read_wants_write:
            self._read_wants_write = False  # retried now; set again below if it still must wait
            self._update_interest()
        if self.closed or not self.read_enabled or buf is None or ssl is None:
            self._update_interest()
            return
        room = min(buf.write_avail(), vio.nbytes - vio.ndone)
        if room <= 0:
            self._read_no_room()
            return
        rec = self._scratch.rec
        ssl_ptr = _ssl_pointer(ssl)
        has_pending = _has_pending
        chunks: list[bytes] = []
        eos = error = False
        while room > 0:
            n = _SSL_read(ssl_ptr, rec, room if room < TLS_RECORD_MAX else TLS_RECORD_MAX)
            if n > 0:
                chunks.append(_ffi_buffer(rec, n)[:])
                room -= n
                if not has_pending(ssl_ptr):
                    break  # the next SSL_read would find an empty socket: wait for epoll instead
                continue
            err = _SSL_get_error(ssl_ptr, n)
            if err == _SSL_ERROR_WANT_READ:
                break
            if err == _SSL_ERROR_ZERO_RETURN:
                eos = True
            elif err == _SSL_ERROR_WANT_WRITE:
                # OpenSSL has something to send (a KeyUpdate reply) and the socket is full:
                # the read is retried when the socket is writable.
                self._read_wants_write = True
                self._update_interest()
            else:
                try:  # pyOpenSSL's mapping of the error, which also clears OpenSSL's error queue
                    _raise_ssl_error(ssl, ssl_ptr, n)
                except SSL.SysCallError:
                    eos = True  # EOF without close_notify, or a reset
                except SSL.Error as exc:
                    _dbg_err("SSL read error from %s: %s", self.remote_addr, exc)
                    error = True
            break
        if chunks:
            self._deliver(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            if self.closed:
                return
        if error:
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_ERROR)
        elif eos:
            self.eos = True
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_EOS)

    def _ssl_write_sock(self) -> None:
        vio = self.write
        reader = vio.reader
        ssl = self.ssl
        if self.closed or ssl is None:
            return
        if not self.write_enabled or reader is None:
            self._update_interest()
            return
        avail = min(reader.read_avail(), vio.nbytes - vio.ndone)
        wrote = 0
        blocked = False
        while avail > 0:
            n = self._ssl_write_record(ssl, reader, avail)
            if n < 0:
                return
            if n == 0:
                blocked = True
                break
            reader.consume(n)
            vio.ndone += n
            avail -= n
            wrote += n
        if wrote:
            self.net_activity()
        if blocked != self._write_blocked:
            self._set_write_blocked(blocked)
        if not blocked:
            self._ssl_wrote(vio, reader, wrote)

    @property
    def ssl_version(self) -> str | None:
        return self.ssl.get_protocol_version_name() if self.ssl is not None else None


class OutboundHooks(Continuation):
    """The hook target of one origin connection (plain or TLS): VCONN_OUTBOUND_START,
    SSL_VERIFY_SERVER and VCONN_OUTBOUND_CLOSE, as ATS fires them on its outbound VCs.

    Made only when a plugin registered one of those hooks. The HTTP state machine calls
    ``run(hook, then)``; the callbacks run in registration order, each once, and ``then(ok)`` is
    called when they all re-enabled (``ok`` False: one failed with ``reenable(error=True)`` or
    raised, or the VC closed while a hook was paused). The VC's ``do_io_close`` calls
    ``on_close``, which delivers VCONN_OUTBOUND_CLOSE once if VCONN_OUTBOUND_START ran.

    It quacks like the VC for the plugin facade: addresses, ``server_name`` (the SNI we send,
    None for plain origins), ``plugin_data``, ``peer_certificate`` and ``verify_error``.
    """

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
        self._hook = HookID.VCONN_OUTBOUND_START
        self._callbacks: tuple[Any, ...] = ()
        self._index = 0
        self._active = False
        self._in_call = False
        self._error = False
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
        vc = self.vc
        return vc.peer_certificate if isinstance(vc, SSLNetVConnection) else None

    def run(self, hook: HookID, then: Callable[[bool], None]) -> None:
        self._hook = hook
        self._callbacks = self.hooks.get(hook)
        self._index = 0
        self._error = False
        self._then = then
        if hook is HookID.VCONN_OUTBOUND_START:
            self.started = True
        self._next()

    def _next(self) -> None:
        callbacks = self._callbacks
        while self._index < len(callbacks) and not self._error and not self.vc.closed:
            callback = callbacks[self._index]
            self._index += 1
            self._active = True
            self._in_call = True
            try:
                callback(self._hook, self)
            except Exception as exc:  # a plugin bug fails this origin connection only
                _dbg_err("hook %s raised %r; failing the origin connection", self._hook.name, exc)
                self._error = True
                self._active = False
            finally:
                self._in_call = False
            if self._active:
                return  # paused until reenable_hook
        then = self._then
        self._then = None
        self._callbacks = ()
        if then is not None:
            then(not self._error and not self.vc.closed)

    def _resume(self, event: int, data: Any) -> None:
        if self._then is not None and not self._active:
            self._next()

    def reenable_hook(self, *, error: bool = False) -> None:
        if self.vc.closed or not self._active:
            _dbg("outbound reenable on %s ignored (closed=%s, no hook active)", self.vc, self.vc.closed)
            return
        self._active = False
        if error:
            self._error = True
        if not self._in_call:
            self.vc.nh.thread.schedule_imm(self)

    def request_tunnel(self, destination: str | None) -> None:
        _dbg("tunnel(%s) on an origin connection ignored", destination)

    def on_close(self) -> None:
        if self._active:
            # Closed while a hook was paused (timeout, the client went away): the waiting state
            # machine hears ``then(False)`` from the loop, never from inside do_io_close.
            self._active = False
            self.vc.nh.thread.schedule_imm(self)
        if self.started and not self._close_delivered:
            self._close_delivered = True
            for callback in self.hooks.get(HookID.VCONN_OUTBOUND_CLOSE):
                try:
                    callback(HookID.VCONN_OUTBOUND_CLOSE, self)
                except Exception as exc:
                    _dbg_err("VCONN_OUTBOUND_CLOSE hook raised %r", exc)


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


__all__ = [
    "EVENT_READ",
    "SSL_EVENT_CLIENT",
    "SSL_EVENT_SERVER",
    "VC_EVENT_EOS",
    "VC_EVENT_ERROR",
    "HandshakeHookState",
    "OutboundHooks",
    "OutboundPlainNetVConnection",
    "SSLAcceptConfig",
    "SSLHookState",
    "SSLNetVConnection",
    "Transport",
    "alpn_select",
]
