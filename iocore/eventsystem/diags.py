"""Debug tags, as ATS's DbgCtl (``DbgCtl dbg_ctl_ssl{"ssl"}``).

Each module creates its tags at import time: ``_dbg = DbgCtl("ssl")``. A tag is on when debug is
enabled and the tag matches ``proxy.config.diags.debug.tags`` (a regular expression matched at
the start of the tag, so ``ssl`` enables ``ssl.error`` too, as in ATS). Call sites check
``if _dbg.on:`` before formatting, so a disabled tag costs one attribute read.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

_log = logging.getLogger("tsproxy.debug")


class DbgCtl:
    """A named debug tag whose ``on`` flag follows the configured tag regex."""

    _all: ClassVar[list[DbgCtl]] = []
    _pattern: ClassVar[re.Pattern[str] | None] = None

    __slots__ = ("on", "tag")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.on = DbgCtl._matches(tag)
        DbgCtl._all.append(self)

    @classmethod
    def _matches(cls, tag: str) -> bool:
        return cls._pattern is not None and cls._pattern.match(tag) is not None

    @classmethod
    def configure(cls, enabled: bool, tags: str) -> None:
        """Apply ``proxy.config.diags.debug.enabled`` / ``.tags`` to every tag."""
        cls._pattern = re.compile(tags) if enabled and tags else None
        for ctl in cls._all:
            ctl.on = cls._matches(ctl.tag)

    def __call__(self, fmt: str, *args: Any) -> None:
        if self.on:
            # Request bytes (a Host header, a target) read as text, one character per byte; the
            # log formatter then escapes whatever is not printable (tsproxy.logs).
            shown = [a.decode("latin-1") if isinstance(a, bytes | bytearray) else a for a in args]
            _log.debug("<%s> " + fmt, self.tag, *shown)
