"""Process logging: stderr plus ``proxy.config.log.logfile_dir/tsproxy.log``.

The master configures logging once, before it forks; workers inherit the handlers (the log
file is opened in append mode, so lines from every process interleave whole) and only change
the process label shown in each line with ``set_process_label``. Signal handlers never log.

Every message is escaped before it is written (``escape_text``): a character that is not
printable (C0 and C1 controls, DEL, TAB, CR, LF, Unicode separators) becomes ``\\xHH`` (or
``\\uHHHH``), so request data quoted in a line (a request target, a header, an SNI) can
neither forge a second line nor send escape sequences to the terminal reading the log. A
traceback appended to a line keeps its own newlines.

Started as root, ``tsproxy.log`` is opened before the switch to proxy.config.admin.user_id in
a directory that user may write to: it is opened with ``O_NOFOLLOW`` (a link planted there is
refused, never appended to) and, when created here, handed to that user (tsproxy.safefs).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from tsproxy.safefs import open_append

LOGGER_NAME = "tsproxy"
LOG_FILE = "tsproxy.log"
_FORMAT = "%(asctime)s.%(msecs)03d tsproxy[%(process)d] %(tsproxy_label)s %(levelname)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


class _LabelFilter(logging.Filter):
    """Adds ``tsproxy_label`` (``master``, ``ET_NET[0]``, ...) to every record."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.tsproxy_label = self.label
        return True


_label = _LabelFilter("master")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """``text`` with every non-printable character written as ``\\xHH`` (``\\uHHHH``)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


class _EscapingFormatter(logging.Formatter):
    """Escapes the message (not the traceback appended to it): see escape_text."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.message)
        return super().formatMessage(record)


class _LogFileHandler(logging.StreamHandler[TextIO]):
    """tsproxy.log, appended to through a descriptor opened without following links."""

    def close(self) -> None:
        self.acquire()
        try:
            self.flush()
            self.stream.close()
        finally:
            self.release()
            super().close()


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """A logger under the ``tsproxy`` hierarchy (``tsproxy.master``, ``tsproxy.worker``...)."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def set_process_label(label: str) -> None:
    """Name this process in log lines; a worker calls it right after fork."""
    _label.label = label


def setup_logging(
    logfile_dir: Path | None,
    *,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    owner: tuple[int, int] | None = None,
) -> Path | None:
    """Send the ``tsproxy`` logger to ``stream`` (stderr) and to ``logfile_dir/tsproxy.log``.

    Creates ``logfile_dir`` when missing; a log file created here gets ``owner`` (uid, gid).
    Returns the log file path (None without a dir). Calling it again replaces the handlers it
    installed before. Raises tsproxy.safefs.UnsafePathError when tsproxy.log is a link.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = False
    formatter = _EscapingFormatter(_FORMAT, _DATEFMT)
    stderr_handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    stderr_handler.setFormatter(formatter)
    stderr_handler.addFilter(_label)
    logger.addHandler(stderr_handler)
    if logfile_dir is None:
        return None
    logfile_dir.mkdir(parents=True, exist_ok=True)
    path = logfile_dir / LOG_FILE
    fd = open_append(path, owner)
    file_handler = _LogFileHandler(os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))
    file_handler.setFormatter(formatter)
    file_handler.addFilter(_label)
    logger.addHandler(file_handler)
    return path
