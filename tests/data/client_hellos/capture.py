"""Re-capture the ClientHellos in this directory from real TLS clients.

Run from the repository root:  python tests/data/client_hellos/capture.py

For each client, listen on 127.0.0.1 (port 0) with a plain TCP socket, start the client
against it, read whatever it sends first until the TLS records it announced are all there
(or 3 s pass), then close the socket; the client fails, which is expected. The raw bytes
(TLS record headers included) are written to NAME.bin next to this script.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _records_complete(buf: bytes) -> bool:
    """True once buf holds whole TLS records that carry a whole handshake message."""
    pos, payload = 0, b""
    while len(buf) - pos >= 5:
        n = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if len(buf) - pos - 5 < n:
            return False
        payload += buf[pos + 5 : pos + 5 + n]
        pos += 5 + n
        if len(payload) >= 4 and len(payload) >= 4 + int.from_bytes(payload[1:4], "big"):
            return pos == len(buf)
    return False


def capture(start_client: Callable[[int], Callable[[], None]], timeout: float = 3.0) -> tuple[bytes, int]:
    """Return (first bytes the client sent, number of recv() calls it took)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(timeout)
        stop = start_client(lsock.getsockname()[1])
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(timeout)
                buf, reads = b"", 0
                while not _records_complete(buf):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    reads += 1
        finally:
            stop()
    return buf, reads


def _s_client(*extra: str) -> Callable[[int], Callable[[], None]]:
    def start(port: int) -> Callable[[], None]:
        args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "example.com"]
        proc = subprocess.Popen(
            [*args, "-alpn", "h2,http/1.1", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            proc.kill()
            proc.wait()

        return stop

    return start


def _in_thread(connect: Callable[[int], None]) -> Callable[[int], Callable[[], None]]:
    def start(port: int) -> Callable[[], None]:
        def run() -> None:
            # The capturing server hangs up mid-handshake; that is the point.
            with contextlib.suppress(Exception):
                connect(port)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return lambda: t.join(5)

    return start


def python_ssl_client(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        ctx.wrap_socket(s, server_hostname="python.example.com")


def pyopenssl_client(port: int) -> None:
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_alpn_protos([b"h2", b"http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        conn = SSL.Connection(ctx, s)
        conn.set_tlsext_host_name(b"pq.example.com")
        conn.set_connect_state()
        conn.do_handshake()


CLIENTS: dict[str, Callable[[int], Callable[[], None]]] = {
    "openssl_s_client_tls13": _s_client("-tls1_3"),
    "openssl_s_client_tls12": _s_client("-tls1_2"),
    "python_ssl": _in_thread(python_ssl_client),
    "pyopenssl_mlkem": _in_thread(pyopenssl_client),
}


def main() -> int:
    for name, start in CLIENTS.items():
        data, reads = capture(start)
        (HERE / f"{name}.bin").write_bytes(data)
        print(f"{name}: {len(data)} bytes in {reads} read(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
