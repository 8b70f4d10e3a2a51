"""Operator experience (issue 19): the shipped examples work as written, config check and reload
say what is true, the CLI behaves from any shell. Every test starts the real tsproxy processes
(or the real CLI) and talks to them as a user would."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from conftest import REPO_ROOT, TSPROXY_CMD, ProxyProcess, free_port, run_tsproxy, subprocess_env
from origin import OriginServer, pattern

SHIPPED = REPO_ROOT / "etc" / "tsproxy"
_MAP_LINE = re.compile(r"^[ #]*((?:map|map_with_recv_port)\s+https?://\S+\s+\S+.*)$")


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


def _doc_map_lines() -> list[tuple[str, str]]:
    """(file, line) of every remap example in README.md, docs/*.md and the shipped remap.config."""
    found: list[tuple[str, str]] = []
    docs = sorted((REPO_ROOT / "docs").glob("*.md"))
    for path in [REPO_ROOT / "README.md", *docs, SHIPPED / "remap.config"]:
        for raw in path.read_text().splitlines():
            m = _MAP_LINE.match(raw)
            if m:
                found.append((path.name, m.group(1).split("#")[0].strip()))
    return found


def _request(scheme: str, port: int, host_header: str, path: str, extra: str = "") -> tuple[int, bytes]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock: socket.socket = raw
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(raw, server_hostname=host_header.rsplit(":", 1)[0])
    with sock:
        head = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}Connection: close\r\n\r\n"
        sock.sendall(head.encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return 0, b""  # closed without an answer
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- 1. remap examples, the port rule, the 404 that explains itself ----------------------------


def test_every_documented_remap_example_matches_on_the_shipped_ports(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    """Each documented rule, with the shipped ports 8080/8443 standing for the test's free ports,
    is reached by the request a user would send to it (curl http://HOST:8080/...)."""
    examples = _doc_map_lines()
    assert any(name == "README.md" for name, _ in examples) and len(examples) >= 4
    plain, tls = free_port(), free_port()
    lines = []
    for _, line in examples:
        directive, from_url, *_ = line.split()
        from_url = from_url.replace(":8080/", f":{plain}/").replace(":8443/", f":{tls}/")
        lines.append(f"{directive} {from_url} http://{origin.authority}/echo")
    proxy = tsproxy_factory(
        records={"proxy.config.http.server_ports": f"{plain}:ip-in=127.0.0.1 {tls}:ssl:ip-in=127.0.0.1"},
        files={"remap.config": "\n".join(lines) + "\n"},
    )
    assert "can never match" not in proxy.output()
    for line in lines:
        directive, from_url, _ = line.split()
        m = re.match(r"(https?)://([^/:]+)(?::(\d+))?(/.*)", from_url)
        assert m, from_url
        scheme, host, port, path = m.groups()
        port_n = int(port) if port else (80 if scheme == "http" else 443)
        host_header = host if directive == "map_with_recv_port" else f"{host}:{port_n}"
        status, body = _request(scheme, port_n, host_header, path)
        assert status == 200, (line, status, body)


def test_rule_for_an_unserved_port_is_warned_and_the_404_names_the_lookup(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer, tmp_path: Path
) -> None:
    remap = (
        f"map http://www.example.com/ http://{origin.authority}/\n"
        f"map https://www.example.com/ http://{origin.authority}/\n"
    )
    proxy = tsproxy_factory(files={"remap.config": remap})
    port = proxy.port(0)
    ports = f"(ports: {port}:ip-in=127.0.0.1)"
    for line, hostport in ((1, "www.example.com:80"), (2, "www.example.com:443")):
        needle = f"remap.config:{line}: rule for {hostport} can never match: no server port"
        assert needle in proxy.output() and ports in proxy.output()
    check = run_tsproxy("config", "check", "--config-dir", str(proxy.config_dir))
    assert check.returncode == 0
    needle = f"remap.config:1: rule for www.example.com:80 can never match: no server port 80 {ports}"
    assert needle in check.stderr
    reload = proxy.ctl("reload")  # a reload says it too
    assert reload.returncode == 0 and needle in reload.stderr

    status, body = _request("http", port, f"www.example.com:{port}", "/x")
    assert status == 404
    assert f"http://www.example.com:{port}/".encode() in body
    # The client's own input comes back shortened and printable, never raw.
    status, body = _request("http", port, "<b>\xe9" + "a" * 300, "/x")
    assert status == 404 and b"<b>?aaa" in body and b"\xe9" not in body and len(body) < 300
    assert origin.requests == []


def test_config_check_on_the_shipped_directory_is_quiet(tmp_path: Path) -> None:
    shipped = shutil.copytree(SHIPPED, tmp_path / "etc", ignore=shutil.ignore_patterns("run", "log"))
    result = run_tsproxy("config", "check", "--config-dir", str(shipped))
    assert result.returncode == 0, result.stderr
    assert "can never match" not in result.stderr
    assert "unknown record" not in result.stderr


# -- 4. honest reload -----------------------------------------------------------------------


def test_reload_says_a_plugin_change_needs_a_restart_and_only_content_counts(
    tsproxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = tsproxy_factory(files={"plugin.config": "# none yet\n"})
    port = proxy.port(0)
    plugin_config = proxy.config_dir / "plugin.config"
    plugin_config.write_text("# none yet\nplugins.stats_over_http /_stats\n")
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "plugin.config:2: plugin plugins.stats_over_http added: needs 'tsproxy restart'" in result.stdout
    assert "file changed: plugin.config" in result.stdout
    assert "1 change(s) above wait for a restart" in result.stdout
    assert _request("http", port, "localhost", "/_stats")[0] == 404  # nothing was loaded
    again = proxy.ctl("reload")  # still pending: said again until a restart loads it
    assert "plugins.stats_over_http added: needs 'tsproxy restart'" in again.stdout
    restarted = proxy.ctl("restart")
    assert restarted.returncode == 0, restarted.stderr
    assert _request("http", port, "localhost", "/_stats")[0] == 200  # the restart loaded it

    # A touched file (same bytes, new mtime) and a file rewritten with the same bytes are no change.
    remap = proxy.config_dir / "remap.config"
    st = remap.stat()
    os.utime(remap, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    plugin_config.write_text(plugin_config.read_text())
    result = proxy.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "file changed" not in result.stdout and "nothing changed" in result.stdout

    plugin_config.write_text("# none\n")
    result = proxy.ctl("reload")
    assert "plugin.config: plugin plugins.stats_over_http removed: needs 'tsproxy restart'" in result.stdout
    assert _request("http", port, "localhost", "/_stats")[0] == 200  # still loaded until a restart

    # A plugin file whose code changed is not re-imported by a reload either.
    source = proxy.config_dir / "plugins" / "noop.py"
    source.parent.mkdir()
    source.write_text("def plugin_init(api, args):\n    pass\n")
    plugin_config.write_text("noop.py\n")
    assert f"plugin {source.resolve()} added: needs 'tsproxy restart'" in proxy.ctl("reload").stdout
    assert proxy.ctl("restart").returncode == 0
    source.write_text("def plugin_init(api, args):\n    api.log.info('new code')\n")
    result = proxy.ctl("reload")
    needle = f"plugin.config:1: plugin {source.resolve()} code changed: needs 'tsproxy restart'"
    assert needle in result.stdout, result.stdout


# -- 5. CLI ---------------------------------------------------------------------------------


def test_config_dir_option_is_accepted_before_the_subcommand(tsproxy: ProxyProcess) -> None:
    cdir = str(tsproxy.config_dir)
    for args in (
        ("--config-dir", cdir, "status"),
        ("--config-dir", cdir, "metric", "get", "proxy.process.http.incoming_requests"),
        ("metric", "--config-dir", cdir, "get", "proxy.process.http.incoming_requests"),
        ("--config-dir", cdir, "config", "check"),
        ("--config-dir", "/nonexistent", "status", "--config-dir", cdir),  # the nearest one wins
    ):
        result = run_tsproxy(*args)
        assert result.returncode == 0, (args, result.stderr)
    assert f"master  -     {tsproxy.pid}" in run_tsproxy("--config-dir", cdir, "status").stdout


def test_unknown_metric_has_its_own_documented_exit_code(tsproxy: ProxyProcess) -> None:
    from tsproxy.exitcodes import EX_DATAERR, EX_UNAVAILABLE

    assert EX_DATAERR != EX_UNAVAILABLE
    for args in (("metric", "get", "proxy.process.nope"), ("metric", "match", "(")):
        result = tsproxy.ctl(*args)
        assert result.returncode == EX_DATAERR, result.stderr
    doc = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert f"| {EX_DATAERR} | EX_DATAERR |" in doc


def _spawn_with_signals_ignored(args: list[str]) -> subprocess.Popen[bytes]:
    """As a shell starts a background job (``tsproxy top &``): SIGINT ignored, inherited."""

    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), preexec_fn=ignore
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)])
def test_top_quits_on_sigint_and_sigterm_even_when_started_ignoring_them(
    tsproxy: ProxyProcess, sig: signal.Signals, code: int
) -> None:
    proc = _spawn_with_signals_ignored(
        [*TSPROXY_CMD, "top", "--interval", "0.2", "--config-dir", str(tsproxy.config_dir)]
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"tsproxy top - ")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert b"Traceback" not in err


def test_top_help_has_no_raw_markup() -> None:
    result = run_tsproxy("top", "--help")
    assert result.returncode == 0 and "``" not in result.stdout and "'tsproxy status'" in result.stdout


def test_total_handshake_time_is_in_the_unit_the_docs_say(
    tsproxy_factory: Callable[..., ProxyProcess],
) -> None:
    doc = (REPO_ROOT / "docs" / "records.md").read_text()
    line = next(x for x in doc.splitlines() if "`proxy.process.ssl.total_handshake_time`" in x)
    units = {"nanoseconds": 1e-9, "microseconds": 1e-6, "milliseconds": 1e-3}
    (unit,) = [u for u in units if u in line]
    proxy = tsproxy_factory(records={"proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1"})
    client_seconds = 0.0
    for _ in range(5):
        started = time.monotonic()
        status, _body = _request("https", proxy.port(0), "localhost", "/")  # handshake, then a 404
        client_seconds += time.monotonic() - started
        assert status == 404
    result = proxy.ctl("metric", "get", "proxy.process.ssl.total_handshake_time")
    total = int(result.stdout.split()[1]) * units[unit]
    # Each server-side handshake lies within the client's connect-to-response span.
    assert 0 < total <= client_seconds, (unit, total, client_seconds)


# -- 6. a name-only certificate ----------------------------------------------------------------


def _handshake(port: int, ca: trustme.CA, sni: str | None) -> bool:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=sni):
                return True
        except (ssl.SSLError, ConnectionError):
            return False


def test_name_only_certificate_refusals_are_logged_once_per_name_and_config_check_says_so(
    tsproxy_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("a.test")
    files = {
        "ssl_multicert.config": "ssl_cert_name=server.pem ssl_key_name=server.key\n",
        "server.pem": cert.cert_chain_pems[0].bytes(),
        "server.key": cert.private_key_pem.bytes(),
    }
    tls_port = {"proxy.config.http.server_ports": "{0}:ssl:ip-in=127.0.0.1"}
    proxy = tsproxy_factory(records=tls_port, files=files)
    check = run_tsproxy("config", "check", "--config-dir", str(proxy.config_dir))
    assert check.returncode == 0
    assert "ssl_multicert.config: no default certificate (no dest_ip=* line)" in check.stderr

    port = proxy.port(0)
    assert _handshake(port, ca, "a.test")
    for _ in range(3):
        assert not _handshake(port, ca, "b.test")
        assert not _handshake(port, ca, None)
    log = (proxy.config_dir / "log" / "tsproxy.log").read_text()
    refused = [line for line in log.splitlines() if "refused: no certificate" in line]
    assert sum("SNI 'b.test'" in line for line in refused) == 1, refused
    assert sum("no SNI" in line for line in refused) == 1, refused
    assert all("WARNING" in line for line in refused), refused


# -- 2. the stock ATS 9.2 configuration directory ------------------------------------------

STOCK_ATS = REPO_ROOT / "tests" / "data" / "ats-9.2"


def _stock_copy(tmp_path: Path) -> Path:
    return shutil.copytree(STOCK_ATS, tmp_path / "trafficserver")


def test_stock_ats_directory_checks_in_a_handful_of_lines(tmp_path: Path) -> None:
    cdir = _stock_copy(tmp_path)
    result = run_tsproxy("config", "check", "--config-dir", str(cdir))
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) <= 8, result.stderr
    assert "unknown record" not in result.stderr
    assert "records.config: ATS cache: ignored, not implemented: 17 records" in result.stderr
    assert sum("see docs/records.md#ats" in w for w in warnings) == len(warnings) - 1, warnings
    # The stock ip_allow.yaml has rules (deny PURGE, PUSH, DELETE, TRACE): say they do not apply.
    unread = "ip_allow.yaml, logging.yaml, socks.config, storage.config: not read by tsproxy"
    assert unread in result.stderr
    doc = (REPO_ROOT / "docs" / "records.md").read_text()
    assert '<a id="ats"></a>' in doc and "`proxy.config.cache.ram_cache.size`" in doc

    # A name ATS does not know either is a typo: a warning of its own, with the nearest name.
    records = cdir / "records.config"
    records.write_text(records.read_text() + "CONFIG proxy.config.http.keep_alive_enabled_inn INT 1\n")
    typo = run_tsproxy("config", "check", "--config-dir", str(cdir))
    assert typo.returncode == 0
    line = len(records.read_text().splitlines())
    assert (
        f"records.config:{line}: unknown record proxy.config.http.keep_alive_enabled_inn (ignored; ATS "
        "has no such record either; did you mean proxy.config.http.keep_alive_enabled_in?)"
    ) in typo.stderr


def test_stock_ats_directory_serves(tsproxy_factory: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    """tsproxy start on the stock directory, changed only where a test must: its port (8080 may
    be taken) and proxy.config.admin.user_id (the 'trafficserver' user may not exist here)."""
    text = (STOCK_ATS / "records.config").read_text()
    port = free_port()
    text = text.replace("STRING 8080 8080:ipv6", f"STRING {port}:ip-in=127.0.0.1")
    user = "proxy.config.admin.user_id STRING"
    text = text.replace(f"{user} trafficserver", f"{user} #-1")  # keep the test's user
    files = {p.name: p.read_bytes() for p in STOCK_ATS.iterdir() if p.is_file()}
    files["records.config"] = text.encode()
    proxy = tsproxy_factory(records={"proxy.config.http.server_ports": None}, files=files)
    assert len(proxy.status()["workers"]) == 2  # exec_thread.limit 2
    status, body = _request("http", port, "www.example.com", "/")
    assert status == 404 and b"no remap rule for http://www.example.com:80/" in body


# -- 3. the ATS records people set ----------------------------------------------------------


def _echo(port: int, host: str, extra: str = "") -> dict[str, str]:
    status, body = _request("http", port, host, "/echo", extra)
    assert status == 200, body
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def test_pristine_host_hdr_and_insert_client_ip(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    remap = {"remap.config": f"map http://www.example.com/ http://{origin.authority}/\n"}
    spoof = "Client-ip: 6.6.6.6\r\n"
    proxy = tsproxy_factory(files=remap)
    seen = _echo(proxy.port(0), "www.example.com", spoof)
    assert seen["host"] == origin.authority  # the remap target's host (ATS default)
    assert seen["client-ip"] == "127.0.0.1"  # insert_client_ip 1 (ATS default): ours replaces theirs

    records = {"proxy.config.url_remap.pristine_host_hdr": 1, "proxy.config.http.insert_client_ip": 0}
    proxy = tsproxy_factory(records=records, files=remap)
    seen = _echo(proxy.port(0), "www.example.com", spoof)
    assert seen["host"] == "www.example.com"  # the client's own Host
    assert seen["client-ip"] == "6.6.6.6"  # not inserted: the client's header goes on untouched


def test_transaction_active_timeouts(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    remap = {"remap.config": f"map http://www.example.com/ http://{origin.authority}/\n"}
    slow = "/slow?delay=3&n=5"  # slow, but silent for less than the inactivity timeouts
    baseline = tsproxy_factory(files=remap)
    assert _request("http", baseline.port(0), "www.example.com", slow)[0] == 200

    cut_in = tsproxy_factory(records={"proxy.config.http.transaction_active_timeout_in": 1}, files=remap)
    assert _request("http", cut_in.port(0), "www.example.com", slow) == (0, b"")  # closed, no answer

    cut_out = tsproxy_factory(records={"proxy.config.http.transaction_active_timeout_out": 1}, files=remap)
    status, body = _request("http", cut_out.port(0), "www.example.com", slow)
    assert status == 504, body
    # Between transactions no active timeout runs: a keep-alive connection outlives it.
    c = http.client.HTTPConnection("127.0.0.1", cut_in.port(0), timeout=10)
    c.request("GET", "/", headers={"Host": "www.example.com"})
    assert c.getresponse().read() == pattern(5)
    time.sleep(1.5)
    c.request("GET", "/", headers={"Host": "www.example.com"})
    assert c.getresponse().status == 200
    c.close()


def test_accept_no_activity_timeout_closes_a_silent_new_connection(
    tsproxy_factory: Callable[..., ProxyProcess],
) -> None:
    records = {
        "proxy.config.http.accept_no_activity_timeout": 1,
        "proxy.config.http.keep_alive_no_activity_timeout_in": 60,
    }
    proxy = tsproxy_factory(records=records)
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=15) as silent:
        assert silent.recv(100) == b""  # closed by the proxy, long before the keep-alive timeout


def test_connect_retries_then_the_origin_is_marked_down(
    tsproxy_factory: Callable[..., ProxyProcess],
) -> None:
    port = free_port()  # nobody listens: every connect is refused
    records = {
        "proxy.config.http.connect_attempts_max_retries": 2,
        "proxy.config.http.connect_attempts_max_retries_dead_server": 1,
        "proxy.config.http.down_server.cache_time": 60,
    }
    proxy = tsproxy_factory(
        records=records, files={"remap.config": f"map http://a.test/ http://127.0.0.1:{port}/\n"}
    )

    def failures() -> int:
        out = proxy.ctl("metric", "get", "proxy.process.http.err_connect_fail_count").stdout
        return int(out.split()[1])

    assert _request("http", proxy.port(0), "a.test", "/")[0] == 502
    assert failures() == 3  # the first attempt and 2 retries
    assert f"origin 127.0.0.1:{port} marked down for 60 s: 3 connection attempts failed" in proxy.output()
    assert _request("http", proxy.port(0), "a.test", "/")[0] == 502
    assert failures() == 4  # marked down: one attempt only
    with OriginServer(port=port) as back:
        assert _request("http", proxy.port(0), "a.test", "/")[0] == 200  # still tried, and up again
        assert back.requests
    assert f"origin 127.0.0.1:{port} is up again" in proxy.output()


def test_max_requests_in_answers_503_beyond_the_limit(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    remap = {"remap.config": f"map http://www.example.com/ http://{origin.authority}/\n"}
    proxy = tsproxy_factory(records={"proxy.config.net.max_requests_in": 1}, files=remap)
    port = proxy.port(0)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as busy:
        busy.sendall(b"GET /slow?delay=2 HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        origin.wait_requests(1)
        assert _request("http", port, "www.example.com", "/")[0] == 503
        assert busy.recv(100).startswith(b"HTTP/1.1 200")
    assert _request("http", port, "www.example.com", "/")[0] == 200


def test_remap_required_0_forwards_only_for_allowed_clients_and_never_to_itself(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    closed = tsproxy_factory()
    assert _request("http", closed.port(0), origin.authority, "/")[0] == 404  # remap_required 1

    proxy = tsproxy_factory(records={"proxy.config.url_remap.remap_required": 0})
    status, body = _request("http", proxy.port(0), origin.authority, "/")
    assert (status, body) == (200, pattern(5))  # 127.0.0.1 is in unmapped_clients by default
    assert _request("http", proxy.port(0), f"127.0.0.1:{proxy.port(0)}", "/")[0] == 404  # itself: no loop

    others = {
        "proxy.config.url_remap.remap_required": 0,
        "proxy.config.url_remap.unmapped_clients": "10.0.0.0/8",
    }
    proxy = tsproxy_factory(records=others)
    assert _request("http", proxy.port(0), origin.authority, "/")[0] == 404


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""  # between a roll and the writer's next line


def _wait(cond: Callable[[], object], what: str, timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except FileNotFoundError:  # a file rolled or deleted under the check
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_log_rolling_by_size_and_auto_delete(
    tsproxy_factory: Callable[..., ProxyProcess], origin: OriginServer
) -> None:
    records = {
        "proxy.config.log.rolling_enabled": 2,  # by size
        "proxy.config.log.rolling_size_mb": 1,
        "proxy.config.log.max_space_mb_for_logs": 3,
        "proxy.config.log.auto_delete_rolled_files": 1,
    }
    files = {
        "remap.config": f"map http://www.example.com/ http://{origin.authority}/\n",
        "plugin.config": "plugins.access_log\n",
    }
    proxy = tsproxy_factory(records=records, files=files)
    log_dir = proxy.config_dir / "log"
    port = proxy.port(0)
    # A busy day's worth of lines, written straight into the logs (1.2 MB each: over the size).
    filler = ("x" * 99 + "\n") * 12_000
    assert _request("http", port, "www.example.com", "/first")[0] == 200
    _wait(lambda: "/first" in _text(log_dir / "access.log"), "the access log line")
    for name in ("tsproxy.log", "access.log"):
        with (log_dir / name).open("a") as f:
            f.write(filler)
    _wait(lambda: len(list(log_dir.glob("*.old"))) >= 2, "two rolls")
    names = sorted(p.name for p in log_dir.glob("*.old"))
    assert [n.split("_")[0] for n in names] == ["access.log", "tsproxy.log"], names
    # Both writers carry on in fresh files under the old names.
    assert _request("http", port, "www.example.com", "/after-roll")[0] == 200
    _wait(lambda: "/after-roll" in _text(log_dir / "access.log"), "a line in the new access.log")
    assert proxy.ctl("reload").returncode == 0
    _wait(lambda: "reloaded" in _text(log_dir / "tsproxy.log"), "a line in the new tsproxy.log")
    assert (log_dir / "access.log").stat().st_size < 1 << 20

    # Beyond max_space_mb_for_logs the oldest rolled files go.
    for _ in range(3):
        with (log_dir / "access.log").open("a") as f:
            f.write(filler)
        before = set(log_dir.glob("access.log_*.old"))
        _wait(lambda before=before: set(log_dir.glob("access.log_*.old")) - before, "another roll")
    _wait(lambda: sum(p.stat().st_size for p in log_dir.iterdir()) <= 3 << 20, "old files deleted")
    assert "exceeds proxy.config.log.max_space_mb_for_logs" in _text(log_dir / "tsproxy.log")


def test_log_rolling_at_the_interval(tmp_path: Path) -> None:
    """The interval modes, on real files: rolled when a multiple of rolling_interval_sec passes."""
    from tsproxy.logs import LogRoller, RollingPolicy

    day = 86400
    start = 100 * day + 10.0
    cases = ((1, 10, True), (3, 10, True), (4, 10, False), (4, 2 << 20, True), (2, 10, False))
    for mode, size, rolls in cases:
        log_dir = tmp_path / f"m{mode}-{size}"
        log_dir.mkdir()
        (log_dir / "tsproxy.log").write_bytes(b"x" * size)
        (log_dir / "empty.log").touch()
        roller = LogRoller(log_dir, RollingPolicy(mode, day, 1 << 20, 1 << 40, True), now=start)
        assert roller.tick(now=start + 60) == []  # the same interval
        rolled = roller.tick(now=start + day)  # the next one
        assert [p.name.split("_")[0] for p in rolled] == (["tsproxy.log"] if rolls else []), (mode, size)
        assert (log_dir / "empty.log").exists()  # an empty file is never rolled
