"""access_log: one line per transaction, Apache combined format plus TLS details.

plugin.config::

    plugins.access_log [PATH]     # default: access.log in proxy.config.log.logfile_dir

A line (written in TXN_CLOSE, so also for refused, failed and aborted transactions)::

    127.0.0.1 - - [12/Mar/2025:10:01:02 +0000] "GET /a HTTP/1.1" 200 1234 "-" "curl/8.5.0" ex.com TLSv1.3

Fields: client IP, ``-``, ``-``, local time, request line, the status sent to the client (``-``
when none was: the client went away first), the response's Content-Length (``-`` when not
known: chunked or close-delimited bodies, error answers), Referer, User-Agent, SNI and TLS
version (``-`` on plain HTTP). Request data is escaped as Apache does: every byte outside
printable ASCII (controls, DEL, TAB, C1 controls, bytes >= 0x80) becomes ``\\xHH`` (so does a
space in the unquoted SNI field), ``"`` and ``\\`` become ``\\"`` and ``\\\\``; one transaction is
one line, whose fields split on spaces. Lines are buffered in memory and written with one ``write`` per
second (or as soon as 64 KiB are buffered), at ``tsproxy reload`` (which also reopens the file,
for log rotation) and when the worker stops; a slow disk costs the loop at most one write per
flush. Every worker appends to the same file with O_APPEND, whole lines per write. A flush
first checks that the path still names the open file (one stat): when the master has rolled it
(proxy.config.log.rolling_enabled) or logrotate moved it, the file is opened anew.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from tsproxy.api import HookID, PluginAPI, PluginError, Txn

FLUSH_SECONDS = 1.0
FLUSH_BYTES = 64 * 1024


def _escape(value: str) -> str:
    """Apache's log escaping: ``\\"`` and ``\\\\``, and every other byte outside printable ASCII
    as ``\\xHH``. Request data is latin-1 (one character per byte); a character
    beyond latin-1 (set by a plugin) is written as its UTF-8 bytes."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value  # the usual case: nothing to escape
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if 0x20 <= code < 0x7F:
            out.append("\\" + ch if ch in '"\\' else ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def _quote(value: str | None) -> str:
    if not value:
        return '"-"'
    return '"' + _escape(value) + '"'


def _bare(value: str | None) -> str:
    """An unquoted field: escaped, and a space too (it would split the field)."""
    if not value:
        return "-"
    return _escape(value).replace(" ", "\\x20")


class _Clock:
    """Apache's ``[%d/%b/%Y:%H:%M:%S %z]``, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        t = int(time.time())
        if t != self._second:
            self._second = t
            self._text = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(t))
        return self._text


def format_line(txn: Txn, clock: _Clock) -> str:
    client = txn.client_address
    try:
        req = txn.client_request
        version = req.http_version
        if not version.startswith("HTTP"):
            version = "HTTP/" + version
        request_line = f"{req.method} {req.target} {version}"
        referer = req.headers.get("Referer")
        agent = req.headers.get("User-Agent")
    except PluginError:
        request_line, referer, agent = "-", None, None
    status = txn.status
    length: str | None = None
    response = txn.server_response
    if response is not None and status == response.status:
        length = response.headers.get("Content-Length")
    return (
        f"{client[0] if client else '-'} - - {clock.now()} {_quote(request_line)} "
        f"{status if status else '-'} {length or '-'} {_quote(referer)} {_quote(agent)} "
        f"{_bare(txn.sni)} {txn.tls_version or '-'}\n"
    )


class AccessLog:
    def __init__(self, api: PluginAPI, path: Path) -> None:
        self.api = api
        self.path = path
        self.buf: list[bytes] = []
        self.size = 0
        self.fd = -1
        self.clock = _Clock()
        self.open()

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted in the log directory is refused, never appended to.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
            raise PluginError(f"access_log: cannot open {self.path}: {why}") from None
        old, self.fd = self.fd, fd
        if old >= 0:
            os.close(old)

    def on_txn_close(self, hook: HookID, txn: Txn) -> None:
        line = format_line(txn, self.clock).encode("utf-8", "replace")
        self.buf.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def _reopen_if_rolled(self) -> None:
        """The master rolls log files by renaming them (proxy.config.log.rolling_enabled):
        once the name no longer leads to the open file, open it anew."""
        try:
            st, fst = os.stat(self.path), os.fstat(self.fd)
            rolled = (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino)
        except OSError:
            rolled = True
        if rolled:
            try:
                self.open()
            except PluginError as exc:
                self.api.log.error("%s", exc)

    def flush(self) -> None:
        if not self.buf or self.fd < 0:
            return
        self._reopen_if_rolled()
        data = b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        try:
            written = os.write(self.fd, data)  # one write: never more than that on a slow disk
        except OSError as exc:
            self.api.log.error("access_log: writing %s: %s (%d bytes dropped)", self.path, exc, len(data))
            return
        if written < len(data):  # a short write: the rest goes with the next flush
            self.buf.append(data[written:])
            self.size = len(data) - written

    def tick(self) -> None:
        self.flush()
        self.api.schedule_in(FLUSH_SECONDS, self.tick)

    def reload(self) -> None:
        self.flush()
        try:
            self.open()  # reopen: a rotated file is replaced by a fresh one
        except PluginError as exc:
            self.api.log.error("%s", exc)

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    if len(args) > 1:
        raise PluginError("access_log: at most one argument, the log file path")
    path = Path(args[0]) if args else Path("access.log")
    if not path.is_absolute():
        path = api.log_dir / path
    log = AccessLog(api, path)
    api.hook_add(HookID.TXN_CLOSE, log.on_txn_close)
    api.schedule_in(FLUSH_SECONDS, log.tick)
    api.on_reload(log.reload)
    api.on_exit(log.close)
