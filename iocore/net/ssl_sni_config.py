# Theory of operation
# -------------------
# sni.yaml, as ATS 9.2 reads it (YamlSNIConfig.cc, SSLSNIConfig.cc): a YAML mapping whose ``sni``
# key holds a list of items; each item names a server name (``fqdn``: exact, ``*.domain`` for
# one label, or ``*`` for every name, case-insensitive) and the policy for connections that
# asked for it. The first item that matches wins, as in ATS (file order, like remap.config).
# Two stages, as for ssl_multicert.config:
#
#   parse_sni_yaml(text, path) -> SNIParseResult   pure: text in, validated SNIItems and
#                                                  warnings out; every error names FILE:LINE
#   load_sni_config(params, host_sni_policy) -> SNIConfigParams
#                                                  reads the file, prepares each item's OpenSSL
#                                                  state (InboundTLSPolicy: verify_client, CA
#                                                  certs, TLS versions, ciphers) and indexes the
#                                                  items
#
# Where each key acts (ATS applies its SNI actions at the servername callback; tsproxy parses
# the ClientHello before OpenSSL exists, so the same point is ``set_context_cert``):
#   ip_allow, tunnel_route          the handshake, before the certificate is chosen
#   verify_client(+_ca_certs),      the new SSL object, before OpenSSL reads the ClientHello
#   valid_tls_versions_in, server_cipher_suite, server_TLSv1_3_cipher_suites, server_groups_list
#   forward_route                   after the handshake: the decrypted bytes go to the route
#   host_sni_policy                 the HTTP state machine, per request (Host vs SNI)
#   verify_server_*, client_cert,   the origin side of transactions on such connections
#   client_key, client_sni_policy
#
# Invariants: an SNIConfigParams is built whole and only read afterwards (a reload builds a
# new one next to the new certificate table, and the worker swaps both together); a lookup
# is at most three dict probes; no item -> no per-connection work.
"""sni.yaml: per-name TLS policy (ATS YamlSNIConfig / SNIConfigParams)."""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from iocore.net.ssl_config import SSLConfigParams, VerifyServerPolicy, VerifyServerProperties
from iocore.net.tls.context import TLS_VERSION_NAMES, InboundTLSPolicy, build_inbound_policy
from iocore.net.tls.errors import TLSError
from iocore.records.errors import ConfigError

__all__ = [
    "HOST_SNI_POLICY_NAMES",
    "RouteType",
    "SNIConfigParams",
    "SNIItem",
    "SNIParseResult",
    "SNIPolicy",
    "VerifyClient",
    "load_sni_config",
    "parse_sni_yaml",
]


class VerifyClient(enum.IntEnum):
    """verify_client: proxy.config.ssl.client.certification_level for this name."""

    NONE = 0
    MODERATE = 1
    STRICT = 2


class RouteType(enum.Enum):
    BLIND = "tunnel_route"  # blind tunnel: the TLS bytes go to the route untouched
    FORWARD = "forward_route"  # terminate TLS, then plain TCP to the route


HOST_SNI_POLICY_NAMES = {"DISABLED": 0, "PERMISSIVE": 1, "ENFORCED": 2}
_CLIENT_SNI_POLICIES = ("host", "remap")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# ATS keys tsproxy accepts but that change nothing here (tuning for features it lacks).
_IGNORED_KEYS = frozenset(
    {
        "tunnel_prewarm",
        "tunnel_prewarm_srv",
        "tunnel_prewarm_rate",
        "tunnel_prewarm_min",
        "tunnel_prewarm_max",
        "tunnel_prewarm_connect_timeout",
        "tunnel_prewarm_inactive_timeout",
        "http2_buffer_water_mark",
        "http2_initial_window_size_in",
        "http2_max_settings_frames_per_minute",
        "http2_max_ping_frames_per_minute",
        "http2_max_priority_frames_per_minute",
        "http2_max_rst_stream_frames_per_minute",
        "http2_max_continuation_frames_per_minute",
        "quic",
        "server_max_early_data",
    }
)
# ATS keys whose absence would change routing or weaken security: refused, not ignored.
_UNSUPPORTED_KEYS = {
    "partial_blind_route": "partial_blind_route (re-encrypting tunnel) is not supported",
    "tunnel_alpn": "tunnel_alpn only applies to partial_blind_route, which is not supported",
    "inbound_port_ranges": "inbound_port_ranges (ATS 10) is not supported",
}
_KEYS = frozenset(
    {
        "fqdn",
        "verify_client",
        "verify_client_ca_certs",
        "valid_tls_versions_in",
        "valid_tls_version_min_in",
        "valid_tls_version_max_in",
        "ip_allow",
        "tunnel_route",
        "forward_route",
        "host_sni_policy",
        "verify_server_policy",
        "verify_server_properties",
        "client_cert",
        "client_key",
        "client_sni_policy",
        "http2",
        "server_cipher_suite",
        "server_TLSv1_3_cipher_suites",
        "server_groups_list",
    }
)


@dataclass(frozen=True, slots=True)
class IPRange:
    """One ip_allow entry: an inclusive range of addresses of one IP version."""

    version: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class SNIItem:
    """One validated sni.yaml item (YamlSNIConfig::Item); paths as written, unresolved."""

    path: str
    line: int
    fqdn: str  # lower case; "*" or "*.domain" for wildcards
    values: Mapping[str, Any]  # every supported key as written (for plugins), fqdn included
    verify_client: VerifyClient | None = None
    verify_client_ca_file: str | None = None
    verify_client_ca_dir: str | None = None
    tls_versions: tuple[str, ...] | None = None  # allowed versions, TLS_VERSION_NAMES order
    ip_allow: tuple[IPRange, ...] | None = None
    route: str | None = None
    route_type: RouteType | None = None
    host_sni_policy: int | None = None
    verify_server_policy: VerifyServerPolicy | None = None
    verify_server_properties: VerifyServerProperties | None = None
    client_cert: str | None = None
    client_key: str | None = None
    client_sni_policy: str | None = None
    http2: bool | None = None
    server_cipher_suite: str | None = None  # replace proxy.config.ssl.server.cipher_suite etc.
    server_tls13_cipher_suites: str | None = None
    server_groups_list: str | None = None

    @property
    def source(self) -> str:
        return f"{Path(self.path).name}:{self.line}"

    @property
    def inbound_policy_key(self) -> tuple[Any, ...] | None:
        """The inbound security policy (what host_sni_policy compares); None when the item
        sets none of verify_client, ip_allow or the TLS versions."""
        if self.verify_client is None and self.ip_allow is None and self.tls_versions is None:
            return None
        return (
            self.verify_client,
            self.verify_client_ca_file,
            self.verify_client_ca_dir,
            self.ip_allow,
            self.tls_versions,
        )

    @property
    def has_outbound(self) -> bool:
        return (
            self.verify_server_policy is not None
            or self.verify_server_properties is not None
            or self.client_cert is not None
            or self.client_sni_policy is not None
        )


@dataclass(frozen=True, slots=True)
class SNIParseResult:
    items: tuple[SNIItem, ...]
    warnings: tuple[str, ...]


# --------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _scalar(node: yaml.Node, path: str, key: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(path, _line(node), f"{key}: expected a single value")
    return yaml.safe_load(yaml.serialize(node))  # the scalar with its YAML type (int, bool, str)


def _string(node: yaml.Node, path: str, key: str) -> str:
    value = _scalar(node, path, key)
    if value is None or isinstance(value, list | dict):
        raise ConfigError(path, _line(node), f"{key}: expected a string")
    text = str(value).strip()
    if not text:
        raise ConfigError(path, _line(node), f"{key}: empty value")
    return text


def _choice(node: yaml.Node, path: str, key: str, choices: Mapping[str, Any]) -> Any:
    value = _string(node, path, key)
    if value not in choices:
        raise ConfigError(path, _line(node), f"{key}: expected {' | '.join(choices)}, got {value!r}")
    return choices[value]


def _string_list(node: yaml.Node, path: str, key: str) -> list[tuple[str, int]]:
    """A YAML sequence of strings, or one string (comma-separated), with the line of each."""
    if isinstance(node, yaml.SequenceNode):
        return [(_string(item, path, key), _line(item)) for item in node.value]
    return [(part.strip(), _line(node)) for part in _string(node, path, key).split(",")]


def _frozen(value: Any) -> Any:
    """A YAML value plugins may read but not change: lists become tuples, maps read-only."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


def _parse_fqdn(node: yaml.Node, path: str) -> str:
    name = _string(node, path, "fqdn").rstrip(".").lower()
    if name == "*":
        return name
    rest = name[2:] if name.startswith("*.") else name
    if not rest or "*" in rest:
        raise ConfigError(
            path,
            _line(node),
            f"fqdn {name!r}: only a whole leftmost label may be a wildcard (*.example.com or *)",
        )
    return name


def _parse_route(node: yaml.Node, path: str, key: str) -> str:
    route = _string(node, path, key)
    host, sep, port = route.rpartition(":")
    if not sep or not host:
        raise ConfigError(path, _line(node), f"{key} {route!r}: expected host:port")
    if port == "{proxy_protocol_port}":
        raise ConfigError(path, _line(node), f"{key}: {{proxy_protocol_port}} is not supported")
    if port != "{inbound_local_port}" and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(path, _line(node), f"{key} {route!r}: bad port")
    return route


def _parse_ip_allow(node: yaml.Node, path: str, config_dir: Path | None) -> tuple[IPRange, ...]:
    entries = _string_list(node, path, "ip_allow")
    if len(entries) == 1 and entries[0][0].startswith("@"):
        name, line = entries[0]
        file = Path(name[1:])
        if not file.is_absolute() and config_dir is not None:
            file = config_dir / file
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(path, line, f"ip_allow: cannot read {file}: {exc.strerror}") from None
        entries = [(part.strip(), line) for chunk in text.splitlines() for part in chunk.split(",")]
        entries = [(e, n) for e, n in entries if e and not e.startswith("#")]
    ranges: list[IPRange] = []
    for text, line in entries:
        if not text:
            continue
        try:
            if "-" in text:
                lo_text, hi_text = (p.strip() for p in text.split("-", 1))
                lo, hi = ipaddress.ip_address(lo_text), ipaddress.ip_address(hi_text)
                if lo.version != hi.version or int(lo) > int(hi):
                    raise ValueError("the range's ends do not make a range")
                ranges.append(IPRange(lo.version, int(lo), int(hi)))
            else:
                net = ipaddress.ip_network(text, strict=False)
                ranges.append(IPRange(net.version, int(net.network_address), int(net.broadcast_address)))
        except ValueError as exc:
            raise ConfigError(path, line, f"ip_allow: bad address or range {text!r}: {exc}") from None
    return tuple(ranges)


def _parse_versions(node: yaml.Node, path: str) -> tuple[str, ...]:
    names = set()
    for name, line in _string_list(node, path, "valid_tls_versions_in"):
        if name not in TLS_VERSION_NAMES:
            raise ConfigError(
                path, line, f"valid_tls_versions_in: expected {' | '.join(TLS_VERSION_NAMES)}, got {name!r}"
            )
        names.add(name)
    if not names:
        raise ConfigError(path, _line(node), "valid_tls_versions_in: empty list")
    return tuple(n for n in TLS_VERSION_NAMES if n in names)


def _parse_http2(node: yaml.Node, path: str) -> bool:
    value = _scalar(node, path, "http2")  # YAML 1.1: on/off are booleans
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise ConfigError(path, _line(node), f"http2: expected on | off, got {value!r}")


def _parse_item(node: yaml.Node, path: str, config_dir: Path | None, warnings: list[str]) -> SNIItem:
    where = _line(node)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(path, where, "each sni item must be a mapping of keys (fqdn: ..., ...)")
    fields: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = str(_scalar(key_node, path, "key"))
        line = _line(key_node)
        if key in fields:
            raise ConfigError(path, line, f"{key} given twice in one item")
        if key in _UNSUPPORTED_KEYS:
            raise ConfigError(path, line, _UNSUPPORTED_KEYS[key])
        if key in _IGNORED_KEYS:
            warnings.append(f"{Path(path).name}:{line}: {key} has no effect in tsproxy; ignored")
            continue
        if key not in _KEYS:
            warnings.append(f"{Path(path).name}:{line}: unknown key {key!r} ignored")
            continue
        fields[key] = value_node
    if "fqdn" not in fields:
        raise ConfigError(path, where, "item without fqdn")
    kw: dict[str, Any] = {"fqdn": _parse_fqdn(fields["fqdn"], path)}
    values: dict[str, Any] = {}
    for key, value_node in fields.items():
        if isinstance(value_node, yaml.ScalarNode):
            values[key] = _scalar(value_node, path, key)
        else:
            values[key] = _frozen(yaml.safe_load(yaml.serialize(value_node)))

    if "verify_client" in fields:
        kw["verify_client"] = _choice(
            fields["verify_client"], path, "verify_client", VerifyClient.__members__
        )
    if "verify_client_ca_certs" in fields:
        ca = fields["verify_client_ca_certs"]
        if isinstance(ca, yaml.MappingNode):
            for k_node, v_node in ca.value:
                k = str(_scalar(k_node, path, "verify_client_ca_certs"))
                if k not in ("file", "dir"):
                    raise ConfigError(
                        path, _line(k_node), f"verify_client_ca_certs: unknown key {k!r} (file or dir)"
                    )
                kw[f"verify_client_ca_{k}"] = _string(v_node, path, f"verify_client_ca_certs.{k}")
        else:
            kw["verify_client_ca_file"] = _string(ca, path, "verify_client_ca_certs")
    if "valid_tls_versions_in" in fields:
        if "valid_tls_version_min_in" in fields or "valid_tls_version_max_in" in fields:
            raise ConfigError(
                path,
                _line(fields["valid_tls_versions_in"]),
                "give valid_tls_versions_in or valid_tls_version_min_in/max_in, not both",
            )
        kw["tls_versions"] = _parse_versions(fields["valid_tls_versions_in"], path)
    elif "valid_tls_version_min_in" in fields or "valid_tls_version_max_in" in fields:
        names = dict(zip(TLS_VERSION_NAMES, range(len(TLS_VERSION_NAMES)), strict=True))
        lo, hi = 0, len(TLS_VERSION_NAMES) - 1
        if "valid_tls_version_min_in" in fields:
            lo = _choice(fields["valid_tls_version_min_in"], path, "valid_tls_version_min_in", names)
        if "valid_tls_version_max_in" in fields:
            hi = _choice(fields["valid_tls_version_max_in"], path, "valid_tls_version_max_in", names)
        if lo > hi:
            raise ConfigError(path, where, "valid_tls_version_min_in is above valid_tls_version_max_in")
        kw["tls_versions"] = TLS_VERSION_NAMES[lo : hi + 1]
    if "ip_allow" in fields:
        kw["ip_allow"] = _parse_ip_allow(fields["ip_allow"], path, config_dir)
        if not kw["ip_allow"]:
            warnings.append(
                f"{Path(path).name}:{_line(fields['ip_allow'])}: ip_allow lists no address: "
                "every client is allowed (as in ATS)"
            )
            kw["ip_allow"] = None
    if "tunnel_route" in fields and "forward_route" in fields:
        raise ConfigError(
            path, _line(fields["forward_route"]), "tunnel_route and forward_route exclude each other"
        )
    for key, kind in (("tunnel_route", RouteType.BLIND), ("forward_route", RouteType.FORWARD)):
        if key in fields:
            kw["route"] = _parse_route(fields[key], path, key)
            kw["route_type"] = kind
    if kw.get("route") and "$1" in kw["route"] and not kw["fqdn"].startswith("*"):
        raise ConfigError(path, where, f"{kw['route']!r}: $1 needs a wildcard fqdn to capture from")
    if "host_sni_policy" in fields:
        choices: dict[str, int] = {**HOST_SNI_POLICY_NAMES, "0": 0, "1": 1, "2": 2}
        kw["host_sni_policy"] = _choice(fields["host_sni_policy"], path, "host_sni_policy", choices)
    if "verify_server_policy" in fields:
        kw["verify_server_policy"] = _choice(
            fields["verify_server_policy"], path, "verify_server_policy", VerifyServerPolicy.__members__
        )
    if "verify_server_properties" in fields:
        kw["verify_server_properties"] = _choice(
            fields["verify_server_properties"],
            path,
            "verify_server_properties",
            VerifyServerProperties.__members__,
        )
    if "client_cert" in fields:
        kw["client_cert"] = _string(fields["client_cert"], path, "client_cert")
    if "client_key" in fields:
        if "client_cert" not in fields:
            raise ConfigError(path, _line(fields["client_key"]), "client_key needs client_cert")
        kw["client_key"] = _string(fields["client_key"], path, "client_key")
    if "client_sni_policy" in fields:
        kw["client_sni_policy"] = _choice(
            fields["client_sni_policy"], path, "client_sni_policy", {p: p for p in _CLIENT_SNI_POLICIES}
        )
    for key, attr in (
        ("server_cipher_suite", "server_cipher_suite"),
        ("server_TLSv1_3_cipher_suites", "server_tls13_cipher_suites"),
        ("server_groups_list", "server_groups_list"),
    ):
        if key in fields:
            kw[attr] = _string(fields[key], path, key)
    if "http2" in fields:
        kw["http2"] = _parse_http2(fields["http2"], path)
    return SNIItem(path=path, line=where, values=MappingProxyType(values), **kw)


def parse_sni_yaml(text: str, path: str, config_dir: Path | None = None) -> SNIParseResult:
    """Parse sni.yaml text; ``path`` names the file in messages, ``config_dir`` resolves
    ``ip_allow: "@file"``. Raises ConfigError FILE:LINE on the first error."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        raise ConfigError(path, line, f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"not valid YAML: {exc}") from None
    warnings: list[str] = []
    if root is None or (isinstance(root, yaml.ScalarNode) and root.value == ""):
        return SNIParseResult((), ())
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(path, _line(root), "expected a top-level mapping with an 'sni' list")
    sni_node: yaml.Node | None = None
    for key_node, value_node in root.value:
        key = str(_scalar(key_node, path, "key"))
        if key == "sni":
            sni_node = value_node
        else:
            warnings.append(f"{Path(path).name}:{_line(key_node)}: unknown top-level key {key!r} ignored")
    if sni_node is None:
        raise ConfigError(path, _line(root), "expected a top-level 'sni' node")
    if isinstance(sni_node, yaml.ScalarNode) and sni_node.tag == "tag:yaml.org,2002:null":
        return SNIParseResult((), tuple(warnings))
    if not isinstance(sni_node, yaml.SequenceNode):
        raise ConfigError(path, _line(sni_node), "sni: expected a list of items")
    items: list[SNIItem] = []
    first_line: dict[str, int] = {}  # fqdn -> line of its first item (wildcards as "*.domain")
    for node in sni_node.value:
        item = _parse_item(node, path, config_dir, warnings)
        fqdn = item.fqdn
        parent = fqdn.partition(".")[2]
        covering = first_line.get(fqdn) or first_line.get("*")
        if covering is None and not fqdn.startswith("*") and parent:
            covering = first_line.get("*." + parent)
        if covering is not None:
            warnings.append(
                f"{item.source}: fqdn {fqdn!r} never matches: the item on line {covering} matches "
                "it first (first match wins)"
            )
        first_line.setdefault(fqdn, item.line)
        items.append(item)
    return SNIParseResult(tuple(items), tuple(warnings))


# --------------------------------------------------------------------------------------
# the live table
# --------------------------------------------------------------------------------------


class SNIPolicy:
    """One sni.yaml item made live: the parsed item and the state its actions need."""

    __slots__ = ("_ip4", "_ip6", "inbound", "index", "item", "outbound", "route_type")

    def __init__(self, index: int, item: SNIItem, inbound: InboundTLSPolicy | None) -> None:
        self.index = index
        self.item = item
        self.inbound = inbound
        self.route_type = item.route_type
        self.outbound = item if item.has_outbound else None  # origin-side keys (OriginTLS)
        ranges = item.ip_allow
        self._ip4 = tuple((r.first, r.last) for r in ranges or () if r.version == 4)
        self._ip6 = tuple((r.first, r.last) for r in ranges or () if r.version == 6)

    @property
    def ip_allow(self) -> bool:
        return self.item.ip_allow is not None

    def allows(self, ip: str) -> bool:
        """ip_allow: is this client address in one of the ranges (True without ip_allow)?"""
        if self.item.ip_allow is None:
            return True
        if ":" not in ip:  # IPv4, the common case: inet_aton is ~10x faster than ipaddress
            try:
                value = int.from_bytes(socket.inet_aton(ip), "big")
            except OSError:
                return False
            return any(lo <= value <= hi for lo, hi in self._ip4)
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        value = int(addr)
        ranges = self._ip4 if addr.version == 4 else self._ip6
        return any(lo <= value <= hi for lo, hi in ranges)

    def route_for(self, servername: str, local_port: int) -> str | None:
        """tunnel_route / forward_route with ``$1`` (the label the wildcard matched) and
        ``{inbound_local_port}`` filled in; None when what ``$1`` captured is not a host name
        (the client chose it: it must not reach the resolver as anything else)."""
        route = self.item.route
        if route is None:
            return None
        if "$1" in route:
            fqdn = self.item.fqdn
            name = servername.rstrip(".").lower()
            captured = name if fqdn == "*" else name[: len(name) - len(fqdn) + 1]
            if not all(_HOST_LABEL.fullmatch(label) for label in captured.split(".")):
                return None
            route = route.replace("$1", captured)
        if "{inbound_local_port}" in route:
            route = route.replace("{inbound_local_port}", str(local_port))
        return route


@dataclass
class SNIConfigParams:
    """The items of one sni.yaml generation, indexed for the first-match lookup."""

    items: tuple[SNIPolicy, ...] = ()
    host_sni_policy: int = 2  # proxy.config.http.host_sni_policy, the default for every item
    warnings: tuple[str, ...] = ()
    _exact: dict[str, SNIPolicy] = field(default_factory=dict)
    _wildcard: dict[str, SNIPolicy] = field(default_factory=dict)
    _star: SNIPolicy | None = None
    has_host_policy: bool = False  # some item sets an inbound policy host_sni_policy protects

    def __post_init__(self) -> None:
        for policy in self.items:
            fqdn = policy.item.fqdn
            if fqdn == "*":
                if self._star is None:
                    self._star = policy
            elif fqdn.startswith("*."):
                self._wildcard.setdefault(fqdn[2:], policy)
            else:
                self._exact.setdefault(fqdn, policy)
            if policy.item.inbound_policy_key is not None:
                self.has_host_policy = True

    def get(self, servername: str) -> SNIPolicy | None:
        """The first item (in file order) whose fqdn matches ``servername``, or None."""
        name = servername.rstrip(".").lower()
        best = self._exact.get(name)
        _, dot, parent = name.partition(".")
        if dot and parent and name[0] != ".":
            wild = self._wildcard.get(parent)
            if wild is not None and (best is None or wild.index < best.index):
                best = wild
        star = self._star
        if star is not None and (best is None or star.index < best.index):
            best = star
        return best

    def host_check(self, host: str, sni_policy: SNIPolicy | None) -> int:
        """host_sni_policy for a request on a TLS connection: 0 nothing to do, 1 log, 2 refuse.

        As ATS (HttpSM, SNIConfig::test_client_action): only when the Host's own item carries an
        inbound policy (verify_client, ip_allow, TLS versions); its host_sni_policy, else the
        record, says what a mismatch costs. Unlike ATS, a Host whose item's policy equals the
        SNI's (e.g. both under one wildcard item) is no mismatch: nothing was bypassed.
        """
        policy = self.get(host)
        if policy is None or policy is sni_policy:
            return 0
        key = policy.item.inbound_policy_key
        if key is None:
            return 0
        if sni_policy is not None and sni_policy.item.inbound_policy_key == key:
            return 0
        level = policy.item.host_sni_policy
        return self.host_sni_policy if level is None else level


def _resolve(config_dir: Path, name: str | None) -> Path | None:
    if name is None:
        return None
    p = Path(name)
    return p if p.is_absolute() else config_dir / p


def _sid_ctx(item: SNIItem) -> bytes:
    return b"tsproxy:" + hashlib.sha256(repr(item.inbound_policy_key).encode()).digest()[:16]


def _build(index: int, item: SNIItem, params: SSLConfigParams) -> SNIPolicy:
    inbound: InboundTLSPolicy | None = None
    if (
        item.verify_client is not None
        or item.tls_versions is not None
        or item.server_cipher_suite is not None
        or item.server_tls13_cipher_suites is not None
        or item.server_groups_list is not None
    ):
        ca_file = _resolve(params.config_dir, item.verify_client_ca_file)
        ca_dir = _resolve(params.config_dir, item.verify_client_ca_dir)
        if ca_file is None and ca_dir is None:
            ca_file, ca_dir = params.ca_cert_filename, params.ca_cert_path
        level = item.verify_client
        if level is not None and level > 0 and ca_file is None and ca_dir is None:
            raise ConfigError(
                item.path,
                item.line,
                f"verify_client {level.name} needs verify_client_ca_certs, or "
                "proxy.config.ssl.CA.cert.filename / proxy.config.ssl.CA.cert.path in records.config",
            )
        try:
            inbound = build_inbound_policy(
                certification_level=None if level is None else int(level),
                ca_file=ca_file,
                ca_dir=ca_dir,
                versions=item.tls_versions,
                sid_ctx=_sid_ctx(item),
                cipher_suite=item.server_cipher_suite,
                tls13_cipher_suites=item.server_tls13_cipher_suites,
                groups_list=item.server_groups_list,
            )
        except ConfigError as exc:
            raise ConfigError(item.path, item.line, str(exc) if exc.path else exc.message) from exc
        except TLSError as exc:
            raise ConfigError(item.path, item.line, str(exc)) from exc
    return SNIPolicy(index, item, inbound)


def load_sni_config(params: SSLConfigParams, host_sni_policy: int) -> SNIConfigParams:
    """Read params.servername_filename (sni.yaml) and build the table (empty when the file is
    missing: callers then leave it out, so nothing costs anything per connection). Raises
    ConfigError FILE:LINE."""
    path = params.servername_filename
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return SNIConfigParams(host_sni_policy=host_sni_policy)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from exc
    parsed = parse_sni_yaml(text, str(path), params.config_dir)
    policies = tuple(_build(i, item, params) for i, item in enumerate(parsed.items))
    return SNIConfigParams(items=policies, host_sni_policy=host_sni_policy, warnings=parsed.warnings)
