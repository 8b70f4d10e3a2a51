"""Shared fixtures: config directories in tmp_path and a real ``tsproxy start`` subprocess.

Usage::

    def test_something(tsproxy_factory):
        proxy = tsproxy_factory(
            records={"proxy.config.exec_thread.limit": 2},
            files={"remap.config": "map http://a/ http://127.0.0.1:9/\\n"},
        )
        socket.create_connection(("127.0.0.1", proxy.port(0)))
        proxy.ctl("metric", "get", "proxy.process.http.incoming_requests")

``server_ports`` may use ``{0}``, ``{1}``... placeholders; each gets a free port, read back
with ``proxy.port(n)``. The default is one plain port on 127.0.0.1. Every proxy a test
starts is stopped at teardown (SIGTERM, then SIGKILL of its process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tsproxy import control  # noqa: E402

TSPROXY_CMD = [sys.executable, "-m", "tsproxy.cli"]

DEFAULT_RECORDS: dict[str, Any] = {
    "proxy.config.http.server_ports": "{0}:ip-in=127.0.0.1",
    "proxy.config.exec_thread.limit": 1,
    "proxy.config.ssl.number.threads": 0,
    "proxy.config.local_state_dir": "run",
    "proxy.config.log.logfile_dir": "log",
    "proxy.config.stop.shutdown_timeout": 5,
    # The suite runs as root (CI and the dev box). Config dirs live under pytest's tmp_path,
    # which only root can read, so ordinary tests keep root, as ATS's own test harness does;
    # tests/test_privileges.py runs the default (switch to nobody) end to end on a directory an
    # operator would set up. Pass None to get the table default.
    "proxy.config.admin.user_id": "#-1",
}

DEFAULT_FILES: dict[str, str | bytes] = {
    "remap.config": "# test config: no remap rules\n",
}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now, and that this test run has not
    handed out before: the kernel may give the same free port to two binds in a row, and two
    ports of one config (or of two proxies in one test) must differ."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port after 100 tries")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0, step: float = 0.05) -> Any:
    """``predicate()``'s first true value, polled every ``step`` seconds; AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for tsproxy subprocesses: the repo importable, no stray config dir."""
    env = dict(os.environ)
    env.pop("TSPROXY_CONFIG_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def records_text(records: Mapping[str, Any]) -> str:
    """records.config text for ``records``; the TYPE comes from the record table."""
    from iocore.records.spec import RECORDS_BY_NAME

    lines = []
    for name, value in records.items():
        spec = RECORDS_BY_NAME.get(name)
        if spec is not None:
            rtype = spec.type.value
        else:
            rtype = "INT" if isinstance(value, int) else "FLOAT" if isinstance(value, float) else "STRING"
        lines.append(f"CONFIG {name} {rtype} {value}")
    return "\n".join(lines) + "\n"


def write_config_dir(
    path: Path,
    records: Mapping[str, Any] | None = None,
    files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``records`` and ``files`` over DEFAULT_RECORDS / DEFAULT_FILES.

    A record whose value is None is left out (so it takes the table default); ``{n}``
    placeholders in server_ports get free ports.
    """
    merged = {**DEFAULT_RECORDS, **(records or {})}
    merged = {k: v for k, v in merged.items() if v is not None}
    _allocate_ports(merged)  # any {n} placeholder left gets a free port
    path.mkdir(parents=True, exist_ok=True)
    (path / "records.config").write_text(records_text(merged))
    for name, content in {**DEFAULT_FILES, **(files or {})}.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return path


class ProxyProcess:
    """A running ``tsproxy start`` and the means to talk to it."""

    def __init__(
        self,
        config_dir: Path,
        ports: list[int],
        proc: subprocess.Popen[bytes],
        out: Path,
        records: Mapping[str, Any],
    ) -> None:
        self.config_dir = config_dir
        self.records = dict(records)
        self.ports = ports
        self.proc = proc
        self.out_path = out

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def state_dir(self) -> Path:
        return self.config_dir / str(self.records.get("proxy.config.local_state_dir") or "run")

    @property
    def sock_path(self) -> Path:
        return control.socket_path(self.state_dir)

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "tsproxy.pid"

    def port(self, n: int = 0) -> int:
        return self.ports[n]

    def output(self) -> str:
        """Everything the master and its workers wrote to stdout/stderr so far."""
        return self.out_path.read_text(errors="replace")

    def call(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        """A JSON-RPC call on the control socket, in-process (faster than ``ctl``)."""
        return control.call(self.sock_path, method, params, timeout)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``tsproxy ARGS... --config-dir DIR``; never raises on a non-zero exit."""
        return run_tsproxy(*args, "--config-dir", str(self.config_dir), timeout=timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every worker slot has a pid that reported ready."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tsproxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                last = self.status()
            except control.NotRunningError:
                time.sleep(0.05)
                continue
            if last["workers"] and all(w["pid"] and w["ready"] for w in last["workers"]):
                return
            time.sleep(0.05)
        raise AssertionError(f"tsproxy not ready within {timeout} s; status {last}:\n{self.output()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group; returns the master's exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover workers, if any
        return self.proc.returncode


def run_tsproxy(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the tsproxy CLI to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        [*TSPROXY_CMD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else subprocess_env(),
        check=False,
    )


def _allocate_ports(records: dict[str, Any]) -> list[int]:
    value = records.get("proxy.config.http.server_ports")
    if not isinstance(value, str):
        return []
    ports: list[int] = []
    i = 0
    while "{" + str(i) + "}" in value:
        ports.append(free_port())
        i += 1
    records["proxy.config.http.server_ports"] = value.format(*ports)
    return ports


@pytest.fixture
def tsproxy_factory(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start ``tsproxy start`` on a fresh config dir: ``factory(records=..., files=..., ...)``.

    Keyword arguments: ``records`` (overrides of DEFAULT_RECORDS), ``files`` (name -> text),
    ``name`` (config dir name), ``parent`` (the directory holding it, default tmp_path),
    ``wait`` (wait for every worker to be ready, default True), ``extra_args`` (more
    ``tsproxy start`` arguments), ``env`` (extra env).
    """
    started: list[ProxyProcess] = []
    counter = iter(range(1000))

    def factory(
        records: Mapping[str, Any] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        *,
        name: str | None = None,
        parent: Path | None = None,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> ProxyProcess:
        merged = {**DEFAULT_RECORDS, **(records or {})}
        ports = _allocate_ports(merged)
        config_dir = write_config_dir((parent or tmp_path) / (name or f"etc{next(counter)}"), merged, files)
        out = config_dir.parent / f"{config_dir.name}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [*TSPROXY_CMD, "start", "--config-dir", str(config_dir), *extra_args],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=subprocess_env(**(env or {})),
                cwd=tmp_path,
                start_new_session=True,
            )
        proxy = ProxyProcess(config_dir, ports, proc, out, merged)
        started.append(proxy)
        if wait:
            proxy.wait_ready()
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture
def tsproxy(tsproxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A running proxy with the default test config (one ET_NET worker, one plain port)."""
    return tsproxy_factory()


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@contextlib.contextmanager
def http_origin(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """A threaded HTTP/1.x origin on 127.0.0.1 serving ``handler``; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
