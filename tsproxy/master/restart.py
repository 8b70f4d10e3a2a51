"""Rolling restart: replace the workers one at a time while the listeners stay open.

Theory of operation: ``restart`` (on the control socket, ``tsproxy restart``) walks the worker
slots in order. For each, the old worker becomes a ``Retiree`` (it keeps its socket and stats
slot and goes on serving), the slot takes a free stats slot and a replacement is forked into
it. Once the replacement says ``ready``, the old worker is sent ``stop`` (it stops accepting,
finishes its open transactions up to ``proxy.config.stop.shutdown_timeout``, closes idle
keep-alive connections) and the restart goes on with the next slot without waiting for the
drain; a retiree still alive ``STOP_GRACE`` seconds past the timeout is SIGKILLed. The answer
comes once every old worker has exited.

A replacement that dies before ``ready``, or stays silent ``RESTART_BOOT_TIMEOUT`` seconds
(then it is killed), aborts the restart: the old worker gets its slot back and keeps serving,
and the answer names the slot. A slot with no worker, or one still booting, is left alone
(it runs this master's code already). One restart at a time, none during a reload or a stop;
a stop that begins during a restart answers it with an error.

A restart forks the replacements from this master, so they run the code the master imported
when it started: it applies config (including restart-only records that a worker reads at
boot, like plugin.config's plugin_dir) and clears a worker's state, but a tsproxy *code*
upgrade needs a master restart (``tsproxy stop`` + ``tsproxy start``, or the supervisor's).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from iocore.records.stats import SlotState
from tsproxy import control
from tsproxy.exitcodes import EX_FAILURE, EX_UNAVAILABLE
from tsproxy.logs import get_logger
from tsproxy.master.slots import PendingRestart, Retiree, Slot, describe_exit
from tsproxy.master.state import STOP_GRACE

if TYPE_CHECKING:
    from tsproxy.master.reload import Reloader
    from tsproxy.master.state import MasterState

RESTART_BOOT_TIMEOUT = 30.0  # a replacement silent this long after its fork aborts a restart

_log = get_logger("tsproxy.master")


class Restarter:
    """The ``restart`` method: one PendingRestart at a time in the slot table, and the retirees.

    ``spawn`` forks a worker into a slot; ``watch`` hands a slot's socket back to the
    supervisor's worker I/O (after an abort)."""

    def __init__(
        self,
        state: MasterState,
        reloader: Reloader,
        spawn: Callable[[Slot], None],
        watch: Callable[[Slot], None],
    ) -> None:
        self.state = state
        self._reloader = reloader
        self._spawn = spawn
        self._watch = watch

    def restart(self, responder: control.Responder | None) -> None:
        """Replace the workers one at a time; the listeners stay open (see the module doc)."""
        state, table = self.state, self.state.table
        busy = (
            "tsproxy is stopping"
            if state.stopping
            else "a restart is already in progress"
            if table.restart is not None
            else "a reload is in progress"
            if table.reload is not None
            else None
        )
        if busy is not None:
            _log.error("restart refused: %s", busy)
            if responder is not None:
                responder.error(control.E_BUSY, busy, {"exit_code": EX_UNAVAILABLE})
            return
        _log.info("restarting %d workers one at a time", len(table.slots))
        self._reloader.note_plugins_loaded()
        table.restart = PendingRestart(
            todo=deque(s.index for s in table.slots), responder=responder, started=time.monotonic()
        )
        self._next()

    def _next(self) -> None:
        table = self.state.table
        restart = table.restart
        assert restart is not None
        restart.current = restart.old = None
        while restart.todo:
            slot = table.slots[restart.todo.popleft()]
            if not slot.pid or not slot.ready or not table.free_stats:
                # No worker or one still booting: it runs this master's code already.
                restart.results.append(
                    {"slot": slot.index, "role": slot.role, "old_pid": None, "new_pid": slot.pid or None}
                )
                continue
            old = Retiree(
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
                self.state.selector.modify(
                    old.sock, selectors.EVENT_READ, lambda _m, r=old: self._on_retiree_io(r)
                )
            slot.sock = None
            table.retirees.append(old)
            restart.pids.add(old.pid)
            restart.current, restart.old = slot.index, old
            restart.boot_deadline = time.monotonic() + RESTART_BOOT_TIMEOUT
            slot.stats_index = table.free_stats.pop(0)
            slot.boot_failures = 0
            self._spawn(slot)
            return
        self._check_done()

    def on_worker_ready(self, slot: Slot) -> None:
        """``slot``'s worker said ``ready``: if it is a replacement, drain the old worker and
        go on with the next slot."""
        table = self.state.table
        restart = table.restart
        if restart is None or restart.current != slot.index:
            return
        old = restart.old
        assert old is not None
        restart.results.append(
            {"slot": slot.index, "role": slot.role, "old_pid": old.pid, "new_pid": slot.pid}
        )
        _log.info("worker %s: pid %d replaces pid %d, which now drains", slot.label, slot.pid, old.pid)
        if old in table.retirees and not old.deadline:
            self.stop_retiree(old, self.state.shutdown_timeout())
        self._next()

    def on_worker_exit(self, slot: Slot, new_pid: int, how: str) -> bool:
        """``slot``'s worker exited; True when it was a replacement that died before ``ready``
        (then the slot is the old worker's again and the restart stops here)."""
        table = self.state.table
        restart = table.restart
        if restart is None or restart.current != slot.index or restart.old not in table.retirees:
            return False
        old = restart.old
        assert old is not None
        reason = restart.abort_reason or f"exited before it was ready ({how})"
        table.free_stats.append(slot.stats_index)
        table.retirees.remove(old)
        restart.pids.discard(old.pid)
        slot.pid, slot.sock, slot.rbuf = old.pid, old.sock, old.rbuf
        slot.stats_index, slot.generation = old.stats_index, old.generation
        slot.spawned_mono, slot.spawned_wall = old.spawned_mono, old.spawned_wall
        slot.ready, slot.proc, slot.respawn_at = True, None, None
        if slot.sock is not None:
            self._watch(slot)
        restart.current = restart.old = None
        restart.todo.clear()
        self.finish(
            error=f"new worker for {slot.label} (pid {new_pid}) {reason}; "
            f"the old worker pid {old.pid} keeps serving; restart stopped"
        )
        return True

    def check(self, now: float) -> None:
        """Each tick: SIGKILL retirees past their drain deadline, and a replacement silent past
        RESTART_BOOT_TIMEOUT (its exit then aborts the restart)."""
        table = self.state.table
        for retiree in table.retirees:
            if retiree.deadline and now >= retiree.deadline:
                _log.warning(
                    "old worker %s pid %d still draining after the shutdown timeout; killing it",
                    retiree.label,
                    retiree.pid,
                )
                retiree.deadline = now + 5.0
                with contextlib.suppress(ProcessLookupError):
                    os.kill(retiree.pid, signal.SIGKILL)
        restart = table.restart
        if restart is not None and restart.current is not None and now >= restart.boot_deadline:
            slot = table.slots[restart.current]
            if slot.pid and not slot.ready and restart.abort_reason is None:
                restart.abort_reason = f"did not report ready within {RESTART_BOOT_TIMEOUT:g} s"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)

    def stop_retirees(self, timeout: float) -> None:
        """At stop: every retiree not yet told to stop is told now."""
        for retiree in self.state.table.retirees:
            if not retiree.deadline:
                self.stop_retiree(retiree, timeout)

    def stop_retiree(self, retiree: Retiree, timeout: float) -> None:
        retiree.deadline = time.monotonic() + timeout + STOP_GRACE
        sent = False
        if retiree.sock is not None:
            with contextlib.suppress(OSError):
                retiree.sock.send(control.encode_line({"cmd": "stop", "timeout": timeout}))
                sent = True
        if not sent:
            with contextlib.suppress(ProcessLookupError):
                os.kill(retiree.pid, signal.SIGTERM)

    def _on_retiree_io(self, retiree: Retiree) -> None:
        assert retiree.sock is not None
        data = control.recv_ready(retiree.sock)
        if data is None:
            return
        if not data:
            self.close_retiree_sock(retiree)
        # Anything else an old worker says (a late "ready" or "reloaded") no longer matters.

    def close_retiree_sock(self, retiree: Retiree) -> None:
        if retiree.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.state.selector.unregister(retiree.sock)
        retiree.sock.close()
        retiree.sock = None

    def on_retiree_exit(self, retiree: Retiree, code: int) -> None:
        table = self.state.table
        _log.info("old worker %s pid %d exited (%s)", retiree.label, retiree.pid, describe_exit(code))
        self.close_retiree_sock(retiree)
        table.retirees.remove(retiree)
        table.region.reset_gauges(retiree.stats_index)
        table.region.slot(retiree.stats_index).state = SlotState.EXITED
        table.free_stats.append(retiree.stats_index)
        restart = table.restart
        if restart is not None:
            restart.pids.discard(retiree.pid)
            self._check_done()

    def _check_done(self) -> None:
        restart = self.state.table.restart
        if restart is not None and restart.current is None and not restart.todo and not restart.pids:
            self.finish(error=None)

    def finish(self, error: str | None) -> None:
        """Answer the restart in flight (if any): done, or failed with ``error``."""
        table = self.state.table
        restart, table.restart = table.restart, None
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
            stopping = self.state.stopping
            code = control.E_BUSY if stopping else control.E_WORKERS
            exit_code = EX_UNAVAILABLE if stopping else EX_FAILURE
            data = {"exit_code": exit_code, "workers": restart.results}
            restart.responder.error(code, error, data)
