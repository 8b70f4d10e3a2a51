"""ssl_sni_allowlist: terminate TLS only for server names that have a certificate context.

plugin.config::

    plugins.ssl_sni_allowlist tunnel HOST:PORT     # blind-tunnel every other name there
    plugins.ssl_sni_allowlist refuse               # close every other handshake

In SSL_SERVERNAME, a ClientHello whose SNI has a configured context (exact or wildcard line of
ssl_multicert.config, ``api.ssl_context_find_by_name``) is terminated; anything else (an unknown
name, or no SNI at all) is tunnelled to HOST:PORT with the ClientHello replayed, or refused
(the connection is closed before a certificate is sent).
"""

from __future__ import annotations

from tsproxy.api import HookID, PluginAPI, PluginError, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    if args[:1] == ["tunnel"] and len(args) == 2 and ":" in args[1]:
        dest: str | None = args[1]
    elif args == ["refuse"]:
        dest = None
    else:
        raise PluginError("ssl_sni_allowlist: arguments are `tunnel HOST:PORT` or `refuse`")
    refused = api.stat_create("plugin.ssl_sni_allowlist.refused")
    tunnelled = api.stat_create("plugin.ssl_sni_allowlist.tunnelled")

    def on_servername(hook: HookID, vc: VConn) -> None:
        name = vc.sni
        ctx = api.ssl_context_find_by_name(name) if name else None
        if ctx is not None:
            vc.reenable()
        elif dest is not None:
            api.stat_increment(tunnelled)
            vc.tunnel(dest)
            vc.reenable()
        else:
            api.stat_increment(refused)
            api.log.debug("refusing sni=%s from %s", name, vc.client_address)
            vc.reenable(error=True)

    api.hook_add(HookID.SSL_SERVERNAME, on_servername)
