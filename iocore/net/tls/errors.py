"""Errors of the TLS layer.

TLSError is the base of everything the TLS code raises on purpose; OpenSSL's own exception
types are translated into these before they leave the layer. TLSProtocolError means the
remote peer sent something wrong (junk instead of a ClientHello, a malformed record, ...):
the connection is closed or tunnelled, never shown to a user as a traceback.
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
