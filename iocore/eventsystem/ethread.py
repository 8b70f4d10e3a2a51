"""EThread: one event loop per process (ATS I_EThread.h, UnixEThread.cc).

Theory of operation
-------------------
Each worker process runs exactly one EThread. An iteration of ``run`` does, in order:

1. run the immediate (ready) events queued by ``schedule_imm``;
2. run the *ready callbacks* registered by the net layer (``ready_callbacks``): the
   NetHandler's read ready list, so a VC that was re-enabled while its data was already
   buffered (decrypted TLS bytes, a hook's reenable) is processed without waiting for epoll;
3. poll (epoll directly where there is one, else ``selectors.DefaultSelector``) with a timeout
   up to the next timer, or zero when something is still ready (immediate events, a ready
   list, writes waiting for step 4); every readiness calls the callback registered for that fd
   with the event mask (``selectors.EVENT_READ`` / ``EVENT_WRITE``). A callback whose fd was
   unregistered earlier in the same poll is not called;
4. run the *post-I/O callbacks* (``post_io_callbacks``): the NetHandler's write ready list, so
   the writes of one iteration leave in one send per VC;
5. run the timers that are due (a binary heap; cancelled events are dropped lazily).

Invariants: callbacks never block; nothing here is thread-safe except ``call_soon_threadsafe``
(one loop, one thread): another thread (a plugin's helper pool) hands a callable over with it;
the callable is queued in a deque and a byte on a ``socketpair`` wakes the selector, whose
callback drains the pair and runs the queued callables on the loop. ``stop()`` makes ``run``
return after the current iteration; ``exit_callbacks`` then run once (flush buffers at exit).
"""

from __future__ import annotations

import heapq
import logging
import math
import select
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from iocore.eventsystem.event import EVENT_IMMEDIATE, EVENT_INTERVAL, Continuation, Event

IOCallback = Callable[[int], None]
_log = logging.getLogger("tsproxy.eventsystem")


class IOHandler(Protocol):
    """What the poller calls on readiness: ``on_io(mask)``. A NetVConnection registers itself
    (``register_handler``), so the poller holds the VC, not a bound method of it: 88 bytes per
    connection, and no new one each time the VC's interest mask changes."""

    def on_io(self, mask: int) -> None: ...


class _CallbackIO:
    """A plain callable registered with ``register``."""

    __slots__ = ("fn",)

    def __init__(self, fn: IOCallback) -> None:
        self.fn = fn

    def on_io(self, mask: int) -> None:
        self.fn(mask)


_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE
_HAVE_EPOLL = hasattr(select, "epoll")
_NOT_EPOLLIN = ~select.EPOLLIN if _HAVE_EPOLL else 0
_NOT_EPOLLOUT = ~select.EPOLLOUT if _HAVE_EPOLL else 0


class _SelectorsPoller:
    """The portable poller: ``selectors.DefaultSelector`` behind EThread's small interface."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def register(self, fd: int, mask: int, handler: IOHandler) -> None:
        self.selector.register(fd, mask, handler)

    def modify(self, fd: int, mask: int, handler: IOHandler | None) -> None:
        self.selector.modify(fd, mask, handler if handler is not None else self.selector.get_key(fd).data)

    def unregister(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            try:
                key.data.on_io(mask)
            except Exception:
                _log.exception("I/O callback for fd %d raised", key.fd)

    def close(self) -> None:
        self.selector.close()


class _EpollPoller:
    """epoll without the selectors layer: no SelectorKey per registration or per readiness,
    a dict from fd to callback, masks translated as selectors.EpollSelector does."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, IOHandler] = {}

    @staticmethod
    def _events(mask: int) -> int:
        return (select.EPOLLIN if mask & _EVENT_READ else 0) | (select.EPOLLOUT if mask & _EVENT_WRITE else 0)

    def register(self, fd: int, mask: int, handler: IOHandler) -> None:
        if fd in self.handlers:
            raise KeyError(f"fd {fd} is already registered")
        self.epoll.register(fd, self._events(mask))
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int, handler: IOHandler | None) -> None:
        if fd not in self.handlers:
            raise KeyError(f"fd {fd} is not registered")
        self.epoll.modify(fd, self._events(mask))
        if handler is not None:
            self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it

    def poll(self, timeout: float) -> None:
        # As selectors does: round a positive timeout up to a whole millisecond (no busy loop).
        try:
            ready = self.epoll.poll(math.ceil(timeout * 1e3) * 1e-3 if timeout > 0 else 0)
        except InterruptedError:
            return
        handlers = self.handlers
        for fd, ev in ready:
            handler = handlers.get(fd)
            if handler is None:
                continue  # unregistered by an earlier callback of this poll
            # HUP and ERR wake both directions, as in selectors.EpollSelector.
            mask = (_EVENT_WRITE if ev & _NOT_EPOLLIN else 0) | (_EVENT_READ if ev & _NOT_EPOLLOUT else 0)
            try:
                handler.on_io(mask)
            except Exception:
                _log.exception("I/O callback for fd %d raised", fd)

    def close(self) -> None:
        self.epoll.close()


class EThread:
    """A single-threaded event loop: ready queue, timer heap and a poller."""

    def __init__(self) -> None:
        self.poller: _EpollPoller | _SelectorsPoller = _EpollPoller() if _HAVE_EPOLL else _SelectorsPoller()
        self._ready: deque[Event] = deque()
        self._timers: list[Event] = []
        self._running = False
        # Callables run once per loop iteration before polling; each returns True when it still
        # has work queued (so the poll must not sleep).
        self.ready_callbacks: list[Callable[[], bool]] = []
        # Callables run once per iteration after I/O dispatch (e.g. flushing coalesced writes).
        self.post_io_callbacks: list[Callable[[], None]] = []
        # Callables run once when ``run`` returns (the loop stopped).
        self.exit_callbacks: list[Callable[[], None]] = []
        self.now = time.monotonic()
        # call_soon_threadsafe: made on first use (from the loop thread, see ensure_wakeup).
        self._soon: deque[Callable[[], None]] = deque()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

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

    def ensure_wakeup(self) -> None:
        """Create the wake-up socketpair; call on the loop thread before handing work to other
        threads (``call_soon_threadsafe`` does it itself if needed, but registering from the loop
        thread avoids touching the selector from two threads)."""
        if self._wake_r is not None:
            return
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        self.register(r.fileno(), selectors.EVENT_READ, self._on_wakeup)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on this loop's thread soon; safe to call from any thread."""
        self._soon.append(fn)
        w = self._wake_w
        if w is None:
            self.ensure_wakeup()
            w = self._wake_w
            assert w is not None
        try:
            w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: a wake-up is pending anyway
        except OSError:
            pass  # closed: the loop is gone

    def _on_wakeup(self, mask: int) -> None:
        r = self._wake_r
        if r is not None:
            try:
                while r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError, OSError):
                pass
        soon = self._soon
        for _ in range(len(soon)):
            fn = soon.popleft()
            try:
                fn()
            except Exception:
                _log.exception("call_soon_threadsafe callable raised")

    # -- I/O registration -----------------------------------------------------------------
    def register(self, fd: int, mask: int, callback: IOCallback) -> None:
        """Call ``callback(mask)`` when ``fd`` is ready (``mask``: selectors.EVENT_READ/WRITE)."""
        self.poller.register(fd, mask, _CallbackIO(callback))

    def register_handler(self, fd: int, mask: int, handler: IOHandler) -> None:
        """Call ``handler.on_io(mask)`` when ``fd`` is ready."""
        self.poller.register(fd, mask, handler)

    def modify(self, fd: int, mask: int, callback: IOCallback | None = None) -> None:
        """A new interest mask for ``fd``; the callback too when one is given."""
        self.poller.modify(fd, mask, _CallbackIO(callback) if callback is not None else None)

    def unregister(self, fd: int) -> None:
        self.poller.unregister(fd)

    # -- the loop -------------------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        try:
            while self._running:
                self.run_once()
        finally:
            callbacks, self.exit_callbacks = self.exit_callbacks, []
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    _log.exception("exit callback raised")

    def run_once(self, max_wait: float = 1.0) -> None:
        ready = self._ready
        for _ in range(len(ready)):
            ev = ready.popleft()
            if not ev.cancelled:
                self._dispatch(ev)
        busy = False
        for cb in self.ready_callbacks:
            try:
                if cb():
                    busy = True
            except Exception:
                _log.exception("ready-list callback raised")
        if busy or ready:  # ready: events left over, or scheduled by the ready callbacks
            timeout = 0.0
        elif self._timers:
            timeout = min(max(self._timers[0].timeout_at - time.monotonic(), 0.0), max_wait)
        else:
            timeout = max_wait
        self.poller.poll(timeout)
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
        self.poller.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
