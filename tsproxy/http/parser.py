# HTTP/1.1 message parsing for tsproxy, sans-IO, on top of llhttp (via httptools).
#
# Theory of operation
# -------------------
# RequestParser reads the client side of a connection, ResponseParser the origin side. Both take
# bytes in (``feed``) and give events out: a head event (RequestReceived / ResponseReceived), zero
# or more BodyDataReceived, then MessageEnded. Bodies are handed on as they arrive, de-chunked;
# nothing buffers a whole body. llhttp does the byte-level work in C; the Python callbacks below
# only collect the head, enforce tsproxy's limits and choose the body mode, so the per-request cost
# is one Python call per header plus a handful per message (scripts/bench_parsers.py measures it).
#
# Request parser states (_State):
#   IDLE   -- between messages; the next byte starts a new request (pipelining is allowed).
#   HEAD   -- inside a request line / header section; limits on size and count apply.
#   BODY   -- head delivered, body bytes flowing until MessageEnded.
#   CLOSED -- a message with keep_alive=False has ended; further bytes are ignored, the caller
#             closes the connection.
#   DEAD   -- an HTTPProtocolError was raised; every later feed raises it again.
#
# Response parser states: AWAIT (start() not called), IDLE (started, no byte yet), HEAD, BODY,
# DONE (final response ended), DEAD. 1xx responses other than 101 produce a ResponseReceived with
# body NONE and no MessageEnded; the parser stays in IDLE for the final response.
#
# llhttp cannot be told that a response answers a HEAD request (httptools hides the return value of
# on_headers_complete). For HEAD we therefore split the head off ourselves at the first CRLFCRLF
# (llhttp is strict: no bare LF line endings, so that is exactly the end of the head), feed only the
# head to llhttp, end the message at headers-complete and make a fresh llhttp parser for the next
# response.
#
# Invariants: the parser never raises anything but HTTPProtocolError; an error kills the parser;
# smuggling shapes (CL+TE, differing duplicate CL, a transfer-coding other than exactly "chunked",
# Transfer-Encoding in an HTTP/1.0 request, obs-fold, bare CR, bad chunk sizes) are errors, never
# guessed at. An HTTP/1.0 response with Transfer-Encoding is read as chunked but never keep-alive.
# Request header names with "_" are dropped (counted in underscores_dropped) unless the parser
# was made with allow_underscores.

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NoReturn

import httptools
from httptools.parser.errors import HttpParserError, HttpParserUpgrade

from iocore.records.errors import TSError

__all__ = [
    "MAX_HEADERS",
    "MAX_TARGET_SIZE",
    "BodyDataReceived",
    "BodyMode",
    "Event",
    "HTTPProtocolError",
    "MessageEnded",
    "RequestParser",
    "RequestReceived",
    "ResponseParser",
    "ResponseReceived",
]

MAX_TARGET_SIZE = 8192
MAX_HEADERS = 100
_HEADER_OVERHEAD = 4  # ": " and CRLF, for the header-section size count


class HTTPProtocolError(TSError):
    """The peer sent something that is not acceptable HTTP/1.1; ``status`` is the answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        # Events parsed from the same feed before the error (e.g. a good pipelined request in
        # front of a bad one): the caller answers those first, then the error.
        self.events_before: list[Event] = []
        super().__init__(f"{status} {reason}")


class BodyMode(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


@dataclass(slots=True)
class RequestReceived:
    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body: BodyMode
    content_length: int | None


@dataclass(slots=True)
class ResponseReceived:
    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    body: BodyMode
    content_length: int | None


@dataclass(slots=True)
class BodyDataReceived:
    data: bytes


@dataclass(slots=True)
class MessageEnded:
    pass


# The events are plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ goes
# through object.__setattr__ per field (~3x the cost), and one head event per message is hot.
# Nobody mutates an event; a plugin rewriting the target makes a new one (dataclasses.replace).
Event = RequestReceived | ResponseReceived | BodyDataReceived | MessageEnded

_MESSAGE_ENDED = MessageEnded()


class _State(enum.Enum):
    AWAIT = "await"
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    DONE = "done"
    CLOSED = "closed"
    DEAD = "dead"


# The states as module globals: the callbacks below run once per header, and a global lookup is
# cheaper than _State.X (a global plus a class attribute lookup).
_AWAIT = _State.AWAIT
_IDLE = _State.IDLE
_HEAD = _State.HEAD
_BODY = _State.BODY
_DONE = _State.DONE
_CLOSED = _State.CLOSED
_DEAD = _State.DEAD
_NONE = BodyMode.NONE
_LENGTH = BodyMode.LENGTH
_CHUNKED = BodyMode.CHUNKED
_UNTIL_CLOSE = BodyMode.UNTIL_CLOSE


class _Stop(Exception):
    """Raised inside an llhttp callback to stop parsing on purpose (not an error)."""


_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}

# httptools' get_http_version() formats a str on every call (~0.3 us, one call per message). When a
# feed starts at a message boundary, the version of that first message is read from the raw bytes
# instead: a request line ending in " HTTP/1.1", a status line starting "HTTP/1.1 ". llhttp parses
# exactly those bytes as the version, so the hint is exact; it is used by that message's
# on_headers_complete only, and every other case still asks llhttp.
_REQUEST_LINE_11 = b" HTTP/1.1"
_STATUS_LINE_11 = b"HTTP/1.1 "
_NO_BODY_STATUS = frozenset({204, 304})


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",")}


class RequestParser:
    """Parses the requests a client sends on one connection (see the module comment)."""

    __slots__ = (
        "_allow_underscores",
        "_body_mode",
        "_cl",
        "_error",
        "_events",
        "_head_fed",
        "_head_size",
        "_headers",
        "_host_count",
        "_keep_alive",
        "_max_header_size",
        "_p",
        "_state",
        "_te",
        "_underscore_in_head",
        "_url",
        "_version_hint",
        "underscores_dropped",
    )

    def __init__(self, max_header_size: int = 131072, allow_underscores: bool = False) -> None:
        self._max_header_size = max_header_size
        self._allow_underscores = allow_underscores
        # Header fields dropped because their name has a "_" (see on_headers_complete); the
        # caller counts them and sets this back to 0.
        self.underscores_dropped = 0
        # The bytes of the head being parsed may hold a "_" (see feed): only then does
        # on_headers_complete look for one in the names.
        self._underscore_in_head = False
        self._p: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._state = _IDLE
        self._error: HTTPProtocolError | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_fed = 0
        self._host_count = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._keep_alive = True
        self._body_mode = _NONE
        self._version_hint: bytes | None = None

    @property
    def closed(self) -> bool:
        """True once a keep_alive=False message has ended; the caller should close."""
        return self._state is _CLOSED

    @property
    def in_head(self) -> bool:
        """Part of a request head arrived, not all of it (the caller bounds how long that lasts)."""
        return self._state is _HEAD

    @property
    def between_messages(self) -> bool:
        """Every request fed so far has ended and no byte of a next one has arrived: the parser
        holds nothing of this connection (it may go on parsing another connection's requests)."""
        return self._state is _IDLE

    @property
    def max_header_size(self) -> int:
        return self._max_header_size

    @property
    def allow_underscores(self) -> bool:
        return self._allow_underscores

    def close(self) -> None:
        """Done with this parser: later feeds return nothing. llhttp holds this object's
        callbacks, a reference cycle that this breaks, so the pair is freed at once."""
        self._state = _CLOSED
        self._error = None  # its traceback holds this parser's frames: a cycle too
        self._p = None

    def feed(self, data: bytes | memoryview) -> list[Event]:
        state = self._state
        if state is _CLOSED:
            return []
        if state is _DEAD:
            assert self._error is not None
            raise self._error
        events: list[Event] = []
        self._events = events
        eol = 0
        if state is _IDLE and type(data) is bytes:
            eol = data.find(b"\r\n")
            # eol >= 9, not > 0: a negative slice start is wrong in CPython (it counts from the
            # end) and, compiled by mypyc, raises SystemError when it lands after eol.
            if eol >= 9 and data[eol - 9 : eol] == _REQUEST_LINE_11:
                self._version_hint = b"1.1"  # see _REQUEST_LINE_11
        if not self._allow_underscores:
            # One scan per feed instead of one per header name: a name with "_" lies in this
            # feed's bytes (after the request line that starts it, if it starts one), or in the
            # earlier feeds of a head still in progress (_HEAD).
            if type(data) is not bytes or data.find(b"_", eol if eol > 0 else 0) >= 0:
                self._underscore_in_head = True
            elif state is not _HEAD:
                self._underscore_in_head = False
        try:
            self._p.feed_data(data)  # type: ignore[union-attr]  # None only once _CLOSED
        except HttpParserUpgrade as exc:  # defensive: on_headers_complete refuses upgrades first
            raise self._failed_with(events, self._fail(501, "protocol upgrade is not supported")) from exc
        except HttpParserError as exc:
            if self._state is _CLOSED:
                return events
            if self._error is not None:
                self._state = _DEAD
                raise self._failed_with(events, self._error) from None
            raise self._failed_with(events, self._fail(400, str(exc) or "malformed request")) from exc
        if self._state is _HEAD:
            # llhttp accumulates a long header name/value in C without calling us; bound it here.
            self._head_fed = self._head_fed + len(data) if state is _HEAD else 0
            if self._head_fed > self._max_header_size:
                raise self._failed_with(events, self._fail(431, "request header section too large"))
        return events

    @staticmethod
    def _failed_with(events: list[Event], error: HTTPProtocolError) -> HTTPProtocolError:
        # Only complete messages count: a head whose body was cut by the error is dropped.
        last_end = max((i for i, ev in enumerate(events) if ev is _MESSAGE_ENDED), default=-1)
        error.events_before = events[: last_end + 1]
        return error

    def _fail(self, status: int, reason: str) -> HTTPProtocolError:
        self._state = _DEAD
        self._error = HTTPProtocolError(status, reason)
        return self._error

    def _abort(self, status: int, reason: str) -> NoReturn:
        """Called from inside a callback: record the error and stop llhttp."""
        raise self._fail(status, reason)

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_fed = 0
        self._host_count = 0
        self._cl = None
        self._te = None

    def on_url(self, url: bytes) -> None:
        url = self._url + url
        self._url = url
        if len(url) > MAX_TARGET_SIZE:
            self._abort(414, "request-target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state is not _HEAD:
            return  # a chunked trailer: not forwarded
        headers = self._headers
        headers.append((name, value))
        n = len(name)
        size = self._head_size + n + len(value) + _HEADER_OVERHEAD
        self._head_size = size
        if len(headers) > MAX_HEADERS:
            self._abort(431, "too many request headers")
        if size > self._max_header_size:
            self._abort(431, "request header section too large")
        # Only three names matter here; their lengths tell them apart before any lower().
        if n == 4:
            if name.lower() == b"host":
                self._host_count += 1
        elif n == 14:
            if name.lower() == b"content-length":
                if self._cl is not None and self._cl != value:
                    self._abort(400, "conflicting Content-Length")
                self._cl = value
        elif n == 17 and name.lower() == b"transfer-encoding":
            if self._te is not None:
                # A coding list split over two headers ("gzip" + "chunked") must not be read
                # as its last half: refuse rather than guess (request smuggling).
                self._abort(400, "more than one Transfer-Encoding header")
            self._te = value

    def on_headers_complete(self) -> None:
        p = self._p
        assert p is not None  # llhttp calls back only while it exists
        version = self._version_hint
        if version is None:
            version = _VERSIONS.get(p.get_http_version())
            if version is None:
                self._abort(505, "HTTP version not supported")
        else:
            self._version_hint = None
        method: bytes = p.get_method()
        if method == b"CONNECT":
            self._abort(501, "CONNECT is not supported")
        if p.should_upgrade():
            self._abort(501, "protocol upgrade is not supported")
        headers = self._headers
        if self._underscore_in_head and b"".join([h[0] for h in headers]).find(b"_") >= 0:
            # CGI-style origins read X_Forwarded_For as X-Forwarded-For: a client could forge
            # the header the proxy sets. Dropped, as nginx does (underscores_in_headers off).
            # One find on the names joined costs less than one per name. on_header never took
            # such a name for Host, Content-Length or Transfer-Encoding ("_" is not "-").
            kept = [h for h in headers if h[0].find(b"_") < 0]
            self.underscores_dropped += len(headers) - len(kept)
            headers = kept
        hosts = self._host_count
        if hosts != 1 and (hosts or version == b"1.1"):
            self._abort(400, "request needs exactly one Host header")
        cl: int | None = None
        te = self._te
        if te is not None:
            if version == b"1.0":
                # RFC 9112 6.1: the framing of an HTTP/1.0 message with Transfer-Encoding is
                # faulty; nothing after it on this connection can be trusted either.
                self._abort(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != b"chunked":
                self._abort(400, "unsupported Transfer-Encoding")
            body = _CHUNKED
        elif self._cl is not None:
            cl = int(self._cl)
            body = _LENGTH
        else:
            body = _NONE
        keep_alive = p.should_keep_alive()
        self._keep_alive = keep_alive
        self._body_mode = body
        self._state = _BODY
        self._events.append(RequestReceived(method, self._url, version, headers, keep_alive, body, cl))

    def on_body(self, body: bytes) -> None:
        self._events.append(BodyDataReceived(body))

    def on_message_complete(self) -> None:
        self._events.append(_MESSAGE_ENDED)
        if self._keep_alive:
            self._state = _IDLE
        else:
            self._state = _CLOSED
            raise _Stop


class ResponseParser:
    """Parses the responses an origin sends on one connection; call start() before each one."""

    __slots__ = (
        "_body_mode",
        "_buf",
        "_cl",
        "_error",
        "_events",
        "_head_fed",
        "_head_request",
        "_head_size",
        "_headers",
        "_interim",
        "_keep_alive",
        "_max_header_size",
        "_max_headers",
        "_p",
        "_reason",
        "_state",
        "_te",
        "_unsolicited",
        "_version_hint",
    )

    def __init__(self, max_header_size: int = 131072, max_headers: int = 256) -> None:
        self._max_header_size = max_header_size
        self._max_headers = max_headers
        self._p: httptools.HttpResponseParser | None = None
        self._events: list[Event] = []
        self._state = _AWAIT
        self._error: HTTPProtocolError | None = None
        self._head_request = False
        self._buf = bytearray()
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_fed = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._interim = False
        self._keep_alive = False
        self._body_mode = _NONE
        self._unsolicited = False
        self._version_hint: bytes | None = None

    @property
    def reusable(self) -> bool:
        """True when the last response ended cleanly and the connection may carry another request."""
        return self._state is _DONE and self._keep_alive and not self._unsolicited

    def close(self) -> None:
        """Done with this parser (its connection closed): drop llhttp, which holds this object's
        callbacks, a reference cycle. A later start() makes a new one."""
        self._p = None

    def start(self, request_method: bytes) -> None:
        """Prepare for the response to a request sent with ``request_method``."""
        state = self._state
        if state is _DEAD:
            assert self._error is not None
            raise self._error
        if self._unsolicited:
            raise self._fail("origin sent data after the response")
        if state is not _DONE and state is not _AWAIT:
            raise self._fail("start() called before the previous response ended")
        head = request_method == b"HEAD"
        if self._p is None or head or self._head_request or not self._keep_alive:
            self._p = httptools.HttpResponseParser(self)
        self._head_request = head
        self._keep_alive = True
        self._state = _IDLE
        self._version_hint = None

    def feed(self, data: bytes | memoryview) -> list[Event]:
        state = self._state
        if state is _DEAD:
            assert self._error is not None
            raise self._error
        if state is _DONE or state is _AWAIT:
            if data:
                self._unsolicited = True
            return []
        events: list[Event] = []
        self._events = events
        if self._head_request:
            self._feed_head_only(data)
            return events
        if state is _IDLE and data[:9] == _STATUS_LINE_11:
            self._version_hint = b"1.1"  # see _STATUS_LINE_11
        self._run(data)
        if self._state is _HEAD:
            self._head_fed = self._head_fed + len(data) if state is _HEAD else 0
            if self._head_fed > self._max_header_size:
                raise self._fail("response header section too large")
        return events

    def feed_eof(self) -> list[Event]:
        """The origin closed its side: end an UNTIL_CLOSE body, or report the truncation."""
        state = self._state
        if state is _DEAD:
            assert self._error is not None
            raise self._error
        if state is _AWAIT or state is _DONE:
            self._keep_alive = False
            return []
        if state is _BODY and self._body_mode is _UNTIL_CLOSE:
            self._state = _DONE
            self._keep_alive = False
            return [_MESSAGE_ENDED]
        if state is _IDLE and not self._buf and not self._interim:
            raise self._fail("origin closed the connection without a response")
        if state is _BODY:
            raise self._fail("origin closed the connection in the middle of the body")
        raise self._fail("origin closed the connection in the middle of the response head")

    def _fail(self, reason: str) -> HTTPProtocolError:
        self._state = _DEAD
        self._error = HTTPProtocolError(502, reason)
        return self._error

    def _abort(self, reason: str) -> NoReturn:
        raise self._fail(reason)

    def _run(self, data: bytes | memoryview) -> None:
        assert self._p is not None
        try:
            self._p.feed_data(data)
        except HttpParserUpgrade as exc:
            raise self._fail("unexpected protocol upgrade from origin") from exc
        except HttpParserError as exc:
            if self._error is not None:
                self._state = _DEAD
                raise self._error from None
            if self._state is _DONE:  # stopped on purpose (unsolicited data / close)
                return
            raise self._fail(f"malformed response: {exc}") from exc

    def _feed_head_only(self, data: bytes | memoryview) -> None:
        buf = self._buf
        buf += data
        while self._state is not _DONE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_header_size:
                    raise self._fail("response header section too large")
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            self._run(head)
        if buf:
            self._unsolicited = True
            buf.clear()

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state is _DONE:
            self._unsolicited = True
            raise _Stop
        self._state = _HEAD
        self._reason = b""
        self._headers = []
        self._head_size = 0
        self._head_fed = 0
        self._cl = None
        self._te = None
        self._interim = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state is not _HEAD:
            return  # a chunked trailer: not forwarded
        headers = self._headers
        headers.append((name, value))
        n = len(name)
        size = self._head_size + n + len(value) + _HEADER_OVERHEAD
        self._head_size = size
        if len(headers) > self._max_headers:
            self._abort("too many response headers")
        if size > self._max_header_size:
            self._abort("response header section too large")
        # Only the framing headers matter here; their lengths tell them apart before any lower().
        if n == 14:
            if name.lower() == b"content-length":
                if self._cl is not None and self._cl != value:
                    self._abort("conflicting Content-Length")
                self._cl = value
        elif n == 17 and name.lower() == b"transfer-encoding":
            if self._te is not None:
                # As for requests: a coding list split over two headers is refused.
                self._abort("more than one Transfer-Encoding header")
            self._te = value

    def on_headers_complete(self) -> None:
        p = self._p
        assert p is not None
        version = self._version_hint
        if version is None:
            version = _VERSIONS.get(p.get_http_version())
            if version is None:
                self._abort("unsupported HTTP version from origin")
        else:
            self._version_hint = None
        status: int = p.get_status_code()
        cl: int | None = None
        if status < 200:
            if status == 101:
                self._abort("unexpected 101 Switching Protocols from origin")
            self._interim = True
            self._events.append(
                ResponseReceived(status, self._reason, version, self._headers, True, _NONE, None)
            )
            return
        te = self._te
        head_request = self._head_request
        if te is not None and te.strip().lower() != b"chunked":
            self._abort("unsupported Transfer-Encoding from origin")
        if head_request or status in _NO_BODY_STATUS:
            body = _NONE
        elif te is not None:
            body = _CHUNKED
        elif self._cl is not None:
            body = _LENGTH
            cl = int(self._cl)
        else:
            body = _UNTIL_CLOSE
        if body is _UNTIL_CLOSE:
            keep_alive = False
        elif head_request:
            # llhttp's should_keep_alive() thinks a HEAD response without framing needs EOF.
            tokens = _connection_tokens(
                [v for n, v in self._headers if len(n) == 10 and n.lower() == b"connection"]
            )
            keep_alive = b"close" not in tokens if version == b"1.1" else b"keep-alive" in tokens
        else:
            keep_alive = p.should_keep_alive()
        if te is not None and version == b"1.0":
            # RFC 9112 6.1: faulty framing; read it as chunked, then close (never pool it).
            keep_alive = False
        self._keep_alive = keep_alive
        self._body_mode = body
        self._events.append(
            ResponseReceived(status, self._reason, version, self._headers, keep_alive, body, cl)
        )
        if head_request:
            self._events.append(_MESSAGE_ENDED)
            self._state = _DONE
            self._p = None  # llhttp still expects a body; the next response gets a fresh parser
            raise _Stop
        self._state = _BODY

    def on_body(self, body: bytes) -> None:
        self._events.append(BodyDataReceived(body))

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._state = _IDLE
            return
        if self._state is _DONE:
            return
        self._events.append(_MESSAGE_ENDED)
        self._state = _DONE
        if not self._keep_alive:
            raise _Stop
