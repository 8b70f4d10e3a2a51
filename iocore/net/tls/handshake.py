"""The TLS handshake as a sans-IO state machine: bytes in, commands out (ATS sslServerHandShakeEvent,
sslClientHandShakeEvent and their hook phases, without the socket).

Theory of operation
-------------------
h11's ``_state.py`` is the model: the machine is in one ``HandshakeState``; ``_TRANSITIONS`` lists
the states each one may move to, and any other move raises ``HandshakeStateError``. The driver
(``SSLNetVConnection``) feeds it what the socket gave (``receive_data``, ``receive_eof``) and
asks ``next_command()`` what to do, until the command is terminal:

* ``SendBytes(data)``: ciphertext (or OpenSSL's alert) to write to the peer;
* ``NEED_DATA``: nothing to do until more bytes came (``receive_data`` / ``receive_eof``);
* ``RunHook(hook)``: run the plugin hooks of that id; report their outcome with
  ``hook_done(op, destination)``; until then ``next_command`` answers ``PAUSED``;
* ``Done(protocol)``: the handshake is over (``protocol``: the ALPN protocol, or None);
* ``Tunnel(replay, destination)``: blind-tunnel the connection, replaying what the client sent;
* ``Fail(metrics, alert, reason)``: the handshake failed: count ``metrics``, send the raw fatal
  ``alert`` (when no SSL object exists to send one), close.

Server side: START -> VCONN_START (plugin hooks, before any byte is read) -> READ_HELLO (bytes
are buffered and fed to the sans-IO ClientHello parser until the hello is complete) ->
CLIENT_HELLO (hooks) -> SELECT_CERT (sni.yaml action, then the ssl_multicert lookup: SNI exact,
SNI wildcard, local IP:port, IP, default) -> SERVERNAME (hooks) -> CERT (hooks) -> HANDSHAKE (the
``SSL.Connection`` exists, made with the chosen context over memory BIOs, the buffered bytes
replayed into it; ``do_handshake`` steps) -> VERIFY_CLIENT (hooks, when the client presented a
certificate) -> DONE. A hook phase nobody registered a hook for is skipped (a proxy without
plugins never sees ``RunHook``). Bytes the parser does not read as a hello (it is never stricter
than OpenSSL) go to OpenSSL at once, with the context of the local address; the parser itself
refuses only a record over 2^14 bytes and a hello over the cap, with OpenSSL's alerts. Client
side (origin connections): START -> HANDSHAKE -> DONE over an ``SSL.Connection`` the caller made.

The machine does no socket I/O, arms no timer and runs no hook: it is unit-tested with a real
client over memory (tests/test_handshake_machine.py). What a plugin sees and may change during
the hooks (the SNI, the parsed hello, the sni.yaml item, a CERT hook's own context, the SSL
object) lives on the ``host`` it is given (the VC): it reads and writes those attributes there.
"""

from __future__ import annotations

import enum
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from OpenSSL import SSL

from iocore.eventsystem.diags import DbgCtl
from iocore.net.hooks import HookID, HookOp, HookRegistry
from iocore.net.tls._openssl import (
    HAVE_SOCKET_BIO,
    NULL,
    SSL_ERROR_WANT_READ,
    BIO_get_mem_data,
    BIO_read,
    SSL_do_handshake,
    SSL_get_error,
    ffi_buffer,
    ffi_new,
    handle_bio_errors,
    raise_ssl_error,
    ssl_pointer,
    write_bio,
)
from iocore.net.tls._openssl import set_read_ahead as _openssl_set_read_ahead
from iocore.net.tls.client_hello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloParser,
    looks_like_tls_handshake,
)
from iocore.net.tls.errors import ClientHelloRefused, HandshakeStateError, TLSProtocolError
from iocore.net.tls.metrics import (
    M_ERROR_SSL,
    M_ERROR_SYSCALL,
    M_ERROR_ZERO_RETURN,
    M_NO_CERT,
    M_SNI_IP_DENIED,
    M_UA_OTHER,
    M_UA_VERIFY,
    ssl_error_metrics,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from iocore.net.ssl_cert_lookup import SSLCertContext, SSLCertLookup
    from iocore.net.ssl_config import WireTrace
    from iocore.net.ssl_sni_config import SNIConfigParams, SNIPolicy


def set_read_ahead(ssl: SSL.Connection) -> None:
    """Before the handshake (see _openssl.set_read_ahead): lets one read(2) fetch every record."""
    if HAVE_SOCKET_BIO:
        _openssl_set_read_ahead(ssl)


# A handshake flight is drained through this (one event loop per process: nothing else holds it
# between the BIO_read and the copy out).
_DRAIN_SCRATCH_SIZE = 16384
_DRAIN_SCRATCH: Any = ffi_new("char[]", _DRAIN_SCRATCH_SIZE)
_dbg = DbgCtl("ssl")
_dbg_err = DbgCtl("ssl.error")
_dbg_sni = DbgCtl("ssl_sni")  # sni.yaml actions (ATS's tag)

# Fatal TLS alerts the machine sends itself, before any SSL object exists.
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ACCESS_DENIED = 49
ALERT_UNRECOGNIZED_NAME = 112


def alert_record(description: int) -> bytes:
    """A fatal alert record: content type 21, TLS 1.2 record version, length 2, level fatal."""
    return bytes((21, 3, 3, 0, 2, 2, description))


# A handshake refused for want of a certificate is logged at warning level once per SNI name
# per interval (an operator must see it; a client retrying must not flood the log).
NO_CERT_LOG_INTERVAL = 60.0
_NO_CERT_LOG_MAX = 1024  # names remembered; beyond that (a scan of random names) stay quiet
_no_cert_logged: dict[str, float] = {}


def _warn_no_cert(name: str | None, local: Any) -> None:
    import logging

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
    logging.getLogger("tsproxy.ssl").warning(
        "TLS handshake on %s refused: no certificate for %s and no default certificate "
        "(a dest_ip=* line in ssl_multicert.config); logged once a minute per name",
        where,
        sni,
    )


class SSLAcceptConfig:
    """Everything a server-side SSL VC needs, fixed for the VC's life (its config snapshot).

    A reload builds a new one; handshakes in flight keep the one they started with. The worker
    holds it in its ConfigProcessor: the VC's close calls ``on_close``, which releases the
    snapshot this VC was accepted under.
    """

    __slots__ = (
        "alpn_no_overlap_alert",
        "fallback_ctx",
        "handshake_timeout",
        "hooks",
        "lookup",
        "max_client_hello",
        "on_close",
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
        on_ready: Callable[[Any], None],
        on_tunnel: Callable[[Any, bytes, str | None], None],
        max_client_hello: int = MAX_CLIENT_HELLO,
        alpn_no_overlap_alert: bool = True,
        wire_trace: WireTrace | None = None,
        fallback_ctx: SSL.Context | None = None,
        sni: SNIConfigParams | None = None,
        on_close: Callable[[], None] | None = None,
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
        self.on_ready = on_ready  # called with the SSLNetVConnection
        self.on_tunnel = on_tunnel
        self.on_close = on_close  # once per VC, from its do_io_close


class HandshakeHost(Protocol):
    """The connection a plugin sees (the VC): the machine reads and writes these."""

    server_name: str | None
    client_hello: ClientHello | None
    sni_policy: SNIPolicy | None
    ssl_context: SSL.Context | None  # a CERT hook's own context
    npn_set: tuple[bytes, ...]  # the ALPN protocols offered (sni.yaml http2: off drops h2)
    ssl: SSL.Connection | None
    remote_addr: tuple[Any, ...]
    local_addr: tuple[Any, ...]
    trace_on: bool

    def trace(self, fmt: str, *args: Any) -> None: ...


# -- commands ----------------------------------------------------------------------------------


class Command:
    __slots__ = ()


class _Sentinel(Command):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # waiting for receive_data / receive_eof
PAUSED = _Sentinel("PAUSED")  # waiting for hook_done


class SendBytes(Command):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"SendBytes({len(self.data)} bytes)"


class RunHook(Command):
    __slots__ = ("hook",)

    def __init__(self, hook: HookID) -> None:
        self.hook = hook

    def __repr__(self) -> str:
        return f"RunHook({self.hook.name})"


class Done(Command):
    __slots__ = ("protocol",)

    def __init__(self, protocol: bytes | None) -> None:
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"Done({self.protocol!r})"


class Tunnel(Command):
    __slots__ = ("destination", "replay")

    def __init__(self, replay: bytes, destination: str | None) -> None:
        self.replay = replay
        self.destination = destination

    def __repr__(self) -> str:
        return f"Tunnel({len(self.replay)} bytes, {self.destination!r})"


class Fail(Command):
    __slots__ = ("alert", "metrics", "reason")

    def __init__(self, metrics: tuple[int, ...], alert: int | None = None, reason: str = "") -> None:
        self.metrics = metrics
        self.alert = alert  # a raw fatal alert to send (no SSL object to send one)
        self.reason = reason

    def __repr__(self) -> str:
        return f"Fail({self.metrics}, alert={self.alert}, {self.reason!r})"


# -- states --------------------------------------------------------------------------------------


class HandshakeState(enum.IntEnum):
    # IntEnum: the transition table and the hook map are dicts keyed by state, and an
    # IntEnum hashes as its int (a plain Enum's __hash__ is a Python-level call).
    START = 0
    VCONN_START = 1  # VCONN_START hooks
    READ_HELLO = 2  # buffering the ClientHello
    CLIENT_HELLO = 3  # SSL_CLIENT_HELLO hooks
    SELECT_CERT = 4  # sni.yaml action and certificate context
    SERVERNAME = 5  # SSL_SERVERNAME hooks
    CERT = 6  # SSL_CERT hooks
    HANDSHAKE = 7  # do_handshake over memory BIOs
    VERIFY_CLIENT = 8  # SSL_VERIFY_CLIENT hooks
    DONE = 9
    TUNNEL = 10
    FAILED = 11


S = HandshakeState
_TRANSITIONS: dict[HandshakeState, frozenset[HandshakeState]] = {
    S.START: frozenset({S.VCONN_START, S.READ_HELLO, S.HANDSHAKE, S.FAILED}),
    S.VCONN_START: frozenset({S.READ_HELLO, S.TUNNEL, S.FAILED}),
    S.READ_HELLO: frozenset({S.CLIENT_HELLO, S.SELECT_CERT, S.TUNNEL, S.FAILED}),
    S.CLIENT_HELLO: frozenset({S.SELECT_CERT, S.TUNNEL, S.FAILED}),
    S.SELECT_CERT: frozenset({S.SERVERNAME, S.CERT, S.HANDSHAKE, S.TUNNEL, S.FAILED}),
    S.SERVERNAME: frozenset({S.CERT, S.HANDSHAKE, S.TUNNEL, S.FAILED}),
    S.CERT: frozenset({S.HANDSHAKE, S.TUNNEL, S.FAILED}),
    S.HANDSHAKE: frozenset({S.VERIFY_CLIENT, S.DONE, S.FAILED}),
    S.VERIFY_CLIENT: frozenset({S.DONE, S.FAILED}),
    S.DONE: frozenset(),
    S.TUNNEL: frozenset(),
    S.FAILED: frozenset(),
}
_HOOK_OF_STATE: dict[HandshakeState, HookID] = {
    S.VCONN_START: HookID.VCONN_START,
    S.CLIENT_HELLO: HookID.SSL_CLIENT_HELLO,
    S.SERVERNAME: HookID.SSL_SERVERNAME,
    S.CERT: HookID.SSL_CERT,
    S.VERIFY_CLIENT: HookID.SSL_VERIFY_CLIENT,
}

# Where a hook run stands in a hook state.
_HOOK_NOT_RUN = 0
_HOOK_RUNNING = 1
_HOOK_FINISHED = 2


class _Machine:
    """What the server and client machines share: state, output, the do_handshake step."""

    __slots__ = ("_eof", "_next", "_out", "_result", "_starved", "host", "ssl", "state")

    def __init__(self, host: HandshakeHost) -> None:
        self.host = host
        self.state = HandshakeState.START
        self.ssl: SSL.Connection | None = None
        self._out = b""  # bytes for the peer, handed out as SendBytes first
        self._eof = False
        self._starved = False  # the last step wanted more bytes than it had
        self._result: Command | None = None  # the terminal command, once there is one
        self._next: Command | None = None  # a command computed while output was pending

    def _to(self, new: HandshakeState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise HandshakeStateError(f"illegal handshake transition {self.state.name} -> {new.name}")
        self.state = new

    def _fail(self, metrics: tuple[int, ...], alert: int | None = None, reason: str = "") -> Fail:
        self._to(HandshakeState.FAILED)
        result = self._result = Fail(metrics, alert, reason)
        return result

    @property
    def finished(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> Command | None:
        """The terminal command (Done, Tunnel, Fail), None while the handshake goes on."""
        return self._result

    def receive_eof(self) -> None:
        """The peer closed its side (read returned 0)."""
        self._eof = True
        if self._next is NEED_DATA:
            self._next = None

    def _new_input(self) -> None:
        self._starved = False
        if self._next is NEED_DATA:
            self._next = None

    def _drain(self) -> None:
        """Move what OpenSSL wrote into its write BIO to the output."""
        ssl = self.ssl
        assert ssl is not None
        bio = write_bio(ssl)
        pending = BIO_get_mem_data(bio, NULL)
        if pending <= 0:
            return
        if pending > _DRAIN_SCRATCH_SIZE:
            self._out += ssl.bio_read(pending)
            return
        # BIO_read into the module's scratch memory: pyOpenSSL's bio_read allocates a buffer
        # of the pending size per call (one flight per handshake step, a few KiB)
        n = BIO_read(bio, _DRAIN_SCRATCH, pending)
        if n <= 0:
            handle_bio_errors(ssl, bio, n)
            return
        self._out += ffi_buffer(_DRAIN_SCRATCH, n)[:]

    def next_command(self) -> Command:
        """What the driver does next: output first, then the state's command."""
        if self._out:
            return self._send()
        cmd = self._next
        if cmd is not None:
            self._next = None
            return cmd
        result = self._result
        if result is not None:
            return result
        cmd = self._step()
        if self._out:
            self._next = cmd  # given after the bytes went out
            return self._send()
        return cmd

    def _send(self) -> SendBytes:
        data = self._out
        self._out = b""
        return SendBytes(data)

    def _step(self) -> Command:
        """One move of the side's own states (ServerHandshake, ClientHandshake override it)."""
        raise NotImplementedError


class ServerHandshake(_Machine):
    """The accepted (client-facing) side: hooks, ClientHello, certificate choice, handshake."""

    __slots__ = (
        "_buffer",
        "_fed",
        "_hook_dest",
        "_hook_op",
        "_hook_status",
        "_parser",
        "_unparsed",
        "cert_context",
        "config",
    )

    def __init__(self, host: HandshakeHost, config: SSLAcceptConfig) -> None:
        super().__init__(host)
        self.config = config
        self.cert_context: SSLCertContext | None = None
        self._buffer = bytearray()  # the raw ClientHello bytes, until the SSL exists
        self._fed = 0  # bytes of _buffer the parser has seen
        self._parser: ClientHelloParser | None = None
        self._unparsed = False  # the parser did not read a hello: OpenSSL decides alone
        self._hook_status = _HOOK_NOT_RUN
        self._hook_op = HookOp.DEFAULT
        self._hook_dest: str | None = None

    # -- input ----------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        ssl = self.ssl
        if ssl is None:
            self._buffer += data
        else:
            ssl.bio_write(data)
        self._new_input()

    def hook_done(self, op: HookOp = HookOp.DEFAULT, destination: str | None = None) -> None:
        """The hooks of the last ``RunHook`` all re-enabled (``op``: what they asked for)."""
        if self._hook_status != _HOOK_RUNNING:
            raise HandshakeStateError(f"hook_done in {self.state.name} with no hook running")
        self._hook_status = _HOOK_FINISHED
        self._hook_op = op
        self._hook_dest = destination

    # -- the steps -------------------------------------------------------------------------------
    def _enter_hook(self, state: HandshakeState) -> None:
        self._to(state)
        self._hook_status = _HOOK_NOT_RUN
        self._hook_op = HookOp.DEFAULT

    def _tunnel(self, destination: str | None) -> None:
        self._to(HandshakeState.TUNNEL)
        replay = bytes(self._buffer)
        self._buffer = bytearray()
        self._result = Tunnel(replay, destination if destination is not None else self.config.tunnel_route)

    def _step(self) -> Command:
        hooks = self.config.hooks
        while True:
            state = self.state
            if state is S.HANDSHAKE:
                return self._handshake_step()
            if state in _HOOK_OF_STATE:
                status = self._hook_status
                if status == _HOOK_NOT_RUN:
                    self._hook_status = _HOOK_RUNNING
                    return RunHook(_HOOK_OF_STATE[state])
                if status == _HOOK_RUNNING:
                    return PAUSED
                self._after_hook(state)
            elif state is S.START:
                if hooks.has(HookID.VCONN_START):
                    self._enter_hook(S.VCONN_START)
                else:
                    self._to(S.READ_HELLO)
            elif state is S.READ_HELLO:
                if not self._read_hello():
                    return NEED_DATA
            elif state is S.SELECT_CERT:
                if self.set_context_cert():
                    if self._unparsed:
                        self._create_ssl(self.config.fallback_ctx)
                    elif hooks.has(HookID.SSL_SERVERNAME):
                        self._enter_hook(S.SERVERNAME)
                    else:
                        self._after_servername()
            else:
                result = self._result
                assert result is not None
                return result

    def _after_hook(self, state: HandshakeState) -> None:
        op = self._hook_op
        host = self.host
        if state is S.VCONN_START:
            if op is HookOp.TUNNEL:
                self._tunnel(self._hook_dest)  # no data has been read yet: nothing to replay
            elif op is HookOp.TERMINATE:
                self._fail(())
            else:
                self._to(S.READ_HELLO)
        elif state is S.VERIFY_CLIENT:
            if op is HookOp.TERMINATE:
                _dbg_err("SSL_VERIFY_CLIENT hook rejected the certificate of %s", host.remote_addr)
                self._fail((M_UA_VERIFY,))
                return
            if op is HookOp.TUNNEL:
                _dbg("tunnel requested in SSL_VERIFY_CLIENT ignored (handshake already done)")
            self._done()
        else:
            name = _HOOK_OF_STATE[state].name
            if op is HookOp.TERMINATE:
                host.trace("%s hook failed the handshake", name)
                self._fail(())
            elif op is HookOp.TUNNEL:
                host.trace("%s hook turned the connection into a blind tunnel", name)
                self._tunnel(self._hook_dest)
            elif state is S.CLIENT_HELLO:
                self._to(S.SELECT_CERT)
            elif state is S.SERVERNAME:
                self._after_servername()
            else:
                self._create_ssl(None)

    def _after_servername(self) -> None:
        if self.config.hooks.has(HookID.SSL_CERT):
            self._enter_hook(S.CERT)
        else:
            self._create_ssl(None)

    def _read_hello(self) -> bool:
        """Feed the parser; False while it needs more bytes."""
        cfg = self.config
        host = self.host
        buffer = self._buffer
        if self._fed == len(buffer):
            if self._eof:
                _dbg("SSL handshake error: EOF before ClientHello from %s", host.remote_addr)
                self._fail(())
                return True
            return False
        parser = self._parser
        if parser is None:
            parser = self._parser = ClientHelloParser(cfg.max_client_hello)
        new = buffer[self._fed :]
        self._fed = len(buffer)
        try:
            hello = parser.feed(new)
        except ClientHelloRefused as exc:
            if cfg.wire_trace is not None:
                self._select_trace(cfg.wire_trace, None)
            # A resource bound (record over 2^14, hello over the cap): the alert OpenSSL
            # would send for the same bytes, without buffering the rest.
            _dbg_err("ClientHello from %s refused: %s", host.remote_addr, exc.reason)
            host.trace("ClientHello refused: %s (alert %d)", exc.reason, exc.alert)
            self._fail((M_ERROR_SSL, M_UA_OTHER), exc.alert, exc.reason)
            return True
        except TLSProtocolError as exc:
            if cfg.tr_pass and not looks_like_tls_handshake(bytes(buffer[:1])):
                _dbg("data does not look like SSL handshake, starting blind tunnel")
                self._to(S.TUNNEL)
                self._result = Tunnel(bytes(buffer), cfg.tunnel_route)
                return True
            # Not a hello the pre-parser reads: OpenSSL gets the bytes and decides (its
            # alert, or a handshake) with the context of the address; no hello hooks run.
            _dbg("ClientHello from %s left to OpenSSL: %s", host.remote_addr, exc.reason)
            if cfg.wire_trace is not None:
                self._select_trace(cfg.wire_trace, None)
            host.trace("ClientHello not pre-parsed (%s): left to OpenSSL", exc.reason)
            self._parser = None
            self._unparsed = True
            self._to(S.SELECT_CERT)
            return True
        if hello is None:
            return False
        self._parser = None
        host.client_hello = hello
        # Interned: the connections to one site share the name instead of a copy each.
        name = host.server_name = sys.intern(hello.server_name) if hello.server_name else None
        _dbg("ClientHello from %s: sni=%s alpn=%s", host.remote_addr, hello.server_name, hello.alpn_protocols)
        if cfg.wire_trace is not None:
            self._select_trace(cfg.wire_trace, name)
            host.trace(
                "ClientHello: sni=%s alpn=%s versions=%s max_version=0x%04x %d cipher suites, %d bytes",
                hello.server_name,
                [p.decode("latin-1") for p in hello.alpn_protocols],
                [f"0x{v:04x}" for v in hello.supported_versions],
                hello.max_version(),
                len(hello.cipher_suites),
                hello.record_bytes,
            )
        if cfg.hooks.has(HookID.SSL_CLIENT_HELLO):
            self._enter_hook(S.CLIENT_HELLO)
        else:
            self._to(S.SELECT_CERT)
        return True

    def _select_trace(self, wire_trace: WireTrace, server_name: str | None) -> None:
        """ATS computeSSLTrace, once per connection (when the SNI is known)."""
        addr = self.host.remote_addr
        self.host.trace_on = wire_trace.select(str(addr[0]) if addr else "", server_name)

    def set_context_cert(self) -> bool:
        """Choose the certificate context: SNI exact, SNI wildcard, then local IP:port, IP, default.

        False when the choice ended the handshake (a tunnel, a refusal)."""
        cfg = self.config
        host = self.host
        name = host.server_name
        if cfg.sni is not None and name and not self.perform_sni_action(cfg.sni, name):
            return False
        lookup = cfg.lookup
        cc = None
        if name:
            cc = lookup.find(name)
            if cc is not None and cc.ctx is None and cc.opt.name != "TUNNEL":
                cc = None
        local = host.local_addr
        if cc is None and local:
            cc = lookup.find_addr(str(local[0]), int(local[1]))
        if cc is None:
            cc = lookup.default_context
        self.cert_context = cc
        if host.trace_on:
            host.trace(
                "certificate context %s for sni=%s",
                cc.source if cc is not None and cc.ctx is not None else None,
                name,
            )
        if cc is not None and cc.opt.name == "TUNNEL":
            _dbg("action=tunnel for sni=%s", name)
            self._tunnel(cc.tunnel_route or None)
            return False
        if _dbg.on:
            _dbg(
                "set_context_cert: %s context %s for requested name '%s'",
                "found" if cc is not None and cc.ctx is not None else "no",
                cc and cc.source,
                name,
            )
        return True

    def perform_sni_action(self, sni: SNIConfigParams, name: str) -> bool:
        """sni.yaml (ATS SNIAction at the servername callback): match the item, refuse a client
        ip_allow does not list, start a tunnel_route. The item's TLS settings are applied once
        the SSL object exists; forward_route acts after the handshake. False: handshake over."""
        policy = sni.get(name)
        if policy is None:
            return True
        host = self.host
        host.sni_policy = policy
        if policy.item.http2 is False and b"h2" in host.npn_set:
            host.npn_set = tuple(p for p in host.npn_set if p != b"h2")  # sni.yaml http2: off
        if _dbg_sni.on:
            _dbg_sni("sni=%s matched %s (fqdn %s)", name, policy.item.source, policy.item.fqdn)
        remote_ip = str(host.remote_addr[0]) if host.remote_addr else ""
        if policy.ip_allow and not policy.allows(remote_ip):
            if _dbg_sni.on:
                _dbg_sni("%s: %s is not allowed - denying connection", policy.item.source, remote_ip)
            self._fail((M_SNI_IP_DENIED,), ALERT_ACCESS_DENIED, "sni.yaml ip_allow")
            return False
        if policy.route_type is not None and policy.route_type.name == "BLIND":
            dest = policy.route_for(name, int(host.local_addr[1]) if host.local_addr else 0)
            if _dbg_sni.on:
                _dbg_sni("%s: tunnel_route for sni=%s to %s", policy.item.source, name, dest)
            if dest is None:  # $1 captured something that is no host name
                self._fail((), ALERT_UNRECOGNIZED_NAME, "tunnel_route: no host name")
                return False
            self._tunnel(dest)
            return False
        return True

    def _create_ssl(self, fallback: SSL.Context | None) -> None:
        """The SSL object for the chosen context, with the buffered bytes replayed into it.

        ``fallback`` serves when no context has a certificate (the certificate-less context of
        this config, for a hello the pre-parser left to OpenSSL)."""
        host = self.host
        cc = self.cert_context
        ctx = host.ssl_context or (cc.ctx if cc is not None else None) or fallback
        if ctx is None:
            _warn_no_cert(host.server_name, host.local_addr)
            host.trace("no certificate for sni=%s: handshake failed", host.server_name)
            alert = ALERT_UNRECOGNIZED_NAME if host.server_name else ALERT_HANDSHAKE_FAILURE
            self._fail((M_NO_CERT, M_ERROR_SSL), alert, "no certificate")
            return
        try:
            ssl = SSL.Connection(ctx, None)
        except SSL.Error:
            _dbg_err("failed to create SSL server session")
            self._fail((), None, "SSL_new failed")
            return
        ssl.set_app_data(host)
        ssl.set_accept_state()
        set_read_ahead(ssl)
        policy = host.sni_policy
        if policy is not None and policy.inbound is not None:
            policy.inbound.apply(ssl)  # verify_client, valid_tls_versions_in
        if self._buffer:
            ssl.bio_write(bytes(self._buffer))
        self._buffer = bytearray()
        self.ssl = host.ssl = ssl
        self._to(S.HANDSHAKE)

    def _handshake_step(self) -> Command:
        host = self.host
        if self._starved:
            if self._eof:
                _dbg("SSL handshake error: EOF from %s", host.remote_addr)
                return self._fail((M_ERROR_SYSCALL,), None, "EOF")
            return NEED_DATA
        ssl = self.ssl
        assert ssl is not None
        try:
            # do_handshake without pyOpenSSL's WantReadError at every step that waits for bytes
            ptr = ssl_pointer(ssl)
            result = SSL_do_handshake(ptr)
            if result <= 0:
                if SSL_get_error(ptr, result) == SSL_ERROR_WANT_READ:
                    self._starved = True
                    self._drain()
                    if host.trace_on:
                        host.trace("SSL server handshake ERROR_WANT_READ")
                    return NEED_DATA
                raise_ssl_error(ssl, ptr, result)  # any error but WANT_READ
        except SSL.ZeroReturnError:
            host.trace("SSL server handshake ERROR_ZERO_RETURN")
            return self._fail((M_ERROR_ZERO_RETURN,), None, "ZERO_RETURN")
        except SSL.SysCallError as exc:
            _dbg_err("SSL server handshake ERROR_SYSCALL from %s: %s", host.remote_addr, exc)
            host.trace("SSL server handshake ERROR_SYSCALL: %s", exc)
            return self._fail((M_ERROR_SYSCALL,), None, str(exc))
        except SSL.Error as exc:
            self._drain()  # the alert OpenSSL queued
            _dbg_err("SSL server handshake ERROR_SSL from %s: %s", host.remote_addr, exc)
            host.trace("SSL server handshake ERROR_SSL: %s", exc)
            return self._fail(ssl_error_metrics(str(exc)), None, str(exc))
        self._drain()  # the last flight, session tickets
        if self.config.hooks.has(HookID.SSL_VERIFY_CLIENT) and ssl.get_peer_certificate() is not None:
            # pyOpenSSL cannot pause inside OpenSSL's verify callback: the SSL_VERIFY_CLIENT
            # hooks run once, for the leaf OpenSSL already checked, after the handshake.
            self._enter_hook(S.VERIFY_CLIENT)
            return self._step()
        return self._done()

    def _done(self) -> Done:
        self._to(S.DONE)
        ssl = self.ssl
        assert ssl is not None
        result = self._result = Done(ssl.get_alpn_proto_negotiated() or None)
        return result


class ClientHandshake(_Machine):
    """The origin side: ``do_handshake`` steps over an SSL.Connection the caller configured
    (context, SNI, connect state) on memory BIOs."""

    __slots__ = ()

    def __init__(self, host: HandshakeHost, ssl: SSL.Connection) -> None:
        super().__init__(host)
        self.ssl = ssl

    def receive_data(self, data: bytes) -> None:
        if data:
            ssl = self.ssl
            assert ssl is not None
            ssl.bio_write(data)
            self._new_input()

    def _step(self) -> Command:
        if self.state is S.START:
            self._to(S.HANDSHAKE)
        elif self.state is not S.HANDSHAKE:
            result = self._result
            assert result is not None
            return result
        host = self.host
        if self._starved:
            if self._eof:
                return self._fail((M_ERROR_SYSCALL,), None, "EOF")
            return NEED_DATA
        ssl = self.ssl
        assert ssl is not None
        try:
            ssl.do_handshake()
        except SSL.WantReadError:
            self._starved = True
            self._drain()
            return NEED_DATA
        except SSL.ZeroReturnError:
            return self._fail((M_ERROR_ZERO_RETURN,), None, "ZERO_RETURN")
        except SSL.SysCallError as exc:
            return self._fail((M_ERROR_SYSCALL,), None, str(exc))
        except SSL.Error as exc:
            self._drain()
            _dbg_err("SSL client handshake ERROR_SSL to %s: %s", host.remote_addr, exc)
            return self._fail((M_ERROR_SSL,), None, str(exc))
        self._drain()
        self._to(S.DONE)
        result = self._result = Done(ssl.get_alpn_proto_negotiated() or None)
        return result


__all__ = [
    "ALERT_ACCESS_DENIED",
    "ALERT_HANDSHAKE_FAILURE",
    "ALERT_UNRECOGNIZED_NAME",
    "NEED_DATA",
    "PAUSED",
    "ClientHandshake",
    "Command",
    "Done",
    "Fail",
    "HandshakeHost",
    "HandshakeState",
    "HandshakeStateError",
    "RunHook",
    "SSLAcceptConfig",
    "SendBytes",
    "ServerHandshake",
    "Tunnel",
    "alert_record",
    "set_read_ahead",
]
