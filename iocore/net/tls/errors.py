"""Errors of the TLS layer.

TLSError is the base of everything the TLS code raises on purpose; OpenSSL's own exception
types are translated into these before they leave the layer. TLSProtocolError means the
remote peer sent something wrong (junk instead of a ClientHello, a malformed record, ...):
the connection is closed or tunnelled, never shown to a user as a traceback.

From the ClientHello pre-parser a plain TLSProtocolError means "this is not a hello the
pre-parser reads": the bytes go to OpenSSL, which decides and sends its own alert. Only
ClientHelloRefused, a resource bound the pre-parser enforces itself, carries the alert to send.
"""

from __future__ import annotations

from iocore.records.errors import TSError


class TLSError(TSError):
    """Base of every error the TLS layer raises on purpose."""


class TLSProtocolError(TLSError):
    """The remote peer broke the TLS protocol; ``reason`` says how, in a short phrase."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ClientHelloRefused(TLSProtocolError):
    """The pre-parser refuses the hello itself (a resource bound); ``alert`` is the TLS alert
    description to send (RFC 8446 section 6), the one OpenSSL sends for the same bytes."""

    def __init__(self, reason: str, alert: int) -> None:
        super().__init__(reason)
        self.alert = alert


class HandshakeStateError(RuntimeError):
    """The handshake machine (handshake.py) was asked for a transition its table does not
    allow, or for a call its current state does not accept: a bug in the driver, not the peer."""
