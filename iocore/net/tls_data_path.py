"""TLSDataPath: the TLS data path of a VC once its handshake is done (ATS SSLNetVConnection's
ssl_read_from_net / ssl_write_to_net and its socket switch), the base of SSLNetVConnection.

Theory of operation
-------------------
The handshake runs over memory BIOs (the ClientHello is read and parsed before OpenSSL sees it;
see iocore/net/tls/handshake.py). Afterwards the memory-BIO path reads raw ciphertext from the
socket into the read BIO and decrypted records out of OpenSSL into per-thread scratch memory,
and drains the write BIO into ``_out_raw``, which ``_flush_raw`` sends. Once both memory BIOs
are empty the SSL gets the socket itself (``_use_socket_bio``, ATS's switch to the fd BIO once
the handshake buffer is drained): SSL_read/SSL_write then do the reads and writes, with
read-ahead on so one read(2) takes every queued record. A VC that became a blind tunnel
(``attributes``) moves bytes as a plain NetVConnection.

The subclass supplies ``_handshake_step``, run on every readiness event until the handshake is
complete. ``close_ssl`` is the one close_notify of a finished TLS connection.
"""

from __future__ import annotations

import contextlib
import enum
import socket
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import VC_EVENT_EOS, VC_EVENT_ERROR
from iocore.net.net_vconnection import EVENT_READ, EVENT_WRITE, NetVConnection
from iocore.net.tls._openssl import HAVE_SOCKET_BIO as _HAVE_SOCKET_BIO
from iocore.net.tls._openssl import NULL as _NULL
from iocore.net.tls._openssl import SSL_ERROR_WANT_READ as _SSL_ERROR_WANT_READ
from iocore.net.tls._openssl import SSL_ERROR_WANT_WRITE as _SSL_ERROR_WANT_WRITE
from iocore.net.tls._openssl import SSL_ERROR_ZERO_RETURN as _SSL_ERROR_ZERO_RETURN
from iocore.net.tls._openssl import BIO_get_mem_data as _BIO_get_mem_data
from iocore.net.tls._openssl import BIO_read as _BIO_read
from iocore.net.tls._openssl import BIO_write as _BIO_write
from iocore.net.tls._openssl import SSL_get_error as _SSL_get_error
from iocore.net.tls._openssl import SSL_has_pending as _has_pending
from iocore.net.tls._openssl import SSL_pending as _SSL_pending
from iocore.net.tls._openssl import SSL_read as _SSL_read
from iocore.net.tls._openssl import SSL_set_fd as _ssl_set_fd
from iocore.net.tls._openssl import SSL_write as _SSL_write
from iocore.net.tls._openssl import ffi_buffer as _ffi_buffer
from iocore.net.tls._openssl import ffi_from_buffer as _ffi_from_buffer
from iocore.net.tls._openssl import ffi_new as _ffi_new
from iocore.net.tls._openssl import handle_bio_errors as _handle_bio_errors
from iocore.net.tls._openssl import raise_ssl_error as _raise_ssl_error
from iocore.net.tls._openssl import read_bio as _read_bio
from iocore.net.tls._openssl import ssl_pointer as _ssl_pointer
from iocore.net.tls._openssl import write_bio as _write_bio

if TYPE_CHECKING:
    from iocore.eventsystem.iobuffer import VIO, IOBufferReader
    from iocore.net.net_handler import NetHandler

TLS_RECORD_MAX = 16384
RAW_READ = 65536

_dbg_err = DbgCtl("ssl.error")


class Transport(enum.Enum):
    DEFAULT = 0
    BLIND_TUNNEL = 1


BLIND_TUNNEL = Transport.BLIND_TUNNEL  # a module global: read on every readiness event

_OUT_SCRATCH = 65536
# _has_pending is SSL_has_pending when available (_HAVE_SOCKET_BIO); without it read-ahead stays
# off, _has_pending answers 0 and SSL_pending suffices.


class _SSLScratch:
    """Per-EThread scratch memory of the TLS data path: the raw socket read lands in ``raw``
    and goes to the read BIO from there, decrypted records land in ``rec``, ciphertext is
    drained through ``out``. The data is copied out before the loop runs anything else, so one
    set per thread suffices and no read allocates a buffer of its own size."""

    __slots__ = ("out", "raw", "raw_view", "rec")

    def __init__(self) -> None:
        self.raw = _ffi_new("char[]", RAW_READ)
        self.raw_view = _ffi_buffer(self.raw)
        self.rec = _ffi_new("char[]", TLS_RECORD_MAX)
        self.out = _ffi_new("char[]", _OUT_SCRATCH)


def _scratch_of(nh: Any) -> _SSLScratch:
    scratch = getattr(nh, "ssl_scratch", None)
    if scratch is None:
        scratch = _SSLScratch()
        with contextlib.suppress(AttributeError):
            nh.ssl_scratch = scratch
    return scratch


def _drain_out(ssl: SSL.Connection, pending: int, scratch: _SSLScratch, out: bytearray) -> None:
    """Append ``pending`` bytes of the write BIO to ``out`` (ssl.bio_read without its copy)."""
    if pending > _OUT_SCRATCH:
        out += ssl.bio_read(pending)
        return
    n = _BIO_read(_write_bio(ssl), scratch.out, pending)
    if n <= 0:
        _handle_bio_errors(ssl, _write_bio(ssl), n)
        return
    out += _ffi_buffer(scratch.out, n)


class TLSDataPath(NetVConnection):
    """The TLS data path over memory BIOs, then over the socket BIO."""

    __slots__ = (
        "_out_raw",
        "_raw_eof",
        "_read_wants_write",
        "_scratch",
        "_sock_bio",
        "attributes",
        "ssl",
        "ssl_handshake_complete",
    )

    def __init__(self, sock: socket.socket, nh: NetHandler) -> None:
        super().__init__(sock, nh)
        self._scratch = _scratch_of(self.nh)
        self.ssl: SSL.Connection | None = None
        self.ssl_handshake_complete = False
        self.attributes = Transport.DEFAULT
        self._out_raw = bytearray()
        self._sock_bio = False  # OpenSSL reads and writes the socket itself (_use_socket_bio)
        self._read_wants_write = False  # SSL_read must send first (socket BIO): retry on EVENT_WRITE
        self._raw_eof = False

    def _handshake_step(self) -> None:
        """Advance the handshake (SSLNetVConnection drives its machine here; the data path never
        calls it once the handshake is complete)."""
        raise NotImplementedError

    def _on_io_unguarded(self, mask: int) -> None:
        if self.ssl_handshake_complete and self.attributes is not BLIND_TUNNEL:
            # The TLS data path: net_read_io / write_to_net_io resolved without their dispatch.
            if self._sock_bio:
                if mask & EVENT_READ or self._read_wants_write:
                    self._ssl_read_sock()
                if mask & EVENT_WRITE and not self.closed:
                    self._ssl_write_sock()
                return
            if mask & EVENT_WRITE and self._out_raw and not self._flush_raw():
                return
            if mask & EVENT_READ:
                self._ssl_read()
            if mask & EVENT_WRITE and not self.closed:
                self.write_to_net_io()
            return
        if self.attributes is BLIND_TUNNEL or self.ssl_handshake_complete:
            if mask & EVENT_WRITE and self._out_raw and not self._flush_raw():
                return
            NetVConnection._on_io_unguarded(self, mask)
            return
        self._handshake_step()

    def net_read_io(self) -> None:
        if self.attributes is BLIND_TUNNEL:
            NetVConnection.net_read_io(self)
        elif not self.ssl_handshake_complete:
            self._handshake_step()
        elif self._sock_bio:
            self._ssl_read_sock()
        else:
            self._ssl_read()

    def write_to_net_io(self) -> None:
        if self.attributes is BLIND_TUNNEL:
            NetVConnection.write_to_net_io(self)
        elif self._sock_bio:
            self._ssl_write_sock()
        elif self.ssl_handshake_complete:
            self._ssl_write()

    def _has_buffered_input(self) -> bool:
        # Record bytes OpenSSL already holds (decrypted or not), or, on the memory BIO,
        # ciphertext it has not looked at yet (application data that came with the Finished).
        ssl = self.ssl
        if not self.ssl_handshake_complete or ssl is None:
            return False
        if self._sock_bio:
            return bool(_has_pending(_ssl_pointer(ssl)))
        return (
            _SSL_pending(_ssl_pointer(ssl)) > 0
            or self._raw_eof
            or _BIO_get_mem_data(_read_bio(ssl), _NULL) > 0
            or _has_pending(_ssl_pointer(ssl)) > 0
        )

    def _read_raw_into_bio(self) -> int:
        """Read from the socket into the SSL read BIO: the byte count, 0 for EOF, or ``-errno``
        (``-11`` = EAGAIN: nothing yet)."""
        scratch = self._scratch
        try:
            n = self.sock.recv_into(scratch.raw_view)
        except (BlockingIOError, InterruptedError):
            return -11
        except OSError as exc:
            return -(exc.errno or 5)
        if not n:
            return 0
        ssl = self.ssl
        assert ssl is not None
        # ssl.bio_write, straight from the scratch buffer (a memory BIO takes it all)
        result = _BIO_write(_read_bio(ssl), scratch.raw, n)
        if result <= 0:
            _handle_bio_errors(ssl, _read_bio(ssl), result)
        return n

    def close_ssl(self) -> None:
        """Before the socket closes: the close_notify of a finished TLS connection.

        OpenSSL drops a session from its cache when the SSL is freed without SSL_SENT_SHUTDOWN
        (ssl_clear_bad_session), so a client that closed first could never resume. As nginx:
        send close_notify unless the peer has gone with a bare EOF, and then mark the shutdown
        done without writing (a quiet shutdown)."""
        ssl = self.ssl
        if ssl is None or not self.ssl_handshake_complete:
            return
        if not self.eos or ssl.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
            with contextlib.suppress(SSL.Error):
                ssl.shutdown()
            self._flush_ssl_output()
        ssl.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)

    # -- TLS data path -----------------------------------------------------------------------
    def _flush_ssl_output(self) -> None:
        ssl = self.ssl
        if ssl is None or self._sock_bio:
            return
        out = self._out_raw
        pending = _BIO_get_mem_data(_write_bio(ssl), _NULL)
        if pending:
            _drain_out(ssl, pending, self._scratch, out)
        if out:
            self._flush_raw()

    def _flush_raw(self) -> bool:
        """Send pending ciphertext; True when all of it went out."""
        out = self._out_raw
        try:
            n = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._out_raw = bytearray()
            return True  # the read side will see the error
        if n == len(out):
            out.clear()
            if self._mask & EVENT_WRITE:
                self._update_interest()
            return True
        del out[:n]
        if not self._mask & EVENT_WRITE:
            self._update_interest()
        return False

    def _ssl_read(self) -> None:
        vio = self.read
        buf = vio.buffer
        ssl = self.ssl
        if self.closed or not self.read_enabled or buf is None or ssl is None:
            self._update_interest()
            return
        got_raw = False
        chunks: list[bytes] = []
        room = min(buf.write_avail(), vio.nbytes - vio.ndone)
        if room <= 0:
            self._read_no_room()
            return
        eos = False
        error = False
        rec = self._scratch.rec
        ssl_ptr = _ssl_pointer(ssl)
        into = _read_bio(ssl)
        while room > 0:
            if (
                self._raw_eof
                or _SSL_pending(ssl_ptr)
                or _BIO_get_mem_data(into, _NULL)
                or _has_pending(ssl_ptr)  # read-ahead: records OpenSSL already took from the BIO
            ):
                try:
                    # ssl.recv() without its per-call buffer allocation; errors as in pyOpenSSL
                    n = _SSL_read(ssl_ptr, rec, min(room, TLS_RECORD_MAX))
                    if n > 0:
                        data = _ffi_buffer(rec, n)[:]
                    else:
                        _raise_ssl_error(ssl, ssl_ptr, n)
                        data = b""
                except SSL.WantReadError:  # a partial record: more ciphertext is needed
                    if self._raw_eof:
                        eos = True
                        break
                except SSL.ZeroReturnError:
                    eos = True
                    break
                except SSL.SysCallError:
                    eos = True  # EOF without close_notify: treat as end of stream
                    break
                except SSL.Error as exc:
                    _dbg_err("SSL read error from %s: %s", self.remote_addr, exc)
                    error = True
                    break
                else:
                    if not data:
                        break  # SSL_read gave nothing and no error: never spin on it
                    chunks.append(data)
                    room -= len(data)
                    continue
            # Nothing (whole) buffered in OpenSSL: one read from the socket per event. Checking
            # the BIOs first spares the WantReadError that SSL_read would raise.
            if got_raw:
                break
            got_raw = True
            retval = self._read_raw_into_bio()
            if retval == -11:
                break
            if retval <= 0:
                self._raw_eof = True
                ssl.bio_shutdown()
        # Reading can make OpenSSL write (an alert for a renegotiation attempt, a KeyUpdate
        # reply): whatever it queued in the write BIO goes out now.
        self._flush_ssl_output()
        if chunks:
            data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
            self._deliver(data)
            if self.closed:
                return
        if error:
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_ERROR)
        elif eos and not (ssl.pending() > 0):
            self.eos = True
            self.read_enabled = False
            self._raw_eof = False
            self._update_interest()
            self._signal(vio, VC_EVENT_EOS)
        elif not self.closed:
            self._use_socket_bio()

    def _ssl_write(self) -> None:
        vio = self.write
        reader = vio.reader
        ssl = self.ssl
        if self.closed or ssl is None:
            return
        if self._out_raw and not self._flush_raw():
            return
        if not self.write_enabled or reader is None:
            self._update_interest()
            return
        todo = vio.nbytes - vio.ndone
        avail = min(reader.read_avail(), todo)
        wrote = 0
        scratch = self._scratch
        while avail > 0 and len(self._out_raw) < 262144:
            n = self._ssl_write_record(ssl, reader, avail)
            if n <= 0:  # a memory BIO takes every record: only an error stops it
                return
            reader.consume(n)
            vio.ndone += n
            avail -= n
            wrote += n
            pending = _BIO_get_mem_data(_write_bio(ssl), _NULL)
            if pending:
                _drain_out(ssl, pending, scratch, self._out_raw)
        if wrote:
            self.net_activity()
        if self._out_raw and not self._flush_raw():
            return
        self._use_socket_bio()
        self._ssl_wrote(vio, reader, wrote)

    def _ssl_write_record(self, ssl: SSL.Connection, reader: IOBufferReader, avail: int) -> int:
        """SSL_write of up to one record from the reader's front; nothing is consumed here.

        Returns the bytes OpenSSL took, 0 when the socket is full (WANT_WRITE: the same bytes
        are offered again later, and may have moved: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, set
        by pyOpenSSL), or -1 after signalling VC_EVENT_ERROR."""
        ssl_ptr = _ssl_pointer(ssl)
        with (
            reader.peek(avail if avail < TLS_RECORD_MAX else TLS_RECORD_MAX) as chunk,
            _ffi_from_buffer(chunk) as cdata,
        ):
            n = _SSL_write(ssl_ptr, cdata, len(chunk))
        if n > 0:
            return int(n)
        if _SSL_get_error(ssl_ptr, n) == _SSL_ERROR_WANT_WRITE:
            return 0
        try:  # pyOpenSSL's mapping of the error, which also clears OpenSSL's error queue
            _raise_ssl_error(ssl, ssl_ptr, n)
        except SSL.Error as exc:
            _dbg_err("SSL write error to %s: %s", self.remote_addr, exc)
        self.write_enabled = False
        self._signal(self.write, VC_EVENT_ERROR)
        return -1

    def _ssl_wrote(self, vio: VIO, reader: IOBufferReader, wrote: int) -> None:
        """After a write pass that was not held up: WRITE_COMPLETE, or WRITE_READY once the
        reader is drained (with bytes left, another pass is queued)."""
        if vio.ndone >= vio.nbytes:
            self.write_enabled = False
            self._update_interest()
            self._signal(vio, 103)  # VC_EVENT_WRITE_COMPLETE
        elif wrote:
            if reader.read_avail():
                self.nh.write_ready_list[self] = None
            else:
                self._signal(vio, 101)  # VC_EVENT_WRITE_READY

    # -- the socket-BIO data path (ATS: the fd BIO once the handshake buffer is drained) ------------
    def _use_socket_bio(self) -> None:
        """Hand the socket to OpenSSL once both memory BIOs are empty.

        The memory BIOs exist for the handshake (the ClientHello is read and parsed before
        OpenSSL sees it). Afterwards they only cost copies: SSL_read and SSL_write on the
        socket save a recv/send from Python, a BIO copy each way, and the BIOs' memory. Bytes
        OpenSSL already took from the read BIO stay in its record layer across the switch.
        """
        ssl = self.ssl
        if (
            self._sock_bio
            or ssl is None
            or self._out_raw
            or self._raw_eof
            or _BIO_get_mem_data(_read_bio(ssl), _NULL)
            or _BIO_get_mem_data(_write_bio(ssl), _NULL)
            or not _HAVE_SOCKET_BIO
        ):
            return
        # frees both memory BIOs; pyOpenSSL's bookkeeping (its reverse map) follows in _openssl
        if not _ssl_set_fd(ssl, self.fd):
            return
        self._sock_bio = True

    def _ssl_read_sock(self) -> None:
        vio = self.read
        buf = vio.buffer
        ssl = self.ssl
        if self._read_wants_write:
            self._read_wants_write = False  # retried now; set again below if it still must wait
            self._update_interest()
        if self.closed or not self.read_enabled or buf is None or ssl is None:
            self._update_interest()
            return
        room = min(buf.write_avail(), vio.nbytes - vio.ndone)
        if room <= 0:
            self._read_no_room()
            return
        rec = self._scratch.rec
        ssl_ptr = _ssl_pointer(ssl)
        has_pending = _has_pending
        chunks: list[bytes] = []
        eos = error = False
        while room > 0:
            n = _SSL_read(ssl_ptr, rec, room if room < TLS_RECORD_MAX else TLS_RECORD_MAX)
            if n > 0:
                chunks.append(_ffi_buffer(rec, n)[:])
                room -= n
                if not has_pending(ssl_ptr):
                    break  # the next SSL_read would find an empty socket: wait for epoll instead
                continue
            err = _SSL_get_error(ssl_ptr, n)
            if err == _SSL_ERROR_WANT_READ:
                break
            if err == _SSL_ERROR_ZERO_RETURN:
                eos = True
            elif err == _SSL_ERROR_WANT_WRITE:
                # OpenSSL has something to send (a KeyUpdate reply) and the socket is full:
                # the read is retried when the socket is writable.
                self._read_wants_write = True
                self._update_interest()
            else:
                try:  # pyOpenSSL's mapping of the error, which also clears OpenSSL's error queue
                    _raise_ssl_error(ssl, ssl_ptr, n)
                except SSL.SysCallError:
                    eos = True  # EOF without close_notify, or a reset
                except SSL.Error as exc:
                    _dbg_err("SSL read error from %s: %s", self.remote_addr, exc)
                    error = True
            break
        if chunks:
            self._deliver(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            if self.closed:
                return
        if error:
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_ERROR)
        elif eos:
            self.eos = True
            self.read_enabled = False
            self._update_interest()
            self._signal(vio, VC_EVENT_EOS)

    def _ssl_write_sock(self) -> None:
        vio = self.write
        reader = vio.reader
        ssl = self.ssl
        if self.closed or ssl is None:
            return
        if not self.write_enabled or reader is None:
            self._update_interest()
            return
        avail = min(reader.read_avail(), vio.nbytes - vio.ndone)
        wrote = 0
        blocked = False
        while avail > 0:
            n = self._ssl_write_record(ssl, reader, avail)
            if n < 0:
                return
            if n == 0:
                blocked = True
                break
            reader.consume(n)
            vio.ndone += n
            avail -= n
            wrote += n
        if wrote:
            self.net_activity()
        if blocked != self._write_blocked:
            self._set_write_blocked(blocked)
        if not blocked:
            self._ssl_wrote(vio, reader, wrote)

    @property
    def ssl_version(self) -> str | None:
        return self.ssl.get_protocol_version_name() if self.ssl is not None else None


__all__ = ["BLIND_TUNNEL", "RAW_READ", "TLS_RECORD_MAX", "TLSDataPath", "Transport"]
