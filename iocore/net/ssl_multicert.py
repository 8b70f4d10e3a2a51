# Theory of operation
# -------------------
# ssl_multicert.config, as ATS reads it (SSLParseCertificateConfiguration): one entry per
# line, whitespace-separated key=value pairs, values optionally double-quoted, keys
# case-insensitive, '#' starts a comment.  Two stages:
#
#   parse_multicert(text, path)  -> [MulticertLine]   pure: text in, validated lines out
#   load_cert_lookup(params, ticket_keys) -> SSLCertLookup
#                                  reads the certificate files, builds one server context per
#                                  line (build_server_context) and indexes it by every
#                                  subject CN and DNS SAN of its certificates and by dest_ip.
#                                  With proxy.config.ssl.ocsp.enabled, each certificate also
#                                  gets its OCSP stapling entry (iocore/net/ocsp_stapling):
#                                  the ssl_ocsp_name file, read and verified here, or the AIA
#                                  responder the workers fetch from.
#
# Invariants: every problem is a ConfigError carrying FILE:LINE of the offending line and,
# for file problems, the file's name; the loader either returns a complete table or raises,
# so a failed reload leaves the previous table in service (the caller swaps tables).
"""ssl_multicert.config parser and loader (ATS SSLParseCertificateConfiguration)."""

from __future__ import annotations

import enum
import ipaddress
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from iocore.net.ocsp_stapling import OCSPSettings, OCSPStapling, StapledCert
from iocore.net.ssl_cert_lookup import CertOpt, SSLCertContext, SSLCertLookup
from iocore.net.ssl_config import SSLConfigParams
from iocore.net.tls.context import CertKeyPair, build_server_context
from iocore.net.tls.errors import TLSError
from iocore.net.tls.ocsp import OCSPError, OCSPExpired, find_issuer, responder_url
from iocore.records.errors import ConfigError

__all__ = ["DestIP", "KeyDialog", "MulticertLine", "load_cert_lookup", "parse_multicert"]

_KEYS = frozenset(
    {
        "ssl_cert_name",
        "ssl_key_name",
        "ssl_ca_name",
        "dest_ip",
        "ssl_ticket_enabled",
        "ssl_ticket_number",
        "action",
        "tunnel_route",
        "ssl_key_dialog",
        "ssl_ocsp_name",
    }
)


class KeyDialogKind(enum.Enum):
    EXEC = "exec"


@dataclass(frozen=True, slots=True)
class KeyDialog:
    """ssl_key_dialog="exec:/path args": run the program, its stdout is the passphrase."""

    kind: KeyDialogKind
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DestIP:
    """dest_ip: ``ip`` None means ``*`` (the default context)."""

    ip: str | None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class MulticertLine:
    """One validated ssl_multicert.config entry; file names are as written (unresolved)."""

    path: str
    line: int
    cert_names: tuple[str, ...]
    key_names: tuple[str, ...]
    ca_name: str | None
    dest_ip: DestIP | None
    ticket_enabled: bool | None
    ticket_number: int | None
    tunnel: bool
    tunnel_route: str | None
    key_dialog: KeyDialog | None
    ocsp_names: tuple[str, ...] = ()  # ssl_ocsp_name: prefetched responses, one per certificate

    @property
    def source(self) -> str:
        return f"{Path(self.path).name}:{self.line}"


# --------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------


def _split_pairs(text: str, path: str, lineno: int) -> list[tuple[str, str]]:
    """Tokenise ``key=value key="quoted value"`` up to an unquoted '#'."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] == "#":
            break
        start = i
        while i < n and text[i] != "=" and not text[i].isspace() and text[i] != "#":
            i += 1
        key = text[start:i]
        if i >= n or text[i] != "=":
            raise ConfigError(path, lineno, f"expected key=value, got {text[start:i] or text[start:]!r}")
        i += 1
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ConfigError(path, lineno, f"unterminated quoted value for {key}")
            value = text[i + 1 : end]
            i = end + 1
            if i < n and not text[i].isspace() and text[i] != "#":
                raise ConfigError(path, lineno, f"junk after the quoted value of {key}")
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] != "#":
                i += 1
            value = text[start:i]
        pairs.append((key, value))
    return pairs


def _parse_dest_ip(value: str, path: str, lineno: int) -> DestIP:
    if value == "*":
        return DestIP(None)
    port: str | None = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(path, lineno, f"bad dest_ip {value!r}")
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host = value  # IPv4, or a bare IPv6 address without a port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(path, lineno, f"bad dest_ip {value!r}: not an IP address") from None
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(path, lineno, f"bad dest_ip {value!r}: bad port")
    return DestIP(ip.compressed, int(port) if port is not None else None)


def _parse_bool(key: str, value: str, path: str, lineno: int) -> bool:
    if value not in ("0", "1"):
        raise ConfigError(path, lineno, f"{key} must be 0 or 1, got {value!r}")
    return value == "1"


def _parse_key_dialog(value: str, path: str, lineno: int) -> KeyDialog:
    if value.startswith("exec:"):
        try:
            argv = tuple(shlex.split(value[5:]))
        except ValueError as exc:
            raise ConfigError(path, lineno, f"bad ssl_key_dialog {value!r}: {exc}") from None
        if not argv:
            raise ConfigError(path, lineno, "ssl_key_dialog=exec: needs a program")
        return KeyDialog(KeyDialogKind.EXEC, argv)
    if value == "builtin":
        raise ConfigError(
            path,
            lineno,
            'ssl_key_dialog=builtin is not supported (no terminal prompt); use "exec:/path args"',
        )
    raise ConfigError(path, lineno, f'ssl_key_dialog {value!r} is not supported; use "exec:/path args"')


def _parse_line(pairs: list[tuple[str, str]], path: str, lineno: int) -> MulticertLine:
    seen: dict[str, str] = {}
    for raw_key, value in pairs:
        key = raw_key.lower()
        if key not in _KEYS:
            raise ConfigError(path, lineno, f"unknown key {raw_key!r}")
        if key in seen:
            raise ConfigError(path, lineno, f"{raw_key} given twice")
        seen[key] = value

    def names(key: str) -> tuple[str, ...]:
        if key not in seen:
            return ()
        items = tuple(part.strip() for part in seen[key].split(","))
        if not all(items):
            raise ConfigError(path, lineno, f"empty file name in {key}={seen[key]!r}")
        return items

    certs, keys, ocsp_names = names("ssl_cert_name"), names("ssl_key_name"), names("ssl_ocsp_name")
    action = seen.get("action")
    if action is not None and action.lower() != "tunnel":
        raise ConfigError(path, lineno, f"unknown action {action!r} (only action=tunnel exists)")
    tunnel = action is not None
    if not certs and not tunnel:
        raise ConfigError(path, lineno, "ssl_cert_name is missing (required unless action=tunnel)")
    if keys and len(keys) != len(certs):
        raise ConfigError(
            path, lineno, f"ssl_key_name lists {len(keys)} files but ssl_cert_name lists {len(certs)}"
        )
    if ocsp_names and len(ocsp_names) != len(certs):
        raise ConfigError(
            path, lineno, f"ssl_ocsp_name lists {len(ocsp_names)} files but ssl_cert_name lists {len(certs)}"
        )
    route = seen.get("tunnel_route")
    if route is not None:
        host, sep, port = route.rpartition(":")
        if not tunnel:
            raise ConfigError(path, lineno, "tunnel_route needs action=tunnel")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(path, lineno, f"bad tunnel_route {route!r}: expected host:port")
    number: int | None = None
    if "ssl_ticket_number" in seen:
        text = seen["ssl_ticket_number"]
        if not text.isdigit():
            raise ConfigError(path, lineno, f"ssl_ticket_number must be a number >= 0, got {text!r}")
        number = int(text)
    dest = _parse_dest_ip(seen["dest_ip"], path, lineno) if "dest_ip" in seen else None
    ca = seen.get("ssl_ca_name") or None
    dialog = _parse_key_dialog(seen["ssl_key_dialog"], path, lineno) if "ssl_key_dialog" in seen else None
    ticket = (
        _parse_bool("ssl_ticket_enabled", seen["ssl_ticket_enabled"], path, lineno)
        if "ssl_ticket_enabled" in seen
        else None
    )
    return MulticertLine(
        path=path,
        line=lineno,
        cert_names=certs,
        key_names=keys,
        ca_name=ca,
        dest_ip=dest,
        ticket_enabled=ticket,
        ticket_number=number,
        tunnel=tunnel,
        tunnel_route=route,
        key_dialog=dialog,
        ocsp_names=ocsp_names,
    )


def parse_multicert(text: str, path: str) -> list[MulticertLine]:
    """Parse ssl_multicert.config text; ``path`` is used in error messages only."""
    lines: list[MulticertLine] = []
    default_line: int | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        pairs = _split_pairs(raw, path, lineno)
        if not pairs:
            continue
        entry = _parse_line(pairs, path, lineno)
        if entry.dest_ip is not None and entry.dest_ip.ip is None:
            if default_line is not None:
                raise ConfigError(
                    path, lineno, f"second dest_ip=* entry (the first is on line {default_line})"
                )
            default_line = lineno
        lines.append(entry)
    return lines


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def _cert_names(cert_file: Path) -> list[str]:
    """Subject CNs and DNS SANs of the leaf (first) certificate in a PEM file."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return []  # build_server_context has already reported unreadable files
    names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return names


def _passphrase(dialog: KeyDialog, path: str, lineno: int) -> bytes:
    try:
        done = subprocess.run(list(dialog.argv), capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(path, lineno, f"ssl_key_dialog {dialog.argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise ConfigError(path, lineno, f"ssl_key_dialog {dialog.argv[0]} exited with {done.returncode}")
    return done.stdout.rstrip(b"\r\n")


def _build_line(
    entry: MulticertLine, params: SSLConfigParams, ticket_keys: bytes | None
) -> tuple[SSLCertContext, list[str]]:
    cert_files = [params.server_cert_path / name for name in entry.cert_names]
    key_files = [params.server_private_key_path / name for name in entry.key_names] or cert_files
    ca_file = params.server_cert_path / entry.ca_name if entry.ca_name else None
    route = entry.tunnel_route
    ticket_enabled = (
        entry.ticket_enabled if entry.ticket_enabled is not None else params.session_ticket_enabled
    )
    if entry.tunnel and not cert_files:
        cc = SSLCertContext(
            ctx=None,
            opt=CertOpt.TUNNEL,
            tunnel_route=route,
            source=entry.source,
            ssl_ticket_enabled=ticket_enabled,
        )
        return cc, []
    passphrase = _passphrase(entry.key_dialog, entry.path, entry.line) if entry.key_dialog else None
    try:
        ctx = build_server_context(
            params,
            [CertKeyPair(c, k) for c, k in zip(cert_files, key_files, strict=True)],
            ca_file,
            ticket_keys,
            ticket_enabled=entry.ticket_enabled,
            ticket_number=entry.ticket_number,
            passphrase=passphrase,
        )
    except ConfigError as exc:
        raise ConfigError(entry.path, entry.line, str(exc)) from exc
    except TLSError as exc:
        raise ConfigError(entry.path, entry.line, str(exc)) from exc
    names: list[str] = []
    for cert_file in cert_files:
        for name in _cert_names(cert_file):
            if name.lower() not in (n.lower() for n in names):
                names.append(name)
    cc = SSLCertContext(
        ctx=ctx,
        opt=CertOpt.TUNNEL if entry.tunnel else CertOpt.NORMAL,
        tunnel_route=route,
        names=tuple(names),
        source=entry.source,
        ssl_ticket_enabled=ticket_enabled,
    )
    return cc, names


def _key_permission_warnings(entry: MulticertLine, params: SSLConfigParams) -> list[str]:
    """A private key other users can read is a secret already half leaked: say so."""
    if entry.key_names:
        keys = [params.server_private_key_path / name for name in entry.key_names]
    else:
        keys = [params.server_cert_path / name for name in entry.cert_names]
    warnings = []
    for key in keys:
        try:
            mode = key.stat().st_mode
        except OSError:
            continue
        if mode & 0o077:
            warnings.append(
                f"{entry.source}: private key {key} is readable by other users "
                f"(mode {mode & 0o777:o}); chmod 600 it"
            )
    return warnings


def _pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return []  # build_server_context has already reported unreadable files


def _stapled_certs(entry: MulticertLine, params: SSLConfigParams, warnings: list[str]) -> list[StapledCert]:
    """The OCSP stapling entries of one line: a prefetched file (read and verified now, so a
    bad one is a FILE:LINE error) or the AIA responder URL; what cannot be stapled is a warning."""
    ca_certs = _pem_certs(params.server_cert_path / entry.ca_name) if entry.ca_name else []
    out: list[StapledCert] = []
    for i, name in enumerate(entry.cert_names):
        chain = _pem_certs(params.server_cert_path / name)
        if not chain:
            continue
        leaf = chain[0]
        issuer = find_issuer(leaf, chain[1:] + ca_certs)
        if issuer is None:
            warnings.append(
                f"{entry.source}: OCSP: no issuer certificate for {name} (put it in the chain file "
                "or ssl_ca_name); not stapled"
            )
            continue
        url = responder_url(leaf)
        prefetched = params.ocsp_response_path / entry.ocsp_names[i] if entry.ocsp_names else None
        if prefetched is None and url is None:
            warnings.append(
                f"{entry.source}: OCSP: {name} names no OCSP responder (AIA) and the line has no "
                "ssl_ocsp_name; not stapled"
            )
            continue
        staple = StapledCert(leaf, issuer, url, prefetched, entry.source)
        if prefetched is not None:
            try:
                staple.response, staple.file_mtime = staple.load_prefetched(time.time())
            except OSError as exc:
                reason = exc.strerror
                raise ConfigError(entry.path, entry.line, f"ssl_ocsp_name {prefetched}: {reason}") from None
            except OCSPExpired as exc:
                warnings.append(f"{entry.source}: ssl_ocsp_name {prefetched}: {exc.reason}; not stapled")
            except OCSPError as exc:
                reason = exc.reason
                raise ConfigError(entry.path, entry.line, f"ssl_ocsp_name {prefetched}: {reason}") from None
        out.append(staple)
    return out


def load_cert_lookup(params: SSLConfigParams, ticket_keys: bytes | None) -> SSLCertLookup:
    """Read params.multicert_filename and build the whole lookup table.

    A missing ssl_multicert.config is read as an empty file: the table then holds only the
    bootstrap default (no certificates).  Whether that is an error (an ssl port is
    configured) is the caller's decision.  Any other problem raises ConfigError FILE:LINE.
    Pass the same ``ticket_keys`` to every load so that reloads keep tickets valid.
    """
    path = params.multicert_filename
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from exc
    lookup = SSLCertLookup()
    if params.ocsp_enabled:
        lookup.ocsp = OCSPStapling(
            OCSPSettings(
                cache_timeout=params.ocsp_cache_timeout,
                request_timeout=params.ocsp_request_timeout,
                update_period=params.ocsp_update_period,
                response_path=params.ocsp_response_path,
                request_mode_get=params.ocsp_request_mode_get,
            )
        )
    for entry in parse_multicert(text, str(path)):
        cc, names = _build_line(entry, params, ticket_keys)
        for warning in _key_permission_warnings(entry, params):
            lookup.add_warning(warning)
        if cc.ctx is not None and entry.cert_names:
            if lookup.ocsp is not None:
                ocsp_warnings: list[str] = []
                lookup.ocsp.add_context(cc.ctx, _stapled_certs(entry, params, ocsp_warnings))
                for warning in ocsp_warnings:
                    lookup.add_warning(warning)
            elif entry.ocsp_names:
                lookup.add_warning(
                    f"{entry.source}: ssl_ocsp_name is ignored: proxy.config.ssl.ocsp.enabled is 0"
                )
        lookup.add_context(cc)
        dest = entry.dest_ip
        if dest is not None and dest.ip is None:
            lookup.set_default(cc)
        elif dest is not None and dest.ip is not None:
            lookup.insert_addr(dest.ip, dest.port, cc)
        for name in names:
            lookup.insert_name(name, cc)
    return lookup
