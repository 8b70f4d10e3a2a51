# Theory of operation
# -------------------
# ClientHelloParser reads the first bytes a client sends on a TLS port and returns the parsed
# ClientHello, so the proxy can run the plugin hooks and choose a certificate / tunnel by SNI
# and ALPN before OpenSSL sees the connection (the seed's "peek at the ClientHello" step, and
# the tr-pass check for non-TLS bytes). It is sans-IO: bytes go in through feed(), a
# ClientHello (or None, "need more bytes") comes out; it never touches a socket. The caller
# keeps every byte it received and replays them into the real TLS engine; the parser only looks.
#
# The principle: the pre-parser is never stricter than OpenSSL and never answers for it.
# Whatever it cannot read, or finds unusual, raises TLSProtocolError: the caller then hands the
# bytes to OpenSSL, which decides (handshake, or its own alert). Its own refusals are resource
# bounds only, raised as ClientHelloRefused with the alert OpenSSL sends for the same bytes:
#
#   a record longer than 2^14 bytes          record_overflow (22)    RFC 8446 section 5.1
#   a hello body longer than the cap         illegal_parameter (47)  OpenSSL's EXCESSIVE_MESSAGE_SIZE
#
# The cap (proxy.config.ssl.client_hello.max_size) counts the hello body, as OpenSSL's
# CLIENT_HELLO_MAX_LENGTH (131396) does; the default is OpenSSL's own.
#
# Two layers are reassembled, each with a small streaming state machine:
#
#   record layer     RECORD_HEADER --5 bytes--> RECORD_BODY --length bytes--> RECORD_HEADER ...
#                    Each record must be a handshake record (type 22) with a TLS major version
#                    (3; the minor is not looked at: OpenSSL ignores it in the first flight).
#                    Empty records are skipped, as OpenSSL skips them (up to 32 in a row; an
#                    empty ChangeCipherSpec too, before the 4-byte handshake header). The
#                    header bytes are checked as they arrive, so plain HTTP is handed over (or
#                    tunnelled, tr-pass) at its first byte.
#   handshake layer  the record payloads are appended to one bytearray. Its 4-byte header
#                    (type 1 = ClientHello, 24-bit length) is checked as soon as it is present.
#
# The hello is complete when the handshake message is complete and the record carrying its
# last byte has been read to its end; only then is the body parsed (once) into a ClientHello.
# Bytes after that record are not looked at. The body parser reads the fixed fields and the
# extension block strictly (OpenSSL refuses a hello whose framing is broken, so handing those
# over costs nothing), and the extensions it interprets leniently: one it cannot read leaves
# its field empty and the raw bytes in ``extensions``, for OpenSSL to judge.
#
# States: _State.READING -> DONE (a ClientHello was returned) or FAILED (TLSProtocolError was
# raised). feed() in DONE raises RuntimeError (a caller bug); in FAILED it raises the same
# error again.
#
# Invariants: each input byte is examined a bounded number of times (no re-joining or
# re-parsing of the accumulated buffer on each feed), so byte-at-a-time feeding is linear;
# memory is bounded by the cap plus one record; anything the client sends either parses or
# raises TLSProtocolError with a short reason, and nothing else escapes for any input.

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from iocore.net.tls.errors import ClientHelloRefused, TLSProtocolError

__all__ = [
    "ALERT_ILLEGAL_PARAMETER",
    "ALERT_RECORD_OVERFLOW",
    "MAX_CLIENT_HELLO",
    "MAX_PLAINTEXT_RECORD",
    "ClientHello",
    "ClientHelloParser",
    "looks_like_tls_handshake",
]

SSL_OP_HANDSHAKE = 0x16  # TLS record content type "handshake" (22), the seed's name.
SSL_OP_CHANGE_CIPHER_SPEC = 0x14  # record content type change_cipher_spec (20)
HANDSHAKE_TYPE_CLIENT_HELLO = 1

MAX_CLIENT_HELLO = 131396
"""Default cap on the ClientHello body (the 4-byte handshake header not counted): OpenSSL's
CLIENT_HELLO_MAX_LENGTH, so the pre-parser refuses nothing OpenSSL would take."""

MAX_EMPTY_RECORDS = 32
"""OpenSSL's MAX_EMPTY_RECORDS: empty records in a row it skips before refusing."""

ALERT_RECORD_OVERFLOW = 22
ALERT_ILLEGAL_PARAMETER = 47

MAX_PLAINTEXT_RECORD = 2**14
"""RFC 8446 section 5.1: a TLSPlaintext fragment is at most 2^14 bytes."""

_RECORD_HEADER_LEN = 5
_HANDSHAKE_HEADER_LEN = 4

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_SIGNATURE_ALGORITHMS = 13
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51

TLS1_3_VERSION = 0x0304


def looks_like_tls_handshake(first_bytes: bytes) -> bool:
    """True if the first byte is a TLS handshake record type (0x16).

    This is the seed's ``*buf != SSL_OP_HANDSHAKE`` test used to pass non-TLS traffic
    through (tr-pass); an empty buffer is not (yet) a handshake.
    """
    return len(first_bytes) > 0 and first_bytes[0] == SSL_OP_HANDSHAKE


def _is_grease(value: int) -> bool:
    """RFC 8701 GREASE values (0x0A0A, 0x1A1A, ... 0xFAFA) are noise, not offers."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello; all numbers are host integers, lists keep the client's order."""

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    extensions: tuple[tuple[int, bytes], ...]
    server_name: str | None
    alpn_protocols: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    supported_groups: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    key_share_groups: tuple[int, ...]
    record_bytes: int

    def offers_tls13(self) -> bool:
        """TLS 1.3 can only be offered through the supported_versions extension."""
        return TLS1_3_VERSION in self.supported_versions

    def max_version(self) -> int:
        """Highest protocol version offered (GREASE ignored); legacy_version without the extension."""
        offered = [v for v in self.supported_versions if not _is_grease(v)]
        return max(offered) if offered else self.legacy_version


_U16_PAIR = struct.Struct(">HH")


def _u16_list(data: bytes, what: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if len(data) % 2:
        raise TLSProtocolError(f"{what}: odd length {len(data)}")
    if not data and not allow_empty:
        raise TLSProtocolError(f"{what}: empty list")
    return struct.unpack(f">{len(data) // 2}H", data)


# The parsers below run on every handshake: plain offsets into ``bytes``, every length checked
# before it is used. An overrun is reported as "<what>: <field> overruns its enclosing length".


_PRINTABLE_ASCII = bytes(range(0x21, 0x7F))


def _overrun(what: str, field: str) -> TLSProtocolError:
    return TLSProtocolError(f"{what}: {field} overruns its enclosing length")


def _vector16(data: bytes, what: str, field: str) -> bytes:
    """The one u16-length vector that must fill ``data`` exactly."""
    if len(data) < 2:
        raise _overrun(what, field)
    n = (data[0] << 8) | data[1]
    if n > len(data) - 2:
        raise _overrun(what, field)
    if n != len(data) - 2:
        raise TLSProtocolError(f"{what}: {len(data) - 2 - n} trailing bytes")
    return data[2:]


def _parse_server_name(data: bytes) -> str | None:
    names = _vector16(data, "server_name extension", "server_name_list")
    if not names:
        raise TLSProtocolError("server_name extension: empty server_name_list")
    host: str | None = None
    pos, end = 0, len(names)
    while pos < end:
        if end - pos < 3:
            raise _overrun("server_name_list", "name")
        name_type = names[pos]
        n = (names[pos + 1] << 8) | names[pos + 2]
        pos += 3
        if n > end - pos:
            raise _overrun("server_name_list", "name")
        raw = names[pos : pos + n]
        pos += n
        if name_type != 0:  # Unknown name types are skipped (RFC 6066 section 3).
            continue
        if host is not None:
            raise TLSProtocolError("server_name extension: more than one host_name")
        if not 0 < n <= 255:
            raise TLSProtocolError(f"server_name extension: host_name length {n} not in 1..255")
        # Printable ASCII only: rejects NUL, control bytes, spaces and non-ASCII (IDNs travel as
        # A-labels, "xn--...", per RFC 6066).
        if raw.translate(None, _PRINTABLE_ASCII):
            raise TLSProtocolError("server_name extension: host_name is not printable ASCII")
        host = raw.decode("ascii").lower()
    return host


def _parse_alpn(data: bytes) -> tuple[bytes, ...]:
    names = _vector16(data, "ALPN extension", "protocol_name_list")
    out: list[bytes] = []
    pos, end = 0, len(names)
    while pos < end:
        n = names[pos]
        pos += 1
        if n > end - pos:
            raise _overrun("ALPN protocol_name_list", "protocol name")
        if not n:
            raise TLSProtocolError("ALPN extension: empty protocol name")
        out.append(names[pos : pos + n])
        pos += n
    if not out:
        raise TLSProtocolError("ALPN extension: empty protocol_name_list")
    return tuple(out)


def _parse_key_share(data: bytes) -> tuple[int, ...]:
    shares = _vector16(data, "key_share extension", "client_shares")
    groups: list[int] = []
    pos, end = 0, len(shares)
    while pos < end:
        if end - pos < 4:
            raise _overrun("key_share client_shares", "group" if end - pos < 2 else "key_exchange")
        groups.append((shares[pos] << 8) | shares[pos + 1])
        n = (shares[pos + 2] << 8) | shares[pos + 3]
        pos += 4
        if n > end - pos:
            raise _overrun("key_share client_shares", "key_exchange")
        if not n:
            raise TLSProtocolError("key_share extension: empty key_exchange")
        pos += n
    return tuple(groups)


def _parse_u16_vector_ext(raw: bytes, len_bytes: int, what: str) -> tuple[int, ...]:
    if len(raw) < len_bytes:
        raise _overrun(what, "list")
    n = raw[0] if len_bytes == 1 else (raw[0] << 8) | raw[1]
    if n > len(raw) - len_bytes:
        raise _overrun(what, "list")
    if n != len(raw) - len_bytes:
        raise TLSProtocolError(f"{what}: {len(raw) - len_bytes - n} trailing bytes")
    return _u16_list(raw[len_bytes:], what)


_PARSED_EXTENSIONS = frozenset(
    {
        EXT_SERVER_NAME,
        EXT_ALPN,
        EXT_SUPPORTED_VERSIONS,
        EXT_SUPPORTED_GROUPS,
        EXT_SIGNATURE_ALGORITHMS,
        EXT_KEY_SHARE,
    }
)


def _parse_client_hello(body: memoryview, record_bytes: int) -> ClientHello:
    """Parse the ClientHello body (after the 4-byte handshake header), RFC 8446 section 4.1.2."""
    b = bytes(body)
    end = len(b)
    if end < 2:
        raise _overrun("ClientHello", "legacy_version")
    # Any legacy_version: OpenSSL negotiates from supported_versions (or from this number,
    # capped at TLS 1.2) and answers protocol_version itself when there is no overlap.
    legacy_version = (b[0] << 8) | b[1]
    if end < 34:
        raise _overrun("ClientHello", "random")
    random = b[2:34]
    pos = 34
    if pos >= end or b[pos] > end - pos - 1:
        raise _overrun("ClientHello", "legacy_session_id")
    n = b[pos]
    session_id = b[pos + 1 : pos + 1 + n]
    pos += 1 + n
    if n > 32:
        raise TLSProtocolError(f"ClientHello: session_id of {n} bytes (max 32)")
    if end - pos < 2 or ((b[pos] << 8) | b[pos + 1]) > end - pos - 2:
        raise _overrun("ClientHello", "cipher_suites")
    n = (b[pos] << 8) | b[pos + 1]
    cipher_suites = _u16_list(b[pos + 2 : pos + 2 + n], "ClientHello cipher_suites")
    pos += 2 + n
    if pos >= end or b[pos] > end - pos - 1:
        raise _overrun("ClientHello", "legacy_compression_methods")
    n = b[pos]
    compression_methods = b[pos + 1 : pos + 1 + n]
    pos += 1 + n
    if not compression_methods:
        raise TLSProtocolError("ClientHello: empty compression_methods")

    extensions: list[tuple[int, bytes]] = []
    parsed: list[tuple[int, bytes]] = []  # the ones read below, in the client's order
    if pos < end:  # A hello without extensions at all is legal before TLS 1.3.
        if end - pos < 2 or ((b[pos] << 8) | b[pos + 1]) > end - pos - 2:
            raise _overrun("ClientHello", "extensions")
        n = (b[pos] << 8) | b[pos + 1]
        pos += 2
        if pos + n != end:
            raise TLSProtocolError(f"ClientHello: {end - pos - n} trailing bytes")
        while pos < end:
            if end - pos < 4:
                raise TLSProtocolError(
                    "ClientHello extensions: extension header overruns its enclosing length"
                )
            ext_type, ext_len = _U16_PAIR.unpack_from(b, pos)
            pos += 4
            if ext_len > end - pos:
                raise TLSProtocolError(
                    f"ClientHello extensions: extension {ext_type} data overruns its enclosing length"
                )
            # Duplicates are OpenSSL's to refuse (it does for the types it knows, the six read
            # below among them; it ignores the others): the last one read here wins.
            data = b[pos : pos + ext_len]
            pos += ext_len
            extensions.append((ext_type, data))
            if ext_type in _PARSED_EXTENSIONS:
                parsed.append((ext_type, data))

    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    sigalgs: tuple[int, ...] = ()
    key_shares: tuple[int, ...] = ()
    for ext_type, data in parsed:
        # An extension that does not read leaves its field empty: OpenSSL judges the raw bytes
        # (it ignores some, e.g. a key_share in a TLS 1.2 handshake, and refuses others with
        # the alert of its choice). A host_name that is not printable ASCII (OpenSSL takes any
        # byte but NUL) matches no certificate name: no SNI for the lookup.
        try:
            if ext_type == EXT_SERVER_NAME:
                server_name = _parse_server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(data)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _parse_u16_vector_ext(data, 1, "supported_versions extension")
            elif ext_type == EXT_SUPPORTED_GROUPS:
                groups = _parse_u16_vector_ext(data, 2, "supported_groups extension")
            elif ext_type == EXT_SIGNATURE_ALGORITHMS:
                sigalgs = _parse_u16_vector_ext(data, 2, "signature_algorithms extension")
            else:
                key_shares = _parse_key_share(data)
        except TLSProtocolError:
            continue

    return ClientHello(
        legacy_version=legacy_version,
        random=random,
        session_id=session_id,
        cipher_suites=cipher_suites,
        compression_methods=compression_methods,
        extensions=tuple(extensions),
        server_name=server_name,
        alpn_protocols=alpn,
        supported_versions=versions,
        supported_groups=groups,
        signature_algorithms=sigalgs,
        key_share_groups=key_shares,
        record_bytes=record_bytes,
    )


class _State(enum.Enum):
    READING = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class ClientHelloParser:
    """Incremental, sans-IO ClientHello reader; see the theory of operation at the top."""

    def __init__(self, max_client_hello: int = MAX_CLIENT_HELLO) -> None:
        if max_client_hello < 0:
            raise ValueError("max_client_hello must not be negative")
        self.max_client_hello = max_client_hello
        self._state = _State.READING
        self._error: TLSProtocolError | None = None
        self._header = bytearray()  # Partial record header, < 5 bytes.
        self._body_left = 0  # Payload bytes still to come in the current record; 0 = in a header.
        self._handshake = bytearray()  # Concatenated handshake-record payloads.
        self._hello_len: int | None = None  # Declared handshake message length (4 + body).
        self._record_bytes = 0  # Headers + payloads of the records read so far.
        self._records = 0
        self._empty_records = 0  # Empty records in a row.

    def feed(self, data: bytes | bytearray) -> ClientHello | None:
        """Consume the next bytes from the client.

        Returns the ClientHello once it is complete, None while more bytes are needed. Raises
        ClientHelloRefused (with the alert to send) for a resource bound, TLSProtocolError when
        the bytes are not a ClientHello the pre-parser reads (hand them to OpenSSL). Bytes after
        the record that completes the hello are ignored.
        """
        if self._state is _State.DONE:
            raise RuntimeError("ClientHelloParser.feed() called after the ClientHello was returned")
        if self._state is _State.FAILED:
            error = self._error
            assert error is not None
            raise error
        try:
            return self._consume(memoryview(data))
        except TLSProtocolError as exc:
            self._state = _State.FAILED
            self._error = exc
            raise

    def _consume(self, view: memoryview) -> ClientHello | None:
        pos = 0
        end = len(view)
        while pos < end:
            if self._body_left == 0:
                # The header bytes at hand are checked as soon as they arrive, so junk is handed
                # over at its first byte.
                header = self._header
                take = min(_RECORD_HEADER_LEN - len(header), end - pos)
                header += view[pos : pos + take]
                pos += take
                self._check_header()
                if len(header) == _RECORD_HEADER_LEN:
                    self._body_left = (header[3] << 8) | header[4]
                    self._record_bytes += _RECORD_HEADER_LEN + self._body_left
                    self._records += 1
                    header.clear()
                continue
            n = min(self._body_left, end - pos)
            if self._hello_len is None or len(self._handshake) < self._hello_len:
                self._handshake += view[pos : pos + n]
                self._check_handshake_header()
            pos += n
            self._body_left -= n
            if (
                self._body_left == 0
                and self._hello_len is not None
                and len(self._handshake) >= self._hello_len
            ):
                hello = _parse_client_hello(
                    memoryview(self._handshake)[_HANDSHAKE_HEADER_LEN : self._hello_len],
                    self._record_bytes,
                )
                self._state = _State.DONE
                return hello
        return None

    def _check_header(self) -> None:
        """Check the record header bytes read so far (1 to 5 of them)."""
        h = self._header
        n = len(h)
        c = h[0]
        if c != SSL_OP_HANDSHAKE:
            if (
                c == SSL_OP_CHANGE_CIPHER_SPEC
                and len(self._handshake) < _HANDSHAKE_HEADER_LEN
                and (n < 2 or h[1] == 3)
            ):
                # OpenSSL skips an empty ChangeCipherSpec record until it has the handshake
                # header (an empty record, like the empty handshake records below): wait for
                # its length.
                if n < _RECORD_HEADER_LEN:
                    return
                if (h[3] << 8) | h[4] == 0:
                    self._count_empty_record()
                    return
            if self._records:
                raise TLSProtocolError(f"record type {c} interleaved before the ClientHello completed")
            if c & 0x80:
                raise TLSProtocolError("SSLv2-style ClientHello")
            raise TLSProtocolError("not a TLS handshake")
        if n > 1 and h[1] != 3:
            raise TLSProtocolError(f"record version major {h[1]} is not TLS")
        if n == _RECORD_HEADER_LEN:
            length = (h[3] << 8) | h[4]
            if length > MAX_PLAINTEXT_RECORD:
                raise ClientHelloRefused(f"record length {length} exceeds 2^14", ALERT_RECORD_OVERFLOW)
            if length:
                self._empty_records = 0
            else:
                self._count_empty_record()

    def _count_empty_record(self) -> None:
        self._empty_records += 1
        if self._empty_records > MAX_EMPTY_RECORDS:
            raise TLSProtocolError(f"more than {MAX_EMPTY_RECORDS} empty records in a row")

    def _check_handshake_header(self) -> None:
        if self._hello_len is not None:
            return
        hs = self._handshake
        if hs[0] != HANDSHAKE_TYPE_CLIENT_HELLO:
            raise TLSProtocolError(f"handshake type {hs[0]} is not ClientHello")
        if len(hs) < _HANDSHAKE_HEADER_LEN:
            return
        length = (hs[1] << 16) | (hs[2] << 8) | hs[3]
        if length > self.max_client_hello:
            raise ClientHelloRefused(
                f"ClientHello of {length} bytes exceeds the {self.max_client_hello}-byte limit",
                ALERT_ILLEGAL_PARAMETER,
            )
        self._hello_len = _HANDSHAKE_HEADER_LEN + length
