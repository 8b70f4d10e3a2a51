#!/usr/bin/env python3
# Measures the per-message cost of the HTTP/1.1 parsers tsproxy could use, so the choice in
# tsproxy/http/parser.py rests on numbers, not taste.
#
# Theory of operation: one typical request (GET, 8 headers) and one typical response (200,
# Content-Length 1024, 8 headers, 1 KiB body) are parsed N times each, on a keep-alive connection
# (one parser object reused across messages, as the proxy does), with:
#   - raw httptools (llhttp) with minimal Python callbacks,
#   - h11 (pure Python),
#   - tsproxy.http.parser (httptools plus tsproxy's limits and events: what the proxy really pays).
# The best of several repeats is printed as microseconds per message and messages per second.

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h11
import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tsproxy.http.parser import RequestParser, ResponseParser

REQUEST = (
    b"GET /static/app/main.js?v=123 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://www.example.com/\r\n"
    b"Cookie: session=0123456789abcdef; theme=dark\r\n"
    b"Cache-Control: no-cache\r\n"
    b"\r\n"
)

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: origin/1.0\r\n"
    b"Content-Type: application/javascript\r\n"
    b"Content-Length: 1024\r\n"
    b"Cache-Control: max-age=3600\r\n"
    b'ETag: "abcdef0123456789"\r\n'
    b"Last-Modified: Sun, 31 Dec 2023 00:00:00 GMT\r\n"
    b"Vary: Accept-Encoding\r\n"
    b"\r\n" + b"x" * 1024
)


class _Sink:
    """Minimal httptools protocol: collects what a proxy needs, nothing more."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = 0

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers = []

    def on_body(self, body: bytes) -> None:
        self.body = body

    def on_message_complete(self) -> None:
        self.done += 1


def httptools_request(n: int) -> None:
    sink = _Sink()
    p = httptools.HttpRequestParser(sink)
    for _ in range(n):
        p.feed_data(REQUEST)
    assert sink.done == n


def httptools_response(n: int) -> None:
    sink = _Sink()
    p = httptools.HttpResponseParser(sink)
    for _ in range(n):
        p.feed_data(RESPONSE)
    assert sink.done == n


def h11_request(n: int) -> None:
    conn = h11.Connection(h11.SERVER)
    resp = h11.Response(status_code=200, headers=[(b"content-length", b"0")])
    done = 0
    for _ in range(n):
        conn.receive_data(REQUEST)
        while True:
            ev = conn.next_event()
            if type(ev) is h11.EndOfMessage:
                break
        done += 1
        # h11 will not parse the next request until a response was sent for this one.
        conn.send(resp)
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
    assert done == n


def h11_request_fresh(n: int) -> None:
    done = 0
    for _ in range(n):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        while type(conn.next_event()) is not h11.EndOfMessage:
            pass
        done += 1
    assert done == n


def h11_response(n: int) -> None:
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")])
    done = 0
    for _ in range(n):
        conn.send(req)
        conn.send(h11.EndOfMessage())
        conn.receive_data(RESPONSE)
        while True:
            ev = conn.next_event()
            if type(ev) is h11.EndOfMessage:
                break
        done += 1
        conn.start_next_cycle()
    assert done == n


def tsproxy_request(n: int) -> None:
    p = RequestParser()
    done = 0
    for _ in range(n):
        done += len(p.feed(REQUEST))
    assert done == 2 * n


def tsproxy_response(n: int) -> None:
    p = ResponseParser()
    done = 0
    for _ in range(n):
        p.start(b"GET")
        done += len(p.feed(RESPONSE))
    assert done == 3 * n


def measure(fn: Callable[[int], None], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=20000, help="messages per repeat")
    ap.add_argument("-r", "--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [
        ("httptools", "request", httptools_request),
        ("h11", "request", h11_request),
        ("h11 (fresh conn)", "request", h11_request_fresh),
        ("tsproxy(httptools)", "request", tsproxy_request),
        ("httptools", "response", httptools_response),
        ("h11", "response", h11_response),
        ("tsproxy(httptools)", "response", tsproxy_response),
    ]
    print(f"{'parser':<20} {'message':<9} {'us/msg':>8} {'msg/s':>10}")
    for name, kind, fn in rows:
        per = measure(fn, args.n, args.repeats)
        print(f"{name:<20} {kind:<9} {per * 1e6:8.2f} {1 / per:10.0f}")
    print("note: h11 rows include the minimal send/start_next_cycle h11 needs between messages")


if __name__ == "__main__":
    main()
