"""Test plugin: for every request, asks a line-based policy service (args: host port) over a
non-blocking ``api.connect`` from a paused READ_REQUEST_HDR hook, and answers with its reply."""

from __future__ import annotations

from tsproxy.api import HookID, PluginAPI, ProtocolStream, Txn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    host, port = args[0], int(args[1])

    def on_request(hook: HookID, txn: Txn) -> None:
        path = txn.client_request.target
        reply = bytearray()

        def connected(result: ProtocolStream | BaseException) -> None:
            if isinstance(result, BaseException):
                txn.respond(503, {"Content-Type": "text/plain"}, f"policy unreachable: {result}\n")
                txn.reenable()
                return

            def on_data(data: bytes) -> None:
                reply.extend(data)
                if reply.endswith(b"\n"):
                    result.close()
                    txn.respond(200, {"Content-Type": "text/plain"}, bytes(reply))
                    txn.reenable()

            result.on_data(on_data)
            result.write(path.encode() + b"\n")

        api.connect(host, port, connected)

    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
