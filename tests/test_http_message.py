"""Bytes-in tests for tsproxy.http.message: what the origin and the client actually receive."""

from __future__ import annotations

from tsproxy.http.message import (
    ChunkedEncoder,
    build_client_response_head,
    build_origin_request_head,
    client_framing,
    error_response,
    strip_hop_by_hop,
)
from tsproxy.http.parser import (
    BodyDataReceived,
    BodyMode,
    MessageEnded,
    RequestParser,
    RequestReceived,
    ResponseParser,
    ResponseReceived,
)


def request(data: bytes) -> RequestReceived:
    ev = RequestParser().feed(data)[0]
    assert isinstance(ev, RequestReceived)
    return ev


def response(data: bytes, method: bytes = b"GET") -> ResponseReceived:
    p = ResponseParser()
    p.start(method)
    ev = p.feed(data)[0]
    assert isinstance(ev, ResponseReceived)
    return ev


def head_lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_strip_hop_by_hop_including_connection_named() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret", b"1"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X"),
        (b"Upgrade", b"h2c"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Accept", b"*/*"),
        (b"connection", b"Other"),
        (b"other", b"2"),
    ]
    assert strip_hop_by_hop(headers) == [(b"Host", b"a"), (b"Accept", b"*/*")]


def test_origin_request_head() -> None:
    ev = request(
        b"GET /app/x?q=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: t\r\n"
        b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nVia: 1.0 upstream\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\n\r\n"
    )
    head = build_origin_request_head(
        ev, path=b"/x?q=1", host_header=b"origin:8080", client_ip="192.0.2.7", via=b"tsproxy", xff=True
    )
    assert head_lines(head) == [
        b"GET /x?q=1 HTTP/1.1",
        b"Host: origin:8080",
        b"User-Agent: t",
        b"Accept: */*",
        b"Via: 1.0 upstream, 1.1 tsproxy",
        b"X-Forwarded-For: 10.0.0.1, 192.0.2.7",
    ]


def test_origin_request_head_without_via_or_xff() -> None:
    ev = request(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    head = build_origin_request_head(ev, path=b"/", host_header=b"o", client_ip="::1", via=None, xff=False)
    assert head_lines(head) == [b"GET / HTTP/1.1", b"Host: o"]
    head = build_origin_request_head(ev, path=b"/", host_header=b"o", client_ip="::1", via=b"p", xff=True)
    assert head_lines(head)[2:] == [b"Via: 1.0 p", b"X-Forwarded-For: ::1"]


def test_origin_request_framing() -> None:
    ev = request(b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nhello")
    head = build_origin_request_head(
        ev, path=b"/", host_header=b"o", client_ip="1.2.3.4", via=None, xff=False
    )
    assert head_lines(head)[2:] == [b"Content-Length: 5"]
    ev = request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    head = build_origin_request_head(
        ev, path=b"/", host_header=b"o", client_ip="1.2.3.4", via=None, xff=False
    )
    assert head_lines(head)[2:] == [b"Transfer-Encoding: chunked"]


def test_client_response_head_length() -> None:
    ev = response(
        b"HTTP/1.1 200 OK\r\nServer: o\r\nConnection: keep-alive\r\nKeep-Alive: timeout=3\r\n"
        b"Via: 1.1 cdn\r\nContent-Length: 3\r\n\r\nabc"
    )
    head = build_client_response_head(ev, via=b"tsproxy", keep_alive=True)
    assert head_lines(head) == [
        b"HTTP/1.1 200 OK",
        b"Server: o",
        b"Via: 1.1 cdn, 1.1 tsproxy",
        b"Content-Length: 3",
    ]
    head = build_client_response_head(ev, via=None, keep_alive=False)
    assert head_lines(head)[-1] == b"Connection: close"


def test_until_close_rechunked_for_http11_client() -> None:
    p = ResponseParser()
    p.start(b"GET")
    events = p.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
    ev = events[0]
    assert isinstance(ev, ResponseReceived) and ev.body is BodyMode.UNTIL_CLOSE
    head = build_client_response_head(ev, via=None, keep_alive=True)
    assert head_lines(head) == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: text/plain",
        b"Transfer-Encoding: chunked",
    ]
    enc = ChunkedEncoder()
    out = head
    for e in [*events[1:], *p.feed(b"defghijklmnopq"), *p.feed_eof()]:
        if isinstance(e, BodyDataReceived):
            out += enc.encode(e.data)
        elif isinstance(e, MessageEnded):
            out += enc.end()
    assert out.endswith(b"\r\n\r\n3\r\nabc\r\ne\r\ndefghijklmnopq\r\n0\r\n\r\n")


def test_until_close_for_http10_client_closes() -> None:
    ev = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    framing = client_framing(ev.body, b"1.0")
    assert framing is BodyMode.UNTIL_CLOSE
    head = build_client_response_head(
        ev, via=None, keep_alive=True, framing=framing, client_http_version=b"1.0"
    )
    assert head_lines(head) == [b"HTTP/1.1 200 OK", b"Connection: close"]


def test_http10_client_keep_alive_is_announced() -> None:
    ev = response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    head = build_client_response_head(ev, via=None, keep_alive=True, client_http_version=b"1.0")
    assert head_lines(head) == [b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: keep-alive"]


def test_head_and_304_keep_content_length_204_and_1xx_do_not() -> None:
    ev = response(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", b"HEAD")
    assert head_lines(build_client_response_head(ev, via=None, keep_alive=True)) == [
        b"HTTP/1.1 200 OK",
        b"Content-Length: 42",
    ]
    ev = response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n")
    assert b"Content-Length: 42" in head_lines(build_client_response_head(ev, via=None, keep_alive=True))
    ev = response(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert head_lines(build_client_response_head(ev, via=None, keep_alive=True)) == [
        b"HTTP/1.1 204 No Content"
    ]
    ev = response(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert build_client_response_head(ev, via=None, keep_alive=False) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_error_response() -> None:
    out = error_response(400, "bad\r\nthing", close=True)
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Content-Type: text/plain; charset=utf-8" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert b"Connection: close" in lines
    assert body == b"400 Bad Request: bad??thing\n"
    assert b"Connection" not in error_response(502, "x", close=False)
    assert error_response(502, "", close=False).endswith(b"\r\n\r\n502 Bad Gateway\n")
    # the client-side parser accepts what tsproxy generates
    p = ResponseParser()
    p.start(b"GET")
    assert p.feed(error_response(431, "too big", close=False))[-1] == MessageEnded()


def test_chunked_encoder() -> None:
    enc = ChunkedEncoder()
    assert enc.encode(b"") == b""
    assert enc.encode(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert enc.encode(memoryview(b"abc")) == b"3\r\nabc\r\n"
    assert enc.end() == b"0\r\n\r\n"
