"""Test plugin: reports the cyclic garbage a worker made between two requests.

``GET /_gc/arm`` collects, then keeps whatever later collections find (``gc.DEBUG_SAVEALL``);
``GET /_gc/report`` collects again and answers a JSON object: type name -> objects that only the
cycle collector could free. A closed connection should leave none: everything it owned is freed
by reference counting the moment it closes.

``GET /_gc/count`` answers the worker's live objects that the collector tracks (every container:
instances, lists, dicts, tuples of objects, bound methods), as type name -> count; ``/_gc/ping``
answers ``pong`` from here, so a connection can finish a request without an origin connection.
"""

from __future__ import annotations

import collections
import gc
import json

from tsproxy.api import HookID, PluginAPI, Txn


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    def on_request(hook: HookID, txn: Txn) -> None:
        target = txn.client_request.target
        if target == "/_gc/arm":
            gc.collect()
            gc.garbage.clear()
            gc.set_debug(gc.DEBUG_SAVEALL)
            txn.respond(200, {"Content-Type": "text/plain"}, b"armed\n")
        elif target == "/_gc/report":
            gc.collect()
            counts = collections.Counter(type(obj).__qualname__ for obj in gc.garbage)
            gc.set_debug(0)
            gc.garbage.clear()
            txn.respond(200, {"Content-Type": "application/json"}, json.dumps(counts).encode())
        elif target == "/_gc/count":
            gc.collect()
            counts = collections.Counter(type(obj).__qualname__ for obj in gc.get_objects())
            txn.respond(200, {"Content-Type": "application/json"}, json.dumps(counts).encode())
        elif target == "/_gc/ping":
            txn.respond(200, {"Content-Type": "text/plain"}, b"pong\n")
        txn.reenable()

    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
