"""cert_loader: load certificates lazily from a directory on the first SNI that needs them.

plugin.config::

    plugins.cert_loader /etc/tsproxy/lazy-certs        # holds NAME.pem (chain) + NAME.key

In SSL_CERT, when no ssl_multicert.config line matches the client's SNI (exact or wildcard),
the plugin looks for ``DIR/<sni>.pem`` and ``DIR/<sni>.key``. Reading and parsing them and
building the context (1-3 ms) happens in a helper thread (``api.run_in_thread``) while the
handshake waits paused and the worker's loop serves everyone else; the context is cached, so
later handshakes for that name re-enable at once. Concurrent first handshakes for one name
share one load. A name without files (or with unusable ones, logged) is remembered for
NEGATIVE_TTL seconds and falls back to the configured default certificate. ``tsproxy reload``
forgets both caches (files are re-read on next use).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tsproxy.api import HookID, PluginAPI, PluginError, VConn

NEGATIVE_TTL = 30.0
# A DNS name: letters, digits, hyphens, dots; never a path.
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    if len(args) != 1:
        raise PluginError("cert_loader: one argument, the certificate directory")
    directory = Path(args[0])
    if not directory.is_absolute():
        directory = api.config_dir / directory
    if not directory.is_dir():
        raise PluginError(f"cert_loader: {directory} is not a directory")
    loaded_stat = api.stat_create("plugin.cert_loader.loaded")
    missing_stat = api.stat_create("plugin.cert_loader.missing")

    contexts: dict[str, Any] = {}  # name -> SSL.Context
    missing: dict[str, float] = {}  # name -> monotonic time after which to look again
    waiting: dict[str, list[VConn]] = {}  # name -> handshakes paused on its load

    def load(name: str) -> Any:
        """In the helper thread: the context, or None when the files are not there."""
        pem, key = directory / f"{name}.pem", directory / f"{name}.key"
        if not pem.is_file() or not key.is_file():
            return None
        return api.ssl_context_from_files(pem, key)

    def finish(name: str, result: Any) -> None:
        """Back on the loop: serve every handshake that waited for ``name``."""
        if isinstance(result, BaseException):
            api.log.warning("cert_loader: cannot load the certificate for %s: %s", name, result)
            result = None
        if result is None:
            missing[name] = time.monotonic() + NEGATIVE_TTL
            api.stat_increment(missing_stat)
        else:
            contexts[name] = result
            api.stat_increment(loaded_stat)
        for vc in waiting.pop(name, []):
            if result is not None and not vc.closed:
                vc.set_ssl_context(result)
            vc.reenable()  # harmless when the client went away meanwhile

    def on_cert(hook: HookID, vc: VConn) -> None:
        name = vc.sni
        if not name or not _NAME.match(name) or api.ssl_context_find_by_name(name) is not None:
            vc.reenable()
            return
        ctx = contexts.get(name)
        if ctx is not None:
            vc.set_ssl_context(ctx)
            vc.reenable()
            return
        if missing.get(name, 0.0) > time.monotonic():
            vc.reenable()
            return
        queue = waiting.get(name)
        if queue is not None:
            queue.append(vc)  # a load for this name is already running
            return
        waiting[name] = [vc]
        api.run_in_thread(lambda: load(name), lambda result: finish(name, result))

    def on_reload() -> None:
        contexts.clear()
        missing.clear()

    api.hook_add(HookID.SSL_CERT, on_cert)
    api.on_reload(on_reload)
