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
