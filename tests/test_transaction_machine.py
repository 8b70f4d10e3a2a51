"""The sans-IO TransactionMachine (tsproxy/http/transaction.py): bytes through the parsers in,
events to the machine, commands and states out. No sockets, no event loop, no HttpSM.

``Driver`` plays HttpSM's part the simplest way: it feeds parser events to the machine, carries
out each command by firing the event the real step would (hooks finish or pause, remap hits or
misses, the origin is ready or fails) and records every (command, state) it saw.
"""

from __future__ import annotations

import pytest

from tsproxy.http.parser import (
    BodyDataReceived,
    HTTPProtocolError,
    MessageEnded,
    RequestParser,
    RequestReceived,
    ResponseParser,
    ResponseReceived,
)
from tsproxy.http.transaction import (
    C_ABORT,
    C_CONNECT,
    C_FINISH,
    C_NONE,
    C_REMAP,
    C_RUN_HOOKS,
    C_SEND_404,
    C_SEND_500,
    C_SEND_502,
    C_SEND_ERROR,
    C_SEND_REQUEST,
    C_SEND_RESPONSE_HEAD,
    C_SEND_SYNTHETIC,
    E_CLIENT_EOF,
    E_CLOSE,
    E_ERROR,
    E_HOOK_ERROR,
    E_HOOKS_DONE,
    E_KEEP_ALIVE,
    E_ORIGIN_FAILED,
    E_ORIGIN_READY,
    E_REMAP_HIT,
    E_REMAP_MISS,
    E_REQUEST_END,
    E_REQUEST_HEAD,
    E_RESPOND,
    E_RESPONSE_END,
    E_RESPONSE_HEAD,
    E_RETRY,
    TransactionError,
    TransactionMachine,
    TxnCommand,
    TxnEvent,
    TxnState,
)

S = TxnState

GET = b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
HEAD = b"HEAD /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Driver:
    """HttpSM's loop, without I/O: ``pause`` names the hook states whose hooks do not finish."""

    def __init__(
        self, *, remap_hit: bool = True, origin_ok: bool = True, pause: frozenset[int] = frozenset()
    ):
        self.m = TransactionMachine()
        self.remap_hit = remap_hit
        self.origin_ok = origin_ok
        self.pause = pause
        self.seen: list[tuple[str, str]] = []
        self.paused_in: S | None = None

    def fire(self, event: int) -> None:
        self.drive(self.m.fire(event))

    def drive(self, cmd: int) -> None:
        while cmd:
            self.seen.append((TxnCommand(cmd).name, S(self.m.state).name))
            if cmd == C_RUN_HOOKS:
                if self.m.state in self.pause:
                    self.paused_in = S(self.m.state)
                    return
                cmd = self.m.fire(E_HOOKS_DONE)
            elif cmd == C_REMAP:
                cmd = self.m.fire(E_REMAP_HIT if self.remap_hit else E_REMAP_MISS)
            elif cmd == C_CONNECT:
                cmd = self.m.fire(E_ORIGIN_READY if self.origin_ok else E_ORIGIN_FAILED)
            elif cmd == C_SEND_REQUEST:
                return  # wait for the response
            else:
                return  # a terminal command (answer, finish): the driver's own I/O

    def resume(self) -> None:
        """The paused hook re-enabled."""
        self.paused_in = None
        self.fire(E_HOOKS_DONE)

    def request(self, data: bytes) -> list[object]:
        """Feed the client's bytes; start on the first head, return the events left over."""
        events = RequestParser().feed(data)
        rest: list[object] = []
        for ev in events:
            if isinstance(ev, RequestReceived) and self.m.accepts(E_REQUEST_HEAD) and not rest:
                self.fire(E_REQUEST_HEAD)
            elif isinstance(ev, MessageEnded) and self.m.live and not rest:
                self.m.fire(E_REQUEST_END)
            elif isinstance(ev, BodyDataReceived) and not rest:
                pass  # body bytes are data, not a state change
            else:
                rest.append(ev)
        return rest

    def response(self, data: bytes, method: bytes = b"GET", eof: bool = False) -> None:
        parser = ResponseParser()
        parser.start(method)
        events = parser.feed(data)
        if eof:
            events += parser.feed_eof()
        for ev in events:
            if isinstance(ev, ResponseReceived):
                self.fire(E_RESPONSE_HEAD)
            elif isinstance(ev, MessageEnded):
                self.fire(E_RESPONSE_END)


def test_transaction_machine_get_through_to_keep_alive_done() -> None:
    d = Driver()
    assert d.request(GET) == []
    assert d.m.state == S.WAIT_RESPONSE and d.m.request_done
    d.response(OK)
    assert d.m.state == S.DONE
    assert [c for c, _ in d.seen] == [
        "RUN_HOOKS",  # READ_REQUEST_HDR
        "RUN_HOOKS",  # PRE_REMAP
        "REMAP",
        "RUN_HOOKS",  # POST_REMAP
        "CONNECT",
        "RUN_HOOKS",  # SEND_REQUEST_HDR
        "SEND_REQUEST",
        "RUN_HOOKS",  # READ_RESPONSE_HDR
        "RUN_HOOKS",  # SEND_RESPONSE_HDR
        "SEND_RESPONSE_HEAD",
        "FINISH",
    ]
    assert d.m.fire(E_KEEP_ALIVE) == C_NONE and d.m.state == S.IDLE
    assert d.m.accepts(E_REQUEST_HEAD)


def test_transaction_machine_head_request_has_no_body_but_finishes() -> None:
    d = Driver()
    d.request(HEAD)
    d.response(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", method=b"HEAD")
    assert d.seen[-1] == ("FINISH", "DONE")
    assert d.m.state == S.DONE


def test_transaction_machine_chunked_request_body_ends_in_any_live_state() -> None:
    d = Driver(pause=frozenset({S.SEND_REQUEST_HDR}))
    body = b"POST /up HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    events = RequestParser().feed(body)
    assert isinstance(events[0], RequestReceived)
    d.fire(E_REQUEST_HEAD)
    assert d.paused_in == S.SEND_REQUEST_HDR and not d.m.request_done
    assert [type(e) for e in events[1:]] == [BodyDataReceived, MessageEnded]
    assert d.m.fire(E_REQUEST_END) == C_NONE  # the body ended while a hook held the head
    assert d.m.state == S.SEND_REQUEST_HDR and d.m.request_done
    d.resume()
    assert d.m.state == S.WAIT_RESPONSE


@pytest.mark.parametrize(
    "stage",
    [
        S.READ_REQUEST_HDR,
        S.PRE_REMAP,
        S.POST_REMAP,
        S.SEND_REQUEST_HDR,
        S.READ_RESPONSE_HDR,
        S.SEND_RESPONSE_HDR,
    ],
)
def test_transaction_machine_hook_pauses_at_each_stage(stage: S) -> None:
    d = Driver(pause=frozenset({stage}))
    d.request(GET)
    if stage >= S.READ_RESPONSE_HDR:
        assert d.m.state == S.WAIT_RESPONSE and d.paused_in is None
        d.response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert d.paused_in == stage and d.m.state == stage
    before = len(d.seen)
    d.resume()
    assert d.paused_in is None and len(d.seen) > before
    assert d.m.state in (S.WAIT_RESPONSE, S.RESPONSE_BODY)


def test_transaction_machine_respond_at_read_request_hdr_skips_origin() -> None:
    d = Driver(pause=frozenset({S.READ_REQUEST_HDR}))
    d.request(GET)
    assert d.m.fire(E_RESPOND) == C_SEND_SYNTHETIC
    assert d.m.state == S.DONE
    assert "CONNECT" not in [c for c, _ in d.seen]


def test_transaction_machine_respond_refused_after_the_request_went_out() -> None:
    d = Driver(pause=frozenset({S.SEND_REQUEST_HDR}))
    d.request(GET)
    assert not d.m.accepts(E_RESPOND)
    with pytest.raises(TransactionError):
        d.m.fire(E_RESPOND)


def test_transaction_machine_remap_miss_gives_404_command() -> None:
    d = Driver(remap_hit=False)
    d.request(GET)
    assert d.seen[-1] == (TxnCommand(C_SEND_404).name, "DONE")
    assert d.m.fire(E_CLOSE) == C_NONE and d.m.state == S.CLOSED


def test_transaction_machine_origin_failure_gives_502_command() -> None:
    d = Driver(origin_ok=False)
    d.request(GET)
    assert d.seen[-1] == ("SEND_502", "DONE")
    # before the response head an origin failure in WAIT_RESPONSE is an answer too (502/504)
    d2 = Driver()
    d2.request(GET)
    assert d2.m.fire(E_ORIGIN_FAILED) == C_SEND_502


def test_transaction_machine_origin_eof_mid_body_closes() -> None:
    d = Driver()
    d.request(GET)
    d.response(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", eof=False)
    assert d.m.state == S.RESPONSE_BODY
    parser = ResponseParser()
    parser.start(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")
    with pytest.raises(HTTPProtocolError):  # the parser says the body is short
        parser.feed_eof()
    assert d.m.fire(E_ORIGIN_FAILED) == C_ABORT
    assert d.m.state == S.CLOSED
    assert not d.m.accepts(E_REQUEST_HEAD)


def test_transaction_machine_pooled_connection_closed_retries_once() -> None:
    d = Driver()
    d.request(GET)
    assert d.m.fire(E_RETRY) == C_CONNECT and d.m.state == S.CONNECT
    assert d.m.fire(E_ORIGIN_READY) == C_RUN_HOOKS and d.m.state == S.SEND_REQUEST_HDR


def test_transaction_machine_illegal_transition_raises() -> None:
    m = TransactionMachine()
    with pytest.raises(TransactionError, match="RESPONSE_HEAD in state IDLE"):
        m.fire(E_RESPONSE_HEAD)
    assert m.state == S.IDLE  # a refused event changes nothing
    m.fire(E_REQUEST_HEAD)
    with pytest.raises(TransactionError):
        m.fire(E_REQUEST_HEAD)  # a second head inside a transaction
    with pytest.raises(TransactionError):
        m.fire(E_RESPONSE_END)


def test_transaction_machine_pipelined_second_request_waits_for_the_first() -> None:
    d = Driver()
    rest = d.request(GET + GET)
    assert [type(e) for e in rest] == [RequestReceived, MessageEnded]
    assert d.m.state == S.WAIT_RESPONSE and not d.m.accepts(E_REQUEST_HEAD)
    d.response(OK)
    d.m.fire(E_KEEP_ALIVE)
    assert d.m.accepts(E_REQUEST_HEAD)
    assert d.m.fire(E_REQUEST_HEAD) == C_RUN_HOOKS and not d.m.request_done


def test_transaction_machine_hook_error_and_local_errors_answer() -> None:
    d = Driver(pause=frozenset({S.PRE_REMAP}))
    d.request(GET)
    assert d.m.fire(E_HOOK_ERROR) == C_SEND_500 and d.m.state == S.DONE
    m = TransactionMachine()
    assert m.fire(E_ERROR) == C_SEND_ERROR  # a malformed request, before any transaction
    m2 = TransactionMachine()
    m2.fire(E_REQUEST_HEAD)
    assert m2.fire(E_CLIENT_EOF) == C_ABORT and m2.state == S.CLOSED
    with pytest.raises(TransactionError):
        m2.fire(E_CLIENT_EOF)  # closed is closed


def test_transaction_machine_table_covers_every_enum_and_the_finish_path() -> None:
    assert [s.value for s in TxnState] == list(range(len(TxnState)))
    assert [e.value for e in TxnEvent] == list(range(len(TxnEvent)))
    assert (
        TxnCommand(C_FINISH).name == "FINISH"
        and TxnCommand(C_SEND_RESPONSE_HEAD).name == "SEND_RESPONSE_HEAD"
    )
    m = TransactionMachine()
    for event in (E_REQUEST_HEAD, E_HOOKS_DONE, E_HOOKS_DONE, E_REMAP_HIT, E_HOOKS_DONE):
        m.fire(event)
    assert m.state == S.CONNECT
    for event in (E_ORIGIN_READY, E_HOOKS_DONE, E_REQUEST_END, E_RESPONSE_HEAD, E_HOOKS_DONE, E_HOOKS_DONE):
        m.fire(event)
    assert m.state == S.RESPONSE_BODY and m.live
    assert m.fire(E_RESPONSE_END) == C_FINISH and not m.live
    assert m.fire(E_REQUEST_HEAD) == C_RUN_HOOKS  # DONE takes the next head as IDLE does
    assert C_REMAP and C_SEND_REQUEST
