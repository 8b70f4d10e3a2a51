"""Bytes-in tests for tsproxy.http.parser: framing, pipelining, limits, smuggling shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsproxy.http.parser import (
    BodyDataReceived,
    BodyMode,
    Event,
    HTTPProtocolError,
    MessageEnded,
    RequestParser,
    RequestReceived,
    ResponseParser,
    ResponseReceived,
)

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
POST_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-X: 1\r\n\r\n"
)


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyDataReceived))


def feed_bytewise(parser: RequestParser | ResponseParser, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    return events


def request_error(data: bytes) -> HTTPProtocolError:
    with pytest.raises(HTTPProtocolError) as info:
        RequestParser().feed(data)
    return info.value


# -- requests ------------------------------------------------------------------------------------


def test_simple_get() -> None:
    events = RequestParser().feed(GET)
    assert events == [
        RequestReceived(
            b"GET",
            b"/a?b=1",
            b"1.1",
            [(b"Host", b"example.com"), (b"Accept", b"*/*")],
            True,
            BodyMode.NONE,
            None,
        ),
        MessageEnded(),
    ]


def test_content_length_body() -> None:
    p = RequestParser()
    events = p.feed(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    head = events[0]
    assert isinstance(head, RequestReceived)
    assert (head.body, head.content_length) == (BodyMode.LENGTH, 5)
    assert events[1:] == [BodyDataReceived(b"hel")]
    assert p.feed(b"lo") == [BodyDataReceived(b"lo"), MessageEnded()]


def test_chunked_body_dechunked_and_trailers_dropped() -> None:
    events = RequestParser().feed(POST_CHUNKED)
    head = events[0]
    assert isinstance(head, RequestReceived)
    assert head.body is BodyMode.CHUNKED and head.content_length is None
    assert head.headers == [(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")]
    assert body_of(events) == b"hello world"
    assert events[-1] == MessageEnded()


@pytest.mark.parametrize("data", [GET, POST_CHUNKED])
def test_split_at_every_byte(data: bytes) -> None:
    whole = RequestParser().feed(data)
    split = feed_bytewise(RequestParser(), data)
    assert split[0] == whole[0]
    assert body_of(split) == body_of(whole)
    assert split[-1] == MessageEnded()


def test_pipelined_requests_in_order() -> None:
    data = GET + POST_CHUNKED + b"GET /last HTTP/1.1\r\nHost: b\r\n\r\n"
    events = RequestParser().feed(data)
    heads = [e for e in events if isinstance(e, RequestReceived)]
    assert [h.target for h in heads] == [b"/a?b=1", b"/up", b"/last"]
    assert events.count(MessageEnded()) == 3
    assert body_of(events) == b"hello world"


def test_between_messages_only_at_a_request_boundary() -> None:
    # The proxy lends a parser that is between messages to another connection: it must say so
    # only when nothing of a next request (not even part of its request line) has been fed.
    p = RequestParser()
    assert p.between_messages
    p.feed(GET[:5])
    assert not p.between_messages and p.in_head
    p.feed(GET[5:] + b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab")
    assert not p.between_messages  # in a body
    assert p.feed(b"c") == [BodyDataReceived(b"c"), MessageEnded()]
    assert p.between_messages
    with pytest.raises(HTTPProtocolError):
        p.feed(b"BAD\r\n\r\n")
    assert not p.between_messages  # dead
    closing = RequestParser()
    closing.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not closing.between_messages


def test_http_version_per_message_whatever_the_feed_boundaries() -> None:
    # The version of a feed's first message is read from its raw request/status line (a shortcut
    # around llhttp's slow getter): every other message, and every split, must still be right.
    r11 = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    r10 = b"GET /b HTTP/1.0\r\n\r\n"
    data = r11 + r10 + r11
    for cut in range(len(data) + 1):
        p = RequestParser()
        events = p.feed(data[:cut]) + (p.feed(data[cut:]) if cut < len(data) else [])
        heads = [e for e in events if isinstance(e, RequestReceived)]
        assert [h.http_version for h in heads] == [b"1.1", b"1.0"], cut  # 1.0 without keep-alive ends it
    p = RequestParser()
    events = p.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + r11)
    assert [e.http_version for e in events if isinstance(e, RequestReceived)] == [b"1.0", b"1.1"]
    assert request_error(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n").status == 505
    resp = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    )
    for cut in range(len(resp) + 1):
        rp = ResponseParser()
        rp.start(b"GET")
        events = rp.feed(resp[:cut]) + rp.feed(resp[cut:])
        heads = [e for e in events if isinstance(e, ResponseReceived)]
        assert [(h.status, h.http_version) for h in heads] == [(100, b"1.1"), (200, b"1.0")], cut


def test_connection_close_stops_parsing() -> None:
    p = RequestParser()
    events = p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
    assert isinstance(events[0], RequestReceived) and not events[0].keep_alive
    assert events[1:] == [MessageEnded()]
    assert p.closed
    assert p.feed(b"more") == []


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
    ],
)
def test_keep_alive_semantics(head: bytes, keep_alive: bool) -> None:
    ev = RequestParser().feed(head)[0]
    assert isinstance(ev, RequestReceived)
    assert ev.keep_alive is keep_alive
    assert ev.http_version == head[11:14]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"CONNECT a.com:443 HTTP/1.1\r\nHost: a.com:443\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
    ],
)
def test_malformed_and_smuggling_shapes(data: bytes, status: int) -> None:
    assert request_error(data).status == status


@pytest.mark.parametrize("te", [b"chunked", b"identity", b"gzip, chunked"])
def test_http10_request_with_transfer_encoding_is_400(te: bytes) -> None:
    # RFC 9112 6.1: faulty framing. Nothing after it is parsed, not even with keep-alive.
    p = RequestParser()
    data = (
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\nTransfer-Encoding: %s\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n" % te
    )
    with pytest.raises(HTTPProtocolError) as info:
        p.feed(data)
    assert info.value.status == 400
    assert [e.target for e in info.value.events_before if isinstance(e, RequestReceived)] == [b"/first"]
    with pytest.raises(HTTPProtocolError):
        p.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")


def test_header_names_with_underscore_dropped_and_counted() -> None:
    head = (
        b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nX-Ok: 1\r\n"
        b"Content_Length: 5\r\nTransfer_Encoding: chunked\r\n\r\n"
    )
    p = RequestParser()
    events = p.feed(head)
    req = events[0]
    assert isinstance(req, RequestReceived)
    assert req.headers == [(b"Host", b"a"), (b"X-Ok", b"1")]
    assert (req.body, events[-1]) == (BodyMode.NONE, MessageEnded())  # no framing from them
    assert p.underscores_dropped == 3
    allowed = RequestParser(allow_underscores=True).feed(head)[0]
    assert isinstance(allowed, RequestReceived) and len(allowed.headers) == 5
    # However the head is split: byte by byte, or the "_" in an earlier feed than the name's end.
    p = RequestParser()
    events = feed_bytewise(p, head + GET)
    first = next(e for e in events if isinstance(e, RequestReceived))
    assert first.headers == [(b"Host", b"a"), (b"X-Ok", b"1")]
    assert p.underscores_dropped == 3
    p = RequestParser()
    assert p.feed(b"GET /a_b HTTP/1.1\r\nHost: a\r\nX_Forw") == []
    req = p.feed(b"arded-For: 1\r\nUser-Agent: x86_64\r\n\r\n")[0]
    assert isinstance(req, RequestReceived) and req.headers == [(b"Host", b"a"), (b"User-Agent", b"x86_64")]
    assert (p.underscores_dropped, req.target) == (1, b"/a_b")
    # Dropped headers still count against the header section size.
    with pytest.raises(HTTPProtocolError) as info:
        RequestParser(max_header_size=1024).feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"A_B: x\r\n" * 200)
    assert info.value.status == 431


@pytest.mark.parametrize("line", [b"GET /", b"\x00" * 6, b"GET / HTTP/1.1x"[:8]])
def test_short_first_line_is_a_protocol_error(line: bytes) -> None:
    # A first line shorter than " HTTP/1.1" followed by more bytes: the compiled parser raised
    # SystemError here (a negative slice start), which closed the connection without an answer
    # and logged a traceback per request.
    error = request_error(line + b"\r\nHost: a\r\nX: y\r\n\r\n")
    assert 400 <= error.status < 600


def test_target_too_long_414() -> None:
    assert request_error(b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: a\r\n\r\n").status == 414
    ok = RequestParser().feed(b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(ok[0], RequestReceived)


def test_too_many_headers_431() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 100 + b"\r\n"
    assert request_error(head).status == 431
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 99 + b"\r\n"
    assert isinstance(RequestParser().feed(ok)[0], RequestReceived)


def test_header_section_too_large_431() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"v" * 2000 + b"\r\n\r\n"
    with pytest.raises(HTTPProtocolError) as info:
        RequestParser(max_header_size=1024).feed(big)
    assert info.value.status == 431


def test_endless_header_value_is_bounded() -> None:
    # llhttp keeps a partial header in C; the parser must still stop a never-ending one.
    p = RequestParser(max_header_size=4096)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(HTTPProtocolError) as info:
        for _ in range(100):
            p.feed(b"v" * 1000)
    assert info.value.status == 431


def test_error_kills_parser() -> None:
    p = RequestParser()
    with pytest.raises(HTTPProtocolError):
        p.feed(b"BAD\x00\r\n\r\n")
    with pytest.raises(HTTPProtocolError):
        p.feed(GET)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    p = RequestParser()
    try:
        for chunk in chunks:
            p.feed(chunk)
    except HTTPProtocolError as exc:
        assert 400 <= exc.status < 600


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_random_bytes_after_valid_prefix(tail: bytes, cut: int) -> None:
    data = (GET + POST_CHUNKED)[:cut] + tail
    try:
        RequestParser().feed(data)
    except HTTPProtocolError as exc:
        assert 400 <= exc.status < 600


# -- responses -----------------------------------------------------------------------------------

OK_1K = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nX: y\r\n\r\n" + b"x" * 1024
CHUNKED_RESP = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n"
)


def response(data: bytes, method: bytes = b"GET") -> tuple[ResponseParser, list[Event]]:
    p = ResponseParser()
    p.start(method)
    return p, p.feed(data)


def test_length_response() -> None:
    p, events = response(OK_1K)
    head = events[0]
    assert isinstance(head, ResponseReceived)
    assert (head.status, head.reason, head.http_version) == (200, b"OK", b"1.1")
    assert (head.body, head.content_length, head.keep_alive) == (BodyMode.LENGTH, 1024, True)
    assert body_of(events) == b"x" * 1024
    assert events[-1] == MessageEnded()
    assert p.reusable


def test_chunked_response_split_at_every_byte() -> None:
    p = ResponseParser()
    p.start(b"GET")
    events = feed_bytewise(p, CHUNKED_RESP)
    head = events[0]
    assert isinstance(head, ResponseReceived) and head.body is BodyMode.CHUNKED
    assert body_of(events) == b"wikipedia in\r\n\r\nchunks."
    assert events[-1] == MessageEnded()
    assert events.count(MessageEnded()) == 1


def test_keep_alive_sequence_of_responses() -> None:
    p = ResponseParser()
    for _ in range(3):
        p.start(b"GET")
        events = p.feed(OK_1K)
        assert events[-1] == MessageEnded()
        assert body_of(events) == b"x" * 1024


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_head_response_has_no_body(data: bytes) -> None:
    p, events = response(data, b"HEAD")
    head = events[0]
    assert isinstance(head, ResponseReceived)
    assert head.body is BodyMode.NONE and head.keep_alive
    assert events[1:] == [MessageEnded()]
    assert p.reusable
    # the next response on the connection parses normally
    p.start(b"GET")
    assert p.feed(OK_1K)[-1] == MessageEnded()


def test_head_response_split_at_every_byte() -> None:
    p = ResponseParser()
    p.start(b"HEAD")
    events = feed_bytewise(p, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(events[0], ResponseReceived) and events[0].content_length is None
    assert events[1:] == [MessageEnded()]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    p, events = response(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert isinstance(events[0], ResponseReceived) and events[0].body is BodyMode.NONE
    assert events[1:] == [MessageEnded()]
    assert p.reusable


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_interim_1xx_then_final(method: bytes) -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK_1K
    p, events = response(data[:30], method)
    events += p.feed(data[30:])
    heads = [e for e in events if isinstance(e, ResponseReceived)]
    assert [h.status for h in heads] == [100, 103, 200]
    assert heads[0].body is BodyMode.NONE
    assert events.count(MessageEnded()) == 1 and events[-1] == MessageEnded()


def test_101_is_refused() -> None:
    with pytest.raises(HTTPProtocolError) as info:
        response(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    assert info.value.status == 502


def test_until_close_body() -> None:
    p, events = response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
    head = events[0]
    assert isinstance(head, ResponseReceived)
    assert (head.body, head.keep_alive, head.http_version) == (BodyMode.UNTIL_CLOSE, False, b"1.0")
    events = p.feed(b" more")
    assert events == [BodyDataReceived(b" more")]
    assert p.feed_eof() == [MessageEnded()]
    assert not p.reusable


def test_connection_close_response() -> None:
    p, events = response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseReceived) and not events[0].keep_alive
    assert events[-1] == MessageEnded()
    assert not p.reusable


def test_http10_keep_alive_response() -> None:
    _, events = response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(events[0], ResponseReceived) and events[0].keep_alive


def test_http10_response_with_transfer_encoding_is_read_then_not_reused() -> None:
    p, events = response(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, ResponseReceived) and not head.keep_alive
    assert (body_of(events), events[-1]) == (b"hello", MessageEnded())
    assert not p.reusable


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
)
def test_eof_truncation_is_502(data: bytes) -> None:
    p, _ = response(data)
    with pytest.raises(HTTPProtocolError) as info:
        p.feed_eof()
    assert info.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
        b"<html>not http</html>",
    ],
)
def test_bad_responses_are_502(data: bytes) -> None:
    with pytest.raises(HTTPProtocolError) as info:
        response(data)
    assert info.value.status == 502


def test_unsolicited_data_makes_connection_unusable() -> None:
    p, events = response(OK_1K + b"HTTP/1.1 200 OK\r\n")
    assert events[-1] == MessageEnded()
    assert not p.reusable
    with pytest.raises(HTTPProtocolError):
        p.start(b"GET")
