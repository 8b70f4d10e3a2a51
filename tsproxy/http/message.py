# Header rewriting and serialization for the proxied HTTP/1.1 exchange, sans-IO.
#
# Theory of operation
# -------------------
# The parser (tsproxy/http/parser.py) hands over a head event with headers as a list of
# (name, value) byte pairs, names as sent. This module turns such an event into the bytes of the
# head tsproxy sends on: to the origin (build_origin_request_head) or to the client
# (build_client_response_head). Both:
#   - drop the hop-by-hop headers (HOP_BY_HOP plus every header named in Connection),
#   - drop the framing headers received and write the framing tsproxy itself uses for the body it
#     sends (Content-Length, Transfer-Encoding: chunked, or none and close),
#   - merge Via (one header, the proxy's entry last) and, towards the origin, X-Forwarded-For.
# Bodies whose framing changes on the way (chunked <-> until-close) are re-framed by the caller
# with ChunkedEncoder. Everything is built as a list of byte strings joined once: no dicts, no
# re-parsing.

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from tsproxy.http.parser import BodyMode, RequestReceived, ResponseReceived

__all__ = [
    "HOP_BY_HOP",
    "ChunkedEncoder",
    "build_client_response_head",
    "build_origin_request_head",
    "client_framing",
    "error_response",
    "strip_hop_by_hop",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 connection-specific fields, plus Trailer and the non-standard Proxy-Connection.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Headers the builders drop on top of the hop-by-hop ones because they write their own.
_ORIGIN_DROP = HOP_BY_HOP | {b"host", b"content-length", b"via", b"x-forwarded-for"}
_ORIGIN_DROP_CLIENT_IP = _ORIGIN_DROP | {b"client-ip"}  # insert_client_ip: ours replaces theirs
_CLIENT_DROP = HOP_BY_HOP | {b"content-length", b"via"}


def _connection_named(headers: Headers) -> set[bytes] | None:
    named: set[bytes] | None = None
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            if named is None:
                named = set()
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    named.add(token)
    return named


def strip_hop_by_hop(headers: Headers) -> Headers:
    """The end-to-end headers of ``headers``: HOP_BY_HOP and Connection-named ones removed."""
    named = _connection_named(headers)
    drop = HOP_BY_HOP if named is None else HOP_BY_HOP | named
    return [(n, v) for n, v in headers if n.lower() not in drop]


def _forward(
    headers: Headers,
    base_drop: frozenset[bytes],
    parts: list[bytes],
    named: frozenset[bytes] | set[bytes] = frozenset(),
) -> tuple[list[bytes], list[bytes]]:
    """Append the kept headers to ``parts``; return the Via and X-Forwarded-For values seen.

    ``named`` are the fields a Connection header names, dropped too (a named Via or
    X-Forwarded-For is dropped rather than merged). The first pass assumes Connection names only
    hop-by-hop fields ("keep-alive", "close"), dropped anyway; Connection may come after the
    fields it names, so when it names anything else the pass is redone with them (rare).
    """
    start = len(parts)
    via: list[bytes] = []
    xff: list[bytes] = []
    connection = b""  # the last Connection value
    connections = 0
    for name, value in headers:
        lname = name.lower()
        if lname in named:
            continue
        if lname in base_drop:
            if lname == b"via":
                via.append(value)
            elif lname == b"x-forwarded-for":
                xff.append(value)
            elif lname == b"connection":
                connection = value
                connections += 1
            continue
        parts += (name, b": ", value, b"\r\n")
    # "Connection: keep-alive" (one hop-by-hop token) is the common case: no set to build.
    if connections and not named and (connections != 1 or connection.lower() not in HOP_BY_HOP):
        extra = _connection_named(headers)
        if extra is not None and not extra <= HOP_BY_HOP:
            del parts[start:]
            return _forward(headers, base_drop, parts, extra)
    return via, xff


def build_origin_request_head(
    ev: RequestReceived,
    *,
    path: bytes,
    host_header: bytes,
    client_ip: str,
    via: bytes | None,
    xff: bool,
    body_framing: BodyMode | None = None,
    client_ip_header: bool = False,
) -> bytes:
    """The request head to send to the origin for the client request ``ev``.

    ``path`` is the origin-form target (from remap), ``host_header`` the Host value to send,
    ``via`` the proxy's name for the Via entry (None: add none), ``xff`` whether to append the
    client's address to X-Forwarded-For. ``body_framing`` defaults to the framing of the request
    body as received (LENGTH keeps its Content-Length, CHUNKED is re-chunked).
    ``client_ip_header`` (proxy.config.http.insert_client_ip) sends ``Client-ip: client_ip``
    in place of any Client-ip the client sent.
    """
    parts: list[bytes] = [ev.method, b" ", path, b" HTTP/1.1\r\nHost: ", host_header, b"\r\n"]
    drop = _ORIGIN_DROP_CLIENT_IP if client_ip_header else _ORIGIN_DROP
    via_seen, xff_seen = _forward(ev.headers, drop, parts)
    if client_ip_header:
        parts += (b"Client-ip: ", client_ip.encode("ascii"), b"\r\n")
    if via is not None:
        via_seen.append(b"%s %s" % (ev.http_version, via))
    if via_seen:
        parts += (b"Via: ", b", ".join(via_seen), b"\r\n")
    if xff:
        xff_seen.append(client_ip.encode("ascii"))
    if xff_seen:
        parts += (b"X-Forwarded-For: ", b", ".join(xff_seen), b"\r\n")
    framing = ev.body if body_framing is None else body_framing
    if framing is BodyMode.LENGTH:
        parts += (b"Content-Length: ", b"%d" % (ev.content_length or 0), b"\r\n")
    elif framing is BodyMode.CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def client_framing(origin_body: BodyMode, client_http_version: bytes) -> BodyMode:
    """How to frame, towards the client, a response body the origin framed as ``origin_body``.

    HTTP/1.1 clients get an until-close body re-chunked so their connection can stay open; HTTP/1.0
    clients cannot read chunked, so a chunked origin body goes to them until close.
    """
    if client_http_version == b"1.1":
        return BodyMode.CHUNKED if origin_body is BodyMode.UNTIL_CLOSE else origin_body
    return BodyMode.UNTIL_CLOSE if origin_body is BodyMode.CHUNKED else origin_body


def build_client_response_head(
    ev: ResponseReceived,
    *,
    via: bytes | None,
    keep_alive: bool,
    framing: BodyMode | None = None,
    client_http_version: bytes = b"1.1",
) -> bytes:
    """The response head to send to the client for the origin response ``ev``.

    ``framing`` is the framing of the body tsproxy sends (see client_framing; default: that
    function for an HTTP/1.1 client). NONE keeps the origin's Content-Length for HEAD/304 answers
    (it describes the representation, not this message). UNTIL_CLOSE forces Connection: close.
    ``keep_alive`` False adds Connection: close; True towards an HTTP/1.0 client adds
    Connection: keep-alive, which 1.0 needs to keep the connection.
    """
    status = ev.status
    if framing is None:
        framing = client_framing(ev.body, client_http_version)
    parts: list[bytes] = [b"HTTP/1.1 %d %s\r\n" % (status, ev.reason)]
    via_seen, _ = _forward(ev.headers, _CLIENT_DROP, parts)
    if via is not None:
        via_seen.append(b"%s %s" % (ev.http_version, via))
    if via_seen:
        parts += (b"Via: ", b", ".join(via_seen), b"\r\n")
    if framing is BodyMode.LENGTH:
        parts += (b"Content-Length: ", b"%d" % (ev.content_length or 0), b"\r\n")
    elif framing is BodyMode.CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif framing is BodyMode.UNTIL_CLOSE:
        keep_alive = False
    elif status >= 200 and status != 204:
        for name, value in ev.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                parts += (name, b": ", value, b"\r\n")
                break
    if status >= 200:
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif client_http_version == b"1.0":
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


ERROR_HEADERS: Final = ((b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store"))


def error_body(status: int, note: str) -> bytes:
    """The body of an answer tsproxy makes itself: the status and its phrase, then ``note``."""
    phrase = status_phrase(status)
    text = f"{status} {phrase}: {_printable(note)}\n" if note else f"{status} {phrase}\n"
    return text.encode("ascii")


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_response(status: int, note: str, *, close: bool) -> bytes:
    """A complete small text/plain response tsproxy generates itself (400, 502, ...).

    The body is the status and its phrase, then ``note`` when it is not empty. Callers keep the
    detail of a failure (origin address, errno, resolver or TLS text) out of ``note``: it goes to
    the log, the client learns nothing about the inside. No Server header (nothing to
    fingerprint); Cache-Control: no-store so no cache keeps it (ERROR_HEADERS, for HTTP/2 too).
    """
    body = error_body(status, note)
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Cache-Control: no-store\r\n" % (status, status_phrase(status).encode("ascii"), len(body))
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def synthetic_response(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool, head_only: bool = False
) -> bytes:
    """A complete response a plugin made (``txn.respond``): its headers, our framing.

    Framing and hop-by-hop headers from the plugin are replaced: Content-Length is always the
    body's, and Connection says close when the connection will close.
    """
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, status_phrase(status).encode("ascii"))]
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"content-length":
            continue
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


class ChunkedEncoder:
    """Frames body data as HTTP/1.1 chunks (no extensions, no trailers)."""

    __slots__ = ()

    def encode(self, data: bytes | memoryview) -> bytes:
        """One chunk holding ``data``; empty data gives b"" (an empty chunk would end the body)."""
        n = len(data)
        if not n:
            return b""
        return b"%x\r\n%s\r\n" % (n, data)

    def end(self) -> bytes:
        return b"0\r\n\r\n"
