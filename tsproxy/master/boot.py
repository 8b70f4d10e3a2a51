"""Boot: the master's directories, config, listening sockets, pidfile and user switch.

Theory of operation: ``Boot.start`` runs once, before any worker exists, in an order that
matters when tsproxy is started as root:

1. The state and log directories, from records.config alone: started as root, nothing may be
   written into them (the development certificate, made while loading the config, included)
   before they are known to be safe (tsproxy.safefs).
2. The config (validated), logging, the log roller; then, as root, a forked child switched to
   ``proxy.config.admin.user_id`` tries to read everything that user reads later (reloads read
   the configuration as it, workers import their plugins as it), so groups and ACLs count.
   ``#-1`` keeps root, with a warning.
3. The pidfile: another live master holding it refuses the start. Then every port of
   ``proxy.config.http.server_ports`` is bound (PortInUseError names the port), the control
   socket is bound and the pidfile written (atomically: a link there is replaced, never
   followed).
4. The user switch (after binding, so privileged ports work); everything a worker imports
   lazily is imported first, while root can still read it.

Each step leaves in ``MasterState`` what ``Master``'s cleanup undoes when a later one fails:
the listeners are closed, the control socket and (our own) pidfile removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from iocore.net.ports import RECORD_NAME as SERVER_PORTS
from iocore.records.errors import ConfigError, TSError
from tsproxy import control
from tsproxy.compiled import stale_compiled_modules
from tsproxy.exitcodes import EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE
from tsproxy.logs import LogRoller, RollingPolicy, get_logger, set_process_label, setup_logging
from tsproxy.safefs import check_private_dir, make_dir, open_dir, read_file, write_atomic

if TYPE_CHECKING:
    from iocore.records.parser import RecordsConfig
    from tsproxy.master.state import MasterState

PIDFILE_NAME = "tsproxy.pid"
BACKLOG = 1024

_log = get_logger("tsproxy.master")


class StartupError(TSError):
    """The master cannot start; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PortInUseError(ConfigError):
    """A port of proxy.config.http.server_ports is already bound by someone else."""

    exit_code = EX_UNAVAILABLE


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


def resolve_run_as(records: RecordsConfig) -> RunAs | None:
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


def user_label() -> str:
    """This process's user, as the start line names it."""
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


def close_listeners(state: MasterState, *, shutdown: bool = False) -> None:
    """Close the master's listening sockets; ``shutdown`` first stops them for every process."""
    for lst in state.listeners:
        if shutdown:
            with contextlib.suppress(OSError):
                lst.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            lst.sock.close()
    state.listeners = []


class Boot:
    """Steps 1-4 of the module doc, and the pidfile's removal at the end."""

    def __init__(self, state: MasterState) -> None:
        self.state = state
        self.pidfile: Path | None = None
        self._pidfile_written = False

    def start(self, dispatch: control.Dispatch) -> None:
        """Everything before the workers; ``dispatch`` answers the control socket."""
        from iocore.records.parser import load_records
        from tsproxy.config import load_proxy_config

        state = self.state
        first = load_records(state.config_dir)
        state.state_dir = first.resolve_path("proxy.config.local_state_dir") or state.config_dir
        state.log_dir = first.resolve_path("proxy.config.log.logfile_dir")
        state.run_as = resolve_run_as(first)
        owner = (state.run_as.uid, state.run_as.gid) if state.run_as is not None else None
        if os.geteuid() == 0:
            allowed = {0} if state.run_as is None else {0, state.run_as.uid}
            for directory in state.private_dirs():
                check_private_dir(directory, allowed)
        try:
            make_dir(state.state_dir, owner)
            if state.log_dir is not None:
                make_dir(state.log_dir, owner)
        except OSError as exc:
            raise StartupError(f"cannot create {exc.filename}: {exc.strerror}", EX_CONFIG) from exc
        state.config = load_proxy_config(state.config_dir, None, generation=state.generation)
        # Reloads keep these keys (unless a ticket key file is configured), so session tickets
        # issued by any worker before a reload still resume after it.
        state.ticket_keys = state.config.ticket_keys
        try:
            level = state.log_level if state.log_level is not None else 20
            setup_logging(state.log_dir, level=level, owner=owner)
            if state.log_dir is not None:
                state.roller = LogRoller(state.log_dir, RollingPolicy.from_records(state.config.records))
        except OSError as exc:
            raise StartupError(f"cannot create {exc.filename}: {exc.strerror}", EX_CONFIG) from exc
        set_process_label("master")
        self._check_run_user()
        for warning in state.config.warnings:
            _log.warning("%s", warning)
        for source in stale_compiled_modules():
            _log.warning(
                "%s changed after it was compiled; the old compiled code runs until "
                "`pip install -e .` rebuilds it (or its .so is deleted)",
                source,
            )
        self.pidfile = state.state_dir / PIDFILE_NAME
        sock_path = control.socket_path(state.state_dir)
        other = read_pidfile(self.pidfile)
        if other is not None and is_live_master(other):
            raise StartupError(
                f"tsproxy is already running for config dir {state.config_dir} "
                f"(pid {other}, pidfile {self.pidfile})"
            )
        self._bind_listeners()
        state.selector = selectors.DefaultSelector()
        try:
            csock = control.bind_control_socket(sock_path)
        except TSError as exc:
            raise StartupError(
                f"tsproxy is already running for config dir {state.config_dir}: {exc}"
            ) from exc
        state.control_server = control.ControlServer(csock, sock_path, dispatch, state.selector)
        write_pidfile_atomic(self.pidfile, os.getpid())
        self._pidfile_written = True
        self._drop_privileges()

    def remove_pidfile(self) -> None:
        """Remove the pidfile if this master wrote it and it still names us."""
        if self._pidfile_written and self.pidfile is not None:
            if read_pidfile(self.pidfile) == os.getpid():
                with contextlib.suppress(OSError):
                    self.pidfile.unlink()
            self._pidfile_written = False

    def _bind_listeners(self) -> None:
        from tsproxy.worker import Listener

        state = self.state
        records = state.config.records
        line = records.line_of(SERVER_PORTS)
        for desc in state.config.ports:
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
                close_listeners(state)
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
            state.listeners.append(Listener(descriptor=desc, sock=sock))

    def _check_run_user(self) -> None:
        """Started as root: before anything is bound or written, make sure the user of
        proxy.config.admin.user_id can read what it reads later, or warn that ``#-1`` keeps
        root (step 2 of the module doc)."""
        state = self.state
        config = state.config
        if os.geteuid() != 0:
            return
        run_as = state.run_as
        if run_as is None:
            _log.warning(
                "running as root: proxy.config.admin.user_id is %r, so the master and the workers "
                "keep root; set it to an unprivileged user (the default is nobody)",
                str(config.records.get("proxy.config.admin.user_id")),
            )
            return
        records = config.records
        needed = [
            *filter(None, [Path(str(records.path)), records.resolve_path("proxy.config.url_remap.filename")]),
            config.ssl_params.multicert_filename,
            state.config_dir / "plugin.config",
            *self._plugin_sources(),
        ]
        problem, unwritable = _probe_as(run_as, needed, state.private_dirs())
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
        run_as = self.state.run_as
        if os.geteuid() != 0 or run_as is None:
            return
        # Everything a worker imports lazily must be loaded while we can still read it: the
        # interpreter's own files may not be readable by the new user (e.g. a Python under
        # /root). Workers fork from this process and inherit these modules.
        import encodings.idna  # noqa: F401  (getaddrinfo / SNI encoding)

        import tsproxy.worker  # noqa: F401
        from tsproxy.devcert import hand_over  # also for a reload falling back to the dev certificate

        hand_over(self.state.state_dir, run_as.uid, run_as.gid)
        try:
            _switch_to(run_as)
        except OSError as exc:
            raise StartupError(f"cannot switch to user {run_as.name!r}: {exc.strerror}", EX_NOPERM) from exc
        _log.info("switched to user %s (uid %d, gid %d)", run_as.name, run_as.uid, run_as.gid)

    def _plugin_sources(self) -> list[Path]:
        """The files the workers' plugins are imported from (found while still root)."""
        import importlib.util

        paths: list[Path] = []
        for spec in self.state.config.plugins:
            target = spec.target
            if target.endswith(".py") or "/" in target:
                paths.append(Path(target))
                continue
            with contextlib.suppress(Exception):  # a plugin that cannot be found: its worker says so
                found = importlib.util.find_spec(target)
                if found is not None and found.origin and os.path.isabs(found.origin):
                    paths.append(Path(found.origin))
        return paths
