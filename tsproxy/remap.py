# remap.config: which origin serves a request (ATS's UrlRewrite / url_mapping), sans-IO.
#
# Theory of operation
# -------------------
# parse_remap() reads the ATS remap.config subset tsproxy supports:
#
#     map                FROM TO [@ssl_verify=enforced|permissive|disabled] [@sni=NAME] [@client_cert=FILE]
#     map_with_recv_port FROM TO [...]   (matches the port the request arrived on, not Host's port)
#     reverse_map        FROM TO         (accepted and ignored, with a warning: no Location rewrite yet)
#
# with '#' comments, blank lines and '\' line continuation. FROM is http(s)://host[:port][/prefix]
# (the scheme is the client's: http on a plain port, https on a TLS port); TO is the origin URL.
# Every error is a ConfigError naming the file and line.
#
# Matching (RemapTable.lookup, once per request): as in ATS, a `map` rule's port is the port of the
# request URL, i.e. the port in the Host header or, without one, the scheme's default: `map
# http://a.com/` matches "Host: a.com" but not "Host: a.com:8080". Host names compare
# case-insensitively (a trailing dot ignored). The path prefix matches on raw bytes at a segment
# boundary: "/foo" matches "/foo", "/foo/x" and "/foo?q" but not "/foobar". The first matching rule
# in file order wins. The new target is TO's path followed by the rest of the request target
# (query string included).
#
# To keep lookup cheap, rules are indexed by (scheme, host, port) in dicts and everything a match
# needs (prefix bytes, origin path, Host header) is precomputed as bytes at load time.

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from iocore.records.errors import ConfigError

__all__ = [
    "OriginKey",
    "RemapResult",
    "RemapRule",
    "RemapTable",
    "describe_miss",
    "forward_result",
    "load_remap",
    "parse_remap",
]

DEFAULT_PORTS = {"http": 80, "https": 443}

_SSL_VERIFY = ("enforced", "permissive", "disabled")
_OPTIONS = ("ssl_verify", "sni", "client_cert")
_SUPPORTED = ("map", "map_with_recv_port", "reverse_map")
_UNSUPPORTED = (
    "map_with_referer",
    "redirect",
    "redirect_temporary",
    "regex_map",
    "regex_map_with_recv_port",
    "regex_redirect",
    "regex_redirect_temporary",
    "regex_map_with_referer",
    "regex_remap",
    ".definefilter",
    ".deletefilter",
    ".activatefilter",
    ".deactivatefilter",
    ".include",
)
_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:?#\[\]@]*)"
    r"(?::(?P<port>[^/?#]*))?(?P<path>[^?#]*)(?P<rest>.*)\Z",
    re.DOTALL,
)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?\Z")


# (scheme, host, port, remap TLS options): what makes two origin connections interchangeable.
OriginKey = tuple[str, str, int, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class RemapRule:
    """One map line, parsed. str() gives ``FILE:LINE: text`` for logs."""

    path: str
    line: int
    text: str
    directive: str
    from_scheme: str
    from_host: str
    from_port: int
    from_prefix: bytes
    to_scheme: str
    to_host: str
    to_port: int
    to_path: bytes
    host_header: bytes
    options: Mapping[str, str]
    # The origin pool's key for this rule's target, computed once here instead of per request.
    # Per-rule TLS options (@sni, @ssl_verify, @client_cert) are part of it, so a connection
    # verified one way is never reused for a rule that wants another.
    origin_key: OriginKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        opts = tuple(sorted(self.options.items()))
        object.__setattr__(self, "origin_key", (self.to_scheme, self.to_host, self.to_port, opts))

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


@dataclass(frozen=True, slots=True)
class RemapResult:
    """Where to send one request, and how to address it there."""

    origin_scheme: str
    origin_host: str
    origin_port: int
    path: bytes
    host_header: bytes
    rule: RemapRule
    options: Mapping[str, str]


_CACHE_SIZE = 512
_CACHE_MAX_PATH = 512

_Index = dict[tuple[str, bytes, int], list[tuple[int, RemapRule]]]


@dataclass(slots=True)
class RemapTable:
    """The map rules of one remap.config; lookup() runs per request."""

    rules: list[RemapRule] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _by_host_port: _Index = field(default_factory=dict, repr=False)
    _by_recv_port: _Index = field(default_factory=dict, repr=False)
    # Recent lookups (the result is immutable, so it is shared): keep-alive clients repeat the
    # same few URLs, and a hit spares the host parsing, the rule scan and the result's __init__.
    _cache: dict[tuple[str, str | bytes, int, bytes], RemapResult] = field(default_factory=dict, repr=False)

    def add(self, rule: RemapRule) -> None:
        self._cache.clear()
        index = self._by_recv_port if rule.directive == "map_with_recv_port" else self._by_host_port
        key = (rule.from_scheme, rule.from_host.encode("ascii"), rule.from_port)
        index.setdefault(key, []).append((len(self.rules), rule))
        self.rules.append(rule)

    def https_targets(self) -> list[RemapResult]:
        """One result per rule with an https:// origin (to build its TLS client context early)."""
        return [
            RemapResult(r.to_scheme, r.to_host, r.to_port, r.to_path, r.host_header, r, r.options)
            for r in self.rules
            if r.to_scheme == "https"
        ]

    def lookup(self, scheme: str, host: str | bytes, port: int, path: bytes) -> RemapResult | None:
        """The mapping for a request, or None (the caller answers 404).

        ``host`` is the Host header value (may carry ":port"); ``port`` is the port the request
        arrived on (used by map_with_recv_port rules); ``path`` the origin-form request-target.
        """
        key = (scheme, host, port, path)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        result = self._lookup(scheme, host, port, path)
        if result is not None and len(path) <= _CACHE_MAX_PATH and len(host) <= _CACHE_MAX_PATH:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()  # bounded; clearing is O(1) per insert amortised
            cache[key] = result
        return result

    def _lookup(self, scheme: str, host: str | bytes, port: int, path: bytes) -> RemapResult | None:
        key = _host_key(scheme, host)
        if key is None:
            return None
        name, url_port = key
        candidates = self._by_host_port.get((scheme, name, url_port))
        if self._by_recv_port:
            recv = self._by_recv_port.get((scheme, name, port))
            if recv:
                candidates = sorted((candidates or []) + recv, key=lambda c: c[0])
        if not candidates:
            return None
        for _, rule in candidates:
            prefix = rule.from_prefix
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if rest and prefix[-1:] != b"/" and rest[:1] not in (b"/", b"?"):
                continue  # "/foo" must not match "/foobar"
            to_path = rule.to_path
            if rest:
                if to_path[-1:] == b"/":
                    if rest[:1] == b"/":
                        rest = rest[1:]
                elif rest[:1] not in (b"/", b"?"):
                    to_path += b"/"
                new_path = to_path + rest
            else:
                new_path = to_path
            return RemapResult(
                rule.to_scheme, rule.to_host, rule.to_port, new_path, rule.host_header, rule, rule.options
            )
        return None


def _host_key(scheme: str, host: str | bytes) -> tuple[bytes, int] | None:
    """(lower-case name, port) a Host value is looked up under; None if it is not a host."""
    hb = host.encode("latin-1") if isinstance(host, str) else host
    hb = hb.lower()
    name = hb
    url_port = DEFAULT_PORTS.get(scheme, 0)
    colon = hb.rfind(b":")
    if colon >= 0 and hb.find(b"]", colon) < 0:
        digits = hb[colon + 1 :]
        name = hb[:colon]
        if digits:
            if not digits.isdigit() or len(digits) > 5:
                return None
            url_port = int(digits)
    if name.endswith(b"."):
        name = name[:-1]
    if not name:
        return None
    return name, url_port


def forward_result(scheme: str, host: str | bytes, path: bytes) -> RemapResult | None:
    """proxy.config.url_remap.remap_required 0: where an unmapped request goes, namely to the
    host and port it names itself (as a forward proxy), with the client's Host sent on."""
    key = _host_key(scheme, host)
    if key is None:
        return None
    name_b, port = key
    name = name_b.decode("latin-1")
    if name.startswith("["):
        name = name[1:-1]
    elif _HOSTNAME_RE.match(name) is None:
        return None
    try:
        host_header = name_b if port == DEFAULT_PORTS[scheme] else b"%s:%d" % (name_b, port)
    except KeyError:
        return None
    rule = RemapRule(
        path="(remap_required 0)",
        line=0,
        text=f"forward {scheme}://{name_b.decode('latin-1')}:{port}/",
        directive="forward",
        from_scheme=scheme,
        from_host=name,
        from_port=port,
        from_prefix=b"/",
        to_scheme=scheme,
        to_host=name,
        to_port=port,
        to_path=b"/",
        host_header=host_header,
        options=MappingProxyType({}),
    )
    return RemapResult(scheme, name, port, path, host_header, rule, rule.options)


_MAX_SHOWN_HOST = 100


def describe_miss(scheme: str, host: str | bytes, port: int) -> str:
    """What a 404 for an unmapped request says: the host:port the lookup used (the client's own
    input, so shortened and made printable; a ``map`` rule's port is the Host header's, or the
    scheme's default without one), and the port the request came in on."""
    key = _host_key(scheme, host)
    if key is None:
        return f"no remap rule: bad or missing Host {_shown(host)!r} (request on port {port})"
    name, url_port = key
    return f"no remap rule for {scheme}://{_shown(name)}:{url_port}/ (request on port {port})"


def _shown(value: str | bytes) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    cut = text[:_MAX_SHOWN_HOST] + ("..." if len(text) > _MAX_SHOWN_HOST else "")
    return "".join(c if "!" <= c <= "~" else "?" for c in cut)


def load_remap(path: Path) -> RemapTable:
    """Read and parse a remap.config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, "not valid UTF-8") from exc
    return parse_remap(text, str(path))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, text) per logical line, after '\\' continuation."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        out.append((start, " ".join(pending)))
        pending = []
    if pending:
        out.append((start, " ".join(pending)))
    return out


def _parse_url(url: str, path: str, line: int, what: str) -> tuple[str, str, int, bytes]:
    m = _URL_RE.match(url)
    if m is None:
        raise ConfigError(path, line, f"{what} URL {url!r} is not scheme://host[:port]/path")
    scheme = m["scheme"].lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(path, line, f"{what} URL {url!r}: scheme must be http or https")
    host = m["host"].lower()
    if not host:
        raise ConfigError(path, line, f"{what} URL {url!r} has no host")
    if not host.startswith("[") and _HOSTNAME_RE.match(host) is None:
        raise ConfigError(path, line, f"{what} URL {url!r}: bad host name {host!r}")
    host = host.rstrip(".")
    port_text = m["port"]
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    else:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(path, line, f"{what} URL {url!r}: bad port {port_text!r}")
        port = int(port_text)
    if m["rest"]:
        raise ConfigError(path, line, f"{what} URL {url!r}: query strings and fragments are not allowed")
    url_path = m["path"] or "/"
    try:
        path_bytes = url_path.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigError(path, line, f"{what} URL {url!r}: path must be ASCII (percent-encode it)") from None
    if any(c <= 0x20 or c == 0x7F for c in path_bytes):
        raise ConfigError(path, line, f"{what} URL {url!r}: path has a control character or space")
    return scheme, host, port, path_bytes


def _parse_options(tokens: list[str], path: str, line: int) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in tokens:
        if not token.startswith("@"):
            raise ConfigError(path, line, f"unexpected {token!r}: options are written @key=value")
        key, eq, value = token[1:].partition("=")
        if key not in _OPTIONS:
            raise ConfigError(path, line, f"unknown option @{key} (known: @{', @'.join(_OPTIONS)})")
        if not eq or not value:
            raise ConfigError(path, line, f"option @{key} needs a value (@{key}=...)")
        if key in options:
            raise ConfigError(path, line, f"option @{key} given twice")
        if key == "ssl_verify" and value not in _SSL_VERIFY:
            raise ConfigError(path, line, f"@ssl_verify must be one of {', '.join(_SSL_VERIFY)}")
        options[key] = value
    return options


def parse_remap(text: str, path: str) -> RemapTable:
    """Parse remap.config text; ``path`` names the file in error messages."""
    table = RemapTable()
    for line, logical in _logical_lines(text):
        body = logical.split("#", 1)[0].strip()
        if not body:
            continue
        tokens = body.split()
        directive = tokens[0].lower()
        if directive in _UNSUPPORTED:
            raise ConfigError(path, line, f"{tokens[0]} is not supported")
        if directive not in _SUPPORTED:
            raise ConfigError(path, line, f"unknown directive {tokens[0]!r}")
        if len(tokens) < 3:
            raise ConfigError(path, line, f"{directive} needs a FROM and a TO URL")
        if directive == "reverse_map":
            table.warnings.append(
                f"{path}:{line}: reverse_map is ignored (Location headers are not rewritten)"
            )
            continue
        f_scheme, f_host, f_port, f_prefix = _parse_url(tokens[1], path, line, "FROM")
        t_scheme, t_host, t_port, t_path = _parse_url(tokens[2], path, line, "TO")
        options = _parse_options(tokens[3:], path, line)
        if options and t_scheme != "https":
            raise ConfigError(path, line, "@ssl_verify, @sni and @client_cert need an https:// origin")
        host_header = t_host if t_port == DEFAULT_PORTS[t_scheme] else f"{t_host}:{t_port}"
        table.add(
            RemapRule(
                path=path,
                line=line,
                text=body,
                directive=directive,
                from_scheme=f_scheme,
                from_host=f_host,
                from_port=f_port,
                from_prefix=f_prefix,
                to_scheme=t_scheme,
                to_host=t_host,
                to_port=t_port,
                to_path=t_path,
                host_header=host_header.encode("ascii"),
                options=MappingProxyType(options),
            )
        )
    return table
