"""EThread: one event loop per process (ATS I_EThread.h, UnixEThread.cc).

Theory of operation
-------------------
Each worker process runs exactly one EThread. An iteration of ``run`` does, in order:

1. run the immediate (ready) events queued by ``schedule_imm``;
2. run the *ready callbacks* registered by the net layer (``ready_callbacks``): these are the
   NetHandler's read/write ready lists, so a VC that was re-enabled while its data was already
   buffered (decrypted TLS bytes, a hook's reenable) is processed without waiting for epoll;
3. poll the selector (``selectors.DefaultSelector``) with a timeout up to the next timer, or
   zero when something is still ready; every readiness calls the callback stored as the
   registration's ``data`` with the event mask;
4. run the timers that are due (a binary heap; cancelled events are dropped lazily).

Invariants: callbacks never block; nothing here is thread-safe because nothing needs to be
(one loop, one thread). ``stop()`` makes ``run`` return after the current iteration.
"""

from __future__ import annotations

import heapq
import logging
import selectors
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from iocore.eventsystem.event import EVENT_IMMEDIATE, EVENT_INTERVAL, Continuation, Event

IOCallback = Callable[[int], None]
_log = logging.getLogger("tsproxy.eventsystem")


class EThread:
    """A single-threaded event loop: ready queue, timer heap and a selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._ready: deque[Event] = deque()
        self._timers: list[Event] = []
        self._running = False
        # Callables run once per loop iteration before polling; each returns True when it still
        # has work queued (so the poll must not sleep).
        self.ready_callbacks: list[Callable[[], bool]] = []
        # Callables run once per iteration after I/O dispatch (e.g. flushing coalesced writes).
        self.post_io_callbacks: list[Callable[[], None]] = []
        self.now = time.monotonic()

    # -- scheduling -----------------------------------------------------------------------
    def schedule_imm(self, cont: Continuation, event: int = EVENT_IMMEDIATE, cookie: Any = None) -> Event:
        ev = Event(cont, event, cookie, 0.0, 0.0)
        self._ready.append(ev)
        return ev

    def schedule_in(
        self, cont: Continuation, seconds: float, event: int = EVENT_INTERVAL, cookie: Any = None
    ) -> Event:
        ev = Event(cont, event, cookie, time.monotonic() + seconds, 0.0)
        heapq.heappush(self._timers, ev)
        return ev

    def schedule_every(
        self, cont: Continuation, period: float, event: int = EVENT_INTERVAL, cookie: Any = None
    ) -> Event:
        if period <= 0:
            raise ValueError("schedule_every needs a positive period")
        ev = Event(cont, event, cookie, time.monotonic() + period, period)
        heapq.heappush(self._timers, ev)
        return ev

    # -- I/O registration -----------------------------------------------------------------
    def register(self, fd: int, mask: int, callback: IOCallback) -> None:
        self.selector.register(fd, mask, callback)

    def modify(self, fd: int, mask: int, callback: IOCallback) -> None:
        self.selector.modify(fd, mask, callback)

    def unregister(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- the loop -------------------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait: float = 1.0) -> None:
        ready = self._ready
        for _ in range(len(ready)):
            ev = ready.popleft()
            if not ev.cancelled:
                self._dispatch(ev)
        busy = bool(ready)
        for cb in self.ready_callbacks:
            try:
                if cb():
                    busy = True
            except Exception:
                _log.exception("ready-list callback raised")
        if busy:
            timeout = 0.0
        elif self._timers:
            timeout = min(max(self._timers[0].timeout_at - time.monotonic(), 0.0), max_wait)
        else:
            timeout = max_wait
        events = self.selector.select(timeout)
        for key, mask in events:
            try:
                key.data(mask)
            except Exception:
                _log.exception("I/O callback for fd %d raised", key.fd)
        for post in self.post_io_callbacks:
            try:
                post()
            except Exception:
                _log.exception("post-I/O callback raised")
        now = self.now = time.monotonic()
        timers = self._timers
        while timers and timers[0].timeout_at <= now:
            ev = heapq.heappop(timers)
            if ev.cancelled:
                continue
            if ev.period:
                ev.timeout_at = now + ev.period
                heapq.heappush(timers, ev)
            self._dispatch(ev)

    @staticmethod
    def _dispatch(ev: Event) -> None:
        try:
            ev.cont.handle_event(ev.callback_event, ev.cookie)
        except Exception:
            _log.exception("event handler %r raised", ev.cont)

    def close(self) -> None:
        self.selector.close()
