"""Process logging: stderr plus ``proxy.config.log.logfile_dir/tsproxy.log``; log rolling.

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

Rolling (``LogRoller``, run by the master about once a second): every ``*.log`` file of the
log directory (tsproxy.log, the access_log plugin's access.log, ...) is renamed, as ATS does,
to ``NAME_HOST.START-END.old`` when ``proxy.config.log.rolling_enabled`` says it is due (at
each multiple of ``rolling_interval_sec``, above ``rolling_size_mb``, or both). Writers notice
the rename themselves and reopen the name: the file handler here compares the inode of the name with its
open file at each line (one stat, in every process), the access_log plugin compares inodes at each flush.
With ``auto_delete_rolled_files``, the oldest ``.old`` files are deleted while the directory
holds more than ``max_space_mb_for_logs``. Nothing here runs per request.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tsproxy.safefs import open_append

if TYPE_CHECKING:
    from iocore.records.parser import RecordsConfig

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


def _text_stream(fd: int) -> TextIO:
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


class _LogFileHandler(logging.StreamHandler[TextIO]):
    """tsproxy.log, appended to through a descriptor opened without following links.

    When the name no longer leads to the open file (the master rolled it, or logrotate moved
    it), the name is opened anew, the same safe way; a name this process may not look at (after
    the switch to proxy.config.admin.user_id) or that is now a link keeps the open file."""

    def __init__(self, stream: TextIO, path: Path, owner: tuple[int, int] | None) -> None:
        super().__init__(stream)
        self.path = path
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            st = os.stat(self.path)
            fst = os.fstat(self.stream.fileno())
            rolled = (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino)
        except FileNotFoundError:
            rolled = True
        except (OSError, ValueError):
            rolled = False
        if rolled:
            try:
                stream = _text_stream(open_append(self.path, self.owner))
            except Exception:  # a link planted there, a directory gone: keep writing where we were
                pass
            else:
                old = self.setStream(stream)
                if old is not None:
                    old.close()
        super().emit(record)

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
    file_handler = _LogFileHandler(_text_stream(fd), path, owner)
    file_handler.setFormatter(formatter)
    file_handler.addFilter(_label)
    logger.addHandler(file_handler)
    return path


ROLLED_SUFFIX = ".old"
_STAMP = "%Y%m%d.%Hh%Mm%Ss"
MB = 1 << 20


@dataclass(frozen=True, slots=True)
class RollingPolicy:
    """proxy.config.log.rolling_* and friends, as numbers."""

    mode: int  # rolling_enabled: 0 off, 1 interval, 2 size, 3 either, 4 interval and size
    interval: int  # seconds
    size: int  # bytes
    max_space: int  # bytes
    auto_delete: bool

    @classmethod
    def from_records(cls, records: RecordsConfig) -> RollingPolicy:
        g = records.get_int
        return cls(
            mode=g("proxy.config.log.rolling_enabled"),
            interval=g("proxy.config.log.rolling_interval_sec"),
            size=g("proxy.config.log.rolling_size_mb") * MB,
            max_space=g("proxy.config.log.max_space_mb_for_logs") * MB,
            auto_delete=bool(g("proxy.config.log.auto_delete_rolled_files")),
        )

    def due(self, size: int, interval_passed: bool) -> bool:
        """Whether a file of ``size`` bytes is rolled now (an empty one never is)."""
        if size == 0:
            return False
        big = size > self.size
        if self.mode == 1:
            return interval_passed
        if self.mode == 2:
            return big
        if self.mode == 3:
            return interval_passed or big
        if self.mode == 4:
            return interval_passed and big
        return False


class LogRoller:
    """Rolls the ``*.log`` files of one directory; the master calls ``tick`` once a second."""

    def __init__(self, log_dir: Path, policy: RollingPolicy, now: float | None = None) -> None:
        self.log_dir = log_dir
        self.policy = policy
        self.host = socket.gethostname().split(".")[0] or "localhost"
        start = time.time() if now is None else now
        self._slot = self._slot_of(start)
        self._started: dict[str, float] = {}  # file name -> when its current contents began
        self._start = start
        self._failed: set[str] = set()

    def _slot_of(self, now: float) -> int:
        return int(now // self.policy.interval)

    def set_policy(self, policy: RollingPolicy) -> None:
        self.policy = policy
        self._slot = self._slot_of(time.time())

    def tick(self, now: float | None = None) -> list[Path]:
        """Roll what is due and delete what exceeds the space; returns the rolled files' new paths."""
        now = time.time() if now is None else now
        policy = self.policy
        rolled: list[Path] = []
        if policy.mode:
            slot = self._slot_of(now)
            interval_passed = slot != self._slot
            self._slot = slot
            for path in sorted(self.log_dir.glob("*.log")):
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if policy.due(size, interval_passed):
                    done = self._roll(path, now)
                    if done is not None:
                        rolled.append(done)
        if policy.auto_delete:
            self._delete_oldest()
        return rolled

    def _roll(self, path: Path, now: float) -> Path | None:
        begin = self._started.get(path.name, self._start)
        stamp = f"{time.strftime(_STAMP, time.localtime(begin))}-{time.strftime(_STAMP, time.localtime(now))}"
        target = path.with_name(f"{path.name}_{self.host}.{stamp}{ROLLED_SUFFIX}")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}_{self.host}.{stamp}.{n}{ROLLED_SUFFIX}")
            n += 1
        try:
            os.rename(path, target)
        except OSError as exc:
            if path.name not in self._failed:  # once per file, not once a second
                self._failed.add(path.name)
                logging.getLogger(f"{LOGGER_NAME}.log").error("cannot roll %s: %s", path, exc.strerror or exc)
            return None
        self._failed.discard(path.name)
        self._started[path.name] = now
        logging.getLogger(f"{LOGGER_NAME}.log").info("rolled %s to %s", path.name, target.name)
        return target

    def _delete_oldest(self) -> None:
        files: list[tuple[float, int, Path]] = []
        total = 0
        try:
            entries = list(os.scandir(self.log_dir))
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            total += st.st_size
            if entry.name.endswith(ROLLED_SUFFIX):
                files.append((st.st_mtime, st.st_size, Path(entry.path)))
        files.sort()
        for _, size, path in files:
            if total <= self.policy.max_space:
                break
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
            logging.getLogger(f"{LOGGER_NAME}.log").info(
                "deleted %s: the log directory exceeds proxy.config.log.max_space_mb_for_logs", path.name
            )
