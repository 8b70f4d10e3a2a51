"""Statistics shared by every tsproxy process (after ATS's RecRawStatBlock).

Theory of operation: the master creates one shared memory region before it forks workers;
a MAP_SHARED mapping is inherited across fork, so every process sees the same bytes. The
region holds one *slot* per process. A worker writes only its own slot, so increments
need no lock and no atomic instruction: ``slot.counters[METRIC_ID[...]] += 1`` on a
memoryview is the hot path. Readers (the master, ``tsproxy metric get``) add up the slots;
an aligned 8-byte store is never seen half-written, so a sum is at worst a moment stale.

Layout (all fields 8 bytes, native byte order):

    region header   magic, layout version, n_slots, n_metrics, 4 reserved
    dynamic table   DYNAMIC_MAX entries of (name length, kind, name bytes)
    slot 0..n-1     header (pid, role, start time, heartbeat, config generation, state,
                    2 reserved) then n_metrics int64 counters

Metric ids: the static ``METRICS`` table first, then up to DYNAMIC_MAX ids that plugins
register at run time. A process numbers its dynamic metrics in the order it registers
them, so processes that register the same names in the same order agree on the ids; the
name is written into the region so readers can see it, and a process that registers a
different name under an id another process already named gets a TSError.

A respawned worker takes over its predecessor's slot: its gauges restart at 0 (the
connections they counted died with it) while its counters carry on, so totals survive
worker restarts. Times in slot headers are ``time.monotonic()`` seconds, a clock shared
by all processes on the host.
"""

from __future__ import annotations

import enum
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from iocore.records.errors import TSError


class MetricKind(enum.Enum):
    """COUNTER only grows and survives worker restarts; GAUGE goes up and down."""

    COUNTER = 0
    GAUGE = 1


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One statistic: its ``proxy.process.*`` name, kind and meaning."""

    name: str
    kind: MetricKind
    doc: str


_C = MetricKind.COUNTER
_G = MetricKind.GAUGE
_SSL = "proxy.process.ssl."

# fmt: off
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(_SSL + "total_attempts_handshake_count_in", _C, "Client TLS handshakes started"),
    MetricSpec(_SSL + "total_success_handshake_count_in", _C, "Client TLS handshakes completed"),
    MetricSpec(_SSL + "total_success_handshake_count_out", _C, "Origin TLS handshakes completed"),
    MetricSpec(_SSL + "total_handshake_time", _C, "Sum of client handshake times, in nanoseconds (as ATS)"),
    MetricSpec(_SSL + "user_agent_other_errors", _C, "Client TLS errors not counted elsewhere"),
    MetricSpec(_SSL + "user_agent_expired_cert", _C, "Client certificates rejected as expired"),
    MetricSpec(_SSL + "user_agent_unknown_ca", _C, "Client certificates from an unknown CA"),
    MetricSpec(_SSL + "user_agent_wrong_version", _C, "Clients offering no enabled TLS version"),
    MetricSpec(_SSL + "user_agent_decryption_failed", _C, "Client records that failed to decrypt"),
    MetricSpec(_SSL + "user_agent_bad_cert", _C, "Client certificates that could not be parsed or used"),
    MetricSpec(_SSL + "user_agent_cert_verify_failed", _C, "Client certificates that failed verification"),
    MetricSpec(_SSL + "origin_server_cert_verify_failed", _C, "Origin certificates that failed verification"),
    MetricSpec(_SSL + "origin_server_bad_cert", _C, "Origin certificates that could not be parsed or used"),
    MetricSpec(_SSL + "origin_server_unknown_ca", _C, "Origin certificates from an unknown CA"),
    MetricSpec(_SSL + "ssl_error_ssl", _C, "Connections closed on an SSL_ERROR_SSL"),
    MetricSpec(_SSL + "ssl_error_syscall", _C, "Connections closed on an SSL_ERROR_SYSCALL"),
    MetricSpec(_SSL + "ssl_error_zero_return", _C, "TLS connections closed by the peer's close_notify"),
    MetricSpec(_SSL + "ssl_error_want_read", _C, "TLS operations that had to wait for input"),
    MetricSpec(_SSL + "ssl_error_want_write", _C, "TLS operations that had to wait to send"),
    MetricSpec(_SSL + "ssl_error_want_x509_lookup", _C, "Handshakes paused for a certificate lookup"),
    MetricSpec(_SSL + "ssl_sni_name_set_failure", _C, "Origin connections whose SNI could not be set"),
    MetricSpec(_SSL + "ssl_handshake_timeout_in", _C, "Client handshakes closed by handshake_timeout_in"),
    MetricSpec(_SSL + "ssl_no_cert_context", _C, "Client handshakes for which no certificate matched"),
    MetricSpec(_SSL + "ssl_alpn_no_endpoint", _C, "Negotiated ALPN protocols with no endpoint; closed"),
    MetricSpec(_SSL + "ssl_sni_ip_allow_denied", _C, "Client handshakes refused by an sni.yaml ip_allow"),
    MetricSpec(_SSL + "total_tickets_created", _C, "TLS session tickets issued"),
    MetricSpec(_SSL + "total_tickets_verified", _C, "TLS session tickets accepted for resumption"),
    MetricSpec(_SSL + "ssl_total_tlsv1", _C, "Client handshakes completed with TLS 1.0"),
    MetricSpec(_SSL + "ssl_total_tlsv11", _C, "Client handshakes completed with TLS 1.1"),
    MetricSpec(_SSL + "ssl_total_tlsv12", _C, "Client handshakes completed with TLS 1.2"),
    MetricSpec(_SSL + "ssl_total_tlsv13", _C, "Client handshakes completed with TLS 1.3"),
    MetricSpec(_SSL + "ssl_ocsp_stapled", _C, "Client handshakes answered with a stapled OCSP response"),
    MetricSpec(_SSL + "ssl_ocsp_refreshed_cert", _C, "OCSP responses fetched (or re-read) and verified"),
    MetricSpec(_SSL + "ssl_ocsp_refresh_cert_failure", _C, "OCSP refreshes that failed (fetch, verify)"),
    MetricSpec(_SSL + "ssl_ocsp_revoked_cert", _C, "Verified OCSP responses saying revoked"),
    MetricSpec(_SSL + "ssl_ocsp_unknown_cert", _C, "OCSP responders that answered unknown for a certificate"),
    MetricSpec("proxy.process.net.connections_currently_open", _G, "Open client and origin connections"),
    MetricSpec("proxy.process.net.accepts_total", _C, "Client connections accepted"),
    MetricSpec("proxy.process.net.connections_throttled_in", _C, "Accepts closed by max_connections_in"),
    MetricSpec("proxy.process.net.inactivity_timeouts", _C, "Connections closed by an inactivity timeout"),
    MetricSpec("proxy.process.net.proxy_protocol_v1_in", _C, "pp connections with a valid PROXY v1 header"),
    MetricSpec("proxy.process.net.proxy_protocol_v2_in", _C, "pp connections with a valid PROXY v2 header"),
    MetricSpec(
        "proxy.process.net.proxy_protocol_untrusted_in", _C,
        "pp connections closed at accept: peer not in proxy.config.http.proxy_protocol_allowlist",
    ),
    MetricSpec(
        "proxy.process.net.proxy_protocol_bad_header_in", _C,
        "pp connections closed: no valid PROXY header (other bytes, malformed, or EOF first)",
    ),
    MetricSpec(
        "proxy.process.net.proxy_protocol_timeout_in", _C,
        "pp connections closed: no whole PROXY header within proxy.config.http.accept_no_activity_timeout",
    ),
    MetricSpec("proxy.process.http.incoming_requests", _C, "Client requests received"),
    MetricSpec("proxy.process.http.outgoing_requests", _C, "Requests sent to origins"),
    MetricSpec("proxy.process.http.completed_requests", _C, "Transactions completed"),
    MetricSpec("proxy.process.http.current_client_connections", _G, "Open client HTTP connections"),
    MetricSpec("proxy.process.http.current_server_connections", _G, "Open origin connections"),
    MetricSpec("proxy.process.http.total_client_connections", _C, "Client HTTP connections opened"),
    MetricSpec("proxy.process.http.total_server_connections", _C, "Origin connections opened"),
    MetricSpec("proxy.process.http.2xx_responses", _C, "Responses with a 2xx status sent to clients"),
    MetricSpec("proxy.process.http.3xx_responses", _C, "Responses with a 3xx status sent to clients"),
    MetricSpec("proxy.process.http.4xx_responses", _C, "Responses with a 4xx status sent to clients"),
    MetricSpec("proxy.process.http.5xx_responses", _C, "Responses with a 5xx status sent to clients"),
    MetricSpec("proxy.process.http.origin_connections_reused", _C, "Requests sent on a pooled connection"),
    MetricSpec("proxy.process.http.err_client_abort_count", _C, "Transactions the client aborted"),
    MetricSpec("proxy.process.http.err_connect_fail_count", _C, "Origin connection attempts that failed"),
    MetricSpec(
        "proxy.process.http.origin_connections_throttled_out", _C,
        "Transactions answered 503 at the per_server.connection.max cap (queue full or waited too long)",
    ),
    MetricSpec(
        "proxy.process.http.origin_connections_queued", _C,
        "Transactions that waited at the per_server.connection.max cap for an origin connection",
    ),
    MetricSpec(
        "proxy.process.http.flow_control.paused_bytes", _G,
        "Bytes held by transactions whose origin read is paused by a slow client",
    ),
    MetricSpec(
        "proxy.process.http.flow_control.throttled", _C,
        "Stalled transactions limited to 16 KiB of buffer because the worker passed half its budget",
    ),
    MetricSpec(
        "proxy.process.http.flow_control.closed", _C,
        "Longest-stalled slow-reader connections closed because the worker passed its buffer budget",
    ),
    MetricSpec("proxy.process.http.underscore_headers_dropped", _C, "Request headers dropped: '_' in name"),
    MetricSpec("proxy.process.http2.current_client_connections", _G, "Open HTTP/2 client connections"),
    MetricSpec("proxy.process.http2.total_client_connections", _C, "HTTP/2 client connections opened"),
    MetricSpec("proxy.process.http2.current_client_streams", _G, "Open HTTP/2 client streams"),
    MetricSpec("proxy.process.http2.total_client_streams", _C, "HTTP/2 client streams opened"),
    MetricSpec("proxy.process.http2.connection_errors", _C, "HTTP/2 connections ended by a protocol error"),
    MetricSpec("proxy.process.http2.stream_errors", _C, "HTTP/2 streams reset by tsproxy"),
    MetricSpec(
        "proxy.process.http2.session_die_inactive", _C,
        "HTTP/2 connections closed: no activity, or responses waiting on a closed window, past "
        "proxy.config.http2.no_activity_timeout_in",
    ),
    MetricSpec("proxy.process.http2.session_die_eos", _C, "HTTP/2 connections closed by the client"),
    MetricSpec("proxy.process.http2.session_die_error", _C, "HTTP/2 connections closed: a socket error"),
    MetricSpec("proxy.process.http2.session_die_other", _C, "HTTP/2 connections closed otherwise"),
    MetricSpec(
        "proxy.process.http2.max_concurrent_streams_exceeded_in", _C,
        "HTTP/2 connections that opened more streams than SETTINGS_MAX_CONCURRENT_STREAMS",
    ),
    MetricSpec(
        "proxy.process.http2.max_settings_per_frame_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_settings_per_frame",
    ),
    MetricSpec(
        "proxy.process.http2.max_settings_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_settings_per_minute",
    ),
    MetricSpec(
        "proxy.process.http2.max_settings_frames_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_settings_frames_per_minute",
    ),
    MetricSpec(
        "proxy.process.http2.max_ping_frames_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_ping_frames_per_minute",
    ),
    MetricSpec(
        "proxy.process.http2.max_priority_frames_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_priority_frames_per_minute",
    ),
    MetricSpec(
        "proxy.process.http2.max_rst_stream_frames_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_rst_stream_frames_per_minute (rapid reset)",
    ),
    MetricSpec(
        "proxy.process.http2.max_continuation_frames_per_minute_exceeded", _C,
        "HTTP/2 connections over proxy.config.http2.max_continuation_frames_per_minute",
    ),
    MetricSpec("proxy.process.tunnel.total_client_connections_blind_tcp", _C, "Blind tunnels opened"),
    MetricSpec("proxy.process.tunnel.current_client_connections_blind_tcp", _G, "Open blind tunnels"),
)
# fmt: on

METRIC_ID: dict[str, int] = {spec.name: i for i, spec in enumerate(METRICS)}


def process_metric(group: str, name: str) -> int:
    """The id of ``proxy.process.GROUP.NAME`` (a KeyError names a metric the table lacks)."""
    return METRIC_ID[f"proxy.process.{group}.{name}"]


DYNAMIC_MAX = 256
N_METRICS = len(METRICS) + DYNAMIC_MAX


class SlotRole(enum.IntEnum):
    """Who owns a slot; stored as an integer in the slot header."""

    FREE = 0
    MASTER = 1
    ET_NET = 2
    ET_SSL = 3


class SlotState(enum.IntEnum):
    """Life of the process in a slot; stored as an integer in the slot header."""

    EMPTY = 0
    STARTING = 1
    RUNNING = 2
    STOPPING = 3
    EXITED = 4


@dataclass(frozen=True, slots=True)
class SlotHeader:
    """A copy of one slot's header, for the master's liveness checks and ``tsproxy status``."""

    pid: int
    role: int
    start_time: float
    heartbeat: float
    generation: int
    state: int


_MAGIC = int.from_bytes(b"TSPSTAT1", "little")
_VERSION = 1
_WORD = 8
_REGION_HEADER = 8 * _WORD
_NAME_BYTES = 112
_DYN_ENTRY = 2 * _WORD + _NAME_BYTES
_DYN_TABLE = DYNAMIC_MAX * _DYN_ENTRY
_SLOT_HEADER = 8 * _WORD
_SLOT_SIZE = _SLOT_HEADER + N_METRICS * _WORD
# slot header word indexes
_PID, _ROLE, _START, _HEARTBEAT, _GENERATION, _STATE = range(6)


def _region_size(n_slots: int) -> int:
    return _REGION_HEADER + _DYN_TABLE + n_slots * _SLOT_SIZE


class SlotStats:
    """One process's slot. Only that process writes it; anyone may read it."""

    __slots__ = ("_floats", "_ints", "counters")

    def __init__(self, buf: memoryview, offset: int) -> None:
        header = buf[offset : offset + _SLOT_HEADER]
        self._ints = header.cast("q")
        self._floats = header.cast("d")
        #: int64 counters indexed by metric id; ``counters[METRIC_ID[name]] += 1`` is the hot path.
        self.counters = buf[offset + _SLOT_HEADER : offset + _SLOT_SIZE].cast("q")

    def incr(self, metric_id: int, n: int = 1) -> None:
        self.counters[metric_id] += n

    def decr(self, metric_id: int, n: int = 1) -> None:
        self.counters[metric_id] -= n

    def set(self, metric_id: int, value: int) -> None:
        self.counters[metric_id] = value

    def get(self, metric_id: int) -> int:
        return int(self.counters[metric_id])

    def heartbeat(self, now: float) -> None:
        """Record that the owner is alive; ``now`` is ``time.monotonic()``."""
        self._floats[_HEARTBEAT] = now

    @property
    def pid(self) -> int:
        return int(self._ints[_PID])

    @pid.setter
    def pid(self, value: int) -> None:
        self._ints[_PID] = value

    @property
    def role(self) -> int:
        return int(self._ints[_ROLE])

    @role.setter
    def role(self, value: int) -> None:
        self._ints[_ROLE] = int(value)

    @property
    def start_time(self) -> float:
        return float(self._floats[_START])

    @start_time.setter
    def start_time(self, value: float) -> None:
        self._floats[_START] = value

    @property
    def last_heartbeat(self) -> float:
        return float(self._floats[_HEARTBEAT])

    @property
    def generation(self) -> int:
        """The config generation the owner runs with (bumped on each reload it applies)."""
        return int(self._ints[_GENERATION])

    @generation.setter
    def generation(self, value: int) -> None:
        self._ints[_GENERATION] = value

    @property
    def state(self) -> int:
        return int(self._ints[_STATE])

    @state.setter
    def state(self, value: int) -> None:
        self._ints[_STATE] = int(value)

    def header(self) -> SlotHeader:
        return SlotHeader(
            self.pid, self.role, self.start_time, self.last_heartbeat, self.generation, self.state
        )

    def _release(self) -> None:
        self.counters.release()
        self._ints.release()
        self._floats.release()


class StatsRegion:
    """The shared statistics region: ``n_slots`` process slots plus the dynamic-name table.

    ``StatsRegion(n)`` makes an anonymous MAP_SHARED mapping, inherited by children the
    master forks. With ``path`` the mapping is backed by that file instead, so a separate
    process (``tsproxy metric get``) can ``StatsRegion.attach(path)`` and read it.
    Create it before forking: a region made after fork is private to that process.
    """

    def __init__(self, n_slots: int, *, path: Path | None = None) -> None:
        if n_slots < 1:
            raise ValueError("a stats region needs at least one slot")
        size = _region_size(n_slots)
        if path is None:
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self._setup()
        self._words[0] = _MAGIC
        self._words[1] = _VERSION
        self._words[2] = n_slots
        self._words[3] = N_METRICS
        self._finish_setup()

    @classmethod
    def attach(cls, path: Path) -> StatsRegion:
        """Open a region another process created with ``path`` (read and write)."""
        self = cls.__new__(cls)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TSError(f"{path}: cannot open stats region: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size < _REGION_HEADER:
                raise TSError(f"{path}: not a tsproxy stats region")
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._setup()
        magic, version, n_slots, n_metrics = self._words[0:4].tolist()
        if magic != _MAGIC or version != _VERSION or n_metrics != N_METRICS or size != _region_size(n_slots):
            self.close()
            raise TSError(f"{path}: stats region of another tsproxy version; restart tsproxy")
        self._finish_setup()
        return self

    def _setup(self) -> None:
        self._buf = memoryview(self._mmap)
        self._words = self._buf[:_REGION_HEADER].cast("q")
        self._dyn_local: list[str] = []
        self._slots: list[SlotStats] = []

    def _finish_setup(self) -> None:
        n_slots = int(self._words[2])
        base = _REGION_HEADER + _DYN_TABLE
        self._slots = [SlotStats(self._buf, base + i * _SLOT_SIZE) for i in range(n_slots)]

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def slot(self, index: int) -> SlotStats:
        return self._slots[index]

    def slot_header(self, index: int) -> SlotHeader:
        return self._slots[index].header()

    # -- names and ids --------------------------------------------------------------------------

    def _dyn_entry(self, index: int) -> tuple[str, MetricKind] | None:
        off = _REGION_HEADER + index * _DYN_ENTRY
        length, kind = self._buf[off : off + 2 * _WORD].cast("q").tolist()
        if length <= 0:
            return None
        raw = bytes(self._buf[off + 2 * _WORD : off + 2 * _WORD + length])
        return raw.decode("utf-8"), MetricKind(kind)

    def register_dynamic(self, name: str, kind: MetricKind = MetricKind.COUNTER) -> int:
        """The id of a plugin metric (ATS ``TSStatCreate``); same name again gives the same id."""
        if name in METRIC_ID:
            raise TSError(f"metric {name} is a built-in metric")
        if name in self._dyn_local:
            return len(METRICS) + self._dyn_local.index(name)
        index = len(self._dyn_local)
        if index >= DYNAMIC_MAX:
            raise TSError(f"cannot create metric {name}: all {DYNAMIC_MAX} dynamic metric ids are in use")
        raw = name.encode("utf-8")
        if not raw or len(raw) > _NAME_BYTES:
            raise TSError(f"metric name must be 1..{_NAME_BYTES} bytes: {name!r}")
        existing = self._dyn_entry(index)
        if existing is None:
            off = _REGION_HEADER + index * _DYN_ENTRY
            self._buf[off + 2 * _WORD : off + 2 * _WORD + len(raw)] = raw
            words = self._buf[off : off + 2 * _WORD].cast("q")
            words[1] = kind.value
            words[0] = len(raw)  # written last: readers never see a half-written name
            words.release()
        elif existing[0] != name:
            raise TSError(
                f"metric {name} would get id {len(METRICS) + index}, which another process registered "
                f"as {existing[0]}; register plugin metrics in the same order in every process"
            )
        self._dyn_local.append(name)
        return len(METRICS) + index

    def names(self) -> list[tuple[str, int, MetricKind]]:
        """Every metric visible in the region (static, then registered dynamic): name, id, kind."""
        out = [(spec.name, i, spec.kind) for i, spec in enumerate(METRICS)]
        for index in range(DYNAMIC_MAX):
            entry = self._dyn_entry(index)
            if entry is not None:
                out.append((entry[0], len(METRICS) + index, entry[1]))
        return out

    def metric_id(self, name: str) -> int:
        """The id of a static or registered dynamic metric; KeyError otherwise."""
        if name in METRIC_ID:
            return METRIC_ID[name]
        for found, metric_id, _kind in self.names()[len(METRICS) :]:
            if found == name:
                return metric_id
        raise KeyError(name)

    # -- reading and resetting ------------------------------------------------------------------

    def sum(self, metric_id: int) -> int:
        """The metric's total over all slots."""
        return sum(int(slot.counters[metric_id]) for slot in self._slots)

    def value_by_name(self, name: str) -> int:
        """``tsproxy metric get NAME``; KeyError for an unknown name."""
        return self.sum(self.metric_id(name))

    def match(self, regex: str) -> list[tuple[str, int]]:
        """``tsproxy metric match REGEX``: (name, total) of names the regex finds, by name."""
        pattern = re.compile(regex)
        hits = [(name, self.sum(mid)) for name, mid, _kind in self.names() if pattern.search(name)]
        return sorted(hits)

    def zero(self, metric_id: int) -> None:
        """Zero a metric in every slot (``tsproxy metric zero``)."""
        for slot in self._slots:
            slot.counters[metric_id] = 0

    def reset_gauges(self, slot_index: int) -> None:
        """Zero a slot's gauges, static and dynamic, as its new owner starts with nothing open."""
        counters = self._slots[slot_index].counters
        for _name, metric_id, kind in self.names():
            if kind is MetricKind.GAUGE:
                counters[metric_id] = 0

    def claim_slot(self, slot_index: int, pid: int, role: int, now: float, generation: int = 0) -> SlotStats:
        """Hand a slot to a (re)started process: fresh header, gauges 0, counters carried on.

        The master calls this right after fork (for the child's pid) or the child calls it
        first thing; either way before the child counts anything.
        """
        slot = self._slots[slot_index]
        slot.pid = pid
        slot.role = role
        slot.start_time = now
        slot.heartbeat(now)
        slot.generation = generation
        slot.state = SlotState.STARTING
        self.reset_gauges(slot_index)
        return slot

    def close(self) -> None:
        """Unmap the region in this process (other processes keep their mappings)."""
        for slot in self._slots:
            slot._release()
        self._slots = []
        self._words.release()
        self._buf.release()
        self._mmap.close()
