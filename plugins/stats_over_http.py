"""stats_over_http: every metric as JSON or Prometheus text (ATS plugin of the same name).

plugin.config::

    plugins.stats_over_http [PATH]        # default path: /_stats

``GET /_stats`` answers JSON ``{"global": {name: value}}`` (ATS's shape); ``GET /_stats?format=prometheus``
or an ``Accept: text/plain`` request gets the Prometheus text format. Values are summed over all
workers. The request never reaches an origin and needs no remap rule.
"""

from __future__ import annotations

import json

from tsproxy.api import HookID, PluginAPI, Txn


def prometheus_text(metrics: list[tuple[str, int]]) -> str:
    lines = []
    for name, value in metrics:
        pname = name.replace(".", "_").replace("-", "_")
        lines.append(f"{pname} {value}")
    return "\n".join(lines) + "\n"


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    path = args[0] if args else "/_stats"

    def on_request(hook: HookID, txn: Txn) -> None:
        req = txn.client_request
        target = req.target
        route, _, query = target.partition("?")
        if route == path and req.method in ("GET", "HEAD"):
            metrics = api.metrics()
            accept = req.headers.get("Accept") or ""
            if "format=prometheus" in query or accept.startswith("text/plain"):
                body = prometheus_text(metrics).encode()
                ctype = "text/plain; version=0.0.4"
            else:
                body = (json.dumps({"global": dict(metrics)}, indent=1) + "\n").encode()
                ctype = "application/json"
            txn.respond(200, {"Content-Type": ctype, "Cache-Control": "no-store"}, body)
        txn.reenable()

    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
