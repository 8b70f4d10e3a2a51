"""The sans-IO PROXY protocol parser and the allowlist, driven with bytes alone."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from iocore.net.proxy_protocol import (
    PP2_SIGNATURE,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    ProxyHeader,
    ProxyProtocolError,
    ProxyProtocolParser,
    crc32c,
    parse_allowlist,
)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v2(
    cmd: int = 1, fam: int = 0x11, body: bytes | None = None, tlvs: bytes = b"", version: int = 2
) -> bytes:
    if body is None:
        if fam == 0x11:
            body = (
                socket.inet_aton("203.0.113.7")
                + socket.inet_aton("198.51.100.1")
                + struct.pack("!HH", 51000, 443)
            )
        elif fam == 0x21:
            body = (
                ipaddress.IPv6Address("2001:db8::7").packed
                + ipaddress.IPv6Address("2001:db8::1").packed
                + struct.pack("!HH", 51000, 443)
            )
        else:
            body = b""
    rest = body + tlvs
    return PP2_SIGNATURE + bytes(((version << 4) | cmd, fam)) + struct.pack("!H", len(rest)) + rest


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


def with_crc(header_without_crc: bytes) -> bytes:
    """Append a CRC32C TLV to a v2 header (length field adjusted) and fill in its checksum."""
    grown = bytearray(header_without_crc + tlv(PP2_TYPE_CRC32C, b"\x00" * 4))
    grown[14:16] = struct.pack("!H", len(grown) - 16)
    grown[-4:] = struct.pack("!I", crc32c(bytes(grown)))
    return bytes(grown)


def parse_whole(data: bytes) -> tuple[ProxyHeader, bytes]:
    parser = ProxyProtocolParser()
    header = parser.feed(data)
    assert header is not None
    return header, parser.trailing


# -- valid headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 443\r\n", ("203.0.113.7", 51000), ("198.51.100.1", 443)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n", ("2001:db8::7", 1), ("2001:db8::1", 65535)),
        (b"PROXY TCP6 ::ffff:10.0.0.1 ::1 0 0\r\n", ("::ffff:a00:1", 0), ("::1", 0)),
    ],
)
def test_v1_addresses(line: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
    header, trailing = parse_whole(line + PAYLOAD)
    assert (header.version, header.local, header.source, header.destination) == (
        1,
        False,
        source,
        destination,
    )
    assert header.length == len(line)
    assert trailing == PAYLOAD


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 whatever goes 1 2\r\n"])
def test_v1_unknown_carries_no_address(line: bytes) -> None:
    header, trailing = parse_whole(line + CLIENT_HELLO_START)
    assert header.source is None and header.destination is None and header.length == len(line)
    assert trailing == CLIENT_HELLO_START


def test_v1_longest_lines_are_accepted() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header, _ = parse_whole(f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode())
    assert header.source == (a, 65535)
    worst = f"PROXY UNKNOWN {a} {a} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(worst) == V1_MAX_LENGTH
    assert parse_whole(worst)[0].length == V1_MAX_LENGTH
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        parse_whole(f"PROXY UNKNOWN {a} {a} 65535 655355\r\n".encode())


def test_v2_inet_inet6_and_tlvs() -> None:
    header, trailing = parse_whole(v2() + CLIENT_HELLO_START)
    assert (header.version, header.source, header.destination) == (
        2,
        ("203.0.113.7", 51000),
        ("198.51.100.1", 443),
    )
    assert header.length == 16 + 12 and trailing == CLIENT_HELLO_START
    header, _ = parse_whole(v2(fam=0x21, tlvs=tlv(PP2_TYPE_AUTHORITY, b"example.com") + tlv(0x04, b"pad")))
    assert header.source == ("2001:db8::7", 51000)
    assert header.tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert header.tlv(0x04) is None  # NOOP TLVs are dropped
    assert header.tlv(PP2_TYPE_UNIQUE_ID) is None


@pytest.mark.parametrize(
    ("cmd", "fam", "body"),
    [
        (0, 0x11, None),  # LOCAL: the balancer's own health check; the address block is ignored
        (0, 0x00, b""),
        (0, 0x00, b"\xff" * 7),  # LOCAL with junk: still discarded, as the spec says
        (1, 0x00, b""),  # PROXY with UNSPEC: the real endpoints stand
        (1, 0x31, b"/run/a.sock".ljust(216, b"\x00")),  # UNIX: no IP to use
    ],
)
def test_v2_headers_without_a_usable_address(cmd: int, fam: int, body: bytes | None) -> None:
    data = v2(cmd=cmd, fam=fam, body=body)
    header, trailing = parse_whole(data + PAYLOAD)
    assert header.source is None and header.local == (cmd == 0)
    assert header.length == len(data) and trailing == PAYLOAD


def test_v2_crc32c_is_verified() -> None:
    good = with_crc(v2())
    header, _ = parse_whole(good)
    assert header.source == ("203.0.113.7", 51000)
    bad = bytearray(good)
    bad[17] ^= 0x01  # one bit of the source address
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        parse_whole(bytes(bad))


def test_crc32c_known_answer() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


# -- fragmentation -------------------------------------------------------------------------------

FRAGMENTED = [
    b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 443\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(),
    v2(fam=0x21, tlvs=tlv(PP2_TYPE_AUTHORITY, b"example.com")),
    with_crc(v2()),
    v2(cmd=0, fam=0x00, body=b""),
]


@pytest.mark.parametrize("data", FRAGMENTED, ids=range(len(FRAGMENTED)))
def test_fragmented_at_every_byte_gives_the_same_header(data: bytes) -> None:
    whole, _ = parse_whole(data + PAYLOAD)
    for split in range(1, len(data) + len(PAYLOAD)):
        parser = ProxyProtocolParser()
        first = parser.feed((data + PAYLOAD)[:split])
        if split < len(data):
            assert first is None, split
            assert parser.want > 0
            got = parser.feed((data + PAYLOAD)[split:])
        else:
            got = first
        assert got == whole, split
        assert parser.trailing == (PAYLOAD if split < len(data) else (data + PAYLOAD)[len(data) : split])
    parser = ProxyProtocolParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1) and results[-1] == whole and parser.trailing == b""


@pytest.mark.parametrize("data", FRAGMENTED, ids=range(len(FRAGMENTED)))
def test_want_never_reads_past_a_v2_header_once_its_length_is_known(data: bytes) -> None:
    parser = ProxyProtocolParser()
    got = None
    at = 0
    while got is None:
        n = min(parser.want, 16) if at < 16 else parser.want
        got = parser.feed(data[at : at + n])
        at += n
    if data.startswith(PP2_SIGNATURE):
        assert at == len(data) and parser.trailing == b""


# -- malformed input -----------------------------------------------------------------------------

V1_BAD = [
    (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    (CLIENT_HELLO_START, "no PROXY protocol header"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol header"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY\r\n", "no PROXY protocol header"),
    (b"PROXY \r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad TCP6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad TCP6 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "out of range"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "not ended by CRLF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "not ended by CRLF"),
    (b"PROXY TCP4 \xc3\xa9.2.3.4 5.6.7.8 1 2\r\n", "non-ASCII"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "bad port"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "no CRLF within 107 bytes"),
    (b"PROXY TCP4 " + b"1" * 200, "no CRLF within 107 bytes"),
]


@pytest.mark.parametrize(("data", "reason"), V1_BAD)
def test_v1_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_whole(data)


def _v2_len(header: bytes, n: int) -> bytes:
    return header[:14] + struct.pack("!H", n) + header[16:]


V2_BAD = [
    (v2(version=1), "version 1"),
    (v2(version=3), "version 3"),
    (v2(cmd=2), "unknown command 2"),
    (v2(cmd=0xF), "unknown command 15"),
    (v2(fam=0x12), "datagram"),
    (v2(fam=0x22), "datagram"),
    (v2(fam=0x32, body=b""), "datagram"),
    (v2(fam=0x13, body=b""), "unknown address family"),
    (v2(fam=0x41, body=b""), "unknown address family"),
    (v2(fam=0x10, body=b""), "unknown address family"),
    (v2(fam=0x11, body=b"\x01" * 11), "cannot hold the 12-byte address block"),
    (v2(fam=0x21, body=b"\x01" * 35), "cannot hold the 36-byte address block"),
    (v2(fam=0x31, body=b"\x01" * 215), "cannot hold the 216-byte address block"),
    (v2(tlvs=b"\x05\x00"), "truncated TLV header"),
    (v2(tlvs=tlv(PP2_TYPE_AUTHORITY, b"abc")[:-1]), "runs past the header"),
    (v2(tlvs=b"\x02\xff\xff"), "runs past the header"),
    (v2(tlvs=tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00")), "CRC32C TLV must hold 4 bytes"),
    (v2(tlvs=tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00")), "CRC32C mismatch"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(20), "no PROXY protocol header"),
    (b"\r\n\r\nGET", "no PROXY protocol header"),
]


@pytest.mark.parametrize(("data", "reason"), V2_BAD)
def test_v2_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_whole(data + PAYLOAD if reason == "no PROXY protocol header" else data)


@pytest.mark.parametrize(("data", "reason"), V1_BAD + V2_BAD)
def test_malformed_fails_the_same_byte_by_byte_and_stays_failed(data: bytes, reason: str) -> None:
    parser = ProxyProtocolParser()
    with pytest.raises(ProxyProtocolError, match=reason):
        for i in range(len(data)):
            assert parser.feed(data[i : i + 1]) is None
        parser.feed(PAYLOAD)  # a header that is short of its length fails on what follows it
        raise AssertionError("no error")
    with pytest.raises(ProxyProtocolError, match=reason):
        parser.feed(b"more")


def test_first_wrong_byte_fails_at_once() -> None:
    for first in (b"G", b"\x16", b"p", b"\r\n\r\n\x01"):
        with pytest.raises(ProxyProtocolError, match="no PROXY protocol header"):
            ProxyProtocolParser().feed(first)


def test_feed_after_done_is_a_caller_bug() -> None:
    parser = ProxyProtocolParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_v2_bounded_by_its_length_field() -> None:
    parser = ProxyProtocolParser()
    big = v2(tlvs=tlv(0xE0, b"z" * 60000))
    assert parser.feed(big[:100]) is None
    assert parser.want == len(big) - 100
    header = parser.feed(big[100:] + PAYLOAD)
    assert header is not None and header.tlv(0xE0) == b"z" * 60000 and parser.trailing == PAYLOAD


# -- allowlist -----------------------------------------------------------------------------------


def test_allowlist_addresses_cidr_and_ranges() -> None:
    allow = parse_allowlist("127.0.0.1, 10.0.0.0/8,192.168.1.10-192.168.1.20  2001:db8::/32,::1")
    for ip in (
        "127.0.0.1",
        "10.255.0.1",
        "192.168.1.10",
        "192.168.1.20",
        "2001:db8::5",
        "::1",
        "::ffff:10.1.1.1",
    ):
        assert ip in allow, ip
    for ip in ("127.0.0.2", "11.0.0.1", "192.168.1.21", "2001:db9::1", "::2", "not-an-ip", ""):
        assert ip not in allow, ip
    assert not parse_allowlist("  ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.0/33", "bad entry '10.0.0.0/33'"),
        ("example.com", "bad entry 'example.com'"),
        ("1.2.3.4-::1", "mixes IPv4 and IPv6"),
        ("10.0.0.9-10.0.0.1", "ends before it starts"),
        ("1.2.3.4-", "bad entry"),
        ("1.2.3.4;5.6.7.8", "bad entry"),
    ],
)
def test_allowlist_errors_name_the_entry(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_allowlist(text)


def test_mutated_headers_raise_only_proxy_protocol_error() -> None:
    """Any input: a header, None (need more) or ProxyProtocolError; never anything else.
    Seeded, bounded: every valid header above, with bytes flipped, cut, repeated or inserted."""
    import random

    rng = random.Random(18)
    seeds = [*FRAGMENTED, b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n"]
    outcomes = {"header": 0, "more": 0, "error": 0}
    for _ in range(20000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op, at = rng.randrange(4), rng.randrange(len(data) + 1)
            if op == 0 and at < len(data):
                data[at] = rng.randrange(256)
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif data:
                data[at:at] = data[: rng.randint(1, len(data))]
        parser = ProxyProtocolParser()
        try:
            cut = fed = rng.randint(0, len(data))
            got = parser.feed(bytes(data[:cut]))
            if got is None:
                got, fed = parser.feed(bytes(data[cut:])), len(data)
        except ProxyProtocolError:
            outcomes["error"] += 1
            continue
        outcomes["header" if got is not None else "more"] += 1
        if got is not None:
            assert got.length + len(parser.trailing) == fed
    assert all(outcomes.values()), outcomes  # the mutations reach every outcome
