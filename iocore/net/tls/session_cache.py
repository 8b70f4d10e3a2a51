# Theory of operation
# -------------------
# SharedSessionCache is the TLS session cache of every worker process (ATS's SSLSessionCache,
# proxy.config.ssl.session_cache 2; nginx's ``ssl_session_cache shared:``). OpenSSL's own cache
# lives in each SSL_CTX of each process, so a client that resumes by session ID (TLS 1.2 with
# tickets off or refused, TLS 1.3 stateful tickets) on another worker than the one that made
# its session gets a full handshake. This cache is one anonymous MAP_SHARED mapping made before
# the master forks; OpenSSL's external cache callbacks (SSL_CTX_sess_set_new_cb / _get_cb /
# _remove_cb) store, find and drop DER-encoded sessions in it.
#
# Layout: ``entries`` slots of SLOT_SIZE bytes, direct-mapped by the session ID's first bytes
# (IDs are 32 random bytes); a new session overwrites whatever held its slot (the oldest
# session loses only when two IDs share a slot). A slot:
#
#   seq u32 | crc32 u32 | expiry f64 (time.time()) | id_len u8 | id 32 | tag 8 | der_len u16 | der
#
# ``tag`` names the certificate context (a hash of its ssl_multicert.config source) so that a
# session is only resumed by the context that issued it, as OpenSSL's per-context cache does:
# a session made for one name must not resume under another name's certificate.
#
# Concurrency: each process writes without a lock. A writer makes ``seq`` odd, writes, makes it
# even again; a reader copies the slot and accepts it only if ``seq`` was even and unchanged and
# the CRC matches: a torn or racing write is a cache miss, never a wrong session. OpenSSL then
# checks the session's own timeout and context id as for any cached session.
#
# The callbacks run inside SSL_do_handshake: they never raise (a failure is a miss), and their
# work is one DER encode and a slot write for a new TLS 1.2 / stateful TLS 1.3 session. TLS 1.3
# stateless tickets (the default) are not stored: they resume from the ticket.
"""A TLS session cache shared by the worker processes (ATS proxy.config.ssl.session_cache 2)."""

from __future__ import annotations

import hashlib
import mmap
import struct
import time
import zlib

from OpenSSL import SSL

from iocore.net.tls import _openssl

__all__ = ["SLOT_SIZE", "SharedSessionCache", "configure_session_cache", "session_cache_supported"]

SLOT_SIZE = 1024
_SLOT = struct.Struct("<IIdB32s8sH")
_SEQ = struct.Struct("<I")
MAX_DER = SLOT_SIZE - _SLOT.size
DEFAULT_TIMEOUT = 300  # OpenSSL's default session lifetime (seconds)


def session_cache_supported() -> bool:
    """True when the external session cache callbacks can be installed with this binding."""
    return _openssl.HAVE_SESSION_CALLBACKS


class SharedSessionCache:
    """See the theory of operation at the top. Make it before forking the workers."""

    def __init__(self, entries: int, timeout: int = 0) -> None:
        if entries < 1:
            raise ValueError("a session cache needs at least one entry")
        self.entries = entries
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._map = mmap.mmap(-1, entries * SLOT_SIZE, flags=mmap.MAP_SHARED)
        self._tags: dict[int, bytes] = {}  # SSL_CTX address -> context tag (this process)
        # The C callbacks, made once per cache (they must outlive every context using them).
        self._callbacks = (
            _openssl.SessionCallbacks(self._on_new, self._on_get, self.remove)
            if _openssl.HAVE_SESSION_CALLBACKS
            else None
        )

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, ctx: SSL.Context, source: str, timeout: int = 0) -> bool:
        """Serve ``ctx``'s session cache from this one (OpenSSL's internal cache off), for the
        certificate context named ``source``; ``timeout`` (a reloadable record) applies to the
        sessions stored from now on. False when the binding lacks the callbacks (the context
        keeps OpenSSL's per-process cache)."""
        callbacks = self._callbacks
        if callbacks is None:
            return False
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._tags[_openssl.ctx_address(ctx)] = hashlib.sha256(source.encode()).digest()[:8]
        callbacks.install(ctx, self.timeout)
        return True

    # -- the slots -------------------------------------------------------------------------------
    def _slot(self, sid: bytes) -> int:
        return (int.from_bytes(sid[:8], "little") % self.entries) * SLOT_SIZE

    def store(self, sid: bytes, tag: bytes, der: bytes, now: float | None = None) -> bool:
        if not 0 < len(sid) <= 32 or len(der) > MAX_DER:
            return False
        off = self._slot(sid)
        m = self._map
        seq = _SEQ.unpack_from(m, off)[0] | 1  # odd: being written
        _SEQ.pack_into(m, off, seq)
        expiry = (time.time() if now is None else now) + self.timeout
        body = struct.pack("<dB32s8sH", expiry, len(sid), sid, tag, len(der)) + der
        m[off + 8 : off + 8 + len(body)] = body
        struct.pack_into("<I", m, off + 4, zlib.crc32(body))
        _SEQ.pack_into(m, off, (seq + 1) & 0xFFFFFFFF)  # even again: complete
        return True

    def lookup(self, sid: bytes, tag: bytes, now: float | None = None) -> bytes | None:
        if not 0 < len(sid) <= 32:
            return None
        off = self._slot(sid)
        m = self._map
        copy = m[off : off + SLOT_SIZE]
        seq, crc, expiry, id_len, slot_id, slot_tag, der_len = _SLOT.unpack_from(copy, 0)
        if seq & 1 or _SEQ.unpack_from(m, off)[0] != seq:
            return None
        if id_len != len(sid) or slot_id[:id_len] != sid or slot_tag != tag or der_len > MAX_DER:
            return None
        if zlib.crc32(copy[8 : _SLOT.size + der_len]) != crc:
            return None
        if expiry < (time.time() if now is None else now):
            return None
        return bytes(copy[_SLOT.size : _SLOT.size + der_len])

    def remove(self, sid: bytes) -> None:
        if not 0 < len(sid) <= 32:
            return
        off = self._slot(sid)
        m = self._map
        _, _, _, id_len, slot_id, _, _ = _SLOT.unpack_from(m, off)
        if id_len == len(sid) and slot_id[:id_len] == sid:
            seq = _SEQ.unpack_from(m, off)[0] | 1
            _SEQ.pack_into(m, off, seq)
            m[off + 8 : off + _SLOT.size] = bytes(_SLOT.size - 8)
            _SEQ.pack_into(m, off, (seq + 1) & 0xFFFFFFFF)

    # -- OpenSSL's callbacks (via _openssl.SessionCallbacks, which catches every exception) ----
    def _on_new(self, ctx_address: int, sid: bytes, der: bytes) -> None:
        tag = self._tags.get(ctx_address)
        if tag is not None:
            self.store(sid, tag, der)

    def _on_get(self, ctx_address: int, sid: bytes) -> bytes | None:
        tag = self._tags.get(ctx_address)
        return None if tag is None else self.lookup(sid, tag)


def configure_session_cache(
    ctx: SSL.Context, mode: int, timeout: int, cache: SharedSessionCache | None, source: str
) -> None:
    """proxy.config.ssl.session_cache for one server context: 0 no cache, 1 OpenSSL's own (per
    worker process), 2 ``cache`` (shared); ``timeout`` 0 keeps OpenSSL's 300 s."""
    if mode == 0:
        _openssl.SSL_CTX_set_session_cache_mode(ctx, _openssl.SSL_SESS_CACHE_OFF)
        return
    if mode == 2 and cache is not None and cache.attach(ctx, source, timeout):
        return
    if timeout:
        _openssl.SSL_CTX_set_timeout(ctx, timeout)
