"""Issue 15: the ClientHello pre-parser is never stricter than OpenSSL and never answers for it.

Differential tests: the same bytes, cut into the same pieces, go to (a) the proxy's sans-IO
handshake machine (ClientHelloParser; on a hello, or on "not mine", an SSL.Connection built by
build_server_context gets every buffered byte; a ClientHelloRefused sends its alert) and (b) a
bare pyOpenSSL server over memory BIOs with the same RSA-2048 certificate and nginx's default
cipher list. The outcome must be the same: the handshake proceeds (a ServerHello comes back),
the same fatal alert, or a close without an alert. The hellos are real (tests/data/client_hellos
and hellos OpenSSL writes now through memory BIOs), mutated by hypothesis: record and legacy
versions, supported_versions, re-fragmentation with empty and interleaved records, sizes up to
the cap, byte flips. Then the same cases against the real ``tsproxy`` over a socket.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import ProxyProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from test_client_hello import RAW, frame, handshake_message, v8, v16

from iocore.net.hooks import HookRegistry
from iocore.net.ssl_cert_lookup import SSLCertContext, SSLCertLookup
from iocore.net.ssl_config import SSLConfigParams
from iocore.net.tls.client_hello import MAX_CLIENT_HELLO
from iocore.net.tls.context import CertKeyPair, build_server_context
from iocore.net.tls.handshake import Done, Fail, SendBytes, ServerHandshake, SSLAcceptConfig

NGINX_CIPHERS = "HIGH:!aNULL:!MD5"


@dataclass(frozen=True)
class Cert:
    path: Path  # key + chain PEM


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    ca = trustme.CA()
    leaf = ca.issue_cert("conformance.test", key_type=trustme.KeyType.RSA)  # RSA-2048
    path = tmp_path_factory.mktemp("conformance") / "leaf.pem"
    path.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    return Cert(path)


def proxy_context(cert: Cert) -> SSL.Context:
    params = SSLConfigParams.from_records(
        {"proxy.config.ssl.server.cipher_suite": NGINX_CIPHERS}, cert.path.parent
    )
    return build_server_context(params, [CertKeyPair(cert.path, cert.path)], None, None)


def bare_context(cert: Cert) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)  # nginx's default ssl_protocols
    ctx.set_cipher_list(NGINX_CIPHERS.encode())
    ctx.use_certificate_chain_file(str(cert.path))
    ctx.use_privatekey_file(str(cert.path))
    return ctx


Outcome = tuple[str, int]  # ("proceeds", 0) / ("alert", description) / ("closed", 0) / ("wants", 0)


def _step(conn: SSL.Connection) -> Outcome | None:
    """One do_handshake; an outcome once the server has answered, None while it waits."""
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        out = _pending(conn)
        return ("proceeds", 0) if out[:1] == b"\x16" else None
    except SSL.Error:
        out = _pending(conn)
        if len(out) >= 7 and out[0] == 21:
            return ("alert", out[6])
        return ("closed", 0)
    return ("proceeds", 0)


def _pending(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(1 << 20)
    except SSL.WantReadError:
        return b""


def bare_outcome(ctx: SSL.Context, pieces: list[bytes]) -> Outcome:
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    for piece in pieces:
        conn.bio_write(piece)
        result = _step(conn)
        if result is not None:
            return result
    return ("wants", 0)


class _Host:
    """The VC as the handshake machine sees it (HandshakeHost)."""

    def __init__(self) -> None:
        self.server_name: str | None = None
        self.client_hello: object = None
        self.sni_policy: object = None
        self.ssl_context: SSL.Context | None = None
        self.ssl: SSL.Connection | None = None
        self.remote_addr: tuple[object, ...] = ()
        self.local_addr: tuple[object, ...] = ()
        self.trace_on = False

    def trace(self, fmt: str, *args: object) -> None:
        pass


def proxy_outcome(
    ctx: SSL.Context, pieces: list[bytes], max_size: int = MAX_CLIENT_HELLO
) -> tuple[Outcome, bool]:
    """The proxy's handshake machine (iocore/net/tls/handshake.py), fed piece by piece: it
    parses until a hello, a refusal (its own raw alert) or a hand-over; then OpenSSL gets
    everything buffered and the rest. The flag says whether the pre-parser read the hello (so
    the hooks ran and SNI chose the certificate)."""
    lookup = SSLCertLookup()
    lookup.set_default(SSLCertContext(ctx, source="conformance"))
    config = SSLAcceptConfig(
        lookup=lookup,
        hooks=HookRegistry(),
        protocols=(),
        handshake_timeout=0.0,
        tr_pass=False,
        tunnel_route=None,
        on_ready=lambda vc: None,
        on_tunnel=lambda vc, replay, dest: None,
        max_client_hello=max_size,
    )
    host = _Host()
    machine = ServerHandshake(host, config)
    for piece in pieces:
        machine.receive_data(piece)
        sent = b""
        cmd = machine.next_command()
        while isinstance(cmd, SendBytes):
            sent += cmd.data
            cmd = machine.next_command()
        parsed = host.client_hello is not None
        if isinstance(cmd, Fail):
            if cmd.alert is not None:
                return ("alert", cmd.alert), parsed
            if len(sent) >= 7 and sent[0] == 21:
                return ("alert", sent[6]), parsed
            return ("closed", 0), parsed
        if isinstance(cmd, Done) or sent[:1] == b"\x16":
            return ("proceeds", 0), parsed
    return ("wants", 0), host.client_hello is not None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


# --- hellos --------------------------------------------------------------------------------------


def openssl_hellos() -> dict[str, bytes]:
    """ClientHellos OpenSSL writes now (pyOpenSSL and the stdlib over memory BIOs)."""
    out: dict[str, bytes] = {}
    for name, (lo, hi) in {
        "pyopenssl-tls13": (SSL.TLS1_3_VERSION, 0),
        "pyopenssl-tls12": (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
    }.items():
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(lo)
        if hi:
            ctx.set_max_proto_version(hi)
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"conformance.test")
        with pytest.raises(SSL.WantReadError):
            conn.do_handshake()
        out[name] = conn.bio_read(1 << 16)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sctx.check_hostname = False
    sctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = sctx.wrap_bio(incoming, outgoing, server_hostname="conformance.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    out["stdlib"] = outgoing.read()
    return out


HELLOS: dict[str, bytes] = {**RAW, **openssl_hellos()}
MESSAGES = {name: handshake_message(raw) for name, raw in HELLOS.items()}


def _extensions_offset(msg: bytes) -> int:
    """Offset (in the message, header included) of the extensions block's length field."""
    pos = 4 + 2 + 32
    pos += 1 + msg[pos]
    pos += 2 + int.from_bytes(msg[pos : pos + 2], "big")
    return pos + 1 + msg[pos]


def _replace_extension(msg: bytes, ext_type: int, data: bytes | None) -> bytes:
    """The message with extension ``ext_type``'s data replaced (added at the end if absent,
    removed if ``data`` is None). A message an earlier mutation made unreadable (a flipped
    length byte) comes back unchanged."""
    try:
        ext_at = _extensions_offset(msg)
    except IndexError:
        return msg
    if ext_at + 2 > len(msg):
        return msg
    exts = msg[ext_at + 2 :]
    out, found, i = b"", False, 0
    while i + 4 <= len(exts):
        t = int.from_bytes(exts[i : i + 2], "big")
        n = int.from_bytes(exts[i + 2 : i + 4], "big")
        d = exts[i + 4 : i + 4 + n]
        i += 4 + n
        if t == ext_type:
            found = True
            if data is None:
                continue
            d = data
        out += t.to_bytes(2, "big") + v16(d)
    if not found and data is not None:
        out += ext_type.to_bytes(2, "big") + v16(data)
    body = msg[4:ext_at] + v16(out)
    return b"\x01" + len(body).to_bytes(3, "big") + body


@st.composite
def mutated_hello(draw: st.DrawFn) -> bytes:
    """A real hello, its message mutated, then framed into records in arbitrary ways."""
    msg = MESSAGES[draw(st.sampled_from(sorted(MESSAGES)))]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["legacy", "versions", "drop-versions", "flip", "pad"]))
        if op == "legacy":
            msg = msg[:4] + draw(st.binary(min_size=2, max_size=2)) + msg[6:]
        elif op == "versions":
            versions = draw(
                st.lists(
                    st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303, 0x0304, 0x0305, 0x7F1C, 0x0A0A, 0xFEFD])
                    | st.integers(0, 0xFFFF),
                    max_size=6,
                )
            )
            msg = _replace_extension(msg, 43, v8(b"".join(v.to_bytes(2, "big") for v in versions)))
        elif op == "drop-versions":
            msg = _replace_extension(msg, 43, None)
        elif op == "pad":
            msg = _replace_extension(msg, 21, bytes(draw(st.integers(0, 3000))))
        else:
            i = draw(st.integers(0, len(msg) - 1))
            msg = msg[:i] + bytes([msg[i] ^ (1 << draw(st.integers(0, 7)))]) + msg[i + 1 :]
    # framing: record sizes, record versions, empty records, an interleaved record
    size = draw(st.sampled_from([2**14, 1, 2, 5, 37, 100, 300]) | st.integers(1, 2**14))
    version = draw(st.sampled_from([0x0301, 0x0303, 0x0300, 0x0304, 0x03FF]) | st.integers(0, 0xFFFF))
    records = [
        bytes([22]) + version.to_bytes(2, "big") + len(f).to_bytes(2, "big") + f
        for f in (msg[i : i + size] for i in range(0, len(msg), size))
    ]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(records)))
        n_empty = draw(st.sampled_from([1, 2, 32, 33]))
        records[at:at] = [b"\x16\x03\x01\x00\x00"] * n_empty
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(records)))
        rtype = draw(st.sampled_from([20, 21, 23, 24, 0x80, 0]))
        payload = draw(st.binary(min_size=0, max_size=4))
        records.insert(at, bytes([rtype, 3, 3]) + len(payload).to_bytes(2, "big") + payload)
    return b"".join(records)


CUTS = st.lists(st.integers(0, 2**17), max_size=8)
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def contexts(cert: Cert) -> tuple[SSL.Context, SSL.Context]:
    return proxy_context(cert), bare_context(cert)


def assert_same(contexts: tuple[SSL.Context, SSL.Context], data: bytes, cuts: list[int]) -> Outcome:
    pieces = split(data, cuts)
    (ours, parsed), bare = proxy_outcome(contexts[0], pieces), bare_outcome(contexts[1], pieces)
    assert ours == bare, f"proxy {ours} vs OpenSSL {bare} for {data[:64].hex()}..."
    # never stricter: whatever OpenSSL takes, the pre-parser read (the hooks and SNI ran)
    assert parsed or ours != ("proceeds", 0), f"handed over a hello OpenSSL takes: {data[:64].hex()}..."
    return ours


# --- fixed cases ---------------------------------------------------------------------------------

TLS13 = MESSAGES["openssl_s_client_tls13"]
TLS12 = MESSAGES["openssl_s_client_tls12"]


def grow(msg: bytes, size: int) -> bytes:
    """A real hello message grown to ``size`` bytes (header included): an unknown extension
    padded out to fill the 2^16 - 1 extensions vector, then unknown cipher suites (the cipher
    vector holds 65534 bytes), then extra compression methods (255)."""
    pos = 4 + 2 + 32
    head_end = pos + 1 + msg[pos]
    n_ciphers = int.from_bytes(msg[head_end : head_end + 2], "big")
    ciphers = msg[head_end + 2 : head_end + 2 + n_ciphers]
    pos = head_end + 2 + n_ciphers
    methods = msg[pos + 1 : pos + 1 + msg[pos]]
    exts = msg[pos + 1 + msg[pos] + 2 :]
    session_id = msg[4 + 2 + 32 + 1 : head_end]
    room = size - len(msg) - 4  # the new extension's header
    pad = min(room, 65535 - len(exts) - 4)
    room -= pad
    grown_id = min(room, 32 - len(session_id))
    session_id += bytes(range(grown_id))
    room -= grown_id
    extra_ciphers = min(room - room % 2, 65534 - len(ciphers))
    room -= extra_ciphers
    assert room <= 255 - len(methods), "larger than a ClientHello can be"
    ciphers += b"".join((0xFE00 + i % 256).to_bytes(2, "big") for i in range(extra_ciphers // 2))
    methods += bytes(range(1, 1 + room))
    exts += b"\xfa\x00" + v16(bytes(pad))
    body = msg[4 : 4 + 2 + 32] + v8(session_id) + v16(ciphers) + v8(methods) + v16(exts)
    out = b"\x01" + len(body).to_bytes(3, "big") + body
    assert len(out) == size, (len(out), size)
    return out


def _legacy(msg: bytes, version: int) -> bytes:
    return msg[:4] + version.to_bytes(2, "big") + msg[6:]


CASES: dict[str, tuple[bytes, Outcome]] = {
    "record-0x0305": (frame(TLS13, version=0x0305), ("proceeds", 0)),
    "record-0x03ff": (frame(TLS13, version=0x03FF), ("proceeds", 0)),
    "record-major-2": (frame(TLS13, version=0x0200), ("closed", 0)),
    "record-major-4": (frame(TLS13, version=0x0400), ("closed", 0)),
    "legacy-0x0400-tls13": (frame(_legacy(TLS13, 0x0400)), ("proceeds", 0)),
    "legacy-0x0400-tls12": (frame(_legacy(TLS12, 0x0400)), ("proceeds", 0)),
    "legacy-0x0200-tls12": (frame(_legacy(TLS12, 0x0200)), ("alert", 70)),  # protocol_version
    "legacy-0x0300-tls12": (frame(_legacy(TLS12, 0x0300)), ("alert", 70)),
    "no-version-overlap": (frame(_replace_extension(TLS13, 43, v8(b"\x7f\x1c\x03\x05"))), ("alert", 70)),
    "record-2^14+1": (b"\x16\x03\x01\x40\x01" + bytes(2**14 + 1), ("alert", 22)),  # record_overflow
    "record-65535": (b"\x16\x03\x01\xff\xff" + bytes(100), ("alert", 22)),
    "hello-70000": (frame(grow(TLS13, 70_000)), ("proceeds", 0)),
    # (TLS 1.2: the last 255 bytes are compression methods, which TLS 1.3 forbids)
    "hello-at-cap": (frame(grow(TLS12, MAX_CLIENT_HELLO + 4)), ("proceeds", 0)),
    "hello-over-cap": (frame(b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")), ("alert", 47)),
    "not-a-client-hello": (frame(b"\x02" + TLS13[1:]), ("alert", 10)),  # unexpected_message
    "ccs-interleaved": (frame(TLS13[:40]) + b"\x14\x03\x03\x00\x01\x01" + frame(TLS13[40:]), ("alert", 10)),
    "alert-interleaved": (
        frame(TLS13[:40]) + b"\x15\x03\x03\x00\x02\x01\x5a" + frame(TLS13[40:]),
        ("alert", 10),
    ),
    "appdata-first": (b"\x17\x03\x03\x00\x05hello", ("alert", 10)),
    "empty-records": (b"\x16\x03\x01\x00\x00" * 32 + frame(TLS13), ("proceeds", 0)),
    "empty-ccs-first": (b"\x14\x03\x03\x00\x00" + frame(TLS13), ("proceeds", 0)),
    "empty-ccs-in-header": (frame(TLS13[:3]) + b"\x14\x03\x03\x00\x00" + frame(TLS13[3:]), ("proceeds", 0)),
    "empty-ccs-after-header": (frame(TLS13[:4]) + b"\x14\x03\x03\x00\x00" + frame(TLS13[4:]), ("alert", 10)),
    "ccs-first": (b"\x14\x03\x03\x00\x01\x01" + frame(TLS13), ("alert", 10)),
    "33-empty-records": (b"\x16\x03\x01\x00\x00" * 33 + frame(TLS13), ("alert", 10)),
    "duplicate-unknown-extension": (
        frame(
            _replace_extension(_replace_extension(TLS13, 0x1234, b""), 0x1235, b"").replace(
                b"\x12\x35", b"\x12\x34"
            )
        ),
        ("proceeds", 0),
    ),
    "sni-not-ascii": (
        frame(_replace_extension(TLS12, 0, v16(b"\x00" + v16("bücher.test".encode())))),
        ("proceeds", 0),
    ),
    "sni-nul": (frame(_replace_extension(TLS12, 0, v16(b"\x00" + v16(b"a\x00b")))), ("alert", 112)),
    "bad-key-share-in-tls12": (
        frame(_replace_extension(TLS12, 51, v16(b"\x00\x1d" + v16(b"")))),
        ("proceeds", 0),
    ),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ("closed", 0)),
    "sslv2": (
        bytes.fromhex("802e0100020015000000100700c0050080030080010080080080060040040080") + bytes(16),
        ("closed", 0),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_fixed_cases_answer_as_openssl(contexts: tuple[SSL.Context, SSL.Context], name: str) -> None:
    data, expected = CASES[name]
    assert assert_same(contexts, data, []) == expected


@pytest.mark.parametrize("name", sorted(HELLOS))
def test_fragmented_at_every_byte(contexts: tuple[SSL.Context, SSL.Context], name: str) -> None:
    """Every split point of every real hello (two pieces), and byte by byte: the handshake."""
    data = HELLOS[name]
    for cut in range(1, len(data), 1 if len(data) < 600 else 7):
        assert assert_same(contexts, data, [cut]) == ("proceeds", 0), cut
    assert assert_same(contexts, data, list(range(1, len(data)))) == ("proceeds", 0)


# --- properties ------------------------------------------------------------------------------------


@FAST
@given(mutated_hello(), CUTS)
def test_mutated_hellos_answer_as_openssl(
    contexts: tuple[SSL.Context, SSL.Context], data: bytes, cuts: list[int]
) -> None:
    assert_same(contexts, data, cuts)


@FAST
@given(st.sampled_from(sorted(HELLOS)), st.integers(1, 20), CUTS)
def test_record_boundaries_never_matter(
    contexts: tuple[SSL.Context, SSL.Context], name: str, size: int, cuts: list[int]
) -> None:
    data = frame(MESSAGES[name], size)
    assert assert_same(contexts, data, cuts) == ("proceeds", 0)


@FAST
@given(st.sampled_from(sorted(MESSAGES)), st.integers(0, MAX_CLIENT_HELLO), st.booleans())
def test_sizes_up_to_the_cap(
    contexts: tuple[SSL.Context, SSL.Context], name: str, grown: int, fragmented: bool
) -> None:
    msg = MESSAGES[name]
    size = max(len(msg) + 4, min(grown, MAX_CLIENT_HELLO + 4 - 300) + 300)
    data = frame(grow(msg, size), 2**14 if not fragmented else 1000)
    outcome = assert_same(contexts, data, [len(data) // 3])
    if size <= 65000:  # only the padding extension grew (TLS 1.3 refuses extra compression methods)
        assert outcome == ("proceeds", 0)


@pytest.mark.slow
@SLOW
@given(mutated_hello(), CUTS)
def test_mutated_hellos_answer_as_openssl_long(
    contexts: tuple[SSL.Context, SSL.Context], data: bytes, cuts: list[int]
) -> None:
    assert_same(contexts, data, cuts)


# --- the real proxy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy_files(cert: Cert) -> dict[str, str | bytes]:
    return {
        "certs/leaf.pem": cert.path.read_bytes(),
        "ssl_multicert.config": "dest_ip=* ssl_cert_name=certs/leaf.pem\n",
    }


@pytest.fixture
def live_proxy(
    tsproxy_factory: Callable[..., ProxyProcess], proxy_files: dict[str, str | bytes]
) -> ProxyProcess:
    return tsproxy_factory(
        records={
            "proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1",
            "proxy.config.ssl.server.cert.path": ".",
            "proxy.config.ssl.server.private_key.path": ".",
            "proxy.config.ssl.server.cipher_suite": NGINX_CIPHERS,
        },
        files=proxy_files,
    )


def wire_outcome(port: int, data: bytes) -> Outcome:
    """What the proxy answers on the wire to ``data``: its first record, or a close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        try:
            while len(got) < 7:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
    if got[:1] == b"\x16" and got[5:6] == b"\x02":
        return ("proceeds", 0)
    if len(got) >= 7 and got[0] == 21:
        return ("alert", got[6])
    return ("closed", 0) if not got else ("wants", got[0])


def test_the_live_proxy_answers_as_openssl(
    live_proxy: ProxyProcess, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    port = live_proxy.port(0)
    for name, (data, expected) in CASES.items():
        assert bare_outcome(contexts[1], [data]) == expected, name
        assert wire_outcome(port, data) == expected, name


HANDED_OVER = [
    "record-major-2",
    "not-a-client-hello",
    "ccs-interleaved",
    "appdata-first",
    "33-empty-records",
    "http",
]


def test_handed_over_bytes_get_openssls_answer_without_a_default_certificate(
    tsproxy_factory: Callable[..., ProxyProcess], proxy_files: dict[str, str | bytes]
) -> None:
    """No certificate for the address (only a named one): bytes the pre-parser hands over still
    get OpenSSL's answer, from the certificate-less context, not an alert of the proxy's."""
    files = {**proxy_files, "ssl_multicert.config": "ssl_cert_name=certs/leaf.pem\n"}
    proxy = tsproxy_factory(
        records={
            "proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1",
            "proxy.config.ssl.server.cert.path": ".",
            "proxy.config.ssl.server.private_key.path": ".",
        },
        files=files,
    )
    for name in HANDED_OVER:
        data, expected = CASES[name]
        assert wire_outcome(proxy.port(0), data) == expected, name
