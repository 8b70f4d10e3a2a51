"""The master process: binds listeners, forks and supervises workers, serves the control socket.

Theory of operation (gunicorn's arbiter, with ATS names): ``Master.__init__`` only stores
arguments. ``run()`` loads and validates the config, binds every port of
``proxy.config.http.server_ports``, refuses to start when another master holds the pidfile,
creates the control socket and the shared StatsRegion, then forks
``proxy.config.exec_thread.limit`` ET_NET and ``proxy.config.ssl.number.threads`` ET_SSL
workers, one stats slot each. With ET_SSL workers, the ssl ports go to them and the plain
ports to ET_NET; without, every ET_NET worker accepts on every port.

States: RUNNING -> STOPPING -> (return). The single-threaded main loop waits in a selector on
the signal wakeup pipe, each worker's control socketpair and the control socket. Signal handlers
only append the signal number to a queue; the loop calls ``handle_<name>``. Invariants:

* A worker that dies while RUNNING is replaced at once in the same slot (its gauges reset).
  A slot whose worker dies before reporting ``ready`` or within ``BOOT_WINDOW`` seconds,
  ``MAX_BOOT_FAILURES`` times in a row, stops the master with EX_WORKER_BOOT.
* A worker whose heartbeat (in its stats slot) is older than ``proxy.config.heartbeat.timeout``
  is SIGKILLed and replaced.
* Stop: listeners close first, workers get ``stop`` with the shutdown timeout, leftovers are
  SIGKILLed after it; pidfile and control socket are removed last.
* Reload: the master validates the files first; only a config that loads cleanly is sent to
  the workers (``reload`` with a new generation), and workers forked later boot with it.
* Stop: the listening sockets are ``shutdown()`` before the master closes its copies, so the
  kernel refuses new connections at once even though draining workers still hold the fds.

Restart (``restart`` on the control socket, ``tsproxy restart``) replaces the workers one at a
time while the listening sockets stay open in the master: for each slot, fork the replacement,
wait for its ``ready``, then send the old worker ``stop`` (it stops accepting, finishes its
open transactions up to ``proxy.config.stop.shutdown_timeout``, closes idle keep-alive
connections) and go on with the next slot without waiting for the drain. The answer comes once
every old worker has exited. A replacement that dies or stays silent before ``ready`` aborts the
restart and the old worker keeps its slot.

Stats slots vs worker slots: a worker writes its counters without locks, so two live processes
must never share a stats slot, and the old worker keeps counting while it drains. The region
therefore has two stats slots per worker slot; ``_Slot.stats_index`` says which one the current
worker uses, and a replacement takes a free one. The drained worker's slot keeps its counters
(sums run over every stats slot, so totals survive restarts); once that worker has exited its
gauges are zeroed and the slot goes back to the free list, where a later replacement carries
its counters on. Rates in ``status`` are per worker process: the master samples each worker's
handshake and request counters every ``RATE_PERIOD`` and reports the last period's rate.

A restart forks the replacements from this master, so they run the code the master imported
when it started: it applies config (including restart-only records that a worker reads at
boot, like plugin.config's plugin_dir) and clears a worker's state, but a tsproxy *code*
upgrade needs a master restart (``tsproxy stop`` + ``tsproxy start``, or the supervisor's).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import re
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from iocore.net.ports import RECORD_NAME as SERVER_PORTS
from iocore.records.errors import ConfigError, TSError
from iocore.records.stats import METRIC_ID, SlotRole, SlotState, StatsRegion
from tsproxy import control
from tsproxy.compiled import stale_compiled_modules
from tsproxy.exitcodes import (
    EX_CONFIG,
    EX_DATAERR,
    EX_FAILURE,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EX_WORKER_BOOT,
    exit_code_for,
)
from tsproxy.logs import LogRoller, RollingPolicy, get_logger, set_process_label, setup_logging
from tsproxy.safefs import check_private_dir, make_dir, open_dir, read_file, write_atomic

if TYPE_CHECKING:
    from tsproxy.config import PluginSpec, ProxyConfig
    from tsproxy.worker import WorkerBoot

PIDFILE_NAME = "tsproxy.pid"
BACKLOG = 1024
BOOT_WINDOW = 1.0  # a worker dying sooner than this after its fork failed to boot
MAX_BOOT_FAILURES = 5  # ... this many times in a row in one slot stops the master
RELOAD_TIMEOUT = 10.0
STOP_GRACE = 2.0  # extra seconds past shutdown_timeout before leftovers are SIGKILLed
TICK = 0.2
ET_NET = "ET_NET"
ET_SSL = "ET_SSL"
CONNECTIONS_METRIC = "proxy.process.net.connections_currently_open"
HANDSHAKES_METRIC = "proxy.process.ssl.total_success_handshake_count_in"
REQUESTS_METRIC = "proxy.process.http.incoming_requests"
RATE_PERIOD = 1.0  # seconds between the master's samples of each worker's counters
RESTART_BOOT_TIMEOUT = 30.0  # a replacement silent this long after its fork aborts a restart

_log = get_logger("tsproxy.master")

WorkerTarget = Callable[["WorkerBoot"], int]


class StartupError(TSError):
    """The master cannot start; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PortInUseError(ConfigError):
    """A port of proxy.config.http.server_ports is already bound by someone else."""

    exit_code = EX_UNAVAILABLE


@dataclass
class _Slot:
    """One stats slot and the worker occupying it (pid 0 = none yet)."""

    index: int
    role: str
    listeners: list[Any]  # tsproxy.worker.Listener
    pid: int = 0
    sock: socket.socket | None = None
    rbuf: bytearray = field(default_factory=bytearray)
    spawned_mono: float = 0.0
    spawned_wall: float = 0.0
    ready: bool = False
    generation: int = 0
    boot_failures: int = 0
    last_status: int | None = None
    respawn_at: float | None = None
    proc: psutil.Process | None = None
    stats_index: int = -1  # the stats slot the current worker writes (see "Stats slots")
    rate_key: tuple[int, int] = (0, -1)  # (pid, stats_index) the last sample was taken for
    rate_sample: tuple[float, int, int] | None = None  # (monotonic, handshakes, requests)
    rates: tuple[float, float] | None = None  # handshakes/s, requests/s over the last period

    @property
    def label(self) -> str:
        return f"{self.role}[{self.index}]"


@dataclass(eq=False)  # identity: ``in`` / ``remove`` on the retiree list
class _Retiree:
    """An old worker replaced by ``restart``: serving until its replacement is ready, then draining."""

    slot: int
    role: str
    pid: int
    stats_index: int
    sock: socket.socket | None
    spawned_mono: float
    spawned_wall: float
    generation: int
    rbuf: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0  # 0: not told to stop yet; else SIGKILL after this monotonic time

    @property
    def label(self) -> str:
        return f"{self.role}[{self.slot}]"


@dataclass
class _PendingRestart:
    todo: deque[int]  # worker slots still to restart
    responder: control.Responder | None
    started: float
    current: int | None = None  # the slot whose replacement is booting
    old: _Retiree | None = None  # that slot's old worker
    boot_deadline: float = 0.0
    pids: set[int] = field(default_factory=set)  # old workers of this restart not yet exited
    results: list[dict[str, Any]] = field(default_factory=list)
    abort_reason: str | None = None


@dataclass
class _PendingReload:
    generation: int
    changed: list[str]
    restart_required: list[str]
    files: list[str]
    plugins: list[str]  # plugin.config changes that need a restart, as messages
    warnings: list[str]  # the new configuration's warnings (as config check prints them)
    waiting: dict[int, int]  # slot index -> pid
    replies: dict[int, dict[str, Any]]
    deadline: float
    responder: control.Responder | None


# (size, mtime_ns, sha256 of the content) of one config file; the hash decides "changed".
_Fingerprint = tuple[int, int, bytes]


def _file_fingerprints(
    config_dir: Path, exclude: list[Path], previous: Mapping[str, _Fingerprint] | None = None
) -> dict[str, _Fingerprint]:
    """Fingerprints of every file under the config dir except the state and log dirs.

    A file whose size and mtime match ``previous`` keeps its hash without being read again;
    any other is hashed, so a file that was only touched (or rewritten with the same bytes)
    compares equal and a reload does not report it as changed."""
    result: dict[str, _Fingerprint] = {}
    previous = previous or {}
    excluded = [p.resolve() for p in exclude]
    root_dir = config_dir.resolve()
    for root, dirs, files in os.walk(config_dir):
        here = Path(root).resolve()
        dirs[:] = [d for d in dirs if (here / d) not in excluded and not d.startswith(".")]
        for name in files:
            path = here / name
            rel = str(path.relative_to(root_dir))
            with contextlib.suppress(OSError):
                st = path.stat()
                old = previous.get(rel)
                if old is not None and old[:2] == (st.st_size, st.st_mtime_ns):
                    result[rel] = old
                    continue
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(1 << 16):
                        digest.update(block)
                result[rel] = (st.st_size, st.st_mtime_ns, digest.digest())
    return result


def _plugin_code_hashes(plugins: list[PluginSpec]) -> dict[str, bytes]:
    """SHA-256 of each plugin given as a file (a module name has none here)."""
    hashes: dict[str, bytes] = {}
    for spec in plugins:
        if spec.target.endswith(".py") or "/" in spec.target:
            with contextlib.suppress(OSError):
                hashes[spec.target] = hashlib.sha256(Path(spec.target).read_bytes()).digest()
    return hashes


def _content(fp: _Fingerprint | None) -> bytes | None:
    return None if fp is None else fp[2]


def read_pidfile(path: Path) -> int | None:
    data = read_file(path, limit=64)  # never through a link (read as root at start)
    text = data.decode("ascii", "replace").strip() if data is not None else ""
    return int(text) if text.isdigit() else None


def is_live_master(pid: int) -> bool:
    """Whether ``pid`` is a running tsproxy process (not a zombie, not us)."""
    if pid == os.getpid():
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    return "tsproxy" in cmdline


def write_pidfile_atomic(path: Path, pid: int) -> None:
    """A new file under a random name, renamed over ``path`` (a link there is replaced)."""
    dfd = open_dir(path.parent.resolve())
    try:
        write_atomic(dfd, path.name, f"{pid}\n".encode(), 0o644)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class RunAs:
    """The user the master switches to after binding (``proxy.config.admin.user_id``)."""

    name: str
    uid: int
    gid: int


def resolve_run_as(records: Any) -> RunAs | None:
    """The user to switch to, or None to stay: not started as root, or ``#-1`` (ATS's "keep
    the user I was started as"; ``root`` and ``#0`` mean the same)."""
    if os.geteuid() != 0:
        return None
    user = str(records.get("proxy.config.admin.user_id")).strip()
    if user == "#-1":
        return None
    import pwd

    try:
        pw = pwd.getpwuid(int(user[1:])) if user.startswith("#") else pwd.getpwnam(user)
    except (KeyError, ValueError) as exc:
        line = records.line_of("proxy.config.admin.user_id")
        where = f"{records.path}:{line}" if line else f"{records.path} (the default)"
        raise StartupError(f"{where}: proxy.config.admin.user_id: no such user {user!r}", EX_NOPERM) from exc
    if pw.pw_uid == 0:
        return None
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _user_label() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _switch_to(run_as: RunAs) -> None:
    os.initgroups(run_as.name, run_as.gid)
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)


def _probe_as(run_as: RunAs, paths: list[Path], writable: list[Path]) -> tuple[str | None, list[Path]]:
    """In a forked child running as ``run_as``: the first of ``paths`` it cannot read, and
    why (``PATH: DIR is not searchable``), or None when it can read them all; and the
    directories of ``writable`` it cannot write to."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # ---- child: never returns
        code = 0
        try:
            os.close(rfd)
            _switch_to(run_as)
            lines = [str(d) for d in writable if not os.access(d, os.W_OK | os.X_OK)]
            for path in paths:
                why = _blocked_at(path)
                if why is not None:
                    lines.append(f"!{path}: {why}")
                    break
            os.write(wfd, "\n".join(lines).encode(errors="replace")[:60000])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 4096):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return f"(the check as user {run_as.name} failed to run)", []
    lines = b"".join(chunks).decode(errors="replace").split("\n")
    problem = next((x[1:] for x in lines if x.startswith("!")), None)
    return problem, [Path(x) for x in lines if x and not x.startswith("!")]


def _blocked_at(path: Path) -> str | None:
    """Why this process cannot read ``path`` (the first directory it cannot enter, or the
    file itself), or None when it can."""
    if os.access(path, os.R_OK):
        return None
    for parent in reversed(path.parents):
        if not os.access(parent, os.X_OK):
            return f"{parent} is not searchable"
    if not path.exists():
        return None  # nothing to read: whoever needs it reports it missing
    return f"{path} is not readable"


class Master:
    """Supervisor of the worker processes. ``__init__`` is cheap; ``run()`` does everything."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT)

    def __init__(
        self,
        config_dir: Path,
        *,
        worker_target: WorkerTarget | None = None,
        plugin_loader: Callable[..., Any] | None = None,
        log_level: int | None = None,
    ) -> None:
        """``worker_target`` replaces ``tsproxy.worker.worker_main`` (tests); ``plugin_loader``
        (``tsproxy.api.load_plugins``, injected by the CLI because the plugin facade sits above
        this layer) is handed to each worker in its WorkerBoot."""
        self.config_dir = Path(config_dir).absolute()
        self.worker_target = worker_target
        self.plugin_loader = plugin_loader
        self.log_level = log_level
        self.config: ProxyConfig | None = None
        self.generation = 1
        self.ticket_keys: bytes | None = None
        self.state_dir: Path | None = None
        self.log_dir: Path | None = None
        self._roller: LogRoller | None = None  # proxy.config.log.rolling_* (one roller: the master)
        self._next_roll = 0.0
        self.pidfile: Path | None = None
        self.run_as: RunAs | None = None
        self.sock_path: Path | None = None
        self.started_wall = 0.0
        self.slots: list[_Slot] = []
        self.listeners: list[Any] = []
        self.stats: StatsRegion | None = None
        self.selector: selectors.BaseSelector | None = None
        self.control_server: control.ControlServer | None = None
        self._sig_queue: deque[int] = deque()
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._stopping = False
        self._stop_deadline = 0.0
        self._exit_code = EX_OK
        self._stop_waiters: list[control.Responder] = []
        self._reload: _PendingReload | None = None
        self._fingerprints: dict[str, _Fingerprint] = {}
        self._plugins_loaded: tuple[list[PluginSpec], dict[str, bytes]] = ([], {})
        self._pidfile_written = False
        self._proc = psutil.Process()
        self._retirees: list[_Retiree] = []
        self._free_stats: list[int] = []
        self._restart: _PendingRestart | None = None
        self._next_sample = 0.0

    @property
    def region(self) -> StatsRegion:
        """The shared stats region (exists once ``run()`` has made the slots)."""
        assert self.stats is not None, "stats region not created yet"
        return self.stats

    # ------------------------------------------------------------------ startup

    def run(self) -> int:
        """Start, supervise until stopped, clean up. Returns the exit code."""
        try:
            self._boot()
            return self._main_loop()
        except TSError as exc:
            self._report_fatal(str(exc))
            return exit_code_for(exc)
        except Exception:
            _log.exception("internal error in the master")
            self._kill_all_workers()
            return EX_SOFTWARE
        finally:
            self._cleanup()

    def _report_fatal(self, message: str) -> None:
        if _log.handlers or get_logger().handlers:
            _log.error("%s", message)
        else:
            os.write(2, f"tsproxy: {message}\n".encode(errors="replace"))

    def _boot(self) -> None:
        from iocore.records.parser import load_records
        from tsproxy.config import load_proxy_config

        # The directories first, from records.config alone: started as root, nothing may be
        # written into them (the development certificate, made while loading the config,
        # included) before they are known to be safe (tsproxy.safefs).
        first = load_records(self.config_dir)
        self.state_dir = first.resolve_path("proxy.config.local_state_dir") or self.config_dir
        self.log_dir = first.resolve_path("proxy.config.log.logfile_dir")
        self.run_as = resolve_run_as(first)
        owner = (self.run_as.uid, self.run_as.gid) if self.run_as is not None else None
        if os.geteuid() == 0:
            allowed = {0} if self.run_as is None else {0, self.run_as.uid}
            for directory in filter(None, [self.state_dir, self.log_dir]):
                check_private_dir(directory, allowed)
        try:
            make_dir(self.state_dir, owner)
            if self.log_dir is not None:
                make_dir(self.log_dir, owner)
        except OSError as exc:
            raise StartupError(f"cannot create {exc.filename}: {exc.strerror}", EX_CONFIG) from exc
        self.config = load_proxy_config(self.config_dir, None, generation=self.generation)
        # Reloads keep these keys (unless a ticket key file is configured), so session tickets
        # issued by any worker before a reload still resume after it.
        self.ticket_keys = self.config.ticket_keys
        try:
            level = self.log_level if self.log_level is not None else 20
            setup_logging(self.log_dir, level=level, owner=owner)
            if self.log_dir is not None:
                self._roller = LogRoller(self.log_dir, RollingPolicy.from_records(self.config.records))
        except OSError as exc:
            raise StartupError(f"cannot create {exc.filename}: {exc.strerror}", EX_CONFIG) from exc
        set_process_label("master")
        self._check_run_user()
        for warning in self.config.warnings:
            _log.warning("%s", warning)
        for source in stale_compiled_modules():
            _log.warning(
                "%s changed after it was compiled; the old compiled code runs until "
                "`pip install -e .` rebuilds it (or its .so is deleted)",
                source,
            )
        self.pidfile = self.state_dir / PIDFILE_NAME
        self.sock_path = control.socket_path(self.state_dir)
        other = read_pidfile(self.pidfile)
        if other is not None and is_live_master(other):
            raise StartupError(
                f"tsproxy is already running for config dir {self.config_dir} "
                f"(pid {other}, pidfile {self.pidfile})"
            )
        self._bind_listeners()
        self.selector = selectors.DefaultSelector()
        try:
            csock = control.bind_control_socket(self.sock_path)
        except TSError as exc:
            raise StartupError(f"tsproxy is already running for config dir {self.config_dir}: {exc}") from exc
        self.control_server = control.ControlServer(csock, self.sock_path, self._dispatch, self.selector)
        write_pidfile_atomic(self.pidfile, os.getpid())
        self._pidfile_written = True
        self._drop_privileges()
        self._fingerprints = _file_fingerprints(
            self.config_dir, [self.state_dir, *filter(None, [self.log_dir])]
        )
        self._note_plugins_loaded()
        self._make_slots()
        self._install_signals()
        self.started_wall = time.time()
        self._proc.cpu_percent(None)
        _log.info(
            "tsproxy master %d started as user %s: config %s, %d ET_NET + %d ET_SSL workers, ports %s",
            os.getpid(),
            _user_label(),
            self.config_dir,
            sum(s.role == ET_NET for s in self.slots),
            sum(s.role == ET_SSL for s in self.slots),
            " ".join(lst.descriptor.describe() for lst in self.listeners) or "(none)",
        )
        for slot in self.slots:
            self._spawn(slot)

    def _bind_listeners(self) -> None:
        from tsproxy.worker import Listener

        assert self.config is not None
        records = self.config.records
        line = records.line_of(SERVER_PORTS)
        for desc in self.config.ports:
            family = socket.AF_INET6 if desc.ipv6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if desc.ipv6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((desc.bind_address, desc.port))
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                self._close_listeners()
                where = (
                    f"{desc.bind_address}:{desc.port}"
                    if not desc.ipv6
                    else f"[{desc.bind_address}]:{desc.port}"
                )
                if exc.errno == errno.EADDRINUSE:
                    message = f"{SERVER_PORTS}: port {where} ('{desc.describe()}') is already in use"
                    raise PortInUseError(str(records.path), line, message) from exc
                message = f"{SERVER_PORTS}: cannot listen on {where}: {exc.strerror or exc}"
                err = PortInUseError(str(records.path), line, message)
                err.exit_code = EX_CONFIG if exc.errno == errno.EADDRNOTAVAIL else EX_UNAVAILABLE
                raise err from exc
            self.listeners.append(Listener(descriptor=desc, sock=sock))

    def _close_listeners(self, *, shutdown: bool = False) -> None:
        """Close the master's listening sockets; ``shutdown`` first stops them for every process."""
        for lst in self.listeners:
            if shutdown:
                with contextlib.suppress(OSError):
                    lst.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                lst.sock.close()
        self.listeners = []

    def _check_run_user(self) -> None:
        """Started as root: before anything is bound or written, make sure the user of
        proxy.config.admin.user_id can read what it reads later (reloads read the
        configuration as it, workers import their plugins as it), or warn that ``#-1`` keeps
        root. A forked child switches to the user and tries, so groups and ACLs count."""
        assert self.config is not None
        if os.geteuid() != 0:
            return
        run_as = self.run_as
        if run_as is None:
            _log.warning(
                "running as root: proxy.config.admin.user_id is %r, so the master and the workers "
                "keep root; set it to an unprivileged user (the default is nobody)",
                str(self.config.records.get("proxy.config.admin.user_id")),
            )
            return
        records = self.config.records
        needed = [
            *filter(None, [Path(str(records.path)), records.resolve_path("proxy.config.url_remap.filename")]),
            self.config.ssl_params.multicert_filename,
            self.config_dir / "plugin.config",
            *self._plugin_sources(),
        ]
        problem, unwritable = _probe_as(run_as, needed, [d for d in (self.state_dir, self.log_dir) if d])
        for directory in unwritable:
            _log.warning(
                "user %s cannot write to %s: it cannot remove its pidfile and control socket at stop "
                "(state directory) or create log files (log directory); chown %s it",
                run_as.name,
                directory,
                run_as.name,
            )
        if problem is not None:
            raise StartupError(
                f"user {run_as.name} (proxy.config.admin.user_id) cannot read {problem} for it; "
                f"make the configuration and plugins readable by {run_as.name}, or set "
                f"proxy.config.admin.user_id to another user (#-1 keeps root)",
                EX_NOPERM,
            )

    def _drop_privileges(self) -> None:
        """Switch to proxy.config.admin.user_id when started as root (after binding)."""
        run_as = self.run_as
        if os.geteuid() != 0 or run_as is None:
            return
        # Everything a worker imports lazily must be loaded while we can still read it: the
        # interpreter's own files may not be readable by the new user (e.g. a Python under
        # /root). Workers fork from this process and inherit these modules.
        import encodings.idna  # noqa: F401  (getaddrinfo / SNI encoding)

        import tsproxy.worker  # noqa: F401
        from tsproxy.devcert import hand_over  # also for a reload falling back to the dev certificate

        if self.state_dir is not None:
            hand_over(self.state_dir, run_as.uid, run_as.gid)
        try:
            _switch_to(run_as)
        except OSError as exc:
            raise StartupError(f"cannot switch to user {run_as.name!r}: {exc.strerror}", EX_NOPERM) from exc
        _log.info("switched to user %s (uid %d, gid %d)", run_as.name, run_as.uid, run_as.gid)

    def _plugin_sources(self) -> list[Path]:
        """The files the workers' plugins are imported from (found while still root)."""
        import importlib.util

        assert self.config is not None
        paths: list[Path] = []
        for spec in self.config.plugins:
            target = spec.target
            if target.endswith(".py") or "/" in target:
                paths.append(Path(target))
                continue
            with contextlib.suppress(Exception):  # a plugin that cannot be found: its worker says so
                found = importlib.util.find_spec(target)
                if found is not None and found.origin and os.path.isabs(found.origin):
                    paths.append(Path(found.origin))
        return paths

    def _make_slots(self) -> None:
        assert self.config is not None
        records = self.config.records
        n_net = int(records.get("proxy.config.exec_thread.limit"))
        n_ssl = int(records.get("proxy.config.ssl.number.threads"))
        if n_ssl > 0:
            net_listeners = [lst for lst in self.listeners if not lst.descriptor.ssl]
            ssl_listeners = [lst for lst in self.listeners if lst.descriptor.ssl]
        else:
            net_listeners, ssl_listeners = list(self.listeners), []
        roles = [(ET_NET, net_listeners)] * n_net + [(ET_SSL, ssl_listeners)] * n_ssl
        self.slots = [
            _Slot(index=i, role=r, listeners=lsts, stats_index=i) for i, (r, lsts) in enumerate(roles)
        ]
        # Twice as many stats slots as workers: a restart's replacement and the old worker it
        # replaces both count while the old one drains (see "Stats slots" above).
        n = len(self.slots)
        self.stats = StatsRegion(max(2 * n, 1))
        self._free_stats = list(range(n, 2 * n))

    def _install_signals(self) -> None:
        assert self.selector is not None
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_wakeup)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only enqueue: the main loop dispatches to handle_<name>. Never log here.
        self._sig_queue.append(signum)

    # ------------------------------------------------------------------ workers

    def _spawn(self, slot: _Slot) -> None:
        from tsproxy.worker import WorkerBoot

        assert self.config is not None and self.selector is not None
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot.respawn_at = None
        # Everything alive now moves to the collector's permanent generation, so the worker's
        # collections never write to the objects it shares with the master: their pages stay
        # shared (copy-on-write) instead of being copied into every worker (~7 MB each). The
        # master unfreezes its own at once, so its garbage stays collectable across reloads.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            gc.unfreeze()
            raise
        if pid == 0:  # ---- child
            code = EX_SOFTWARE
            try:
                master_end.close()
                self._after_fork_in_child(slot)
                self.region.claim_slot(
                    slot.stats_index, os.getpid(), int(SlotRole[slot.role]), time.monotonic(), self.generation
                )
                boot = WorkerBoot(
                    role=slot.role,
                    slot=slot.stats_index,
                    config_dir=self.config_dir,
                    config=self.config,
                    listeners=slot.listeners,
                    stats=self.region,
                    control=worker_end,
                    plugin_loader=self.plugin_loader,
                )
                target = self.worker_target
                if target is None:
                    from tsproxy.worker import worker_main

                    target = worker_main
                code = target(boot)
            except SystemExit as exc:
                code = EX_OK if exc.code is None else exc.code if isinstance(exc.code, int) else EX_SOFTWARE
            except BaseException:
                with contextlib.suppress(Exception):
                    _log.exception("worker %s failed", slot.label)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        # ---- parent
        gc.unfreeze()
        worker_end.close()
        master_end.setblocking(False)
        slot.pid = pid
        slot.sock = master_end
        slot.rbuf = bytearray()
        slot.ready = False
        slot.generation = self.generation
        slot.spawned_mono = time.monotonic()
        slot.spawned_wall = time.time()
        slot.proc = None
        self.selector.register(master_end, selectors.EVENT_READ, lambda _m, s=slot: self._on_worker_io(s))
        where = "" if slot.stats_index == slot.index else f" (stats slot {slot.stats_index})"
        _log.info("spawned worker %s pid %d%s", slot.label, pid, where)

    def _after_fork_in_child(self, slot: _Slot) -> None:
        """In the forked worker: default signals, and close every fd that is not its own."""
        signal.set_wakeup_fd(-1)
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        others: list[_Slot | _Retiree] = [*self.slots, *self._retirees]
        for other in others:
            if other.sock is not None:
                with contextlib.suppress(OSError):
                    other.sock.close()
        mine = {id(lst) for lst in slot.listeners}
        for lst in self.listeners:
            if id(lst) not in mine:
                with contextlib.suppress(OSError):
                    lst.sock.close()
        if self.control_server is not None:
            self.control_server.close_in_child()
        if self.selector is not None:
            with contextlib.suppress(OSError):
                self.selector.close()
        set_process_label(slot.label)

    def _send(self, slot: _Slot, message: dict[str, Any]) -> bool:
        if slot.sock is None:
            return False
        try:
            slot.sock.send(control.encode_line(message))
        except OSError:
            return False
        return True

    def _on_worker_io(self, slot: _Slot) -> None:
        assert slot.sock is not None
        data = control.recv_ready(slot.sock)
        if data is None:
            return
        if not data:  # the worker closed its end: it is exiting; reaping does the rest
            self._close_worker_sock(slot)
            return
        slot.rbuf += data
        for line in control.pop_lines(slot.rbuf):
            try:
                event = json.loads(line)
            except ValueError:
                _log.warning("worker %s sent a malformed control line: %r", slot.label, line[:200])
                continue
            if isinstance(event, dict):
                self._on_worker_event(slot, event)

    def _on_worker_event(self, slot: _Slot, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            slot.ready = True
            _log.info("worker %s pid %d ready", slot.label, slot.pid)
            restart = self._restart
            if restart is not None and restart.current == slot.index:
                self._restart_slot_ready(restart, slot)
        elif kind == "reloaded":
            generation = event.get("generation")
            if event.get("ok") and isinstance(generation, int):
                slot.generation = generation
            pending = self._reload
            if pending is not None and slot.index in pending.waiting and generation == pending.generation:
                del pending.waiting[slot.index]
                pending.replies[slot.index] = {
                    "slot": slot.index,
                    "role": slot.role,
                    "pid": slot.pid,
                    "ok": bool(event.get("ok")),
                    "error": event.get("error"),
                }
                if not pending.waiting:
                    self._finish_reload()
        else:
            _log.debug("worker %s sent unknown event %r", slot.label, kind)

    def _close_worker_sock(self, slot: _Slot) -> None:
        if slot.sock is None:
            return
        assert self.selector is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(slot.sock)
        slot.sock.close()
        slot.sock = None

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            for slot in self.slots:
                if slot.pid == pid:
                    self._on_worker_exit(slot, code)
                    break
            else:
                for retiree in self._retirees:
                    if retiree.pid == pid:
                        self._on_retiree_exit(retiree, code)
                        break

    def _on_worker_exit(self, slot: _Slot, code: int) -> None:
        lifetime = time.monotonic() - slot.spawned_mono
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        self._close_worker_sock(slot)
        pid, slot.pid, slot.last_status = slot.pid, 0, code
        self.region.reset_gauges(slot.stats_index)
        self.region.slot(slot.stats_index).state = SlotState.EXITED
        if self._reload is not None and slot.index in self._reload.waiting:
            del self._reload.waiting[slot.index]
            self._reload.replies[slot.index] = {
                "slot": slot.index,
                "role": slot.role,
                "pid": pid,
                "ok": False,
                "error": f"worker exited ({how})",
            }
            if not self._reload.waiting:
                self._finish_reload()
        if self._stopping:
            _log.info("worker %s pid %d exited (%s)", slot.label, pid, how)
            return
        restart = self._restart
        if restart is not None and restart.current == slot.index and restart.old in self._retirees:
            self._abort_restart_slot(restart, slot, pid, f"exited before it was ready ({how})")
            return
        failed_boot = not slot.ready or lifetime < BOOT_WINDOW
        slot.boot_failures = slot.boot_failures + 1 if failed_boot else 0
        _log.error(
            "worker %s pid %d died after %.1f s (%s)%s",
            slot.label,
            pid,
            lifetime,
            how,
            " during boot" if failed_boot else "; replacing it",
        )
        if slot.boot_failures >= MAX_BOOT_FAILURES:
            self._begin_stop(
                f"worker {slot.label} failed to boot {slot.boot_failures} times in a row "
                f"(last: {how}); giving up. See the log above for the worker's error.",
                EX_WORKER_BOOT,
            )
            return
        # Back off a little only while a slot keeps failing at boot; a crash respawns at once.
        slot.respawn_at = time.monotonic() + (0.1 * slot.boot_failures if failed_boot else 0.0)

    def _check_workers(self) -> None:
        """Respawn due slots; SIGKILL workers whose heartbeat is too old."""
        assert self.config is not None
        now = time.monotonic()
        timeout = float(self.config.records.get("proxy.config.heartbeat.timeout"))
        if now >= self._next_sample:
            self._next_sample = now + RATE_PERIOD
            self._sample_rates(now)
        for retiree in self._retirees:
            if retiree.deadline and now >= retiree.deadline:
                _log.warning(
                    "old worker %s pid %d still draining after the shutdown timeout; killing it",
                    retiree.label,
                    retiree.pid,
                )
                retiree.deadline = now + 5.0
                with contextlib.suppress(ProcessLookupError):
                    os.kill(retiree.pid, signal.SIGKILL)
        restart = self._restart
        if restart is not None and restart.current is not None and now >= restart.boot_deadline:
            slot = self.slots[restart.current]
            if slot.pid and not slot.ready and restart.abort_reason is None:
                restart.abort_reason = f"did not report ready within {RESTART_BOOT_TIMEOUT:g} s"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        for slot in self.slots:
            if slot.pid == 0:
                if slot.respawn_at is not None and now >= slot.respawn_at and not self._stopping:
                    self._spawn(slot)
                continue
            if self._stopping:
                continue
            age = self._heartbeat_age(slot, now)
            if age > timeout:
                _log.error(
                    "worker %s pid %d missed its heartbeat for %.1f s (proxy.config.heartbeat.timeout %g); "
                    "killing it",
                    slot.label,
                    slot.pid,
                    age,
                    timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)

    def _heartbeat_age(self, slot: _Slot, now_mono: float) -> float:
        """Seconds since the worker's last heartbeat (since its fork before the first one)."""
        try:
            beat = self.region.slot(slot.stats_index).last_heartbeat
        except (IndexError, AttributeError):
            beat = 0.0
        return now_mono - max(beat, slot.spawned_mono)

    # ------------------------------------------------------------------ signals

    def _on_wakeup(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wakeup_r, 512):
                pass

    def _dispatch_signals(self) -> None:
        while self._sig_queue:
            signum = self._sig_queue.popleft()
            name = signal.Signals(signum).name[3:].lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_term(self) -> None:
        if self._stopping:
            self._kill_all_workers()
            return
        self._begin_stop("SIGTERM received: stopping", EX_OK)

    def handle_int(self) -> None:
        if self._stopping:
            self._kill_all_workers()
            return
        self._begin_stop("SIGINT received: stopping", EX_OK)

    def handle_quit(self) -> None:
        self._begin_stop("SIGQUIT received: stopping now", EX_OK)
        self._kill_all_workers()

    def handle_hup(self) -> None:
        _log.info("SIGHUP received: reloading the configuration")
        self.reload(None)

    def handle_chld(self) -> None:
        self.reap_workers()

    # ------------------------------------------------------------------ main loop

    def _main_loop(self) -> int:
        assert self.selector is not None
        while True:
            self._dispatch_signals()
            self.reap_workers()
            self._check_workers()
            self._check_reload_deadline()
            self._roll_logs()
            if self._stopping:
                if all(slot.pid == 0 for slot in self.slots) and not self._retirees:
                    break
                if time.monotonic() >= self._stop_deadline:
                    self._kill_all_workers()
            for key, mask in self.selector.select(TICK):
                key.data(mask)
        return self._finish_stop()

    def _roll_logs(self) -> None:
        if self._roller is None:
            return
        now = time.monotonic()
        if now < self._next_roll:
            return
        self._next_roll = now + 1.0
        try:
            self._roller.tick()
        except Exception:  # a log problem must never stop the master
            _log.exception("log rolling failed")

    def _begin_stop(self, reason: str, code: int) -> None:
        if self._stopping:
            return
        assert self.config is not None
        self._stopping = True
        self._exit_code = code
        (_log.error if code else _log.info)("%s", reason)
        timeout = float(self.config.records.get("proxy.config.stop.shutdown_timeout"))
        self._stop_deadline = time.monotonic() + timeout + STOP_GRACE
        for slot in self.slots:
            slot.respawn_at = None
            if slot.pid and not self._send(slot, {"cmd": "stop", "timeout": timeout}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        for retiree in self._retirees:
            if not retiree.deadline:
                self._stop_retiree(retiree, timeout)
        # After "stop" went out (so no worker spins on a dead listener for long): shutdown()
        # stops the shared listening sockets in every process, so new connections are refused
        # at once although the draining workers still hold the fds.
        self._close_listeners(shutdown=True)
        if self._restart is not None:
            self._finish_restart(error="tsproxy is stopping")

    def _kill_all_workers(self) -> None:
        workers: list[_Slot | _Retiree] = [*self.slots, *self._retirees]
        for w in workers:
            if w.pid:
                _log.warning("worker %s pid %d still running; killing it", w.label, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        self._stop_deadline = time.monotonic() + 5.0

    def _finish_stop(self) -> int:
        if self._reload is not None:
            self._reload.deadline = 0.0
            self._check_reload_deadline()
        _log.info("tsproxy master %d stopped", os.getpid())
        for responder in self._stop_waiters:
            responder.result({"stopped": True, "pid": os.getpid(), "exit_code": self._exit_code})
        return self._exit_code

    def _cleanup(self) -> None:
        self._close_listeners()
        if self.selector is not None:
            for slot in self.slots:
                self._close_worker_sock(slot)
            for retiree in self._retirees:
                self._close_retiree_sock(retiree)
        if self.control_server is not None:
            self.control_server.close(unlink=True)
            self.control_server = None
        if self._pidfile_written and self.pidfile is not None:
            if read_pidfile(self.pidfile) == os.getpid():
                with contextlib.suppress(OSError):
                    self.pidfile.unlink()
            self._pidfile_written = False
        if self._wakeup_w >= 0:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError):
                    signal.signal(sig, signal.SIG_DFL)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._wakeup_r = self._wakeup_w = -1
        if self.selector is not None:
            self.selector.close()
            self.selector = None

    # ------------------------------------------------------------------ reload

    def reload(self, responder: control.Responder | None) -> None:
        """Validate the config dir; if clean, tell every worker to switch to it."""
        from tsproxy.config import load_proxy_config, plugin_restart_notes

        def fail(code: int, message: str, data: dict[str, Any] | None = None) -> None:
            _log.error("reload failed: %s", message)
            if responder is not None:
                responder.error(code, message, data)

        if self._stopping:
            fail(control.E_BUSY, "tsproxy is stopping", {"exit_code": EX_UNAVAILABLE})
            return
        if self._reload is not None:
            fail(control.E_BUSY, "a reload is already in progress", {"exit_code": EX_UNAVAILABLE})
            return
        assert self.config is not None and self.state_dir is not None
        try:
            new = load_proxy_config(
                self.config_dir,
                self.ticket_keys,
                generation=self.generation + 1,
                session_cache=self.config.session_cache,
            )
        except ConfigError as exc:
            data = {"path": exc.path, "line": exc.line, "exit_code": EX_CONFIG}
            fail(control.E_CONFIG, str(exc), data)
            return
        except TSError as exc:
            fail(control.E_CONFIG, str(exc), {"exit_code": exit_code_for(exc)})
            return
        except Exception as exc:  # e.g. a file the proxy user may not read: never fatal here
            _log.exception("reload failed; the running configuration stays")
            fail(control.E_CONFIG, f"reload failed: {type(exc).__name__}: {exc}", {"exit_code": EX_CONFIG})
            return
        old = self.config
        changed = old.records.diff(new.records)
        restart = old.records.restart_required(new.records)
        fingerprints = self._config_files()
        files = sorted(
            name
            for name in set(fingerprints) | set(self._fingerprints)
            if _content(fingerprints.get(name)) != _content(self._fingerprints.get(name))
        )
        # Workers load plugins when they boot (as ATS loads plugin.config at start-up only):
        # a reload does not add, remove or re-initialise one, and says so.
        # Compared with what the workers loaded (at start or the last restart), not with the last
        # reload: a change stays listed until a restart has loaded it.
        loaded, loaded_code = self._plugins_loaded
        code_now = _plugin_code_hashes(new.plugins)
        changed_code = frozenset(Path(t) for t, h in code_now.items() if loaded_code.get(t, h) != h)
        plugins = plugin_restart_notes(loaded, new.plugins, changed_code)
        for warning in new.warnings:
            _log.warning("%s", warning)
        self.generation += 1
        self.config = new
        self._fingerprints = fingerprints
        if self._roller is not None:
            self._roller.set_policy(RollingPolicy.from_records(new.records))
        pending = _PendingReload(
            generation=self.generation,
            changed=[n for n in changed if n not in restart],
            restart_required=restart,
            files=files,
            plugins=plugins,
            warnings=list(new.warnings),
            waiting={},
            replies={},
            deadline=time.monotonic() + RELOAD_TIMEOUT,
            responder=responder,
        )
        self._reload = pending
        for slot in self.slots:
            if slot.pid and self._send(slot, {"cmd": "reload", "generation": self.generation}):
                pending.waiting[slot.index] = slot.pid
        if not pending.waiting:
            self._finish_reload()

    def _note_plugins_loaded(self) -> None:
        """Workers forked from now on import self.config's plugins, as their files are now."""
        assert self.config is not None
        self._plugins_loaded = (list(self.config.plugins), _plugin_code_hashes(self.config.plugins))

    def _config_files(self) -> dict[str, _Fingerprint]:
        skip = [p for p in (self.state_dir, self.log_dir) if p is not None]
        return _file_fingerprints(self.config_dir, skip, self._fingerprints)

    def _check_reload_deadline(self) -> None:
        pending = self._reload
        if pending is None or time.monotonic() < pending.deadline:
            return
        for index, pid in pending.waiting.items():
            slot = self.slots[index]
            pending.replies[index] = {
                "slot": index,
                "role": slot.role,
                "pid": pid,
                "ok": False,
                "error": f"no answer within {RELOAD_TIMEOUT:g} s",
            }
        pending.waiting.clear()
        self._finish_reload()

    def _finish_reload(self) -> None:
        pending, self._reload = self._reload, None
        if pending is None:
            return
        workers = [pending.replies[i] for i in sorted(pending.replies)]
        ok = all(w["ok"] for w in workers)
        result = {
            "ok": ok,
            "generation": pending.generation,
            "changed": pending.changed,
            "restart_required": pending.restart_required,
            "files": pending.files,
            "plugins_restart_required": pending.plugins,
            "warnings": pending.warnings,
            "workers": workers,
        }
        if ok:
            _log.info(
                "reloaded to generation %d: records changed %s; needs restart %s; files %s",
                pending.generation,
                pending.changed or "none",
                pending.restart_required or "none",
                pending.files or "none",
            )
            for note in pending.plugins:
                _log.warning("reload: %s", note)
        else:
            for w in workers:
                if not w["ok"]:
                    _log.error("reload: worker %s[%d] pid %d: %s", w["role"], w["slot"], w["pid"], w["error"])
        if pending.responder is not None:
            pending.responder.result(result)

    # ------------------------------------------------------------------ restart

    def restart(self, responder: control.Responder | None) -> None:
        """Replace the workers one at a time; the listeners stay open (see the module doc)."""
        busy = (
            "tsproxy is stopping"
            if self._stopping
            else "a restart is already in progress"
            if self._restart is not None
            else "a reload is in progress"
            if self._reload is not None
            else None
        )
        if busy is not None:
            _log.error("restart refused: %s", busy)
            if responder is not None:
                responder.error(control.E_BUSY, busy, {"exit_code": EX_UNAVAILABLE})
            return
        _log.info("restarting %d workers one at a time", len(self.slots))
        self._note_plugins_loaded()
        self._restart = _PendingRestart(
            todo=deque(s.index for s in self.slots), responder=responder, started=time.monotonic()
        )
        self._restart_next()

    def _restart_next(self) -> None:
        restart = self._restart
        assert restart is not None and self.selector is not None
        restart.current = restart.old = None
        while restart.todo:
            slot = self.slots[restart.todo.popleft()]
            if not slot.pid or not slot.ready or not self._free_stats:
                # No worker or one still booting: it runs this master's code already.
                restart.results.append(
                    {"slot": slot.index, "role": slot.role, "old_pid": None, "new_pid": slot.pid or None}
                )
                continue
            old = _Retiree(
                slot=slot.index,
                role=slot.role,
                pid=slot.pid,
                stats_index=slot.stats_index,
                sock=slot.sock,
                spawned_mono=slot.spawned_mono,
                spawned_wall=slot.spawned_wall,
                generation=slot.generation,
                rbuf=slot.rbuf,
            )
            if old.sock is not None:
                self.selector.modify(old.sock, selectors.EVENT_READ, lambda _m, r=old: self._on_retiree_io(r))
            slot.sock = None
            self._retirees.append(old)
            restart.pids.add(old.pid)
            restart.current, restart.old = slot.index, old
            restart.boot_deadline = time.monotonic() + RESTART_BOOT_TIMEOUT
            slot.stats_index = self._free_stats.pop(0)
            slot.boot_failures = 0
            self._spawn(slot)
            return
        self._check_restart_done()

    def _restart_slot_ready(self, restart: _PendingRestart, slot: _Slot) -> None:
        """The replacement in ``slot`` is ready: drain the old worker, go on with the next slot."""
        old = restart.old
        assert old is not None and self.config is not None
        restart.results.append(
            {"slot": slot.index, "role": slot.role, "old_pid": old.pid, "new_pid": slot.pid}
        )
        _log.info("worker %s: pid %d replaces pid %d, which now drains", slot.label, slot.pid, old.pid)
        if old in self._retirees and not old.deadline:
            self._stop_retiree(old, float(self.config.records.get("proxy.config.stop.shutdown_timeout")))
        self._restart_next()

    def _abort_restart_slot(self, restart: _PendingRestart, slot: _Slot, new_pid: int, how: str) -> None:
        """The replacement died before ``ready``: give the slot back to the old worker, stop here."""
        old = restart.old
        assert old is not None and self.selector is not None
        reason = restart.abort_reason or how
        self._free_stats.append(slot.stats_index)
        self._retirees.remove(old)
        restart.pids.discard(old.pid)
        slot.pid, slot.sock, slot.rbuf = old.pid, old.sock, old.rbuf
        slot.stats_index, slot.generation = old.stats_index, old.generation
        slot.spawned_mono, slot.spawned_wall = old.spawned_mono, old.spawned_wall
        slot.ready, slot.proc, slot.respawn_at = True, None, None
        if slot.sock is not None:
            self.selector.modify(slot.sock, selectors.EVENT_READ, lambda _m, s=slot: self._on_worker_io(s))
        restart.current = restart.old = None
        restart.todo.clear()
        self._finish_restart(
            error=f"new worker for {slot.label} (pid {new_pid}) {reason}; "
            f"the old worker pid {old.pid} keeps serving; restart stopped"
        )

    def _stop_retiree(self, retiree: _Retiree, timeout: float) -> None:
        retiree.deadline = time.monotonic() + timeout + STOP_GRACE
        sent = False
        if retiree.sock is not None:
            with contextlib.suppress(OSError):
                retiree.sock.send(control.encode_line({"cmd": "stop", "timeout": timeout}))
                sent = True
        if not sent:
            with contextlib.suppress(ProcessLookupError):
                os.kill(retiree.pid, signal.SIGTERM)

    def _on_retiree_io(self, retiree: _Retiree) -> None:
        assert retiree.sock is not None
        data = control.recv_ready(retiree.sock)
        if data is None:
            return
        if not data:
            self._close_retiree_sock(retiree)
        # Anything else an old worker says (a late "ready" or "reloaded") no longer matters.

    def _close_retiree_sock(self, retiree: _Retiree) -> None:
        if retiree.sock is None:
            return
        assert self.selector is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(retiree.sock)
        retiree.sock.close()
        retiree.sock = None

    def _on_retiree_exit(self, retiree: _Retiree, code: int) -> None:
        how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        _log.info("old worker %s pid %d exited (%s)", retiree.label, retiree.pid, how)
        self._close_retiree_sock(retiree)
        self._retirees.remove(retiree)
        self.region.reset_gauges(retiree.stats_index)
        self.region.slot(retiree.stats_index).state = SlotState.EXITED
        self._free_stats.append(retiree.stats_index)
        restart = self._restart
        if restart is not None:
            restart.pids.discard(retiree.pid)
            self._check_restart_done()

    def _check_restart_done(self) -> None:
        restart = self._restart
        if restart is not None and restart.current is None and not restart.todo and not restart.pids:
            self._finish_restart(error=None)

    def _finish_restart(self, error: str | None) -> None:
        restart, self._restart = self._restart, None
        if restart is None:
            return
        seconds = round(time.monotonic() - restart.started, 3)
        if error is None:
            _log.info("restart done: %d workers replaced in %.1f s", len(restart.results), seconds)
            if restart.responder is not None:
                restart.responder.result({"ok": True, "workers": restart.results, "seconds": seconds})
            return
        _log.error("restart failed: %s", error)
        if restart.responder is not None:
            code = control.E_BUSY if self._stopping else control.E_WORKERS
            exit_code = EX_UNAVAILABLE if self._stopping else EX_FAILURE
            data = {"exit_code": exit_code, "workers": restart.results}
            restart.responder.error(code, error, data)

    def _sample_rates(self, now: float) -> None:
        """Per worker process: handshakes/s and requests/s over the last RATE_PERIOD."""
        hs_id, req_id = METRIC_ID[HANDSHAKES_METRIC], METRIC_ID[REQUESTS_METRIC]
        for slot in self.slots:
            if not slot.pid:
                slot.rate_key, slot.rate_sample, slot.rates = (0, -1), None, None
                continue
            stats = self.region.slot(slot.stats_index)
            sample = (now, stats.get(hs_id), stats.get(req_id))
            prev = slot.rate_sample
            key = (slot.pid, slot.stats_index)
            if prev is not None and slot.rate_key == key and sample[0] > prev[0]:
                dt = sample[0] - prev[0]
                d_hs, d_req = sample[1] - prev[1], sample[2] - prev[2]
                # A negative delta means ``metric zero`` ran: no honest rate for that period.
                slot.rates = (d_hs / dt, d_req / dt) if d_hs >= 0 and d_req >= 0 else None
            else:
                slot.rates = None  # a new process: its first rate comes one period later
            slot.rate_key, slot.rate_sample = key, sample

    # ------------------------------------------------------------------ control methods

    def _dispatch(self, method: str, params: Any, responder: control.Responder) -> None:
        params = params if isinstance(params, dict) else {}
        if method == "status":
            responder.result(self.status())
        elif method == "stop":
            self._stop_waiters.append(responder)
            self._begin_stop("stop requested on the control socket", EX_OK)
        elif method == "reload":
            self.reload(responder)
        elif method == "restart":
            self.restart(responder)
        elif method in ("metric.get", "metric.zero", "metric.match"):
            self._metric(method, params, responder)
        else:
            responder.error(control.METHOD_NOT_FOUND, f"unknown method {method!r}")

    def _metric(self, method: str, params: dict[str, Any], responder: control.Responder) -> None:
        if method == "metric.match":
            regex = params.get("regex")
            if not isinstance(regex, str):
                responder.error(control.INVALID_PARAMS, "metric.match needs a 'regex' string")
                return
            try:
                metrics = self.region.match(regex)
            except re.error as exc:
                message = f"bad regex {regex!r}: {exc}"
                responder.error(control.INVALID_PARAMS, message, {"exit_code": EX_DATAERR})
                return
            responder.result({"metrics": [[name, value] for name, value in metrics]})
            return
        names = params.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            responder.error(control.INVALID_PARAMS, f"{method} needs a non-empty 'names' list")
            return
        ids: list[int] = []
        unknown: list[str] = []
        for name in names:
            try:
                ids.append(self.region.metric_id(name))
            except KeyError:
                unknown.append(name)
        if unknown:
            message = f"unknown metric {', '.join(unknown)}"
            responder.error(control.E_NOT_FOUND, message, {"exit_code": EX_DATAERR})
            return
        if method == "metric.zero":
            for metric_id in ids:
                self.region.zero(metric_id)
        responder.result({"metrics": [[n, self.region.sum(i)] for n, i in zip(names, ids, strict=True)]})

    def status(self) -> dict[str, Any]:
        now = time.time()
        master = {
            "role": "master",
            "pid": os.getpid(),
            "uptime": now - self.started_wall,
            "cpu_percent": self._cpu(self._proc, self.started_wall),
            "rss": self._rss(self._proc),
            "connections": None,
            "generation": self.generation,
        }
        workers = []
        for slot in self.slots:
            entry: dict[str, Any] = {
                "slot": slot.index,
                "role": slot.role,
                "pid": slot.pid or None,
                "ready": slot.ready,
                "uptime": now - slot.spawned_wall if slot.pid else None,
                "cpu_percent": None,
                "rss": None,
                "connections": None,
                "handshakes_per_s": None,
                "requests_per_s": None,
                "generation": slot.generation,
                "stats_slot": slot.stats_index,
                "ports": [lst.descriptor.describe() for lst in slot.listeners],
            }
            if slot.pid:
                if slot.proc is None or slot.proc.pid != slot.pid:
                    with contextlib.suppress(psutil.Error):
                        slot.proc = psutil.Process(slot.pid)
                        slot.proc.cpu_percent(None)
                if slot.proc is not None:
                    entry["cpu_percent"] = self._cpu(slot.proc, slot.spawned_wall)
                    entry["rss"] = self._rss(slot.proc)
                stats = self.region.slot(slot.stats_index)
                entry["connections"] = stats.get(METRIC_ID[CONNECTIONS_METRIC])
                entry["generation"] = max(slot.generation, stats.generation)
                if slot.rates is not None and slot.rate_key == (slot.pid, slot.stats_index):
                    entry["handshakes_per_s"] = round(slot.rates[0], 1)
                    entry["requests_per_s"] = round(slot.rates[1], 1)
            workers.append(entry)
        draining = [
            {
                "slot": r.slot,
                "role": r.role,
                "pid": r.pid,
                "uptime": now - r.spawned_wall,
                "connections": self.region.slot(r.stats_index).get(METRIC_ID[CONNECTIONS_METRIC]),
                "stats_slot": r.stats_index,
                "stopping": bool(r.deadline),
            }
            for r in self._retirees
        ]
        return {
            "config_dir": str(self.config_dir),
            "generation": self.generation,
            "stopping": self._stopping,
            "restarting": self._restart is not None,
            "rate_period": RATE_PERIOD,
            "master": master,
            "workers": workers,
            "draining": draining,
        }

    @staticmethod
    def _cpu(proc: psutil.Process, started_wall: float) -> float | None:
        try:
            value = float(proc.cpu_percent(None))
            if value == 0.0:  # first sample: fall back to the lifetime average
                times = proc.cpu_times()
                value = 100.0 * (times.user + times.system) / max(time.time() - started_wall, 1e-3)
            return round(value, 1)
        except psutil.Error:
            return None

    @staticmethod
    def _rss(proc: psutil.Process) -> int | None:
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return None
