"""Test plugin: serves the ALPN protocol ``echo/1`` (echoes every byte back, upper-cased), and
with the argument ``enable-unserved`` also offers ``spdy/3.1`` — which nothing serves — from
CLIENT_HELLO."""

from __future__ import annotations

from tsproxy.api import HookID, PluginAPI, ProtocolStream, VConn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    def serve(stream: ProtocolStream) -> None:
        stream.write(b"hi " + (stream.protocol or b"-") + b"\n")

        def on_data(data: bytes) -> None:
            if data.strip() == b"BYE":
                stream.write(b"bye\n")
                stream.close()
            else:
                stream.write(data.upper())

        stream.on_data(on_data)

    api.register_protocol("echo/1", serve)

    if "enable-unserved" in args:

        def on_hello(hook: HookID, vconn: VConn) -> None:
            vconn.protocol_enable(b"spdy/3.1")
            vconn.reenable()

        api.hook_add(HookID.SSL_CLIENT_HELLO, on_hello)

    def on_close(hook: HookID, vconn: VConn) -> None:
        # After the handshake the facade knows what was negotiated.
        api.log.info("closed: alpn=%s version=%s", vconn.protocol, vconn.tls_version)
        vconn.reenable()

    api.hook_add(HookID.VCONN_CLOSE, on_close)
