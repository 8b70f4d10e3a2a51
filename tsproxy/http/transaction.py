"""The HTTP transaction's states and their transitions, sans-IO (h11's ``_state.py`` is the model).

Theory of operation
-------------------
One ``TransactionMachine`` is the life of the transactions of one client-side carrier (an HTTP/1
connection, later an HTTP/2 stream): ``HttpSM`` tells it what happened (an *event*: the request
head was parsed, the hooks of a stage finished, the remap found a rule, the origin connection is
ready, ...) and gets back what to do next (a *command*: run the next stage's hooks, remap,
connect, send the request head, answer 404, ...). The machine does no I/O and knows no sockets,
buffers or plugins: HttpSM does all of that, so the machine is unit-tested with plain events
(tests/test_transaction_machine.py).

The states, in the order of a transaction (ATS HttpSM's, with a hook stage per hook point)::

    IDLE --REQUEST_HEAD--> READ_REQUEST_HDR --HOOKS_DONE--> PRE_REMAP --HOOKS_DONE--> REMAP
    REMAP --REMAP_HIT--> POST_REMAP --HOOKS_DONE--> CONNECT --ORIGIN_READY--> SEND_REQUEST_HDR
    SEND_REQUEST_HDR --HOOKS_DONE--> WAIT_RESPONSE --RESPONSE_HEAD--> READ_RESPONSE_HDR
    READ_RESPONSE_HDR --HOOKS_DONE--> SEND_RESPONSE_HDR --HOOKS_DONE--> RESPONSE_BODY
    RESPONSE_BODY --RESPONSE_END--> DONE --KEEP_ALIVE--> IDLE   (or --CLOSE--> CLOSED)

and the ways out of the straight line: REMAP_MISS (404), a hook's RESPOND (synthetic answer,
before the request went out) or HOOK_ERROR (500), ORIGIN_FAILED (502/504 before the response head;
after it the response is cut: ABORT), RETRY (a pooled connection the origin had closed: connect
again), a local ERROR answer (400, 403, 501, 503 ...) and CLIENT_EOF (the client went away).
REQUEST_END (the request body is complete) may come in any live state: HTTP/1 streams the body
while the transaction goes on, and an origin may answer before the upload ends.

A (state, event) pair that is not in the table is a bug in the driver: ``fire`` raises
``TransactionError``. The table is a flat list indexed by ``state * N_EVENTS + event``, each entry
``next_state | command << 4``, so a transition costs one list index and two shifts (it runs a dozen
times per request on the hot path).
"""

from __future__ import annotations

import enum
from typing import Final


class TxnState(enum.IntEnum):
    IDLE = 0
    READ_REQUEST_HDR = 1
    PRE_REMAP = 2
    REMAP = 3
    POST_REMAP = 4
    CONNECT = 5
    SEND_REQUEST_HDR = 6
    WAIT_RESPONSE = 7
    READ_RESPONSE_HDR = 8
    SEND_RESPONSE_HDR = 9
    RESPONSE_BODY = 10
    DONE = 11
    CLOSED = 12


class TxnEvent(enum.IntEnum):
    REQUEST_HEAD = 0
    HOOKS_DONE = 1
    REMAP_HIT = 2
    REMAP_MISS = 3
    ORIGIN_READY = 4
    ORIGIN_FAILED = 5
    RETRY = 6
    RESPONSE_HEAD = 7
    RESPONSE_END = 8
    RESPOND = 9
    HOOK_ERROR = 10
    ERROR = 11
    REQUEST_END = 12
    CLIENT_EOF = 13
    KEEP_ALIVE = 14
    CLOSE = 15


class TxnCommand(enum.IntEnum):
    NONE = 0  # nothing to do now: wait for the next event
    RUN_HOOKS = 1  # run the hooks of the (new) state's hook point
    REMAP = 2
    CONNECT = 3  # get an origin connection (pool, or the OriginConnector)
    SEND_REQUEST = 4  # the request head (then its body) to the origin
    SEND_RESPONSE_HEAD = 5  # the response head to the client, then its body
    FINISH = 6  # the response ended: pool the origin connection, end the transaction
    SEND_404 = 7  # no remap rule
    SEND_502 = 8  # the origin failed before the response head (502, or 504 for a timeout)
    SEND_500 = 9  # a plugin failed
    SEND_SYNTHETIC = 10  # a hook's respond()
    SEND_ERROR = 11  # the driver's own local answer (its status)
    ABORT = 12  # cut the response (the head went out) or drop the connection


# The same numbers as plain ints: mypyc inlines Final ints, an enum member is an attribute lookup.
IDLE: Final = 0
READ_REQUEST_HDR: Final = 1
PRE_REMAP: Final = 2
REMAP: Final = 3
POST_REMAP: Final = 4
CONNECT: Final = 5
SEND_REQUEST_HDR: Final = 6
WAIT_RESPONSE: Final = 7
READ_RESPONSE_HDR: Final = 8
SEND_RESPONSE_HDR: Final = 9
RESPONSE_BODY: Final = 10
DONE: Final = 11
CLOSED: Final = 12
N_STATES: Final = 13

E_REQUEST_HEAD: Final = 0
E_HOOKS_DONE: Final = 1
E_REMAP_HIT: Final = 2
E_REMAP_MISS: Final = 3
E_ORIGIN_READY: Final = 4
E_ORIGIN_FAILED: Final = 5
E_RETRY: Final = 6
E_RESPONSE_HEAD: Final = 7
E_RESPONSE_END: Final = 8
E_RESPOND: Final = 9
E_HOOK_ERROR: Final = 10
E_ERROR: Final = 11
E_REQUEST_END: Final = 12
E_CLIENT_EOF: Final = 13
E_KEEP_ALIVE: Final = 14
E_CLOSE: Final = 15
N_EVENTS: Final = 16

C_NONE: Final = 0
C_RUN_HOOKS: Final = 1
C_REMAP: Final = 2
C_CONNECT: Final = 3
C_SEND_REQUEST: Final = 4
C_SEND_RESPONSE_HEAD: Final = 5
C_FINISH: Final = 6
C_SEND_404: Final = 7
C_SEND_502: Final = 8
C_SEND_500: Final = 9
C_SEND_SYNTHETIC: Final = 10
C_SEND_ERROR: Final = 11
C_ABORT: Final = 12

HOOK_STATES: Final = frozenset(
    {READ_REQUEST_HDR, PRE_REMAP, POST_REMAP, SEND_REQUEST_HDR, READ_RESPONSE_HDR, SEND_RESPONSE_HDR}
)
# The hook points where respond() may answer instead of the origin (the request has not gone out).
RESPOND_STATES: Final = frozenset({READ_REQUEST_HDR, PRE_REMAP, POST_REMAP})
LIVE_STATES: Final = frozenset(range(READ_REQUEST_HDR, DONE))  # a transaction in progress

_TRANSITIONS: dict[tuple[int, int], tuple[int, int]] = {
    (IDLE, E_REQUEST_HEAD): (READ_REQUEST_HDR, C_RUN_HOOKS),
    (DONE, E_REQUEST_HEAD): (READ_REQUEST_HDR, C_RUN_HOOKS),
    (READ_REQUEST_HDR, E_HOOKS_DONE): (PRE_REMAP, C_RUN_HOOKS),
    (PRE_REMAP, E_HOOKS_DONE): (REMAP, C_REMAP),
    (REMAP, E_REMAP_HIT): (POST_REMAP, C_RUN_HOOKS),
    (REMAP, E_REMAP_MISS): (DONE, C_SEND_404),
    (POST_REMAP, E_HOOKS_DONE): (CONNECT, C_CONNECT),
    (CONNECT, E_ORIGIN_READY): (SEND_REQUEST_HDR, C_RUN_HOOKS),
    (SEND_REQUEST_HDR, E_HOOKS_DONE): (WAIT_RESPONSE, C_SEND_REQUEST),
    (WAIT_RESPONSE, E_RETRY): (CONNECT, C_CONNECT),
    (WAIT_RESPONSE, E_RESPONSE_HEAD): (READ_RESPONSE_HDR, C_RUN_HOOKS),
    (READ_RESPONSE_HDR, E_HOOKS_DONE): (SEND_RESPONSE_HDR, C_RUN_HOOKS),
    (SEND_RESPONSE_HDR, E_HOOKS_DONE): (RESPONSE_BODY, C_SEND_RESPONSE_HEAD),
    (RESPONSE_BODY, E_RESPONSE_END): (DONE, C_FINISH),
    (DONE, E_KEEP_ALIVE): (IDLE, C_NONE),
}
for _s in RESPOND_STATES:
    _TRANSITIONS[(_s, E_RESPOND)] = (DONE, C_SEND_SYNTHETIC)
for _s in HOOK_STATES:
    _TRANSITIONS[(_s, E_HOOK_ERROR)] = (DONE, C_SEND_500)
for _s in (CONNECT, SEND_REQUEST_HDR, WAIT_RESPONSE):  # no response head yet: an error answer
    _TRANSITIONS[(_s, E_ORIGIN_FAILED)] = (DONE, C_SEND_502)
for _s in (READ_RESPONSE_HDR, SEND_RESPONSE_HDR, RESPONSE_BODY):  # the head is out (or held)
    _TRANSITIONS[(_s, E_ORIGIN_FAILED)] = (CLOSED, C_ABORT)
for _s in (IDLE, *LIVE_STATES):  # a local answer: before a request (a parse error) or in one
    _TRANSITIONS[(_s, E_ERROR)] = (DONE, C_SEND_ERROR)
for _s in LIVE_STATES:
    _TRANSITIONS[(_s, E_REQUEST_END)] = (_s, C_NONE)
for _s in (IDLE, *LIVE_STATES, DONE):
    _TRANSITIONS[(_s, E_CLIENT_EOF)] = (CLOSED, C_ABORT)
    _TRANSITIONS[(_s, E_CLOSE)] = (CLOSED, C_NONE)

_TABLE: Final[list[int]] = [-1] * (N_STATES * N_EVENTS)
for (_s, _e), (_n, _c) in _TRANSITIONS.items():
    _TABLE[_s * N_EVENTS + _e] = _n | _c << 4


class TransactionError(Exception):
    """An event the current state does not take (the driver's bug, never the peer's)."""


class TransactionMachine:
    """The current state of one carrier's transaction; ``fire`` moves it and says what to do."""

    __slots__ = ("request_done", "state")

    def __init__(self) -> None:
        self.state = IDLE
        self.request_done = False  # REQUEST_END seen for the current transaction

    def fire(self, event: int) -> int:
        """Take ``event``; the command for the driver (``C_*``). Raises TransactionError."""
        state = self.state
        entry = _TABLE[state * N_EVENTS + event]
        if entry < 0:
            raise TransactionError(f"{TxnEvent(event).name} in state {TxnState(state).name}")
        self.state = entry & 15
        if event == E_REQUEST_HEAD:
            self.request_done = False
        elif event == E_REQUEST_END:
            self.request_done = True
        return entry >> 4

    def accepts(self, event: int) -> bool:
        """``event`` is legal now (a pipelined REQUEST_HEAD is not while a response is going)."""
        return _TABLE[self.state * N_EVENTS + event] >= 0

    @property
    def live(self) -> bool:
        """A transaction is in progress (between REQUEST_HEAD and its answer)."""
        return READ_REQUEST_HDR <= self.state < DONE


__all__ = ["TransactionError", "TransactionMachine", "TxnCommand", "TxnEvent", "TxnState"]
