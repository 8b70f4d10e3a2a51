"""Test plugin: pause one hook and re-enable it after SECONDS from a timer (never when < 0).

args: HOOK MATCH SECONDS LOGFILE
  HOOK     VCONN_START | SSL_CLIENT_HELLO | SSL_CERT
  MATCH    ``port=N`` (the connection's local port) or ``sni=NAME``
Logs ``paused CLIENT_PORT`` / ``reenable CLIENT_PORT closed=BOOL`` / ``close CLIENT_PORT`` lines.
Connections that do not match are re-enabled at once.
"""

from __future__ import annotations

import os
import time

from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    hook_name, match, seconds_text, path = args
    hook_id = HookID[hook_name]
    key, _, value = match.partition("=")
    seconds = float(seconds_text)

    def log(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def matches(vc: VConn) -> bool:
        if key == "port":
            local = vc.local_address
            return local is not None and str(local[1]) == value
        return vc.sni == value

    def port_of(vc: VConn) -> str:
        client = vc.client_address
        return str(client[1]) if client else "-"

    def on_hook(hook: HookID, vc: VConn) -> None:
        if not matches(vc):
            vc.reenable()
            return
        vc.user_data["stalled"] = True
        log(f"paused {port_of(vc)}")
        if seconds < 0:
            return

        def later() -> None:
            log(f"reenable {port_of(vc)} closed={vc.closed} {time.monotonic():.3f}")
            vc.reenable()
            vc.reenable()  # a second call must be harmless too

        api.schedule_in(seconds, later)

    def on_close(hook: HookID, vc: VConn) -> None:
        if vc.user_data.get("stalled"):
            log(f"close {port_of(vc)}")

    api.hook_add(hook_id, on_hook)
    api.hook_add(HookID.VCONN_CLOSE, on_close)
