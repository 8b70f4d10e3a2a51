#!/usr/bin/env python3
"""Scan tsproxy's TLS front with sslyze (issue 8, item 3) and print a short verdict.

    python scripts/tls_scan.py                       # start our own proxy (scripts/fuzz_tls.py's)
    python scripts/tls_scan.py --port 8443 --sni proxy.test

sslyze pins an older ``cryptography`` than pyOpenSSL needs, so install it in its own venv::

    python -m venv /tmp/sslyze-venv && /tmp/sslyze-venv/bin/pip install sslyze

and point ``--sslyze`` at that interpreter (default: /tmp/sslyze-venv/bin/python if present,
else this Python). Exits 0 if sslyze is not installed (prints a note), 1 if a finding is bad.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scan(host: str, port: int, sni: str, python: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "scan.json"
        cmd = [
            python,
            "-m",
            "sslyze",
            f"{sni}:{port}{{{host}}}",
            "--json_out",
            str(out),
            "--sslv2",
            "--sslv3",
            "--tlsv1",
            "--tlsv1_1",
            "--tlsv1_2",
            "--tlsv1_3",
            "--reneg",
            "--compression",
            "--heartbleed",
            "--robot",
            "--openssl_ccs",
            "--fallback",
            "--elliptic_curves",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if not out.exists():
            raise SystemExit(f"sslyze failed:\n{proc.stdout}\n{proc.stderr}")
        data = json.loads(out.read_text())
    server = data["server_scan_results"][0]
    r = server["scan_result"]
    if r is None:
        raise SystemExit(f"sslyze could not scan: {server.get('connectivity_error_trace') or server}")

    def accepted(name: str) -> list[str]:
        res = r[name]["result"]
        return [c["cipher_suite"]["name"] for c in res["accepted_cipher_suites"]] if res else []

    reneg = r["session_renegotiation"]["result"] or {}
    return {
        "ssl_2_0": accepted("ssl_2_0_cipher_suites"),
        "ssl_3_0": accepted("ssl_3_0_cipher_suites"),
        "tls_1_0": accepted("tls_1_0_cipher_suites"),
        "tls_1_1": accepted("tls_1_1_cipher_suites"),
        "tls_1_2": accepted("tls_1_2_cipher_suites"),
        "tls_1_3": accepted("tls_1_3_cipher_suites"),
        "client_renegotiation_dos": reneg.get("is_vulnerable_to_client_renegotiation_dos"),
        "secure_renegotiation": reneg.get("supports_secure_renegotiation"),
        "compression": (r["tls_compression"]["result"] or {}).get("supports_compression"),
        "heartbleed": (r["heartbleed"]["result"] or {}).get("is_vulnerable_to_heartbleed"),
        "ccs_injection": (r["openssl_ccs_injection"]["result"] or {}).get("is_vulnerable_to_ccs_injection"),
        "robot": (r["robot"]["result"] or {}).get("robot_result"),
        "fallback_scsv": (r["tls_fallback_scsv"]["result"] or {}).get("supports_fallback_scsv"),
        "curves": [c["name"] for c in ((r["elliptic_curves"]["result"] or {}).get("supported_curves") or [])],
    }


def bad(f: dict) -> list[str]:
    problems = [k for k in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1") if f[k]]
    problems += [
        k for k in ("client_renegotiation_dos", "compression", "heartbleed", "ccs_injection") if f[k]
    ]
    if f["robot"] and "VULNERABLE" in str(f["robot"]) and "NOT_VULNERABLE" not in str(f["robot"]):
        problems.append("robot")
    problems += [
        f"weak cipher {c}" for c in f["tls_1_2"] if "CBC" in c or "RC4" in c or "3DES" in c or "NULL" in c
    ]
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--sni", default="proxy.test")
    venv = "/tmp/sslyze-venv/bin/python"
    ap.add_argument("--sslyze", default=venv if os.path.exists(venv) else sys.executable)
    args = ap.parse_args()
    if subprocess.run([args.sslyze, "-c", "import sslyze"], capture_output=True).returncode != 0:
        print(json.dumps({"note": f"sslyze is not installed for {args.sslyze}; nothing scanned"}))
        return 0
    if args.port:
        findings = scan(args.host, args.port, args.sni, args.sslyze)
    else:
        import fuzz_tls

        with fuzz_tls.own_proxy(1, 30) as (port, _cfg, _ca):
            findings = scan("127.0.0.1", port, args.sni, args.sslyze)
    problems = bad(findings)
    print(json.dumps({"findings": findings, "problems": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
