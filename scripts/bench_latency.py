#!/usr/bin/env python3
"""Latency of other connections while handshakes are paused in a plugin hook (issue 7: "a
handshake paused in a plugin hook adds no latency to other connections on the same worker").

One tsproxy (one worker, one ssl port, pinned to core 1 like scripts/bench.py) runs a plugin that
pauses every TLS handshake whose SNI is `paused.test` in SSL_CERT (--hook VCONN_START: nothing is
read yet there, so it pauses the connections that come from 127.0.0.2, which is where this
script's paused clients connect from) and never re-enables them: they end by
proxy.config.ssl.handshake_timeout_in (--handshake-timeout, set just above one phase) or when the
proxy notices that the client went away. The origin is bench.py's (nginx when installed, else its
asyncio origin), on core 0 with the load generator.

Each round measures W1-style keep-alive HTTPS GET /1k with `wrk -t1 -c50 -d10s --latency` on
core 0 (URL host `localhost`, so wrk sends SNI localhost) in two phases; rounds alternate A, B /
B, A so that noise from other programs hits both:
  A  nothing paused;
  B  --paused (100) TLS connections from 127.0.0.2 with SNI paused.test sent their ClientHello
     and are held in the hook for the whole wrk run.
The plugin publishes how many handshakes it holds (a JSON file rewritten on every pause and
every VCONN_CLOSE of a held connection). Before and after every wrk run the script checks it:
A must hold 0 and pause nothing; B must hold all --paused before wrk starts and still all of
them, with none closed, after wrk ends, and every paused client must still be open with no byte
from the proxy (no ServerHello). A phase that fails a check is reported and left out of the
medians (exit status 1). After B the clients close and the script waits (bounded) until the
proxy has let go of every held connection before the next phase starts.

Reported: p50, p90, p99 latency, req/s, and the proxy's CPU time (user+system, psutil, all its
processes) per request, medians over the rounds, and the ratios B/A. When wrk is not installed
the script prints a note and exits 0.

  python3 scripts/bench_latency.py                    # 3 rounds x (A, B) x 10 s
  python3 scripts/bench_latency.py --rounds 1 --duration 3 --paused 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/bench.py: certificates, origin, Service, TsProxy, CpuSampler, run_wrk

PAUSED_SNI = "paused.test"
PAUSED_SRC = "127.0.0.2"  # the paused clients' source address (what VCONN_START can match on)
HOOKS = ("SSL_CERT", "VCONN_START")

PLUGIN = '''\
"""bench_latency: hold handshakes in HOOK and never re-enable them.

args: HOOK STATEFILE SNI SRC_IP
SSL_CERT (or any hook after the ClientHello) holds connections whose SNI is SNI; VCONN_START
(nothing read yet) holds those from SRC_IP. STATEFILE gets {"pid", "paused_now",
"paused_total", "closed"} rewritten (atomically) on every pause and every VCONN_CLOSE of a held
connection. Everything else is re-enabled at once.
"""

from __future__ import annotations

import json
import os

from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    hook_name, path, sni, src_ip = args
    hook_id = HookID[hook_name]
    state = {"pid": os.getpid(), "paused_now": 0, "paused_total": 0, "closed": 0}

    def publish() -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(state))
        os.replace(tmp, path)

    def matches(vc: VConn) -> bool:
        if hook_id is HookID.VCONN_START:
            client = vc.client_address
            return client is not None and client[0] == src_ip
        return vc.sni == sni

    def on_hook(hook: HookID, vc: VConn) -> None:
        if not matches(vc):
            vc.reenable()
            return
        vc.user_data["bench_latency_paused"] = True
        state["paused_now"] += 1
        state["paused_total"] += 1
        publish()  # and no reenable: held until the handshake timeout

    def on_close(hook: HookID, vc: VConn) -> None:
        if vc.user_data.get("bench_latency_paused"):
            state["paused_now"] -= 1
            state["closed"] += 1
            publish()

    api.hook_add(hook_id, on_hook)
    api.hook_add(HookID.VCONN_CLOSE, on_close)
    publish()
'''

REPORT_LUA = bench.REPORT_LUA  # p50/p90/p99/max


class PausingTsProxy(bench.TsProxy):
    """bench.TsProxy with the pausing plugin in plugin.config and the handshake timeout in
    records.config (bench.TsProxy.customize: written into the config dir before the process
    starts, as bench_plugins.HookedTsProxy does)."""

    def __init__(self, name: str, plain: int, tls: int, hook: str, handshake_timeout: int) -> None:
        super().__init__(name, plain, tls)
        self.hook = hook
        self.handshake_timeout = handshake_timeout
        self.state_file: Path | None = None

    def customize(self, d: Path) -> None:
        self.state_file = d / "paused.json"
        (d / "bench_pause.py").write_text(PLUGIN)
        (d / "plugin.config").write_text(
            f"{d / 'bench_pause.py'} {self.hook} {self.state_file} {PAUSED_SNI} {PAUSED_SRC}\n"
        )
        with (d / "records.config").open("a") as rec:
            rec.write(f"CONFIG proxy.config.ssl.handshake_timeout_in INT {self.handshake_timeout}\n")

    def state(self) -> dict[str, int] | None:
        """What the plugin last published, or None before it wrote anything."""
        assert self.state_file is not None
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return None


def wait_for(
    pred: Callable[[], bool], timeout: float, what: str, detail: Callable[[], object] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    if not pred():
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} {detail()}".rstrip())


class PausedClients:
    """N TCP connections that each sent one ClientHello (SNI paused.test) and then wait: no
    thread, no handshake progress; they hold whatever the proxy's hook does with them."""

    def __init__(self, port: int, n: int, src: str) -> None:
        self.port, self.n, self.src = port, n, src
        self.socks: list[socket.socket] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE

    def __enter__(self) -> PausedClients:
        try:
            for _ in range(self.n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.socks.append(s)
                s.settimeout(5)
                s.bind((self.src, 0))
                s.connect((bench.HOST, self.port))
                out = ssl.MemoryBIO()
                tls = self.ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=PAUSED_SNI)
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                s.sendall(out.read())
                s.setblocking(False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []

    def states(self) -> dict[str, int]:
        """waiting (open, nothing received), answered (the proxy sent bytes), closed."""
        out = {"waiting": 0, "answered": 0, "closed": 0}
        for s in self.socks:
            try:
                data = s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                out["waiting"] += 1
                continue
            except OSError:
                out["closed"] += 1
                continue
            out["answered" if data else "closed"] += 1
        return out


def wrk_url(port: int) -> tuple[str, str]:
    """(URL, note): host `localhost` (wrk sends the URL host as SNI) when it resolves to the
    proxy's address first, else 127.0.0.1 (served by the default certificate)."""
    try:
        first = socket.getaddrinfo(bench.SNI, port, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        first = None
    if first == bench.HOST:
        return f"https://{bench.SNI}:{port}/1k", f"wrk URL host {bench.SNI} (SNI {bench.SNI})"
    return (
        f"https://{bench.HOST}:{port}/1k",
        f"{bench.SNI} resolves to {first}, not {bench.HOST}: wrk uses {bench.HOST} (default certificate)",
    )


def measure(url: str, svc: bench.Service, origin: bench.Service, lua: Path, args: argparse.Namespace) -> dict:
    with bench.CpuSampler(svc, origin) as cs:
        r = bench.run_wrk(url, args.connections, args.duration, lua)
    secs = r["duration_us"] / 1e6
    n = r["requests"]
    return {
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "req_s": n / secs if secs else 0.0,
        "cpu_us_req": 1e6 * cs.proxy_cpu / n if n else None,
        "requests": int(n),
        "errors": r["errors"],
        **cs.fields(),
    }


def run_phase(
    phase: str,
    proxy: PausingTsProxy,
    svc: bench.Service,
    origin: bench.Service,
    url: str,
    lua: Path,
    args: argparse.Namespace,
    release: bool,
) -> dict:
    """One wrk run; B with --paused handshakes held. Returns the figures and `problems` (a list
    of failed checks, empty when the phase measured what it claims). With `release`, B waits
    until the proxy has let go of its held handshakes (another phase follows)."""
    problems: list[str] = []
    s0 = proxy.state()
    if s0 is None or s0["paused_now"] != 0:
        raise RuntimeError(f"phase {phase}: the proxy still holds paused handshakes before it: {s0}")
    if phase == "A":
        res = measure(url, svc, origin, lua, args)
        s1 = proxy.state()
        if s1 != s0:
            problems.append(f"plugin state changed during A: {s0} -> {s1}")
        res["check"] = f"held 0 before and after (plugin pid {s0['pid']})"
    else:
        n = args.paused
        with PausedClients(proxy.tls, n, PAUSED_SRC) as clients:
            wait_for(
                lambda: (proxy.state() or {}).get("paused_now") == n,
                10,
                f"{n} handshakes paused in {args.hook}",
                lambda: f"(plugin state {proxy.state()}, clients {clients.states()})",
            )
            before, c_before = proxy.state(), clients.states()
            assert before is not None
            res = measure(url, svc, origin, lua, args)
            after, c_after = proxy.state(), clients.states()
        if before["paused_total"] - s0["paused_total"] != n:
            problems.append(f"{before['paused_total'] - s0['paused_total']} pauses for {n} clients")
        if after != before:
            problems.append(f"plugin state changed during the wrk run: {before} -> {after}")
        for when, c in (("before", c_before), ("after", c_after)):
            if c["waiting"] != n:
                problems.append(f"paused clients {when} wrk: {c}")
        closed = after["closed"] - before["closed"] if after else "?"
        res["check"] = (
            f"held {before['paused_now']} before, {after['paused_now'] if after else '?'} after "
            f"({closed} closed meanwhile); clients waiting {c_before['waiting']}/{c_after['waiting']}, "
            f"answered {c_before['answered']}/{c_after['answered']}, closed "
            f"{c_before['closed']}/{c_after['closed']} (before/after wrk)"
        )
        if release:
            # the clients are gone; the proxy lets go at its handshake timeout (or sooner if it
            # notices), and the next phase must start with nothing held
            t0 = time.monotonic()
            wait_for(
                lambda: (proxy.state() or {}).get("paused_now") == 0,
                args.handshake_timeout + 20,
                "the proxy to let go of the paused handshakes",
                lambda: f"(plugin state {proxy.state()})",
            )
            res["released_after_s"] = round(time.monotonic() - t0, 1)
    if not svc.alive():
        problems.append(f"tsproxy exited (rc={svc.popen.returncode})")
    if res.get("proxy_pids_changed"):
        problems.append("proxy process set changed during the run (worker replaced?)")
    if res["errors"]:
        problems.append(f"{res['errors']} wrk errors")
    if not res["requests"]:
        problems.append("wrk completed 0 requests")
    res["problems"] = problems
    return res


COLS = (("p50_ms", "p50 ms", 3), ("p90_ms", "p90 ms", 3), ("p99_ms", "p99 ms", 3),
        ("req_s", "req/s", 0), ("cpu_us_req", "CPU us/req", 1))  # fmt: skip


def med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if not r["problems"] and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt_cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(results: dict[str, list[dict]], args: argparse.Namespace, notes: list[str]) -> str:
    labels = {"A": "A  nothing paused", "B": f"B  {args.paused} handshakes paused in {args.hook}"}
    w = max(len(x) for x in labels.values()) + 2
    hdr = f"| {'phase':<{w}}|" + "".join(f" {title:>10} |" for _, title, _ in COLS) + " valid rounds |"
    sep = "|" + "-" * (w + 1) + "|" + "".join("-" * 11 + ":|" for _ in COLS) + "-------------:|"
    lines = [hdr, sep]
    meds: dict[str, dict[str, float | None]] = {}
    for ph in ("A", "B"):
        runs = results[ph]
        meds[ph] = {k: med(runs, k) for k, _, _ in COLS}
        ok = sum(1 for r in runs if not r["problems"])
        cells = "".join(
            f" {'-' if v is None else f'{v:,.{nd}f}':>10} |" for (k, _, nd) in COLS for v in [meds[ph][k]]
        )
        lines.append(f"| {labels[ph]:<{w}}|{cells} {f'{ok}/{len(runs)}':>12} |")
    ratios = []
    for k, _, _ in COLS:
        a, b = meds["A"][k], meds["B"][k]
        ratios.append(f" {'-' if a is None or b is None or not a else f'{b / a:.3f}':>10} |")
    lines.append(f"| {'B/A':<{w}}|{''.join(ratios)} {'':>12} |")
    out = [
        f"tsproxy {bench.source_state()}: 1 worker on cpu {bench.PROXY_CPU}; wrk -t1 -c{args.connections} "
        f"-d{args.duration:g}s --latency on cpu {bench.CLIENT_CPU}, GET /1k keep-alive; "
        f"{args.rounds} rounds alternating A/B, medians over valid rounds",
        *(f"NOTE: {n}" for n in notes),
        "",
        *lines,
        "",
        "per round:",
    ]
    for i in range(args.rounds):
        for ph in ("A", "B"):
            if i >= len(results[ph]):
                continue
            r = results[ph][i]
            c = r["cpu_pct"]
            out.append(
                f"  round {i + 1} {ph}: p50={r['p50_ms']:.3f} p90={r['p90_ms']:.3f} p99={r['p99_ms']:.3f} "
                f"max={r['max_ms']:.1f} ms, {r['req_s']:,.0f} req/s, "
                f"{fmt_cpu(r['cpu_us_req'])} us CPU/req, "
                f"errors={r['errors']}, cpu% proxy={c['proxy']} client={c['client']} "
                f"origin={c['origin']} bg={c['bg']}; {r['check']}"
                + (
                    f"; released {r['released_after_s']}s after the clients closed"
                    if "released_after_s" in r
                    else ""
                )
                + (f"; INVALID: {'; '.join(r['problems'])}" if r["problems"] else "")
            )
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A and B (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--paused", type=int, default=100, help="handshakes held in phase B (default 100)")
    ap.add_argument("--hook", choices=HOOKS, default="SSL_CERT", help="where they are held (SSL_CERT)")
    ap.add_argument(
        "--handshake-timeout",
        type=int,
        default=None,
        help="proxy.config.ssl.handshake_timeout_in (default duration + 5 s: longer than a B phase, "
        "so held handshakes outlive the wrk run and end soon after it)",
    )
    ap.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds before round 1 (0: none)")
    ap.add_argument("--origin", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)
    a.rounds = max(1, a.rounds)
    a.duration = max(1, a.duration)
    if a.handshake_timeout is None:
        a.handshake_timeout = a.duration + 5
    if a.handshake_timeout < a.duration + 2:
        ap.error("--handshake-timeout must be at least --duration + 2 s (the handshakes must outlive wrk)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench_latency: wrk is not installed (apt-get install -y wrk); nothing measured.")
        return 0
    notes: list[str] = []
    if not shutil.which("taskset"):
        notes.append("taskset not available: processes not pinned")
    kind = args.origin if args.origin != "auto" else ("nginx" if shutil.which("nginx") else "python")
    notes.append(f"origin: {kind} (bench.py's), cpu {bench.CLIENT_CPU}")
    notes.append(
        f"held handshakes: {args.hook}, "
        + (
            f"SNI {PAUSED_SNI}"
            if args.hook != "VCONN_START"
            else f"client address {PAUSED_SRC} (SNI not read yet at VCONN_START)"
        )
        + f", from {PAUSED_SRC}; proxy.config.ssl.handshake_timeout_in {args.handshake_timeout}"
    )
    # a SIGTERM (timeout, CI) runs the finally blocks below: nothing started is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, list[dict]] = {"A": [], "B": []}
    tmp = Path(tempfile.mkdtemp(prefix="tsproxy-bench-latency-"))
    os.chmod(tmp, 0o755)
    started: list[bench.Service] = []
    try:
        lua = tmp / "report.lua"
        lua.write_text(REPORT_LUA)
        certs = bench.make_certs(tmp)
        origin_port = bench.free_port()
        origin = bench.start_origin(kind, tmp, origin_port, certs)
        started.append(origin)
        proxy = PausingTsProxy(
            "tsproxy", bench.free_port(), bench.free_port(), args.hook, args.handshake_timeout
        )
        svc = proxy.start(tmp, certs, origin_port, 0)
        started.append(svc)
        bench.wait_ready(svc, [(proxy.tls, ssl.create_default_context(cafile=str(certs["ca"])))])
        wait_for(lambda: proxy.state() is not None, 10, "the plugin's state file")
        url, note = wrk_url(proxy.tls)
        notes.append(note)
        bench.log(f"tsproxy on {bench.HOST}:{proxy.tls} ({url}); origin {kind}; temp dir {tmp}")
        if args.warmup > 0:
            bench.run_wrk(url, args.connections, args.warmup, lua, latency=False)
        schedule = [(rnd, ph) for rnd in range(args.rounds) for ph in (("A", "B"), ("B", "A"))[rnd % 2]]
        for i, (rnd, ph) in enumerate(schedule):
            r = run_phase(ph, proxy, svc, origin, url, lua, args, release=i + 1 < len(schedule))
            results[ph].append(r)
            bench.log(
                f"round {rnd + 1} {ph}: p50 {r['p50_ms']:.3f} p90 {r['p90_ms']:.3f} "
                f"p99 {r['p99_ms']:.3f} ms"
                f"  {r['req_s']:,.0f} req/s  {r['cpu_us_req'] or 0:.1f} us/req  bg {r['cpu_pct']['bg']}%"
                f"  {r['check']}" + (f"  INVALID: {r['problems']}" if r["problems"] else "")
            )
    finally:
        for s in reversed(started):
            s.stop()
        if args.keep_tmp:
            bench.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = table(results, args, notes)
    print(out, end="")
    if args.out:
        Path(args.out).write_text(out)
    return 1 if any(r["problems"] for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
