"""Reliability test plugin: a VCONN_START hook that misbehaves on connections to one local port.

args: MODE PORT LOGFILE, MODE ``raise`` (the callback raises) or ``stall`` (it never re-enables;
the handshake timeout must still end the connection). Logs ``MODE start CLIENT_PORT`` when it
misbehaves and ``MODE close CLIENT_PORT`` from VCONN_CLOSE, which must come for every one.
Loaded twice (once per mode) in the same worker.
"""

from __future__ import annotations

import os

from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    mode, port, path = args[0], int(args[1]), args[2]
    if mode not in ("raise", "stall"):
        raise ValueError(f"mode must be raise or stall, not {mode!r}")

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
        log(f"{mode} start {client(vc)}")
        if mode == "raise":
            raise RuntimeError("reliability test: VCONN_START callback raised")
        # stall: never vc.reenable()

    def on_close(hook: HookID, vc: VConn) -> None:
        if mine(vc):
            log(f"{mode} close {client(vc)}")

    api.hook_add(HookID.VCONN_START, on_start)
    api.hook_add(HookID.VCONN_CLOSE, on_close)
