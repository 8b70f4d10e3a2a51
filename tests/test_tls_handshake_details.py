"""Issue 15, against the real ``tsproxy``: session resumption after the client closed first, the
ALPN no_application_protocol alert, and the wire trace (proxy.config.ssl.wire_trace_*)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_tls_termination import (
    Certs,
    Factory,
    TLSProxy,
    certs,
    client_context,
    needs_openssl,
    origin,
    read_lines,
    s_client,
    start_proxy,
)

__all__ = ["certs", "origin"]  # module fixtures shared with test_tls_termination

KEEPALIVE_GET = b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def read_response(sock: ssl.SSLSocket) -> bytes:
    """One keep-alive response (the origin sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def open_connections(tp: TLSProxy) -> int:
    return tp.metric("proxy.process.http.current_client_connections")


def connect(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="exact.test", session=session)


# --------------------------------------------------------------------------------------------
# resumption after a client-first close
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare-eof"])
@pytest.mark.parametrize(
    ("version", "tickets"),
    [("1.2", 0), ("1.3", 0), ("1.3", 1)],
    ids=["tls12-session-id", "tls13-stateful-psk", "tls13-ticket-psk"],
)
def test_resumption_after_the_client_closed_first(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str, tickets: int, close_notify: bool
) -> None:
    """The client reads its response on a keep-alive connection and closes first (with or
    without close_notify); its session must still resume. TLS 1.2 with tickets off resumes by
    session ID, TLS 1.3 with tickets off by a stateful ticket: both live in OpenSSL's session
    cache, which used to drop them when the proxy freed the SSL without SSL_shutdown."""
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.server.session_ticket.enable": tickets},
    )
    ctx = client_context(certs, version)
    session: ssl.SSLSession | None = None
    for attempt in range(3):
        s = connect(ctx, tp.ports[0], session)
        s.sendall(KEEPALIVE_GET)
        assert read_response(s).endswith(b"origin saw /")
        if attempt:
            assert s.session_reused, f"attempt {attempt}: full handshake, the session was lost"
        session = s.session
        assert session is not None and (version == "1.3" or session.id)
        if close_notify:
            s.unwrap().close()
        else:
            s.close()  # the stdlib sends no close_notify on close()
        wait_for(lambda: open_connections(tp) == 0, "the proxy to close its side", 5)
    assert tp.metric("total_tickets_verified") == 2


def serving_pid(log: Path, client_port: int) -> int:
    def find() -> int:
        for words in read_lines(log):
            if words[1] == "VCONN_START" and words[2] == str(client_port):
                return int(words[0])
        return 0

    return int(wait_for(find, f"the VCONN_START of port {client_port}", 5))


@pytest.mark.parametrize("version", ["1.2", "1.3"], ids=["tls12-session-id", "tls13-stateful-psk"])
def test_session_cache_is_shared_by_the_workers(
    tsproxy_factory: Factory, certs: Certs, origin: int, tmp_path: Path, version: str
) -> None:
    """proxy.config.ssl.session_cache 2 (the default): a session made by one worker resumes on
    the other, tickets off, the client closing first without close_notify."""
    log = tmp_path / "hooks.log"
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.exec_thread.limit": 2, "proxy.config.ssl.server.session_ticket.enable": 0},
        plugins=[f"{{plugins}}/record_hooks.py {log}"],
    )
    workers = set(tp.worker_pids())
    assert len(workers) == 2
    ctx = client_context(certs, version)
    session: ssl.SSLSession | None = None
    made_by = 0
    resumed_on: set[int] = set()
    for attempt in range(40):
        s = connect(ctx, tp.ports[0], session)
        pid = serving_pid(log, int(s.getsockname()[1]))
        s.sendall(KEEPALIVE_GET)
        assert read_response(s).endswith(b"origin saw /")
        if attempt == 0:
            made_by = pid
            session = s.session
        else:
            assert s.session_reused, (
                f"attempt {attempt} on worker {pid} (session from {made_by}): full handshake"
            )
            resumed_on.add(pid)
        s.close()
        if resumed_on == workers:
            break
    assert resumed_on == workers, f"resumptions only reached {resumed_on} of {workers}"
    assert tp.metric("total_tickets_verified") == attempt


@pytest.mark.parametrize("mode", [0, 1])
def test_session_cache_off_and_per_worker(
    tsproxy_factory: Factory, certs: Certs, origin: int, mode: int
) -> None:
    """0: no session resumes; 1: OpenSSL's cache, per worker (one worker here: it resumes)."""
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.session_cache": mode, "proxy.config.ssl.server.session_ticket.enable": 0},
    )
    ctx = client_context(certs, "1.2")
    session: ssl.SSLSession | None = None
    for attempt in range(2):
        with connect(ctx, tp.ports[0], session) as s:
            s.sendall(KEEPALIVE_GET)
            assert read_response(s).endswith(b"origin saw /")
            assert s.session_reused == (attempt == 1 and mode == 1)
            session = s.session


# --------------------------------------------------------------------------------------------
# ALPN with no overlap
# --------------------------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_alpn_without_overlap_gets_no_application_protocol(
    tsproxy_factory: Factory, certs: Certs, origin: int, version: str
) -> None:
    tp = start_proxy(
        tsproxy_factory, certs, multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n", origin=origin
    )
    flag = {"1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    out = s_client(tp.ports[0], "-alpn", "foo", flag, "-servername", "exact.test")
    assert "no application protocol" in out.stderr, out.stderr
    with pytest.raises(ssl.SSLError) as info:
        connect(client_context(certs, version, alpn=["foo", "bar"]), tp.ports[0]).close()
    assert "alert no application protocol" in str(info.value)
    # an overlapping offer, and no offer at all, are served
    for alpn in (["foo", "http/1.1"], None):
        with connect(client_context(certs, version, alpn=alpn), tp.ports[0]) as s:
            assert s.selected_alpn_protocol() == ("http/1.1" if alpn else None)
            s.sendall(KEEPALIVE_GET)
            assert read_response(s).endswith(b"origin saw /")
    assert tp.metric("total_success_handshake_count_in") == 2


@needs_openssl
def test_alpn_no_overlap_alert_off_continues_without_alpn(
    tsproxy_factory: Factory, certs: Certs, origin: int
) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.server.alpn.no_overlap_alert": 0},
    )
    out = s_client(tp.ports[0], "-alpn", "foo", "-servername", "exact.test", stdin=b"")
    assert "No ALPN negotiated" in out.stdout and "no application protocol" not in out.stderr, out
    with connect(client_context(certs, "1.3", alpn=["foo"]), tp.ports[0]) as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(KEEPALIVE_GET)
        assert read_response(s).endswith(b"origin saw /")


# --------------------------------------------------------------------------------------------
# wire trace
# --------------------------------------------------------------------------------------------


def trace_proxy(factory: Factory, certs: Certs, origin: int, **records: Any) -> TLSProxy:
    recs = {f"proxy.config.ssl.{k}": v for k, v in records.items()}
    return start_proxy(
        factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={"proxy.config.ssl.wire_trace_enabled": 1, **recs},
    )


def one_connection(
    certs: Certs, port: int, sni: str, source: str = "127.0.0.1", alpn: list[str] | None = None
) -> int:
    """A handshake and a request from ``source``; the client's port (the trace names it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    local_port = int(raw.getsockname()[1])
    with client_context(certs, alpn=alpn).wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(KEEPALIVE_GET)
        assert read_response(s).endswith(b"origin saw /")
    return local_port


def trace_lines(tp: TLSProxy, source: str, port: int) -> list[str]:
    log = tp.config_dir / "log" / "tsproxy.log"
    text = log.read_text() if log.exists() else ""
    return [line for line in text.splitlines() if f"[{source}:{port}]" in line and "trace" in line]


def wait_traced(tp: TLSProxy, source: str, port: int) -> list[str]:
    def done() -> list[str]:
        lines = trace_lines(tp, source, port)
        return lines if any("next protocol" in line for line in lines) else []

    return wait_for(done, f"the trace of {source}:{port}", 5)


def assert_untraced(tp: TLSProxy, traced: tuple[str, int], untraced: list[tuple[str, int]]) -> None:
    """Once a later traced connection's lines are in the log, the earlier untraced ones have none."""
    wait_traced(tp, *traced)
    for source, port in untraced:
        assert trace_lines(tp, source, port) == [], (source, port)


def test_wire_trace_by_address(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = trace_proxy(tsproxy_factory, certs, origin, wire_trace_addr="127.0.0.2", wire_trace_percentage=100)
    quiet = one_connection(certs, tp.ports[0], "exact.test", source="127.0.0.1")
    loud = one_connection(certs, tp.ports[0], "exact.test", source="127.0.0.2", alpn=["http/1.1"])
    lines = wait_traced(tp, "127.0.0.2", loud)
    text = "\n".join(lines)
    assert "ssl trace" in text and "ClientHello: sni=exact.test" in text
    assert "SSL server handshake completed successfully" in text and "version=TLSv1.3" in text
    assert "cipher=TLS_" in text and "client selected next protocol 'http/1.1'" in text
    assert all("trace" in line for line in lines)
    assert_untraced(tp, ("127.0.0.2", loud), [("127.0.0.1", quiet)])


def test_wire_trace_by_server_name(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = trace_proxy(
        tsproxy_factory, certs, origin, wire_trace_server_name="exact.test", wire_trace_percentage=100
    )
    quiet = one_connection(certs, tp.ports[0], "other.test")
    loud = one_connection(certs, tp.ports[0], "exact.test")
    assert "client did not select a next protocol" in "\n".join(wait_traced(tp, "127.0.0.1", loud))
    assert_untraced(tp, ("127.0.0.1", loud), [("127.0.0.1", quiet)])


def test_wire_trace_errors_are_traced(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = trace_proxy(tsproxy_factory, certs, origin, wire_trace_percentage=100)
    raw = socket.create_connection(("127.0.0.1", tp.ports[0]), timeout=5)
    port = int(raw.getsockname()[1])
    with pytest.raises(ssl.SSLError):
        client_context(certs, "1.3", alpn=["foo"]).wrap_socket(raw, server_hostname="exact.test")
    raw.close()
    lines = wait_for(
        lambda: [line for line in trace_lines(tp, "127.0.0.1", port) if "ERROR_SSL" in line], "the error", 5
    )
    assert "no application protocol" in lines[0]


@pytest.mark.parametrize("percentage", [0, 50, 100])
def test_wire_trace_by_percentage(
    tsproxy_factory: Factory, certs: Certs, origin: int, percentage: int
) -> None:
    tp = trace_proxy(tsproxy_factory, certs, origin, wire_trace_percentage=percentage)
    ports = [one_connection(certs, tp.ports[0], "exact.test") for _ in range(20)]
    # the worker writes each line as the step happens, before it closes the connection
    wait_for(lambda: open_connections(tp) == 0, "the closes", 5)
    traced = [p for p in ports if trace_lines(tp, "127.0.0.1", p)]
    if percentage == 0:
        assert traced == []
    elif percentage == 100:
        assert traced == ports
        for p in traced:
            assert any("completed successfully" in line for line in trace_lines(tp, "127.0.0.1", p))
    else:  # 20 draws at 50%: all or none has odds of 2 in a million
        assert 0 < len(traced) < 20, traced


def test_wire_trace_off_logs_nothing(tsproxy_factory: Factory, certs: Certs, origin: int) -> None:
    tp = start_proxy(
        tsproxy_factory,
        certs,
        multicert="dest_ip=* ssl_cert_name=certs/exact.pem\n",
        origin=origin,
        records={
            "proxy.config.ssl.wire_trace_percentage": 100,
            "proxy.config.ssl.wire_trace_addr": "127.0.0.1",
        },
    )
    port = one_connection(certs, tp.ports[0], "exact.test")
    wait_for(lambda: open_connections(tp) == 0, "the close", 5)
    assert trace_lines(tp, "127.0.0.1", port) == []
