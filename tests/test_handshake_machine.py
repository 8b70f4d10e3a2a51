"""The sans-IO TLS handshake machine (iocore/net/tls/handshake.py), h11 style: bytes in, commands
out, no sockets. A real client (the stdlib's SSLObject, or pyOpenSSL, over memory BIOs) talks to
the server machine; the test plays the driver: it hands the client's bytes over, returns the
machine's SendBytes to the client, and answers RunHook with hook_done."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trustme
from OpenSSL import SSL

from iocore.net.hooks import HookID, HookOp, HookRegistry
from iocore.net.ssl_cert_lookup import CertOpt, SSLCertContext, SSLCertLookup
from iocore.net.tls.handshake import (
    ALERT_HANDSHAKE_FAILURE,
    ALERT_UNRECOGNIZED_NAME,
    NEED_DATA,
    PAUSED,
    ClientHandshake,
    Command,
    Done,
    Fail,
    HandshakeState,
    HandshakeStateError,
    RunHook,
    SendBytes,
    ServerHandshake,
    SSLAcceptConfig,
    Tunnel,
)
from iocore.net.tls.metrics import (
    M_ERROR_SSL,
    M_ERROR_SYSCALL,
    M_NO_CERT,
    M_UA_OTHER,
    M_UA_VERIFY,
)

PROTOCOLS = (b"h2", b"http/1.1")
TLS_HOOKS = (HookID.VCONN_START, HookID.SSL_CLIENT_HELLO, HookID.SSL_SERVERNAME, HookID.SSL_CERT)


class Host:
    """What the VC is to the machine (HandshakeHost), plus what alpn_select reads."""

    def __init__(self) -> None:
        self.server_name: str | None = None
        self.client_hello: Any = None
        self.sni_policy: Any = None
        self.ssl_context: SSL.Context | None = None
        self.ssl: SSL.Connection | None = None
        self.remote_addr: tuple[Any, ...] = ("127.0.0.1", 40000)
        self.local_addr: tuple[Any, ...] = ("127.0.0.1", 4443)
        self.trace_on = False
        self.npn_set = PROTOCOLS
        self.config: Any = None
        self.traces: list[str] = []

    def trace(self, fmt: str, *args: Any) -> None:
        self.traces.append(fmt % args)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def alpn_select(conn: SSL.Connection, offered: list[bytes]) -> Any:
    """The server's preference among the host's protocols (what ssl_net_vconnection.alpn_select
    does for a VC; that one is compiled for SSLNetVConnection app data)."""
    host: Host = conn.get_app_data()
    return next((p for p in host.npn_set if p in offered), SSL.NO_OVERLAPPING_PROTOCOLS)


def server_ctx(ca: trustme.CA, *names: str, client_ca: bool = False) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ca.issue_cert(*(names or ("localhost",))).configure_cert(ctx)
    ctx.set_alpn_select_callback(alpn_select)
    if client_ca:
        ca.configure_trust(ctx)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return ctx


def make_config(
    ca: trustme.CA,
    hooks: HookRegistry | None = None,
    *,
    default: bool = True,
    client_ca: bool = False,
    **kw: Any,
) -> SSLAcceptConfig:
    lookup = SSLCertLookup()
    cc = SSLCertContext(server_ctx(ca, "localhost", client_ca=client_ca), source="test")
    lookup.insert_name("localhost", cc)
    if default:
        lookup.set_default(cc)
    return SSLAcceptConfig(
        lookup=lookup,
        hooks=hooks if hooks is not None else HookRegistry(),
        protocols=PROTOCOLS,
        handshake_timeout=5.0,
        tr_pass=kw.pop("tr_pass", False),
        tunnel_route=kw.pop("tunnel_route", "route.example:443"),
        on_ready=lambda vc: None,
        on_tunnel=lambda vc, replay, dest: None,
        **kw,
    )


def registry(*hook_ids: HookID) -> HookRegistry:
    hooks = HookRegistry()
    for hook in hook_ids:
        hooks.add(hook, lambda hook, vc: None)  # the machine only asks whether there are any
    return hooks


class Client:
    """The stdlib's TLS client over memory BIOs."""

    def __init__(
        self,
        ca: trustme.CA,
        sni: str | None = "localhost",
        alpn: tuple[str, ...] = ("h2", "http/1.1"),
        version: ssl.TLSVersion | None = None,
        cert: bool = False,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(ctx)
        if sni is None:
            ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if cert:
            ca.issue_cert("client.example").configure_cert(ctx)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        self.done = False

    def step(self) -> bytes:
        """Advance the client; what it wants to send."""
        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass
        return self.outgoing.read()


HookAnswer = Callable[[HookID], "tuple[HookOp, str | None] | None"]


def drive(
    m: ServerHandshake | ClientHandshake,
    to_peer: Callable[[bytes], None],
    data: bytes,
    hook: HookAnswer | None = None,
    log: list[Command] | None = None,
) -> Command:
    """Give ``data`` to the machine and run it until it waits or ends; returns that command.
    ``hook`` answers RunHook (None: leave the hook paused)."""
    if data:
        m.receive_data(data)
    while True:
        cmd = m.next_command()
        if log is not None:
            log.append(cmd)
        if isinstance(cmd, SendBytes):
            to_peer(cmd.data)
        elif isinstance(cmd, RunHook) and hook is not None:
            answer = hook(cmd.hook)
            if answer is None:
                continue  # the next command is PAUSED
            assert isinstance(m, ServerHandshake)
            m.hook_done(*answer)
        else:
            return cmd


def handshake(
    m: ServerHandshake, client: Client, hook: HookAnswer | None = None, chunk: int = 1 << 20
) -> tuple[Command, list[Command]]:
    """The client against the server machine until the machine's terminal command."""
    log: list[Command] = []
    cmd: Command = NEED_DATA
    for _ in range(50):
        out = client.step()
        if not out and cmd is NEED_DATA and client.done:
            break
        for i in range(0, max(len(out), 1), chunk):
            cmd = drive(m, client.incoming.write, out[i : i + chunk], hook, log)
            if cmd is not NEED_DATA:
                client.step()  # the flight that came with the end (tickets, an alert)
                return cmd, log
    return cmd, log


def default_hook(hook: HookID) -> tuple[HookOp, str | None]:
    return HookOp.DEFAULT, None


def hello_bytes(ca: trustme.CA, sni: str | None = "localhost") -> bytes:
    return Client(ca, sni).step()


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "alpn", "expected"),
    [
        (ssl.TLSVersion.TLSv1_3, ("h2", "http/1.1"), b"h2"),
        (ssl.TLSVersion.TLSv1_2, ("http/1.1",), b"http/1.1"),
    ],
)
def test_handshake_machine_full_handshake_reaches_done_with_alpn(
    ca: trustme.CA, version: ssl.TLSVersion, alpn: tuple[str, ...], expected: bytes
) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca))
    client = Client(ca, alpn=alpn, version=version)
    cmd, log = handshake(m, client)
    assert isinstance(cmd, Done) and cmd.protocol == expected
    assert m.state is HandshakeState.DONE and m.finished and m.result is cmd
    assert not any(isinstance(c, RunHook) for c in log)  # no plugin: no hook phase at all
    assert client.done and client.obj.selected_alpn_protocol() == expected.decode()
    assert host.server_name == "localhost" and host.ssl is m.ssl
    assert host.ssl is not None and host.ssl.get_protocol_version_name() == version.name.replace("_", ".")
    # Application data flows over the finished SSL object.
    client.obj.write(b"ping")
    host.ssl.bio_write(client.outgoing.read())
    assert host.ssl.recv(10) == b"ping"


def test_handshake_machine_client_hello_in_one_byte_chunks(ca: trustme.CA) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca))
    client = Client(ca)
    hello = client.step()
    for i, byte in enumerate(hello[:-1]):
        m.receive_data(hello[i : i + 1])
        assert m.next_command() is NEED_DATA, f"byte {i} of {len(hello)}"
        assert byte == hello[i]
        assert m.state is HandshakeState.READ_HELLO and m.ssl is None
    m.receive_data(hello[-1:])
    first = m.next_command()
    assert isinstance(first, SendBytes)  # the server's flight
    assert host.client_hello is not None and host.server_name == "localhost"
    client.incoming.write(first.data)
    assert m.next_command() is NEED_DATA
    cmd, _ = handshake(m, client, chunk=1)
    assert isinstance(cmd, Done) and cmd.protocol == b"h2"


def test_handshake_machine_hooks_in_order_and_waits_for_each(ca: trustme.CA) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca, registry(*TLS_HOOKS)))
    client = Client(ca)
    hello = client.step()
    seen: list[tuple[HookID, Any, Any]] = []
    first = m.next_command()
    assert isinstance(first, RunHook) and first.hook is HookID.VCONN_START
    assert m.state is HandshakeState.VCONN_START
    # The machine waits: PAUSED however often it is asked, and it reads nothing meanwhile.
    for _ in range(3):
        assert m.next_command() is PAUSED
    m.receive_data(hello)  # bytes arriving during a pause are kept for later
    assert m.next_command() is PAUSED and host.client_hello is None
    m.hook_done(HookOp.DEFAULT)
    with pytest.raises(HandshakeStateError):
        m.hook_done(HookOp.DEFAULT)  # once per RunHook
    for expected in TLS_HOOKS[1:]:
        cmd = m.next_command()
        assert isinstance(cmd, RunHook) and cmd.hook is expected
        seen.append((cmd.hook, host.client_hello is not None, m.cert_context))
        assert m.next_command() is PAUSED
        m.hook_done(HookOp.DEFAULT)
    # The hello is known from CLIENT_HELLO on; the certificate is chosen before SERVERNAME.
    assert [s[0] for s in seen] == list(TLS_HOOKS[1:])
    assert seen[0][1] and seen[0][2] is None
    assert seen[1][2] is not None and seen[1][2].source == "test"
    cmd, _ = handshake(m, client, default_hook)
    assert isinstance(cmd, Done) and cmd.protocol == b"h2"


def test_handshake_machine_run_hook_commands_name_the_phases(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(*TLS_HOOKS)))
    cmd, log = handshake(m, Client(ca), default_hook)
    assert isinstance(cmd, Done)
    assert [c.hook for c in log if isinstance(c, RunHook)] == list(TLS_HOOKS)


def test_handshake_machine_skips_phases_without_hooks(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(HookID.SSL_CERT)))
    cmd, log = handshake(m, Client(ca), default_hook)
    assert isinstance(cmd, Done)
    assert [c.hook for c in log if isinstance(c, RunHook)] == [HookID.SSL_CERT]


@pytest.mark.parametrize("phase", TLS_HOOKS)
def test_handshake_machine_tunnel_request_at_each_phase(ca: trustme.CA, phase: HookID) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(*TLS_HOOKS)))
    client = Client(ca)
    hello = client.step()

    def hook(h: HookID) -> tuple[HookOp, str | None]:
        return (HookOp.TUNNEL, "plugin.example:8443") if h is phase else (HookOp.DEFAULT, None)

    cmd = drive(m, client.incoming.write, b"", hook)
    if phase is not HookID.VCONN_START:
        assert cmd is NEED_DATA
        cmd = drive(m, client.incoming.write, hello, hook)
    assert isinstance(cmd, Tunnel) and cmd.destination == "plugin.example:8443"
    assert cmd.replay == (b"" if phase is HookID.VCONN_START else hello)  # what the client sent
    assert m.state is HandshakeState.TUNNEL and m.ssl is None
    assert m.next_command() is cmd  # terminal commands repeat


def test_handshake_machine_tunnel_defaults_to_tunnel_route(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(HookID.SSL_SERVERNAME)))
    cmd, _ = handshake(m, Client(ca), lambda h: (HookOp.TUNNEL, None))
    assert isinstance(cmd, Tunnel) and cmd.destination == "route.example:443"


@pytest.mark.parametrize("phase", TLS_HOOKS)
def test_handshake_machine_terminate_at_each_phase(ca: trustme.CA, phase: HookID) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca, registry(*TLS_HOOKS)))

    def hook(h: HookID) -> tuple[HookOp, str | None]:
        return (HookOp.TERMINATE, None) if h is phase else (HookOp.DEFAULT, None)

    cmd, log = handshake(m, Client(ca), hook)
    assert isinstance(cmd, Fail) and cmd.metrics == () and cmd.alert is None
    assert m.state is HandshakeState.FAILED and m.ssl is None
    assert [c.hook for c in log if isinstance(c, RunHook)] == list(TLS_HOOKS[: TLS_HOOKS.index(phase) + 1])


def test_handshake_machine_verify_client_hook_sees_the_certificate(ca: trustme.CA) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca, registry(HookID.SSL_VERIFY_CLIENT), client_ca=True))
    peers: list[Any] = []

    def hook(h: HookID) -> tuple[HookOp, str | None] | None:
        assert host.ssl is not None
        peers.append(host.ssl.get_peer_certificate())
        return None  # paused

    cmd, _ = handshake(m, Client(ca, cert=True), hook)
    assert cmd is PAUSED and m.state is HandshakeState.VERIFY_CLIENT
    assert peers and peers[0] is not None
    m.hook_done(HookOp.TUNNEL)  # too late for a tunnel: ignored
    done = m.next_command()
    assert isinstance(done, Done) and done.protocol == b"h2"


def test_handshake_machine_verify_client_terminate_counts_verify_failed(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(HookID.SSL_VERIFY_CLIENT), client_ca=True))
    cmd, _ = handshake(m, Client(ca, cert=True), lambda h: (HookOp.TERMINATE, None))
    assert isinstance(cmd, Fail) and cmd.metrics == (M_UA_VERIFY,)


def test_handshake_machine_verify_client_not_run_without_certificate(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, registry(HookID.SSL_VERIFY_CLIENT)))
    cmd, log = handshake(m, Client(ca), default_hook)
    assert isinstance(cmd, Done) and not any(isinstance(c, RunHook) for c in log)


def _openssl_answer(ca: trustme.CA, data: bytes) -> bytes:
    """What a bare pyOpenSSL server over memory BIOs sends back for ``data``."""
    conn = SSL.Connection(server_ctx(ca), None)
    conn.set_accept_state()
    conn.bio_write(data)
    with pytest.raises(SSL.Error):
        conn.do_handshake()
    return conn.bio_read(1 << 16)


def test_handshake_machine_garbage_fails_with_openssl_parity_alert(ca: trustme.CA) -> None:
    # A handshake record that is no ClientHello (a ServerHello type): the pre-parser leaves it
    # to OpenSSL, which answers with its alert; the machine sends exactly that.
    garbage = bytes((22, 3, 1, 0, 6, 2, 0, 0, 2, 0, 0))
    host = Host()
    m = ServerHandshake(host, make_config(ca))
    log: list[Command] = []
    sent: list[bytes] = []
    cmd = drive(m, sent.append, garbage, None, log)
    assert isinstance(cmd, Fail) and cmd.metrics[0] == M_ERROR_SSL and len(cmd.metrics) == 2
    assert cmd.alert is None  # OpenSSL sent its own
    assert b"".join(sent) == _openssl_answer(ca, garbage)
    assert sent and sent[0][0] == 21  # an alert record
    assert host.client_hello is None  # no hook could have read a hello


def test_handshake_machine_oversized_record_refused_with_alert(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca))
    cmd = drive(m, lambda b: None, bytes((22, 3, 1, 0x40, 0x01)) + b"\x01" * 16)
    assert isinstance(cmd, Fail) and cmd.metrics == (M_ERROR_SSL, M_UA_OTHER)
    assert cmd.alert == 22  # record_overflow, as OpenSSL
    assert m.ssl is None


def test_handshake_machine_eof_mid_handshake_counts_syscall(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca))
    client = Client(ca)
    cmd = drive(m, client.incoming.write, client.step())
    assert cmd is NEED_DATA and m.state is HandshakeState.HANDSHAKE
    m.receive_eof()
    cmd = m.next_command()
    assert isinstance(cmd, Fail) and cmd.metrics == (M_ERROR_SYSCALL,) and cmd.alert is None


def test_handshake_machine_eof_before_hello_counts_nothing(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca))
    m.receive_data(hello_bytes(ca)[:10])
    assert m.next_command() is NEED_DATA
    m.receive_eof()
    cmd = m.next_command()
    assert isinstance(cmd, Fail) and cmd.metrics == ()


@pytest.mark.parametrize(
    ("sni", "alert"), [("nowhere.example", ALERT_UNRECOGNIZED_NAME), (None, ALERT_HANDSHAKE_FAILURE)]
)
def test_handshake_machine_no_certificate_fails_with_alert(
    ca: trustme.CA, sni: str | None, alert: int
) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca, default=False))
    cmd = drive(m, lambda b: None, hello_bytes(ca, sni))
    assert isinstance(cmd, Fail) and cmd.metrics == (M_NO_CERT, M_ERROR_SSL) and cmd.alert == alert
    assert host.server_name == sni


def test_handshake_machine_cert_hook_sets_its_own_context(ca: trustme.CA) -> None:
    host = Host()
    m = ServerHandshake(host, make_config(ca, registry(HookID.SSL_CERT)))
    other = server_ctx(ca, "localhost", "other.example")

    def hook(h: HookID) -> tuple[HookOp, str | None]:
        host.ssl_context = other  # what VConn.set_ssl_context does
        return HookOp.DEFAULT, None

    cmd, _ = handshake(m, Client(ca), hook)
    assert isinstance(cmd, Done)
    assert host.ssl is not None and host.ssl.get_context() is other


def test_handshake_machine_multicert_tunnel_action(ca: trustme.CA) -> None:
    cfg = make_config(ca)
    cfg.lookup.insert_name("tunnel.example", SSLCertContext(None, CertOpt.TUNNEL, "backend.example:443"))
    hello = hello_bytes(ca, "tunnel.example")
    cmd = drive(ServerHandshake(Host(), cfg), lambda b: None, hello)
    assert isinstance(cmd, Tunnel) and cmd.destination == "backend.example:443" and cmd.replay == hello


def test_handshake_machine_tr_pass_tunnels_non_tls(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca, tr_pass=True))
    cmd = drive(m, lambda b: None, b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(cmd, Tunnel) and cmd.replay == b"GET / HTTP/1.1\r\n\r\n"
    assert cmd.destination == "route.example:443"


def test_handshake_machine_illegal_transition_raises(ca: trustme.CA) -> None:
    m = ServerHandshake(Host(), make_config(ca))
    with pytest.raises(HandshakeStateError, match="START -> DONE"):
        m._to(HandshakeState.DONE)
    with pytest.raises(HandshakeStateError, match="no hook running"):
        m.hook_done(HookOp.DEFAULT)
    cmd = drive(m, lambda b: None, b"\x16\x03\x01\x40\x01" + b"\x00" * 8)
    assert isinstance(cmd, Fail)
    with pytest.raises(HandshakeStateError, match="FAILED -> HANDSHAKE"):
        m._to(HandshakeState.HANDSHAKE)


def test_handshake_machine_client_side_against_server_machine(ca: trustme.CA) -> None:
    server = ServerHandshake(Host(), make_config(ca, registry(*TLS_HOOKS)))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ca.configure_trust(ctx)
    ctx.set_verify(SSL.VERIFY_PEER)
    ctx.set_alpn_protos([b"http/1.1"])
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    client_host = Host()
    client_host.ssl = conn
    client = ClientHandshake(client_host, conn)
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    c_cmd: Command = NEED_DATA
    s_cmd: Command = NEED_DATA
    for _ in range(20):
        c_cmd = drive(client, to_server.append, b"".join(to_client))
        to_client.clear()
        s_cmd = drive(server, to_client.append, b"".join(to_server), default_hook)
        to_server.clear()
        if isinstance(c_cmd, Done) and isinstance(s_cmd, Done):
            break
    assert isinstance(c_cmd, Done) and c_cmd.protocol == b"http/1.1"
    assert isinstance(s_cmd, Done) and s_cmd.protocol == b"http/1.1"
    assert client.state is HandshakeState.DONE


def test_handshake_machine_client_side_fails_on_untrusted_server(ca: trustme.CA) -> None:
    server = ServerHandshake(Host(), make_config(ca))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    trustme.CA().configure_trust(ctx)  # another CA
    ctx.set_verify(SSL.VERIFY_PEER)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    client = ClientHandshake(Host(), conn)
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    c_cmd: Command = NEED_DATA
    for _ in range(10):
        c_cmd = drive(client, to_server.append, b"".join(to_client))
        to_client.clear()
        if isinstance(c_cmd, Fail):
            break
        drive(server, to_client.append, b"".join(to_server))
        to_server.clear()
    assert isinstance(c_cmd, Fail) and c_cmd.metrics == (M_ERROR_SSL,)
    assert "certificate verify failed" in c_cmd.reason
    assert to_server and to_server[-1][0] == 21  # the alert OpenSSL queued went out first
