"""Parse ``proxy.config.http.server_ports`` (ATS ``HttpProxyPort``).

The value is a list of port descriptors separated by whitespace or commas; each descriptor
is a list of keywords separated by colons, in any order::

    8080  8443:ssl  8443:ssl:ipv6:ip-in=[::1]  9000:blind  4443:ssl:tr-pass:proto=http/1.1

Keywords: a number (the port, 1-65535, exactly one per descriptor), ``ssl``, ``tr-pass``,
``ipv4``, ``ipv6``, ``blind``, ``pp`` (every connection must open with a PROXY protocol v1
or v2 header, read before anything else, TLS included), ``proto=NAME[;NAME...]`` (restricts
the protocols/ALPN ids served on the port) and ``ip-in=ADDR`` (the local address to bind;
IPv6 addresses may be written in brackets). Without ``ip-in`` the port binds every address
of its family, as ATS does (``0.0.0.0``, or ``::`` with ``ipv6``). Transparent proxying
(``tr-full``, ``tr-in``, ``tr-out``) is not supported and is reported as such.

The parser is pure: it returns frozen descriptors and raises ConfigError naming the file
and line of the record when the caller passes them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from iocore.records.errors import ConfigError

RECORD_NAME = "proxy.config.http.server_ports"

_TRANSPARENT = frozenset({"tr-full", "tr-in", "tr-out"})
_PROTO_RE = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class PortDescriptor:
    """One listening port: where it binds and how accepted connections are treated."""

    port: int
    ssl: bool = False
    tr_pass: bool = False
    ipv6: bool = False
    blind: bool = False
    protocols: tuple[str, ...] | None = None
    ip_in: str | None = None
    proxy_protocol: bool = False

    @property
    def family_name(self) -> str:
        return "ipv6" if self.ipv6 else "ipv4"

    @property
    def bind_address(self) -> str:
        """The address handed to bind(): ``ip_in`` or the wildcard of the family."""
        if self.ip_in is not None:
            return self.ip_in
        return "::" if self.ipv6 else "0.0.0.0"

    def describe(self) -> str:
        """ATS-style text of this descriptor, e.g. ``8443:ssl:ip-in=127.0.0.1``."""
        parts = [str(self.port)]
        if self.proxy_protocol:
            parts.append("pp")
        if self.ssl:
            parts.append("ssl")
        if self.blind:
            parts.append("blind")
        if self.tr_pass:
            parts.append("tr-pass")
        if self.ipv6:
            parts.append("ipv6")
        if self.protocols is not None:
            parts.append("proto=" + ";".join(self.protocols))
        if self.ip_in is not None:
            parts.append(f"ip-in=[{self.ip_in}]" if self.ipv6 else f"ip-in={self.ip_in}")
        return ":".join(parts)


def _split_keywords(text: str) -> list[str]:
    """Split one descriptor on colons, keeping ``ip-in=[v6]`` (and bare v6) together."""
    keywords: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("ip-in=", i):
            start = i
            i += len("ip-in=")
            if i < len(text) and text[i] == "[":
                end = text.find("]", i)
                i = len(text) if end < 0 else end + 1
            else:
                # A bare IPv6 address contains colons: take the longest run that parses.
                rest = text[i:]
                best = rest.split(":", 1)[0]
                pieces = rest.split(":")
                for n in range(len(pieces), 1, -1):
                    candidate = ":".join(pieces[:n])
                    try:
                        ipaddress.IPv6Address(candidate)
                    except ValueError:
                        continue
                    best = candidate
                    break
                i += len(best)
            keywords.append(text[start:i])
            if i < len(text) and text[i] == ":":
                i += 1
            continue
        end = text.find(":", i)
        if end < 0:
            keywords.append(text[i:])
            break
        keywords.append(text[i:end])
        i = end + 1
    return keywords


def _parse_descriptor(text: str, err: _ErrorFactory) -> PortDescriptor:
    port: int | None = None
    ssl = tr_pass = blind = proxy_protocol = False
    want_v4 = want_v6 = False
    protocols: tuple[str, ...] | None = None
    ip_in: str | None = None
    for kw in _split_keywords(text):
        lowered = kw.lower()
        if not kw:
            raise err(f"empty keyword in port descriptor '{text}'")
        if kw.isdigit():
            if port is not None:
                raise err(f"port descriptor '{text}' names more than one port")
            port = int(kw)
            if not 1 <= port <= 65535:
                raise err(f"port {port} out of range 1-65535 in '{text}'")
        elif lowered == "ssl":
            ssl = True
        elif lowered == "tr-pass":
            tr_pass = True
        elif lowered == "blind":
            blind = True
        elif lowered == "pp":
            proxy_protocol = True
        elif lowered == "ipv4":
            want_v4 = True
        elif lowered == "ipv6":
            want_v6 = True
        elif lowered in _TRANSPARENT:
            raise err(f"transparent proxy not supported ('{kw}' in '{text}')")
        elif lowered.startswith("proto="):
            names = tuple(p for p in kw[len("proto=") :].split(";") if p)
            if not names or not all(_PROTO_RE.match(p) for p in names):
                raise err(f"bad protocol list '{kw}' in '{text}'")
            protocols = names
        elif lowered.startswith("ip-in="):
            raw = kw[len("ip-in=") :]
            if raw.startswith("[") and raw.endswith("]"):
                raw = raw[1:-1]
            try:
                addr = ipaddress.ip_address(raw)
            except ValueError:
                raise err(f"bad address '{raw}' in '{text}'") from None
            ip_in = str(addr)
            if addr.version == 6:
                want_v6 = True
            else:
                want_v4 = True
        else:
            raise err(f"unknown keyword '{kw}' in port descriptor '{text}'")
    if port is None:
        raise err(f"port descriptor '{text}' has no port number")
    if want_v4 and want_v6:
        raise err(f"port descriptor '{text}' mixes IPv4 and IPv6")
    if ssl and blind:
        raise err(f"port descriptor '{text}' cannot be both 'ssl' and 'blind'")
    return PortDescriptor(
        port=port,
        ssl=ssl,
        tr_pass=tr_pass,
        ipv6=want_v6,
        blind=blind,
        protocols=protocols,
        ip_in=ip_in,
        proxy_protocol=proxy_protocol,
    )


class _ErrorFactory:
    def __init__(self, path: str | None, line: int | None) -> None:
        self.path = path
        self.line = line

    def __call__(self, message: str) -> ConfigError:
        return ConfigError(self.path, self.line, f"{RECORD_NAME}: {message}")


def _overlaps(a: PortDescriptor, b: PortDescriptor) -> bool:
    if a.port != b.port or a.ipv6 != b.ipv6:
        return False
    return a.ip_in is None or b.ip_in is None or a.ip_in == b.ip_in


def parse_server_ports(value: str, path: str | None = None, line: int | None = None) -> list[PortDescriptor]:
    """Parse the record's value into descriptors, in the order written.

    Raises ConfigError(path, line, ...) for an unknown keyword, a missing or out-of-range
    port, transparent-proxy keywords, or two descriptors that would bind the same address
    and port (a wildcard address overlaps every address of its family).
    """
    err = _ErrorFactory(path, line)
    result: list[PortDescriptor] = []
    for text in re.split(r"[\s,]+", value.strip()):
        if not text:
            continue
        desc = _parse_descriptor(text, err)
        for other in result:
            if _overlaps(desc, other):
                raise err(f"duplicate port: '{desc.describe()}' overlaps '{other.describe()}'")
        result.append(desc)
    return result
