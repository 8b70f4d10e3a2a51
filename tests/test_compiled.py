"""tsproxy.compiled: the start-up warning about compiled modules older than their source."""

from __future__ import annotations

import os
from pathlib import Path

from tsproxy.compiled import stale_compiled_modules


def _touch(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    os.utime(path, (mtime, mtime))


def test_a_source_edited_after_compilation_is_reported(tmp_path: Path) -> None:
    _touch(tmp_path / "iocore" / "net" / "fresh.cpython-311-x86_64-linux-gnu.so", 2000)
    _touch(tmp_path / "iocore" / "net" / "fresh.py", 1000)
    _touch(tmp_path / "tsproxy" / "edited.cpython-311-x86_64-linux-gnu.so", 1000)
    _touch(tmp_path / "tsproxy" / "edited.py", 2000)
    _touch(tmp_path / "tsproxy" / "orphan.cpython-311-x86_64-linux-gnu.so", 1000)  # no source
    _touch(tmp_path / "tsproxy" / "plain.py", 3000)  # never compiled
    assert stale_compiled_modules(tmp_path) == [tmp_path / "tsproxy" / "edited.py"]


def test_this_checkout_has_no_stale_compiled_module() -> None:
    """The install step (pip install -e .) compiled the sources as they are now."""
    assert stale_compiled_modules() == []
