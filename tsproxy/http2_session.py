"""Http2ClientSession: one HTTP/2 client connection and its streams (ATS Http2ClientSession,
Http2ConnectionState and Http2Stream).

Theory of operation
-------------------
A TLS connection that negotiated ``h2`` in ALPN gets this session instead of an
``Http1ClientSession``. The framing, HPACK and the protocol's state rules are the ``h2`` library's
``H2Connection`` (sans-IO: bytes in, events out, ``data_to_send`` for the way back). Each readiness
event feeds what the VC read to it, once (``net_read_io`` → READ_READY → ``_on_input``), and the
events go to the streams:

* a request's HEADERS make an ``Http2Stream`` (a ``ProxyTransaction``, tsproxy/proxy_transaction.py)
  and start an ``HttpSM`` on it, the same state machine HTTP/1 uses: remap, the transaction hooks,
  the origin pool, Via/X-Forwarded-For, 404/502/504 answers. A stream's failure is that stream's:
  an answer or a RST_STREAM, never the connection's;
* DATA goes to the SM as request body while the SM takes it (``HttpSM.blocked``: an origin upload
  buffer above its water mark, a paused hook); otherwise it waits in the stream, unacknowledged, so
  the client's flow-control window closes: backpressure on uploads is the window;
* the SM writes the response into the stream's ``write_buf`` (the origin read buffer's downstream,
  as in HTTP/1: the two share ``flow_control.high_water``). ``_flush`` turns it into HEADERS and
  DATA frames as far as the client's windows allow, round robin over the streams with output,
  while the connection's own output buffer is below its water mark. A stream whose window is
  closed keeps its bytes, its origin read pauses by the shared water mark, and the client's
  WINDOW_UPDATE resumes it (``HttpSM.client_drained``); the other streams go on.

Output is coalesced: a stream's ``write_reenable`` marks it ready and, outside the session's own
event, schedules one immediate event for the session, which runs before the NetHandler writes
the loop iteration's output: a response's HEADERS and DATA leave in one TLS write.

Protection (counted as ATS counts them, ``proxy.process.http2.*``): the local SETTINGS bound
concurrent streams, frame size and header list size (h2 enforces them); SETTINGS, PING, PRIORITY,
RST_STREAM (rapid reset, CVE-2023-44487) and CONTINUATION frames are counted per minute against
``proxy.config.http2.max_*_per_minute`` and a client over a limit gets GOAWAY(ENHANCE_YOUR_CALM).
A connection idle past ``proxy.config.http2.no_activity_timeout_in``, or whose streams have waited
that long on a closed window (a zero-window client that only pings), is closed.

Graceful stop (``drain``): GOAWAY with the last stream id taken; open streams finish, then the
connection closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.events import RequestReceived as H2RequestReceived
from h2.exceptions import ProtocolError, StreamClosedError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import (
    EVENT_IMMEDIATE,
    VC_EVENT_ACTIVE_TIMEOUT,
    VC_EVENT_EOS,
    VC_EVENT_ERROR,
    VC_EVENT_INACTIVITY_TIMEOUT,
    VC_EVENT_READ_COMPLETE,
    VC_EVENT_READ_READY,
    VC_EVENT_WRITE_READY,
    Continuation,
)
from iocore.eventsystem.iobuffer import INT64_MAX, MIOBuffer
from iocore.records.stats import process_metric
from tsproxy.http.message import ERROR_HEADERS, HOP_BY_HOP, error_body
from tsproxy.http.parser import BodyMode, RequestReceived, ResponseReceived
from tsproxy.http.transaction import IDLE
from tsproxy.proxy_transaction import ProxyTransaction

if TYPE_CHECKING:
    from iocore.net.net_vconnection import NetVConnection
    from tsproxy.http_sm import HttpConfig, HttpProcessor, HttpSM

_dbg = DbgCtl("http2")

# What the connection's own output buffer may hold before stream data waits for WRITE_READY.
OUT_WATER_MARK: Final = 64 * 1024
CLIENT_WATER_MARK: Final = 64 * 1024
# Frame counts are kept in two buckets of this many seconds (ATS Http2FrequencyCounter): the
# count "per minute" is the current bucket's plus the previous one's.
_BUCKET: Final = 30.0

_NONE = BodyMode.NONE
_LENGTH = BodyMode.LENGTH
_CHUNKED = BodyMode.CHUNKED
_END: Final = -1  # an Http2Stream.pending size: the request's end, not a body piece
_CONTINUATION: Final = 9
_PREFACE_LEN: Final = 24

# Not sent on an HTTP/2 response (RFC 9113 8.2.2); Content-Length and Via are written by us.
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length", b"via"}

M_CUR_CONN = process_metric("http2", "current_client_connections")
M_TOTAL_CONN = process_metric("http2", "total_client_connections")
M_CUR_STREAMS = process_metric("http2", "current_client_streams")
M_TOTAL_STREAMS = process_metric("http2", "total_client_streams")
M_CONN_ERRORS = process_metric("http2", "connection_errors")
M_STREAM_ERRORS = process_metric("http2", "stream_errors")
M_DIE_INACTIVE = process_metric("http2", "session_die_inactive")
M_DIE_EOS = process_metric("http2", "session_die_eos")
M_DIE_ERROR = process_metric("http2", "session_die_error")
M_DIE_OTHER = process_metric("http2", "session_die_other")
M_STREAMS_EXCEEDED = process_metric("http2", "max_concurrent_streams_exceeded_in")
M_SETTINGS_PER_FRAME = process_metric("http2", "max_settings_per_frame_exceeded")
M_SETTINGS_PER_MINUTE = process_metric("http2", "max_settings_per_minute_exceeded")
M_SETTINGS_FRAMES = process_metric("http2", "max_settings_frames_per_minute_exceeded")
M_PING_FRAMES = process_metric("http2", "max_ping_frames_per_minute_exceeded")
M_PRIORITY_FRAMES = process_metric("http2", "max_priority_frames_per_minute_exceeded")
M_RST_FRAMES = process_metric("http2", "max_rst_stream_frames_per_minute_exceeded")
M_CONTINUATION_FRAMES = process_metric("http2", "max_continuation_frames_per_minute_exceeded")

_H2_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
    # Response headers are built here from a parsed HTTP/1 response: names lower-cased and
    # hop-by-hop fields dropped below, so h2's per-header validation is not paid twice.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class FrequencyCounter:
    """Events in the last minute or so, in two 30 s buckets (ATS Http2FrequencyCounter)."""

    __slots__ = ("count", "prev", "start")

    def __init__(self) -> None:
        self.count = 0
        self.prev = 0
        self.start = 0.0

    def incr(self, now: float, n: int = 1) -> int:
        elapsed = now - self.start
        if elapsed >= _BUCKET:
            self.prev = self.count if elapsed < 2 * _BUCKET else 0
            self.count = 0
            self.start = now
        self.count += n
        return self.count + self.prev


class FrameScanner:
    """Counts the CONTINUATION frames in the client's byte stream (h2 takes them whole, so
    ``max_continuation_frames_per_minute`` needs its own look at the frame headers)."""

    __slots__ = ("head", "skip")

    def __init__(self) -> None:
        self.skip = _PREFACE_LEN  # the client connection preface is not a frame
        self.head = b""

    def feed(self, data: bytes) -> int:
        found = 0
        pos = 0
        n = len(data)
        while pos < n:
            skip = self.skip
            if skip:
                take = n - pos if n - pos < skip else skip
                self.skip = skip - take
                pos += take
                continue
            head = self.head
            need = 9 - len(head)
            if not head and n - pos >= 9:
                head = data[pos : pos + 9]
                pos += 9
            else:
                head += data[pos : pos + need]
                pos += min(need, n - pos)
                if len(head) < 9:
                    self.head = head
                    return found
            self.head = b""
            if head[3] == _CONTINUATION:
                found += 1
            self.skip = (head[0] << 16) | (head[1] << 8) | head[2]
        return found


class FrameLimits:
    """The per-minute frame limits of one connection (proxy.config.http2.max_*_per_minute and
    max_settings_per_frame): each check answers None, or the metric and the words for the
    GOAWAY(ENHANCE_YOUR_CALM) of a client over a limit."""

    __slots__ = (
        "continuations",
        "http",
        "pings",
        "priorities",
        "resets",
        "scanner",
        "settings",
        "settings_frames",
    )

    def __init__(self, http: HttpConfig) -> None:
        self.http = http
        self.scanner = FrameScanner()
        self.settings_frames = FrequencyCounter()
        self.settings = FrequencyCounter()
        self.pings = FrequencyCounter()
        self.priorities = FrequencyCounter()
        self.resets = FrequencyCounter()
        self.continuations = FrequencyCounter()

    def received(self, data: bytes, now: float) -> tuple[int, str] | None:
        found = self.scanner.feed(data)
        limit = self.http.h2_max_continuation
        if found and limit and self.continuations.incr(now, found) > limit:
            return M_CONTINUATION_FRAMES, "CONTINUATION frames"
        return None

    def event(self, ev: object, now: float) -> tuple[int, str] | None:
        http = self.http
        if isinstance(ev, StreamReset):
            if ev.remote_reset and _over(self.resets, http.h2_max_rst, now):
                return M_RST_FRAMES, "RST_STREAM frames"
        elif isinstance(ev, PingReceived):
            if _over(self.pings, http.h2_max_ping, now):
                return M_PING_FRAMES, "PING frames"
        elif isinstance(ev, PriorityUpdated):
            if _over(self.priorities, http.h2_max_priority, now):
                return M_PRIORITY_FRAMES, "PRIORITY frames"
        elif isinstance(ev, RemoteSettingsChanged):
            n = len(ev.changed_settings)
            if _over(self.settings_frames, http.h2_max_settings_frames, now):
                return M_SETTINGS_FRAMES, "SETTINGS frames"
            if http.h2_max_settings_per_frame and n > http.h2_max_settings_per_frame:
                return M_SETTINGS_PER_FRAME, "settings in one SETTINGS frame"
            if _over(self.settings, http.h2_max_settings_per_minute, now, n):
                return M_SETTINGS_PER_MINUTE, "settings"
        return None


def _over(counter: FrequencyCounter, limit: int, now: float, n: int = 1) -> bool:
    return bool(limit) and counter.incr(now, n) > limit


class Http2Stream(ProxyTransaction):
    """One stream: the client side of one transaction (ATS Http2Stream)."""

    __slots__ = (
        "aborted",
        "active_at",
        "client_done",
        "ended",
        "head",
        "pending",
        "session",
        "sm",
        "stream_id",
    )

    def __init__(self, session: Http2ClientSession, stream_id: int) -> None:
        super().__init__(session.vc, "https", session.port, MIOBuffer(session.proc.http.flow_high_water))
        self.session = session
        self.stream_id = stream_id
        self.sm: HttpSM | None = None
        self.head: list[tuple[bytes, bytes]] | None = None  # response headers not sent yet
        # Request body pieces the SM has not taken yet, with their flow-controlled length (acked
        # when taken); a size of _END is the request's end.
        self.pending: list[tuple[bytes, int]] | None = None
        self.ended = False  # the response is complete in write_buf (txn_done)
        self.aborted = False  # the origin failed mid-body: reset once the buffer went out
        self.client_done = False  # the client's side of the stream ended (END_STREAM or reset)
        # transaction_active_timeout_in: when this stream is reset (0: never). No timer event of
        # its own (a cancelled event would sit in the heap until its time): the session keeps
        # the VC's active timeout at the earliest deadline of its streams (_streams_expired).
        self.active_at = 0.0

    # -- ProxyTransaction ------------------------------------------------------------------------
    def txn_start(self, http: HttpConfig) -> None:
        if http.active_in:
            self.session.arm_active(self, float(http.active_in))

    def response_framing(self, origin_body: BodyMode, req: RequestReceived) -> BodyMode:
        # DATA frames and END_STREAM frame every body: never chunks, never until close.
        return _NONE if origin_body is _NONE else _LENGTH

    def write_response_head(
        self,
        req: RequestReceived,
        ev: ResponseReceived,
        via: bytes | None,
        keep_alive: bool,
        framing: BodyMode,
    ) -> None:
        status = ev.status
        headers: list[tuple[bytes, bytes]] = [(b":status", b"%d" % status)]
        named: set[bytes] | None = None
        via_seen: list[bytes] = []
        length: bytes | None = None
        for name, value in ev.headers:
            lname = name.lower()
            if lname in _RESPONSE_DROP:
                if lname == b"via":
                    via_seen.append(value)
                elif lname == b"content-length":
                    length = value
                elif lname == b"connection":
                    if named is None:
                        named = set()
                    named.update(t.strip().lower() for t in value.split(b","))
                continue
            headers.append((lname, value))
        if named:
            headers = [h for h in headers if h[0] not in named]
        if via is not None:
            via_seen.append(b"%s %s" % (ev.http_version, via))
        if via_seen:
            headers.append((b"via", b", ".join(via_seen)))
        if framing is _LENGTH:
            if ev.content_length is not None:
                headers.append((b"content-length", b"%d" % ev.content_length))
        elif length is not None and status >= 200 and status != 204:
            headers.append((b"content-length", length))  # HEAD, 304: the representation's
        self.head = headers

    def write_interim(self, req: RequestReceived, ev: ResponseReceived) -> None:
        if ev.status == 100 or ev.status == 103:
            headers = [(b":status", b"%d" % ev.status)]
            headers += [(n.lower(), v) for n, v in ev.headers if n.lower() not in _RESPONSE_DROP]
            self.session.send_interim(self, headers)

    def write_error(self, status: int, note: str, *, close: bool) -> None:
        self.write_complete(
            status, list(ERROR_HEADERS), error_body(status, note), close=close, head_only=False
        )

    def write_complete(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool, head_only: bool
    ) -> None:
        out = [(b":status", b"%d" % status)]
        for name, value in headers:
            lname = name.lower()
            if lname not in HOP_BY_HOP and lname != b"content-length":
                out.append((lname, value))
        out.append((b"content-length", b"%d" % len(body)))
        self.head = out
        if body and not head_only:
            self.write_buf.write(body)

    def write_reenable(self) -> None:
        if not self.closed:
            self.session.stream_ready(self)

    def txn_done(self, keep_alive: bool) -> None:
        sm = self.sm
        if sm is not None:
            self.sm = None
            sm.client = _DETACHED  # the SM may serve another stream; nothing points back here
            if sm.machine.state == IDLE:  # reusable (keep_alive False left it CLOSED)
                self.session.proc.release_sm(sm)
        self.active_at = 0.0
        self.ended = True
        self.discard_input()
        if not self.closed:
            self.session.stream_ready(self)

    def abort_response(self) -> None:
        self.aborted = True
        self.ended = True
        self.discard_input()
        self.session.stream_ready(self)

    def discard_input(self) -> None:
        pending = self.pending
        if pending:
            self.pending = None
            self.session.ack(self, sum(n for _, n in pending if n > 0))

    def resume_input(self) -> None:
        if not self.closed and self.pending:
            self.session.stream_input(self)

    def close(self) -> None:
        """The SM closes its client side (FlowControl, a failed queued transaction): this stream."""
        if not self.closed:
            self.session.reset_stream(self, ErrorCodes.INTERNAL_ERROR)


class _Detached(ProxyTransaction):
    """What an SM between streams points at (its stream is gone): the calls an SM makes after
    its transaction ended (``resume_client``) do nothing."""

    __slots__ = ()

    def __init__(self) -> None:  # no VC, no buffers: nothing reads them
        Continuation.__init__(self)
        self.closed = True

    def resume_input(self) -> None:
        pass

    def discard_input(self) -> None:
        pass

    def write_reenable(self) -> None:
        pass

    def close(self) -> None:
        pass


_DETACHED: Final = _Detached()


class Http2ClientSession(Continuation):
    """One HTTP/2 client connection (see the module docstring)."""

    __slots__ = (
        "_in_event",
        "_scheduled",
        "closed",
        "closing",
        "conn",
        "draining",
        "http",
        "limits",
        "out_buf",
        "out_reader",
        "port",
        "proc",
        "read_buf",
        "reader",
        "ready",
        "stalled_since",
        "streams",
        "vc",
    )

    def __init__(self, proc: HttpProcessor, vc: NetVConnection, port: int) -> None:
        super().__init__()
        self.proc = proc
        self.vc = vc
        self.port = port
        http = self.http = proc.http
        conn = self.conn = H2Connection(_H2_CONFIG)
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: http.h2_max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: http.h2_window,
                SettingCodes.MAX_FRAME_SIZE: http.h2_max_frame,
                SettingCodes.HEADER_TABLE_SIZE: http.h2_header_table,
                SettingCodes.MAX_HEADER_LIST_SIZE: http.h2_max_header_list,
            },
        )
        conn.initiate_connection()
        self.streams: dict[int, Http2Stream] = {}
        self.ready: dict[Http2Stream, None] = {}  # streams with output to move, in order
        self.read_buf = MIOBuffer(CLIENT_WATER_MARK)
        self.reader = self.read_buf.alloc_reader()
        self.out_buf = MIOBuffer(OUT_WATER_MARK)
        self.out_reader = self.out_buf.alloc_reader()
        self.limits = FrameLimits(http)
        self.stalled_since = 0.0  # when stream output began to wait on a closed window
        self.closed = False
        self.closing = False  # GOAWAY for an error went out: close once it is written
        self.draining = False  # GOAWAY(NO_ERROR): no new streams; close when the last one ends
        self._in_event = False
        self._scheduled = False
        proc.sessions[self] = None
        counters = proc.counters
        counters[M_CUR_CONN] += 1
        counters[M_TOTAL_CONN] += 1
        vc.do_io_read(self, INT64_MAX, self.read_buf)
        vc.do_io_write(self, INT64_MAX, self.out_reader)
        vc.set_inactivity_timeout(http.h2_timeout)
        self._write_out()

    # -- events ----------------------------------------------------------------------------------
    def handle_event(self, event: int, data: Any = None) -> Any:
        if self.closed:
            return None
        if event == EVENT_IMMEDIATE:
            self._scheduled = False
        self._in_event = True
        try:
            if event in (VC_EVENT_READ_READY, VC_EVENT_READ_COMPLETE):
                self._on_input()
            elif event in (VC_EVENT_WRITE_READY, EVENT_IMMEDIATE):
                if self.closing and not self.out_reader.read_avail():
                    self.close()
                    return None
            else:
                self._vc_event(event)
            if not self.closed:
                self._flush()
        except Exception:
            self.close()  # a session that raised must not leave its streams' SMs waiting
            raise
        finally:
            self._in_event = False
        return None

    def _vc_event(self, event: int) -> None:
        counters = self.proc.counters
        if self.closing and event in (VC_EVENT_INACTIVITY_TIMEOUT, VC_EVENT_ACTIVE_TIMEOUT):
            self.close()  # a client that does not read even the GOAWAY
            return
        if event == VC_EVENT_EOS:
            counters[M_DIE_EOS] += 1
            self.close()
        elif event == VC_EVENT_INACTIVITY_TIMEOUT:
            if not self._stalled() and any(
                s.sm is not None and s.sm.waiting_on_origin() for s in self.streams.values()
            ):
                # The client is idle because an origin is: the origin side's timeout governs.
                self.vc.set_inactivity_timeout(self.http.h2_timeout)
                return
            counters[M_DIE_INACTIVE] += 1
            self._goaway(ErrorCodes.NO_ERROR, "no activity")
        elif event == VC_EVENT_ACTIVE_TIMEOUT:
            self._streams_expired()
        else:
            if event == VC_EVENT_ERROR:
                counters[M_DIE_ERROR] += 1
            else:
                counters[M_DIE_OTHER] += 1
            self.close()

    def _on_input(self) -> None:
        reader = self.reader
        if reader.read_avail():
            data = reader.read()
            if self.closing:
                pass  # a GOAWAY for an error is on its way: nothing the client says matters
            else:
                self._receive(data)
        if not self.closed:
            self.vc.read.reenable()

    def _receive(self, data: bytes) -> None:
        limits = self.limits
        now = self.proc.nh.thread.now
        over = limits.received(data, now)
        if over is not None:
            self._calm(*over)
            return
        try:
            events = self.conn.receive_data(data)
        except TooManyStreamsError:
            self._protocol_error(M_STREAMS_EXCEEDED, "more concurrent streams than SETTINGS allow")
            return
        except ProtocolError as exc:
            self._protocol_error(0, str(exc))
            return
        streams = self.streams
        for ev in events:
            if self.closed or self.closing:
                return
            if isinstance(ev, H2RequestReceived):
                self._request(ev)
            elif isinstance(ev, DataReceived):
                self._data(ev)
            elif isinstance(ev, StreamEnded):
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream.client_done = True
                    if not stream.ended:
                        self._queue_input(stream, b"", _END)
            elif isinstance(ev, WindowUpdated):
                self._window_opened(ev.stream_id)
            elif isinstance(ev, ConnectionTerminated):
                # h2 sends nothing after the client's GOAWAY: the connection ends here.
                _dbg("client sent GOAWAY (%s)", ev.error_code)
                self.proc.counters[M_DIE_OTHER] += 1
                self._end_with_goaway()
                return
            else:
                over = limits.event(ev, now)
                if over is not None:
                    self._calm(*over)
                    return
                if isinstance(ev, StreamReset):
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        _dbg("stream %d reset by the client (%s)", ev.stream_id, ev.error_code)
                        stream.client_done = True
                        self._stream_gone(stream)
                elif (
                    isinstance(ev, RemoteSettingsChanged)
                    and SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings
                ):
                    self._window_opened(0)
        if self.stalled_since and self._stalled():
            self.proc.counters[M_DIE_INACTIVE] += 1
            self._goaway(ErrorCodes.NO_ERROR, "streams waited on a closed window too long")

    # -- requests --------------------------------------------------------------------------------
    def _request(self, ev: H2RequestReceived) -> None:
        sid = ev.stream_id
        if self.draining:
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        req = _request_of(ev.headers, bool(ev.stream_ended))
        if req is None:
            self.proc.counters[M_STREAM_ERRORS] += 1
            self._reset(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = Http2Stream(self, sid)
        self.streams[sid] = stream
        counters = self.proc.counters
        counters[M_CUR_STREAMS] += 1
        counters[M_TOTAL_STREAMS] += 1
        if ev.stream_ended:
            stream.client_done = True
            stream.pending = [(b"", _END)]
        sm = stream.sm = self.proc.new_sm(stream)
        sm.start(req)
        if stream.pending and not stream.closed:
            self.stream_input(stream)

    def _data(self, ev: DataReceived) -> None:
        stream = self.streams.get(ev.stream_id)
        size = ev.flow_controlled_length
        if stream is None or stream.ended or stream.sm is None:
            self.conn.acknowledge_received_data(size, ev.stream_id)  # nobody takes it: keep the window open
            return
        self._queue_input(stream, ev.data, size)

    def _queue_input(self, stream: Http2Stream, data: bytes, size: int) -> None:
        pending = stream.pending
        if pending is None:
            stream.pending = [(data, size)]
        else:
            pending.append((data, size))
        self.stream_input(stream)

    def stream_input(self, stream: Http2Stream) -> None:
        """Hand the stream's waiting input to its SM while the SM takes it."""
        pending = stream.pending
        while pending and not stream.closed:
            sm = stream.sm
            if sm is None:
                stream.discard_input()
                return
            if sm.blocked():
                return  # unacknowledged: the client's window closes (resume_input)
            data, size = pending.pop(0)
            if size == _END:
                sm.request_end()
            else:
                if data:
                    sm.request_body(data)
                if size:
                    self.ack(stream, size)
            pending = stream.pending
        if pending is not None and not pending and pending is stream.pending:
            stream.pending = None

    def ack(self, stream: Http2Stream, size: int) -> None:
        if size and not self.closed:
            self.conn.acknowledge_received_data(size, stream.stream_id)
            self._output()

    # -- responses -------------------------------------------------------------------------------
    def stream_ready(self, stream: Http2Stream) -> None:
        self.ready[stream] = None
        self._output()

    def send_interim(self, stream: Http2Stream, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.send_headers(stream.stream_id, headers)
        except (StreamClosedError, ProtocolError):
            return
        self._output()

    def _output(self) -> None:
        """Frames are owed: flushed at the end of the session's event, or soon."""
        if not self._in_event and not self._scheduled and not self.closed:
            self._scheduled = True
            self.proc.nh.thread.schedule_imm(self)

    def _flush(self) -> None:
        ready = self.ready
        out = self.out_buf
        rounds = 0
        while ready and not out.high_water() and rounds < 64:
            rounds += 1
            for stream in list(ready):
                if out.high_water():
                    break
                self._send_stream(stream)
            self._write_out()
        self._write_out()

    def _write_out(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.out_buf.write(data)
            self.vc.write.reenable()

    def _send_stream(self, stream: Http2Stream) -> None:
        """Move what the stream holds into frames, as far as the windows allow."""
        ready = self.ready
        if stream.closed:
            ready.pop(stream, None)
            return
        conn = self.conn
        sid = stream.stream_id
        reader = stream.write_reader
        avail = reader.read_avail()
        try:
            head = stream.head
            if head is not None:
                stream.head = None
                end = stream.ended and not avail and not stream.aborted
                conn.send_headers(sid, head, end_stream=end)
                if end:
                    self._stream_done(stream)
                    return
            while avail:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    ready.pop(stream, None)  # WINDOW_UPDATE brings it back (_window_opened)
                    if not self.stalled_since:
                        self.stalled_since = self.proc.nh.thread.now
                    return
                n = min(avail, window, conn.max_outbound_frame_size)
                avail -= n
                end = stream.ended and not avail and not stream.aborted
                conn.send_data(sid, reader.read(n), end_stream=end)
                if end:
                    self._stream_done(stream)
                    return
                if self.out_buf.high_water():
                    self._write_out()
                    if self.out_buf.high_water():
                        return  # still ready: WRITE_READY goes on
            if stream.ended:
                if stream.aborted:
                    self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
                else:
                    conn.end_stream(sid)
                    self._stream_done(stream)
                return
        except (StreamClosedError, ProtocolError):
            self._stream_gone(stream)
            return
        ready.pop(stream, None)
        sm = stream.sm
        if sm is not None and sm.origin_paused:
            sm.client_drained()  # the buffer drained: read the origin again

    def _window_opened(self, stream_id: int) -> None:
        self.stalled_since = 0.0
        streams = self.streams
        if stream_id:
            stream = streams.get(stream_id)
            if stream is not None and (stream.write_reader.read_avail() or stream.ended):
                self.ready[stream] = None
            return
        for stream in streams.values():
            if stream.write_reader.read_avail() or stream.ended or stream.head is not None:
                self.ready[stream] = None

    def _stalled(self) -> bool:
        since = self.stalled_since
        return bool(since) and self.proc.nh.thread.now - since >= self.http.h2_timeout

    # -- transaction active timeouts --------------------------------------------------------------
    def arm_active(self, stream: Http2Stream, seconds: float) -> None:
        now = self.proc.nh.thread.now
        stream.active_at = at = now + seconds
        vc = self.vc
        if not vc.active_at or at < vc.active_at:
            vc.set_active_timeout(seconds)

    def _streams_expired(self) -> None:
        """The VC's active timeout: reset the streams past their deadline, re-arm for the next."""
        now = self.proc.nh.thread.now
        upcoming = 0.0
        for stream in list(self.streams.values()):
            at = stream.active_at
            if not at:
                continue
            if at <= now:
                _dbg("stream %d: transaction active timeout", stream.stream_id)
                self.reset_stream(stream, ErrorCodes.CANCEL)
            elif not upcoming or at < upcoming:
                upcoming = at
        self.vc.set_active_timeout(upcoming - now if upcoming else 0)

    # -- stream ends -----------------------------------------------------------------------------
    def _stream_done(self, stream: Http2Stream) -> None:
        """END_STREAM went out."""
        if not stream.client_done:
            # The response is complete before the request (RFC 9113 8.1): stop the upload.
            self._reset(stream.stream_id, ErrorCodes.NO_ERROR)
        self._stream_gone(stream)

    def reset_stream(self, stream: Http2Stream, code: ErrorCodes) -> None:
        self.proc.counters[M_STREAM_ERRORS] += 1
        self._reset(stream.stream_id, code)
        self._stream_gone(stream)
        self._output()

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except (StreamClosedError, ProtocolError):
            pass

    def _stream_gone(self, stream: Http2Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        self.ready.pop(stream, None)
        if self.streams.pop(stream.stream_id, None) is not None:
            self.proc.counters[M_CUR_STREAMS] -= 1
        sm = stream.sm
        if sm is not None:
            stream.sm = None
            sm.client_closed()
        pending = stream.pending
        if pending:
            stream.pending = None
            try:
                self.conn.acknowledge_received_data(sum(n for _, n in pending if n > 0), stream.stream_id)
            except ProtocolError:
                pass
        stream.write_buf.dealloc_all_readers()
        if self.draining and not self.streams:
            self.closing = True
            self._output()

    # -- the connection's end --------------------------------------------------------------------
    def _calm(self, metric: int, what: str) -> None:
        self.proc.counters[metric] += 1
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, f"too many {what}")

    def _protocol_error(self, metric: int, reason: str) -> None:
        counters = self.proc.counters
        counters[M_CONN_ERRORS] += 1
        if metric:
            counters[metric] += 1
        _dbg("connection error from %s: %s", self.vc.remote_ip, reason)
        self._end_with_goaway()

    def _goaway(self, code: ErrorCodes, reason: str) -> None:
        _dbg("GOAWAY(%s) to %s: %s", code.name, self.vc.remote_ip, reason)
        try:
            self.conn.close_connection(code)
        except ProtocolError:
            pass
        self._end_with_goaway()

    def _end_with_goaway(self) -> None:
        """The GOAWAY is queued: the streams end now, the connection when it is written."""
        self.closing = True
        for stream in list(self.streams.values()):
            self._stream_gone(stream)
        self._write_out()
        self.vc.read.disable()
        if not self.out_reader.read_avail():
            self.close()

    def drain(self) -> None:
        """Graceful stop: GOAWAY(NO_ERROR) naming the last stream taken; the open ones finish.

        The frame is written here, not by ``H2Connection.close_connection``: h2 treats any GOAWAY
        as the connection's end and takes no frame after it, so the open streams could not finish.
        New streams get REFUSED_STREAM (``_request``)."""
        if self.closed or self.draining:
            return
        self.draining = True
        self._write_out()  # what h2 has queued goes first
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.out_buf.write(frame.serialize())
        self.vc.write.reenable()
        if not self.streams:
            self.closing = True
            self._output()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            self._stream_gone(stream)
        self.ready.clear()
        self.vc.do_io_close()
        proc = self.proc
        proc.sessions.pop(self, None)
        proc.counters[M_CUR_CONN] -= 1
        self.read_buf.dealloc_all_readers()
        self.out_buf.dealloc_all_readers()


def _request_of(headers: list[tuple[bytes, bytes]], ended: bool) -> RequestReceived | None:
    """The request head of an HTTP/2 HEADERS block, as the HTTP/1 parser would give it: Host
    from :authority, the cookie fields joined (RFC 9113 8.2.3). None: malformed."""
    method = path = authority = None
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] | None = None
    length: int | None = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(value)
            continue
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
        fields.append((name, value))
    if method is None:
        return None
    if authority is not None:
        fields = [(b"host", authority), *(f for f in fields if f[0] != b"host")]
    if cookies is not None:
        fields.append((b"cookie", b"; ".join(cookies)))
    if ended:
        body = _NONE
    elif length is not None:
        body = _LENGTH
    else:
        body = _CHUNKED  # to an HTTP/1.1 origin, a body of unknown length goes chunked
    target = path if path is not None else (authority or b"")
    return RequestReceived(method, target, b"2", fields, True, body, length)


__all__ = ["FrameScanner", "FrequencyCounter", "Http2ClientSession", "Http2Stream"]
