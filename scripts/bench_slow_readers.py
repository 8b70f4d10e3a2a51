#!/usr/bin/env python3
"""Slow readers: what one connection whose client stops reading costs the proxy (issue 14, item 4).

Theory of operation
-------------------
1. Throw-away certificates and an origin serving a 4 MiB body at ``/4m`` on 127.0.0.1 (nginx
   when installed, else the Python origin of ``scripts/bench.py`` extended with ``/4m``).
2. Each proxy is started fresh and alone (tsproxy with one worker, then nginx with one worker,
   configured as in ``scripts/bench.py``; ``--runs`` > 1 alternates the order).
3. ``--conns`` clients (default 200; plain HTTP, TLS or both, ``--mode``) each connect with a
   small receive buffer (``SO_RCVBUF`` 8 KiB before connect, so the client's kernel does not
   swallow the body), send ``GET /4m``, read the response head and the first 16 KiB, then stop
   reading: the slowest reader there is. The proxy's buffers fill to whatever bound it has.
4. The proxy's memory (RSS and PSS summed over all its processes, psutil) is sampled before the
   clients connect and after it has stopped growing (no change of more than 1 % for 2 s, at most
   ``--settle`` seconds): growth / clients = KiB per slow-reader connection. The kernel's TCP
   memory (``/proc/net/sockstat``, pages of socket buffers of the whole machine; the clients' and
   the origin's sockets are in it too) is reported beside it: RSS does not count socket buffers.
5. Then every client reads its response to the end, which must be 4 MiB each (nothing lost), and
   the figures are printed, one line per proxy and run, then the medians.

Bounded: at most ``--conns`` connections (≤ 2,000), every wait has a deadline, everything started
is stopped. Requires psutil and cryptography (as scripts/bench.py).

  python3 scripts/bench_slow_readers.py                     # 200 TLS + plain readers, nginx beside
  python3 scripts/bench_slow_readers.py --conns 500 --mode tls --runs 3 --no-nginx
  python3 scripts/bench_slow_readers.py --base-bin /tmp/old/bin   # + a "tsproxy-base" row: the
      # tsproxy executable in that directory (an older checkout), in the same rounds
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # scripts/bench.py: certificates, origin, proxies, Service

BODY = 4 * 1024 * 1024
HEAD_READ = 16 * 1024
CLIENT_RCVBUF = 8192
MAX_CONNS = 2000


def tcp_mem_kib() -> int | None:
    """Kernel TCP socket buffer memory of the whole machine (sockstat's ``mem``, in pages)."""
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()
                return int(f[f.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return None
    return None


class SlowReader:
    """One client: request sent, head and a little body read, then it stops reading."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        raw.settimeout(20)
        raw.connect((bench.HOST, port))
        self.sock: Any = ctx.wrap_socket(raw, server_hostname=bench.SNI) if ctx else raw
        self.sock.sendall(f"GET /4m HTTP/1.1\r\nHost: {bench.SNI}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < HEAD_READ:
            chunk = self.sock.recv(HEAD_READ)
            if not chunk:
                raise OSError("closed before the head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(f"unexpected answer {head[:40]!r}")
        self.got = len(body)

    def finish(self) -> int:
        """Read the rest of the 4 MiB body; the number of body bytes received in all."""
        self.sock.settimeout(60)
        try:
            while self.got < BODY:
                chunk = self.sock.recv(262144)
                if not chunk:
                    break
                self.got += len(chunk)
        except OSError:
            pass
        finally:
            self.sock.close()
        return self.got


def settle(svc: bench.Service, limit: float) -> tuple[int, int, float]:
    """Sample the proxy's memory until it stops growing; (rss, pss, seconds waited)."""
    t0 = time.monotonic()
    history: list[tuple[float, int]] = []
    rss, pss = svc.memory()
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        rss, pss = svc.memory()
        now = time.monotonic()
        history.append((now, pss))
        old = [p for t, p in history if now - t >= 2.0]
        if old and abs(pss - old[-1]) <= 0.01 * max(pss, 1):
            break
    return rss, pss, time.monotonic() - t0


def measure(proxy: bench.Proxy, svc: bench.Service, args: argparse.Namespace, ctx: ssl.SSLContext) -> dict:
    time.sleep(0.5)
    rss0, pss0 = svc.memory()
    k0 = tcp_mem_kib()
    plans: list[tuple[int, ssl.SSLContext | None]] = []
    for i in range(args.conns):
        tls = args.mode == "tls" or (args.mode == "both" and i % 2 == 0)
        plans.append((proxy.tls, ctx) if tls else (proxy.plain or proxy.tls, None))
    readers: list[SlowReader] = []
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for fut in [pool.submit(SlowReader, port, c) for port, c in plans]:
            try:
                readers.append(fut.result(timeout=60))
            except (OSError, concurrent.futures.TimeoutError):
                failed += 1
    rss1, pss1, waited = settle(svc, args.settle)
    k1 = tcp_mem_kib()
    alive = svc.alive()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(SlowReader.finish, readers, timeout=300))
    n = max(len(readers), 1)
    return {
        "proxy": proxy.name,
        "ok": len(readers),
        "failed": failed,
        "rss_kib": (rss1 - rss0) / 1024 / n,
        "pss_kib": (pss1 - pss0) / 1024 / n,
        "kernel_kib": (k1 - k0) / n if k0 is not None and k1 is not None else None,
        "base_rss_mib": rss0 / 2**20,
        "settled_s": waited,
        "complete": sum(1 for g in got if g == BODY),
        "alive": alive,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=200, help="slow readers per proxy (at most 2000)")
    ap.add_argument("--mode", choices=("tls", "plain", "both"), default="both")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--settle", type=float, default=20.0, help="longest wait for memory to stop growing (s)")
    ap.add_argument("--nginx", dest="nginx", action="store_true", default=True)
    ap.add_argument("--no-nginx", dest="nginx", action="store_false")
    ap.add_argument("--records", action="append", default=[], help="extra records.config line for tsproxy")
    ap.add_argument("--base-bin", help="directory with another tsproxy executable: a 'tsproxy-base' row")
    args = ap.parse_args(argv)
    args.conns = max(1, min(args.conns, MAX_CONNS))
    bench.raise_nofile(args.conns * 2 + 256)
    have_nginx = shutil.which("nginx") is not None
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tsproxy-slow-") as tmpname:
        tmp = Path(tmpname)
        certs = bench.make_certs(tmp)
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        origin_port = bench.free_port()
        kind = "nginx" if have_nginx else "python"
        if kind == "python":
            bench.PY_ORIGIN = bench.PY_ORIGIN.replace(
                'b"/64k": b"b" * 65536}', f'b"/64k": b"b" * 65536, b"/4m": b"c" * {BODY}}}'
            )
        origin = bench.start_origin(kind, tmp, origin_port)
        (tmp / "origin" / "www" / "4m").write_bytes(b"c" * BODY)
        extra = "".join(line.rstrip("\n") + "\n" for line in args.records)

        class TsProxy(bench.TsProxy):
            bin_dir: str | None = None

            def customize(self, d: Path) -> None:
                with (d / "records.config").open("a") as rec:
                    rec.write(extra)

            def start(self, tmp: Path, certs: dict[str, Path], port: int, instance: int) -> bench.Service:
                path = os.environ["PATH"]
                if self.bin_dir:
                    os.environ["PATH"] = self.bin_dir + os.pathsep + path  # bench.tsproxy_cmd looks there
                try:
                    return super().start(tmp, certs, port, instance)
                finally:
                    os.environ["PATH"] = path

        proxies: list[bench.Proxy] = [TsProxy("tsproxy", bench.free_port(), bench.free_port())]
        if args.base_bin:
            base = TsProxy("tsproxy-base", bench.free_port(), bench.free_port())
            base.bin_dir = args.base_bin
            proxies.append(base)
        if args.nginx and have_nginx:
            proxies.append(bench.NginxProxy("nginx", bench.free_port(), bench.free_port()))
        elif args.nginx:
            print("nginx not installed: tsproxy only", file=sys.stderr)
        try:
            instance = 0
            for run in range(args.runs):
                order = proxies if run % 2 == 0 else proxies[::-1]
                for proxy in order:
                    instance += 1
                    svc = proxy.start(tmp, certs, origin_port, instance)
                    try:
                        bench.wait_ready(svc, [(proxy.tls, ctx)])
                        r = measure(proxy, svc, args, ctx)
                    finally:
                        svc.stop()
                    r["run"] = run + 1
                    results.append(r)
                    print(line(r), flush=True)
        finally:
            origin.stop()
    print(f"\n{args.conns} slow readers ({args.mode}), 4 MiB body, origin {kind}; medians of {args.runs}:")
    print(f"{'proxy':12} {'RSS KiB/conn':>12} {'PSS KiB/conn':>12} {'kernel TCP KiB/conn':>20} complete")
    for proxy in proxies:
        rs = [r for r in results if r["proxy"] == proxy.name]
        if not rs:
            continue
        kern = [r["kernel_kib"] for r in rs if r["kernel_kib"] is not None]
        print(
            f"{proxy.name:12} {statistics.median(r['rss_kib'] for r in rs):12.1f} "
            f"{statistics.median(r['pss_kib'] for r in rs):12.1f} "
            f"{(statistics.median(kern) if kern else float('nan')):20.1f} "
            f"{min(r['complete'] for r in rs):>5}/{rs[0]['ok']}"
        )
    return 0 if all(r["alive"] and r["complete"] == r["ok"] and not r["failed"] for r in results) else 1


def line(r: dict) -> str:
    kern = "n/a" if r["kernel_kib"] is None else f"{r['kernel_kib']:.1f}"
    return (
        f"run {r['run']} {r['proxy']:12} readers {r['ok']} (failed {r['failed']}): "
        f"RSS {r['rss_kib']:.1f} KiB/conn, "
        f"PSS {r['pss_kib']:.1f} KiB/conn, kernel TCP {kern} KiB/conn, base RSS {r['base_rss_mib']:.1f} MiB, "
        f"settled in {r['settled_s']:.1f} s, complete bodies {r['complete']}/{r['ok']}, alive {r['alive']}"
    )


if __name__ == "__main__":
    sys.exit(main())
