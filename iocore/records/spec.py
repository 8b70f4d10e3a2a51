"""The one table of records (after ATS's ``RecordsConfig.cc``).

Theory of operation: every configuration variable tsproxy knows is one ``RecordSpec`` row in
``RECORDS``: its ``proxy.config.*`` name, type, default, whether a change takes effect on
``config reload`` (RELOADABLE) or only after a restart (RESTART), an optional validator and a
one-line doc. The parser, the shipped ``etc/tsproxy/records.config`` and ``docs/records.md``
are all derived from this table, so they cannot disagree. Building the table is the only
thing importing this module does; nothing registers itself anywhere.

Validators take an already-typed value and return an error message (``expected 0 or 1, got 7``)
or None. They never raise, so the parser can attach file and line to the message.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

RecValue = int | float | str
Check = Callable[[RecValue], "str | None"]


class RecType(enum.Enum):
    """The value types records.config knows (COUNTER is read as INT by the parser)."""

    INT = "INT"
    FLOAT = "FLOAT"
    STRING = "STRING"


class RecUpdate(enum.Enum):
    """When a changed value takes effect; shown to operators in docs and reload reports."""

    RELOADABLE = "reloadable"
    RESTART = "restart"


@dataclass(frozen=True, slots=True)
class RecordSpec:
    """One configuration variable: what it is called, what it holds and when it applies."""

    name: str
    type: RecType
    default: RecValue
    update: RecUpdate
    check: Check | None
    doc: str


# -- validators -------------------------------------------------------------------------------


def int_range(lo: int, hi: int | None = None) -> Check:
    """Accept integers in [lo, hi] (hi None: no upper bound)."""

    def check(value: RecValue) -> str | None:
        assert isinstance(value, int)
        if value < lo or (hi is not None and value > hi):
            if hi is None:
                return f"expected an integer >= {lo}, got {value}"
            if hi == lo + 1:
                return f"expected {lo} or {hi}, got {value}"
            return f"expected an integer in {lo}..{hi}, got {value}"
        return None

    return check


BOOL = int_range(0, 1)
NON_NEGATIVE = int_range(0)
POSITIVE = int_range(1)


def one_of(*choices: str) -> Check:
    """Accept exactly one of the given words (case-sensitive, as ATS compares them)."""

    def check(value: RecValue) -> str | None:
        if value not in choices:
            return f"expected one of {'|'.join(choices)}, got {value!r}"
        return None

    return check


def _regex(value: RecValue) -> str | None:
    try:
        re.compile(str(value))
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    return None


def _host_port(value: RecValue) -> str | None:
    """Accept empty (unset), ``host:port`` or ``[v6]:port``."""
    text = str(value)
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or host in ("[]",) or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected host:port, got {text!r}"
    return None


_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")


def _user_id(value: RecValue) -> str | None:
    """Accept a user name, ``#UID`` or ATS's ``#-1`` (keep the user tsproxy was started as)."""
    text = str(value)
    if not text:
        return "empty: name the user to run as (default nobody), or #-1 to keep the starting user"
    if text.startswith("#"):
        if text == "#-1" or text[1:].isdigit():
            return None
        return f"expected a user name, #UID or #-1, got {text!r}"
    if not _USER_NAME.fullmatch(text):
        return f"expected a user name, #UID or #-1, got {text!r}"
    return None


def _ip_or_empty(value: RecValue) -> str | None:
    """Accept empty (unset) or one IPv4 / IPv6 address."""
    text = str(value).strip()
    if not text:
        return None
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return f"expected an IP address, got {text!r}"
    return None


def _networks(value: RecValue) -> str | None:
    """Accept space-separated IP addresses and networks (``10.0.0.0/8``, ``::1``)."""
    for word in str(value).split():
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError:
            return f"expected IP addresses or networks, got {word!r}"
    return None


# -- the table --------------------------------------------------------------------------------

_R = RecUpdate.RELOADABLE
_X = RecUpdate.RESTART
_I = RecType.INT
_S = RecType.STRING

ATS_CIPHER_SUITE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)
ATS_TLSV13_CIPHER_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# The table reads best one record per block; keep the formatter out of it.
# fmt: off
RECORDS: tuple[RecordSpec, ...] = (
    # process layout
    RecordSpec(
        "proxy.config.http.server_ports", _S, "8080 8443:ssl", _X, None,
        "Ports to listen on: descriptors separated by spaces, keywords by colons "
        "(8443:ssl, 8443:ssl:tr-pass, ipv6, blind, proto=http)",
    ),
    RecordSpec("proxy.config.exec_thread.limit", _I, 1, _X, POSITIVE, "Number of ET_NET worker processes"),
    RecordSpec(
        "proxy.config.ssl.number.threads", _I, 0, _X, NON_NEGATIVE,
        "Number of ET_SSL workers; 0 means the ET_NET workers do TLS themselves",
    ),
    RecordSpec(
        "proxy.config.local_state_dir", _S, "run", _X, None,
        "Directory for the pidfile, control socket and stats; relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.log.logfile_dir", _S, "log", _X, None,
        "Directory for log files; relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.admin.user_id", _S, "nobody", _X, _user_id,
        "User (name or #UID) master and workers run as when started as root, after binding the ports; "
        "#-1 keeps root (warned about)",
    ),
    RecordSpec(
        "proxy.config.stop.shutdown_timeout", _I, 10, _R, NON_NEGATIVE,
        "Seconds a graceful stop waits for open transactions before closing them",
    ),
    RecordSpec(
        "proxy.config.heartbeat.timeout", _I, 10, _R, POSITIVE,
        "Seconds a worker may go without a heartbeat before the master replaces it",
    ),
    # http
    RecordSpec(
        "proxy.config.http.transaction_no_activity_timeout_in", _I, 30, _R, NON_NEGATIVE,
        "Seconds a client may stay silent during a transaction; 0 disables",
    ),
    RecordSpec(
        "proxy.config.http.transaction_no_activity_timeout_out", _I, 30, _R, NON_NEGATIVE,
        "Seconds an origin may stay silent during a transaction; 0 disables",
    ),
    RecordSpec(
        "proxy.config.http.keep_alive_no_activity_timeout_in", _I, 120, _R, NON_NEGATIVE,
        "Seconds an idle client keep-alive connection is kept open",
    ),
    RecordSpec(
        "proxy.config.http.keep_alive_no_activity_timeout_out", _I, 120, _R, NON_NEGATIVE,
        "Seconds an idle origin connection is kept in the pool",
    ),
    RecordSpec(
        "proxy.config.http.transaction_active_timeout_in", _I, 900, _R, NON_NEGATIVE,
        "Seconds a client transaction may last in all, from its first request byte to its last "
        "response byte; then the connection is closed; 0 disables",
    ),
    RecordSpec(
        "proxy.config.http.transaction_active_timeout_out", _I, 0, _R, NON_NEGATIVE,
        "Seconds an origin may take for a whole response, from the request head on (504 if no "
        "response head came yet, else the connection is cut); 0 disables",
    ),
    RecordSpec(
        "proxy.config.http.accept_no_activity_timeout", _I, 120, _R, NON_NEGATIVE,
        "Seconds a new client connection may stay silent before its first request (after the "
        "TLS handshake), and a pp port's connection before its whole PROXY header; 0 leaves only "
        "the default inactivity timeout",
    ),
    RecordSpec(
        "proxy.config.http.connect_attempts_timeout", _I, 30, _R, POSITIVE,
        "Seconds to wait for an origin connection (TCP and TLS) to be established",
    ),
    RecordSpec(
        "proxy.config.http.connect_attempts_max_retries", _I, 3, _R, int_range(0, 255),
        "Connection attempts to an origin after the first one fails (refused, unreachable, "
        "timed out), before the client gets 502; the origin is then marked down",
    ),
    RecordSpec(
        "proxy.config.http.connect_attempts_max_retries_dead_server", _I, 1, _R, int_range(0, 255),
        "Connection attempts to an origin marked down (at least one is always made)",
    ),
    RecordSpec(
        "proxy.config.http.down_server.cache_time", _I, 60, _R, NON_NEGATIVE,
        "Seconds an origin stays marked down (per worker) after every attempt to connect failed; "
        "0 never marks one down",
    ),
    # hostdb: origin name resolution (tsproxy/resolver.py)
    RecordSpec(
        "proxy.config.hostdb.ttl_mode", _I, 0, _R, int_range(0, 3),
        "How long a resolved origin name is cached: 0 obey the DNS TTL, 1 ignore it (use "
        "hostdb.timeout), 2 the smaller, 3 the larger of the two; getaddrinfo reports no TTL, so "
        "every mode uses hostdb.timeout",
    ),
    RecordSpec(
        "proxy.config.hostdb.timeout", _I, 86400, _R, NON_NEGATIVE,
        "Seconds a resolved origin name is cached (see hostdb.ttl_mode); 0 keeps it until the "
        "worker restarts",
    ),
    RecordSpec(
        "proxy.config.hostdb.serve_stale_for", _I, 0, _R, NON_NEGATIVE,
        "Seconds past its timeout an expired name is still used, at once, while it is resolved "
        "again in the background; 0 waits for the new answer",
    ),
    RecordSpec(
        "proxy.config.hostdb.fail.timeout", _I, 0, _R, NON_NEGATIVE,
        "Seconds a failed lookup is remembered (requests for that name get 502 without asking "
        "DNS again); 0 asks again on the next request (lookups of one name still share one query)",
    ),
    RecordSpec("proxy.config.http.keep_alive_enabled_in", _I, 1, _R, BOOL, "Allow client keep-alive"),
    RecordSpec("proxy.config.http.keep_alive_enabled_out", _I, 1, _R, BOOL, "Reuse origin connections"),
    RecordSpec(
        "proxy.config.http.insert_request_via_str", _I, 1, _R, int_range(0, 3),
        "Add a Via header to requests sent to the origin (0 off, 1..3 more detail)",
    ),
    RecordSpec(
        "proxy.config.http.insert_response_via_str", _I, 0, _R, int_range(0, 3),
        "Add a Via header to responses sent to the client (0 off, 1..3 more detail)",
    ),
    RecordSpec(
        "proxy.config.http.insert_squid_x_forwarded_for", _I, 1, _R, BOOL,
        "Add the client address to X-Forwarded-For on requests to the origin",
    ),
    RecordSpec(
        "proxy.config.http.insert_client_ip", _I, 1, _R, BOOL,
        "Send the client address to the origin in a Client-ip header (one the client sent is "
        "replaced); 0 forwards the client's own Client-ip untouched",
    ),
    RecordSpec(
        "proxy.config.http.proxy_protocol_allowlist", _S, "", _R, None,
        "Peers trusted to send a PROXY header on pp ports (addresses, ADDR/BITS, ADDR-ADDR, comma "
        "separated); others are closed at accept. Empty: any peer",
    ),
    RecordSpec(
        "proxy.config.http.host_sni_policy", _I, 2, _R, int_range(0, 2),
        "A TLS request whose Host has a stricter sni.yaml policy than its SNI: 0 allow, 1 log, 2 log and 403",
    ),
    RecordSpec("proxy.config.proxy_name", _S, "tsproxy", _R, None, "Name of this proxy in Via headers"),
    RecordSpec(
        "proxy.config.http.request_header_max_size", _I, 131072, _R, POSITIVE,
        "Largest client request header block in bytes; larger requests get 400",
    ),
    RecordSpec(
        "proxy.config.http.response_header_max_size", _I, 131072, _R, POSITIVE,
        "Largest origin response header block in bytes; larger responses get 502",
    ),
    RecordSpec(
        "proxy.config.http.underscores_in_headers", _I, 0, _R, BOOL,
        "1: forward request header names containing '_'; 0: drop them (counted in "
        "proxy.process.http.underscore_headers_dropped), as nginx's underscores_in_headers off",
    ),
    RecordSpec(
        "proxy.config.http.per_server.connection.max", _I, 0, _R, NON_NEGATIVE,
        "Most connections (open or opening) to one upstream server group per worker; beyond it a"
        " transaction waits for one to free, up to connect_attempts_timeout, then gets 503;"
        " 0 means unlimited",
    ),
    RecordSpec(
        "proxy.config.http.per_server.connection.match", _S, "ip", _R, one_of("ip", "port", "host", "both"),
        "What makes an upstream server group for per_server.connection.max: ip (address), port"
        " (address and port), host (remapped host name) or both (address, port and host name)",
    ),
    RecordSpec(
        "proxy.config.http.per_server.connection.queue_size", _I, -1, _R, int_range(-1),
        "Most transactions waiting for one upstream server group at the per_server.connection.max"
        " cap; -1 unlimited, 0 never wait (503 at once)",
    ),
    RecordSpec(
        "proxy.config.http.per_server.connection.queue_delay", _I, 100, _R, POSITIVE,
        "Milliseconds between rechecks of the transactions waiting at the per_server.connection.max cap",
    ),
    RecordSpec(
        "proxy.config.http.flow_control.high_water", _I, 65536, _R, int_range(4096),
        "Bytes one transaction may buffer in each direction before the sending side's reads stop"
        " (a slow client stops the origin read, a slow origin the client read); new connections",
    ),
    RecordSpec(
        "proxy.config.http.flow_control.worker_budget", _I, 64 << 20, _R, NON_NEGATIVE,
        "Bytes all transactions of a worker stalled by slow clients may hold: beyond half of it a"
        " newly stalled transaction buffers at most 16 KiB, beyond it the longest-stalled ones are"
        " closed; 0 means no budget",
    ),
    # HTTP/2 (ALPN h2 on TLS ports; proto= in server_ports restricts it)
    RecordSpec(
        "proxy.config.http2.max_concurrent_streams_in", _I, 100, _R, POSITIVE,
        "SETTINGS_MAX_CONCURRENT_STREAMS: streams a client may have open on one connection",
    ),
    RecordSpec(
        "proxy.config.http2.initial_window_size_in", _I, 65535, _R, int_range(1, 2**31 - 1),
        "SETTINGS_INITIAL_WINDOW_SIZE: request body bytes a client may send on a stream before "
        "tsproxy has passed them on (the upload's backpressure)",
    ),
    RecordSpec(
        "proxy.config.http2.max_frame_size", _I, 16384, _R, int_range(16384, 2**24 - 1),
        "SETTINGS_MAX_FRAME_SIZE: the largest frame payload tsproxy accepts",
    ),
    RecordSpec(
        "proxy.config.http2.header_table_size", _I, 4096, _R, NON_NEGATIVE,
        "SETTINGS_HEADER_TABLE_SIZE: the HPACK dynamic table size for request headers",
    ),
    RecordSpec(
        "proxy.config.http2.max_header_list_size", _I, 131072, _R, POSITIVE,
        "SETTINGS_MAX_HEADER_LIST_SIZE: the largest decoded request header list; a bigger one "
        "ends the connection (GOAWAY)",
    ),
    RecordSpec(
        "proxy.config.http2.no_activity_timeout_in", _I, 120, _R, POSITIVE,
        "Seconds an HTTP/2 connection may be idle, or its responses wait on a client's closed "
        "flow-control window, before it is closed",
    ),
    RecordSpec(
        "proxy.config.http2.stream_priority_enabled", _I, 0, _R, BOOL,
        "Accepted for ATS compatibility; streams are served round robin either way",
    ),
    RecordSpec(
        "proxy.config.http2.max_settings_per_frame", _I, 7, _R, NON_NEGATIVE,
        "Settings one SETTINGS frame may carry; more is GOAWAY(ENHANCE_YOUR_CALM); 0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_settings_per_minute", _I, 14, _R, NON_NEGATIVE,
        "Settings a connection may send per minute; 0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_settings_frames_per_minute", _I, 14, _R, NON_NEGATIVE,
        "SETTINGS frames a connection may send per minute; 0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_ping_frames_per_minute", _I, 60, _R, NON_NEGATIVE,
        "PING frames a connection may send per minute; 0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_priority_frames_per_minute", _I, 120, _R, NON_NEGATIVE,
        "PRIORITY frames a connection may send per minute; 0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_rst_stream_frames_per_minute", _I, 200, _R, NON_NEGATIVE,
        "RST_STREAM frames a connection may send per minute (rapid reset, CVE-2023-44487); "
        "0: no limit",
    ),
    RecordSpec(
        "proxy.config.http2.max_continuation_frames_per_minute", _I, 120, _R, NON_NEGATIVE,
        "CONTINUATION frames a connection may send per minute; 0: no limit",
    ),
    # net
    RecordSpec(
        "proxy.config.net.default_inactivity_timeout", _I, 300, _R, POSITIVE,
        "Seconds of inactivity after which any connection without a tighter timeout is closed",
    ),
    RecordSpec(
        "proxy.config.net.max_connections_in", _I, 30000, _R, POSITIVE,
        "Most client connections per worker; further accepts are closed and counted as throttled",
    ),
    RecordSpec(
        "proxy.config.net.max_requests_in", _I, 0, _R, NON_NEGATIVE,
        "Most client transactions in progress at once (split evenly over the workers); a request "
        "beyond it gets 503 and its connection is closed; 0 means unlimited",
    ),
    # remap and plugins
    RecordSpec(
        "proxy.config.url_remap.filename", _S, "remap.config", _R, None,
        "Remap rules file; relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.url_remap.remap_required", _I, 1, _R, BOOL,
        "1: a request no remap rule matches gets 404. 0: it goes to the host it names (a forward "
        "proxy), but only for clients in proxy.config.url_remap.unmapped_clients",
    ),
    RecordSpec(
        "proxy.config.url_remap.unmapped_clients", _S, "127.0.0.1 ::1", _R, _networks,
        "With remap_required 0: client addresses or networks (space separated, e.g. 10.0.0.0/8) "
        "whose unmapped requests are forwarded; 0.0.0.0/0 ::/0 makes an open proxy (tsproxy)",
    ),
    RecordSpec(
        "proxy.config.url_remap.pristine_host_hdr", _I, 0, _R, BOOL,
        "Send the origin the client's Host header instead of the remap target's host",
    ),
    RecordSpec(
        "proxy.config.plugin.plugin_dir", _S, "plugins", _X, None,
        "Directory plugins are loaded from; relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.plugin.load_failure_fatal", _I, 1, _R, BOOL,
        "A plugin that fails to load stops startup (1) or is skipped with an error (0)",
    ),
    # log files
    RecordSpec(
        "proxy.config.log.rolling_enabled", _I, 1, _R, int_range(0, 4),
        "Roll the log files: 0 never, 1 every rolling_interval_sec, 2 when a file exceeds "
        "rolling_size_mb, 3 whichever comes first, 4 at the interval, if the file exceeds the size",
    ),
    RecordSpec(
        "proxy.config.log.rolling_interval_sec", _I, 86400, _R, int_range(60),
        "Seconds between interval rolls, aligned to multiples of it since midnight UTC",
    ),
    RecordSpec(
        "proxy.config.log.rolling_size_mb", _I, 10, _R, POSITIVE,
        "Size in MB above which a log file is rolled (rolling_enabled 2, 3 or 4)",
    ),
    RecordSpec(
        "proxy.config.log.max_space_mb_for_logs", _I, 25000, _R, POSITIVE,
        "MB the log directory may use; beyond it the oldest rolled files are deleted "
        "(with auto_delete_rolled_files)",
    ),
    RecordSpec(
        "proxy.config.log.auto_delete_rolled_files", _I, 1, _R, BOOL,
        "Delete the oldest rolled log files when the log directory exceeds max_space_mb_for_logs",
    ),
    # diagnostics
    RecordSpec("proxy.config.diags.debug.enabled", _I, 0, _R, BOOL, "Enable debug output for the tags below"),
    RecordSpec(
        "proxy.config.diags.debug.tags", _S, "", _R, _regex,
        "Regular expression of debug tags to enable, e.g. ssl|http",
    ),
    # TLS, client side of the proxy (inbound)
    RecordSpec(
        "proxy.config.ssl.server.multicert.filename", _S, "ssl_multicert.config", _R, None,
        "Certificate table file; relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.ssl.servername.filename", _S, "sni.yaml", _R, None,
        "Per-name TLS policy file (sni.yaml, ATS 9.2 format); relative to the config directory",
    ),
    RecordSpec(
        "proxy.config.ssl.server.cert.path", _S, ".", _R, None,
        "Directory ssl_cert_name and ssl_ca_name are relative to",
    ),
    RecordSpec(
        "proxy.config.ssl.server.private_key.path", _S, ".", _R, None,
        "Directory ssl_key_name is relative to",
    ),
    RecordSpec(
        "proxy.config.ssl.CA.cert.filename", _S, "", _R, None,
        "CA bundle used to verify client certificates (relative to proxy.config.ssl.CA.cert.path)",
    ),
    RecordSpec(
        "proxy.config.ssl.CA.cert.path", _S, "", _R, None,
        "Directory of CA certificates used to verify client certificates",
    ),
    RecordSpec(
        "proxy.config.ssl.handshake_timeout_in", _I, 30, _R, NON_NEGATIVE,
        "Seconds a client has to complete the TLS handshake; 0 leaves only the inactivity timeout",
    ),
    RecordSpec(
        "proxy.config.ssl.session_cache", _I, 2, _R, int_range(0, 2),
        "TLS session cache (session IDs, TLS 1.3 stateful tickets): 0 off, 1 OpenSSL's cache in "
        "each worker, 2 one cache shared by all workers (ATS's default; made at start: a reload "
        "from 0 or 1 to 2 acts as 1 until a restart)",
    ),
    RecordSpec(
        "proxy.config.ssl.session_cache.size", _I, 20480, _X, int_range(1, 4194304),
        "Sessions the shared cache holds (1 KiB of shared memory each; ATS: 102400)",
    ),
    RecordSpec(
        "proxy.config.ssl.session_cache.timeout", _I, 0, _R, NON_NEGATIVE,
        "Seconds a cached session can be resumed; 0: OpenSSL's default, 300",
    ),
    RecordSpec(
        "proxy.config.ssl.client_hello.max_size", _I, 131396, _R, int_range(512, 131396),
        "Largest ClientHello body (bytes, handshake header not counted) the pre-parser buffers; "
        "a larger one gets illegal_parameter. Default and maximum: OpenSSL's own limit "
        "(CLIENT_HELLO_MAX_LENGTH), which refuses anything larger anyway",
    ),
    RecordSpec(
        "proxy.config.ssl.server.alpn.no_overlap_alert", _I, 1, _R, BOOL,
        "1: a client whose ALPN offer shares no protocol with the port gets a fatal "
        "no_application_protocol alert (RFC 7301 section 3.2); 0: the handshake goes on without ALPN",
    ),
    RecordSpec(
        "proxy.config.ssl.wire_trace_enabled", _I, 0, _R, BOOL,
        "Log each TLS handshake step of the connections wire_trace_addr, wire_trace_server_name "
        "and wire_trace_percentage select (lines with 'trace')",
    ),
    RecordSpec(
        "proxy.config.ssl.wire_trace_addr", _S, "", _R, _ip_or_empty,
        "Wire trace: only connections from this client IP address; empty: any",
    ),
    RecordSpec(
        "proxy.config.ssl.wire_trace_percentage", _I, 0, _R, int_range(0, 100),
        "Wire trace: percentage of the selected connections traced (ATS: 0 traces none)",
    ),
    RecordSpec(
        "proxy.config.ssl.wire_trace_server_name", _S, "", _R, None,
        "Wire trace: only connections whose SNI is this name; empty: any",
    ),
    RecordSpec("proxy.config.ssl.TLSv1", _I, 0, _R, BOOL, "Accept TLS 1.0 from clients"),
    RecordSpec("proxy.config.ssl.TLSv1_1", _I, 0, _R, BOOL, "Accept TLS 1.1 from clients"),
    RecordSpec("proxy.config.ssl.TLSv1_2", _I, 1, _R, BOOL, "Accept TLS 1.2 from clients"),
    RecordSpec("proxy.config.ssl.TLSv1_3", _I, 1, _R, BOOL, "Accept TLS 1.3 from clients"),
    RecordSpec(
        "proxy.config.ssl.server.cipher_suite", _S, ATS_CIPHER_SUITE, _R, None,
        "OpenSSL cipher list offered to clients for TLS 1.2 and below",
    ),
    RecordSpec(
        "proxy.config.ssl.server.TLSv1_3.cipher_suites", _S, ATS_TLSV13_CIPHER_SUITES, _R, None,
        "TLS 1.3 cipher suites offered to clients",
    ),
    RecordSpec(
        "proxy.config.ssl.server.groups_list", _S, "", _R, None,
        "Key-exchange groups offered to clients, most preferred first (OpenSSL names, colon "
        "separated, e.g. X25519:P-256); NULL: OpenSSL's default list",
    ),
    RecordSpec(
        "proxy.config.ssl.server.honor_cipher_order", _I, 1, _R, BOOL,
        "Prefer the proxy's cipher order over the client's",
    ),
    RecordSpec(
        "proxy.config.ssl.server.session_ticket.enable", _I, 1, _R, BOOL, "Issue TLS session tickets"
    ),
    RecordSpec(
        "proxy.config.ssl.server.session_ticket.number", _I, 2, _R, NON_NEGATIVE,
        "Number of TLS 1.3 tickets issued after a full handshake",
    ),
    RecordSpec(
        "proxy.config.ssl.server.ticket_key.filename", _S, "", _R, None,
        "File of session ticket keys (shared across proxies); empty: random keys per start",
    ),
    RecordSpec(
        "proxy.config.ssl.client.certification_level", _I, 0, _R, int_range(0, 2),
        "Client certificates: 0 not requested, 1 requested and verified if sent, 2 required",
    ),
    RecordSpec(
        "proxy.config.ssl.allow_client_renegotiation", _I, 0, _R, BOOL,
        "Allow clients to start a TLS 1.2 renegotiation",
    ),
    RecordSpec(
        "proxy.config.ssl.keylog_file", _S, "", _R, None,
        "Write TLS secrets in NSS key log format to this file (debugging only); empty: off",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.enabled", _I, 0, _R, BOOL,
        "Staple OCSP responses (ssl_ocsp_name files, or fetched from each certificate's AIA responder)",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.cache_timeout", _I, 3600, _R, POSITIVE,
        "Seconds a fetched OCSP response is used before it is fetched again (sooner near its nextUpdate)",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.request_timeout", _I, 10, _R, POSITIVE,
        "Seconds an OCSP responder has to answer",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.update_period", _I, 60, _R, POSITIVE,
        "Seconds between checks for OCSP responses that are due (and changed ssl_ocsp_name files)",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.response.path", _S, "", _R, None,
        "Directory ssl_ocsp_name files are relative to; empty: the config directory",
    ),
    RecordSpec(
        "proxy.config.ssl.ocsp.request_mode", _I, 0, _R, BOOL,
        "How OCSP requests are sent: 0 HTTP POST, 1 HTTP GET (RFC 6960 appendix A)",
    ),
    RecordSpec(
        "proxy.config.tunnel.route", _S, "", _R, _host_port,
        "host:port that tr-pass ports blind-tunnel to (tsproxy; after sni.yaml tunnel_route)",
    ),
    # TLS, origin side of the proxy (outbound)
    RecordSpec(
        "proxy.config.ssl.client.verify.server.policy", _S, "ENFORCED", _R,
        one_of("DISABLED", "PERMISSIVE", "ENFORCED"),
        "Origin certificate checks: DISABLED, PERMISSIVE (log failures only) or ENFORCED",
    ),
    RecordSpec(
        "proxy.config.ssl.client.verify.server.properties", _S, "ALL", _R,
        one_of("NONE", "SIGNATURE", "NAME", "ALL"),
        "What the origin certificate check covers: NONE, SIGNATURE, NAME or ALL",
    ),
    RecordSpec(
        "proxy.config.ssl.client.verify.server", _I, -1, _R, int_range(-1, 1),
        "Legacy switch: -1 unset (use the policy), 0 DISABLED, 1 ENFORCED",
    ),
    RecordSpec(
        "proxy.config.ssl.client.CA.cert.filename", _S, "", _R, None,
        "CA bundle used to verify origin certificates; empty: the system default",
    ),
    RecordSpec(
        "proxy.config.ssl.client.CA.cert.path", _S, "", _R, None,
        "Directory of CA certificates used to verify origin certificates",
    ),
    RecordSpec(
        "proxy.config.ssl.client.cert.filename", _S, "", _R, None,
        "Certificate presented to origins that ask for one; empty: none",
    ),
    RecordSpec(
        "proxy.config.ssl.client.private_key.filename", _S, "", _R, None,
        "Key of the origin client certificate; empty: in the certificate file",
    ),
    RecordSpec(
        "proxy.config.ssl.client.cipher_suite", _S, ATS_CIPHER_SUITE, _R, None,
        "OpenSSL cipher list offered to origins for TLS 1.2",
    ),
    RecordSpec(
        "proxy.config.ssl.client.TLSv1_3.cipher_suites", _S, ATS_TLSV13_CIPHER_SUITES, _R, None,
        "TLS 1.3 cipher suites offered to origins",
    ),
    RecordSpec(
        "proxy.config.ssl.client.groups_list", _S, "", _R, None,
        "Key-exchange groups offered to origins, most preferred first; NULL: OpenSSL's default list",
    ),
    RecordSpec("proxy.config.ssl.client.TLSv1_2", _I, 1, _R, BOOL, "Offer TLS 1.2 to origins"),
    RecordSpec("proxy.config.ssl.client.TLSv1_3", _I, 1, _R, BOOL, "Offer TLS 1.3 to origins"),
    RecordSpec(
        "proxy.config.ssl.client.verify.depth", _I, 7, _R, NON_NEGATIVE,
        "Longest origin certificate chain accepted",
    ),
    RecordSpec(
        "proxy.config.ssl.client.sni_policy", _S, "host", _R, one_of("host", "remap"),
        "SNI sent to origins: host (the request's Host) or remap (the remapped origin name)",
    ),
)
# fmt: on

RECORDS_BY_NAME: dict[str, RecordSpec] = {spec.name: spec for spec in RECORDS}
