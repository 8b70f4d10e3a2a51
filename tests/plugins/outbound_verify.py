"""Test plugin for the origin-side and verify hooks: VCONN_OUTBOUND_START, VCONN_OUTBOUND_CLOSE,
SSL_VERIFY_SERVER and SSL_VERIFY_CLIENT.

``args[0]`` is a file that gets one JSON line per hook call: hook, outbound flag, addresses, SNI,
the peer certificate's CN and the verify error. The other args are ``key=value`` actions:

* ``pause_start=SECONDS``: pause VCONN_OUTBOUND_START, re-enable from ``api.schedule_in``;
* ``fail_start_port=PORT``: ``reenable(error=True)`` in VCONN_OUTBOUND_START for that origin port;
* ``raise_start_port=PORT``: raise in VCONN_OUTBOUND_START for that origin port;
* ``reject_server_cn=CN``: fail SSL_VERIFY_SERVER for an origin certificate with that CN;
* ``pause_verify=SECONDS``: pause SSL_VERIFY_SERVER and SSL_VERIFY_CLIENT that long;
* ``reject_client_cn=CN``: fail SSL_VERIFY_CLIENT for a client certificate with that CN.
"""

from __future__ import annotations

import json
import os
import time

from cryptography.x509.oid import NameOID

from tsproxy.api import HookID, PluginAPI, VConn


def _cn(vc: VConn) -> str | None:
    cert = vc.peer_certificate
    if cert is None:
        return None
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if attrs:
        return str(attrs[0].value)
    return cert.subject.rfc4514_string()


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    path = args[0]
    opts = dict(a.split("=", 1) for a in args[1:])
    pause_start = float(opts.get("pause_start", "0"))
    pause_verify = float(opts.get("pause_verify", "0"))
    fail_port = int(opts.get("fail_start_port", "0"))
    raise_port = int(opts.get("raise_start_port", "0"))
    reject_server = opts.get("reject_server_cn")
    reject_client = opts.get("reject_client_cn")

    def log(hook: HookID, vc: VConn, **extra: object) -> None:
        peer, local = vc.client_address, vc.local_address
        rec = {
            "hook": hook.name,
            "outbound": vc.outbound,
            "peer_port": peer[1] if peer else None,
            "local_port": local[1] if local else None,
            "sni": vc.sni,
            "cn": _cn(vc),
            "verify_error": vc.verify_error,
            "t": time.monotonic(),
            **extra,
        }
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
        finally:
            os.close(fd)

    def finish(vc: VConn, error: bool, delay: float) -> None:
        if delay > 0:
            api.schedule_in(delay, lambda: vc.reenable(error=error))
        else:
            vc.reenable(error=error)

    def on_start(hook: HookID, vc: VConn) -> None:
        port = vc.client_address[1] if vc.client_address else 0
        vc.user_data["started"] = True
        vc.tunnel("127.0.0.1:1")  # meaningless on an origin connection: ignored
        log(hook, vc)
        if port == raise_port:
            raise RuntimeError("outbound start plugin bug")
        finish(vc, port == fail_port, pause_start)

    def on_close(hook: HookID, vc: VConn) -> None:
        log(hook, vc, started=vc.user_data.get("started", False))

    def on_verify_server(hook: HookID, vc: VConn) -> None:
        cn = _cn(vc)
        log(hook, vc, started=vc.user_data.get("started", False))
        finish(vc, reject_server is not None and cn == reject_server, pause_verify)

    def on_verify_client(hook: HookID, vc: VConn) -> None:
        cn = _cn(vc)
        log(hook, vc)
        finish(vc, reject_client is not None and cn == reject_client, pause_verify)

    api.hook_add(HookID.VCONN_OUTBOUND_START, on_start)
    api.hook_add(HookID.VCONN_OUTBOUND_CLOSE, on_close)
    api.hook_add(HookID.SSL_VERIFY_SERVER, on_verify_server)
    api.hook_add(HookID.SSL_VERIFY_CLIENT, on_verify_client)
