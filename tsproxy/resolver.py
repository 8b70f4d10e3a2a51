"""Origin name resolution off the event loop, cached like ATS HostDB.

Theory of operation
-------------------
``Resolver.lookup(host, port, callback)`` is called on the worker's loop thread. It answers at
once (returns a ``ResolveResult``, never calls ``callback``) when it can:

* ``host`` is an IPv4 or IPv6 literal;
* the cache holds a *fresh* entry (resolved less than ``proxy.config.hostdb.timeout`` ago), or a
  remembered failure younger than ``proxy.config.hostdb.fail.timeout``;
* the entry expired less than ``proxy.config.hostdb.serve_stale_for`` seconds ago
  (stale-while-refresh, ATS ``serve_stale_but_revalidate``): the old address is returned and
  one background resolution replaces it.

Otherwise it returns None, and ``callback(result)`` runs later on the loop thread. The blocking
``getaddrinfo`` runs in a small thread pool (``RESOLVER_THREADS``, made on first use, so after
the worker's fork); every lookup of a name that is already being resolved joins that resolution
instead of starting another. The pool thread hands its answer back with
``EThread.call_soon_threadsafe`` (as ``api.run_in_thread`` and OCSP stapling do), and only the
loop thread ever reads or changes the cache and the in-flight table: no locks.

Entry states, by age past the time it was stored: FRESH (< timeout) -> STALE (< timeout +
serve_stale_for: served, refreshed once in the background) -> DEAD (a lookup waits for a new
answer). A failed background refresh keeps serving the stale address until the window ends and
tries again no sooner than ``fail.timeout`` later. A failure with ``fail.timeout`` 0 (ATS's
default) is not remembered; lookups of that name still share one query at a time.

TTL: ``getaddrinfo`` reports no DNS TTL, so every ``proxy.config.hostdb.ttl_mode`` (0 obey,
1 ignore, 2 min, 3 max) comes down to ``proxy.config.hostdb.timeout``; a timeout of 0 keeps an
entry until the worker restarts. The cache holds at most ``RESOLVER_CACHE_MAX`` names; with one
TTL for every entry, insertion order is expiry order, so the oldest entry goes first.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl

if TYPE_CHECKING:
    from iocore.eventsystem.ethread import EThread
    from iocore.records.parser import RecordsConfig

RESOLVER_THREADS = 4  # getaddrinfo calls at once per worker
RESOLVER_CACHE_MAX = 4096  # names per worker (remap_required 0: any host may come)

# ATS HostDB ttl_mode values (I_HostDBProcessor.h TTL_OBEY ...).
TTL_OBEY, TTL_IGNORE, TTL_MIN, TTL_MAX = 0, 1, 2, 3

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
GetAddrInfo = Callable[..., Sequence[AddrInfo]]

_dbg = DbgCtl("hostdb")
_log = logging.getLogger("tsproxy.hostdb")


@dataclass(frozen=True, slots=True)
class ResolveResult:
    """One answer: ``family`` and ``addr`` (a sockaddr for connect), or ``error``, the reason
    for the log ("cannot resolve origin HOST: Name or service not known"); then ``family`` is
    ``AF_UNSPEC`` and ``addr`` empty."""

    family: int
    addr: tuple[Any, ...]
    error: str | None = None


ResolveCallback = Callable[[ResolveResult], None]


class _Entry:
    """A cached answer and the times that decide its state (``now`` clock seconds)."""

    __slots__ = ("expires_at", "refresh_after", "result")

    def __init__(self, result: ResolveResult, expires_at: float) -> None:
        self.result = result
        self.expires_at = expires_at
        self.refresh_after = 0.0  # no background refresh before this (after a failed one)


def literal_result(host: str, port: int) -> ResolveResult | None:
    """The sockaddr of an IP literal, as getaddrinfo would give it; None for a name."""
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            return None  # a scope id (fe80::1%eth0), brackets...: getaddrinfo decides
        return ResolveResult(socket.AF_INET6, (host, port, 0, 0))
    if host[:1].isdigit():
        try:
            socket.inet_pton(socket.AF_INET, host)
        except (OSError, ValueError):
            return None  # a name starting with a digit, or a short form (127.1)
        return ResolveResult(socket.AF_INET, (host, port))
    return None


def _failure(host: str, exc: BaseException | None) -> ResolveResult:
    if exc is None:
        reason = "no address"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:  # UnicodeError for a label the IDNA codec refuses, ValueError for a NUL...
        reason = str(exc) or type(exc).__name__
    return ResolveResult(socket.AF_UNSPEC, (), f"cannot resolve origin {host}: {reason}")


class Resolver:
    """Host name -> address cache of one worker (ATS HostDB), resolving off the loop.

    Make it on the loop's thread; ``lookup`` and ``prefetch`` only ever run there.
    ``getaddrinfo`` and ``now`` are injectable for tests.
    """

    def __init__(
        self,
        thread: EThread,
        records: RecordsConfig,
        *,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thread = thread
        self._getaddrinfo = getaddrinfo
        self._now = now
        self._owner = threading.get_ident()
        self._cache: dict[tuple[str, int], _Entry] = {}
        self._inflight: dict[tuple[str, int], list[ResolveCallback]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.timeout = 0.0
        self.serve_stale_for = 0.0
        self.fail_timeout = 0.0
        self.set_records(records)

    def set_records(self, records: RecordsConfig) -> None:
        """Take the hostdb records of a (reloaded) config; cached entries keep their times."""
        timeout = records.get_int("proxy.config.hostdb.timeout")
        # ttl_mode: obey/min/max need the DNS TTL, which getaddrinfo does not give; all four
        # modes therefore use the configured timeout (0: no expiry, as an ATS ip_timeout of 0).
        self.ttl_mode = records.get_int("proxy.config.hostdb.ttl_mode")
        self.timeout = float(timeout) if timeout > 0 else math.inf
        self.serve_stale_for = float(records.get_int("proxy.config.hostdb.serve_stale_for"))
        self.fail_timeout = float(records.get_int("proxy.config.hostdb.fail.timeout"))

    # -- the loop side ------------------------------------------------------------------------
    def lookup(self, host: str, port: int, callback: ResolveCallback) -> ResolveResult | None:
        """The answer now, or None and ``callback(result)`` later on the loop thread."""
        key = (host, port)
        entry = self._cache.get(key)
        if entry is not None:
            now = self._now()
            if now < entry.expires_at:
                return entry.result  # fresh, or a remembered failure
            if entry.result.error is None and now < entry.expires_at + self.serve_stale_for:
                if now >= entry.refresh_after and key not in self._inflight:
                    _dbg("serving %s stale while it is resolved again", host)
                    self._start(key, None)
                return entry.result
        else:
            literal = literal_result(host, port)
            if literal is not None:
                return literal
        self._start(key, callback)
        return None

    def prefetch(self, host: str, port: int) -> None:
        """Resolve ``host`` in the background unless the cache can answer (config warm-up
        without blocking the loop)."""
        self.lookup(host, port, _ignore)

    def _start(self, key: tuple[str, int], callback: ResolveCallback | None) -> None:
        waiters = self._inflight.get(key)
        if waiters is not None:
            if callback is not None:
                waiters.append(callback)
            return
        self._inflight[key] = [callback] if callback is not None else []
        pool = self._pool
        if pool is None:
            self.thread.ensure_wakeup()  # on the loop thread, before a pool thread needs it
            pool = self._pool = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="tsproxy-resolver")
        _dbg("resolving %s", key[0])
        thread = self.thread
        complete = self._complete

        def finished(future: Future[ResolveResult]) -> None:
            if future.cancelled():
                return  # close(): the worker is going away
            result = future.result()  # _resolve never raises
            thread.call_soon_threadsafe(lambda: complete(key, result))

        pool.submit(self._resolve, key[0], key[1]).add_done_callback(finished)

    def _complete(self, key: tuple[str, int], result: ResolveResult) -> None:
        """On the loop: store the answer, then call every lookup that waited for it."""
        self._store(key, result)
        for callback in self._inflight.pop(key, ()):
            try:
                callback(result)
            except Exception:
                _log.exception("resolver callback for %s raised", key[0])

    def _store(self, key: tuple[str, int], result: ResolveResult) -> None:
        now = self._now()
        cache = self._cache
        if result.error is not None:
            old = cache.get(key)
            if old is not None and old.result.error is None and now < old.expires_at + self.serve_stale_for:
                # A failed refresh: keep serving the stale address for the rest of its window.
                old.refresh_after = now + self.fail_timeout
                _dbg("%s; serving the stale address", result.error)
                return
            cache.pop(key, None)
            if self.fail_timeout <= 0:
                return
            entry = _Entry(result, now + self.fail_timeout)
        else:
            entry = _Entry(result, now + self.timeout)
            cache.pop(key, None)  # to the end: insertion order stays expiry order
        if len(cache) >= RESOLVER_CACHE_MAX:
            del cache[next(iter(cache))]
        cache[key] = entry

    # -- any thread ---------------------------------------------------------------------------
    def _resolve(self, host: str, port: int) -> ResolveResult:
        """Blocking getaddrinfo; the first answer, as connect will use it."""
        try:
            infos = self._getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # gaierror, UnicodeError, ValueError: all a failed lookup
            return _failure(host, exc)
        if not infos:
            return _failure(host, None)
        family, _, _, _, addr = infos[0]
        return ResolveResult(int(family), tuple(addr))

    def resolve_cached(self, host: str, port: int) -> ResolveResult:
        """Blocking: a fresh cached answer, else getaddrinfo in the calling thread. For the
        startup warm-up and callers off the loop only (it blocks for as long as DNS takes).
        The answer is stored in the cache (from another thread, through the loop)."""
        literal = literal_result(host, port)
        if literal is not None:
            return literal
        key = (host, port)
        entry = self._cache.get(key)
        if entry is not None and self._now() < entry.expires_at:
            return entry.result
        result = self._resolve(host, port)
        if threading.get_ident() == self._owner:
            self._store(key, result)
        else:
            self.thread.call_soon_threadsafe(lambda: self._store(key, result))
        return result

    def close(self) -> None:
        """Stop the pool (lookups still under way are dropped; their callbacks never run)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _ignore(result: ResolveResult) -> None:
    pass
