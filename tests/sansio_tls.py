"""A TLS client over memory BIOs, driven over a raw socket by the test: the test decides what
goes out in which packet (a ClientHello in pieces, a request in the same send as the Finished)."""

from __future__ import annotations

import socket
import ssl

import pytest


class SansIOClient:
    """An ``ssl.SSLObject`` on memory BIOs; ``client_hello`` is ready before any socket exists."""

    def __init__(self, ctx: ssl.SSLContext, sni: str | None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        self.client_hello = self.outgoing.read()

    def finish_handshake(self, sock: socket.socket, *, send_finished: bool = True) -> None:
        """Run the handshake to its end, once the test has sent ``client_hello`` (whole or in
        pieces); with ``send_finished`` False the client's Finished stays queued for the next
        ``send``."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                pending = self.outgoing.read()
                if pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("EOF during the handshake") from None
                self.incoming.write(data)
                continue
            if send_finished:
                sock.sendall(self.outgoing.read())
            return

    def send(self, sock: socket.socket, data: bytes) -> None:
        """``data`` as application data, in one send with whatever is still queued."""
        self.obj.write(data)
        sock.sendall(self.outgoing.read())

    def read_until(self, sock: socket.socket, marker: bytes | None = None) -> bytes:
        """Application data until ``marker`` has arrived, else until the peer closes."""
        chunks: list[bytes] = []
        while marker is None or marker not in b"".join(chunks):
            try:
                data = self.obj.read(65536)
            except ssl.SSLWantReadError:
                raw = sock.recv(65536)
                if not raw:
                    break
                self.incoming.write(raw)
                continue
            except ssl.SSLZeroReturnError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def request(self, sock: socket.socket, request: bytes) -> bytes:
        """Send ``request``; the response up to the close."""
        self.send(sock, request)
        return self.read_until(sock)
