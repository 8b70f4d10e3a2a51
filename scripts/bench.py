#!/usr/bin/env python3
"""tsproxy benchmark: one tsproxy worker beside one nginx worker, loopback only.

Theory of operation
-------------------
1. Throw-away certificates (ECDSA P-256 CA + leaf for localhost / 127.0.0.1) are made with
   `cryptography` in a temporary directory.
2. An origin is started on 127.0.0.1: nginx (plain HTTP/1.1, keep-alive, /1k and /64k) when
   nginx is installed, else a small asyncio origin in a child process (the table header says
   which). The origin shares core 0 with the load generator.
3. Each proxy under test is started fresh, alone, pinned to core 1 (`taskset -c 1`):
   tsproxy with ONE worker (a generated config directory: records.config, remap.config,
   ssl_multicert.config), then nginx with one worker (same certificates, proxy_pass to the same
   origin with upstream keep-alive). With --runs > 1 the rounds alternate the order.
4. Workloads (load generators pinned to core 0):
     P1  plain HTTP keep-alive GET /1k, wrk, --connections conns     req/s, p50, p99
     W1  HTTPS keep-alive GET /1k, wrk                                req/s, p50, p99
     W2  full TLS 1.3 handshake per request (new connection per GET /1k, no session
         resumption), bounded multi-process Python client           handshakes/s
     W3  HTTPS keep-alive GET /64k, wrk                               MB/s (10^6 B/s)
     W4  --idle-conns TLS connections opened and held idle (handshake done, no request):
         sum of RSS and PSS of all proxy processes before/after     KiB per connection
     H2  HTTP/2 over TLS (ALPN h2), h2load -c 10 -m 10 GET /1k (10 connections, 10 streams
         in flight on each); nginx listens `ssl http2`               req/s, mean latency
   W4 runs first on the fresh process, then a short wrk warm-up, then P1, W1, W2, W3.
5. For every run the proxy's CPU time (user+system, all its processes, psutil) is sampled
   around the workload: proxy CPU microseconds per operation (request, or connection for W2).
   This figure barely moves when other programs load the machine, unlike throughput. `bg`
   is the CPU used by processes this script did not start, as % of one core.

6. --peers [proxy.py,mitmproxy] (issue 7's peer target: tsproxy >= 10x their req/s) adds the
   peers to the same rounds, same origin, certificates and core, on P1/W1 only, in a table of their
   own (req/s, cpu/op, tsproxy/peer ratios; runs with wrk errors do not count). Nothing is
   installed: a peer is used when its executable is in --peer-bin (e.g. a venv's bin/), on PATH, or
   its module is importable; a missing peer gets a note and no row. proxy.py runs --threaded (its
   threadless mode breaks, see ProxyPyPeer) and has TLS on its only port, so no P1; mitmdump runs
   in reverse mode with TLS auto-detected, so it has both.

Everything runs on 127.0.0.1, every wait is bounded, and everything started is stopped
(process groups, try/finally). Requires: python3 with psutil and cryptography; wrk for
P1/W1/W3, h2load (nghttp2-client) for H2 and nginx for the nginx rows (each skipped with a message
when missing).

  python3 scripts/bench.py                      # all workloads, 10 s each, nginx beside
  python3 scripts/bench.py --quick --workloads P1,W1 --no-nginx
  python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install proxy.py mitmproxy
  python3 scripts/bench.py --runs 3 --workloads P1,W1 --peers --peer-bin /tmp/peers-venv/bin
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ALL_WORKLOADS = ("P1", "W1", "W2", "W3", "W4", "W5", "H2")
HOST = "127.0.0.1"
SNI = "localhost"
PROXY_CPU = "1"
CLIENT_CPU = "0"
# W5: the nginx origin also serves TLS on this port; the proxies reach it through /tls/ with a
# pooled, verified TLS connection (issue 5's HTTPS-to-HTTPS row). None: no TLS origin (W5 skipped).
ORIGIN_TLS_PORT: int | None = None
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

REPORT_LUA = r"""
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"duration_us": %.1f, "requests": %.1f, "bytes": %.1f, ' ..
      '"err_connect": %.1f, "err_read": %.1f, "err_write": %.1f, "err_status": %.1f, ' ..
      '"err_timeout": %.1f, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- certificates


def make_certs(d: Path) -> dict[str, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tsproxy bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SNI)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SNI), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(leaf.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(paths["key"], 0o600)
    return paths


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cpus: str) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", cpus, *cmd] if taskset else cmd


class Service:
    """A child process started in its own session; stopped with its whole process group."""

    def __init__(self, name: str, cmd: list[str], logfile: Path, env: dict | None = None):
        self.name = name
        self.cmd = cmd
        self.logfile = logfile
        self._log = open(logfile, "ab")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def procs(self) -> list[psutil.Process]:
        try:
            p = psutil.Process(self.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> tuple[float, frozenset[int]]:
        total = 0.0
        pids = set()
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
                pids.add(p.pid)
            except psutil.NoSuchProcess:
                pass
        return total, frozenset(pids)

    def memory(self) -> tuple[int, int]:
        rss = pss = 0
        for p in self.procs():
            try:
                m = p.memory_full_info()
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return rss, pss

    def stop(self) -> None:
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log(f"{self.name}: no exit {STOP_TIMEOUT:.0f}s after SIGTERM, SIGKILL")
            # leftovers of the group (workers) even when the leader is gone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        finally:
            self._log.close()


def http_get(port: int, path: str, tls_ctx: ssl.SSLContext | None, timeout: float = 3.0) -> tuple[int, int]:
    """One GET (Connection: close); returns (status, body length)."""
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        s: Any = tls_ctx.wrap_socket(raw, server_hostname=SNI) if tls_ctx else raw
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, len(body)


def wait_ready(svc: Service, checks: list[tuple[int, ssl.SSLContext | None]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if not svc.alive():
            tail = svc.logfile.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{svc.name} exited with {svc.popen.returncode}: {' | '.join(tail)}")
        try:
            if all(
                http_get(port, path, ctx) == (200, size)
                for port, ctx in checks
                for path, size in (("/1k", 1024), ("/64k", 65536))
            ):
                return
            last = "unexpected response"
        except (OSError, ValueError, IndexError) as e:
            last = repr(e)
        time.sleep(0.2)
    raise RuntimeError(f"{svc.name} not ready after {START_TIMEOUT:.0f}s ({last}); log {svc.logfile}")


# --------------------------------------------------------------------------- origin

PY_ORIGIN = r"""
import asyncio, sys
BODIES = {b"/1k": b"a" * 1024, b"/64k": b"b" * 65536}
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
RESP = {p: HEAD % len(b) + b
        for p, b in BODIES.items()}
NOTFOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
class Origin(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.buf = b""
    def data_received(self, data):
        self.buf += data
        out = []
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                break
            head, self.buf = self.buf[:i], self.buf[i + 4:]
            line = head.split(b"\r\n", 1)[0].split(b" ")
            out.append(RESP.get(line[1] if len(line) > 1 else b"", NOTFOUND))
            if b"\r\nconnection: close" in head.lower():
                self.t.write(b"".join(out)); self.t.close(); return
        if out:
            self.t.write(b"".join(out))
async def main():
    srv = await asyncio.get_running_loop().create_server(Origin, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"""


def _nginx_conf_head(d: Path) -> str:
    """The start of an nginx.conf shared by the origin and the nginx proxy: one worker in the
    foreground, state and temp files under ``d``, no access log; the caller goes on inside
    ``http {``."""
    user = "user root;" if os.getuid() == 0 else ""
    return (
        "worker_processes 1;\ndaemon off;\nmaster_process on;\n"
        f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{user}\n"
        "events { worker_connections 8192; }\nhttp {\n    access_log off;\n"
        f"    client_body_temp_path {d}/tmp_body; proxy_temp_path {d}/tmp_proxy;\n"
        f"    fastcgi_temp_path {d}/tmp_fcgi; uwsgi_temp_path {d}/tmp_uwsgi; scgi_temp_path {d}/tmp_scgi;\n"
    )


def start_origin(kind: str, tmp: Path, port: int, certs: dict[str, Path] | None = None) -> Service:
    d = tmp / "origin"
    (d / "www").mkdir(parents=True)
    if kind == "nginx":
        (d / "www" / "1k").write_bytes(b"a" * 1024)
        (d / "www" / "64k").write_bytes(b"b" * 65536)
        conf = (
            _nginx_conf_head(d)
            + f"""    default_type application/octet-stream;
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    open_file_cache max=16 inactive=3600s;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {d}/www;
        location / {{ }}
    }}
{_tls_origin_server(d, certs)}
}}
"""
        )
        (d / "nginx.conf").write_text(conf)
        cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
    else:
        (d / "origin.py").write_text(PY_ORIGIN)
        cmd = [sys.executable, str(d / "origin.py"), str(port)]
    svc = Service(f"origin({kind})", pinned(cmd, CLIENT_CPU), d / "origin.log")
    wait_ready(svc, [(port, None)])
    return svc


def _tls_origin_server(d: Path, certs: dict[str, Path] | None) -> str:
    if ORIGIN_TLS_PORT is None or certs is None:
        return ""
    return f"""    server {{
        listen {HOST}:{ORIGIN_TLS_PORT} ssl backlog=4096;
        ssl_certificate     {certs["cert"]};
        ssl_certificate_key {certs["key"]};
        root {d}/www;
        location / {{ }}
    }}"""


# --------------------------------------------------------------------------- proxies


class Proxy(abc.ABC):
    peer = False  # a peer (proxy.py, mitmproxy): its own table, keep-alive 1 KiB workloads only

    def __init__(self, name: str, plain: int | None, tls: int):
        self.name = name
        self.plain = plain
        self.tls = tls

    @abc.abstractmethod
    def start(self, tmp: Path, certs: dict[str, Path], origin_port: int, instance: int) -> Service:
        """Start this proxy in front of the origin; the Service is stopped by the caller."""

    def logs_hint(self, svc: Service) -> str:
        return str(svc.logfile)


def tsproxy_cmd() -> list[str]:
    exe = shutil.which("tsproxy")
    if exe:
        return [exe]
    return [sys.executable, "-c", "from tsproxy.cli import main; main()"]


class TsProxy(Proxy):
    def start(self, tmp, certs, origin_port, instance):
        d = tmp / f"tsproxy-{instance}"
        d.mkdir()
        self.config_dir = d
        shutil.copy(certs["cert"], d / "server.pem")
        shutil.copy(certs["key"], d / "server.key")
        (d / "records.config").write_text(
            f"CONFIG proxy.config.http.server_ports STRING {self.plain} {self.tls}:ssl\n"
            "CONFIG proxy.config.exec_thread.limit INT 1\n"
            "CONFIG proxy.config.ssl.number.threads INT 0\n"
            "CONFIG proxy.config.local_state_dir STRING run\n"
            "CONFIG proxy.config.log.logfile_dir STRING log\n"
            f"CONFIG proxy.config.ssl.server.cert.path STRING {d}\n"
            f"CONFIG proxy.config.ssl.server.private_key.path STRING {d}\n"
            # A benchmark harness, started as root in CI with its plugins writing state files into
            # this root-owned directory: keep root, as ATS's own test harness does (#-1).
            "CONFIG proxy.config.admin.user_id STRING #-1\n"
        )
        (d / "ssl_multicert.config").write_text(
            "dest_ip=* ssl_cert_name=server.pem ssl_key_name=server.key\n"
        )
        origin = f"http://{HOST}:{origin_port}/"
        rules = []
        if ORIGIN_TLS_PORT is not None:
            # First match wins: the TLS-origin rules go before the catch-all ones.
            for h in (SNI, HOST):
                for authority in (f"{h}:{self.tls}", h):
                    rules.append(f"map https://{authority}/tls/ https://{HOST}:{ORIGIN_TLS_PORT}/")
            with (d / "records.config").open("a") as rec:
                rec.write(f"CONFIG proxy.config.ssl.client.CA.cert.filename STRING {certs['ca']}\n")
        for scheme, port in (("http", self.plain), ("https", self.tls)):
            for h in (SNI, HOST):
                rules.append(f"map {scheme}://{h}:{port}/ {origin}")
                rules.append(f"map {scheme}://{h}/ {origin}")
        (d / "remap.config").write_text("\n".join(rules) + "\n")
        (d / "plugin.config").write_text("")
        self.customize(d)
        cmd = pinned([*tsproxy_cmd(), "start", "--config-dir", str(d)], PROXY_CPU)
        return Service("tsproxy", cmd, d / "stdout.log")

    def customize(self, d):
        """Subclasses (bench_plugins, bench_latency) add to the config dir here, before start."""

    def logs_hint(self, svc):
        return f"{self.config_dir}/log/ and {svc.logfile}"


class NginxProxy(Proxy):
    def start(self, tmp, certs, origin_port, instance):
        d = tmp / f"nginx-{instance}"
        d.mkdir()
        conf = (
            _nginx_conf_head(d)
            + f"""    keepalive_timeout 300s;
    keepalive_requests 100000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate     {certs["cert"]};
    ssl_certificate_key {certs["key"]};
    upstream origin {{
        server {HOST}:{origin_port};
        keepalive 128;
    }}
    upstream origin_tls {{
        server {HOST}:{ORIGIN_TLS_PORT or origin_port};
        keepalive 128;
    }}
    server {{
        listen {HOST}:{self.plain} backlog=4096;
        listen {HOST}:{self.tls} ssl http2 backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
        location /tls/ {{
            proxy_pass https://origin_tls/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {certs["ca"]};
            proxy_ssl_name {SNI};
            proxy_ssl_session_reuse on;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
        )
        (d / "nginx.conf").write_text(conf)
        cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
        return Service("nginx", pinned(cmd, PROXY_CPU), d / "stdout.log")


# --------------------------------------------------------------------------- peers (issue 7)
#
# Other Python reverse proxies, run beside tsproxy in the same rounds, on the same origin, with the
# same certificates and the same core. They are measured on the keep-alive 1 KiB workloads only
# (PEER_WORKLOADS). Nothing is installed: a peer is used when its executable is in --peer-bin, on
# PATH, or its module is importable by this Python; otherwise its row is skipped with a note.

PEER_NAMES = ("proxy.py", "mitmproxy")
PEER_WORKLOADS = ("P1", "W1")

PROXYPY_PLUGIN = r'''
"""bench.py: proxy.py reverse-proxy route that sends every path to the bench origin."""
import os

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

ORIGIN = os.environ["BENCH_PEER_ORIGIN"].encode()


class BenchReverseProxy(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/"]

    def handle_route(self, request, pattern):
        return Url.from_bytes(ORIGIN + request.path)
'''


class PeerProxy(Proxy):
    """A peer: `cmd` runs its executable; `mode` says what it terminates, for the output."""

    peer = True
    mode = ""

    def __init__(self, name: str, plain: int | None, tls: int, cmd: list[str], version: str):
        super().__init__(name, plain, tls)
        self.cmd = cmd
        self.version = version


class ProxyPyPeer(PeerProxy):
    # proxy.py 2.4 applies --cert-file/--key-file to every listening port, so there is no plain
    # port (no P1). Its default threadless mode is not usable here: with TLS the event loop dies on
    # the first request, without TLS on the second request of a keep-alive connection
    # (selector.modify on a closed upstream fd, FileNotFoundError). --threaded works.
    mode = "TLS terminated; --threaded (thread per connection), 1 acceptor, log-level WARNING"

    def start(self, tmp: Path, certs: dict[str, Path], origin_port: int, instance: int) -> Service:
        d = tmp / f"proxy.py-{instance}"
        d.mkdir()
        (d / "bench_proxypy_route.py").write_text(PROXYPY_PLUGIN)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(d), env.get("PYTHONPATH", "")) if p)
        env["BENCH_PEER_ORIGIN"] = f"http://{HOST}:{origin_port}"
        cmd = [
            *self.cmd,
            "--hostname", HOST, "--port", str(self.tls), "--backlog", "4096",
            "--cert-file", str(certs["cert"]), "--key-file", str(certs["key"]),
            "--enable-reverse-proxy", "--plugins", "bench_proxypy_route.BenchReverseProxy",
            "--threaded", "--num-acceptors", "1", "--num-workers", "1",
            "--data-dir", str(d / "data"), "--open-file-limit", "65536", "--log-level", "WARNING",
        ]  # fmt: skip
        return Service("proxy.py", pinned(cmd, PROXY_CPU), d / "stdout.log", env=env)


class MitmproxyPeer(PeerProxy):
    # Reverse mode detects TLS per connection (ClientHello), so the same mode serves the plain
    # port (P1) and the TLS port (W1); --certs '*=PEM' makes it present the bench leaf certificate.
    mode = "TLS terminated; mitmdump --mode reverse:, -q, flow_detail=0"

    def start(self, tmp: Path, certs: dict[str, Path], origin_port: int, instance: int) -> Service:
        d = tmp / f"mitmproxy-{instance}"
        d.mkdir()
        pem = d / "cert+key.pem"
        pem.write_bytes(certs["cert"].read_bytes() + certs["key"].read_bytes())
        os.chmod(pem, 0o600)
        origin = f"http://{HOST}:{origin_port}"
        cmd = [*self.cmd, "-q", "--listen-host", HOST]
        for port in (self.plain, self.tls):
            cmd += ["--mode", f"reverse:{origin}@{port}"]
        cmd += [
            "--certs", f"*={pem}", "--set", f"confdir={d / 'conf'}",
            "--set", "flow_detail=0", "--set", "termlog_verbosity=error",
        ]  # fmt: skip
        return Service("mitmproxy", pinned(cmd, PROXY_CPU), d / "stdout.log")


def find_peer(name: str, peer_bin: str | None) -> tuple[list[str] | None, str]:
    """(command, version) of a peer, or (None, why it is missing)."""
    import importlib.util

    exe, module, via_python = {
        "proxy.py": ("proxy", "proxy", ["-m", "proxy"]),
        "mitmproxy": ("mitmdump", "mitmproxy", ["-c", "from mitmproxy.tools.main import mitmdump as m; m()"]),
    }[name]
    candidates: list[list[str]] = []
    if peer_bin:
        p = Path(peer_bin) / exe
        if os.access(p, os.X_OK):
            candidates.append([str(p)])
    found = shutil.which(exe)
    if found:
        candidates.append([found])
    if importlib.util.find_spec(module) is not None:
        candidates.append([sys.executable, *via_python])
    if not candidates:
        where = f"{peer_bin}/{exe}, " if peer_bin else ""
        return None, f"not found ({where}`{exe}` on PATH, or `import {module}`)"
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (out.stdout + out.stderr).strip()
        # `proxy` is a common name: accept it only when it says it is proxy.py (a bare version)
        if out.returncode == 0 and (name != "proxy.py" or text[:1].isdigit()):
            first = text.splitlines()[0] if text else "?"
            return cmd, first.replace("Mitmproxy:", "").strip()
    return None, f"found {' / '.join(c[0] for c in candidates)} but `--version` failed or is not {name}"


# --------------------------------------------------------------------------- measurement


class CpuSampler:
    """CPU seconds of the proxy, the origin, and the whole machine around one workload."""

    def __init__(self, proxy: Service, origin: Service):
        self.proxy, self.origin = proxy, origin

    def __enter__(self):
        self.t0 = time.monotonic()
        self.p0, self.pids0 = self.proxy.cpu_seconds()
        self.o0, _ = self.origin.cpu_seconds()
        self.m0 = psutil.cpu_times()
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        p1, pids1 = self.proxy.cpu_seconds()
        self.proxy_cpu = p1 - self.p0
        self.pids_changed = pids1 != self.pids0
        self.origin_cpu = self.origin.cpu_seconds()[0] - self.o0
        m1 = psutil.cpu_times()
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0)  # noqa: E731
        self.machine_cpu = busy(m1) - busy(self.m0)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children_cpu = (c1.ru_utime + c1.ru_stime) - (self.c0.ru_utime + self.c0.ru_stime)
        return False

    def fields(self, client_cpu: float | None = None) -> dict:
        client = self.children_cpu if client_cpu is None else client_cpu
        w = max(self.wall, 1e-6)
        bg = self.machine_cpu - self.proxy_cpu - self.origin_cpu - client
        return {
            "wall_s": round(self.wall, 3),
            "proxy_cpu_s": round(self.proxy_cpu, 4),
            "cpu_pct": {
                "proxy": round(100 * self.proxy_cpu / w),
                "client": round(100 * client / w),
                "origin": round(100 * self.origin_cpu / w),
                "bg": max(0, round(100 * bg / w)),
            },
            "proxy_pids_changed": self.pids_changed,
        }


def run_wrk(url: str, conns: int, duration: float, lua: Path, latency: bool = True) -> dict:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(lua)]
    if latency:
        cmd.append("--latency")
    cmd = pinned([*cmd, url], CLIENT_CPU)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["errors"] = int(sum(r[k] for k in r if k.startswith("err_")))
            return r
    raise RuntimeError(
        f"wrk printed no summary (rc={out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
    )


def wrk_workload(wl: str, proxy: Proxy, svc: Service, origin: Service, args, lua: Path) -> dict:
    scheme, port = ("http", proxy.plain) if wl == "P1" else ("https", proxy.tls)
    assert port is not None, f"{proxy.name} has no port for {wl}"
    path = {"W3": "/64k", "W5": "/tls/1k"}.get(wl, "/1k")
    with CpuSampler(svc, origin) as cs:
        r = run_wrk(f"{scheme}://{HOST}:{port}{path}", args.connections, args.duration, lua)
    secs = r["duration_us"] / 1e6
    if not r["requests"]:
        # seen intermittently with tsproxy: wrk completes nothing and reports no error
        t0 = time.monotonic()
        try:
            probe = http_get(port, path, ssl._create_unverified_context() if scheme == "https" else None, 5)
        except (OSError, ValueError, IndexError) as e:
            probe = repr(e)
        raise RuntimeError(
            f"wrk completed 0 requests in {secs:.1f}s with {r['errors']} errors (proxy stalled?); "
            f"a probe GET right after: {probe} in {time.monotonic() - t0:.3f}s"
        )
    res = {
        "req_s": r["requests"] / secs,
        "mb_s": r["bytes"] / secs / 1e6,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "requests": int(r["requests"]),
        "errors": r["errors"],
        "errors_detail": {k[4:]: int(v) for k, v in r.items() if k.startswith("err_") and v},
        **cs.fields(),
    }
    res["value"] = res["mb_s"] if wl == "W3" else res["req_s"]
    res["cpu_op_us"] = 1e6 * cs.proxy_cpu / r["requests"] if r["requests"] else None
    return res


# H2: HTTP/2 streams, h2load ---------------------------------------------------------------
H2_CLIENTS = 10
H2_STREAMS = 10


def parse_h2load(text: str) -> dict[str, float]:
    """The figures of an h2load run: requests done / succeeded / failed, status classes, req/s and
    the mean request time (h2load prints no percentiles); missing lines raise ValueError."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("finished in"):
            out["req_s"] = float(words[3])
        elif line.startswith("requests:"):
            for i, w in enumerate(words[1:-1], 1):
                if words[i + 1] in ("total", "started", "done", "succeeded", "failed", "errored", "timeout"):
                    out[words[i + 1]] = float(w)
        elif line.startswith("status codes:"):
            for i in range(2, len(words) - 1, 2):
                out["status_" + words[i + 1]] = float(words[i])
        elif line.startswith("time for request:"):
            mean = words[5]
            out["mean_ms"] = float(mean[:-2]) / 1000 if mean.endswith("us") else float(mean.rstrip("ms"))
    missing = [k for k in ("req_s", "done", "succeeded", "mean_ms") if k not in out]
    if missing:
        raise ValueError(f"h2load output lacks {missing}: {text[-500:]}")
    return out


def h2_workload(proxy: Proxy, svc: Service, origin: Service, args) -> dict:
    cmd = ["h2load", "-c", str(H2_CLIENTS), "-m", str(H2_STREAMS), "-D", str(max(1, round(args.duration)))]
    cmd = pinned([*cmd, f"https://{HOST}:{proxy.tls}/1k"], CLIENT_CPU)
    with CpuSampler(svc, origin) as cs:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    r = parse_h2load(out.stdout)
    ok = int(r["succeeded"])
    errors = int(r["done"] - ok + r.get("errored", 0))
    return {
        "req_s": r["req_s"],
        "value": r["req_s"] * ok / r["done"] if r["done"] else 0.0,  # succeeded requests per second
        "mean_ms": r["mean_ms"],
        "p50_ms": None,
        "requests": ok,
        "errors": errors,
        "errors_detail": {
            k: int(v) for k, v in r.items() if k.startswith("status_") and k != "status_2xx" and v
        },
        **cs.fields(),
        "cpu_op_us": 1e6 * cs.proxy_cpu / ok if ok else None,
    }


# W2: full handshakes, bounded Python client -------------------------------------------


def _hs_client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the CertificateVerify signature is still checked (TLS 1.3)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET  # never resume: every connection is a full handshake
    return ctx


def _hs_proc(port: int, threads: int, duration: float, q) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {int(CLIENT_CPU)})
    ctx = _hs_client_ctx()
    req = f"GET /1k HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + duration
    lock = threading.Lock()
    stats = {"ok": 0, "err": 0, "resumed": 0, "bad_len": 0, "lat": [], "errs": {}}

    def worker():
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                with (
                    socket.create_connection((HOST, port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname=SNI) as s,
                ):
                    s.sendall(req)
                    buf = b""
                    while len(buf) < 1 << 20:  # until the proxy closes (Connection: close)
                        c = s.recv(65536)
                        if not c:
                            break
                        buf += c
                    n = len(buf.partition(b"\r\n\r\n")[2])
                    reused = s.session_reused
                dt = time.monotonic() - t0
                with lock:
                    stats["ok"] += 1
                    stats["resumed"] += int(bool(reused))
                    stats["bad_len"] += int(n != 1024)
                    stats["lat"].append(dt)
            except (OSError, ssl.SSLError) as e:
                with lock:
                    stats["err"] += 1
                    k = type(e).__name__
                    stats["errs"][k] = stats["errs"].get(k, 0) + 1
                time.sleep(0.01)

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + 10)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu"] = ru.ru_utime + ru.ru_stime
    lat = sorted(stats.pop("lat"))
    stats["lat_sample"] = lat[:: max(1, len(lat) // 2000)]
    q.put(stats)


def handshake_workload(proxy: Proxy, svc: Service, origin: Service, args) -> dict:
    procs, threads = args.w2_procs, args.w2_threads
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    with CpuSampler(svc, origin) as cs:
        ps = [mp.Process(target=_hs_proc, args=(proxy.tls, threads, args.duration, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        results = []
        for _ in ps:
            try:
                results.append(q.get(timeout=args.duration + 30))
            except Exception:  # queue.Empty
                break
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    ok = sum(r["ok"] for r in results)
    lat = sorted(x for r in results for x in r["lat_sample"])
    client_cpu = sum(r["cpu"] for r in results)
    errs: dict[str, int] = {}
    for r in results:
        for k, v in r["errs"].items():
            errs[k] = errs.get(k, 0) + v
    res = {
        "value": ok / cs.wall,
        "handshakes": ok,
        "errors": sum(r["err"] for r in results),
        "errors_detail": errs,
        "resumed": sum(r["resumed"] for r in results),
        "bad_len": sum(r["bad_len"] for r in results),
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "client_cpu_us_per_hs": 1e6 * client_cpu / ok if ok else None,
        "in_flight": procs * threads,
        **cs.fields(client_cpu=client_cpu),
    }
    res["cpu_op_us"] = 1e6 * cs.proxy_cpu / ok if ok else None
    return res


# W4: idle TLS connections ----------------------------------------------------------------


async def _open_idle(port: int, n: int, ctx: ssl.SSLContext) -> tuple[list, int]:
    sem = asyncio.Semaphore(100)
    conns: list = []
    failed = 0

    async def one():
        nonlocal failed
        async with sem:
            try:
                _r, w = await asyncio.wait_for(
                    asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=SNI), 20
                )
                conns.append(w)
            except (TimeoutError, OSError, ssl.SSLError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, failed


def idle_workload(proxy: Proxy, svc: Service, args, certs) -> dict:
    n = args.idle_conns
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.options |= ssl.OP_NO_TICKET
    time.sleep(0.5)
    rss0, pss0 = svc.memory()

    async def main():
        conns, failed = await _open_idle(proxy.tls, n, ctx)
        await asyncio.sleep(1.0)  # let the proxy settle (buffers released after handshake)
        rss1, pss1 = svc.memory()
        alive_proxy = svc.alive()
        for w in conns:
            w.transport.abort()
        await asyncio.sleep(0.2)
        return len(conns), failed, rss1, pss1, alive_proxy

    ok, failed, rss1, pss1, alive = asyncio.run(asyncio.wait_for(main(), 120))
    per = max(ok, 1) * 1024
    return {
        "value": (pss1 - pss0) / per,
        "rss_kib_per_conn": (rss1 - rss0) / per,
        "pss_kib_per_conn": (pss1 - pss0) / per,
        "base_rss_mb": rss0 / 1e6,
        "ok": ok,
        "errors": failed,
        "proxy_alive": alive,
        "cpu_op_us": None,
    }


# --------------------------------------------------------------------------- orchestration


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_proxy_round(proxy: Proxy, tmp, certs, origin, origin_port, args, lua, instance, have_wrk) -> dict:
    results: dict[str, Any] = {}
    svc = None
    try:
        log(f"starting {proxy.name} (instance {instance})")
        svc = proxy.start(tmp, certs, origin_port, instance)
        if proxy.peer:
            log(f"{proxy.name} command: {shlex.join(svc.cmd)}")
        ca_ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        checks: list[tuple[int, ssl.SSLContext | None]] = [(proxy.tls, ca_ctx)]
        if proxy.plain is not None:
            checks.insert(0, (proxy.plain, None))
        wait_ready(svc, checks)
        order = [w for w in ("W4", "P1", "W1", "W2", "W3", "W5", "H2") if w in args.workloads]
        warmed = False
        for wl in order:
            if not svc.alive():
                results[wl] = {"error": f"{proxy.name} died before {wl}; logs {proxy.logs_hint(svc)}"}
                continue
            if wl in ("P1", "W1", "W3", "W5") and not have_wrk:
                results[wl] = {"skipped": "wrk not installed"}
                continue
            if proxy.peer and wl not in PEER_WORKLOADS:
                results[wl] = {"skipped": f"peers are measured on {'/'.join(PEER_WORKLOADS)} only"}
                continue
            if wl == "P1" and proxy.plain is None:
                results[wl] = {"skipped": f"{proxy.name} has no plain-HTTP port in this setup"}
                continue
            if wl == "H2" and shutil.which("h2load") is None:
                results[wl] = {"skipped": "h2load not installed (apt-get install nghttp2-client)"}
                continue
            if wl == "W5" and ORIGIN_TLS_PORT is None:
                results[wl] = {"skipped": "needs the nginx origin (TLS origin port)"}
                continue
            if not warmed and wl != "W4" and have_wrk:
                run_wrk(f"https://{HOST}:{proxy.tls}/1k", args.connections, args.warmup, lua, latency=False)
                warmed = True
            log(f"{proxy.name} {wl} ...")
            try:
                if wl == "W4":
                    r = idle_workload(proxy, svc, args, certs)
                elif wl == "W2":
                    r = handshake_workload(proxy, svc, origin, args)
                elif wl == "H2":
                    r = h2_workload(proxy, svc, origin, args)
                else:
                    r = wrk_workload(wl, proxy, svc, origin, args, lua)
            except Exception as e:  # record, keep going with the other workloads
                r = {"error": f"{type(e).__name__}: {e}"}
            if not svc.alive():
                r["error"] = (
                    r.get("error", "")
                    + f" {proxy.name} exited (rc={svc.popen.returncode}); logs {proxy.logs_hint(svc)}"
                )
            elif r.get("proxy_pids_changed"):
                r["warning"] = (
                    "proxy process set changed during the run (worker replaced?); "
                    f"logs {proxy.logs_hint(svc)}"
                )
            if r.get("errors"):
                r["warning"] = (
                    r.get("warning", "") + f" {r['errors']} client errors; logs {proxy.logs_hint(svc)}"
                ).strip()
            results[wl] = r
            log(f"{proxy.name} {wl}: {short(r)}")
    except Exception as e:
        for wl in args.workloads:
            results.setdefault(wl, {"error": f"{type(e).__name__}: {e}"})
    finally:
        if svc is not None:
            svc.stop()
    return results


def short(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    cpu = r.get("cpu_op_us")
    return (
        f"value={r['value']:.1f} cpu/op={'-' if cpu is None else f'{cpu:.1f}us'} errors={r.get('errors', 0)}"
    )


UNITS = {
    "P1": "req/s",
    "W1": "req/s",
    "W2": "hs/s",
    "W3": "MB/s",
    "W4": "KiB/conn",
    "W5": "req/s",
    "H2": "req/s",
}
DESC = {
    "P1": "plain HTTP keep-alive GET 1 KiB",
    "W1": "HTTPS keep-alive GET 1 KiB",
    "W2": "full TLS 1.3 handshake per GET 1 KiB",
    "W3": "HTTPS keep-alive GET 64 KiB",
    "W4": "idle TLS connections, PSS delta",
    "W5": "HTTPS keep-alive GET 1 KiB via a pooled TLS origin",
    "H2": "HTTP/2 GET 1 KiB, 10 connections x 10 streams",
}


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None and "error" not in r and "skipped" not in r]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, nd: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}" if abs(v) < 100 else f"{v:,.0f}"


def source_state() -> str:
    """The tsproxy code measured: git HEAD of this checkout and how many files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"git {head or '?'}" + (f" + {len(dirty)} modified files" if dirty else "")


def summarize(data: dict) -> str:
    proxies = data["proxies"]
    lines = [
        f"# tsproxy benchmark, {data['started']} .. {data['finished']}",
        f"# machine: {data['machine']}",
        f"# tsproxy source: {data.get('source', 'unknown')}",
        f"# origin: {data['origin']} on 127.0.0.1:{data['origin_port']} (cpu {CLIENT_CPU}); proxies on cpu "
        f"{PROXY_CPU} (taskset {'yes' if data['taskset'] else 'NOT available'}), "
        f"load generators on cpu {CLIENT_CPU}",
        f"# {data['duration']}s per workload, {data['connections']} connections (wrk -t1), "
        f"W2: Python client {data['w2_in_flight']} in flight; W4: {data['idle_conns']} connections; "
        f"runs={data['runs']} (median shown)",
        "# proxy_cpu/op = proxy CPU time (all its processes) per request (P1/W1/W3/H2) or connection "
        "(W2), us",
    ]
    for note in data["notes"]:
        lines.append(f"# NOTE: {note}")
    peers = data.get("peers", {})
    names = [n for n in proxies if n not in peers]
    hdr = f"{'workload':<9}{'metric':<10}" + "".join(f"{n:>12}" for n in names)
    if len(names) == 2:
        hdr += f"{'ratio':>8}" + "".join(f"{'cpu/op ' + n:>18}" for n in names) + f"{'ratio':>8}"
    else:
        hdr += "".join(f"{'cpu/op ' + n:>18}" for n in names)
    lines += ["", hdr, "-" * len(hdr)]
    details = []
    for wl in data["workloads"]:
        vals, cpus = [], []
        for n in names:
            runs = proxies[n].get(wl, [])
            vals.append(median_of(runs, "value"))
            cpus.append(median_of(runs, "cpu_op_us"))
        row = f"{wl:<9}{UNITS[wl]:<10}" + "".join(f"{fmt(v):>12}" for v in vals)
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"  # noqa: E731
        if len(names) == 2:
            row += f"{ratio(vals[0], vals[1]):>8}" + "".join(f"{fmt(c):>18}" for c in cpus)
            row += f"{ratio(cpus[0], cpus[1]):>8}"
        else:
            row += "".join(f"{fmt(c):>18}" for c in cpus)
        lines.append(row)
        for n in names:
            for i, r in enumerate(proxies[n].get(wl, [])):
                details.append(f"  {wl} {n} run{i + 1}: {detail(wl, r)}")
    if peers:
        lines += peer_table(data)
        for n in peers:
            for wl in data["workloads"]:
                for i, r in enumerate(proxies[n].get(wl, [])):
                    details.append(f"  {wl} {n} run{i + 1}: {detail(wl, r)}")
    lines += ["", "details (per run):", *details]
    return "\n".join(lines) + "\n"


PEER_TARGET = 10.0  # issue 7: tsproxy >= 10x the proxied req/s of each peer


def clean_median(runs: list[dict[str, Any]], key: str) -> tuple[float | None, int]:
    """Median of `key` over the runs with no client error (a run with errors is no throughput
    figure), and how many runs were clean."""
    ok = [r for r in runs if "error" not in r and "skipped" not in r and not r.get("errors")]
    vals = [r[key] for r in ok if r.get(key) is not None]
    return (statistics.median(vals) if vals else None), len(ok)


def peer_table(data: dict[str, Any]) -> list[str]:
    proxies, peers = data["proxies"], data["peers"]
    out = [
        "",
        f"peers (issue 7: tsproxy >= {PEER_TARGET:g}x each peer's req/s); same origin, certificates and "
        f"core {PROXY_CPU}; medians over runs with 0 wrk errors",
    ]
    for n, info in peers.items():
        out.append(f"# {n} {info['version']}: {info['mode']}")
    hdr = (
        f"{'workload':<9}{'proxy':<11}{'req/s':>10}{'cpu/op us':>11}{'clean':>7}"
        f"{'tsproxy/peer req/s':>20}{'peer/tsproxy cpu/op':>21}  target"
    )
    out += [hdr, "-" * len(hdr)]
    for wl in data["workloads"]:
        if wl not in PEER_WORKLOADS:
            continue
        ts_runs = proxies.get("tsproxy", {}).get(wl, [])
        ts_v, ts_ok = clean_median(ts_runs, "value")
        ts_c, _ = clean_median(ts_runs, "cpu_op_us")
        out.append(f"{wl:<9}{'tsproxy':<11}{fmt(ts_v):>10}{fmt(ts_c):>11}{f'{ts_ok}/{len(ts_runs)}':>7}")
        for n in peers:
            runs = proxies[n].get(wl, [])
            skipped = [r["skipped"] for r in runs if "skipped" in r]
            if skipped:
                out.append(f"{wl:<9}{n:<11}  skipped: {skipped[0]}")
                continue
            v, ok = clean_median(runs, "value")
            c, _ = clean_median(runs, "cpu_op_us")
            if v is None:
                why = "every run had client errors or failed (no throughput figure)"
                out.append(f"{wl:<9}{n:<11}{'-':>10}{'-':>11}{f'{ok}/{len(runs)}':>7}  {why}")
                continue
            rv = ts_v / v if ts_v is not None and v else None
            rc = c / ts_c if c is not None and ts_c else None
            met = "-" if rv is None else ("met" if rv >= PEER_TARGET else "NOT met")
            out.append(
                f"{wl:<9}{n:<11}{fmt(v):>10}{fmt(c):>11}{f'{ok}/{len(runs)}':>7}"
                f"{'-' if rv is None else f'{rv:.1f}x':>20}{'-' if rc is None else f'{rc:.1f}x':>21}  {met}"
            )
    return out


def detail(wl: str, r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    parts = [f"{UNITS[wl]}={fmt(r['value'])}"]
    if wl == "W4":
        parts += [
            f"RSS={r['rss_kib_per_conn']:.1f}KiB/conn",
            f"PSS={r['pss_kib_per_conn']:.1f}KiB/conn",
            f"base_RSS={r['base_rss_mb']:.1f}MB",
            f"ok={r['ok']} failed={r['errors']}",
        ]
    else:
        if r.get("p50_ms") is not None:
            parts += [f"p50={r['p50_ms']:.2f}ms", f"p99={r['p99_ms']:.2f}ms"]
        if r.get("mean_ms") is not None:
            parts.append(f"mean={r['mean_ms']:.2f}ms")
        if wl == "W3":
            parts.append(f"req/s={r['req_s']:,.0f}")
        if wl == "W2":
            parts += [
                f"resumed={r['resumed']}",
                f"bad_len={r['bad_len']}",
                f"client_cpu/hs={fmt(r['client_cpu_us_per_hs'])}us",
            ]
        parts.append(
            f"errors={r.get('errors', 0)}" + (f" {r['errors_detail']}" if r.get("errors_detail") else "")
        )
        parts.append(f"proxy_cpu/op={fmt(r['cpu_op_us'])}us")
        c = r["cpu_pct"]
        parts.append(f"cpu% proxy={c['proxy']} client={c['client']} origin={c['origin']} bg={c['bg']}")
    if r.get("warning"):
        parts.append("WARNING " + r["warning"])
    return " ".join(parts)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per workload (default 10, --quick 3)"
    )
    ap.add_argument("--quick", action="store_true", help="3 s per workload, 1 s warm-up, 500 idle conns")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma list of P1,W1,W2,W3,W4,W5,H2")
    ap.add_argument("--runs", type=int, default=1, help="rounds; proxies alternate order, medians reported")
    ap.add_argument("--idle-conns", type=int, default=None, help="W4 connections (default 2000)")
    ap.add_argument("--w2-procs", type=int, default=4, help="W2 client processes (default 4)")
    ap.add_argument("--w2-threads", type=int, default=5, help="W2 threads per process (default 5)")
    ap.add_argument("--origin", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--nginx", dest="nginx", action="store_true", default=True, help="nginx beside (default)")
    ap.add_argument("--no-nginx", dest="nginx", action="store_false", help="tsproxy only")
    ap.add_argument(
        "--peers",
        nargs="?",
        const=",".join(PEER_NAMES),
        default=os.environ.get("BENCH_PEERS") or None,
        help=f"also run peers ({','.join(PEER_NAMES)}; default all) on {'/'.join(PEER_WORKLOADS)} "
        "beside tsproxy; nothing is installed, missing peers are skipped with a note (env BENCH_PEERS)",
    )
    ap.add_argument(
        "--peer-bin",
        default=os.environ.get("BENCH_PEER_BIN") or None,
        help="directory searched first for the peers' executables (proxy, mitmdump), e.g. a venv's "
        "bin/ (env BENCH_PEER_BIN)",
    )
    ap.add_argument("--out", help="also write the table here, and raw data to OUT.json")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)
    a.duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    a.warmup = 1.0 if a.quick else 2.0
    a.idle_conns = a.idle_conns if a.idle_conns is not None else (500 if a.quick else 2000)
    wl = [w.strip().upper() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in wl if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {','.join(ALL_WORKLOADS)}")
    a.workloads = [w for w in ALL_WORKLOADS if w in wl]
    a.runs = max(1, a.runs)
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip()] if a.peers else []
    bad = [p for p in a.peers if p not in PEER_NAMES]
    if bad:
        ap.error(f"unknown peers {bad}; choose from {','.join(PEER_NAMES)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    have_wrk = shutil.which("wrk") is not None
    have_nginx = shutil.which("nginx") is not None
    if not have_wrk:
        notes.append("wrk not installed (apt-get install -y wrk): P1/W1/W3 skipped")
    if args.nginx and not have_nginx:
        notes.append(
            "nginx not installed (apt-get install -y nginx-light): nginx rows skipped, Python origin used"
        )
    if not shutil.which("taskset"):
        notes.append("taskset not available: processes not pinned")
    origin_kind = args.origin if args.origin != "auto" else ("nginx" if have_nginx else "python")
    if origin_kind == "python":
        notes.append("origin is the built-in asyncio origin (slower than nginx; may limit throughput)")
    for n in notes:
        log(n)
    raise_nofile(args.idle_conns + 4096)

    tmp = Path(tempfile.mkdtemp(prefix="tsproxy-bench-"))
    os.chmod(tmp, 0o755)
    origin = None
    lua = tmp / "report.lua"
    lua.write_text(REPORT_LUA)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    proxies: list[Proxy] = [TsProxy("tsproxy", free_port(), free_port())]
    if args.nginx and have_nginx:
        proxies.append(NginxProxy("nginx", free_port(), free_port()))
    peers: dict[str, dict[str, str]] = {}
    for name in args.peers:
        cmd, version = find_peer(name, args.peer_bin)
        if cmd is None:
            note = f"peer {name} {version}: its row is skipped (pip install {name} into a venv, --peer-bin)"
            notes.append(note)
            log(note)
            continue
        klass = ProxyPyPeer if name == "proxy.py" else MitmproxyPeer
        plain = None if klass is ProxyPyPeer else free_port()
        peer = klass(name, plain, free_port(), cmd, version)
        proxies.append(peer)
        peers[name] = {"version": version, "mode": peer.mode, "cmd": " ".join(cmd)}
        log(f"peer {name} {version}: {' '.join(cmd)}")
    data: dict[str, Any] = {"proxies": {p.name: {w: [] for w in args.workloads} for p in proxies}}
    data["peers"] = peers
    try:
        certs = make_certs(tmp)
        origin_port = free_port()
        global ORIGIN_TLS_PORT
        ORIGIN_TLS_PORT = free_port() if origin_kind == "nginx" else None
        origin = start_origin(origin_kind, tmp, origin_port, certs)
        log(f"origin {origin_kind} on {HOST}:{origin_port}; temp dir {tmp}")
        for rnd in range(args.runs):
            order = proxies if rnd % 2 == 0 else proxies[::-1]
            for p in order:
                res = run_proxy_round(p, tmp, certs, origin, origin_port, args, lua, rnd, have_wrk)
                for wl, r in res.items():
                    data["proxies"][p.name][wl].append(r)
    finally:
        if origin is not None:
            origin.stop()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    data.update(
        started=started,
        finished=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        machine=f"{os.cpu_count()} cpus, {model}, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}",
        origin=origin_kind,
        origin_port=origin_port,
        taskset=bool(shutil.which("taskset")),
        duration=args.duration,
        connections=args.connections,
        idle_conns=args.idle_conns,
        w2_in_flight=args.w2_procs * args.w2_threads,
        runs=args.runs,
        workloads=args.workloads,
        notes=notes,
    )
    data["source"] = source_state()
    table = summarize(data)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out + ".json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
