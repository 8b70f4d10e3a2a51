"""Smoke test of scripts/bench.py: a 2-second P1 run against tsproxy alone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
def test_bench_prints_p1_row() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--workloads", "P1", "--duration", "2", "--no-nginx"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"^P1\s+req/s\s+([\d,.]+)\s+([\d,.]+)", out.stdout, re.M)
    assert row, f"no P1 row in:\n{out.stdout}\n{out.stderr[-2000:]}"
    assert float(row.group(1).replace(",", "")) > 0
    assert float(row.group(2).replace(",", "")) > 0  # proxy CPU per request was measured


LATENCY = BENCH.with_name("bench_latency.py")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
def test_bench_latency_holds_paused_handshakes() -> None:
    out = subprocess.run(
        [sys.executable, str(LATENCY), "--rounds", "1", "--duration", "1", "--paused", "5", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    rows = {
        m.group(1): [float(v.replace(",", "")) for v in m.group(2).split("|")[:5]]
        for m in re.finditer(r"^\|\s+([AB])\s+[^|]*\|(.*)$", out.stdout, re.M)
    }
    assert set(rows) == {"A", "B"}, out.stdout
    assert all(v > 0 for r in rows.values() for v in r), rows  # p50/p90/p99, req/s, CPU per request
    assert "held 5 before, 5 after (0 closed meanwhile); clients waiting 5/5" in out.stdout, out.stdout


H2LOAD_OUTPUT = """\
finished in 14.00s, 1792.50 req/s, 1.80MB/s
requests: 25095 total, 25195 started, 25095 done, 25090 succeeded, 5 failed, 0 errored, 0 timeout
status codes: 25090 2xx, 0 3xx, 0 4xx, 5 5xx
traffic: 25.13MB (26354510) total, 200.12KB (204920) headers (space savings 95.77%), 24.51MB (25697280) data
                     min         max         mean         sd        +/- sd
time for request:    11.00ms    339.50ms     55.53ms     48.61ms    82.36%
time for connect:     3.55ms     11.00ms      7.24ms      2.48ms    60.00%
time to 1st byte:    34.30ms     56.69ms     46.65ms      7.47ms    60.00%
req/s           :     175.69      199.62      179.23        7.21    90.00%
"""


def test_h2load_output_is_parsed() -> None:
    """The H2 workload's reading of h2load's summary (a real run's output, with 5 failures)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench  # scripts/bench.py
    finally:
        sys.path.remove(str(BENCH.parent))
    r = bench.parse_h2load(H2LOAD_OUTPUT)
    assert (r["req_s"], r["done"], r["succeeded"], r["failed"]) == (1792.5, 25095, 25090, 5)
    assert (r["status_2xx"], r["status_5xx"], r["mean_ms"]) == (25090, 5, 55.53)
    assert bench.parse_h2load(H2LOAD_OUTPUT.replace("55.53ms", "880.25us"))["mean_ms"] == 0.88025
    with pytest.raises(ValueError, match="lacks"):
        bench.parse_h2load("starting benchmark...\n")
