# Theory of operation
# -------------------
# OCSP stapling (ATS OCSPStapling.cc; RFC 6066 section 8), with proxy.config.ssl.ocsp.enabled.
#
# One StapledCert per certificate of an ssl_multicert.config line: the certificate, its issuer,
# where a response comes from (the ``ssl_ocsp_name`` file under proxy.config.ssl.ocsp.response.path
# when given, as ATS 9, else the responder URL of the certificate's AIA extension) and the cached
# response. OCSPStapling holds the StapledCerts of one configuration generation and installs the
# stapling callback on their contexts; the callback runs inside the handshake, on the event loop,
# and only reads the cache: it never waits for the network. A response is stapled only once
# tls.ocsp.verify_response accepted it (signed by the issuer or its delegated responder, about
# this certificate, within its validity) and never after its nextUpdate. With no response the
# handshake simply goes on without one: stapling never fails a handshake.
#
# OCSPUpdater is the worker's refresh loop (ATS's OCSP update continuation): every
# proxy.config.ssl.ocsp.update_period seconds it looks for the certificates whose response is
# due (none yet, proxy.config.ssl.ocsp.cache_timeout passed, or nextUpdate close enough that the
# next check would be too late) and fetches them on a small thread pool, HTTP POST (or GET with
# proxy.config.ssl.ocsp.request_mode 1) bounded by proxy.config.ssl.ocsp.request_timeout; a
# prefetched file is re-read when it changed. The result comes back to the loop thread
# (call_soon_threadsafe) which swaps it into the cache and counts it. A failure keeps the previous
# response while it is valid and retries at the next check. A reload hands the cache to the new
# generation for the certificates that did not change, so a reload costs no refetch.
#
# Each worker process keeps its own cache and fetches for itself (N workers: N requests per
# certificate per refresh).

from __future__ import annotations

import base64
import dataclasses
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.event import EVENT_INTERVAL, Continuation
from iocore.net.tls.ocsp import (
    OCSPError,
    OCSPUnknownCert,
    VerifiedResponse,
    build_request,
    verify_response,
)
from iocore.records.stats import METRIC_ID

if TYPE_CHECKING:
    from OpenSSL import SSL

    from iocore.eventsystem.ethread import EThread

__all__ = ["OCSPSettings", "OCSPStapling", "OCSPUpdater", "StapledCert"]

_log = logging.getLogger("tsproxy.ssl")
_dbg = DbgCtl("ssl_ocsp")

M_STAPLED = METRIC_ID["proxy.process.ssl.ssl_ocsp_stapled"]
M_REFRESHED = METRIC_ID["proxy.process.ssl.ssl_ocsp_refreshed_cert"]
M_FAILURE = METRIC_ID["proxy.process.ssl.ssl_ocsp_refresh_cert_failure"]
M_REVOKED = METRIC_ID["proxy.process.ssl.ssl_ocsp_revoked_cert"]
M_UNKNOWN = METRIC_ID["proxy.process.ssl.ssl_ocsp_unknown_cert"]

MAX_RESPONSE = 64 * 1024  # a response is a few KiB; never read more than this from a responder
POOL_SIZE = 2


@dataclasses.dataclass(frozen=True, slots=True)
class OCSPSettings:
    """The proxy.config.ssl.ocsp.* records (made only when proxy.config.ssl.ocsp.enabled is 1)."""

    cache_timeout: int = 3600
    request_timeout: int = 10
    update_period: int = 60
    response_path: Path = Path(".")
    request_mode_get: bool = False


class StapledCert:
    """One certificate's stapling state. ``response`` is replaced whole (the callback reads it
    on the loop thread; only the loop thread writes it)."""

    __slots__ = (
        "cert",
        "fetching",
        "file_mtime",
        "issuer",
        "key",
        "prefetched",
        "refresh_at",
        "response",
        "source",
        "url",
    )

    def __init__(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        url: str | None,
        prefetched: Path | None,
        source: str,
    ) -> None:
        self.cert = cert
        self.issuer = issuer
        self.url = url
        self.prefetched = prefetched
        self.source = source
        # What makes two generations' entries the same: the certificate and where its
        # responses come from.
        self.key = (cert.fingerprint(hashes.SHA256()), url, str(prefetched))
        self.response: VerifiedResponse | None = None
        self.refresh_at = 0.0  # due at once
        self.fetching = False
        self.file_mtime = 0.0

    def staple(self, now: float) -> bytes:
        """The DER response to staple now, or b"" (none yet, or past its nextUpdate)."""
        resp = self.response
        if resp is None or (resp.next_update is not None and now > resp.next_update):
            return b""
        return resp.der

    def load_prefetched(self, now: float) -> tuple[VerifiedResponse, float]:
        """Read and verify the ``ssl_ocsp_name`` file: the response and the file's mtime
        (OSError or OCSPError when unusable)."""
        assert self.prefetched is not None
        mtime = self.prefetched.stat().st_mtime
        return verify_response(self.prefetched.read_bytes(), self.cert, self.issuer, now), mtime

    def __repr__(self) -> str:
        return f"<StapledCert {self.source} {self.cert.subject.rfc4514_string()}>"


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    response: VerifiedResponse | None = None
    error: str | None = None
    unknown: bool = False
    unchanged: bool = False  # a prefetched file that did not change since the last read
    file_mtime: float = 0.0


class OCSPStapling:
    """The stapled certificates of one configuration generation and their callback."""

    def __init__(self, settings: OCSPSettings) -> None:
        self.settings = settings
        self.entries: list[StapledCert] = []
        self.counters: Any = None  # the worker's stats counters, set by OCSPUpdater

    def add_context(self, ctx: SSL.Context, entries: list[StapledCert]) -> None:
        """Staple on ``ctx`` from ``entries`` (one per certificate the context serves)."""
        if not entries:
            return
        self.entries.extend(entries)
        ctx.set_ocsp_server_callback(self._callback, tuple(entries))

    def _callback(self, conn: SSL.Connection, data: Any) -> bytes:
        """OpenSSL's status callback, in the handshake: the cached response or nothing.
        It must not raise (pyOpenSSL would fail the handshake)."""
        try:
            entries: tuple[StapledCert, ...] = data
            entry = entries[0] if len(entries) == 1 else _entry_for(conn, entries)
            der = entry.staple(time.time()) if entry is not None else b""
            if der and self.counters is not None:
                self.counters[M_STAPLED] += 1
            return der
        except Exception:  # never the handshake
            _log.exception("OCSP stapling callback failed; handshake goes on without a response")
            return b""

    def adopt(self, old: OCSPStapling | None) -> None:
        """Take over the cached responses of ``old`` for the certificates that did not change."""
        if old is None:
            return
        by_key = {e.key: e for e in old.entries}
        for entry in self.entries:
            prev = by_key.get(entry.key)
            if prev is not None and prev.response is not None:
                if entry.response is None or prev.response.produced_at > entry.response.produced_at:
                    entry.response = prev.response
                entry.refresh_at = prev.refresh_at
                entry.file_mtime = max(entry.file_mtime, prev.file_mtime)


def _entry_for(conn: SSL.Connection, entries: tuple[StapledCert, ...]) -> StapledCert | None:
    """A context with several certificates (RSA + ECDSA): the one OpenSSL chose."""
    cert = conn.get_certificate()
    if cert is None:
        return None
    serial = cert.get_serial_number()
    for entry in entries:
        if entry.cert.serial_number == serial:
            return entry
    return None


def fetch(entry: StapledCert, settings: OCSPSettings, now: float) -> _Outcome:
    """One refresh of ``entry``, blocking: runs on the pool, never on the loop."""
    try:
        if entry.prefetched is not None:
            if entry.response is not None and entry.prefetched.stat().st_mtime == entry.file_mtime:
                return _Outcome(unchanged=True)
            resp, mtime = entry.load_prefetched(now)
            return _Outcome(response=resp, file_mtime=mtime)
        assert entry.url is not None
        der = build_request(entry.cert, entry.issuer)
        if settings.request_mode_get:
            b64 = urllib.parse.quote(base64.b64encode(der).decode("ascii"), safe="")
            request = urllib.request.Request(entry.url.rstrip("/") + "/" + b64)
        else:
            request = urllib.request.Request(
                entry.url, data=der, headers={"Content-Type": "application/ocsp-request"}, method="POST"
            )
        # No proxies from the environment: the responder is asked directly, as ATS does.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=settings.request_timeout) as reply:
            body = reply.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            return _Outcome(error=f"response larger than {MAX_RESPONSE} bytes")
        return _Outcome(response=verify_response(body, entry.cert, entry.issuer, time.time()))
    except OCSPUnknownCert as exc:
        return _Outcome(error=exc.reason, unknown=True)
    except OCSPError as exc:
        return _Outcome(error=exc.reason)
    except OSError as exc:  # URLError, HTTPError, timeouts, an unreadable file
        return _Outcome(error=str(getattr(exc, "reason", None) or exc))
    except Exception as exc:  # a bug must not kill the refresh loop
        _log.exception("OCSP refresh of %r failed", entry)
        return _Outcome(error=repr(exc))


class OCSPUpdater(Continuation):
    """The worker's refresh loop (see the module doc). ``set_stapling`` after each (re)load."""

    def __init__(self, thread: EThread, counters: Any) -> None:
        super().__init__(self._tick)
        self.thread = thread
        self.counters = counters
        self.stapling: OCSPStapling | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._timer: Any = None
        self._period = 0

    def set_stapling(self, stapling: OCSPStapling | None) -> None:
        if stapling is not None:
            stapling.adopt(self.stapling)
            stapling.counters = self.counters
        self.stapling = stapling
        period = stapling.settings.update_period if stapling is not None and stapling.entries else 0
        if period != self._period:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if period:
                self.thread.ensure_wakeup()  # on the loop thread, before the pool needs it
                self._timer = self.thread.schedule_every(self, float(period), EVENT_INTERVAL)
            self._period = period
        if period:
            self.refresh()  # the first responses now, not one period after start or reload

    def _tick(self, event: int, data: Any) -> int:
        self.refresh()
        return 0

    def refresh(self) -> int:
        """Start a fetch for every due certificate; returns how many were started."""
        stapling = self.stapling
        if stapling is None:
            return 0
        now = time.time()
        started = 0
        for entry in stapling.entries:
            if entry.fetching or (entry.response is not None and now < entry.refresh_at):
                continue
            if entry.prefetched is None and entry.url is None:
                continue
            entry.fetching = True
            if self._pool is None:
                self._pool = ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="tsproxy-ocsp")
            future = self._pool.submit(fetch, entry, stapling.settings, now)
            future.add_done_callback(self._deliver(stapling, entry))
            started += 1
        return started

    def _deliver(self, stapling: OCSPStapling, entry: StapledCert) -> Callable[[Future[_Outcome]], None]:
        def done(future: Future[_Outcome]) -> None:
            outcome = future.result() if not future.cancelled() else _Outcome(error="cancelled")
            self.thread.call_soon_threadsafe(lambda: self._apply(stapling, entry, outcome))

        return done

    def _apply(self, stapling: OCSPStapling, entry: StapledCert, outcome: _Outcome) -> None:
        """On the loop thread: the fetch is back."""
        entry.fetching = False
        settings = stapling.settings
        now = time.time()
        counters = self.counters
        if outcome.unchanged:
            entry.refresh_at = now + settings.update_period
            return
        resp = outcome.response
        if resp is None:
            counters[M_FAILURE] += 1
            if outcome.unknown:
                counters[M_UNKNOWN] += 1
            entry.refresh_at = now  # retry at the next check; the old response serves meanwhile
            where = entry.url or entry.prefetched
            _log.warning("OCSP refresh for %s (%s) failed: %s", entry.source, where, outcome.error)
            return
        entry.response = resp
        if outcome.file_mtime:
            entry.file_mtime = outcome.file_mtime
        counters[M_REFRESHED] += 1
        if not resp.good:
            counters[M_REVOKED] += 1
            _log.warning("OCSP: the certificate of %s is REVOKED", entry.source)
        due = now + settings.cache_timeout
        if resp.next_update is not None:
            # The next check comes up to update_period later and the fetch may take
            # request_timeout: start it early enough to have the new one before nextUpdate.
            due = min(due, resp.next_update - settings.update_period - settings.request_timeout)
        entry.refresh_at = max(due, now)
        _dbg(
            "OCSP response for %s: %s, next update %s, refresh in %.0f s",
            entry.source,
            "good" if resp.good else "revoked",
            resp.next_update,
            entry.refresh_at - now,
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
