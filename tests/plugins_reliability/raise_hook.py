"""Reliability test plugin: VCONN_START raises (without reenabling) on one local port.

args: PORT LOGFILE. Logs ``raise start CLIENT_PORT`` before raising and ``raise close CLIENT_PORT``
from VCONN_CLOSE for those connections. Other ports are re-enabled at once.
"""

from __future__ import annotations

import os

from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    port, path = int(args[0]), args[1]

    def log(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def mine(vc: VConn) -> bool:
        local = vc.local_address
        return local is not None and local[1] == port

    def client(vc: VConn) -> str:
        addr = vc.client_address
        return str(addr[1]) if addr else "-"

    def on_start(hook: HookID, vc: VConn) -> None:
        if not mine(vc):
            vc.reenable()
            return
        log(f"raise start {client(vc)}")
        raise RuntimeError("reliability test: VCONN_START callback raised")

    def on_close(hook: HookID, vc: VConn) -> None:
        if mine(vc):
            log(f"raise close {client(vc)}")

    api.hook_add(HookID.VCONN_START, on_start)
    api.hook_add(HookID.VCONN_CLOSE, on_close)
