"""ProxyTransaction: the client side of one HTTP transaction, as the HttpSM sees it (ATS ProxyTransaction).

Theory of operation
-------------------
``HttpSM`` does not know which protocol carried its request. A client session of some protocol
(``Http1ClientSession`` now; an HTTP/2 stream later) parses the client's bytes, hands the SM the
request head and body (``HttpSM.start``, ``request_body``, ``request_end``), and gives it this
small interface for the way back:

* ``write_buf`` / ``write_reader``: the response bytes for the client. The buffer is also the
  downstream of the origin read buffer (MIOBuffer.downstream), which is the flow control: the
  origin is read only while the two hold less than ``flow_control.high_water`` together, and a
  drained buffer comes back to the SM as ``HttpSM.client_drained``;
* ``write_reenable``: push what was written;
* ``txn_done(keep_alive)``: the transaction ended; the session reads the next request or closes;
* ``abort_response``: the origin failed after the head went out: send what is buffered, then
  close; ``discard_input``: the rest of the client's input cannot be used (an error mid-body);
* ``resume_input``: the SM no longer holds the client's input back (its origin connection is
  ready, a hook re-enabled, the upload buffer drained);
* ``vc``, ``scheme``, ``port``: where the request came in (remap, logs, the plugin facade);
* the response in the protocol's own form: ``response_framing`` (how the body goes: HTTP/1
  chunks or an until-close body; HTTP/2 DATA frames and END_STREAM), ``write_response_head``,
  ``write_interim`` (a 1xx), ``write_error`` (an answer tsproxy makes), ``write_complete``
  (a plugin's whole response);
  the body bytes after a head go into ``write_buf`` as ``response_framing`` said;
* ``txn_start``: a transaction began on this client side (its timeouts).

The base class raises for each method; it is a compiled class so that the SM's calls through it
are native vtable calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iocore.eventsystem.event import Continuation
from iocore.eventsystem.iobuffer import IOBufferReader, MIOBuffer

if TYPE_CHECKING:
    from iocore.net.net_vconnection import NetVConnection
    from tsproxy.http.parser import BodyMode, RequestReceived, ResponseReceived
    from tsproxy.http_sm import HttpConfig


class ProxyTransaction(Continuation):
    """The protocol side of a transaction (see the module docstring)."""

    __slots__ = ("closed", "port", "scheme", "vc", "write_buf", "write_reader")

    def __init__(self, vc: NetVConnection, scheme: str, port: int, write_buf: MIOBuffer) -> None:
        super().__init__()
        self.vc = vc
        self.scheme = scheme
        self.port = port
        self.write_buf = write_buf
        self.write_reader: IOBufferReader = write_buf.alloc_reader()
        self.closed = False

    def txn_start(self, http: HttpConfig) -> None:
        raise NotImplementedError

    def response_framing(self, origin_body: BodyMode, req: RequestReceived) -> BodyMode:
        raise NotImplementedError

    def write_response_head(
        self,
        req: RequestReceived,
        ev: ResponseReceived,
        via: bytes | None,
        keep_alive: bool,
        framing: BodyMode,
    ) -> None:
        raise NotImplementedError

    def write_interim(self, req: RequestReceived, ev: ResponseReceived) -> None:
        raise NotImplementedError

    def write_error(self, status: int, note: str, *, close: bool) -> None:
        """A small text/plain answer tsproxy makes itself (tsproxy.http.message.error_response)."""
        raise NotImplementedError

    def write_complete(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool, head_only: bool
    ) -> None:
        """A whole response (a plugin's ``respond``): its headers, the
        protocol's framing (Content-Length is the body's; HTTP/1 says Connection: close when
        ``close``)."""
        raise NotImplementedError

    def write_reenable(self) -> None:
        raise NotImplementedError

    def txn_done(self, keep_alive: bool) -> None:
        raise NotImplementedError

    def abort_response(self) -> None:
        raise NotImplementedError

    def discard_input(self) -> None:
        raise NotImplementedError

    def resume_input(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


__all__ = ["ProxyTransaction"]
