# Theory of operation
# -------------------
# SSLConfigParams is ATS's SSLConfigParams: one immutable snapshot of every TLS-related
# record that the server contexts (ssl_multicert.config lines) and the origin-side client
# context need.  It is built from a plain mapping of record name -> value (the records
# subsystem owns parsing records.config; this module only reads the resulting values), so
# a reload builds a new snapshot and never mutates one that live connections still hold.
#
# Invariants:
#   * every path in the snapshot is absolute (relative record values are resolved against
#     the configuration directory, as ATS resolves them against its sysconfdir);
#   * a record missing from the mapping takes the ATS default listed in RECORD_DEFAULTS;
#   * a value of the wrong type or out of range raises ConfigError naming the record.
"""Snapshot of the proxy.config.ssl.* records (ATS SSLConfigParams)."""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from iocore.records.errors import ConfigError

_E = TypeVar("_E", bound=enum.Enum)

__all__ = [
    "RECORD_DEFAULTS",
    "SSLConfigParams",
    "VerifyServerPolicy",
    "VerifyServerProperties",
    "WireTrace",
]

_RECORDS_FILE = "records.config"

DEFAULT_SERVER_CIPHER_SUITE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
DEFAULT_TLS13_CIPHER_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# The ATS defaults (9.2 series) for the records this module reads.  The records table owned
# by iocore/records is the authority for the shipped configuration; these values only make
# a partial mapping (as tests pass) behave like a default records.config.
RECORD_DEFAULTS: Mapping[str, object] = {
    "proxy.config.ssl.server.cert.path": "",
    "proxy.config.ssl.server.private_key.path": "",
    "proxy.config.ssl.server.multicert.filename": "ssl_multicert.config",
    "proxy.config.ssl.servername.filename": "sni.yaml",
    "proxy.config.ssl.TLSv1": 0,
    "proxy.config.ssl.TLSv1_1": 0,
    "proxy.config.ssl.TLSv1_2": 1,
    "proxy.config.ssl.TLSv1_3": 1,
    "proxy.config.ssl.server.cipher_suite": DEFAULT_SERVER_CIPHER_SUITE,
    "proxy.config.ssl.server.TLSv1_3.cipher_suites": DEFAULT_TLS13_CIPHER_SUITES,
    "proxy.config.ssl.server.groups_list": "",
    "proxy.config.ssl.server.honor_cipher_order": 1,
    "proxy.config.ssl.server.session_ticket.enable": 1,
    "proxy.config.ssl.server.session_ticket.number": 2,
    "proxy.config.ssl.server.ticket_key.filename": "",
    "proxy.config.ssl.CA.cert.filename": "",
    "proxy.config.ssl.CA.cert.path": "",
    "proxy.config.ssl.client.certification_level": 0,
    "proxy.config.ssl.handshake_timeout_in": 30,
    "proxy.config.ssl.allow_client_renegotiation": 0,
    "proxy.config.ssl.keylog_file": "",
    "proxy.config.tunnel.route": "",
    "proxy.config.ssl.ocsp.enabled": 0,
    "proxy.config.ssl.ocsp.cache_timeout": 3600,
    "proxy.config.ssl.ocsp.request_timeout": 10,
    "proxy.config.ssl.ocsp.update_period": 60,
    "proxy.config.ssl.ocsp.response.path": "",
    "proxy.config.ssl.ocsp.request_mode": 0,
    "proxy.config.ssl.client.verify.server.policy": "ENFORCED",
    "proxy.config.ssl.client.verify.server.properties": "ALL",
    "proxy.config.ssl.client.verify.server": -1,
    "proxy.config.ssl.client.CA.cert.filename": "",
    "proxy.config.ssl.client.CA.cert.path": "",
    "proxy.config.ssl.client.cert.filename": "",
    "proxy.config.ssl.client.cert.path": "",
    "proxy.config.ssl.client.private_key.filename": "",
    "proxy.config.ssl.client.private_key.path": "",
    "proxy.config.ssl.client.cipher_suite": DEFAULT_SERVER_CIPHER_SUITE,
    "proxy.config.ssl.client.TLSv1_3.cipher_suites": DEFAULT_TLS13_CIPHER_SUITES,
    "proxy.config.ssl.client.groups_list": "",
    "proxy.config.ssl.client.TLSv1": 0,
    "proxy.config.ssl.client.TLSv1_1": 0,
    "proxy.config.ssl.client.TLSv1_2": 1,
    "proxy.config.ssl.client.TLSv1_3": 1,
    "proxy.config.ssl.client.verify.depth": 7,
    "proxy.config.ssl.client.sni_policy": "host",
    "proxy.config.ssl.client_hello.max_size": 131396,
    "proxy.config.ssl.session_cache": 2,
    "proxy.config.ssl.session_cache.size": 20480,
    "proxy.config.ssl.session_cache.timeout": 0,
    "proxy.config.ssl.server.alpn.no_overlap_alert": 1,
    "proxy.config.ssl.wire_trace_enabled": 0,
    "proxy.config.ssl.wire_trace_addr": "",
    "proxy.config.ssl.wire_trace_percentage": 0,
    "proxy.config.ssl.wire_trace_server_name": "",
}


class VerifyServerPolicy(enum.Enum):
    """proxy.config.ssl.client.verify.server.policy: what a failed origin check does."""

    DISABLED = "DISABLED"
    PERMISSIVE = "PERMISSIVE"  # check and report, but let the connection proceed
    ENFORCED = "ENFORCED"


class VerifyServerProperties(enum.Enum):
    """proxy.config.ssl.client.verify.server.properties: which origin checks run."""

    NONE = "NONE"
    SIGNATURE = "SIGNATURE"
    NAME = "NAME"
    ALL = "ALL"


def _get(rec: Mapping[str, object], name: str) -> object:
    if name in rec:
        return rec[name]
    return RECORD_DEFAULTS[name]


def _int(rec: Mapping[str, object], name: str) -> int:
    value = _get(rec, name)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise ConfigError(_RECORDS_FILE, None, f"{name}: expected an INT, got {value!r}")


def _bool(rec: Mapping[str, object], name: str) -> bool:
    value = _int(rec, name)
    if value not in (0, 1):
        raise ConfigError(_RECORDS_FILE, None, f"{name}: expected 0 or 1, got {value}")
    return value == 1


def _str(rec: Mapping[str, object], name: str) -> str:
    value = _get(rec, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(_RECORDS_FILE, None, f"{name}: expected a STRING, got {value!r}")
    return value.strip()


def _path(rec: Mapping[str, object], name: str, base: Path) -> Path | None:
    """An optional file or directory record; "" (ATS NULL) means unset."""
    value = _str(rec, name)
    if not value:
        return None
    return (base / value).resolve() if not Path(value).is_absolute() else Path(value)


def _dir(rec: Mapping[str, object], name: str, config_dir: Path) -> Path:
    """A directory record; unset means the configuration directory itself."""
    found = _path(rec, name, config_dir)
    return found if found is not None else config_dir


def _enum(rec: Mapping[str, object], name: str, kind: type[_E]) -> _E:
    value = _str(rec, name).upper()
    try:
        return kind(value)
    except ValueError:
        allowed = "|".join(str(m.value) for m in kind)
        raise ConfigError(_RECORDS_FILE, None, f"{name}: expected {allowed}, got {value!r}") from None


def _tunnel_route(rec: Mapping[str, object], name: str) -> str:
    value = _str(rec, name)
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(_RECORDS_FILE, None, f"{name}: expected host:port, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SSLConfigParams:
    """Everything build_server_context / build_client_context need, frozen per reload."""

    config_dir: Path
    # -- server side (inbound TLS) --
    server_cert_path: Path
    server_private_key_path: Path
    multicert_filename: Path
    servername_filename: Path  # sni.yaml
    tls_v1: bool
    tls_v1_1: bool
    tls_v1_2: bool
    tls_v1_3: bool
    server_cipher_suite: str
    server_tls13_cipher_suites: str
    server_groups_list: str
    honor_cipher_order: bool
    session_ticket_enabled: bool
    session_ticket_number: int
    ticket_key_filename: Path | None
    ca_cert_filename: Path | None
    ca_cert_path: Path | None
    certification_level: int
    handshake_timeout_in: int
    allow_client_renegotiation: bool
    keylog_file: Path | None
    tunnel_route: str
    # -- OCSP stapling (proxy.config.ssl.ocsp.*) --
    ocsp_enabled: bool
    ocsp_cache_timeout: int
    ocsp_request_timeout: int
    ocsp_update_period: int
    ocsp_response_path: Path
    ocsp_request_mode_get: bool
    # -- client side (origin TLS) --
    client_verify_policy: VerifyServerPolicy
    client_verify_properties: VerifyServerProperties
    client_ca_cert_filename: Path | None
    client_ca_cert_path: Path | None
    client_cert_filename: Path | None
    client_private_key_filename: Path | None
    client_cert_path: Path  # the directories sni.yaml's client_cert / client_key are relative to
    client_private_key_path: Path
    client_cipher_suite: str
    client_tls13_cipher_suites: str
    client_groups_list: str
    client_tls_v1: bool
    client_tls_v1_1: bool
    client_tls_v1_2: bool
    client_tls_v1_3: bool
    client_verify_depth: int
    client_sni_policy: str
    # -- pre-parser, ALPN, wire trace (inbound) --
    client_hello_max_size: int = 131396
    session_cache_mode: int = 2
    session_cache_size: int = 20480
    session_cache_timeout: int = 0
    alpn_no_overlap_alert: bool = True
    wire_trace: WireTrace | None = None

    @classmethod
    def from_records(cls, rec: Mapping[str, object], config_dir: Path) -> SSLConfigParams:
        """Read the snapshot from record values; missing records take the ATS defaults."""
        config_dir = config_dir.resolve()
        cert_path = _dir(rec, "proxy.config.ssl.server.cert.path", config_dir)
        key_path = _dir(rec, "proxy.config.ssl.server.private_key.path", config_dir)
        multicert = _path(rec, "proxy.config.ssl.server.multicert.filename", config_dir)
        if multicert is None:
            multicert = config_dir / "ssl_multicert.config"
        servername = _path(rec, "proxy.config.ssl.servername.filename", config_dir)
        if servername is None:
            servername = config_dir / "sni.yaml"

        level = _int(rec, "proxy.config.ssl.client.certification_level")
        if level not in (0, 1, 2):
            raise ConfigError(
                _RECORDS_FILE,
                None,
                f"proxy.config.ssl.client.certification_level: expected 0, 1 or 2, got {level}",
            )
        tickets = _int(rec, "proxy.config.ssl.server.session_ticket.number")
        if tickets < 0:
            raise ConfigError(
                _RECORDS_FILE, None, f"proxy.config.ssl.server.session_ticket.number: negative ({tickets})"
            )
        timeout = _int(rec, "proxy.config.ssl.handshake_timeout_in")
        if timeout < 0:
            raise ConfigError(
                _RECORDS_FILE, None, f"proxy.config.ssl.handshake_timeout_in: negative ({timeout})"
            )
        depth = _int(rec, "proxy.config.ssl.client.verify.depth")
        if depth < 0:
            raise ConfigError(
                _RECORDS_FILE, None, f"proxy.config.ssl.client.verify.depth: negative ({depth})"
            )

        policy = _enum(rec, "proxy.config.ssl.client.verify.server.policy", VerifyServerPolicy)
        # The legacy INT switch wins only when set explicitly (-1 = unset), as in ATS 9.
        legacy = _int(rec, "proxy.config.ssl.client.verify.server")
        if legacy == 0:
            policy = VerifyServerPolicy.DISABLED
        elif legacy == 1:
            policy = VerifyServerPolicy.ENFORCED
        elif legacy != -1:
            raise ConfigError(
                _RECORDS_FILE,
                None,
                f"proxy.config.ssl.client.verify.server: expected -1, 0 or 1, got {legacy}",
            )

        ca_dir = _path(rec, "proxy.config.ssl.CA.cert.path", config_dir)
        client_ca_dir = _path(rec, "proxy.config.ssl.client.CA.cert.path", config_dir)
        client_cert_dir = _dir(rec, "proxy.config.ssl.client.cert.path", config_dir)
        client_key_dir = _dir(rec, "proxy.config.ssl.client.private_key.path", config_dir)
        return cls(
            config_dir=config_dir,
            server_cert_path=cert_path,
            server_private_key_path=key_path,
            multicert_filename=multicert,
            servername_filename=servername,
            tls_v1=_bool(rec, "proxy.config.ssl.TLSv1"),
            tls_v1_1=_bool(rec, "proxy.config.ssl.TLSv1_1"),
            tls_v1_2=_bool(rec, "proxy.config.ssl.TLSv1_2"),
            tls_v1_3=_bool(rec, "proxy.config.ssl.TLSv1_3"),
            server_cipher_suite=_str(rec, "proxy.config.ssl.server.cipher_suite"),
            server_tls13_cipher_suites=_str(rec, "proxy.config.ssl.server.TLSv1_3.cipher_suites"),
            server_groups_list=_str(rec, "proxy.config.ssl.server.groups_list"),
            honor_cipher_order=_bool(rec, "proxy.config.ssl.server.honor_cipher_order"),
            session_ticket_enabled=_bool(rec, "proxy.config.ssl.server.session_ticket.enable"),
            session_ticket_number=tickets,
            ticket_key_filename=_path(rec, "proxy.config.ssl.server.ticket_key.filename", cert_path),
            ca_cert_filename=_path(rec, "proxy.config.ssl.CA.cert.filename", ca_dir or config_dir),
            ca_cert_path=ca_dir,
            certification_level=level,
            handshake_timeout_in=timeout,
            allow_client_renegotiation=_bool(rec, "proxy.config.ssl.allow_client_renegotiation"),
            keylog_file=_path(rec, "proxy.config.ssl.keylog_file", config_dir),
            tunnel_route=_tunnel_route(rec, "proxy.config.tunnel.route"),
            ocsp_enabled=_bool(rec, "proxy.config.ssl.ocsp.enabled"),
            ocsp_cache_timeout=_int(rec, "proxy.config.ssl.ocsp.cache_timeout"),
            ocsp_request_timeout=_int(rec, "proxy.config.ssl.ocsp.request_timeout"),
            ocsp_update_period=_int(rec, "proxy.config.ssl.ocsp.update_period"),
            ocsp_response_path=_dir(rec, "proxy.config.ssl.ocsp.response.path", config_dir),
            ocsp_request_mode_get=_bool(rec, "proxy.config.ssl.ocsp.request_mode"),
            client_verify_policy=policy,
            client_verify_properties=_enum(
                rec, "proxy.config.ssl.client.verify.server.properties", VerifyServerProperties
            ),
            client_ca_cert_filename=_path(
                rec, "proxy.config.ssl.client.CA.cert.filename", client_ca_dir or config_dir
            ),
            client_ca_cert_path=client_ca_dir,
            client_cert_filename=_path(rec, "proxy.config.ssl.client.cert.filename", client_cert_dir),
            client_private_key_filename=_path(
                rec, "proxy.config.ssl.client.private_key.filename", client_key_dir
            ),
            client_cert_path=client_cert_dir,
            client_private_key_path=client_key_dir,
            client_cipher_suite=_str(rec, "proxy.config.ssl.client.cipher_suite"),
            client_tls13_cipher_suites=_str(rec, "proxy.config.ssl.client.TLSv1_3.cipher_suites"),
            client_groups_list=_str(rec, "proxy.config.ssl.client.groups_list"),
            client_tls_v1=_bool(rec, "proxy.config.ssl.client.TLSv1"),
            client_tls_v1_1=_bool(rec, "proxy.config.ssl.client.TLSv1_1"),
            client_tls_v1_2=_bool(rec, "proxy.config.ssl.client.TLSv1_2"),
            client_tls_v1_3=_bool(rec, "proxy.config.ssl.client.TLSv1_3"),
            client_verify_depth=depth,
            client_sni_policy=_str(rec, "proxy.config.ssl.client.sni_policy") or "host",
            client_hello_max_size=_int(rec, "proxy.config.ssl.client_hello.max_size"),
            session_cache_mode=_int(rec, "proxy.config.ssl.session_cache"),
            session_cache_size=_int(rec, "proxy.config.ssl.session_cache.size"),
            session_cache_timeout=_int(rec, "proxy.config.ssl.session_cache.timeout"),
            alpn_no_overlap_alert=_bool(rec, "proxy.config.ssl.server.alpn.no_overlap_alert"),
            wire_trace=WireTrace.from_records(rec),
        )


class WireTrace:
    """proxy.config.ssl.wire_trace_* (ATS SSLConfigParams::ssl_wire_trace_*, computeSSLTrace).

    ``select`` runs once per connection, when its SNI is known (ATS computes it in the SNI
    callback): the client address must equal ``addr`` when set, the SNI must equal
    ``server_name`` when set, and then a draw in [0, 100) must fall below ``percentage``
    (ATS: a percentage of 0 traces nothing, even with an address or a name set). Built only
    when wire_trace_enabled is 1, so a proxy without tracing pays one None check.
    """

    __slots__ = ("addr", "percentage", "server_name")

    def __init__(
        self,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        server_name: str | None,
        percentage: int,
    ) -> None:
        self.addr = addr
        self.server_name = server_name
        self.percentage = percentage

    @classmethod
    def from_records(cls, rec: Mapping[str, object]) -> WireTrace | None:
        if not _bool(rec, "proxy.config.ssl.wire_trace_enabled"):
            return None
        text = _str(rec, "proxy.config.ssl.wire_trace_addr").strip("[]")
        try:
            addr = ipaddress.ip_address(text) if text else None
        except ValueError:
            raise ConfigError(
                _RECORDS_FILE,
                None,
                f"proxy.config.ssl.wire_trace_addr: expected an IP address, got {text!r}",
            ) from None
        percentage = _int(rec, "proxy.config.ssl.wire_trace_percentage")
        if not 0 <= percentage <= 100:
            raise ConfigError(
                _RECORDS_FILE,
                None,
                f"proxy.config.ssl.wire_trace_percentage: expected 0..100, got {percentage}",
            )
        name = _str(rec, "proxy.config.ssl.wire_trace_server_name").lower().rstrip(".")
        return cls(addr, name or None, percentage)

    def select(self, client_ip: str, server_name: str | None) -> bool:
        """Is this connection traced? (ATS computeSSLTrace.)"""
        if self.server_name is not None and server_name != self.server_name:
            return False
        if self.addr is not None:
            try:
                ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
            if ip != self.addr:
                return False
        return random.randrange(100) < self.percentage
