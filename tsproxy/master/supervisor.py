"""The supervisor: forks the workers, talks to them, reaps them, and runs the master's loop.

Theory of operation (gunicorn's arbiter, with ATS names): ``start`` forks one worker per slot
of the slot table. States: RUNNING -> STOPPING -> (return). The single-threaded main loop waits
in a selector on the signal wakeup pipe, each worker's control socketpair and the control
socket. Signal handlers only append the signal number to a queue; the loop calls the handler
(TERM, INT: stop, a second one kills; QUIT: stop now; HUP: reload; CHLD: reap). Invariants:

* A worker that dies while RUNNING is replaced at once in the same slot (its gauges reset).
  A slot whose worker dies before reporting ``ready`` or within ``BOOT_WINDOW`` seconds,
  ``MAX_BOOT_FAILURES`` times in a row, stops the master with EX_WORKER_BOOT.
* A worker whose heartbeat (in its stats slot) is older than ``proxy.config.heartbeat.timeout``
  is SIGKILLed and replaced.
* Stop: workers get ``stop`` with the shutdown timeout, leftovers are SIGKILLed
  ``STOP_GRACE`` seconds after it. After ``stop`` went out the listening sockets are
  ``shutdown()`` before the master closes its copies, so the kernel refuses new connections at
  once even though draining workers still hold the fds. The loop returns once every worker
  (and every restart's retiree) has exited; ``Master`` removes the pidfile and control socket.

Worker events (newline-delimited JSON on the socketpair): ``ready`` (a restart's replacement
then lets the restart go on) and ``reloaded`` (the reload in flight counts the answer). Each
fork first moves everything alive to the collector's permanent generation (``gc.freeze``), so
the pages the worker shares with the master stay shared.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from iocore.records.stats import SlotRole, SlotState
from tsproxy import control
from tsproxy.exitcodes import EX_OK, EX_SOFTWARE, EX_WORKER_BOOT
from tsproxy.logs import get_logger, set_process_label
from tsproxy.master.boot import close_listeners, user_label
from tsproxy.master.restart import Restarter
from tsproxy.master.slots import ET_NET, ET_SSL, Slot, describe_exit
from tsproxy.master.state import STOP_GRACE

if TYPE_CHECKING:
    from tsproxy.master.reload import Reloader
    from tsproxy.master.state import MasterState
    from tsproxy.master.status import Status

BOOT_WINDOW = 1.0  # a worker dying sooner than this after its fork failed to boot
MAX_BOOT_FAILURES = 5  # ... this many times in a row in one slot stops the master
TICK = 0.2

_log = get_logger("tsproxy.master")


class Supervisor:
    """The worker processes of the slot table, the signals and the main loop."""

    def __init__(self, state: MasterState, reloader: Reloader, status: Status) -> None:
        self.state = state
        self.reloader = reloader
        self.status = status
        self.restarter = Restarter(state, reloader, spawn=self.spawn, watch=self.watch)
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGHUP: self.handle_hup,
            signal.SIGCHLD: self.handle_chld,
            signal.SIGQUIT: self.handle_quit,
        }
        self._signals = SignalQueue(tuple(self._handlers))
        self._stop_deadline = 0.0
        self._exit_code = EX_OK
        self._stop_waiters: list[control.Responder] = []
        self._next_roll = 0.0

    def start(self) -> None:
        """Signals on, then one worker per slot."""
        state = self.state
        self._signals.install(state.selector)
        state.started_wall = time.time()
        self.status.prime()
        _log.info(
            "tsproxy master %d started as user %s: config %s, %d ET_NET + %d ET_SSL workers, ports %s",
            os.getpid(),
            user_label(),
            state.config_dir,
            state.table.count(ET_NET),
            state.table.count(ET_SSL),
            " ".join(lst.descriptor.describe() for lst in state.listeners) or "(none)",
        )
        for slot in state.table.slots:
            self.spawn(slot)

    # ------------------------------------------------------------------ workers

    def spawn(self, slot: Slot) -> None:
        from tsproxy.worker import WorkerBoot

        state = self.state
        config, selector, region = state.config, state.selector, state.table.region
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
                region.claim_slot(
                    slot.stats_index,
                    os.getpid(),
                    int(SlotRole[slot.role]),
                    time.monotonic(),
                    state.generation,
                )
                boot = WorkerBoot(
                    role=slot.role,
                    slot=slot.stats_index,
                    config_dir=state.config_dir,
                    config=config,
                    listeners=slot.listeners,
                    stats=region,
                    control=worker_end,
                    plugin_loader=state.plugin_loader,
                )
                from tsproxy.worker import worker_main

                code = worker_main(boot)
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
        slot.generation = state.generation
        slot.spawned_mono = time.monotonic()
        slot.spawned_wall = time.time()
        slot.proc = None
        selector.register(master_end, selectors.EVENT_READ, lambda _m, s=slot: self._on_worker_io(s))
        where = "" if slot.stats_index == slot.index else f" (stats slot {slot.stats_index})"
        _log.info("spawned worker %s pid %d%s", slot.label, pid, where)

    def watch(self, slot: Slot) -> None:
        """The selector hands ``slot``'s (registered) socket to this slot's worker I/O again."""
        assert slot.sock is not None
        self.state.selector.modify(slot.sock, selectors.EVENT_READ, lambda _m, s=slot: self._on_worker_io(s))

    def _after_fork_in_child(self, slot: Slot) -> None:
        """In the forked worker: default signals, and close every fd that is not its own."""
        state = self.state
        self._signals.reset_in_child()
        for other in state.table.processes():
            if other.sock is not None:
                with contextlib.suppress(OSError):
                    other.sock.close()
        mine = {id(lst) for lst in slot.listeners}
        for lst in state.listeners:
            if id(lst) not in mine:
                with contextlib.suppress(OSError):
                    lst.sock.close()
        if state.control_server is not None:
            state.control_server.close_in_child()
        if state.has_selector:
            with contextlib.suppress(OSError):
                state.selector.close()
        set_process_label(slot.label)

    def _on_worker_io(self, slot: Slot) -> None:
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

    def _on_worker_event(self, slot: Slot, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            slot.ready = True
            _log.info("worker %s pid %d ready", slot.label, slot.pid)
            self.restarter.on_worker_ready(slot)
        elif kind == "reloaded":
            self.reloader.on_reloaded(slot, event)
        else:
            _log.debug("worker %s sent unknown event %r", slot.label, kind)

    def _close_worker_sock(self, slot: Slot) -> None:
        if slot.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.state.selector.unregister(slot.sock)
        slot.sock.close()
        slot.sock = None

    def reap_workers(self) -> None:
        table = self.state.table
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
            for slot in table.slots:
                if slot.pid == pid:
                    self._on_worker_exit(slot, code)
                    break
            else:
                for retiree in table.retirees:
                    if retiree.pid == pid:
                        self.restarter.on_retiree_exit(retiree, code)
                        break

    def _on_worker_exit(self, slot: Slot, code: int) -> None:
        region = self.state.table.region
        lifetime = time.monotonic() - slot.spawned_mono
        how = describe_exit(code)
        self._close_worker_sock(slot)
        pid, slot.pid = slot.pid, 0
        region.reset_gauges(slot.stats_index)
        region.slot(slot.stats_index).state = SlotState.EXITED
        self.reloader.on_worker_exit(slot, pid, how)
        if self.state.stopping:
            _log.info("worker %s pid %d exited (%s)", slot.label, pid, how)
            return
        if self.restarter.on_worker_exit(slot, pid, how):
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
            self.begin_stop(
                f"worker {slot.label} failed to boot {slot.boot_failures} times in a row "
                f"(last: {how}); giving up. See the log above for the worker's error.",
                EX_WORKER_BOOT,
            )
            return
        # Back off a little only while a slot keeps failing at boot; a crash respawns at once.
        slot.respawn_at = time.monotonic() + (0.1 * slot.boot_failures if failed_boot else 0.0)

    def _check_workers(self) -> None:
        """Respawn due slots; SIGKILL workers whose heartbeat is too old."""
        state = self.state
        now = time.monotonic()
        timeout = float(state.config.records.get("proxy.config.heartbeat.timeout"))
        self.status.maybe_sample(now)
        self.restarter.check(now)
        for slot in state.table.slots:
            if slot.pid == 0:
                if slot.respawn_at is not None and now >= slot.respawn_at and not state.stopping:
                    self.spawn(slot)
                continue
            if state.stopping:
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

    def _heartbeat_age(self, slot: Slot, now_mono: float) -> float:
        """Seconds since the worker's last heartbeat (since its fork before the first one)."""
        try:
            beat = self.state.table.region.slot(slot.stats_index).last_heartbeat
        except (IndexError, AttributeError):
            beat = 0.0
        return now_mono - max(beat, slot.spawned_mono)

    # ------------------------------------------------------------------ signals

    def _dispatch_signals(self) -> None:
        while (signum := self._signals.pop()) is not None:
            handler = self._handlers.get(signum)
            if handler is not None:
                handler()

    def handle_term(self) -> None:
        if self.state.stopping:
            self.kill_all_workers()
            return
        self.begin_stop("SIGTERM received: stopping", EX_OK)

    def handle_int(self) -> None:
        if self.state.stopping:
            self.kill_all_workers()
            return
        self.begin_stop("SIGINT received: stopping", EX_OK)

    def handle_quit(self) -> None:
        self.begin_stop("SIGQUIT received: stopping now", EX_OK)
        self.kill_all_workers()

    def handle_hup(self) -> None:
        _log.info("SIGHUP received: reloading the configuration")
        self.reloader.reload(None)

    def handle_chld(self) -> None:
        self.reap_workers()

    # ------------------------------------------------------------------ main loop

    def main_loop(self) -> int:
        """Supervise until every worker has exited after a stop; returns the exit code."""
        state, table = self.state, self.state.table
        selector = state.selector
        while True:
            self._dispatch_signals()
            self.reap_workers()
            self._check_workers()
            self.reloader.check_deadline()
            self._roll_logs()
            if state.stopping:
                if all(slot.pid == 0 for slot in table.slots) and not table.retirees:
                    break
                if time.monotonic() >= self._stop_deadline:
                    self.kill_all_workers()
            for key, mask in selector.select(TICK):
                key.data(mask)
        return self._finish_stop()

    def _roll_logs(self) -> None:
        roller = self.state.roller
        if roller is None:
            return
        now = time.monotonic()
        if now < self._next_roll:
            return
        self._next_roll = now + 1.0
        try:
            roller.tick()
        except Exception:  # a log problem must never stop the master
            _log.exception("log rolling failed")

    def request_stop(self, responder: control.Responder) -> None:
        """``stop`` on the control socket: answered once the master has stopped."""
        self._stop_waiters.append(responder)
        self.begin_stop("stop requested on the control socket", EX_OK)

    def begin_stop(self, reason: str, code: int) -> None:
        state = self.state
        if state.stopping:
            return
        state.stopping = True
        self._exit_code = code
        (_log.error if code else _log.info)("%s", reason)
        timeout = state.shutdown_timeout()
        self._stop_deadline = time.monotonic() + timeout + STOP_GRACE
        for slot in state.table.slots:
            slot.respawn_at = None
            if slot.pid and not slot.send({"cmd": "stop", "timeout": timeout}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        self.restarter.stop_retirees(timeout)
        # After "stop" went out (so no worker spins on a dead listener for long): shutdown()
        # stops the shared listening sockets in every process, so new connections are refused
        # at once although the draining workers still hold the fds.
        close_listeners(state, shutdown=True)
        self.restarter.finish(error="tsproxy is stopping")

    def kill_all_workers(self) -> None:
        for w in self.state.table.processes():
            if w.pid:
                _log.warning("worker %s pid %d still running; killing it", w.label, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        self._stop_deadline = time.monotonic() + 5.0

    def _finish_stop(self) -> int:
        self.reloader.finish_now()
        _log.info("tsproxy master %d stopped", os.getpid())
        for responder in self._stop_waiters:
            responder.result({"stopped": True, "pid": os.getpid(), "exit_code": self._exit_code})
        return self._exit_code

    # ------------------------------------------------------------------ cleanup

    def close_sockets(self) -> None:
        """At the end: the control sockets of every worker and retiree."""
        table = self.state.table
        for slot in table.slots:
            self._close_worker_sock(slot)
        for retiree in table.retirees:
            self.restarter.close_retiree_sock(retiree)

    def restore_signals(self) -> None:
        """At the end: default signal handling, and the wakeup pipe closed."""
        self._signals.restore()


class SignalQueue:
    """Signal handlers that only enqueue the signal number (never log, never act), and the
    wakeup pipe (``signal.set_wakeup_fd``) that makes the main loop's selector return."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self._queue: deque[int] = deque()
        self._wakeup_r = -1
        self._wakeup_w = -1

    def install(self, selector: selectors.BaseSelector) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_wakeup)

    def pop(self) -> int | None:
        """The oldest signal not yet handled, or None."""
        return self._queue.popleft() if self._queue else None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._queue.append(signum)

    def _on_wakeup(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wakeup_r, 512):
                pass

    def reset_in_child(self) -> None:
        """In a forked worker: default handlers, and the master's wakeup pipe closed."""
        signal.set_wakeup_fd(-1)
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def restore(self) -> None:
        """Default signal handling again, and the wakeup pipe closed (when installed)."""
        if self._wakeup_w < 0:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for sig in self.signals:
            with contextlib.suppress(ValueError):
                signal.signal(sig, signal.SIG_DFL)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        self._wakeup_r = self._wakeup_w = -1
