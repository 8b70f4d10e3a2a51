"""Test plugin: shows what a plugin sees of the matched sni.yaml item.

SSL_SERVERNAME appends ``SNI JSON`` (the item's values, or null) to the file in args[0]; every
request is answered with the transaction's view of the same item, as JSON."""

from __future__ import annotations

import json

from tsproxy.api import HookID, PluginAPI, Txn, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    log = args[0]

    def on_servername(hook: HookID, vconn: VConn) -> None:
        policy = vconn.sni_policy
        with open(log, "a") as f:
            f.write(f"{vconn.sni} {json.dumps(dict(policy) if policy is not None else None)}\n")
        vconn.reenable()

    def on_request(hook: HookID, txn: Txn) -> None:
        policy = txn.sni_policy
        body = json.dumps(dict(policy) if policy is not None else None)
        txn.respond(200, {"Content-Type": "application/json"}, body)
        txn.reenable()

    api.hook_add(HookID.SSL_SERVERNAME, on_servername)
    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
