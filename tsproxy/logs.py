"""Process logging: stderr plus ``proxy.config.log.logfile_dir/tsproxy.log``.

The master configures logging once, before it forks; workers inherit the handlers (the log
file is opened in append mode, so lines from every process interleave whole) and only change
the process label shown in each line with ``set_process_label``. Signal handlers never log.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

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
) -> Path | None:
    """Send the ``tsproxy`` logger to ``stream`` (stderr) and to ``logfile_dir/tsproxy.log``.

    Creates ``logfile_dir`` when missing. Returns the log file path (None without a dir).
    Calling it again replaces the handlers it installed before.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT, _DATEFMT)
    stderr_handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    stderr_handler.setFormatter(formatter)
    stderr_handler.addFilter(_label)
    logger.addHandler(stderr_handler)
    if logfile_dir is None:
        return None
    logfile_dir.mkdir(parents=True, exist_ok=True)
    path = logfile_dir / LOG_FILE
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(formatter)
    file_handler.addFilter(_label)
    logger.addHandler(file_handler)
    return path
