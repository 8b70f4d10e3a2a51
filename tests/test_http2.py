"""HTTP/2 to clients (issue 17) against the real ``tsproxy start``: ALPN, curl --http2 (single,
40 parallel streams on one connection, an upload, errors per stream), h2load, the shipped
header_rewrite and access_log plugins over h2, flow control (a slow reader holds the proxy's
memory flat), the abuse cases (rapid reset, CONTINUATION flood, oversized headers, a zero-window
client, SETTINGS/PING floods) with a Python client built on ``h2``, and GOAWAY on a graceful stop.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import psutil
import pytest
import trustme
from conftest import ProxyProcess, wait_for
from origin import OriginServer, pattern, pattern_digest

Factory = Callable[..., ProxyProcess]
HOST = "h2.test"

needs_curl_h2 = pytest.mark.skipif(
    shutil.which("curl") is None
    or "HTTP2" not in subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout,
    reason="curl with HTTP/2 not installed",
)
needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("h2ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


def start(
    factory: Factory,
    ca: trustme.CA,
    origin: OriginServer,
    *,
    records: dict[str, Any] | None = None,
    plugins: str = "",
    files: dict[str, str | bytes] | None = None,
    ports: str = "{0}:ssl:ip-in=127.0.0.1",
) -> ProxyProcess:
    leaf = ca.issue_cert(HOST, "other.test")
    return factory(
        records={
            "proxy.config.http.server_ports": ports,
            "proxy.config.ssl.server.cert.path": ".",
            "proxy.config.ssl.server.private_key.path": ".",
            **(records or {}),
        },
        files={
            "server.pem": leaf.private_key_and_cert_chain_pem.bytes(),
            "ssl_multicert.config": "dest_ip=* ssl_cert_name=server.pem\n",
            "remap.config": f"map https://{HOST}/ http://{origin.authority}/\n"
            "map https://dead.test/ http://127.0.0.1:9/\n",
            "plugin.config": plugins,
            **(files or {}),
        },
    )


def metric(proxy: ProxyProcess, name: str) -> int:
    out = proxy.ctl("metric", "get", name).stdout.split()
    assert out[0] == name, out
    return int(out[1])


def curl(
    proxy: ProxyProcess, ca_file: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    port = proxy.port(0)
    return subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(ca_file), "--connect-to", f"::127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


def url(proxy: ProxyProcess, path: str, host: str = HOST) -> str:
    """The URL as the user writes it; curl connects to the proxy (--connect-to)."""
    return f"https://{host}{path}"


# -- a Python client on h2 (the abuse cases need frames curl never sends) --------------------------
class H2Client:
    def __init__(self, port: int, ca_file: Path, settings: dict[int, int] | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self, path: str, *, authority: str = HOST, end: bool = True, extra: tuple[tuple[str, str], ...] = ()
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
            *extra,
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def pump(self, timeout: float = 5.0) -> list[h2.events.Event]:
        """One read: the events it brought ([] and ``closed`` when the proxy closed)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        self.flush()
        self.events += events
        return events

    def response(self, sid: int, timeout: float = 10.0) -> tuple[int, dict[bytes, bytes], bytes]:
        status = 0
        headers: dict[bytes, bytes] = {}
        body = bytearray()
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for ev in self.events[seen:]:
                seen += 1
                if getattr(ev, "stream_id", None) != sid:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    headers = dict(ev.headers)
                    status = int(headers[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    self.flush()
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, headers, bytes(body)
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f"stream {sid} reset: {ev.error_code}")
            if self.closed:
                break
            self.pump()
        raise AssertionError(f"no whole response on stream {sid}")

    def goaway(self, timeout: float = 10.0) -> h2.events.ConnectionTerminated | None:
        """Read until the proxy's GOAWAY (returned) or close (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            for ev in self.pump():
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return ev
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[list[H2Client]]:
    made: list[H2Client] = []
    yield made
    for c in made:
        c.close()


# -- ALPN ------------------------------------------------------------------------------------------
def test_alpn_offers_h2_and_http11_on_one_port_and_proto_restricts_it(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer
) -> None:
    proxy = start(
        tsproxy_factory, ca, origin, ports="{0}:ssl:ip-in=127.0.0.1 {1}:ssl:ip-in=127.0.0.1:proto=http/1.1"
    )
    for port, offer, chosen in [
        (proxy.port(0), ["h2", "http/1.1"], "h2"),
        (proxy.port(0), ["http/1.1"], "http/1.1"),
        (proxy.port(1), ["h2", "http/1.1"], "http/1.1"),
    ]:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.set_alpn_protocols(offer)
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=HOST
        ) as s:
            assert s.selected_alpn_protocol() == chosen
            if chosen == "http/1.1":  # HTTP/1.1 on the same port is unaffected
                s.sendall(f"GET /bytes?n=10 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(pattern(10))


def test_sni_yaml_http2_off_keeps_that_name_on_http11(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, ca, origin, files={"sni.yaml": "sni:\n- fqdn: other.test\n  http2: off\n"})
    for sni, chosen in [("other.test", "http/1.1"), (HOST, "h2")]:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=5)
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            assert s.selected_alpn_protocol() == chosen


# -- curl ----------------------------------------------------------------------
@needs_curl_h2
def test_curl_http2_request_is_proxied_with_via_and_forwarded_for(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, tmp_path: Path
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    body = tmp_path / "body"
    out = curl(
        proxy, ca_file, "-D", "-", "-o", str(body), "-w", "%{http_version}", url(proxy, "/bytes?n=3000")
    )
    assert out.returncode == 0, out.stderr
    head, _, version = out.stdout.partition("\n\n")
    assert head.startswith("HTTP/2 200"), head
    assert "content-length: 3000" in head.lower().split("\n")
    assert version == "2"
    assert body.read_bytes() == pattern(3000)
    seen = origin.requests[-1]
    assert (seen.method, seen.target, seen.version) == ("GET", "/bytes?n=3000", "HTTP/1.1")
    assert seen.header("Host") == origin.authority  # the remap target's (pristine_host_hdr 0)
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("Via") is not None and seen.header("Via").startswith("2 ")
    assert metric(proxy, "proxy.process.http2.total_client_streams") == 1


@needs_curl_h2
def test_curl_parallel_streams_share_one_connection(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    n = 48
    args = [
        "--parallel",
        "--parallel-max",
        "100",
        "-w",
        "%{http_version} %{http_code} %{size_download}\n",
    ]
    for i in range(n):
        args += ["-o", "/dev/null", url(proxy, f"/bytes?n={1000 + i}")]
    out = curl(proxy, ca_file, *args)
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1], key=lambda line: int(line.split()[2]))
    assert lines == [f"2 200 {1000 + i}" for i in range(n)]
    assert metric(proxy, "proxy.process.http2.total_client_connections") == 1
    assert metric(proxy, "proxy.process.http2.total_client_streams") == n


@needs_curl_h2
def test_curl_upload_of_1_mib_streams_to_the_origin(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, tmp_path: Path
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    body = pattern(1 << 20)
    (tmp_path / "up.bin").write_bytes(body)
    for extra in ([], ["-H", "Content-Length:"]):  # with Content-Length, and without (chunked to origin)
        out = curl(proxy, ca_file, "--data-binary", f"@{tmp_path / 'up.bin'}", *extra, url(proxy, "/echo"))
        assert out.returncode == 0, out.stderr
        echo = json.loads(out.stdout)
        assert echo["body_len"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


@needs_curl_h2
def test_errors_are_answers_on_their_stream(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    out = curl(proxy, ca_file, "-o", "/dev/null", "-w", "%{http_code}", url(proxy, "/x", host="other.test"))
    assert out.stdout == "404", out.stderr  # no remap rule (other.test is on the certificate)
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    missing = c.request("/x", authority="other.test")
    good = c.request("/bytes?n=5")
    assert c.response(missing)[0] == 404
    assert c.response(good)[::2] == (200, pattern(5))
    # an origin that refuses: 502 on that stream; the connection serves the next one
    assert c.response(c.request("/", authority="dead.test"))[0] == 502
    assert c.response(c.request("/bytes?n=7"))[2] == pattern(7)
    assert not c.closed


def test_bodiless_responses_end_the_stream_with_their_headers(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    """HEAD keeps the representation's Content-Length, 204 and 304 carry no body; each ends its
    stream (END_STREAM on HEADERS) and the connection goes on."""
    proxy = start(tsproxy_factory, ca, origin)
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    sid = c.conn.get_next_available_stream_id()
    head = [(":method", "HEAD"), (":scheme", "https"), (":authority", HOST), (":path", "/bytes?n=100")]
    c.conn.send_headers(sid, head, end_stream=True)
    c.flush()
    status, headers, body = c.response(sid)
    assert (status, headers.get(b"content-length"), body) == (200, b"100", b"")
    for code in (204, 304):
        status, headers, body = c.response(c.request(f"/status?code={code}"))
        assert (status, body) == (code, b"")
        assert code == 304 or b"content-length" not in headers
    assert c.response(c.request("/bytes?n=6"))[2] == pattern(6)


# -- flow control ----------------------------------------------------------------------
def test_slow_reader_of_20_mib_holds_proxy_memory_flat(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    """The client grants its window slowly: the origin read pauses, RSS stays flat, and another
    stream on the same connection is served meanwhile."""
    proxy = start(tsproxy_factory, ca, origin)
    (worker,) = proxy.worker_pids()
    c = H2Client(proxy.port(0), ca_file, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    clients.append(c)
    warm = c.request("/bytes?n=100")
    c.response(warm)
    rss0 = psutil.Process(worker).memory_info().rss
    n = 20 << 20
    sid = c.request(f"/big?n={n}")
    digest = hashlib.sha256()
    got = 0
    peak = rss0
    other_done = False
    other = 0
    while got < n:
        for ev in c.pump():
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                digest.update(ev.data)
                got += len(ev.data)
                c.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == other:
                other_done = True
        c.flush()
        if got > n // 4 and not other:
            other = c.request("/bytes?n=10")  # a short request while the big one crawls
        if got % (1 << 20) < 65536:
            peak = max(peak, psutil.Process(worker).memory_info().rss)
            time.sleep(0.01)  # a slow reader: the window opens a little at a time
        assert not c.closed
    assert digest.hexdigest() == pattern_digest(n)
    assert other_done
    assert peak - rss0 < 8 << 20, f"worker RSS grew {(peak - rss0) >> 20} MiB for a 20 MiB slow download"


# -- plugins over h2 ----------------------------------------------------------------------
@needs_curl_h2
def test_header_rewrite_and_access_log_plugins_over_h2(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer
) -> None:
    rules = "request add X-Added a\nresponse add X-Served-By tsproxy\nresponse remove Content-Type\n"
    proxy = start(
        tsproxy_factory, ca, origin,
        plugins="plugins.header_rewrite rewrite.rules\nplugins.access_log\n",
        files={"rewrite.rules": rules},
    )  # fmt: skip
    out = curl(proxy, ca_file, "-D", "-", "-A", "h2 agent", url(proxy, "/echo"))
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")
    fields = [line.lower() for line in head.split("\n")]
    assert "x-served-by: tsproxy" in fields and not any(f.startswith("content-type:") for f in fields)
    assert [v for k, v in json.loads(body)["headers"] if k.lower() == "x-added"] == ["a"]
    log = proxy.config_dir / "log" / "access.log"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 1, "an access log line", 5)
    line = log.read_text().splitlines()[0]
    assert '"GET /echo HTTP/2" 200 ' in line and '"h2 agent"' in line and f" {HOST} TLSv1.3" in line, line


# -- load ----------------------------------------------------------------------
@needs_h2load
def test_h2load_bounded_load_all_answered(
    tsproxy_factory: Factory, ca: trustme.CA, origin: OriginServer
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    pids = proxy.worker_pids()
    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"https://127.0.0.1:{proxy.port(0)}/bytes?n=1024",
         "-H", f":authority: {HOST}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", out.stdout), out.stdout
    assert "status codes: 2000 2xx" in out.stdout, out.stdout
    assert proxy.worker_pids() == pids


# -- abuse ----------------------------------------------------------------------
def test_rapid_reset_gets_goaway_enhance_your_calm(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(
        tsproxy_factory, ca, origin, records={"proxy.config.http2.max_rst_stream_frames_per_minute": 50}
    )
    pids = proxy.worker_pids()
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    for _ in range(80):
        sid = c.request("/slow?delay=1&n=10")
        c.conn.reset_stream(sid)
    c.flush()
    ev = c.goaway()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(proxy, "proxy.process.http2.max_rst_stream_frames_per_minute_exceeded") == 1
    fresh = H2Client(proxy.port(0), ca_file)  # the worker serves others
    clients.append(fresh)
    assert fresh.response(fresh.request("/bytes?n=4"))[2] == pattern(4)
    assert proxy.worker_pids() == pids


def _raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def test_continuation_flood_and_oversized_headers_end_the_connection(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    pids = proxy.worker_pids()
    # CONTINUATION frames that never end the header block
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    block = c.conn.encoder.encode(
        [(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", "/")]
    )
    flood = _raw_frame(1, 0, 1, block)  # HEADERS without END_HEADERS
    flood += b"".join(_raw_frame(9, 0, 1, c.conn.encoder.encode([("x-pad", "a" * 100)])) for _ in range(200))
    try:
        c.sock.sendall(flood)
    except (ConnectionError, ssl.SSLError):
        pass
    end = c.goaway()
    assert end is None or end.error_code != h2.errors.ErrorCodes.NO_ERROR
    counted = metric(proxy, "proxy.process.http2.max_continuation_frames_per_minute_exceeded")
    errors = metric(proxy, "proxy.process.http2.connection_errors")
    assert counted + errors >= 1
    # a header list over max_header_list_size
    c2 = H2Client(proxy.port(0), ca_file)
    clients.append(c2)
    c2.request("/", extra=tuple((f"x-h{i}", "v" * 4000) for i in range(40)))
    assert c2.goaway() is not None or c2.closed
    assert metric(proxy, "proxy.process.http2.connection_errors") > errors
    assert proxy.worker_pids() == pids


def test_settings_and_ping_floods_get_goaway(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    for i in range(100):
        c.conn.ping(i.to_bytes(8, "big"))
    c.flush()
    ev = c.goaway()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(proxy, "proxy.process.http2.max_ping_frames_per_minute_exceeded") == 1
    c2 = H2Client(proxy.port(0), ca_file)
    clients.append(c2)
    try:
        c2.sock.sendall(_raw_frame(4, 0, 0, b"") * 30)  # empty SETTINGS frames
    except (ConnectionError, ssl.SSLError):
        pass  # the proxy may have closed before the last ones arrived
    ev = c2.goaway()
    # the GOAWAY may be lost to the reset of a socket with unread bytes; the counter is not
    assert ev is None or ev.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert metric(proxy, "proxy.process.http2.max_settings_frames_per_minute_exceeded") == 1


def test_zero_window_client_is_closed_after_the_timeout(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin, records={"proxy.config.http2.no_activity_timeout_in": 2})
    c = H2Client(proxy.port(0), ca_file, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    clients.append(c)
    sid = c.request("/bytes?n=100000")
    began = last_ping = time.monotonic()
    headers = False
    while not c.closed and time.monotonic() < began + 15:
        for ev in c.pump(timeout=0.5):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                headers = True
            assert not isinstance(ev, h2.events.DataReceived), "data sent into a zero window"
        terminated = any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events)
        if not c.closed and not terminated and time.monotonic() - last_ping > 0.5:
            last_ping = time.monotonic()
            c.conn.ping(b"12345678")  # a client that pings is still not reading
            c.flush()
    assert headers and c.closed, "the proxy kept a zero-window connection open"
    assert 1.5 < time.monotonic() - began < 12
    assert metric(proxy, "proxy.process.http2.session_die_inactive") == 1


# -- graceful ----------------------------------------------------------------------
def test_stop_sends_goaway_and_open_streams_finish(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    sid = c.request("/slow?delay=1.5&n=2000")
    wait_for(origin.request_seen.is_set, "the origin got the request")
    proxy.proc.send_signal(signal.SIGTERM)  # a graceful stop
    ev = c.goaway()
    assert ev is not None and ev.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert ev.last_stream_id == sid
    # h2's client state machine takes nothing after a GOAWAY: read the rest of the stream's
    # frames by hand until the proxy closes
    raw = bytearray()
    c.sock.settimeout(10)
    while chunk := c.sock.recv(65536):
        raw += chunk
    status, body, ended = 0, bytearray(), False
    while raw:
        length, kind, flags = int.from_bytes(raw[:3], "big"), raw[3], raw[4]
        stream = int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
        payload, raw = bytes(raw[9 : 9 + length]), raw[9 + length :]
        if stream != sid:
            continue
        if kind == 1:  # HEADERS (tsproxy sends no padding or priority)
            status = int(dict(c.conn.decoder.decode(payload, raw=True))[b":status"])
        elif kind == 0:
            body += payload
        ended = ended or bool(flags & 1)
    assert (status, bytes(body), ended) == (200, pattern(2000), True)
    assert proxy.wait_exit(30) == 0


def test_reload_keeps_h2_connections_and_new_streams_use_the_new_rules(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin)
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    slow = c.request("/slow?delay=1&n=300")
    wait_for(origin.request_seen.is_set, "the origin got the request")
    before = proxy.status()["workers"][0]["generation"]
    with OriginServer() as second:
        (proxy.config_dir / "remap.config").write_text(f"map https://{HOST}/ http://{second.authority}/\n")
        assert proxy.ctl("reload").returncode == 0
        wait_for(lambda: proxy.status()["workers"][0]["generation"] > before, "the workers reloaded")
        assert c.response(slow)[::2] == (200, pattern(300))  # the open stream finished
        after = c.request("/bytes?n=9")
        assert c.response(after)[::2] == (200, pattern(9))
        assert [r.target for r in second.requests] == ["/bytes?n=9"]  # the new rule served it
    assert not c.closed


def test_transaction_active_timeout_resets_only_that_stream(
    tsproxy_factory: Factory, ca: trustme.CA, ca_file: Path, origin: OriginServer, clients: list[H2Client]
) -> None:
    proxy = start(tsproxy_factory, ca, origin, records={"proxy.config.http.transaction_active_timeout_in": 1})
    c = H2Client(proxy.port(0), ca_file)
    clients.append(c)
    slow = c.request("/slow?delay=4&n=10")
    began = time.monotonic()
    reset = None
    while reset is None and time.monotonic() < began + 10:
        reset = next(
            (e for e in c.pump() if isinstance(e, h2.events.StreamReset) and e.stream_id == slow), None
        )
    assert reset is not None and reset.error_code == h2.errors.ErrorCodes.CANCEL
    assert 0.5 < time.monotonic() - began < 4
    assert c.response(c.request("/bytes?n=3"))[2] == pattern(3)  # the connection goes on
