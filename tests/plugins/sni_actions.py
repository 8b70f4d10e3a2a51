"""Test plugin: per-SNI behaviour in the handshake hooks.

args: NAME=ACTION ... where ACTION is one of
  raise            SSL_CLIENT_HELLO raises
  error            SSL_CERT calls reenable(error=True)
  swap:OTHER       SSL_CERT serves the configured context of the server name OTHER
  tunnel:HOST:PORT SSL_CLIENT_HELLO tunnels to HOST:PORT
Every other connection is re-enabled at once.
"""

from __future__ import annotations

from tsproxy.api import HookID, PluginAPI, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    actions = dict(arg.split("=", 1) for arg in args)

    def client_hello(hook: HookID, vc: VConn) -> None:
        action = actions.get(vc.sni or "", "")
        if action == "raise":
            raise RuntimeError("test plugin raising on purpose")
        if action.startswith("tunnel:"):
            vc.tunnel(action[len("tunnel:") :])
        vc.reenable()

    def cert(hook: HookID, vc: VConn) -> None:
        action = actions.get(vc.sni or "", "")
        if action == "error":
            vc.reenable(error=True)
            return
        if action.startswith("swap:"):
            ctx = api.ssl_context_find_by_name(action[len("swap:") :])
            assert ctx is not None, action
            vc.set_ssl_context(ctx)
        vc.reenable()

    api.hook_add(HookID.SSL_CLIENT_HELLO, client_hello)
    api.hook_add(HookID.SSL_CERT, cert)
