"""``Master``: the parts of the master process wired together, and its life from start to exit.

Theory of operation: ``Master.__init__`` only stores arguments and makes the parts, each over
the one ``MasterState``: ``Boot`` (directories, config, listeners, control socket, pidfile,
user switch), ``Reloader``, ``Status``, and the ``Supervisor`` (workers, signals, main loop,
stop), which owns the ``Restarter``. ``run()`` boots, snapshots the config files for later
reloads, makes the slot table, starts the supervisor and runs its loop until stopped, then
cleans up in reverse: listeners, worker sockets, control socket, pidfile, signals, selector.
A ``TSError`` on the way is reported (to the log once logging is set up, else to stderr) and
becomes its exit code; anything else is an internal error (EX_SOFTWARE) that kills the
workers first.

The control socket's methods are routed here: ``status`` and ``metric.*`` (Status),
``stop`` (Supervisor), ``reload`` (Reloader), ``restart`` (Restarter).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iocore.records.errors import TSError
from tsproxy import control
from tsproxy.exitcodes import EX_SOFTWARE, exit_code_for
from tsproxy.logs import get_logger
from tsproxy.master.boot import Boot, close_listeners
from tsproxy.master.reload import Reloader
from tsproxy.master.state import MasterState
from tsproxy.master.status import Status
from tsproxy.master.supervisor import Supervisor

if TYPE_CHECKING:
    from tsproxy.master.state import PluginLoader

_log = get_logger("tsproxy.master")


class Master:
    """Supervisor of the worker processes. ``__init__`` is cheap; ``run()`` does everything."""

    def __init__(
        self,
        config_dir: Path,
        *,
        plugin_loader: PluginLoader | None = None,
        log_level: int | None = None,
    ) -> None:
        """``plugin_loader`` (``tsproxy.api.load_plugins``, injected by the CLI because the
        plugin facade sits above this layer) is handed to each worker in its WorkerBoot."""
        self.state = MasterState(Path(config_dir).absolute(), plugin_loader, log_level)
        self._boot = Boot(self.state)
        self._reloader = Reloader(self.state)
        self._status = Status(self.state)
        self._supervisor = Supervisor(self.state, self._reloader, self._status)

    def run(self) -> int:
        """Start, supervise until stopped, clean up. Returns the exit code."""
        try:
            self._start()
            return self._supervisor.main_loop()
        except TSError as exc:
            self._report_fatal(str(exc))
            return exit_code_for(exc)
        except Exception:
            _log.exception("internal error in the master")
            self._supervisor.kill_all_workers()
            return EX_SOFTWARE
        finally:
            self._cleanup()

    def _start(self) -> None:
        state = self.state
        self._boot.start(self._dispatch)
        self._reloader.snapshot()
        records = state.config.records
        state.table.make(
            int(records.get("proxy.config.exec_thread.limit")),
            int(records.get("proxy.config.ssl.number.threads")),
            state.listeners,
        )
        self._supervisor.start()

    def _report_fatal(self, message: str) -> None:
        if _log.handlers or get_logger().handlers:
            _log.error("%s", message)
        else:
            os.write(2, f"tsproxy: {message}\n".encode(errors="replace"))

    def _dispatch(self, method: str, params: Any, responder: control.Responder) -> None:
        params = params if isinstance(params, dict) else {}
        if method == "status":
            responder.result(self._status.status())
        elif method == "stop":
            self._supervisor.request_stop(responder)
        elif method == "reload":
            self._reloader.reload(responder)
        elif method == "restart":
            self._supervisor.restarter.restart(responder)
        elif method in ("metric.get", "metric.zero", "metric.match"):
            self._status.metric(method, params, responder)
        else:
            responder.error(control.METHOD_NOT_FOUND, f"unknown method {method!r}")

    def _cleanup(self) -> None:
        state = self.state
        close_listeners(state)
        if state.has_selector:
            self._supervisor.close_sockets()
        if state.control_server is not None:
            state.control_server.close(unlink=True)
            state.control_server = None
        self._boot.remove_pidfile()
        self._supervisor.restore_signals()
        state.close_selector()
