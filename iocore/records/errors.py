"""The one home of tsproxy's exceptions' base classes.

Every error tsproxy raises on purpose derives from TSError, so the CLI can print it
without a traceback. ConfigError carries the file and line that were wrong.
"""

from __future__ import annotations


class TSError(Exception):
    """Base of every error tsproxy raises on purpose."""


class ConfigError(TSError):
    """A configuration file is wrong; str() is ``FILE:LINE: what is wrong``."""

    def __init__(self, path: str | None, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"
