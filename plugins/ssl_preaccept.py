"""ssl_preaccept: blind-tunnel TLS clients by source address (ATS ssl_preaccept).

plugin.config::

    plugins.ssl_preaccept 10.0.0.0/8 192.168.1.7 2001:db8::/32 [--tunnel-to HOST:PORT]

In VCONN_START, before a byte is read, a client whose address is in one of the ranges is turned
into a blind tunnel to ``HOST:PORT`` (default: ``proxy.config.tunnel.route``); everyone else is
terminated as usual. IPv4-mapped IPv6 client addresses match IPv4 ranges.
"""

from __future__ import annotations

import ipaddress

from tsproxy.api import HookID, PluginAPI, PluginError, VConn

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_args(args: list[str]) -> tuple[list[Network], str | None]:
    networks: list[Network] = []
    dest: str | None = None
    it = iter(args)
    for arg in it:
        if arg == "--tunnel-to":
            dest = next(it, None)
            if not dest or ":" not in dest:
                raise PluginError("ssl_preaccept: --tunnel-to needs HOST:PORT")
            continue
        try:
            networks.append(ipaddress.ip_network(arg, strict=False))
        except ValueError as exc:
            raise PluginError(f"ssl_preaccept: {arg!r} is not an address range: {exc}") from None
    if not networks:
        raise PluginError("ssl_preaccept: give at least one CIDR range")
    return networks, dest


def matches(networks: list[Network], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks if net.version == addr.version)


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    networks, dest = parse_args(args)
    tunnelled = api.stat_create("plugin.ssl_preaccept.tunnelled")

    def on_start(hook: HookID, vc: VConn) -> None:
        client = vc.client_address
        if client is not None and matches(networks, client[0]):
            api.stat_increment(tunnelled)
            vc.tunnel(dest)
        vc.reenable()

    api.hook_add(HookID.VCONN_START, on_start)
