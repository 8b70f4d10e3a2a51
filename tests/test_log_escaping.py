"""Issue 14, item 5: request bytes never reach a log verbatim.

The HTTP parser accepts TAB and obs-text (0x80-0xFF, the C1 controls among them) in header
values, as RFC 9110 allows; those bytes used to land in the access log and in tsproxy.log as
they came (a C1 NEL starts a new line in some viewers, a C1 CSI drives a terminal). Both logs
are read back as bytes from the real processes.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ProxyProcess

Factory = Callable[..., ProxyProcess]

# Header values the parser lets through: TAB, C1 NEL (0x85), C1 CSI (0x9b) + "[2J" (clear the
# screen), a latin-1 byte, a quote and a backslash.
AGENT = b"a\tb\x85c\x9b[2Jd\xe9"
REFERER = b'r"q\\z'
HOST = b"evil.test\x9b[2J\tX\x85Y"

LINE = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<time>[^]]+)\] "(?P<req>[^"]*)" (?P<status>\S+) (?P<bytes>\S+) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<ua>(?:[^"\\]|\\.)*)" (?P<sni>\S+) (?P<tls>\S+)$'
)


def _send(port: int, host: bytes, extra: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        head = b"GET /a%0d%0a HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
        conn.sendall(head + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _wait_for_bytes(path: Path, needle: bytes, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in (data := path.read_bytes()):
            return data
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} within {timeout} s")


def _only_printable_ascii_lines(data: bytes) -> None:
    for line in data.split(b"\n")[:-1]:
        assert all(0x20 <= b < 0x7F for b in line), f"raw control or non-ASCII byte in log line {line!r}"


def _only_printable_lines(data: bytes) -> None:
    """tsproxy.log is UTF-8 text: printable characters only (a latin-1 letter from a header
    stays a letter; controls, C1 included, and format characters do not)."""
    for line in data.decode("utf-8").split("\n")[:-1]:
        assert line.isprintable(), f"raw control character in log line {line!r}"


def test_access_log_escapes_request_bytes(tsproxy_factory: Factory) -> None:
    proxy = tsproxy_factory(files={"plugin.config": "plugins.access_log\n"})
    response = _send(proxy.port(0), b"x.test", b"User-Agent: " + AGENT + b"\r\nReferer: " + REFERER + b"\r\n")
    assert response.startswith(b"HTTP/1.1 404")  # no remap rule: answered by the proxy
    data = _wait_for_bytes(proxy.config_dir / "log" / "access.log", b"/a%0d%0a")
    assert data.count(b"\n") == 1  # one transaction, one line
    _only_printable_ascii_lines(data)
    match = LINE.match(data.decode("ascii").rstrip("\n"))
    assert match is not None, data
    assert match["ua"] == r"a\x09b\x85c\x9b[2Jd\xe9"
    assert match["referer"] == r"r\"q\\z"
    assert match["req"] == "GET /a%0d%0a HTTP/1.1" and match["status"] == "404"


LOG_AGENT_PLUGIN = """
from tsproxy.api import HookID


def plugin_init(api, args):
    def on_close(hook, txn):
        api.log.warning("client sent User-Agent %s", txn.client_request.headers.get("User-Agent"))

    api.hook_add(HookID.TXN_CLOSE, on_close)
"""


def test_tsproxy_log_escapes_request_data_in_its_own_lines(tsproxy_factory: Factory) -> None:
    """tsproxy.log (and stderr) escape every line: a plugin's api.log line quoting a header,
    and tsproxy's own ``http`` debug line quoting the Host header of a request no remap rule
    matches. TAB and C1 controls come out as \\xHH, on the one line."""
    proxy = tsproxy_factory(
        records={"proxy.config.diags.debug.enabled": 1, "proxy.config.diags.debug.tags": "http"},
        files={"plugin.config": "log_agent.py\n", "plugins/log_agent.py": LOG_AGENT_PLUGIN},
    )
    assert _send(proxy.port(0), HOST, b"User-Agent: " + AGENT + b"\r\n").startswith(b"HTTP/1.1 404")
    log = proxy.config_dir / "log" / "tsproxy.log"
    data = _wait_for_bytes(log, b"client sent User-Agent")
    _only_printable_lines(data)
    lines = data.split(b"\n")
    agent = next(x for x in lines if b"client sent User-Agent" in x)
    assert agent.endswith(rb"client sent User-Agent a\x09b\x85c\x9b[2Jd" + "\xe9".encode()), agent
    remap = next(x for x in lines if b"no remap rule for" in x)
    assert remap.endswith(rb"no remap rule for http://evil.test\x9b[2J\x09X\x85Y/a%0d%0a"), remap
    output = proxy.output()  # stderr: the same escaped lines
    assert r"client sent User-Agent a\x09b\x85c" in output
    assert not any(ch in output for ch in "\t\x85\x9b")
