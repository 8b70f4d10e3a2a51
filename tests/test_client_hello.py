"""ClientHelloParser against real captured hellos, re-framed hellos, junk and fuzz.

The captures in tests/data/client_hellos/ come from openssl s_client, Python's ssl and
pyOpenSSL (whose OpenSSL sends a ~1.5 KiB post-quantum hello, the ATS 11758 case); see the
README there for how to regenerate them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iocore.net.tls.client_hello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloParser,
    looks_like_tls_handshake,
)
from iocore.net.tls.errors import ClientHelloRefused, TLSError, TLSProtocolError

DATA = Path(__file__).parent / "data" / "client_hellos"
X25519MLKEM768 = 0x11EC
X25519 = 0x001D


def _load(name: str) -> bytes:
    return (DATA / f"{name}.bin").read_bytes()


# name -> (SNI, ALPN, supported_versions, max_version)
CAPTURES: dict[str, tuple[str, tuple[bytes, ...], tuple[int, ...], int]] = {
    "openssl_s_client_tls13": ("example.com", (b"h2", b"http/1.1"), (0x0304,), 0x0304),
    "openssl_s_client_tls12": ("example.com", (b"h2", b"http/1.1"), (), 0x0303),
    "python_ssl": ("python.example.com", (b"h2", b"http/1.1"), (0x0304, 0x0303), 0x0304),
    "pyopenssl_mlkem": ("pq.example.com", (b"h2", b"http/1.1"), (0x0304, 0x0303), 0x0304),
}
RAW = {name: _load(name) for name in CAPTURES}


def parse(data: bytes, **kw: int) -> ClientHello | None:
    return ClientHelloParser(**kw).feed(data)


def parse_in_chunks(chunks: list[bytes]) -> ClientHello | None:
    p = ClientHelloParser()
    result = None
    for i, chunk in enumerate(chunks):
        result = p.feed(chunk)
        if result is not None:
            assert i == len(chunks) - 1 or not b"".join(chunks[i + 1 :]), "parser finished early"
            break
    return result


# --- building hellos -------------------------------------------------------------------------


def handshake_message(record_stream: bytes) -> bytes:
    """The handshake bytes carried by a stream of TLS records."""
    out, pos = b"", 0
    while pos < len(record_stream):
        n = int.from_bytes(record_stream[pos + 3 : pos + 5], "big")
        out += record_stream[pos + 5 : pos + 5 + n]
        pos += 5 + n
    return out


def frame(message: bytes, size: int = 2**14, version: int = 0x0301, rtype: int = 22) -> bytes:
    """Split a handshake message into TLS records of at most `size` bytes of payload."""
    out = b""
    for i in range(0, len(message), size):
        frag = message[i : i + size]
        out += bytes([rtype]) + version.to_bytes(2, "big") + len(frag).to_bytes(2, "big") + frag
    return out


def v8(b: bytes) -> bytes:
    return len(b).to_bytes(1, "big") + b


def v16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def u16s(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def sni_ext(name: bytes) -> tuple[int, bytes]:
    return 0, v16(b"\x00" + v16(name))


def alpn_ext(protos: list[bytes]) -> tuple[int, bytes]:
    return 16, v16(b"".join(v8(p) for p in protos))


def build_hello(
    extensions: list[tuple[int, bytes]] | None = None,
    *,
    hs_type: int = 1,
    cipher_suites: list[int] | None = None,
    session_id: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (with its 4-byte header)."""
    body = b"\x03\x03" + bytes(range(32)) + v8(session_id)
    body += v16(u16s(cipher_suites if cipher_suites is not None else [0x1301, 0x002F]))
    body += v8(b"\x00")
    if extensions is not None:
        body += v16(b"".join(t.to_bytes(2, "big") + v16(d) for t, d in extensions))
    return bytes([hs_type]) + len(body).to_bytes(3, "big") + body


def assert_protocol_error(data: bytes, reason_part: str, **kw: int) -> TLSProtocolError:
    with pytest.raises(TLSProtocolError) as info:
        parse(data, **kw)
    assert reason_part in info.value.reason
    return info.value


# --- real captures -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_parses(name: str) -> None:
    sni, alpn, versions, max_version = CAPTURES[name]
    hello = parse(RAW[name])
    assert hello is not None
    assert hello.server_name == sni
    assert hello.alpn_protocols == alpn
    assert hello.supported_versions == versions
    assert hello.max_version() == max_version
    assert hello.offers_tls13() == (0x0304 in versions)
    assert hello.record_bytes == len(RAW[name])
    assert len(hello.random) == 32
    assert hello.cipher_suites and hello.signature_algorithms and hello.supported_groups
    assert 0 in dict(hello.extensions) and 16 in dict(hello.extensions)  # raw SNI and ALPN kept
    if hello.offers_tls13():
        assert hello.key_share_groups


def test_tls12_capture_offers_no_tls13() -> None:
    hello = parse(RAW["openssl_s_client_tls12"])
    assert hello is not None
    assert hello.legacy_version == 0x0303 and not hello.offers_tls13() and hello.key_share_groups == ()


def test_pyopenssl_capture_is_a_large_post_quantum_hello() -> None:
    raw = RAW["pyopenssl_mlkem"]
    assert len(raw) > 1200
    hello = parse(raw)
    assert hello is not None
    assert X25519MLKEM768 in hello.key_share_groups
    assert X25519MLKEM768 in hello.supported_groups


@pytest.mark.parametrize("name", CAPTURES)
def test_every_strict_prefix_needs_more(name: str) -> None:
    raw = RAW[name]
    for n in range(len(raw)):
        assert parse(raw[:n]) is None, n


@pytest.mark.parametrize("name", CAPTURES)
def test_byte_at_a_time_gives_the_same_hello(name: str) -> None:
    raw = RAW[name]
    p = ClientHelloParser()
    for i in range(len(raw) - 1):
        assert p.feed(raw[i : i + 1]) is None
    assert p.feed(raw[-1:]) == parse(raw)


@pytest.mark.parametrize("name", CAPTURES)
@pytest.mark.parametrize("size", [1, 7, 100, 2**14])
@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0303])
def test_reframed_into_small_records_parses_identically(name: str, size: int, version: int) -> None:
    message = handshake_message(RAW[name])
    records = frame(message, size, version)
    original = parse(RAW[name])
    assert original is not None
    assert parse(records) == dataclasses.replace(original, record_bytes=len(records))


def test_bytes_after_the_hello_are_ignored() -> None:
    raw = RAW["python_ssl"]
    early_data = b"\x17\x03\x03\x00\x05hello" + b"GET / HTTP/1.1\r\n"
    hello = parse(raw + early_data)
    assert hello is not None and hello.record_bytes == len(raw)


def test_hello_ending_mid_record_waits_for_the_record_end() -> None:
    message = build_hello([sni_ext(b"a.example")])
    record = frame(message + b"\x00\x00\x00\x00")  # trailing handshake bytes in the same record
    assert parse(record[:-1]) is None
    hello = parse(record)
    assert hello is not None and hello.server_name == "a.example" and hello.record_bytes == len(record)


def test_feed_after_result_or_error_raises() -> None:
    p = ClientHelloParser()
    assert p.feed(RAW["openssl_s_client_tls13"]) is not None
    with pytest.raises(RuntimeError):
        p.feed(b"")
    bad = ClientHelloParser()
    with pytest.raises(TLSProtocolError):
        bad.feed(b"GET /")
    with pytest.raises(TLSProtocolError, match="not a TLS handshake"):
        bad.feed(RAW["openssl_s_client_tls13"])


def test_looks_like_tls_handshake() -> None:
    assert all(looks_like_tls_handshake(raw[:1]) for raw in RAW.values())
    assert not looks_like_tls_handshake(b"GET / HTTP/1.1\r\n")
    assert not looks_like_tls_handshake(b"")
    assert not looks_like_tls_handshake(b"\x80\x2e\x01")


def test_errors_are_tsproxy_errors_with_a_reason() -> None:
    err = assert_protocol_error(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake")
    assert isinstance(err, TLSError)
    assert str(err) == err.reason


def test_live_clients_parse() -> None:
    """Today's stdlib and pyOpenSSL clients, captured now, parse (guards against drift)."""
    spec = importlib.util.spec_from_file_location("capture_hellos", DATA / "capture.py")
    assert spec is not None and spec.loader is not None
    mod: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("python_ssl", "pyopenssl_mlkem"):
        data, _reads = mod.capture(mod.CLIENTS[name])
        hello = parse(data)
        assert hello is not None and hello.server_name == CAPTURES[name][0]
        assert hello.alpn_protocols == (b"h2", b"http/1.1")


# --- junk --------------------------------------------------------------------------------------

# SSLv2 header (high bit, length 46), CLIENT-HELLO, version 2, 7 cipher specs, 16-byte challenge.
SSLV2_HELLO = (
    bytes.fromhex("802e 01 0002 0015 0000 0010")
    + bytes.fromhex("0700c0 050080 030080 010080 080080 060040 040080")
    + bytes(16)
)
TLS13_MSG = handshake_message(RAW["openssl_s_client_tls13"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "not a TLS handshake", id="http"),
        pytest.param(b"G", "not a TLS handshake", id="http-first-byte"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "not a TLS handshake", id="h2-preface"),
        pytest.param(SSLV2_HELLO, "SSLv2", id="sslv2-hello"),
        pytest.param(b"\x16\x02\x00", "not TLS", id="record-version-2"),
        pytest.param(b"\x16\x04\x00", "not TLS", id="record-version-4"),
        pytest.param(frame(TLS13_MSG, rtype=23), "not a TLS handshake", id="application-data-record"),
        pytest.param(b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake", id="alert-record"),
        pytest.param(b"\x16\x03\x01\x00\x00" * 33, "more than 32 empty records", id="33-empty-records"),
        pytest.param(frame(b"\x02" + TLS13_MSG[1:]), "handshake type 2", id="server-hello"),
        pytest.param(b"\x16\x03\x01\x00\x01\x0b", "handshake type 11", id="certificate-first-byte"),
        pytest.param(
            frame(TLS13_MSG[:4]) + b"\x14\x03\x03\x00\x01\x01",
            "record type 20 interleaved",
            id="ccs-interleaved",
        ),
        pytest.param(
            frame(TLS13_MSG[:10]) + b"\x17\x03\x03\x00\x01\x00",
            "record type 23 interleaved",
            id="appdata-interleaved",
        ),
    ],
)
def test_junk_is_left_to_openssl(data: bytes, reason: str) -> None:
    """A plain TLSProtocolError: the caller hands the bytes to OpenSSL, which answers."""
    err = assert_protocol_error(data, reason)
    assert not isinstance(err, ClientHelloRefused)


@pytest.mark.parametrize("length", [2**14 + 1, 0xFFFF])
def test_record_over_2_14_is_refused_with_record_overflow(length: int) -> None:
    err = assert_protocol_error(b"\x16\x03\x01" + length.to_bytes(2, "big"), "exceeds 2^14")
    assert isinstance(err, ClientHelloRefused) and err.alert == 22


@pytest.mark.parametrize("version", [0x0300, 0x0304, 0x0305, 0x03FF])
def test_any_minor_record_version_is_read(version: int) -> None:
    hello = parse(frame(TLS13_MSG, version=version))
    assert hello is not None and hello.server_name == "example.com"


def test_empty_records_are_skipped_as_openssl_skips_them() -> None:
    empty = b"\x16\x03\x01\x00\x00"
    records = frame(TLS13_MSG[:50]) + empty * 32 + frame(TLS13_MSG[50:])
    hello = parse(empty + records)
    assert hello is not None and hello.server_name == "example.com"


def test_inner_length_overrun_in_a_complete_record() -> None:
    msg = bytearray(build_hello([sni_ext(b"x.example")]))
    # cipher_suites length (after 4 hdr + 2 version + 32 random + 1 empty session id) claims 0xFFFE.
    msg[39:41] = b"\xff\xfe"
    assert_protocol_error(frame(bytes(msg)), "cipher_suites overruns")


def test_truncated_handshake_body_in_a_complete_record() -> None:
    msg = build_hello([sni_ext(b"x.example")])
    # Claim a shorter handshake length: the extensions vector now overruns the message.
    short = msg[:1] + (len(msg) - 4 - 3).to_bytes(3, "big") + msg[4:]
    assert_protocol_error(frame(short), "overruns")


def test_trailing_bytes_inside_the_hello_body() -> None:
    body = build_hello([sni_ext(b"x.example")])[4:] + b"\x00"
    assert_protocol_error(frame(b"\x01" + len(body).to_bytes(3, "big") + body), "trailing bytes")


@pytest.mark.parametrize("legacy", [0x0200, 0x0300, 0x0400, 0xFEFF])
def test_any_legacy_version_is_read(legacy: int) -> None:
    """OpenSSL negotiates from supported_versions, or answers protocol_version itself."""
    msg = build_hello([sni_ext(b"x.example")])
    hello = parse(frame(msg[:4] + legacy.to_bytes(2, "big") + msg[6:]))
    assert hello is not None and hello.legacy_version == legacy and hello.server_name == "x.example"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: build_hello([sni_ext(b"x")], session_id=bytes(33)), "session_id"),
        (lambda m: build_hello([sni_ext(b"x")], cipher_suites=[]), "cipher_suites: empty"),
    ],
    ids=["long-session-id", "no-cipher-suites"],
)
def test_bad_fixed_fields(mutate: object, reason: str) -> None:
    msg = build_hello([sni_ext(b"x")])
    assert callable(mutate)
    assert_protocol_error(frame(mutate(msg)), reason)


def test_hello_without_extensions_is_accepted() -> None:
    hello = parse(frame(build_hello(None)))
    assert hello is not None
    assert hello.extensions == () and hello.server_name is None and hello.max_version() == 0x0303


def test_hello_over_the_cap_is_refused_from_its_header() -> None:
    assert MAX_CLIENT_HELLO == 131396  # OpenSSL's CLIENT_HELLO_MAX_LENGTH
    header = b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    err = assert_protocol_error(b"\x16\x03\x01\x00\x04" + header, "exceeds the 131396-byte limit")
    assert isinstance(err, ClientHelloRefused) and err.alert == 47  # illegal_parameter, as OpenSSL
    assert_protocol_error(RAW["pyopenssl_mlkem"], "exceeds the 1200-byte limit", max_client_hello=1200)


def big_hello(size: int, sni: bytes = b"big.example") -> bytes:
    """A ClientHello message of ``size`` bytes (header included, at most 4 + 131396): every
    vector is capped at its length field, so the extensions are filled first (65535), then the
    cipher list (65534), then the compression methods (255); OpenSSL's CLIENT_HELLO_MAX_LENGTH
    is exactly the sum."""
    sni_bytes = 4 + len(sni_ext(sni)[1])
    room = size - 4 - (2 + 32 + 33 + 2 + 1 + 2) - 2 - 1  # one cipher suite, the null method
    ext_len = min(room, 65535)
    room -= ext_len
    cipher_len = min(room - room % 2, 65532)
    room -= cipher_len
    methods = b"\x00" + bytes(range(1, 1 + room))
    pad = ext_len - sni_bytes - 4
    exts = [sni_ext(sni), (21, bytes(pad))]
    body = b"\x03\x03" + bytes(32) + v8(bytes(32)) + v16(u16s([0x1301] * (1 + cipher_len // 2)))
    body += v8(methods) + v16(b"".join(t.to_bytes(2, "big") + v16(d) for t, d in exts))
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    assert len(msg) == size, (len(msg), size)
    return msg


def test_a_70000_byte_hello_is_read() -> None:
    hello = parse(frame(big_hello(70_000)))
    assert hello is not None and hello.server_name == "big.example"


def test_hello_at_the_cap_is_accepted() -> None:
    msg = big_hello(MAX_CLIENT_HELLO + 4)
    hello = parse(frame(msg))
    assert hello is not None and hello.server_name == "big.example"


def test_byte_at_a_time_is_linear_for_a_64k_hello() -> None:
    msg = build_hello([(21, bytes(65000))])
    records = frame(msg, 2**14)
    p = ClientHelloParser()
    start = time.perf_counter()
    results = [p.feed(records[i : i + 1]) for i in range(len(records))]
    elapsed = time.perf_counter() - start
    assert results[-1] is not None and results.count(None) == len(records) - 1
    assert elapsed < 2.0, elapsed  # ~0.05 s linear; quadratic re-joining would take far longer


def test_a_thousand_extensions_within_the_cap_are_allowed() -> None:
    exts = [(0x1000 + i, bytes([i % 256])) for i in range(1000)] + [sni_ext(b"many.example")]
    hello = parse(frame(build_hello(exts)))
    assert hello is not None
    assert len(hello.extensions) == 1001 and hello.server_name == "many.example"


def test_duplicate_extensions_are_left_to_openssl() -> None:
    """OpenSSL ignores a repeated unknown extension and refuses a repeated known one itself."""
    hello = parse(frame(build_hello([(0x1234, b""), (0x1234, b"x"), sni_ext(b"a.example")])))
    assert hello is not None and hello.server_name == "a.example" and len(hello.extensions) == 3


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"", "host_name length 0"),
        (b"a" * 256, "host_name length 256"),
        (b"bad\x00.example", "not printable ASCII"),
        ("bücher.example".encode(), "not printable ASCII"),
        (b"sp ace.example", "not printable ASCII"),
    ],
    ids=["empty", "too-long", "nul", "non-ascii", "space"],
)
def test_unusual_sni_gives_no_server_name(name: bytes, reason: str) -> None:
    """OpenSSL takes every byte but NUL (and refuses the rest itself): the hello is read, with
    no SNI for the certificate lookup, and the raw extension kept."""
    hello = parse(frame(build_hello([sni_ext(name)])))
    assert hello is not None and hello.server_name is None and dict(hello.extensions)[0], reason


def test_sni_is_lower_cased_and_255_bytes_allowed() -> None:
    hello = parse(frame(build_hello([sni_ext(b"WWW.Example.COM")])))
    assert hello is not None and hello.server_name == "www.example.com"
    long_name = b"a" * 255
    hello = parse(frame(build_hello([sni_ext(long_name)])))
    assert hello is not None and hello.server_name == long_name.decode()


def test_sni_unknown_name_type_is_skipped_and_two_host_names_refused() -> None:
    other = b"\x07" + v16(b"opaque")
    host = b"\x00" + v16(b"h.example")
    hello = parse(frame(build_hello([(0, v16(other + host))])))
    assert hello is not None and hello.server_name == "h.example"
    for ext in (v16(host + host), v16(b"")):  # two host_names, an empty list: OpenSSL refuses
        hello = parse(frame(build_hello([(0, ext)])))
        assert hello is not None and hello.server_name is None


@pytest.mark.parametrize(
    ("ext", "reason"),
    [
        (alpn_ext([b"h2", b""]), "empty protocol name"),
        ((16, v16(b"")), "empty protocol_name_list"),
        ((16, v16(v8(b"h2")) + b"\x00"), "trailing bytes"),
        ((43, v8(b"\x03")), "odd length"),
        ((43, v8(b"")), "empty list"),
        ((10, v16(b"\x00\x1d\x00")), "odd length"),
        ((13, v16(b"")), "empty list"),
        ((51, v16(u16s([X25519]) + v16(b""))), "empty key_exchange"),
        ((51, v16(u16s([X25519]) + b"\x00\x20")), "key_exchange overruns"),
    ],
    ids=[
        "alpn-empty-name",
        "alpn-empty-list",
        "alpn-trailing",
        "versions-odd",
        "versions-empty",
        "groups-odd",
        "sigalgs-empty",
        "keyshare-empty",
        "keyshare-overrun",
    ],
)
def test_malformed_interpreted_extensions_give_empty_fields(ext: tuple[int, bytes], reason: str) -> None:
    hello = parse(frame(build_hello([ext, sni_ext(b"k.example")])))
    assert hello is not None and hello.server_name == "k.example", reason
    assert hello.alpn_protocols == hello.supported_versions == hello.key_share_groups == ()
    assert hello.supported_groups == hello.signature_algorithms == ()
    assert dict(hello.extensions)[ext[0]] == ext[1]


def test_grease_is_ignored_by_max_version() -> None:
    hello = parse(frame(build_hello([(43, v8(u16s([0x7A7A, 0x0304, 0x0303])))])))
    assert hello is not None and hello.max_version() == 0x0304 and hello.offers_tls13()


# --- property tests ----------------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=5_000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    """Whatever the bytes and however they are split, the parser answers or raises TLSProtocolError."""
    whole: ClientHello | str | None
    try:
        whole = parse(data)
    except TLSProtocolError:
        whole = "error"
    p = ClientHelloParser()
    pieced: ClientHello | str | None = None
    try:
        for chunk in split(data, cuts):
            pieced = p.feed(chunk)
            if pieced is not None:
                break
    except TLSProtocolError:
        pieced = "error"
    assert pieced == whole  # splitting never changes the answer


@st.composite
def mutated_capture(draw: st.DrawFn) -> bytes:
    data = bytearray(RAW[draw(st.sampled_from(sorted(RAW)))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        i = draw(st.integers(0, len(data)))
        if op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif data and i < len(data):
            if op == "flip":
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "delete":
                del data[i : i + draw(st.integers(1, 8))]
            else:
                data[i] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def framed_junk_hello(draw: st.DrawFn) -> bytes:
    """A well-framed ClientHello message whose body is arbitrary: reaches the body parser."""
    body = draw(st.binary(max_size=600))
    return frame(b"\x01" + len(body).to_bytes(3, "big") + body, draw(st.integers(1, 700)))


CUTS = st.lists(st.integers(0, 2**16), max_size=12)


@FAST
@given(st.binary(max_size=2000), CUTS)
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)


@FAST
@given(mutated_capture(), CUTS)
def test_fuzz_mutated_captures(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)


@FAST
@given(framed_junk_hello(), CUTS)
def test_fuzz_framed_junk_bodies(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)


hostnames = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9.\-]{0,60}", fullmatch=True)
protocols = st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=5)


@FAST
@given(hostnames, protocols, st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=6), st.integers(1, 300))
def test_built_hellos_round_trip(host: str, alpn: list[bytes], groups: list[int], size: int) -> None:
    shares = b"".join(g.to_bytes(2, "big") + v16(b"k" * 32) for g in groups)
    exts = [sni_ext(host.encode()), alpn_ext(alpn), (10, v16(u16s(groups))), (51, v16(shares))]
    records = frame(build_hello(exts), size)
    hello = parse(records)
    assert hello is not None
    assert hello.server_name == host.lower()
    assert hello.alpn_protocols == tuple(alpn)
    assert hello.supported_groups == hello.key_share_groups == tuple(groups)
    assert hello.record_bytes == len(records)


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=4000), CUTS)
def test_fuzz_arbitrary_bytes_long(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)


@pytest.mark.slow
@SLOW
@given(mutated_capture(), CUTS)
def test_fuzz_mutated_captures_long(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)


@pytest.mark.slow
@SLOW
@given(framed_junk_hello(), CUTS)
def test_fuzz_framed_junk_bodies_long(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(data, cuts)
