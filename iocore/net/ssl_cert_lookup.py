# Theory of operation
# -------------------
# SSLCertLookup is ATS's table from "what the client asked for" to an SSLCertContext (an
# SSL_CTX plus the options of its ssl_multicert.config line).  It is built whole by the
# multicert loader, then only read: a reload builds a new table and swaps it in, so the
# hot-path lookups take no lock.
#
# Tables (all plain dicts, so every lookup is O(1)):
#   _exact     lower-cased host name          -> context
#   _wildcard  parent domain of "*.parent"    -> context   (one label only)
#   _addrs     (ip, port | None)              -> context
#   default    the dest_ip=* context, or an empty bootstrap context (ctx None) as ATS makes
#
# Lookup order, as ATS's set_context_cert: SNI exact name, then wildcard on the parent of
# the first label; without a name match the caller tries find_addr (ip:port, then ip) and
# finally default_context.  Invariants: the first insert of a name or address wins; later
# duplicates are recorded in ``warnings`` and ignored.
"""SSLCertLookup: server name / address -> SSL context (ATS SSLCertLookup)."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from OpenSSL import SSL

if TYPE_CHECKING:
    from iocore.net.ocsp_stapling import OCSPStapling

__all__ = ["CertOpt", "SSLCertContext", "SSLCertLookup"]


class CertOpt(enum.Enum):
    """SSLCertContext::Option: terminate TLS, or blind-tunnel (action=tunnel)."""

    NORMAL = "normal"
    TUNNEL = "tunnel"


@dataclass(eq=False)
class SSLCertContext:
    """One ssl_multicert.config line made live: its context and options.

    Identity semantics (eq=False): two lines with the same names are still two contexts.
    """

    ctx: SSL.Context | None
    opt: CertOpt = CertOpt.NORMAL
    tunnel_route: str | None = None
    names: tuple[str, ...] = ()
    source: str = ""
    ssl_ticket_enabled: bool = True


def _normalise_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _normalise_ip(ip: str) -> str:
    return ipaddress.ip_address(ip.strip().strip("[]")).compressed


@dataclass
class SSLCertLookup:
    """The name and address tables of one configuration generation."""

    _exact: dict[str, SSLCertContext] = field(default_factory=dict)
    _wildcard: dict[str, SSLCertContext] = field(default_factory=dict)
    _addrs: dict[tuple[str, int | None], SSLCertContext] = field(default_factory=dict)
    _default: SSLCertContext | None = None
    _bootstrap: SSLCertContext = field(
        default_factory=lambda: SSLCertContext(ctx=None, source="(bootstrap default)")
    )
    _contexts: list[SSLCertContext] = field(default_factory=list)
    _warnings: list[str] = field(default_factory=list)
    # The OCSP stapling state of these contexts (proxy.config.ssl.ocsp.enabled), else None.
    ocsp: OCSPStapling | None = None

    # -- building --------------------------------------------------------------------

    def add_context(self, cc: SSLCertContext) -> None:
        """List cc in ``contexts`` (inserts do this too); idempotent."""
        if not any(c is cc for c in self._contexts):
            self._contexts.append(cc)

    def add_warning(self, message: str) -> None:
        """A loader's remark about this table (shown at start and reload, not fatal)."""
        self._warnings.append(message)

    def _warn(self, what: str, cc: SSLCertContext, first: SSLCertContext) -> str:
        where = f"{cc.source}: " if cc.source else ""
        msg = f"{where}{what} already served by {first.source or 'an earlier entry'}; ignored"
        self._warnings.append(msg)
        return msg

    def insert_name(self, name: str, cc: SSLCertContext) -> str | None:
        """Index cc under a certificate name; returns a warning when the name was taken.

        ``*.dom`` goes to the wildcard table; a ``*`` anywhere else (``f*.a.com``,
        ``a.*.com``) is not a wildcard and is indexed literally, so it never matches a real
        SNI name, as in ATS.
        """
        key = _normalise_name(name)
        if not key:
            return None
        self.add_context(cc)
        table = self._exact
        if key.startswith("*.") and len(key) > 2:
            table, key = self._wildcard, key[2:]
        first = table.get(key)
        if first is not None:
            if first is cc:
                return None
            return self._warn(f"name {name!r}", cc, first)
        table[key] = cc
        return None

    def insert_addr(self, ip: str, port: int | None, cc: SSLCertContext) -> str | None:
        """Index cc under a local address (dest_ip); returns a warning when it was taken."""
        key = (_normalise_ip(ip), port)
        self.add_context(cc)
        first = self._addrs.get(key)
        if first is not None:
            if first is cc:
                return None
            shown = f"[{key[0]}]" if ":" in key[0] else key[0]
            return self._warn(f"dest_ip {shown}{f':{port}' if port is not None else ''}", cc, first)
        self._addrs[key] = cc
        return None

    def set_default(self, cc: SSLCertContext) -> str | None:
        """Install the dest_ip=* context; the first one wins."""
        self.add_context(cc)
        if self._default is not None:
            if self._default is cc:
                return None
            return self._warn("dest_ip=*", cc, self._default)
        self._default = cc
        return None

    # -- lookups (hot path) ----------------------------------------------------------

    def find(self, servername: str) -> SSLCertContext | None:
        """The context for an SNI name: exact match, else a one-label wildcard, else None."""
        name = servername.rstrip(".").lower()
        cc = self._exact.get(name)
        if cc is not None:
            return cc
        _, dot, parent = name.partition(".")
        if dot and parent and name[0] != ".":
            return self._wildcard.get(parent)
        return None

    def find_addr(self, ip: str, port: int) -> SSLCertContext | None:
        """The context configured for a local address: ip:port, then ip.  Never the default."""
        try:
            key = _normalise_ip(ip)
        except ValueError:
            return None
        cc = self._addrs.get((key, port))
        if cc is not None:
            return cc
        return self._addrs.get((key, None))

    @property
    def default_context(self) -> SSLCertContext:
        """The dest_ip=* context; without one, an empty bootstrap context (ctx None), as ATS.

        The bootstrap entry only starts the handshake into the SNI lookup; a client that
        matches nothing then fails.  It is not listed in ``contexts``.
        """
        return self._default if self._default is not None else self._bootstrap

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self._warnings)

    @property
    def contexts(self) -> tuple[SSLCertContext, ...]:
        """Every configured context, in insertion (file) order."""
        return tuple(self._contexts)

    def __iter__(self) -> Iterator[SSLCertContext]:
        return iter(self._contexts)

    def __len__(self) -> int:
        return len(self._contexts)
