"""Issue 14, items 2 and 3, against the real processes: a real ``tsproxy start``, a real origin
(tests/origin.py, with a few scripted endpoints below) and raw-socket clients.

Item 2: dot segments must not carry a request out of its remap prefix. Item 3: framing edge
cases (HTTP/1.0 with Transfer-Encoding both ways, 1xx to HTTP/1.0 clients, header names with
"_", error bodies without internal detail).
"""

from __future__ import annotations

import json
import posixpath
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from conftest import wait_for
from origin import OriginServer, SeenRequest
from test_proxy_http import RawClient, metric

PFX = "pfx.test"  # map http://pfx.test/pub/ -> origin /backend/pub/
ROOT = "root.test"  # map http://root.test/ -> origin /backend/
PLAIN = "origin.test"  # map http://origin.test/ -> origin /
M_UNDERSCORE = "proxy.process.http.underscore_headers_dropped"


class ScriptedOrigin(OriginServer):
    """The test origin plus the misbehaving answers this file needs."""

    def _ep_http10te(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        # An HTTP/1.0 response with Transfer-Encoding that also asks for keep-alive.
        sock.sendall(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        return True

    def _ep_interim(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        # 103 Early Hints and 100 Continue before the final response.
        sock.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
        )
        return True

    def _ep_garbage(self, sock: socket.socket, seen: SeenRequest, q: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\n\r\n")
        return False


@pytest.fixture
def origin() -> Iterator[ScriptedOrigin]:
    server = ScriptedOrigin()
    server.start()
    yield server
    server.stop()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start(tsproxy_factory: Callable[..., Any], origin: ScriptedOrigin) -> Callable[..., Any]:
    def start(records: dict[str, Any] | None = None) -> Any:
        remap = (
            f"map http://{PFX}/pub/ http://{origin.authority}/backend/pub/\n"
            f"map http://{ROOT}/ http://{origin.authority}/backend/\n"
            f"map http://{PLAIN}/ http://{origin.authority}/\n"
            f"map http://dead.test/ http://127.0.0.1:{_dead_port()}/\n"
            "map http://nx.test/ http://nonexistent.invalid/\n"
        )
        return tsproxy_factory(records=records, files={"remap.config": remap})

    return start


@pytest.fixture
def proxy(start: Callable[..., Any]) -> Any:
    return start()


def exchange(proxy: Any, request: bytes) -> Any:
    """Send one raw request (it should say Connection: close); the response."""
    with RawClient(proxy.port()) as client:
        client.send(request)
        return client.response()


def get(proxy: Any, target: bytes, host: str) -> Any:
    return exchange(
        proxy, b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, host.encode())
    )


def served_path(target: str) -> str:
    """What an origin that decodes and then normalizes the path would serve for ``target``
    (percent-decoding, "\\" read as "/", dot segments resolved)."""
    path = unquote(target.split("?", 1)[0]).replace("\\", "/")
    out = posixpath.normpath(path)
    return out + "/" if path.endswith("/") and out != "/" else out


# -- item 2: dot segments ---------------------------------------------------------------------
ESCAPES = [
    b"/pub/../../secret/",
    b"/pub/%2e%2e/%2e%2e/secret/",
    b"/pub/%2E%2E/%2E%2E/secret/",
    b"/pub/.%2e/.%2e/secret/",
    b"/pub/%2e./%2e./secret/",
    b"/pub/..%2f..%2fsecret/",
    b"/pub/..%2F..%2Fsecret/",
    b"/pub/..%5c..%5csecret/",
    b"/pub/..\\..\\secret/",
    b"/pub/..;/..;/secret/",
    b"/pub/x/../../../secret/",
]


ROOT_ESCAPES = [b"/../secret/", b"/%2e%2e/secret/", b"/.%2E/secret/", b"/..%2fsecret/", b"/a/../../secret"]


def test_dot_segments_cannot_leave_the_remap_prefix(proxy: Any, origin: ScriptedOrigin) -> None:
    # One proxy for every shape (a proxy per case would cost ~0.8 s each).
    for host, target in [(PFX, t) for t in ESCAPES] + [(ROOT, t) for t in ROOT_ESCAPES]:
        resp = get(proxy, target, host)
        assert (resp.status, resp.body) == (400, b"400 Bad Request\n"), (host, target, resp.status, resp.body)
    # None went anywhere; the next requests are served.
    assert get(proxy, b"/pub/ok", PFX).status == 200
    assert get(proxy, b"/ok", ROOT).status == 200
    assert [r.target for r in origin.wait_requests(2)] == ["/backend/pub/ok", "/backend/ok"]


def test_dot_segments_are_resolved_before_the_remap_lookup(proxy: Any, origin: ScriptedOrigin) -> None:
    sent = [
        (b"/pub/a/../b", PFX, 200, "/backend/pub/b"),
        (b"/pub/a/%2e%2e/b?x=/../y", PFX, 200, "/backend/pub/b?x=/../y"),  # the query is untouched
        (b"/pub/./a/.%2E/c/", PFX, 200, "/backend/pub/c/"),
        (b"/pub//../c", PFX, 200, "/backend/pub/c"),
        (b"/x/../pub/c", PFX, 200, "/backend/pub/c"),  # now matches the /pub/ rule
        (b"/pub/../secret/", PFX, 404, None),  # resolves to /secret/: no rule for it on pfx.test
        (b"/pub/..", PFX, 404, None),
        (b"/a/%2e%2e/b", ROOT, 200, "/backend/b"),
        # unchanged, byte for byte, when there is no dot segment
        (b"/pub/a%20b/c.tar.gz;v=1?q=%2e%2e/..", PFX, 200, "/backend/pub/a%20b/c.tar.gz;v=1?q=%2e%2e/.."),
        (b"/pub/a%2fb/.well-known/x", PFX, 200, "/backend/pub/a%2fb/.well-known/x"),
    ]
    expected = []
    for target, host, status, forwarded in sent:
        resp = get(proxy, target, host)
        assert resp.status == status, (target, resp.status, resp.body)
        if forwarded is not None:
            expected.append(forwarded)
    assert [r.target for r in origin.wait_requests(len(expected))] == expected
    # Absolute-form targets are normalized the same way.
    resp = exchange(
        proxy, b"GET http://pfx.test/pub/a/./../z HTTP/1.1\r\nHost: pfx.test\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 200
    assert origin.wait_requests(len(expected) + 1)[-1].target == "/backend/pub/z"
    # Whatever reached the origin, an origin that normalizes serves it inside the prefix.
    for seen in origin.requests:
        assert served_path(seen.target).startswith("/backend/"), seen.target


# -- item 3: HTTP/1.0 with Transfer-Encoding ----------------------------------------------------
def test_http10_request_with_transfer_encoding_is_400_and_closes(proxy: Any, origin: ScriptedOrigin) -> None:
    with RawClient(proxy.port()) as client:
        client.send(
            b"POST /echo HTTP/1.0\r\nHost: origin.test\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: origin.test\r\n\r\n"
        )
        resp = client.response()
        assert resp.status == 400
        assert (resp.header("Connection") or "").lower() == "close"
        assert client.at_eof(), "the connection must close after the 400"
    # Neither the badly framed request nor the one pipelined behind it reached the origin.
    assert get(proxy, b"/after", PLAIN).status == 200
    assert [r.target for r in origin.requests] == ["/after"]


def test_http10_response_with_transfer_encoding_is_not_pooled(proxy: Any, origin: ScriptedOrigin) -> None:
    with RawClient(proxy.port()) as client:
        for _ in range(3):
            client.send(b"GET /http10te HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            resp = client.response()
            assert resp.status == 200 and resp.body == b"hello"
        # An ordinary keep-alive response is pooled as before: the second one reuses it.
        for _ in range(2):
            client.send(b"GET /bytes?n=3 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            assert client.response().status == 200
    conns = [r.conn_id for r in origin.wait_requests(5)]
    assert len(set(conns[:3])) == 3, f"an HTTP/1.0 + Transfer-Encoding connection was reused: {conns}"
    assert conns[3] == conns[4] and conns[3] not in conns[:3]


# -- item 3: no 1xx to an HTTP/1.0 client ---------------------------------------------------------
def test_no_interim_response_to_http10_client(proxy: Any) -> None:
    with RawClient(proxy.port()) as client:
        client.send(b"GET /interim HTTP/1.0\r\nHost: origin.test\r\n\r\n")
        resp = client.response()
        assert resp.status == 200 and resp.body == b"final"
    # An HTTP/1.1 client still gets both interim responses, then the final one.
    with RawClient(proxy.port()) as client:
        client.send(b"GET /interim HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert [client.response().status for _ in range(3)] == [103, 100, 200]


# -- item 3: header names with "_" ------------------------------------------------------------
UNDERSCORE_REQUEST = (
    b"GET /echo HTTP/1.1\r\nHost: origin.test\r\nX_Forwarded_For: 6.6.6.6\r\n"
    b"X-Normal: kept\r\nX_Real_IP: 6.6.6.6\r\nContent_Length: 99\r\nConnection: close\r\n\r\n"
)


def test_header_names_with_underscore_are_dropped_and_counted(proxy: Any) -> None:
    resp = exchange(proxy, UNDERSCORE_REQUEST)
    assert resp.status == 200
    names = [name for name, _ in json.loads(resp.body)["headers"]]
    assert "X-Normal" in names
    assert [n for n in names if "_" in n] == []
    # The proxy's own X-Forwarded-For holds the real client only.
    xff = [v for n, v in json.loads(resp.body)["headers"] if n.lower() == "x-forwarded-for"]
    assert xff == ["127.0.0.1"]
    assert metric(proxy, M_UNDERSCORE) == 3


def test_header_names_with_underscore_forwarded_when_allowed_and_reloadable(
    start: Callable[..., Any],
) -> None:
    proxy = start({"proxy.config.http.underscores_in_headers": 1})
    resp = exchange(proxy, UNDERSCORE_REQUEST)
    assert resp.status == 200
    names = [name for name, _ in json.loads(resp.body)["headers"]]
    assert {"X_Forwarded_For", "X_Real_IP", "Content_Length", "X-Normal"} <= set(names)
    assert metric(proxy, M_UNDERSCORE) == 0
    # The record is reloadable: back to 0, and the next connection's headers are dropped.
    records = proxy.config_dir / "records.config"
    text = records.read_text()
    line = "CONFIG proxy.config.http.underscores_in_headers INT "
    assert line + "1" in text
    records.write_text(text.replace(line + "1", line + "0"))
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr + result.stdout

    def dropped() -> bool:
        names = [name for name, _ in json.loads(exchange(proxy, UNDERSCORE_REQUEST).body)["headers"]]
        return not [n for n in names if "_" in n]

    wait_for(dropped, what="'_' headers dropped after the reload")
    assert metric(proxy, M_UNDERSCORE) >= 3


# -- item 3: error bodies carry no internal detail -------------------------------------------------
def test_error_bodies_are_generic_and_the_detail_is_logged(start: Callable[..., Any]) -> None:
    proxy = start(
        {
            "proxy.config.http.transaction_no_activity_timeout_out": 1,
            "proxy.config.diags.debug.enabled": 1,
            "proxy.config.diags.debug.tags": "http",
        }
    )
    cases = [
        (b"dead.test", b"/x", 502, "unreachable (Connection refused)"),
        (b"nx.test", b"/x", 502, "cannot resolve origin nonexistent.invalid"),
        (b"origin.test", b"/garbage", 502, "bad response from origin"),
        (b"origin.test", b"/silent", 504, "origin did not answer in time"),
    ]
    for host, target, status, logged in cases:
        resp = exchange(proxy, b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, host))
        assert resp.status == status, (host, resp.status, resp.body)
        phrase = {502: b"Bad Gateway", 504: b"Gateway Timeout"}[status]
        assert resp.body == b"%d %s\n" % (status, phrase), resp.body
        wait_for(lambda logged=logged: logged in proxy.output(), what=f"{logged!r} in the log")
    # A malformed request: the parser's own words stay out of the body too.
    with RawClient(proxy.port()) as client:
        client.send(b"GET /x HTTP/1.1\r\nHost: origin.test\r\nBad Header: x\r\n\r\n")
        resp = client.response()
        assert (resp.status, resp.body) == (400, b"400 Bad Request\n")
        assert client.at_eof()
    # A 4xx's reason is under the "http" debug tag (here enabled), not a warning.
    wait_for(lambda: "answering 400 to 127.0.0.1: Invalid header" in proxy.output(), what="the 400's reason")
    assert "answered 400" not in proxy.output()
    line = next(ln for ln in proxy.output().splitlines() if "answered 502" in ln and "refused" in ln)
    assert "WARNING" in line and "remap.config:4" in line, line
