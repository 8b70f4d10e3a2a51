"""The master process, run for real: start/stop, workers, respawn, heartbeat, pidfile, reload."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import ProxyProcess, run_tsproxy, write_config_dir

from tsproxy.exitcodes import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE, EX_WORKER_BOOT

Factory = Callable[..., ProxyProcess]


def _wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_start_then_stop_exits_0_and_cleans_up(tsproxy: ProxyProcess) -> None:
    assert tsproxy.pidfile.read_text().strip() == str(tsproxy.pid)
    with socket.create_connection(("127.0.0.1", tsproxy.port(0)), timeout=5):
        pass
    workers = tsproxy.worker_pids()
    result = tsproxy.ctl("stop")
    assert result.returncode == 0, result.stderr
    assert tsproxy.wait_exit(10) == EX_OK
    assert not tsproxy.pidfile.exists()
    assert not tsproxy.sock_path.exists()
    assert not any(_alive(pid) for pid in workers)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tsproxy.port(0)), timeout=2).close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_gracefully(tsproxy: ProxyProcess, sig: signal.Signals) -> None:
    workers = tsproxy.worker_pids()
    tsproxy.proc.send_signal(sig)
    assert tsproxy.wait_exit(15) == EX_OK
    assert not any(_alive(pid) for pid in workers)
    assert not tsproxy.pidfile.exists()


def test_control_socket_is_private(tsproxy: ProxyProcess) -> None:
    mode = tsproxy.sock_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_status_lists_master_and_workers_with_roles(tsproxy_factory: Factory) -> None:
    proxy = tsproxy_factory(
        records={"proxy.config.exec_thread.limit": 2, "proxy.config.ssl.number.threads": 1}
    )
    status = proxy.status()
    assert status["master"]["pid"] == proxy.pid
    assert [w["role"] for w in status["workers"]] == ["ET_NET", "ET_NET", "ET_SSL"]
    children = {p.pid for p in psutil.Process(proxy.pid).children()}
    assert {w["pid"] for w in status["workers"]} == children
    for w in status["workers"]:
        assert w["rss"] > 0 and w["uptime"] >= 0 and w["connections"] == 0
    # the plain port goes to the ET_NET workers when there are ET_SSL workers
    assert status["workers"][0]["ports"] == [f"{proxy.port(0)}:ip-in=127.0.0.1"]
    assert status["workers"][2]["ports"] == []

    table = proxy.ctl("status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ROLE", "SLOT", "PID", "UPTIME"]
    assert lines[1].split()[:3] == ["master", "-", str(proxy.pid)]
    assert [line.split()[0] for line in lines[2:5]] == ["ET_NET", "ET_NET", "ET_SSL"]


def test_killed_worker_is_replaced_within_a_second(tsproxy_factory: Factory) -> None:
    proxy = tsproxy_factory(records={"proxy.config.exec_thread.limit": 2})
    before = proxy.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        pids = proxy.worker_pids()
        return pids[0] not in (None, before[0]) and pids[1] == before[1]

    _wait_for(replaced, 1.0, "a new worker pid in slot 0")
    assert time.monotonic() - killed_at < 1.0
    proxy.wait_ready(5)
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=5):
        pass
    assert "died" in proxy.output()


def test_hung_worker_is_killed_after_heartbeat_timeout(tsproxy_factory: Factory) -> None:
    proxy = tsproxy_factory(records={"proxy.config.heartbeat.timeout": 1})
    (pid,) = proxy.worker_pids()
    os.kill(pid, signal.SIGSTOP)  # alive but not beating
    try:
        _wait_for(lambda: proxy.worker_pids()[0] not in (None, pid), 5.0, "the hung worker's replacement")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "missed its heartbeat" in proxy.output()
    assert not _alive(pid)


def test_workers_exit_by_themselves_when_the_master_dies(tsproxy_factory: Factory) -> None:
    proxy = tsproxy_factory(records={"proxy.config.exec_thread.limit": 2})
    workers = proxy.worker_pids()
    proxy.proc.kill()
    proxy.proc.wait(5)
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 5.0, "orphaned workers to exit")


def test_second_master_for_the_same_config_dir_is_refused(tsproxy: ProxyProcess) -> None:
    result = run_tsproxy("start", "--config-dir", str(tsproxy.config_dir), timeout=30)
    assert result.returncode == EX_UNAVAILABLE
    assert "already running" in result.stderr
    assert str(tsproxy.pid) in result.stderr
    assert "Traceback" not in result.stderr
    # the first master is untouched
    assert tsproxy.proc.poll() is None
    assert tsproxy.pidfile.read_text().strip() == str(tsproxy.pid)


def test_stale_pidfile_and_socket_do_not_block_start(tsproxy_factory: Factory, tmp_path: Path) -> None:
    state = tmp_path / "etc0" / "run"
    state.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (state / "tsproxy.pid").write_text(f"{dead.pid}\n")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(state / "tsproxy.sock"))
    stale.close()  # the file stays, nobody listens
    proxy = tsproxy_factory(name="etc0")
    assert proxy.pidfile.read_text().strip() == str(proxy.pid)


def test_bad_record_value_names_file_and_line(tmp_path: Path) -> None:
    config_dir = write_config_dir(tmp_path / "etc", {"proxy.config.exec_thread.limit": "lots"})
    text = (config_dir / "records.config").read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "exec_thread.limit" in t)
    result = run_tsproxy("start", "--config-dir", str(config_dir), timeout=30)
    assert result.returncode == EX_CONFIG
    assert f"records.config:{line}:" in result.stderr
    assert "proxy.config.exec_thread.limit" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (config_dir / "run" / "tsproxy.pid").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config_dir = write_config_dir(
            tmp_path / "etc", {"proxy.config.http.server_ports": f"{port}:ip-in=127.0.0.1"}
        )
        text = (config_dir / "records.config").read_text().splitlines()
        line = next(i for i, t in enumerate(text, 1) if "server_ports" in t)
        result = run_tsproxy("start", "--config-dir", str(config_dir), timeout=30)
    assert result.returncode == EX_UNAVAILABLE
    assert f"records.config:{line}:" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (config_dir / "run" / "tsproxy.pid").exists()
    assert not (config_dir / "run" / "tsproxy.sock").exists()


def test_master_logs_to_logfile_dir(tsproxy: ProxyProcess) -> None:
    log = tsproxy.config_dir / "log" / "tsproxy.log"
    assert log.exists()
    assert f"tsproxy master {tsproxy.pid} started" in log.read_text()


def test_worker_failing_at_boot_stops_the_master(tmp_path: Path) -> None:
    """A plugin whose init raises (load_failure_fatal 1): every worker dies at boot.

    The master only checks that plugin.config's files exist; importing and initialising the
    plugin happens in each worker, so this is the natural "config accepted, worker cannot
    boot" case. The master must give up with EX_WORKER_BOOT instead of looping.
    """
    config_dir = write_config_dir(
        tmp_path / "etc",
        {"proxy.config.exec_thread.limit": 2},
        files={
            "plugin.config": "broken.py\n",
            "plugins/broken.py": (
                "def plugin_init(api, args):\n    raise RuntimeError('cannot boot on purpose')\n"
            ),
        },
    )
    started = time.monotonic()
    result = run_tsproxy("start", "--config-dir", str(config_dir), timeout=60)
    assert result.returncode == EX_WORKER_BOOT, result.stderr
    assert "failed to boot 5 times in a row" in result.stderr
    assert "cannot boot on purpose" in result.stderr  # the worker's own error is shown
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20
    assert not (config_dir / "run" / "tsproxy.pid").exists()
    assert not (config_dir / "run" / "tsproxy.sock").exists()


def test_reload_with_bad_records_changes_nothing(tsproxy: ProxyProcess) -> None:
    workers = tsproxy.worker_pids()
    records = tsproxy.config_dir / "records.config"
    good = records.read_text()
    records.write_text(good + "CONFIG proxy.config.stop.shutdown_timeout INT soon\n")
    result = tsproxy.ctl("reload")
    assert result.returncode == EX_CONFIG
    assert f"records.config:{len(good.splitlines()) + 1}:" in result.stderr
    assert "Traceback" not in result.stderr
    status = tsproxy.status()
    assert status["generation"] == 1
    assert tsproxy.worker_pids() == workers

    records.write_text(good.replace("shutdown_timeout INT 5", "shutdown_timeout INT 7"))
    result = tsproxy.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "record changed: proxy.config.stop.shutdown_timeout" in result.stdout
    assert "file changed: records.config" in result.stdout
    status = tsproxy.status()
    assert status["generation"] == 2
    assert [w["generation"] for w in status["workers"]] == [2]
    assert tsproxy.worker_pids() == workers


def test_reload_reports_restart_only_records(tsproxy: ProxyProcess) -> None:
    records = tsproxy.config_dir / "records.config"
    records.write_text(records.read_text() + "CONFIG proxy.config.exec_thread.limit INT 3\n")
    result = tsproxy.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "needs restart: proxy.config.exec_thread.limit" in result.stdout


def test_sighup_reloads(tsproxy: ProxyProcess) -> None:
    tsproxy.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: tsproxy.status()["generation"] == 2, 10.0, "generation 2 after SIGHUP")
    _wait_for(
        lambda: [w["generation"] for w in tsproxy.status()["workers"]] == [2], 10.0, "workers at generation 2"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="privileges are only dropped when started as root")
def test_unknown_admin_user_is_a_clear_error(tmp_path: Path) -> None:
    config_dir = write_config_dir(tmp_path / "etc", {"proxy.config.admin.user_id": "no-such-user-tsproxy"})
    result = run_tsproxy("start", "--config-dir", str(config_dir), timeout=30)
    assert result.returncode == EX_NOPERM
    assert "proxy.config.admin.user_id: no such user 'no-such-user-tsproxy'" in result.stderr
    assert not (config_dir / "run" / "tsproxy.pid").exists()
