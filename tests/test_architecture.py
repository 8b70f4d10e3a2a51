"""Layers import downward only (ARCHITECTURE.md):

plugins -> tsproxy.api -> tsproxy -> iocore.net -> iocore.eventsystem -> iocore.records

This reads every module's imports (including those inside functions and TYPE_CHECKING blocks)
and fails on an arrow that points up. ``tsproxy.cli`` is the composition root: it may import
``tsproxy.api`` to hand the plugin loader to the master, which never imports the facade itself.
"""

from __future__ import annotations

import ast
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
