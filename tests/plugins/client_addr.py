"""Test plugin: append ``HOOK CLIENT_IP CLIENT_PORT PP_VERSION PP_PEER_IP`` to the file in args[0]
for VCONN_START (TLS ports) and READ_REQUEST_HDR (every transaction)."""

from __future__ import annotations

import os

from tsproxy.api import HookID, PluginAPI, ProxyHeader, Txn, VConn


def _line(hook: HookID, client: tuple[str, int] | None, pp: ProxyHeader | None) -> bytes:
    where = f"{client[0]} {client[1]}" if client else "- -"
    peer = pp.peer[0] if pp is not None and pp.peer else "-"
    return f"{hook.name} {where} {pp.version if pp else '-'} {peer}\n".encode()


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    path = args[0]

    def write(data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def on_vconn_start(hook: HookID, vc: VConn) -> None:
        write(_line(hook, vc.client_address, vc.proxy_protocol))
        vc.reenable()

    def on_request(hook: HookID, txn: Txn) -> None:
        write(_line(hook, txn.client_address, txn.proxy_protocol))
        txn.reenable()

    api.hook_add(HookID.VCONN_START, on_vconn_start)
    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
