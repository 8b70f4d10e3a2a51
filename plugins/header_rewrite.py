"""header_rewrite: add, set or remove header fields by simple rules.

plugin.config::

    plugins.header_rewrite header_rewrite.rules      # relative paths: the config directory

The rules file has one rule per line (``#`` starts a comment)::

    request  add    X-Forwarded-Proto https
    request  set    X-Env "production east"
    request  remove Cookie
    response set    Strict-Transport-Security max-age=31536000
    response remove Server

``request`` rules run in READ_REQUEST_HDR (before remap: what remap and the origin see);
``response`` rules run in SEND_RESPONSE_HDR (what the client sees of the origin's answer;
synthetic and error answers made by the proxy are not rewritten). ``add`` appends a field,
``set`` replaces every field of that name with one, ``remove`` drops every field of that name.
The value is the rest of the line; surrounding double quotes are stripped. Rules apply in file
order. A bad line stops start-up with ``FILE:LINE: why``; ``tsproxy reload`` re-reads the
file (a bad file then keeps the previous rules and logs the error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tsproxy.api import HookID, PluginAPI, PluginError, Txn

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SIDES = ("request", "response")
_OPS = ("add", "set", "remove")


@dataclass(frozen=True)
class Rule:
    side: str
    op: str
    name: str
    value: str


def parse_rules(text: str, source: str) -> list[Rule]:
    rules = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        parts = line.split(None, 3)
        if len(parts) < 3:
            raise PluginError(f"{where}: expected `request|response add|set|remove NAME [VALUE]`")
        side, op, name = parts[0].lower(), parts[1].lower(), parts[2]
        value = parts[3].strip() if len(parts) > 3 else ""
        if side not in _SIDES:
            raise PluginError(f"{where}: unknown direction {parts[0]!r} (request or response)")
        if op not in _OPS:
            raise PluginError(f"{where}: unknown operation {parts[1]!r} (add, set or remove)")
        if not _TOKEN.match(name):
            raise PluginError(f"{where}: {name!r} is not a valid header field name")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if op == "remove" and value:
            raise PluginError(f"{where}: remove takes no value")
        if op != "remove" and not value:
            raise PluginError(f"{where}: {op} needs a value")
        if any(c in value for c in "\r\n\0"):
            raise PluginError(f"{where}: the value contains a control character")
        rules.append(Rule(side, op, name, value))
    return rules


def load_rules(path: Path) -> list[Rule]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PluginError(f"header_rewrite: cannot read {path}: {exc.strerror or exc}") from None
    return parse_rules(text, str(path))


def plugin_init(api: PluginAPI, args: list[str]) -> None:
    if len(args) != 1:
        raise PluginError("header_rewrite: one argument, the rules file")
    path = Path(args[0])
    if not path.is_absolute():
        path = api.config_dir / path
    rules = load_rules(path)
    state = {
        "request": [r for r in rules if r.side == "request"],
        "response": [r for r in rules if r.side == "response"],
    }

    def apply(side: str, txn: Txn) -> None:
        if side == "request":
            headers = txn.client_request.headers
        else:
            response = txn.server_response
            if response is None:
                return
            headers = response.headers
        for rule in state[side]:
            if rule.op == "add":
                headers.add(rule.name, rule.value)
            elif rule.op == "set":
                headers.set(rule.name, rule.value)
            else:
                headers.remove(rule.name)

    def on_request(hook: HookID, txn: Txn) -> None:
        apply("request", txn)
        txn.reenable()

    def on_response(hook: HookID, txn: Txn) -> None:
        apply("response", txn)
        txn.reenable()

    def on_reload() -> None:
        try:
            new = load_rules(path)
        except PluginError as exc:
            api.log.error("header_rewrite: keeping the previous rules: %s", exc)
            return
        state["request"] = [r for r in new if r.side == "request"]
        state["response"] = [r for r in new if r.side == "response"]

    api.hook_add(HookID.READ_REQUEST_HDR, on_request)
    api.hook_add(HookID.SEND_RESPONSE_HDR, on_response)
    api.on_reload(on_reload)
