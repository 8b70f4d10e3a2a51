#!/usr/bin/env python3
"""Cost of TLS hooks: full TLS 1.3 handshakes with no plugin vs. one plugin whose VCONN_START and
SSL_CERT callbacks re-enable synchronously (issue 4 speed row: the hooks may cost <= 10%).

Two tsproxy instances (one worker each, pinned to core 1 like scripts/bench.py) are started in
the same run, A without plugin.config entries and B with the hook plugin; rounds alternate
A, B, A, B... Each round opens new connections for --duration seconds from --procs x --threads
Python clients (core 0): TCP connect, full handshake (no tickets, no resumption), close. The
figure is the proxy's CPU time (user+system, psutil) per handshake, which barely moves when the
machine is busy, plus handshakes/s (which depends on the client). Medians over the rounds;
the ratio B/A is printed.

  python3 scripts/bench_plugins.py                 # 3 rounds x 5 s per variant
  python3 scripts/bench_plugins.py --duration 2 --rounds 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/bench.py: certificates, Service, TsProxy, CpuSampler

PLUGIN = """\
from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    def cb(hook: HookID, vc: VConn) -> None:
        vc.reenable()

    api.hook_add(HookID.VCONN_START, cb)
    api.hook_add(HookID.SSL_CERT, cb)
"""


class HookedTsProxy(bench.TsProxy):
    """bench.TsProxy with the hook plugin in plugin.config (written before the process starts)."""

    def customize(self, d: Path) -> None:
        (d / "bench_hook.py").write_text(PLUGIN)
        (d / "plugin.config").write_text(f"{d / 'bench_hook.py'}\n")


def _client(port: int, threads: int, duration: float, q: Any) -> None:
    try:
        os.sched_setaffinity(0, {int(bench.CLIENT_CPU)})
    except (AttributeError, OSError):
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    deadline = time.monotonic() + duration
    counts = {"ok": 0, "err": 0}
    lock = threading.Lock()

    def loop() -> None:
        while time.monotonic() < deadline:
            try:
                with (
                    socket.create_connection((bench.HOST, port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname=bench.SNI),
                ):
                    pass
                with lock:
                    counts["ok"] += 1
            except (OSError, ssl.SSLError):
                with lock:
                    counts["err"] += 1
                time.sleep(0.01)

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + 10)
    q.put(counts)


def measure(
    port: int, svc: bench.Service, origin: bench.Service, args: argparse.Namespace
) -> dict[str, float]:
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    with bench.CpuSampler(svc, origin) as cs:
        client_args = (port, args.threads, args.duration, q)
        ps = [mp.Process(target=_client, args=client_args) for _ in range(args.procs)]
        for p in ps:
            p.start()
        results = [q.get(timeout=args.duration + 30) for _ in ps]
        for p in ps:
            p.join(10)
    ok = sum(r["ok"] for r in results)
    errors = sum(r["err"] for r in results)
    return {
        "hs_per_s": ok / cs.wall,
        "cpu_us_per_hs": 1e6 * cs.proxy_cpu / max(ok, 1),
        "errors": errors,
        "handshakes": ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {"none": [], "hooks": []}
    with tempfile.TemporaryDirectory(prefix="tsproxy-bench-plugins-") as tmpname:
        tmp = Path(tmpname)
        certs = bench.make_certs(tmp)
        origin_port = bench.free_port()
        origin = bench.start_origin("python", tmp, origin_port)
        started: list[bench.Service] = [origin]
        try:
            variants = {}
            for i, name in enumerate(("none", "hooks")):
                cls = HookedTsProxy if name == "hooks" else bench.TsProxy
                proxy = cls("tsproxy", bench.free_port(), bench.free_port())
                svc = proxy.start(tmp, certs, origin_port, i)
                started.append(svc)
                tls = bench._hs_client_ctx()
                bench.wait_ready(svc, [(proxy.tls, tls)])
                variants[name] = (proxy, svc)
            for r in range(args.rounds):
                for name in ("none", "hooks") if r % 2 == 0 else ("hooks", "none"):
                    proxy, svc = variants[name]
                    res = measure(proxy.tls, svc, origin, args)
                    results[name].append(res)
                    bench.log(
                        f"round {r + 1} {name:5s}: {res['hs_per_s']:7.1f} hs/s  "
                        f"{res['cpu_us_per_hs']:7.1f} us proxy CPU/hs  ({res['errors']:.0f} errors)"
                    )
        finally:
            for svc in reversed(started):
                svc.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    a_cpu, b_cpu = med("none", "cpu_us_per_hs"), med("hooks", "cpu_us_per_hs")
    a_hs, b_hs = med("none", "hs_per_s"), med("hooks", "hs_per_s")
    print(
        f"full TLS 1.3 handshakes, {args.rounds} rounds x {args.duration:.0f} s, "
        f"{args.procs}x{args.threads} clients, medians"
    )
    print(f"{'variant':40s} {'hs/s':>8s} {'proxy CPU us/hs':>16s}")
    print(f"{'no plugins':40s} {a_hs:8.1f} {a_cpu:16.1f}")
    print(f"{'VCONN_START + SSL_CERT, sync reenable':40s} {b_hs:8.1f} {b_cpu:16.1f}")
    print(
        f"hooks/no-plugins: CPU per handshake x{b_cpu / a_cpu:.3f} ({100 * (b_cpu / a_cpu - 1):+.1f}%), "
        f"handshakes/s x{b_hs / a_hs:.3f} ({100 * (b_hs / a_hs - 1):+.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
