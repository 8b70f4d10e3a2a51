"""The whole configuration of a running tsproxy, loaded and validated in one place.

``load_proxy_config`` reads records.config, the port descriptors, remap.config,
ssl_multicert.config (building every SSL context) and plugin.config, and returns an immutable
``ProxyConfig``. The master calls it to validate (start, ``config check``, reload) before any
worker is touched; each worker calls it again on reload, so what a worker switches to is exactly
what the master validated. Any problem raises ConfigError naming ``FILE:LINE``.

When an ``ssl`` port is configured but ssl_multicert.config lists no certificate at all, a
development CA and a localhost certificate are generated into the state directory so the
shipped default config works out of the box; they are never used when real certificates are
configured.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from OpenSSL import SSL

from iocore.net.ports import PortDescriptor, parse_server_ports
from iocore.net.proxy_protocol import IPAllowlist, parse_allowlist
from iocore.net.ssl_cert_lookup import SSLCertLookup
from iocore.net.ssl_config import SSLConfigParams
from iocore.net.ssl_multicert import load_cert_lookup
from iocore.net.ssl_net_vconnection import alpn_select
from iocore.net.ssl_sni_config import SNIConfigParams, load_sni_config
from iocore.net.tls.context import (
    CertKeyPair,
    build_server_context,
    check_groups_list,
    load_or_create_ticket_keys,
)
from iocore.net.tls.session_cache import SharedSessionCache, configure_session_cache, session_cache_supported
from iocore.records.errors import ConfigError
from iocore.records.parser import RecordsConfig, load_records
from tsproxy.origin_tls import OriginTLS
from tsproxy.remap import RemapTable, load_remap

SERVER_PORTS = "proxy.config.http.server_ports"
PP_ALLOWLIST = "proxy.config.http.proxy_protocol_allowlist"


@dataclass(frozen=True)
class PluginSpec:
    """One plugin.config line: a module path or dotted name, and its arguments."""

    target: str
    args: tuple[str, ...]
    source: str  # "plugin.config:LINE"


@dataclass(frozen=True)
class ProxyConfig:
    config_dir: Path
    records: RecordsConfig
    ports: list[PortDescriptor]
    remap: RemapTable
    ssl_params: SSLConfigParams
    cert_lookup: SSLCertLookup | None
    plugins: list[PluginSpec]
    ticket_keys: bytes
    origin_tls: OriginTLS
    sni: SNIConfigParams | None = None  # sni.yaml; None when it lists no item
    generation: int = 1
    dev_ca: Path | None = None
    warnings: list[str] = field(default_factory=list)
    fallback_ctx: SSL.Context | None = None  # certificate-less server context (see load_proxy_config)
    session_cache: SharedSessionCache | None = None  # made once, before the workers fork
    # proxy.config.http.proxy_protocol_allowlist; None: any peer may send a PROXY header.
    proxy_protocol_allowlist: IPAllowlist | None = None

    def state_dir(self) -> Path:
        return _state_dir(self.records)


def _state_dir(records: RecordsConfig) -> Path:
    path = records.resolve_path("proxy.config.local_state_dir")
    return path if path is not None else records.config_dir / "run"


def parse_plugin_config(text: str, path: str, plugin_dir: Path) -> list[PluginSpec]:
    """ATS plugin.config: one plugin per line, ``path/or.module arg1 arg2``, ``#`` comments."""
    specs: list[PluginSpec] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise ConfigError(path, lineno, f"cannot split line: {exc}") from exc
        if not words:
            continue
        target = words[0]
        if target.endswith(".py") or "/" in target:
            p = Path(target)
            if not p.is_absolute():
                p = plugin_dir / p
            if not p.is_file():
                raise ConfigError(path, lineno, f"plugin file {p} does not exist")
            target = str(p)
        specs.append(PluginSpec(target, tuple(words[1:]), f"{path}:{lineno}"))
    return specs


def plugin_restart_notes(
    old: list[PluginSpec], new: list[PluginSpec], changed_files: frozenset[Path] = frozenset()
) -> list[str]:
    """What a reload cannot apply in plugin.config, one message each: a worker imports and
    initialises its plugins when it boots (ATS, too, reads plugin.config only at start-up), so
    an added or removed plugin, new arguments, a new order or a plugin file whose code changed
    (``changed_files``, absolute paths) take ``tsproxy restart``."""
    need = "needs 'tsproxy restart'"
    old_by = {spec.target: spec for spec in old}
    new_by = {spec.target: spec for spec in new}
    notes: list[str] = []
    for spec in new:
        where = _short_source(spec.source)
        before = old_by.get(spec.target)
        if before is None:
            notes.append(f"{where}: plugin {spec.target} added: {need}")
        elif before.args != spec.args:
            notes.append(f"{where}: plugin {spec.target} arguments changed: {need}")
        elif Path(spec.target) in changed_files:
            notes.append(f"{where}: plugin {spec.target} code changed: {need}")
    for spec in old:
        if spec.target not in new_by:
            file = _short_source(spec.source).rpartition(":")[0]
            notes.append(f"{file}: plugin {spec.target} removed: {need}")
    kept_old = [s.target for s in old if s.target in new_by]
    kept_new = [s.target for s in new if s.target in old_by]
    if kept_old != kept_new:
        notes.append(f"plugin.config: plugin order changed: {need}")
    return notes


def _short_source(source: str) -> str:
    """``/etc/x/plugin.config:3`` -> ``plugin.config:3`` (the file's name, as reload lists it)."""
    return Path(source).name


def load_proxy_config(
    config_dir: Path,
    ticket_keys: bytes | None = None,
    generation: int = 1,
    session_cache: SharedSessionCache | None = None,
) -> ProxyConfig:
    """Load and validate everything; raise ConfigError (FILE:LINE) on the first problem.

    ``ticket_keys`` and ``session_cache`` carry over from the configuration before (None at
    start: made here); the shared session cache is made only with proxy.config.ssl.session_cache
    2, and only once (its size is a restart record)."""
    config_dir = Path(config_dir).resolve()
    records = load_records(config_dir)
    warnings = list(records.warnings)
    ports = parse_server_ports(
        records.get_str(SERVER_PORTS), path=str(records.path), line=records.line_of(SERVER_PORTS)
    )

    try:
        allowlist = parse_allowlist(records.get_str(PP_ALLOWLIST)) or None
    except ValueError as exc:
        raise ConfigError(str(records.path), records.line_of(PP_ALLOWLIST), f"{PP_ALLOWLIST}: {exc}") from exc
    if allowlist is not None and not any(p.proxy_protocol for p in ports):
        where = f"{records.path}:{records.line_of(PP_ALLOWLIST)}"
        warnings.append(f"{where}: {PP_ALLOWLIST} is set but no port has 'pp'")

    remap_name = records.resolve_path("proxy.config.url_remap.filename")
    if remap_name is None:
        raise ConfigError(
            str(records.path),
            records.line_of("proxy.config.url_remap.filename"),
            "proxy.config.url_remap.filename is empty",
        )
    remap = load_remap(remap_name)
    unread = unread_ats_file_warning(config_dir)
    if unread is not None:
        warnings.append(unread)
    warnings.extend(remap.warnings)
    warnings.extend(unreachable_rule_warnings(remap, ports))

    plugin_dir = records.resolve_path("proxy.config.plugin.plugin_dir") or config_dir
    plugin_file = config_dir / "plugin.config"
    plugins: list[PluginSpec] = []
    if plugin_file.exists():
        try:
            text = plugin_file.read_text()
        except OSError as exc:
            raise ConfigError(str(plugin_file), None, f"cannot read: {exc.strerror}") from exc
        plugins = parse_plugin_config(text, str(plugin_file), plugin_dir)

    values = dict(records.items())
    lookup: SSLCertLookup | None = None
    fallback_ctx: SSL.Context | None = None
    dev_ca: Path | None = None
    ssl_params = SSLConfigParams.from_records(values, config_dir)
    for record, groups in (
        ("proxy.config.ssl.server.groups_list", ssl_params.server_groups_list),
        ("proxy.config.ssl.client.groups_list", ssl_params.client_groups_list),
    ):
        try:
            check_groups_list(groups, record)
        except ConfigError as exc:
            raise ConfigError(str(records.path), records.line_of(record), exc.message) from exc
    if ticket_keys is None or values.get("proxy.config.ssl.server.ticket_key.filename"):
        ticket_keys = load_or_create_ticket_keys(ssl_params.ticket_key_filename)
    # Origin-side TLS: every client context an https:// rule needs is built now, so a client key
    # that does not match its certificate stops start-up (or a reload) with the file named.
    origin_tls = OriginTLS(ssl_params, config_dir)
    for rule_result in remap.https_targets():
        origin_tls.settings_for(rule_result)
    # sni.yaml, loaded with ssl_multicert.config into the same snapshot: a reload switches both
    # at once, and a bad item (FILE:LINE) keeps the old pair serving.
    sni = load_sni_config(ssl_params, records.get_int("proxy.config.http.host_sni_policy"))
    warnings.extend(sni.warnings)
    for policy in sni.items:
        origin_tls.check_sni_item(policy.item)
    if any(p.ssl for p in ports):
        lookup = load_cert_lookup(ssl_params, ticket_keys)
        warnings.extend(lookup.warnings)
        if not any(cc.ctx is not None for cc in lookup.contexts) and not _multicert_has_entries(ssl_params):
            from tsproxy.devcert import dev_cert_files

            with dev_cert_files(_state_dir(records)) as (dev_ca, chain, key):
                ctx = build_server_context(ssl_params, [CertKeyPair(chain, key)], None, ticket_keys)
            lookup = _dev_lookup(ctx, dev_ca.with_name(chain.name))
            warnings.append(
                f"{ssl_params.multicert_filename}: no certificates configured; serving a development "
                f"certificate for localhost (CA: {dev_ca})"
            )
        elif lookup.default_context.ctx is None:
            warnings.append(
                f"{ssl_params.multicert_filename}: no default certificate (no dest_ip=* line): TLS "
                "clients that send no SNI, or a name no certificate covers, are refused"
            )
        mode = ssl_params.session_cache_mode
        if mode == 2 and session_cache is None:
            if generation > 1:  # a reload: memory shared with the workers is made before they fork
                warnings.append(
                    "proxy.config.ssl.session_cache 2 takes effect at the next start; until then each "
                    "worker keeps OpenSSL's own cache"
                )
            elif session_cache_supported():
                session_cache = SharedSessionCache(
                    ssl_params.session_cache_size, ssl_params.session_cache_timeout
                )
            else:
                warnings.append(
                    "proxy.config.ssl.session_cache 2: the session cache callbacks are not available "
                    "with this OpenSSL binding; each worker keeps OpenSSL's own cache"
                )
        for cc in lookup.contexts:
            if cc.ctx is not None:
                cc.ctx.set_alpn_select_callback(alpn_select)
                configure_session_cache(
                    cc.ctx, mode, ssl_params.session_cache_timeout, session_cache, cc.source
                )
        # For a hello the pre-parser leaves to OpenSSL where no certificate applies: OpenSSL
        # still parses it and sends its own alert (handshake_failure if it was fine after all).
        fallback_ctx = build_server_context(ssl_params, [], None, ticket_keys)
        fallback_ctx.set_alpn_select_callback(alpn_select)
    return ProxyConfig(
        config_dir=config_dir,
        records=records,
        ports=ports,
        remap=remap,
        ssl_params=ssl_params,
        cert_lookup=lookup,
        plugins=plugins,
        ticket_keys=ticket_keys,
        origin_tls=origin_tls,
        sni=sni if sni.items else None,
        generation=generation,
        dev_ca=dev_ca,
        warnings=warnings,
        fallback_ctx=fallback_ctx,
        session_cache=session_cache,
        proxy_protocol_allowlist=allowlist,
    )


# ATS configuration files tsproxy does not read (it reads records.config, ssl_multicert.config,
# sni.yaml, remap.config and plugin.config). One with settings in it is named by config check, so an ATS
# operator is not left believing, say, ip_allow.yaml's rules apply.
ATS_FILES_NOT_READ = (
    "cache.config",
    "hosting.config",
    "ip_allow.yaml",
    "logging.yaml",
    "parent.config",
    "socks.config",
    "splitdns.config",
    "storage.config",
    "strategies.yaml",
    "volume.config",
)


def unread_ats_file_warning(config_dir: Path) -> str | None:
    """One warning naming the ATS files of ``config_dir`` that hold settings tsproxy ignores."""
    found = []
    for name in ATS_FILES_NOT_READ:
        try:
            text = (config_dir / name).read_text(errors="replace")
        except OSError:
            continue
        if any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
            found.append(name)
    if not found:
        return None
    return (
        f"{config_dir}: {', '.join(found)}: not read by tsproxy, their settings do not apply "
        "(see docs/operations.md)"
    )


def unreachable_rule_warnings(remap: RemapTable, ports: list[PortDescriptor]) -> list[str]:
    """A warning per rule no request can match: ATS's ``map`` rule matches the port of the
    request URL (the Host header's port, else 80/443), ``map_with_recv_port`` the port the
    request came in on; either way a port tsproxy does not serve that scheme on never matches.
    (Behind a port-forwarding load balancer the Host port may differ from the listening port:
    use map_with_recv_port there.)"""
    http_ports = {p.port for p in ports if not p.ssl and not p.blind}
    https_ports = {p.port for p in ports if p.ssl}
    shown = " ".join(p.describe() for p in ports) or "none"
    out: list[str] = []
    for rule in remap.rules:
        served = https_ports if rule.from_scheme == "https" else http_ports
        if rule.from_port in served:
            continue
        other = http_ports if rule.from_scheme == "https" else https_ports
        why = (
            f"port {rule.from_port} is not an {rule.from_scheme} port"
            if rule.from_port in other
            else f"no server port {rule.from_port}"
        )
        out.append(
            f"{rule.path}:{rule.line}: rule for {rule.from_host}:{rule.from_port} can never match: "
            f"{why} (ports: {shown})"
        )
    return out


def _multicert_has_entries(params: SSLConfigParams) -> bool:
    path = params.multicert_filename
    try:
        text = path.read_text()
    except OSError:
        return False
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def _dev_lookup(ctx: SSL.Context, chain: Path) -> SSLCertLookup:
    from iocore.net.ssl_cert_lookup import CertOpt, SSLCertContext

    lookup = SSLCertLookup()
    cc = SSLCertContext(
        ctx=ctx,
        opt=CertOpt.NORMAL,
        tunnel_route=None,
        names=("localhost",),
        source=f"{chain} (development certificate)",
        ssl_ticket_enabled=True,
    )
    lookup.insert_name("localhost", cc)
    lookup.set_default(cc)
    return lookup
