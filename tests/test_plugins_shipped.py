"""Issue 4, the shipped plugins (plugins/) end to end against the real ``tsproxy start`` with real
TLS clients: ssl_preaccept, ssl_sni_allowlist, cert_loader, header_rewrite, access_log,
stats_over_http.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import ProxyProcess, run_tsproxy, wait_for, write_config_dir
from origin import OriginServer, TLSBackend

Factory = Callable[..., ProxyProcess]
HOST = "origin.test"


# -- certificates, origin, TLS backend --------------------------------------------------------------
@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    files: dict[str, bytes]
    lazy_dir: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    files = {
        f"certs/{name}.pem": ca.issue_cert(f"{name}.test").private_key_and_cert_chain_pem.bytes()
        for name in ("exact", "default")
    }
    lazy = d / "lazy"
    lazy.mkdir()
    for name in ("lazy.test", "lazy2.test"):
        leaf = ca.issue_cert(name)
        (lazy / f"{name}.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        (lazy / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())
    (lazy / "broken.test.pem").write_text("not a certificate\n")
    (lazy / "broken.test.key").write_text("not a key\n")
    return Certs(ca, d / "ca.pem", files, lazy)


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


@pytest.fixture
def backend(certs: Certs) -> Iterator[TLSBackend]:
    b = TLSBackend(certs.ca)
    yield b
    b.close()


def start_tls_proxy(
    factory: Factory,
    certs: Certs,
    origin: OriginServer,
    plugin_lines: list[str],
    *,
    multicert: str = "ssl_cert_name=certs/exact.pem\ndest_ip=* ssl_cert_name=certs/default.pem\n",
    files: dict[str, str | bytes] | None = None,
    records: dict[str, Any] | None = None,
) -> ProxyProcess:
    """A proxy with a TLS port (port 0) and a plain port (port 1); origin.test -> the origin."""
    return factory(
        records={
            "proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1 {1}:ip-in=127.0.0.1",
            "proxy.config.ssl.server.cert.path": ".",
            "proxy.config.ssl.server.private_key.path": ".",
            **(records or {}),
        },
        files={
            **certs.files,
            "ssl_multicert.config": multicert,
            "remap.config": f"map https://{HOST}/ http://{origin.authority}/\n"
            f"map http://{HOST}/ http://{origin.authority}/\n",
            "plugin.config": "".join(line + "\n" for line in plugin_lines),
            **(files or {}),
        },
    )


def client_ctx(certs: Certs, version: str = "1.3", alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.check_hostname = False  # the tests look at which certificate came back
    ctx.minimum_version = ctx.maximum_version = (
        ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_connect(
    certs: Certs, port: int, sni: str | None, source: str = "127.0.0.1", **kw: Any
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    try:
        return client_ctx(certs, **kw).wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def served_name(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    (name,) = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return str(name)


def https_get(sock: socket.socket, path: str = "/bytes", headers: str = "") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{headers}\r\n".encode())
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def metric(proxy: ProxyProcess, name: str) -> int:
    (got,) = proxy.call("metric.get", {"names": [name]})["metrics"]
    return int(got[1])


# -- ssl_preaccept --------------------------------------------------------------------------------------
def test_ssl_preaccept_tunnels_clients_from_listed_ranges(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer, backend: TLSBackend
) -> None:
    proxy = start_tls_proxy(
        tsproxy_factory,
        certs,
        origin,
        [f"plugins.ssl_preaccept 127.0.0.2/32 10.0.0.0/8 --tunnel-to 127.0.0.1:{backend.port}"],
    )
    # 127.0.0.1 is not listed: terminated by the proxy, answered by the origin through remap
    with tls_connect(certs, proxy.port(0), "exact.test") as s:
        assert served_name(s) == "exact.test"
        assert https_get(s).startswith(b"HTTP/1.1 200")
    # from 127.0.0.2: a blind tunnel to the backend, which does the TLS handshake itself
    with tls_connect(certs, proxy.port(0), "exact.test", source="127.0.0.2") as s:
        assert served_name(s) == "backend.test"
        s.sendall(b"hello\n")
        assert s.recv(1024) == b"backend saw hello\n"
    assert metric(proxy, "plugin.ssl_preaccept.tunnelled") == 1
    # bad arguments stop start-up with a message naming the plugin
    bad = write_config_dir(
        Path(proxy.config_dir.parent / "bad"),
        files={"plugin.config": "plugins.ssl_preaccept 10.0.0.300/8\n"},
    )
    result = run_tsproxy("start", "--config-dir", str(bad), timeout=60)
    assert result.returncode != 0
    assert "plugin plugins.ssl_preaccept failed to load" in result.stderr
    assert "'10.0.0.300/8' is not an address range" in result.stderr


# -- ssl_sni_allowlist ---------------------------------------------------------------------------------
def test_ssl_sni_allowlist_tunnels_or_refuses_unknown_names(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer, backend: TLSBackend
) -> None:
    tunnel = start_tls_proxy(
        tsproxy_factory, certs, origin, [f"plugins.ssl_sni_allowlist tunnel 127.0.0.1:{backend.port}"]
    )
    with tls_connect(certs, tunnel.port(0), "EXACT.test") as s:
        assert served_name(s) == "exact.test"
        assert https_get(s).startswith(b"HTTP/1.1 200")
    for sni in ("other.test", None):  # an unknown name, and no SNI at all (the default cert's)
        with tls_connect(certs, tunnel.port(0), sni, version="1.2") as s:
            assert served_name(s) == "backend.test"
            s.sendall(b"hi\n")
            assert s.recv(1024) == b"backend saw hi\n"
    assert metric(tunnel, "plugin.ssl_sni_allowlist.tunnelled") == 2

    refuse = start_tls_proxy(tsproxy_factory, certs, origin, ["plugins.ssl_sni_allowlist refuse"])
    with tls_connect(certs, refuse.port(0), "exact.test") as s:
        assert served_name(s) == "exact.test"
    for version in ("1.2", "1.3"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(certs, refuse.port(0), "other.test", version=version).close()
    assert metric(refuse, "plugin.ssl_sni_allowlist.refused") == 2
    assert metric(refuse, "proxy.process.ssl.total_success_handshake_count_in") == 1


# -- cert_loader ------------------------------------------------------------------------------------------
def test_cert_loader_loads_once_per_name_off_the_loop(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer
) -> None:
    proxy = start_tls_proxy(tsproxy_factory, certs, origin, [f"plugins.cert_loader {certs.lazy_dir}"])
    port = proxy.port(0)
    # first SNI: loaded from the directory; ALPN still negotiated (the context has the callback)
    with tls_connect(certs, port, "lazy.test", alpn=["h2", "http/1.1"]) as s:
        assert served_name(s) == "lazy.test"
        assert s.selected_alpn_protocol() == "h2"
    with tls_connect(certs, port, "lazy.test", alpn=["http/1.1"]) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert https_get(s).startswith(b"HTTP/1.1 200")
    with tls_connect(certs, port, "lazy.test", version="1.2") as s:  # cached
        assert served_name(s) == "lazy.test"
    # eight concurrent first handshakes for one name share one load
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: _served(certs, port, "lazy2.test"), range(8)))
    assert names == ["lazy2.test"] * 8
    assert metric(proxy, "plugin.cert_loader.loaded") == 2
    # configured names are not looked up; unknown and broken ones fall back to the default cert
    with tls_connect(certs, port, "exact.test") as s:
        assert served_name(s) == "exact.test"
    for sni in ("unknown.test", "unknown.test", "broken.test", "sub/lazy.test"):
        with tls_connect(certs, port, sni) as s:
            assert served_name(s) == "default.test"
    # unknown once (then cached as missing), broken once; a name that is not a DNS name is not looked up
    assert metric(proxy, "plugin.cert_loader.missing") == 2
    assert metric(proxy, "plugin.cert_loader.loaded") == 2
    assert "cannot load the certificate for broken.test" in proxy.output()


def _served(certs: Certs, port: int, sni: str) -> str:
    with tls_connect(certs, port, sni) as s:
        return served_name(s)


# -- header_rewrite ----------------------------------------------------------------------------------------
RULES = """\
# request side: what the origin sees
request add X-Added a
request  set   X-Env "prod east"
request remove Cookie
response set Strict-Transport-Security max-age=60
response remove Content-Type
response add X-Served-By tsproxy
"""


def test_header_rewrite_rules_and_errors(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer, tmp_path: Path
) -> None:
    proxy = start_tls_proxy(
        tsproxy_factory,
        certs,
        origin,
        ["plugins.header_rewrite rewrite.rules"],
        files={"rewrite.rules": RULES},
    )
    with tls_connect(certs, proxy.port(0), "exact.test") as s:
        response = https_get(s, "/echo", "Cookie: secret=1\r\nX-Env: dev\r\nX-Added: client\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    fields = [tuple(line.split(": ", 1)) for line in lines[1:]]
    assert ("Strict-Transport-Security", "max-age=60") in fields and ("X-Served-By", "tsproxy") in fields
    assert not any(name.lower() == "content-type" for name, _ in fields)
    seen = json.loads(body)["headers"]
    assert [v for k, v in seen if k == "X-Added"] == ["client", "a"]
    assert [v for k, v in seen if k == "X-Env"] == ["prod east"]
    assert not any(k.lower() == "cookie" for k, _ in seen)
    # reload re-reads the rules; a broken file on reload keeps the previous rules
    rules = proxy.config_dir / "rewrite.rules"
    rules.write_text("request set X-Env reloaded\n")
    assert proxy.ctl("reload").returncode == 0
    with tls_connect(certs, proxy.port(0), "exact.test") as s:
        seen = json.loads(https_get(s, "/echo").partition(b"\r\n\r\n")[2])["headers"]
    assert [v for k, v in seen if k == "X-Env"] == ["reloaded"]
    # a bad rule stops start-up with FILE:LINE
    for text, why in [
        ("request add X-A 1\nrequest frob X-B 2\n", ":2: unknown operation 'frob'"),
        ("# c\nsideways add X-A 1\n", ":2: unknown direction 'sideways'"),
        ("response remove X-A value\n", ":1: remove takes no value"),
        ("request set Bad:Name x\n", ":1: 'Bad:Name' is not a valid header field name"),
        ("request add X-A\n", ":1: add needs a value"),
    ]:
        bad = write_config_dir(
            tmp_path / f"bad{abs(hash(text))}",
            files={"plugin.config": "plugins.header_rewrite r.rules\n", "r.rules": text},
        )
        result = run_tsproxy("start", "--config-dir", str(bad), timeout=60)
        assert result.returncode != 0
        assert "plugin plugins.header_rewrite failed to load" in result.stderr
        assert f"r.rules{why}" in result.stderr, result.stderr


# -- access_log ----------------------------------------------------------------------------------------------
LINE = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<time>[^]]+)\] "(?P<req>[^"]*)" (?P<status>\S+) (?P<bytes>\S+) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<ua>(?:[^"\\]|\\.)*)" (?P<sni>\S+) (?P<tls>\S+)$'
)


def test_access_log_lines_with_tls_details(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer
) -> None:
    proxy = start_tls_proxy(tsproxy_factory, certs, origin, ["plugins.access_log"])
    log = proxy.config_dir / "log" / "access.log"
    with tls_connect(certs, proxy.port(0), "exact.test", version="1.2") as s:
        response = https_get(s, "/bytes?n=7", 'User-Agent: test "agent"\r\nReferer: https://r.test/\r\n')
        assert response.startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=5) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: nomap.test\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
    # buffered: written within about a second
    text = wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, "two access log lines", 4)
    first, second = [LINE.match(line) for line in log.read_text().splitlines()]
    assert first is not None and second is not None, log.read_text()
    assert first["ip"] == "127.0.0.1" and first["req"] == "GET /bytes?n=7 HTTP/1.1"
    assert (first["status"], first["bytes"], first["referer"]) == ("200", "7", "https://r.test/")
    assert first["ua"] == 'test \\"agent\\"'
    assert (first["sni"], first["tls"]) == ("exact.test", "TLSv1.2")
    assert re.match(r"\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}$", first["time"])
    assert text and (second["req"], second["status"]) == ("GET /x HTTP/1.1", "404")
    assert (second["bytes"], second["sni"], second["tls"]) == ("-", "-", "-")
    # a transaction right before a graceful stop is flushed at exit
    with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=5) as s:
        s.sendall(f"GET /bytes?n=3 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass
    assert proxy.stop() == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and '"GET /bytes?n=3 HTTP/1.1" 200 3 ' in lines[2], lines


# -- stats_over_http ---------------------------------------------------------------------------------
def test_stats_over_http_json_and_prometheus(
    tsproxy_factory: Factory, certs: Certs, origin: OriginServer
) -> None:
    proxy = start_tls_proxy(tsproxy_factory, certs, origin, ["plugins.stats_over_http /_stats"])
    with tls_connect(certs, proxy.port(0), "exact.test") as s:
        head, _, body = https_get(s, "/_stats").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head
    stats = json.loads(body)["global"]
    assert stats["proxy.process.ssl.total_success_handshake_count_in"] >= 1
    assert stats["proxy.process.http.incoming_requests"] >= 1
    with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=5) as s:
        text = https_get(s, "/_stats?format=prometheus").partition(b"\r\n\r\n")[2].decode()
    assert re.search(r"^proxy_process_http_incoming_requests \d+$", text, re.M), text[:500]
    assert origin.requests == []  # answered by the plugin, never the origin
