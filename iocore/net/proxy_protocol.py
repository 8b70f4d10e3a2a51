# Theory of operation
# -------------------
# An L4 load balancer in front of a ``pp`` port (haproxy ``send-proxy`` / ``send-proxy-v2``, an
# AWS NLB, ...) opens each connection with a PROXY protocol header that carries the address of
# the client it accepted (haproxy's doc/proxy-protocol.txt). ProxyProtocolParser reads that header
# sans-IO: bytes go in through feed(), a ProxyHeader (or None, "need more bytes") comes out; it
# never touches a socket. It never keeps a byte past the header: whatever followed the header in
# the last feed is ``trailing``, so a caller that peeked can consume exactly ``header.length``.
#
# States (_State): SIGNATURE, while the first bytes could still be either version, each byte is
# checked against both prefixes as it arrives (plain HTTP or a ClientHello fails at its first
# byte); V1 collects a text line up to CRLF (107 bytes at most, the spec's limit); V2 collects
# the 16-byte fixed part and then the length it announces; DONE once a header was returned;
# FAILED once ProxyProtocolError was raised (feed() raises it again). feed() in DONE raises
# RuntimeError (a caller bug).
#
# What the header means (spec section 2): a v1 ``UNKNOWN`` line, a v2 ``LOCAL`` command, and the
# v2 families UNSPEC and UNIX are valid headers that carry no usable address: the receiver uses
# the real connection's endpoints (``source is None``). v2 UDP families are refused (this is a
# TCP listener). TLVs are checked for structure; a CRC32C TLV is verified.
#
# Invariants: memory is bounded by the format (107 bytes for v1, 16 + 65535 for v2); anything
# wrong the peer sends raises ProxyProtocolError with a short reason, nothing else escapes for
# any input.
#
# IPAllowlist is the value of proxy.config.http.proxy_protocol_allowlist: the peers trusted to
# send a PROXY header (ATS syntax: addresses, CIDR blocks and ``lo-hi`` ranges, comma separated).

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from iocore.records.errors import TSError

__all__ = [
    "PP2_SIGNATURE",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "IPAllowlist",
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyProtocolParser",
    "crc32c",
    "parse_allowlist",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN " + 2 x 39 + 2 x 5, 4 spaces, CRLF (spec section 2.1)
PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_FIXED_LENGTH = 16

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# v2 family/transport byte -> address block length; None: carries no usable address.
_AF_INET_STREAM = 0x11
_AF_INET6_STREAM = 0x21
_AF_UNSPEC = 0x00
_AF_UNIX_STREAM = 0x31
_DATAGRAM = frozenset({0x12, 0x22, 0x32})
_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET_STREAM: 12, _AF_INET6_STREAM: 36, _AF_UNIX_STREAM: 216}


class ProxyProtocolError(TSError):
    """The peer sent something that is not a valid PROXY protocol header; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. ``source``/``destination`` are None when the header carries no address
    (v1 UNKNOWN, v2 LOCAL, UNSPEC or UNIX): the connection's own endpoints stand."""

    version: int  # 1 or 2
    local: bool  # v2 LOCAL command (a health check from the balancer itself)
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes of the header on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()
    peer: tuple[str, int] | None = None  # who sent it (the balancer); set by the accept side

    def with_peer(self, peer: tuple[str, int] | None) -> ProxyHeader:
        """This header, as received from ``peer`` (dataclasses.replace, without its cost)."""
        return ProxyHeader(
            self.version, self.local, self.source, self.destination, self.length, self.tlvs, peer
        )

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind`` (PP2_TYPE_AUTHORITY, ...), or None."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None


class _State(enum.Enum):
    SIGNATURE = 0
    V1 = 1
    V2 = 2
    DONE = 3
    FAILED = 4


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of the v2 CRC32C TLV (RFC 4960 appendix B)."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _port(field: bytes) -> int:
    if not 1 <= len(field) <= 5 or not field.isdigit():
        raise ProxyProtocolError(f"bad port {field[:8]!r}")
    port = int(field)
    if port > 65535:
        raise ProxyProtocolError(f"port {port} out of range")
    return port


def _parse_v1(line: bytes) -> ProxyHeader:
    """``line`` without its CRLF: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT`` or ``PROXY UNKNOWN ...``."""
    length = len(line) + 2
    fields = line.split(b" ")
    if len(fields) < 2 or fields[1] not in (b"TCP4", b"TCP6", b"UNKNOWN"):
        raise ProxyProtocolError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if fields[1] == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, False, None, None, length)
    if len(fields) != 6:
        raise ProxyProtocolError("v1: expected PROXY PROTO SRC DST SPORT DPORT, single spaces")
    parse = _ipv4_text if fields[1] == b"TCP4" else _ipv6_text
    src, dst = parse(fields[2]), parse(fields[3])
    return ProxyHeader(1, False, (src, _port(fields[4])), (dst, _port(fields[5])), length)


def _ipv4_text(field: bytes) -> str:
    """A dotted quad, strictly (no leading zeros), as text; ipaddress costs 5 us a call."""
    parts = field.split(b".")
    if len(parts) != 4:
        raise ProxyProtocolError("v1: bad TCP4 address")
    for part in parts:
        if not 1 <= len(part) <= 3 or not part.isdigit() or (part[0] == 0x30 and len(part) > 1):
            raise ProxyProtocolError("v1: bad TCP4 address")
        if int(part) > 255:
            raise ProxyProtocolError("v1: bad TCP4 address")
    return field.decode("ascii")


def _ipv6_text(field: bytes) -> str:
    """An IPv6 address in its canonical text form (no scope id)."""
    if b"%" in field:  # ipaddress would take a scope id
        raise ProxyProtocolError("v1: bad TCP6 address")
    try:
        return str(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError("v1: bad TCP6 address") from None


def _parse_v2(header: bytes) -> ProxyHeader:
    """The whole v2 header: 16 fixed bytes, the address block, then TLVs."""
    ver_cmd, fam, length = header[12], header[13], len(header)
    command = ver_cmd & 0x0F
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2: version {ver_cmd >> 4} (expected 2)")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"v2: unknown command {command}")
    if fam in _DATAGRAM:
        raise ProxyProtocolError("v2: datagram (UDP) header on a stream connection")
    addr_len = _ADDRESS_LENGTH.get(fam)
    if addr_len is None:
        raise ProxyProtocolError(f"v2: unknown address family/protocol 0x{fam:02x}")
    body = header[PP2_FIXED_LENGTH:]
    if command == _CMD_LOCAL:
        # "the receiver must ... use the real connection endpoints and discard the protocol block"
        return ProxyHeader(2, True, None, None, length)
    if len(body) < addr_len:
        raise ProxyProtocolError(f"v2: {len(body)} bytes cannot hold the {addr_len}-byte address block")
    source = destination = None
    if fam == _AF_INET_STREAM:
        s, d, sp, dp = struct.unpack_from("!4s4sHH", body)
        source, destination = (".".join(map(str, s)), sp), (".".join(map(str, d)), dp)
    elif fam == _AF_INET6_STREAM:
        s, d, sp, dp = struct.unpack_from("!16s16sHH", body)
        source, destination = (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp)
    tlvs = _parse_tlvs(header, PP2_FIXED_LENGTH + addr_len)
    return ProxyHeader(2, False, source, destination, length, tlvs)


def _parse_tlvs(header: bytes, at: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    end = len(header)
    while at < end:
        if end - at < 3:
            raise ProxyProtocolError("v2: truncated TLV header")
        kind, size = header[at], int.from_bytes(header[at + 1 : at + 3], "big")
        if at + 3 + size > end:
            raise ProxyProtocolError(f"v2: TLV 0x{kind:02x} runs past the header")
        value = header[at + 3 : at + 3 + size]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyProtocolError("v2: CRC32C TLV must hold 4 bytes")
            zeroed = header[: at + 3] + b"\x00\x00\x00\x00" + header[at + 7 :]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyProtocolError("v2: CRC32C mismatch")
        if kind != PP2_TYPE_NOOP:
            tlvs.append((kind, bytes(value)))
        at += 3 + size
    return tuple(tlvs)


class ProxyProtocolParser:
    """Incremental parser of one PROXY protocol header (v1 or v2, whichever the peer sends)."""

    __slots__ = ("_buf", "_error", "_need", "_state", "trailing")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _State.SIGNATURE
        self._error: ProxyProtocolError | None = None
        self._need = 0  # V2: total header length, once the fixed part is in
        self.trailing = b""  # bytes of the last feed after the end of the header

    @property
    def want(self) -> int:
        """How many bytes may still belong to the header (a read of this size may overshoot
        only while the version or the v1 line end is unknown)."""
        if self._state is _State.V2 and self._need:
            return self._need - len(self._buf)
        if self._state in (_State.DONE, _State.FAILED):
            return 0
        return V1_MAX_LENGTH - len(self._buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; the header once it is complete, None while more are needed."""
        if self._state is _State.DONE:
            raise RuntimeError("ProxyProtocolParser.feed after the header was complete")
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProxyProtocolError as exc:
            self._state = _State.FAILED
            self._error = exc
            raise

    def _feed(self, data: bytes) -> ProxyHeader | None:
        buf = self._buf
        start = len(buf)
        buf += data
        if self._state is _State.SIGNATURE:
            n = len(buf)
            if buf[: len(V1_PREFIX)] == V1_PREFIX[:n]:
                if n < len(V1_PREFIX):
                    return None
                self._state = _State.V1
            elif buf[: len(PP2_SIGNATURE)] == PP2_SIGNATURE[:n]:
                if n < len(PP2_SIGNATURE):
                    return None
                self._state = _State.V2
            else:
                raise ProxyProtocolError("no PROXY protocol header")
        if self._state is _State.V1:
            # A CR may have come last in the previous feed: look from one byte before.
            end = buf.find(b"\r\n", max(start - 1, 0))
            if end < 0:
                bad = buf.find(b"\n", max(start, 0))
                if bad >= 0 or (b"\r" in buf[:-1]):
                    raise ProxyProtocolError("v1: line not ended by CRLF")
                if len(buf) >= V1_MAX_LENGTH:
                    raise ProxyProtocolError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
                return None
            if end + 2 > V1_MAX_LENGTH:
                raise ProxyProtocolError(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
            line = bytes(buf[:end])
            if b"\r" in line or b"\n" in line:
                raise ProxyProtocolError("v1: line not ended by CRLF")
            if not line.isascii():
                raise ProxyProtocolError("v1: non-ASCII byte in the line")
            header = _parse_v1(line)
            return self._done(header, end + 2)
        # V2
        if not self._need:
            if len(buf) < PP2_FIXED_LENGTH:
                return None
            self._need = PP2_FIXED_LENGTH + int.from_bytes(buf[14:16], "big")
        if len(buf) < self._need:
            return None
        return self._done(_parse_v2(bytes(buf[: self._need])), self._need)

    def _done(self, header: ProxyHeader, length: int) -> ProxyHeader:
        self.trailing = bytes(self._buf[length:])
        self._buf = bytearray()
        self._state = _State.DONE
        return header


# -- the allowlist ------------------------------------------------------------------------------

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IPAllowlist:
    """A set of IPv4/IPv6 ranges; ``ip in allowlist``. IPv4-mapped IPv6 peers (a dual-stack
    listener) are matched as the IPv4 address they are."""

    __slots__ = ("ranges", "text")

    def __init__(self, ranges: tuple[tuple[int, int, int], ...], text: str) -> None:
        self.ranges = ranges  # (version, first, last) as integers
        self.text = text

    def __contains__(self, ip: object) -> bool:
        try:
            addr: _IPAddress = ipaddress.ip_address(str(ip).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        value, version = int(addr), addr.version
        return any(v == version and lo <= value <= hi for v, lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __repr__(self) -> str:
        return f"IPAllowlist({self.text!r})"


def parse_allowlist(text: str) -> IPAllowlist:
    """ATS's IP list syntax: ``1.2.3.4``, ``10.0.0.0/8``, ``192.168.0.1-192.168.0.9``, IPv6 alike,
    separated by commas (or spaces). Raises ValueError naming the bad item."""
    ranges: list[tuple[int, int, int]] = []
    for item in text.replace(",", " ").split():
        reason = "not an address, ADDR/BITS block or ADDR-ADDR range"
        try:
            if "/" in item:
                net = ipaddress.ip_network(item, strict=False)
                ranges.append((net.version, int(net.network_address), int(net.broadcast_address)))
                continue
            lo_text, dash, hi_text = item.partition("-")
            lo = ipaddress.ip_address(lo_text)
            hi = ipaddress.ip_address(hi_text) if dash else lo
        except ValueError:
            raise ValueError(f"bad entry '{item}': {reason}") from None
        if lo.version != hi.version:
            raise ValueError(f"bad entry '{item}': the range mixes IPv4 and IPv6")
        if int(lo) > int(hi):
            raise ValueError(f"bad entry '{item}': the range ends before it starts")
        ranges.append((lo.version, int(lo), int(hi)))
    return IPAllowlist(tuple(ranges), text.strip())
