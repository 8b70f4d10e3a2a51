"""Which origins are marked down, per worker (ATS's HostDB down marking, reduced to a table).

Theory of operation: when every connection attempt a transaction may make to an origin has
failed (proxy.config.http.connect_attempts_max_retries + 1 of them), the origin (host, port) is
marked down for proxy.config.http.down_server.cache_time seconds. While it is down, a
transaction makes only proxy.config.http.connect_attempts_max_retries_dead_server attempts (at
least one: as in ATS, the first attempt is always made), so clients get their 502 sooner and the
dead origin is not hammered. A successful connection clears the mark. Each worker keeps its own
table (ATS shares HostDB between its threads); the table is bounded.
"""

from __future__ import annotations

import logging
import time

_log = logging.getLogger("tsproxy.http")

MAX_ENTRIES = 4096


class OriginHealth:
    """The down marks of one worker's origins; consulted only when a connect fails."""

    __slots__ = ("_down",)

    def __init__(self) -> None:
        self._down: dict[tuple[str, int], float] = {}  # (host, port) -> monotonic time it ends

    @property
    def any_down(self) -> bool:
        return bool(self._down)

    def is_down(self, host: str, port: int, now: float | None = None) -> bool:
        until = self._down.get((host, port))
        return until is not None and (time.monotonic() if now is None else now) < until

    def attempts_allowed(self, host: str, port: int, retries: int, dead_retries: int) -> int:
        """How many connection attempts a transaction may make to this origin in all."""
        if self.is_down(host, port):
            return max(1, dead_retries)
        return 1 + retries

    def mark_down(self, host: str, port: int, seconds: int, attempts: int, reason: str) -> None:
        if seconds <= 0:
            return
        now = time.monotonic()
        was_down = self.is_down(host, port, now)
        if len(self._down) >= MAX_ENTRIES and (host, port) not in self._down:
            for key in [k for k, until in self._down.items() if until <= now]:
                del self._down[key]
            if len(self._down) >= MAX_ENTRIES:
                self._down.clear()
        self._down[(host, port)] = now + seconds
        if not was_down:
            _log.warning(
                "origin %s:%d marked down for %d s: %d connection attempt%s failed (%s)",
                host,
                port,
                seconds,
                attempts,
                "" if attempts == 1 else "s",
                reason,
            )

    def mark_up(self, host: str, port: int) -> None:
        if self._down.pop((host, port), None) is not None:
            _log.info("origin %s:%d is up again", host, port)
