"""Sans-IO pieces of the HTTP/2 session: the CONTINUATION counter over a split byte stream, the
per-minute frequency counter, and the request head built from an HTTP/2 header block."""

from __future__ import annotations

import pytest

from tsproxy.http.parser import BodyMode
from tsproxy.http2_session import FrameScanner, FrequencyCounter, _request_of

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, payload: bytes, flags: int = 0, stream: int = 1) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def test_frame_scanner_counts_continuations_however_the_bytes_are_split() -> None:
    stream = (
        PREFACE + frame(4, b"") + frame(1, b"h" * 30) + b"".join(frame(9, b"c" * n) for n in (0, 5, 16384))
    )
    stream += frame(0, b"d" * 100) + frame(9, b"x")
    for size in (1, 2, 7, 9, 10, 64, len(stream)):
        scanner = FrameScanner()
        found = sum(scanner.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert found == 4, size


def test_frequency_counter_keeps_the_last_minute_in_two_buckets() -> None:
    c = FrequencyCounter()
    assert c.incr(100.0) == 1
    assert c.incr(110.0, 5) == 6
    assert c.incr(131.0) == 7  # a new bucket: the previous one still counts
    assert c.incr(165.0) == 2  # the first bucket has gone, the second is the previous now
    assert c.incr(300.0) == 1  # long quiet: nothing carried over


def test_request_of_maps_pseudo_headers_and_joins_cookies() -> None:
    req = _request_of(
        [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/p?q"),
         (b"cookie", b"a=1"), (b"host", b"ignored.test"), (b"content-length", b"5"), (b"cookie", b"b=2")],
        False,
    )  # fmt: skip
    assert req is not None
    assert (req.method, req.target, req.http_version, req.keep_alive) == (b"POST", b"/p?q", b"2", True)
    assert req.headers == [(b"host", b"a.test"), (b"content-length", b"5"), (b"cookie", b"a=1; b=2")]
    assert (req.body, req.content_length) == (BodyMode.LENGTH, 5)


@pytest.mark.parametrize(
    ("extra", "ended", "body"),
    [((), True, BodyMode.NONE), ((), False, BodyMode.CHUNKED)],
)
def test_request_of_body_framing(extra: tuple[tuple[bytes, bytes], ...], ended: bool, body: BodyMode) -> None:
    req = _request_of([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a.test"), *extra], ended)
    assert req is not None and req.body is body


def test_request_of_refuses_a_bad_content_length() -> None:
    assert _request_of([(b":method", b"GET"), (b":path", b"/"), (b"content-length", b"1,1")], False) is None
