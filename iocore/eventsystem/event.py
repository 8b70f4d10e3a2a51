"""Continuations, events and actions: the vocabulary of the event system (ATS I_Continuation.h,
I_Event.h).

A Continuation is a handler plus its state; the event system calls ``handle_event(event, data)``.
An Event is a scheduled call of a continuation (immediate, after a delay, or periodic); it is also
the Action returned to the scheduler's caller, so ``cancel()`` stops a call that has not happened
yet. Event codes are plain ints (cheap to compare on hot paths), named as in ATS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

# Handler return codes (ATS EVENT_DONE / EVENT_CONT / EVENT_ERROR).
EVENT_NONE = 0
EVENT_IMMEDIATE = 1
EVENT_INTERVAL = 2
EVENT_ERROR = 3
EVENT_CONT = 4
EVENT_DONE = 5

# VConnection events (ATS I_VConnection.h).
VC_EVENT_READ_READY = 100
VC_EVENT_WRITE_READY = 101
VC_EVENT_READ_COMPLETE = 102
VC_EVENT_WRITE_COMPLETE = 103
VC_EVENT_EOS = 104
VC_EVENT_ERROR = 105
VC_EVENT_INACTIVITY_TIMEOUT = 106
VC_EVENT_ACTIVE_TIMEOUT = 107

# Net processor events (ATS I_NetProcessor.h).
NET_EVENT_OPEN = 200
NET_EVENT_OPEN_FAILED = 201
NET_EVENT_ACCEPT = 202

EVENT_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith(("EVENT_", "VC_EVENT_", "NET_EVENT_")) and isinstance(value, int)
}

Handler = Callable[[int, Any], Any]


def _no_handler(event: int, data: Any) -> Any:
    raise RuntimeError(f"a continuation got {EVENT_NAMES.get(event, event)} with no handler")


def ignore_event(event: int, data: Any) -> Any:
    """The handler of a continuation that is done: late events are dropped."""
    return None


@mypyc_attr(allow_interpreted_subclasses=True)
class Continuation:
    """Something the event system can call back: ``handler(event, data)``.

    Subclasses set ``self.handler`` to the bound method for their current state, so a state
    machine's state is simply which method handles the next event (ATS SET_HANDLER).

    A bound method of the object itself makes a reference cycle, which only Python's cycle
    collector can free. So a per-connection continuation, once done, sets its handler to
    ``ignore_event`` (its ATS ``free()``) and is freed the moment the last reference goes; the
    default handler is a plain function for the same reason. A per-connection continuation
    with one handler for life may override ``handle_event`` instead (the HTTP client session):
    no bound method to hold, no cycle to break.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler if handler is not None else _no_handler

    def handle_event(self, event: int, data: Any = None) -> Any:
        return self.handler(event, data)

    def set_handler(self, handler: Handler) -> None:
        self.handler = handler


class Event:
    """A scheduled callback; doubles as the cancellable Action handed to the scheduler's caller."""

    __slots__ = ("callback_event", "cancelled", "cont", "cookie", "period", "timeout_at")

    def __init__(
        self, cont: Continuation, callback_event: int, cookie: Any, timeout_at: float, period: float
    ):
        self.cont = cont
        self.callback_event = callback_event
        self.cookie = cookie
        self.timeout_at = timeout_at
        self.period = period
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the call if it has not run yet (and any later periodic runs)."""
        self.cancelled = True

    def __lt__(self, other: Event) -> bool:
        return self.timeout_at < other.timeout_at
