"""Which of tsproxy's modules are compiled (mypyc, see setup.py), and which are stale.

CPython imports ``name.cpython-*.so`` in preference to ``name.py``. So after a module listed in
setup.py is edited, the old compiled code keeps running until ``pip install -e .`` rebuilds it.
The master warns at start about every compiled module whose source is newer than it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGES = ("iocore", "tsproxy")
_ROOT = Path(__file__).resolve().parent.parent


def stale_compiled_modules(root: Path = _ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The .py files under ``root``/``packages`` that are newer than their compiled extension."""
    stale: list[Path] = []
    for package in packages:
        for ext in sorted((root / package).rglob("*.so")):
            source = ext.with_name(ext.name.split(".", 1)[0] + ".py")
            try:
                if source.stat().st_mtime > ext.stat().st_mtime:
                    stale.append(source)
            except FileNotFoundError:
                continue
    return stale
