"""Http1ClientSession: one HTTP/1.x client connection and its sequence of transactions (ATS
Http1ClientSession + Http1Transaction).

Theory of operation
-------------------
The session owns the client VC (plain or TLS). It reads with a read VIO whose buffer has a water
mark, feeds the bytes to the sans-IO ``RequestParser`` and hands the resulting events, in order
from ``pending``, to an ``HttpSM`` (a spare one of the worker, held only during a transaction): a
request head starts a transaction, body pieces and the end of the message follow it. Processing
stops while the SM holds the client's input back (``HttpSM.blocked``: it waits for its origin
connection or a plugin, or the origin's upload buffer is above its water mark) and while a
pipelined request waits for the current response to end. When nothing is consumed, the client
buffer fills up, the VC stops reading, and TCP pushes back on the client.

The way back is the ProxyTransaction interface (tsproxy/proxy_transaction.py): the SM writes the
response into ``write_buf`` and calls ``txn_done`` when it ended; the session then reads the next
request or closes. A malformed request is answered (400/413/414/431, then close) after the
requests in front of it. A request head must arrive within
``transaction_no_activity_timeout_in`` of its first byte (an active timeout while in the head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iocore.eventsystem.event import (
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_READY,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.records.stats import METRIC_ID
from tsproxy.http.message import (
    build_client_response_head,
    client_framing,
    error_response,
    synthetic_response,
)
from tsproxy.http.parser import (
    BodyDataReceived,
    BodyMode,
    HTTPProtocolError,
    MessageEnded,
    RequestParser,
    RequestReceived,
    ResponseReceived,
)
from tsproxy.proxy_transaction import ProxyTransaction

if TYPE_CHECKING:
    from iocore.net.net_vconnection import NetVConnection
    from tsproxy.http_sm import HttpConfig, HttpProcessor, HttpSM

CLIENT_WATER_MARK = 64 * 1024

M_CUR_CLIENT = METRIC_ID["proxy.process.http.current_client_connections"]
M_TOTAL_CLIENT = METRIC_ID["proxy.process.http.total_client_connections"]
M_CLIENT_ABORT = METRIC_ID["proxy.process.http.err_client_abort_count"]
M_UNDERSCORE_DROPPED = METRIC_ID["proxy.process.http.underscore_headers_dropped"]


class Http1ClientSession(ProxyTransaction):
    """One HTTP/1 client connection; its transactions run in ``sm``."""

    # Slots, not an instance dict: idle keep-alive connections are what a proxy holds most of.
    __slots__ = (
        "_client_held",
        "_in_input",
        "close_after_write",
        "head_timer",
        "http",
        "parser",
        "pending",
        "proc",
        "read_buf",
        "reader",
        "sm",
    )

    def __init__(self, proc: HttpProcessor, vc: NetVConnection, scheme: str, port: int) -> None:
        # The response side: proxy.config.http.flow_control.high_water bounds what a transaction
        # buffers for a slow client (see tsproxy/http_response.py process_origin_input).
        super().__init__(vc, scheme, port, MIOBuffer(proc.http.flow_high_water))
        self.proc = proc
        self.http = proc.http
        # Only while a request is partly read: between requests the parser goes back to the
        # processor's spare (see _process_client_input), so an idle connection holds none.
        self.parser: RequestParser | None = None
        self.read_buf = MIOBuffer(CLIENT_WATER_MARK)
        self.reader = self.read_buf.alloc_reader()
        # Parsed client events not processed yet; rarely more than a few, so a list (an empty
        # deque costs ~600 bytes per idle connection), and None while there are none.
        self.pending: list[Any] | None = None
        self.close_after_write = False
        self.head_timer = False
        self.sm: HttpSM | None = None  # during a transaction (HttpProcessor.new_sm)
        # _process_client_input is on the stack: an SM step that unblocks the input from inside
        # it (a local answer, a pooled origin) needs no second pass, the running one goes on.
        self._in_input = False
        self._client_held = False  # a pass ended blocked (the read re-enable is owed)
        proc.sessions[self] = None
        counters = proc.counters
        counters[M_CUR_CLIENT] += 1
        counters[M_TOTAL_CLIENT] += 1
        vc.do_io_read(self, INT64_MAX, self.read_buf)
        vc.do_io_write(self, INT64_MAX, self.write_reader)
        vc.set_inactivity_timeout(self.http.accept_timeout)  # until the first request

    def idle(self) -> bool:
        """Between transactions with nothing left to send: safe to close on drain."""
        sm = self.sm
        return (sm is None or sm.request is None) and not self.pending and not self.write_reader.read_avail()

    def drain(self) -> None:
        """Graceful stop (HttpProcessor.drain): an idle connection closes now, a busy one after
        its current response (txn_done sees ``draining``)."""
        if self.idle():
            self.close()

    def handle_event(self, event: int, data: Any = None) -> Any:
        """Every event of the client VC (a method, not a ``handler``: no bound method per session)."""
        if self.closed:
            return None  # late events after close are dropped
        try:
            if event == VC_EVENT_READ_READY:
                self._process_client_input()
            elif event == VC_EVENT_WRITE_READY and not self.close_after_write:
                sm = self.sm
                if sm is not None and sm.origin_paused:
                    sm.client_drained()
            else:
                self._client_event(event)
        except Exception:
            # The VC's guard closes only the VC that raised: fail the whole session so neither
            # the client nor the origin connection is left waiting for a transaction that died.
            self.close()
            raise

    def _client_event(self, event: int) -> None:
        sm = self.sm
        if event == VC_EVENT_READ_COMPLETE:
            self._process_client_input()
        elif event == VC_EVENT_WRITE_READY:  # close_after_write
            if not self.write_reader.read_avail():
                self.close()
            elif sm is not None and sm.origin_paused:
                sm.client_drained()
        elif event == VC_EVENT_EOS:
            if (sm is None or sm.request is None) and not self.pending:
                self.close()
            elif sm is not None and sm.response is None and sm.request is not None and sm.request_done:
                # Half-close after a complete request: answer, then close.
                sm.client_keep_alive = False
            else:
                self.proc.counters[M_CLIENT_ABORT] += 1
                self.close()
        elif event == VC_EVENT_INACTIVITY_TIMEOUT and sm is not None and sm.waiting_on_origin():
            # The client is idle because the origin is: the origin side's timeout governs.
            self.vc.set_inactivity_timeout(self.http.txn_timeout_in)
        elif event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT, VC_EVENT_ERROR):
            if event == VC_EVENT_ERROR:
                self.proc.counters[M_CLIENT_ABORT] += 1
            self.close()

    def _blocked(self) -> bool:
        sm = self.sm
        return sm is not None and sm.blocked()

    def _process_client_input(self) -> None:
        if self.closed or self._in_input:
            return
        if self._blocked():
            self._client_held = True
            return
        self._in_input = True
        try:
            reader = self.reader
            if reader.read_avail():
                self._parse(reader.read())
            self._run_pending()
        finally:
            self._in_input = False
        if not self.closed:
            if self._blocked():
                self._client_held = True  # the read re-enable is owed (see resume_input)
            else:
                self._client_held = False
                self.vc.read.reenable()

    def _parse(self, data: bytes) -> None:
        parser = self.parser
        proc = self.proc
        if parser is None:
            parser = proc.spare_parser
            http = self.http
            if (
                parser is None
                or parser.max_header_size != http.max_header_size
                or parser.allow_underscores is not http.underscores_in_headers
            ):
                parser = RequestParser(http.max_header_size, http.underscores_in_headers)
            else:
                proc.spare_parser = None
        pending = self.pending
        if pending is None:
            pending = self.pending = []
        try:
            pending.extend(parser.feed(data))
        except HTTPProtocolError as exc:
            pending.extend(exc.events_before)
            pending.append(exc.with_traceback(None))  # kept: its frames hold us
        if parser.underscores_dropped:
            proc.counters[M_UNDERSCORE_DROPPED] += parser.underscores_dropped
            parser.underscores_dropped = 0
        if parser.between_messages:
            # Nothing of a next request read yet: the next one may start on any parser, so this
            # one serves every connection of the worker (one llhttp, not one each).
            self.parser = None
            proc.spare_parser = parser
            in_head = False
        else:
            self.parser = parser
            in_head = parser.in_head
        # The inactivity timer restarts with every byte, so a head dripped one byte at a time
        # would never time out: the whole head must arrive within transaction_no_activity_timeout_in
        # of its first byte (an active timeout).
        if in_head:
            if not self.head_timer:
                self.head_timer = True
                self.vc.set_active_timeout(self.http.txn_timeout_in)
        elif self.head_timer:
            self.head_timer = False
            self.vc.set_active_timeout(0)

    def _run_pending(self) -> None:
        pending = self.pending
        while pending and not self.closed:
            ev = pending[0]
            sm = self.sm
            if isinstance(ev, RequestReceived):
                if sm is not None and sm.request is not None:
                    return  # pipelined: wait for the current response to end
                del pending[0]
                if sm is None:
                    sm = self.sm = self.proc.new_sm(self)
                sm.start(ev)
            elif isinstance(ev, (BodyDataReceived, MessageEnded)):
                if sm is None:
                    del pending[0]  # the parser never gives a body without a head
                    continue
                if sm.blocked():
                    return
                del pending[0]
                if isinstance(ev, BodyDataReceived):
                    sm.request_body(ev.data)
                else:
                    sm.request_end()
            else:  # HTTPProtocolError: answered after the requests in front of it
                if sm is not None and sm.request is not None:
                    return
                pending.clear()
                if sm is None:
                    sm = self.sm = self.proc.new_sm(self)
                sm.send_error(ev.status, ev.reason, close=True)
                return
        if pending is not None and not pending and pending is self.pending:
            self.pending = None  # all done: an idle connection holds no list

    def _input_waits(self) -> bool:
        """Client input may be held back: events or bytes not processed yet, or a pass that ended
        blocked and skipped the read re-enable."""
        return self._client_held or bool(self.pending) or bool(self.reader.read_avail())

    # -- ProxyTransaction ------------------------------------------------------------------------
    def txn_start(self, http: HttpConfig) -> None:
        vc = self.vc
        vc.set_inactivity_timeout(http.txn_timeout_in)
        if http.active_in:
            vc.set_active_timeout(http.active_in)

    def response_framing(self, origin_body: BodyMode, req: RequestReceived) -> BodyMode:
        return client_framing(origin_body, req.http_version)

    def write_response_head(
        self,
        req: RequestReceived,
        ev: ResponseReceived,
        via: bytes | None,
        keep_alive: bool,
        framing: BodyMode,
    ) -> None:
        self.write_buf.write(
            build_client_response_head(
                ev, via=via, keep_alive=keep_alive, framing=framing, client_http_version=req.http_version
            )
        )

    def write_interim(self, req: RequestReceived, ev: ResponseReceived) -> None:
        # RFC 9110 15.2: no 1xx to an HTTP/1.0 client (it would take it for the response).
        if (ev.status == 100 or ev.status == 103) and req.http_version == b"1.1":
            self.write_buf.write(build_client_response_head(ev, via=None, keep_alive=True))

    def write_error(self, status: int, note: str, *, close: bool) -> None:
        self.write_buf.write(error_response(status, note, close=close))

    def write_complete(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool, head_only: bool
    ) -> None:
        self.write_buf.write(synthetic_response(status, headers, body, close=close, head_only=head_only))

    def write_reenable(self) -> None:
        self.vc.write.reenable()

    def resume_input(self) -> None:
        if not self.closed and self._input_waits():
            self._process_client_input()

    def discard_input(self) -> None:
        if self.pending is not None:
            self.pending.clear()

    def abort_response(self) -> None:
        self.close_after_write = True
        if self.pending is not None:
            self.pending.clear()
        self.vc.read.disable()
        if not self.write_reader.read_avail():
            self.close()
        else:
            self.vc.write.reenable()

    def txn_done(self, keep_alive: bool) -> None:
        http = self.http
        if http.active_in and not self.head_timer:
            self.vc.set_active_timeout(0)
        if not keep_alive or self.proc.draining:
            self.close_after_write = True
            self.vc.read.disable()
            if not self.write_reader.read_avail():
                self.close()
            return
        self.vc.set_inactivity_timeout(http.ka_timeout_in)
        sm = self.sm
        if sm is not None:  # the next request takes a spare one: an idle connection holds none
            self.sm = None
            self.proc.release_sm(sm)
        if self.pending or self.reader.read_avail():
            self._process_client_input()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sm = self.sm
        if sm is not None:
            sm.client_closed()
            self.sm = None
        self.vc.do_io_close()
        proc = self.proc
        proc.sessions.pop(self, None)
        proc.counters[M_CUR_CLIENT] -= 1
        if self.parser is not None:
            self.parser.close()
            self.parser = None
        self.read_buf.dealloc_all_readers()
        self.write_buf.dealloc_all_readers()


__all__ = ["CLIENT_WATER_MARK", "Http1ClientSession"]
