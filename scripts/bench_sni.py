#!/usr/bin/env python3
"""Cost of sni.yaml on full TLS 1.3 handshakes (W2-style; issue 18: per-name policy must cost
nothing for connections whose name has no item).

Three tsproxy instances (one worker each, pinned to core 1 like scripts/bench.py) run in the same
run, rounds alternating their order:
  none   no sni.yaml;
  miss   an sni.yaml of 200 items (exact names, wildcards, verify_client, ip_allow, TLS versions),
         none of which matches the clients' SNI (localhost): the lookup only;
  match  the same 200 items plus, first, one for localhost with verify_client NONE,
         valid_tls_versions_in [TLSv1_2, TLSv1_3] and ip_allow 127.0.0.0/8: the lookup, the
         address check and the per-connection OpenSSL settings on every handshake.
The clients are scripts/bench_plugins.py's (TCP connect, full handshake without tickets, close).
The figure is the proxy's CPU time per handshake (psutil), medians over the rounds, and the
ratios to "none".

  python3 scripts/bench_sni.py                 # 3 rounds x 5 s per variant
  python3 scripts/bench_sni.py --duration 2 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/bench.py: certificates, Service, TsProxy
import bench_plugins  # its handshake clients and measure()


def _items() -> str:
    lines = ["sni:"]
    for i in range(200):
        kind = i % 4
        fqdn = f"'*.zone{i}.example'" if kind == 1 else f"host{i}.example"
        lines.append(f"- fqdn: {fqdn}")
        if kind == 0:
            lines.append("  verify_client: NONE")
        elif kind == 2:
            lines.append("  ip_allow: 10.0.0.0/8")
        else:
            lines.append("  valid_tls_versions_in: [TLSv1_3]")
    return "\n".join(lines) + "\n"


MATCH = (
    "- fqdn: localhost\n"
    "  verify_client: NONE\n"
    "  valid_tls_versions_in: [TLSv1_2, TLSv1_3]\n"
    "  ip_allow: 127.0.0.0/8\n"
)


class SNITsProxy(bench.TsProxy):
    sni_yaml = ""

    def customize(self, d: Path) -> None:
        if self.sni_yaml:
            (d / "sni.yaml").write_text(self.sni_yaml)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    items = _items()
    files = {"none": "", "miss": items, "match": items.replace("sni:\n", "sni:\n" + MATCH, 1)}
    names = tuple(files)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="tsproxy-bench-sni-") as tmpname:
        tmp = Path(tmpname)
        certs = bench.make_certs(tmp)
        origin_port = bench.free_port()
        origin = bench.start_origin("python", tmp, origin_port)
        started: list[bench.Service] = [origin]
        try:
            variants = {}
            for i, name in enumerate(names):
                proxy = SNITsProxy("tsproxy", bench.free_port(), bench.free_port())
                proxy.sni_yaml = files[name]
                svc = proxy.start(tmp, certs, origin_port, i)
                started.append(svc)
                bench.wait_ready(svc, [(proxy.tls, bench._hs_client_ctx())])
                variants[name] = (proxy, svc)
            for r in range(args.rounds):
                order = names if r % 2 == 0 else tuple(reversed(names))
                for name in order:
                    proxy, svc = variants[name]
                    res = bench_plugins.measure(proxy.tls, svc, origin, args)
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

    print(
        f"full TLS 1.3 handshakes, {args.rounds} rounds x {args.duration:.0f} s, "
        f"{args.procs}x{args.threads} clients, medians"
    )
    print(f"{'variant':8s} {'hs/s':>8s} {'proxy CPU us/hs':>16s} {'CPU vs none':>12s}")
    base = med("none", "cpu_us_per_hs")
    for name in names:
        cpu = med(name, "cpu_us_per_hs")
        print(f"{name:8s} {med(name, 'hs_per_s'):8.1f} {cpu:16.1f} {f'x{cpu / base:.3f}':>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
