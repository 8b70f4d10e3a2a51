"""The master process: binds listeners, forks and supervises workers, serves the control socket.

Theory of operation (gunicorn's arbiter, with ATS names): ``Master.__init__`` only stores
arguments. ``run()`` loads and validates the config, binds every port of
``proxy.config.http.server_ports``, refuses to start when another master holds the pidfile,
creates the control socket and the shared StatsRegion, then forks
``proxy.config.exec_thread.limit`` ET_NET and ``proxy.config.ssl.number.threads`` ET_SSL
workers, one stats slot each, and supervises them until stopped. One module per job, each over
the shared state (``state.MasterState``) and its slot table (``slots.SlotTable``):

* ``boot``: directories, config, privilege checks, listeners, control socket, pidfile, the
  switch to ``proxy.config.admin.user_id``.
* ``supervisor``: fork, worker I/O, reaping and respawn, heartbeats, signals, the main loop,
  stop.
* ``reload``: validate the config directory, then switch every worker to it.
* ``restart``: replace the workers one at a time while the listeners stay open.
* ``status``: the ``status`` and ``metric.*`` control methods, per-worker rates, CPU and RSS.
* ``arbiter``: ``Master``, which wires them and routes the control methods.

This package re-exports the names the CLI and the tests use.
"""

from __future__ import annotations

from tsproxy.master.arbiter import Master
from tsproxy.master.boot import (
    PIDFILE_NAME,
    PortInUseError,
    RunAs,
    StartupError,
    is_live_master,
    read_pidfile,
    resolve_run_as,
    write_pidfile_atomic,
)
from tsproxy.master.reload import RELOAD_TIMEOUT
from tsproxy.master.restart import RESTART_BOOT_TIMEOUT
from tsproxy.master.slots import ET_NET, ET_SSL
from tsproxy.master.state import STOP_GRACE
from tsproxy.master.status import RATE_PERIOD

__all__ = [
    "ET_NET",
    "ET_SSL",
    "PIDFILE_NAME",
    "RATE_PERIOD",
    "RELOAD_TIMEOUT",
    "RESTART_BOOT_TIMEOUT",
    "STOP_GRACE",
    "Master",
    "PortInUseError",
    "RunAs",
    "StartupError",
    "is_live_master",
    "read_pidfile",
    "resolve_run_as",
    "write_pidfile_atomic",
]
