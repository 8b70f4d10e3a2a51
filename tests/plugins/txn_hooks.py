"""Test plugin: every HTTP transaction hook, with per-request behaviour chosen by the client.

args: LOGFILE. Each hook appends ``ID HOOK [detail]`` (ID: the request's X-Test-Id header) to
LOGFILE. The request header ``X-Test-Action: HOOK=ACTION[,HOOK=ACTION...]`` picks what a hook
does (default: re-enable at once):

  delay     re-enable (twice: the second call must be harmless) from a 0.2 s timer
  error     reenable(error=True)
  raise     raise RuntimeError
  respond   txn.respond(203, {"X-Synthetic": HOOK}, "synthetic from HOOK"), log ``respond=BOOL``
  stall     never re-enable
  txnhook   add per-transaction SEND_RESPONSE_HDR and TXN_CLOSE hooks (logged as TXN:HOOK;
            the first sets ``X-Txn-Hook: yes`` on the response)
  reqhdr    set ``X-Plugin-Saw: HOOK`` and remove ``X-Remove-Me`` on the client request
  resphdr   set ``X-Plugin-Resp: HOOK`` and remove ``Content-Type`` on the response
  target    log ``target=TARGET`` (the client request's target as the hook sees it)
  retarget  set the target to the X-New-Target header's value; log ``target=TARGET`` read back,
            or ``refused: ERROR`` when the API refuses it
TXN_CLOSE logs ``status=STATUS``.
"""

from __future__ import annotations

import os

from tsproxy.api import HookID, PluginAPI, PluginError, Txn

HOOKS = (
    HookID.READ_REQUEST_HDR,
    HookID.PRE_REMAP,
    HookID.POST_REMAP,
    HookID.SEND_REQUEST_HDR,
    HookID.READ_RESPONSE_HDR,
    HookID.SEND_RESPONSE_HDR,
    HookID.TXN_CLOSE,
)


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    path = args[0]

    def log(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def per_txn(hook: HookID, txn: Txn) -> None:
        log(f"{txn.client_request.headers.get('X-Test-Id')} TXN:{hook.name}")
        if hook is HookID.SEND_RESPONSE_HDR:
            response = txn.server_response
            assert response is not None
            response.headers.set("X-Txn-Hook", "yes")
            txn.reenable()

    def on_hook(hook: HookID, txn: Txn) -> None:
        headers = txn.client_request.headers
        tid = headers.get("X-Test-Id") or "-"
        items = (headers.get("X-Test-Action") or "").split(",")
        actions = dict(item.strip().split("=", 1) for item in items if "=" in item)
        action = actions.get(hook.name, "")
        if hook is HookID.TXN_CLOSE:
            log(f"{tid} {hook.name} status={txn.status}")
            return
        log(f"{tid} {hook.name}")
        if action == "delay":

            def later() -> None:
                log(f"{tid} {hook.name} resumed alive={txn.alive}")
                txn.reenable()
                txn.reenable()

            api.schedule_in(0.2, later)
            return
        if action == "error":
            txn.reenable(error=True)
            return
        if action == "raise":
            raise RuntimeError(f"test plugin raising in {hook.name} on purpose")
        if action == "respond":
            ok = txn.respond(203, {"X-Synthetic": hook.name}, f"synthetic from {hook.name}")
            log(f"{tid} {hook.name} respond={ok}")
        elif action == "stall":
            log(f"{tid} {hook.name} stalled")
            return
        elif action == "txnhook":
            txn.hook_add(HookID.SEND_RESPONSE_HDR, per_txn)
            txn.hook_add(HookID.TXN_CLOSE, per_txn)
        elif action == "reqhdr":
            headers.set("X-Plugin-Saw", hook.name)
            headers.remove("X-Remove-Me")
        elif action == "target":
            log(f"{tid} {hook.name} target={txn.client_request.target}")
        elif action == "retarget":
            try:
                txn.client_request.target = headers.get("X-New-Target") or ""
                log(f"{tid} {hook.name} target={txn.client_request.target}")
            except PluginError as exc:
                log(f"{tid} {hook.name} refused: {exc}")
        elif action == "resphdr":
            response = txn.server_response
            assert response is not None
            response.headers.set("X-Plugin-Resp", hook.name)
            response.headers.remove("Content-Type")
        txn.reenable()

    for hook in HOOKS:
        api.hook_add(hook, on_hook)
