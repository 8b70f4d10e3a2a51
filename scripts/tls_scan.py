#!/usr/bin/env python3
"""Scan tsproxy's TLS front with sslyze (issue 8, item 3) and print a short verdict.

    python scripts/tls_scan.py                       # start our own proxy (scripts/fuzz_tls.py's)
    python scripts/tls_scan.py --port 8443 --sni proxy.test
    python scripts/tls_scan.py --compare-nginx       # issue 15: tsproxy and nginx side by side

``--compare-nginx`` starts tsproxy (two workers) and nginx (/usr/sbin/nginx, one worker) with
the same RSA-2048 certificate and nginx's default cipher list (HIGH:!aNULL:!MD5) on both, scans
both with the same sslyze commands (protocols, cipher suites, renegotiation, compression,
Heartbleed, ROBOT, CCS injection, TLS_FALLBACK_SCSV, groups, session resumption by ID and by
ticket, extended master secret) and prints each finding beside the other, and the list of
findings that differ; it exits 1 only when tsproxy itself has a bad finding (the cipher-list
check is off there: the list is nginx's).

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scan(host: str, port: int, sni: str, python: str) -> dict[str, Any]:
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
            "--resum",
            "--ems",
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
        **_resumption(r),
        "extended_master_secret": (r.get("tls_extended_master_secret", {}).get("result") or {}).get(
            "supports_ems_extension"
        ),
    }


def _resumption(r: dict[str, Any]) -> dict[str, Any]:
    res = r.get("session_resumption", {}).get("result") or {}
    ids = res.get("session_id_resumption_result")
    return {
        "session_id_resumption": ids,
        "session_id_resumed": f"{res.get('session_id_successful_resumptions_count')}/"
        f"{res.get('session_id_attempted_resumptions_count')}",
        "ticket_resumption": res.get("tls_ticket_resumption_result"),
        "ticket_resumed": f"{res.get('tls_ticket_successful_resumptions_count')}/"
        f"{res.get('tls_ticket_attempted_resumptions_count')}",
    }


def bad(f: dict[str, Any], *, cipher_list: bool = True) -> list[str]:
    problems = [k for k in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1") if f[k]]
    problems += [
        k for k in ("client_renegotiation_dos", "compression", "heartbleed", "ccs_injection") if f[k]
    ]
    if f["robot"] and "VULNERABLE" in str(f["robot"]) and "NOT_VULNERABLE" not in str(f["robot"]):
        problems.append("robot")
    if cipher_list:  # off when the list is nginx's by construction (--compare-nginx)
        problems += [
            f"weak cipher {c}" for c in f["tls_1_2"] if "CBC" in c or "RC4" in c or "3DES" in c or "NULL" in c
        ]
    return problems


NGINX_CIPHERS = "HIGH:!aNULL:!MD5"  # nginx's default ssl_ciphers


def _nginx(cert: Path, port: int, d: Path) -> subprocess.Popen[bytes]:
    user = "user root;" if os.getuid() == 0 else ""
    (d / "nginx.conf").write_text(
        f"worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{user}\n"
        "events { worker_connections 1024; }\nhttp {\n    access_log off;\n"
        f"    client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;\n"
        f"    uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n"
        "    ssl_session_cache shared:SSL:10m;\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"  # tsproxy's defaults (nginx 1.22 adds 1.0, 1.1)
        f"    server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {cert};\n"
        f"             ssl_ciphers {NGINX_CIPHERS}; location / {{ return 200 ok; }} }}\n}}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("nginx did not start: " + (d / "error.log").read_text())


def compare_with_nginx(sni: str, python: str) -> int:
    import shutil
    import socket

    import fuzz_tls

    if shutil.which("nginx") is None:
        print(json.dumps({"note": "nginx is not installed; nothing compared"}))
        return 0
    records = {"proxy.config.ssl.server.cipher_suite": NGINX_CIPHERS}
    proxy = fuzz_tls.own_proxy(2, 30, records, rsa=True)  # trustme: RSA-2048
    with proxy as (port, cfg, _ca), tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nginx_port = int(s.getsockname()[1])
        nginx = _nginx(cfg / "certs" / "proxy.pem", nginx_port, Path(tmp))
        try:
            ours = scan("127.0.0.1", port, sni, python)
            theirs = scan("127.0.0.1", nginx_port, sni, python)
        finally:
            nginx.terminate()
            nginx.wait(10)
    rows = [
        {"finding": k, "tsproxy": ours[k], "nginx": theirs.get(k), "same": ours[k] == theirs.get(k)}
        for k in ours
    ]
    width = max(len(k) for k in ours)
    for row in rows:
        mark = "  " if row["same"] else "!="
        print(f"{mark} {row['finding']:<{width}}  tsproxy={row['tsproxy']}  nginx={row['nginx']}")
    problems = bad(ours, cipher_list=False)
    differences = [r["finding"] for r in rows if not r["same"]]
    print(json.dumps({"problems": problems, "differs_from_nginx": differences}))
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--sni", default="proxy.test")
    venv = "/tmp/sslyze-venv/bin/python"
    ap.add_argument("--sslyze", default=venv if os.path.exists(venv) else sys.executable)
    ap.add_argument("--compare-nginx", action="store_true", help="tsproxy beside nginx")
    args = ap.parse_args()
    if subprocess.run([args.sslyze, "-c", "import sslyze"], capture_output=True).returncode != 0:
        print(json.dumps({"note": f"sslyze is not installed for {args.sslyze}; nothing scanned"}))
        return 0
    if args.compare_nginx:
        return compare_with_nginx(args.sni, args.sslyze)
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
