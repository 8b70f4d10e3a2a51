"""HookChain: one plugin hook list run in order, each callback able to pause it (ATS APIHooks).

Theory of operation
-------------------
Every place where tsproxy fires plugin hooks (the TLS handshake's VCONN_START, CLIENT_HELLO,
SERVERNAME, CERT and VERIFY_CLIENT hooks, an origin connection's OUTBOUND_START and
VERIFY_SERVER, an HTTP transaction's READ_REQUEST_HDR … SEND_RESPONSE_HDR) has the same
contract, ATS's ``TSVConnReenable`` / ``TSHttpTxnReenable``:

* the callbacks of one hook id run in registration order, each exactly once;
* a callback that has not called ``reenable`` when it returns pauses the chain; the owner
  (a VC, a transaction) waits and the loop serves everyone else;
* ``reenable`` exactly once per invocation continues the chain: synchronously when called from
  inside the callback, otherwise the owner's ``resume`` callable is invoked, and the owner puts
  itself back on the loop (ATS ``readReschedule`` / ``schedule_imm``) and calls ``advance``;
* ``reenable(error=True)`` or an exception from a callback sets ``op`` to TERMINATE and stops the
  chain; ``request_tunnel`` sets TUNNEL (the owner decides what a tunnel means at its stage);
  ``stop`` ends the chain early without an error (a transaction hook answered locally);
* ``close`` is the owner going away while a callback is paused (ATS TS-4075: a client closing
  during a paused certificate hook): the chain never calls another callback, a later
  ``reenable`` is ignored, and ``close`` tells the owner whether a callback was paused, so it
  can deliver its "finished, failed" outcome from the loop rather than from inside its close.

States of one run: IDLE --start--> RUNNING --callback returns without reenable--> PAUSED
--reenable--> RUNNING … --list exhausted / TERMINATE / stop--> IDLE. ``op`` persists across
runs (a TLS tunnel requested at SERVERNAME applies when the handshake ends); the owner resets
it when its stage says so.

The chain is sans-IO: it calls callbacks and the ``resume`` callable, nothing else, and is
unit-tested with plain functions (tests/test_hook_chain.py). Owners build one lazily, only when
some plugin registered a hook they fire, so a proxy without plugins pays one dict truth test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from iocore.net.hooks import HookCallback, HookID, HookOp

ErrorReporter = Callable[[HookID, Exception], None]


class HookChain:
    """Runs the callbacks of one hook at a time for one subject (a VC, a transaction)."""

    __slots__ = (
        "_callbacks",
        "_in_call",
        "_index",
        "_on_error",
        "_resume",
        "active",
        "closed",
        "hook",
        "op",
        "subject",
        "tunnel_destination",
    )

    def __init__(
        self, subject: Any, resume: Callable[[], None], on_error: ErrorReporter | None = None
    ) -> None:
        self.subject = subject  # what each callback receives as its second argument
        self._resume = resume
        self._on_error = on_error
        self.hook: HookID | None = None  # the hook running (or last run)
        self._callbacks: tuple[HookCallback, ...] = ()
        self._index = 0
        self.active = False  # a callback was invoked and has not re-enabled yet
        self._in_call = False
        self.closed = False
        self.op = HookOp.DEFAULT
        self.tunnel_destination: str | None = None

    @property
    def running(self) -> bool:
        """A run is in progress (paused or between callbacks)."""
        return bool(self._callbacks)

    def start(self, hook: HookID, callbacks: tuple[HookCallback, ...]) -> bool:
        """Run ``callbacks`` for ``hook``; True when the run finished, False when paused."""
        self.hook = hook
        self._callbacks = callbacks
        self._index = 0
        return self.advance()

    def advance(self) -> bool:
        """Continue the run; True when it finished (read ``op``), False while a callback pauses it.

        Calling it with no run in progress, or after ``close``, returns True at once.
        """
        if self.active:
            return False
        hook = self.hook
        if not self._callbacks or hook is None:
            return True
        # self._callbacks is re-read each turn: ``append`` may grow it from inside a callback.
        while self._index < len(self._callbacks) and not self.closed and self.op is not HookOp.TERMINATE:
            callback = self._callbacks[self._index]
            self._index += 1
            self.active = True
            self._in_call = True
            try:
                callback(hook, self.subject)
            except Exception as exc:  # a plugin bug fails this subject, never the worker
                self.active = False
                self.op = HookOp.TERMINATE
                if self._on_error is not None:
                    self._on_error(hook, exc)
            finally:
                self._in_call = False
            if self.active:
                return False
        self._callbacks = ()
        self._index = 0
        return True

    def reenable(self, *, error: bool = False) -> bool:
        """The paused callback is done; False (and nothing happens) when none is paused."""
        if self.closed or not self.active:
            return False
        self.active = False
        if error:
            self.op = HookOp.TERMINATE
        if not self._in_call:
            self._resume()  # asynchronous: the owner continues from its loop
        return True

    def request_tunnel(self, destination: str | None) -> None:
        """TSVConnTunnel: what a tunnel means is the owner's call when the run ends."""
        self.op = HookOp.TUNNEL
        self.tunnel_destination = destination

    def stop(self) -> None:
        """End the run after the current callback re-enables (no later callback is called)."""
        self._index = len(self._callbacks)

    def append(self, callback: HookCallback) -> None:
        """A callback added to the running hook (TSHttpTxnHookAdd from inside a hook) runs too."""
        if self._callbacks:
            self._callbacks = (*self._callbacks, callback)

    def close(self) -> bool:
        """The owner is closing: no callback runs again; True when one was paused."""
        was_paused = self.active
        self.closed = True
        self.active = False
        self._callbacks = ()
        self._index = 0
        return was_paused

    def notify(self, hook: HookID, callbacks: tuple[HookCallback, ...]) -> None:
        """Notification hooks (VCONN_CLOSE, TXN_CLOSE): every callback once, no pausing."""
        self.hook = hook
        for callback in callbacks:
            try:
                callback(hook, self.subject)
            except Exception as exc:
                if self._on_error is not None:
                    self._on_error(hook, exc)
        self.active = False


__all__ = ["ErrorReporter", "HookChain"]
