"""Issue 4, HTTP transaction hooks against the real ``tsproxy start`` (tests/plugins/txn_hooks.py):
order and count, sync and delayed reenable, error reenable, raising callbacks, respond() and where
it is refused, header edits seen by the origin and the client, per-transaction hooks, a paused
hook beside other connections, a hook that never re-enables, plugin load failures.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ProxyProcess, run_tsproxy, write_config_dir
from origin import OriginServer

Factory = Callable[..., ProxyProcess]
PLUGINS = Path(__file__).resolve().parent / "plugins"
HOST = "origin.test"
ORDER = [
    "READ_REQUEST_HDR",
    "PRE_REMAP",
    "POST_REMAP",
    "SEND_REQUEST_HDR",
    "READ_RESPONSE_HDR",
    "SEND_RESPONSE_HDR",
    "TXN_CLOSE",
]


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


def start(
    factory: Factory, origin: OriginServer, log: Path, records: dict[str, Any] | None = None
) -> ProxyProcess:
    return factory(
        records=records,
        files={
            "remap.config": f"map http://{HOST}/ http://{origin.authority}/\n",
            "plugin.config": f"{PLUGINS / 'txn_hooks.py'} {log}\n",
        },
    )


def request(
    proxy: ProxyProcess,
    tid: str,
    action: str = "",
    path: str = "/echo",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    try:
        hdrs = {"Host": HOST, "X-Test-Id": tid, "X-Test-Action": action, **(headers or {})}
        conn.request("GET", path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def log_of(log: Path, tid: str) -> list[str]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == tid]


def wait_log(log: Path, tid: str, entry: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = log_of(log, tid)
        if any(line.startswith(entry) for line in lines):
            time.sleep(0.1)  # a duplicate would show up right behind it
            return log_of(log, tid)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {entry!r} for {tid} within {timeout} s: {lines}")
        time.sleep(0.02)


def hooks(lines: list[str]) -> list[str]:
    """The global hooks in a txn's log lines, in order (TXN_CLOSE lines carry a status)."""
    words = [line.split() for line in lines if not line.startswith("TXN:")]
    return [w[0] for w in words if len(w) == 1 or w[0] == "TXN_CLOSE"]


def metric(proxy: ProxyProcess, name: str) -> int:
    (got,) = proxy.call("metric.get", {"names": [name]})["metrics"]
    return int(got[1])


def test_hooks_fire_once_each_in_order_sync_and_delayed(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path
) -> None:
    log = tmp_path / "txn.log"
    proxy = start(tsproxy_factory, origin, log)
    status, _, body = request(proxy, "plain")
    assert status == 200 and json.loads(body)["target"] == "/echo"
    assert hooks(wait_log(log, "plain", "TXN_CLOSE")) == ORDER
    assert wait_log(log, "plain", "TXN_CLOSE")[-1] == "TXN_CLOSE status=200"

    # every pausable hook re-enabled from a timer (and a second, harmless reenable)
    delayed = ",".join(f"{h}=delay" for h in ORDER[:-1])
    started = time.monotonic()
    status, _, body = request(proxy, "delayed", delayed)
    assert status == 200 and json.loads(body)["target"] == "/echo"
    assert time.monotonic() - started >= 6 * 0.2
    lines = wait_log(log, "delayed", "TXN_CLOSE")
    assert hooks(lines) == ORDER
    assert [line for line in lines if "resumed" in line] == [f"{h} resumed alive=True" for h in ORDER[:-1]]

    # keep-alive: two transactions on one connection, each with its own full set of hooks
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port(), timeout=10)
    for tid in ("ka1", "ka2"):
        headers = {"Host": HOST, "X-Test-Id": tid, "X-Test-Action": "PRE_REMAP=delay"}
        conn.request("GET", "/echo", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    for tid in ("ka1", "ka2"):
        assert hooks(wait_log(log, tid, "TXN_CLOSE")) == ORDER


@pytest.mark.parametrize("hook", ORDER[:-1])
def test_error_reenable_and_raising_callback_answer_500(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path, hook: str
) -> None:
    log = tmp_path / "txn.log"
    proxy = start(tsproxy_factory, origin, log)
    worker = proxy.worker_pids()
    for action in ("error", "raise"):
        tid = f"{action}-{hook}"
        status, _, body = request(proxy, tid, f"{hook}={action}")
        assert status == 500, body
        lines = wait_log(log, tid, "TXN_CLOSE")
        seen = hooks(lines)
        assert seen == [*ORDER[: ORDER.index(hook) + 1], "TXN_CLOSE"], seen
        assert lines[-1] == "TXN_CLOSE status=500"
    assert metric(proxy, "proxy.process.plugin.txn_hooks.errors") == 1  # the raise, not the error
    # the worker lives and serves the next request
    assert request(proxy, f"after-{hook}")[0] == 200
    assert proxy.worker_pids() == worker


def test_respond_from_request_hooks_and_refused_elsewhere(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path
) -> None:
    log = tmp_path / "txn.log"
    proxy = start(tsproxy_factory, origin, log)
    status, headers, body = request(proxy, "r1", "READ_REQUEST_HDR=respond")
    assert (status, headers["x-synthetic"]) == (203, "READ_REQUEST_HDR")
    assert body == b"synthetic from READ_REQUEST_HDR"
    lines = wait_log(log, "r1", "TXN_CLOSE")
    assert lines == ["READ_REQUEST_HDR", "READ_REQUEST_HDR respond=True", "TXN_CLOSE status=203"]
    assert origin.requests == []  # the origin was never contacted
    for hook in ("PRE_REMAP", "POST_REMAP"):
        status, headers, _ = request(proxy, f"r-{hook}", f"{hook}=respond")
        assert (status, headers["x-synthetic"]) == (203, hook)
    assert origin.requests == []
    # after the request went out, respond() is refused (returns False) and the origin answers
    for hook in ("SEND_REQUEST_HDR", "READ_RESPONSE_HDR", "SEND_RESPONSE_HDR"):
        tid = f"late-{hook}"
        status, headers, body = request(proxy, tid, f"{hook}=respond")
        assert status == 200 and "x-synthetic" not in headers and json.loads(body)["target"] == "/echo"
        lines = wait_log(log, tid, "TXN_CLOSE")
        assert f"{hook} respond=False" in lines and hooks(lines) == ORDER


def test_header_edits_reach_origin_and_client_and_per_txn_hooks(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path
) -> None:
    log = tmp_path / "txn.log"
    proxy = start(tsproxy_factory, origin, log)
    for hook in ("READ_REQUEST_HDR", "PRE_REMAP", "POST_REMAP", "SEND_REQUEST_HDR"):
        status, _, body = request(proxy, f"h-{hook}", f"{hook}=reqhdr", headers={"X-Remove-Me": "secret"})
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-plugin-saw"] == hook and "x-remove-me" not in seen
    for hook in ("READ_RESPONSE_HDR", "SEND_RESPONSE_HDR"):
        status, headers, _ = request(proxy, f"h-{hook}", f"{hook}=resphdr")
        assert status == 200 and headers["x-plugin-resp"] == hook and "content-type" not in headers
    # hooks added for one transaction from inside a hook run for it, after the global ones, once
    status, headers, _ = request(proxy, "t1", "PRE_REMAP=txnhook")
    assert status == 200 and headers["x-txn-hook"] == "yes"
    lines = wait_log(log, "t1", "TXN:TXN_CLOSE")
    assert lines.index("SEND_RESPONSE_HDR") < lines.index("TXN:SEND_RESPONSE_HDR")
    assert lines.index("TXN_CLOSE status=200") < lines.index("TXN:TXN_CLOSE")
    assert sum(line.startswith("TXN:") for line in lines) == 2
    # ... and not for the next transaction
    status, headers, _ = request(proxy, "t2")
    assert status == 200 and "x-txn-hook" not in headers
    assert not any(line.startswith("TXN:") for line in wait_log(log, "t2", "TXN_CLOSE"))


def test_hooks_see_the_target_with_dot_segments_resolved(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path
) -> None:
    # Issue 14 item 2: a plugin's path check at READ_REQUEST_HDR sees what the remap and the
    # origin will see, and a target a plugin sets is resolved the same way.
    log = tmp_path / "txn.log"
    proxy = start(tsproxy_factory, origin, log)
    status, _, _ = request(proxy, "seen", "READ_REQUEST_HDR=target", path="/x/%2e%2e/echo?q=/../")
    assert status == 200 and origin.wait_requests(1)[-1].target == "/echo?q=/../"
    assert "READ_REQUEST_HDR target=/echo?q=/../" in wait_log(log, "seen", "TXN_CLOSE")
    status, _, _ = request(proxy, "set", "PRE_REMAP=retarget", headers={"X-New-Target": "/echo/./b/../x"})
    assert status == 200 and origin.wait_requests(2)[-1].target == "/echo/x"
    assert "PRE_REMAP target=/echo/x" in wait_log(log, "set", "TXN_CLOSE")
    climb = {"X-New-Target": "/../etc/passwd"}
    status, _, _ = request(proxy, "climb", "PRE_REMAP=retarget", headers=climb)
    assert status == 200 and origin.wait_requests(3)[-1].target == "/echo"  # left as it was
    refused = [line for line in wait_log(log, "climb", "TXN_CLOSE") if "refused" in line]
    assert refused and "climbs above the root" in refused[0], refused


@pytest.mark.parametrize("hook", ["READ_REQUEST_HDR", "POST_REMAP", "READ_RESPONSE_HDR", "SEND_RESPONSE_HDR"])
def test_stalled_hook_blocks_nobody_and_is_ended_by_the_inactivity_timeout(
    tsproxy_factory: Factory, origin: OriginServer, tmp_path: Path, hook: str
) -> None:
    log = tmp_path / "txn.log"
    proxy = start(
        tsproxy_factory,
        origin,
        log,
        records={
            "proxy.config.http.transaction_no_activity_timeout_in": 2,
            "proxy.config.http.transaction_no_activity_timeout_out": 30,
        },
    )
    stalled = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    head = f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\nX-Test-Id: stuck\r\nX-Test-Action: {hook}=stall\r\n\r\n"
    stalled.sendall(head.encode())
    started = time.monotonic()
    wait_log(log, "stuck", f"{hook} stalled")
    # the worker serves everyone else meanwhile
    for i in range(3):
        assert request(proxy, f"other{i}")[0] == 200
    assert "TXN_CLOSE" not in hooks(log_of(log, "stuck"))
    # the session times out, the connection closes and TXN_CLOSE still fires, once
    data = stalled.recv(65536)
    waited = time.monotonic() - started
    stalled.close()
    assert data == b"", data[:200]
    assert 1.5 <= waited < 8, waited
    lines = wait_log(log, "stuck", "TXN_CLOSE")
    assert hooks(lines) == [*ORDER[: ORDER.index(hook) + 1], "TXN_CLOSE"]
    assert request(proxy, "after")[0] == 200
    deadline = time.monotonic() + 5
    while metric(proxy, "proxy.process.http.current_client_connections") and time.monotonic() < deadline:
        time.sleep(0.02)  # the last client's close reaches the proxy a moment later
    assert metric(proxy, "proxy.process.http.current_client_connections") == 0


def test_plugin_load_failure_stops_start_or_warns(
    tmp_path: Path, origin: OriginServer, tsproxy_factory: Factory
) -> None:
    broken = {
        "raising.py": "def plugin_init(api, args):\n    raise RuntimeError('no config for me')\n",
        "syntax.py": "def plugin_init(api, args)\n    pass\n",
        "noinit.py": "X = 1\n",
    }
    for name, source in broken.items():
        config_dir = write_config_dir(
            tmp_path / name,
            {"proxy.config.stop.shutdown_timeout": 1},
            files={"plugin.config": f"{name}\n", f"plugins/{name}": source},
        )
        started = time.monotonic()
        result = run_tsproxy("start", "--config-dir", str(config_dir), timeout=60)
        assert result.returncode != 0
        assert f"plugin {name[:-3]} failed to load" in result.stderr, result.stderr
        assert time.monotonic() - started < 20
    # load_failure_fatal 0: a warning naming the plugin, and the proxy serves without it
    proxy = tsproxy_factory(
        records={"proxy.config.plugin.load_failure_fatal": 0},
        files={
            "remap.config": f"map http://{HOST}/ http://{origin.authority}/\n",
            "plugin.config": "raising.py\n",
            "plugins/raising.py": broken["raising.py"],
        },
    )
    assert request(proxy, "x")[0] == 200
    out = proxy.output()
    assert "plugin raising failed to load" in out and "load_failure_fatal is 0" in out, out
