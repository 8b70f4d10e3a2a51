"""The response side of an HTTP transaction: origin bytes to the client (ATS HttpSM's server
read and HttpTunnel's relay, for one transaction at a time).

Theory of operation
-------------------
``HttpSM`` (tsproxy/http_sm.py) owns the transaction's state; these functions take the SM and run
the half of it that starts when the origin connection has the request: its bytes go to the
connection's ``ResponseParser``; a 1xx head is passed on (to an HTTP/1.1 client) or dropped, the
final head goes through the SM's ``TransactionMachine`` (READ_RESPONSE_HDR, SEND_RESPONSE_HDR,
then ``write_response_head``), and each body piece is written to the client's ``write_buf``,
re-chunked when the client framing is chunked. ``MessageEnded`` ends the transaction
(``response_done``): the origin connection goes back to the pool when both sides allow it.

Flow control: the client write buffer is the origin read buffer's ``downstream``, so the origin VC
reads only while the two hold less than ``flow_control.high_water`` together. When it found no
room (a READ_READY with nothing new) the transaction is paused and entered in the worker's
``FlowControl``; the client's drained buffer resumes it (``HttpSM.client_drained``). While a
response hook pauses the transaction, the origin is not consumed and the parser's remaining
events wait in ``resp_pending``.

Failures: a malformed response, an origin that closes early or stays silent past
``transaction_no_activity_timeout_out`` answers 502/504 before the head went out and cuts the
client connection after (``response_failed``); a pooled connection the origin had closed before
sending a byte is retried once on a fresh one. An origin idle only because the client is (a slow
reader, a slow upload) is re-armed instead (``waiting_on_client``).

These are module functions, not methods of a helper object, so that the hot path reads the SM's
slots directly, as it did when they were methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.event import (
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_WRITE_COMPLETE,
)
from iocore.records.stats import process_metric
from tsproxy.http.message import ChunkedEncoder
from tsproxy.http.parser import (
    BodyDataReceived,
    BodyMode,
    HTTPProtocolError,
    MessageEnded,
    ResponseReceived,
)
from tsproxy.http.transaction import C_NONE, E_ORIGIN_FAILED, E_RESPONSE_END, E_RESPONSE_HEAD, E_RETRY

if TYPE_CHECKING:
    from tsproxy.http_sm import HttpSM

_NONE = BodyMode.NONE
_CHUNKED = BodyMode.CHUNKED
_UNTIL_CLOSE = BodyMode.UNTIL_CLOSE

# Past half the worker's flow-control budget a stalled transaction buffers at most this much.
THROTTLED_WATER_MARK = 16 * 1024


M_COMPLETED = process_metric("http", "completed_requests")
M_FC_THROTTLED = process_metric("http", "flow_control.throttled")
M_STATUS = {
    2: process_metric("http", "2xx_responses"),
    3: process_metric("http", "3xx_responses"),
    4: process_metric("http", "4xx_responses"),
    5: process_metric("http", "5xx_responses"),
}


def origin_event(sm: HttpSM, event: int) -> None:
    """An origin VC event other than READ_READY / WRITE_READY (HttpSM.handle_origin_event)."""
    if event == VC_EVENT_READ_COMPLETE:
        process_origin_input(sm)
    elif event == VC_EVENT_WRITE_COMPLETE:
        pass
    elif event == VC_EVENT_EOS:
        origin_eof(sm)
    elif event == VC_EVENT_INACTIVITY_TIMEOUT and waiting_on_client(sm):
        # The origin is idle because the client is (a slow reader, a slow upload): not a 504;
        # the client side's timeout governs.
        origin = sm.origin
        if origin is not None:
            origin.vc.set_inactivity_timeout(sm.http.txn_timeout_out)
    elif event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT):
        response_failed(sm, 504, "origin did not answer in time")
    elif event == VC_EVENT_ERROR:
        response_failed(sm, 502, "origin connection failed")


def waiting_on_client(sm: HttpSM) -> bool:
    """The origin connection is idle because of the client: response bytes wait for a slow
    reader, or the origin has every request byte so far and more must come from the client.
    Never true together with HttpSM.waiting_on_origin, so one side's timeout always fires."""
    origin = sm.origin
    if origin is None:
        return False
    if sm.origin_paused and sm.client.write_reader.read_avail():
        return True
    return not sm.machine.request_done and not origin.write_reader.read_avail()


def process_origin_input(sm: HttpSM) -> None:
    origin = sm.origin
    if origin is None or sm.closed:
        return
    chain = sm.chain
    if chain is not None and chain.running:
        # A response hook holds the transaction: the origin is not consumed meanwhile (its
        # read stops by itself at the water mark); the hook's reenable resumes it.
        sm.origin_paused = True
        return
    reader = origin.reader
    got = reader.read_avail()
    if got:
        data = reader.read()
        sm.origin_bytes += len(data)
        try:
            events = origin.parser.feed(data)
        except HTTPProtocolError as exc:
            response_failed(sm, 502, f"bad response from origin: {exc.reason}")
            return
        handle_response_events(sm, events)
    if sm.origin is origin and not origin.vc.closed:
        if got or not origin.read_buf.high_water():
            origin.vc.read.reenable()
        elif not sm.origin_paused:
            # The origin VC found no room: what it sent still waits for the client (the
            # client write buffer is the origin read buffer's downstream), so the origin read
            # stays off until the client drained it and a slow reader costs high_water, not
            # more. Right after a read the VC is re-enabled regardless: a fast client takes
            # the bytes before the next poll, and nothing is paused.
            sm.origin_paused = True
            proc = sm.proc
            proc.flow.paused[sm] = proc.nh.thread.now


def buffered(sm: HttpSM) -> int:
    """Response bytes a transaction holds (the client write and origin read buffers)."""
    origin = sm.origin
    held = sm.client.write_buf.max_read_avail()
    return held + origin.read_buf.max_read_avail() if origin is not None else held


def throttle(sm: HttpSM) -> None:
    """Over half the worker's budget: buffer at most THROTTLED_WATER_MARK from now on, until
    the transaction ends (FlowControl)."""
    origin = sm.origin
    if origin is not None:
        sm.throttled = True
        origin.read_buf.water_mark = THROTTLED_WATER_MARK
        sm.proc.counters[M_FC_THROTTLED] += 1


def handle_response_events(sm: HttpSM, events: Sequence[Any]) -> None:
    client = sm.client
    write = client.write_buf.write
    for i, ev in enumerate(events):
        if isinstance(ev, BodyDataReceived):
            enc = sm.chunked
            write(enc.encode(ev.data) if enc is not None else ev.data)
        elif isinstance(ev, ResponseReceived):
            req = sm.request
            _response_head(sm, ev)
            chain = sm.chain
            if (chain is not None and chain.running) or sm.closed:
                # A response hook is paused: the rest waits for its reenable.
                sm.resp_pending = events[i + 1 :]
                return
            if sm.request is not req:
                # A response hook ended the transaction (error: a 500 went out instead):
                # the rest of the origin's response belongs to nobody.
                client.write_reenable()
                return
        elif isinstance(ev, MessageEnded):
            if sm.chunked is not None:
                write(sm.chunked.end())
            client.write_reenable()
            response_done(sm)
            return
    client.write_reenable()


def _response_head(sm: HttpSM, ev: ResponseReceived) -> None:
    req = sm.request
    assert req is not None
    if ev.status < 200:
        sm.client.write_interim(req, ev)  # 100 and 103 go on, where the protocol allows
        return
    sm.response = ev
    sm.drive(sm.machine.fire(E_RESPONSE_HEAD))


def write_response_head(sm: HttpSM) -> int:
    """C_SEND_RESPONSE_HEAD: the client's response head, then what the hooks held back."""
    req = sm.request
    ev = sm.response
    if req is None or ev is None:
        return C_NONE
    client = sm.client
    framing = client.response_framing(ev.body, req)
    if req.method == b"HEAD" or ev.body is _NONE:
        framing = _NONE
    if framing is _UNTIL_CLOSE:
        sm.client_keep_alive = False
    sm.framing = framing
    # The parser hands bodies over de-chunked, so a chunked client body is always re-encoded.
    sm.chunked = ChunkedEncoder() if framing is _CHUNKED else None
    client.write_response_head(req, ev, sm.http.response_via, sm.client_keep_alive, framing)
    sm.status_sent = ev.status
    metric = M_STATUS.get(ev.status // 100)
    if metric is not None:
        sm.proc.counters[metric] += 1
    if sm.resp_pending:
        pending, sm.resp_pending = sm.resp_pending, ()
        handle_response_events(sm, pending)
    elif sm.origin_paused:
        sm.client_drained()
    return C_NONE


def origin_eof(sm: HttpSM) -> None:
    origin = sm.origin
    if origin is None:
        return
    try:
        events = origin.parser.feed_eof()
    except HTTPProtocolError as exc:
        req = sm.request
        if (
            sm.response is None
            and sm.origin_bytes == 0
            and origin.requests > 1
            and not sm.retried
            and req is not None
            and req.body is _NONE
        ):
            # A pooled connection the origin had closed: retry once on a fresh one.
            sm.retried = True
            sm.drop_origin()
            sm.drive(sm.machine.fire(E_RETRY))
            return
        response_failed(sm, 502, f"origin closed the connection: {exc.reason}")
        return
    handle_response_events(sm, events)
    if sm.origin is origin:
        sm.drop_origin()


def response_failed(sm: HttpSM, status: int, reason: str) -> None:
    """The origin failed after the request went out: answer ``status``, or, when the head
    already went out, send what is buffered and cut the client connection."""
    sm.drop_origin()
    if not sm.machine.live:
        return
    if sm.response is None and sm.request is not None:
        sm.machine.fire(E_ORIGIN_FAILED)
        sm.answer_error(status, reason, close=True)
        return
    # The client sees the head and a short body rather than nothing at all.
    sm.log_failure(0, reason)
    sm.client_keep_alive = False
    sm.machine.fire(E_ORIGIN_FAILED)
    sm.client.abort_response()


def response_done(sm: HttpSM) -> None:
    """The response's MessageEnded: the origin connection back to the pool (when both sides
    allow keep-alive and the request went out whole), then the transaction's end."""
    machine = sm.machine
    machine.fire(E_RESPONSE_END)
    proc = sm.proc
    proc.counters[M_COMPLETED] += 1
    origin = sm.origin
    resp = sm.response
    sm.origin = None
    if origin is not None:
        if (
            resp is not None
            and resp.keep_alive
            and machine.request_done
            and sm.http.keep_alive_out
            and origin.parser.reusable
        ):
            proc.pool.put(origin)
        else:
            origin.close()
    sm.end_transaction()


__all__ = [
    "M_COMPLETED",
    "M_STATUS",
    "THROTTLED_WATER_MARK",
    "buffered",
    "handle_response_events",
    "origin_eof",
    "origin_event",
    "process_origin_input",
    "response_done",
    "response_failed",
    "throttle",
    "waiting_on_client",
    "write_response_head",
]
