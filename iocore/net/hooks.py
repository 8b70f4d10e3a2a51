"""Hook ids, hook operations and the per-worker hook registry (ATS ts.h TSHttpHookID, InkAPI).

Hook lists belong to a worker's processor (never a module global): the worker builds one
HookRegistry and hands it to everything that fires hooks. ``get`` returns a tuple so firing a
hook with no callbacks costs one dict lookup and no allocation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any


class HookID(enum.IntEnum):
    """Where a plugin can hook in (ATS TS_*_HOOK names without prefix/suffix)."""

    VCONN_START = 1  # TS_VCONN_START_HOOK (old: TS_VCONN_PRE_ACCEPT_HOOK)
    SSL_CLIENT_HELLO = 2
    SSL_SERVERNAME = 3
    SSL_CERT = 4  # == TS_SSL_SNI_HOOK
    VCONN_CLOSE = 5
    VCONN_OUTBOUND_START = 6
    VCONN_OUTBOUND_CLOSE = 7
    SSL_VERIFY_CLIENT = 8
    SSL_VERIFY_SERVER = 9
    READ_REQUEST_HDR = 20
    PRE_REMAP = 21
    POST_REMAP = 22
    SEND_REQUEST_HDR = 23
    READ_RESPONSE_HDR = 24
    SEND_RESPONSE_HDR = 25
    TXN_CLOSE = 26


class HookOp(enum.Enum):
    """What a hook asked the handshake to do next (ATS TSSslVConnOp)."""

    DEFAULT = 0
    TUNNEL = 1
    TERMINATE = 2


HookCallback = Callable[[HookID, Any], None]


class HookRegistry:
    """Callbacks per hook id, in registration order."""

    __slots__ = ("_hooks", "by_id")

    def __init__(self) -> None:
        self._hooks: dict[HookID, tuple[HookCallback, ...]] = {}
        # The same dict, read-only for hot paths: empty means no hook has a callback, so the
        # HTTP state machine skips its hook bookkeeping with one truth test.
        self.by_id = self._hooks

    def add(self, hook: HookID, callback: HookCallback) -> None:
        self._hooks[hook] = (*self._hooks.get(hook, ()), callback)

    def get(self, hook: HookID) -> tuple[HookCallback, ...]:
        return self._hooks.get(hook, ())

    def has(self, hook: HookID) -> bool:
        return hook in self._hooks
