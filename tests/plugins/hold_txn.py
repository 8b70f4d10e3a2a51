"""Test plugin: hold a transaction in READ_REQUEST_HDR until a file appears.

args: DIR. A request with ``X-Hold: NAME`` pauses in READ_REQUEST_HDR (before the remap lookup)
and is re-enabled once DIR/NAME exists (polled every 20 ms); other requests go on at once.
Appends ``held NAME`` and ``released NAME`` to DIR/hold.log.
"""

from __future__ import annotations

import os
from pathlib import Path

from tsproxy.api import HookID, PluginAPI, Txn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    directory = Path(args[0])

    def log(line: str) -> None:
        fd = os.open(directory / "hold.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def on_request(hook: HookID, txn: Txn) -> None:
        name = txn.client_request.headers.get("X-Hold")
        if not name:
            txn.reenable()
            return
        log(f"held {name}")

        def poll() -> None:
            if (directory / name).exists():
                log(f"released {name}")
                txn.reenable()
            else:
                api.schedule_in(0.02, poll)

        api.schedule_in(0.02, poll)

    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
