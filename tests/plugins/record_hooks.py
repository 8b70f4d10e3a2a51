"""Test plugin: append ``PID HOOK CLIENT_PORT LOCAL_PORT SNI`` for every TLS hook to the file in args[0].

Re-enables every pausable hook at once. Listed first in plugin.config, it sees each hook before
the other test plugins do (hooks run in registration order).
"""

from __future__ import annotations

import os
import time

from tsproxy.api import HookID, PluginAPI, VConn

HOOKS = (
    HookID.VCONN_START,
    HookID.SSL_CLIENT_HELLO,
    HookID.SSL_SERVERNAME,
    HookID.SSL_CERT,
    HookID.VCONN_CLOSE,
)


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    path = args[0]

    def record(hook: HookID, vc: VConn) -> None:
        client = vc.client_address
        local = vc.local_address
        ports = f"{client[1] if client else '-'} {local[1] if local else '-'}"
        line = f"{os.getpid()} {hook.name} {ports} {vc.sni or '-'} {time.monotonic():.3f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if hook is not HookID.VCONN_CLOSE:
            vc.reenable()

    for hook in HOOKS:
        api.hook_add(hook, record)
