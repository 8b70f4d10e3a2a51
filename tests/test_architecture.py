"""Layers import downward only (ARCHITECTURE.md):

plugins -> tsproxy.api -> tsproxy -> iocore.net -> iocore.eventsystem -> iocore.records

This reads every module's imports (including those inside functions and TYPE_CHECKING blocks)
and fails on an arrow that points up. ``tsproxy.cli`` is the composition root: it may import
``tsproxy.api`` to hand the plugin loader to the master, which never imports the facade itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS = [
    ("iocore.records", 0),
    ("iocore.eventsystem", 1),
    ("iocore.net", 2),
    ("tsproxy.api", 4),
    ("tsproxy", 3),
    ("plugins", 5),
]
COMPOSITION_ROOTS = {"tsproxy.cli"}


def layer_of(module: str) -> int | None:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def sources() -> list[Path]:
    files: list[Path] = []
    for top in ("iocore", "tsproxy", "plugins"):
        files.extend(p for p in (ROOT / top).rglob("*.py") if "tests" not in p.parts)
    return files


def test_layers_point_one_way() -> None:
    violations = []
    for path in sources():
        mod = module_name(path)
        own = layer_of(mod)
        if own is None or mod in COMPOSITION_ROOTS:
            continue
        for lineno, imported in imports_of(path):
            rank = layer_of(imported)
            if rank is not None and rank > own:
                violations.append(f"{path.relative_to(ROOT)}:{lineno}: {mod} imports {imported}")
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_protocol_code_is_sans_io() -> None:
    """The TLS and HTTP protocol modules never touch sockets or selectors."""
    sans_io = [*(ROOT / "iocore/net/tls").glob("*.py"), *(ROOT / "tsproxy/http").glob("*.py")]
    assert sans_io
    bad = [
        f"{p.relative_to(ROOT)}:{lineno}: imports {name}"
        for p in sans_io
        for lineno, name in imports_of(p)
        if name.split(".")[0] in ("socket", "selectors", "asyncio")
    ]
    assert not bad, "\n".join(bad)


def test_plugins_import_only_the_facade() -> None:
    bad = []
    for path in (ROOT / "plugins").rglob("*.py"):
        for lineno, name in imports_of(path):
            if name.split(".")[0] in ("iocore",) or (
                name.startswith("tsproxy") and not name.startswith("tsproxy.api")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: imports {name}")
    assert not bad, "\n".join(bad)


# Private pyOpenSSL / cryptography access (iocore/net/tls/_openssl.py owns all of it): the
# binding module and its lib/ffi objects, cryptography's bindings (the _rust extension), and
# pyOpenSSL's private attributes. ``self._context`` and the like are a class's own attributes.
PRIVATE_OPENSSL = re.compile(
    r"\bOpenSSL\._util\b"
    r"|\bhazmat\.bindings\b"
    r"|_(?:lib|ffi)\."
    r"|\b_(?:into|from)_ssl\b"
    r"|(?<!\bself)\.(?:_ssl|_context|_x509|_store|_raise_ssl_error|_handle_bio_errors|_reverse_mapping"
    r"|_keylog_callback)\b"
)
OPENSSL_OWNER = ROOT / "iocore/net/tls/_openssl.py"


def test_the_pattern_tells_private_access_from_look_alikes() -> None:
    private = [
        "from OpenSSL._util import lib",
        "import cryptography.hazmat.bindings._rust",
        "from cryptography.hazmat.bindings import _rust",
        "_ssl_lib.SSL_read(p)",
        "_ffi.NULL",
        "conn._ssl",
        "ssl._into_ssl",
        "x = _from_ssl",
        "ctx._context",
        "cert._x509",
        "store._store",
        "ssl._raise_ssl_error(p, n)",
        "SSL.Connection._reverse_mapping",
    ]
    public = [
        "self._context(policy, None, None)",
        "self._store = store",
        "self._ssl = None",
        "nh.ssl_scratch",
        "_ssl_pointer(ssl)",
        "vc._ssl_read()",
        "ssl_lib = 1",
        "from iocore.net.tls import _openssl",
        "proxy.config.ssl.server.ticket_key.filename",
    ]
    assert [t for t in private if not PRIVATE_OPENSSL.search(t)] == []
    assert [t for t in public if PRIVATE_OPENSSL.search(t)] == []


def test_one_module_owns_private_openssl_access() -> None:
    """Only iocore/net/tls/_openssl.py reaches behind pyOpenSSL's public API."""
    assert OPENSSL_OWNER in sources() and PRIVATE_OPENSSL.search(OPENSSL_OWNER.read_text())
    bad = [
        f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"
        for path in sources()
        if path != OPENSSL_OWNER
        for lineno, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_OPENSSL.search(line)
    ]
    assert not bad, "private OpenSSL access outside iocore/net/tls/_openssl.py:\n" + "\n".join(bad)


MAX_CLASS_LINES = 500


def test_no_class_spans_more_than_500_lines() -> None:
    """A class that outgrows MAX_CLASS_LINES (from its ``class`` line to its last line) is split
    along a real seam, as HttpSM was (tsproxy/http_response.py, tsproxy/http_txn_hooks.py)."""
    too_big = []
    for top in ("iocore", "tsproxy"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.ClassDef):
                    assert node.end_lineno is not None
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_CLASS_LINES:
                        too_big.append(f"{rel}:{node.lineno}: class {node.name} spans {lines} lines")
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(too_big)
