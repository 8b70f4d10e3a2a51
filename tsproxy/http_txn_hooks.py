"""The HTTP transaction hook stages of an HttpSM, and the answers a plugin makes (ATS
HttpSM::state_api_callout and TSHttpTxnReenable / TSHttpTxnErrorBodySet).

Theory of operation
-------------------
Each hook state of the SM's ``TransactionMachine`` (READ_REQUEST_HDR, PRE_REMAP, POST_REMAP,
SEND_REQUEST_HDR, READ_RESPONSE_HDR, SEND_RESPONSE_HDR) ends in ``run_hooks``: the worker's
global callbacks of that hook point, then the transaction's own (``Txn.hook_add``), run on the
SM's ``HookChain`` (iocore/net/hook_chain.py), built on the first stage that has callbacks. A
proxy without HTTP plugins never gets here: ``HttpSM.drive`` fires HOOKS_DONE itself when the
worker's hook table and the transaction's hooks are both empty, one truth test per stage.

A callback that returns without re-enabling pauses the chain; its later ``reenable`` schedules
the SM (``HttpSM.handle_event``), which advances the chain and calls ``hooks_ended``. There the
outcome is read: TERMINATE (a raising callback, ``reenable(error=True)``) answers 500; a
``respond()`` answers with the plugin's response (``send_synthetic``); otherwise the machine
goes on. TXN_CLOSE is a notification (``notify_close``): every callback once, however the
transaction ended, without waiting for a reenable.

These are module functions taking the SM (its state stays in the SM's slots) rather than a
helper object, as in http_response.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookOp
from tsproxy.http.parser import BodyMode
from tsproxy.http.transaction import C_NONE, E_HOOK_ERROR, E_HOOKS_DONE, E_RESPOND
from tsproxy.http_response import M_COMPLETED, M_STATUS

if TYPE_CHECKING:
    from tsproxy.http_sm import HttpSM

_log = logging.getLogger("tsproxy.http")

_TXN_CLOSE = HookID.TXN_CLOSE
_TERMINATE = HookOp.TERMINATE
_NONE = BodyMode.NONE
# The hook point of each hook state of the TransactionMachine (None: not a hook state).
_STATE_HOOK: list[HookID | None] = [
    None,
    HookID.READ_REQUEST_HDR,
    HookID.PRE_REMAP,
    None,
    HookID.POST_REMAP,
    None,
    HookID.SEND_REQUEST_HDR,
    None,
    HookID.READ_RESPONSE_HDR,
    HookID.SEND_RESPONSE_HDR,
    None,
    None,
    None,
]


def run_hooks(sm: HttpSM, state: int) -> int:
    """Run the global and per-transaction callbacks of ``state``'s hook point; the command
    after them, or C_NONE while a callback pauses the chain (HttpSM.handle_event resumes it)."""
    hook = _STATE_HOOK[state]
    assert hook is not None
    callbacks = sm.proc.hooks.get(hook)
    txn_hooks = sm.txn_hooks
    if txn_hooks is not None and hook in txn_hooks:
        callbacks = (*callbacks, *txn_hooks[hook])
    if not callbacks:
        return sm.machine.fire(E_HOOKS_DONE)
    chain = sm.chain
    if chain is None:
        chain = sm.chain = HookChain(sm, sm.schedule_resume, hook_error)
    if not chain.start(hook, callbacks):
        return C_NONE
    return hooks_ended(sm, chain)


def hooks_ended(sm: HttpSM, chain: HookChain) -> int:
    """A stage's callbacks are done: its outcome (500, a plugin's answer, or go on)."""
    if sm.closed or chain.closed:
        return C_NONE
    if chain.op is _TERMINATE:
        chain.op = HookOp.DEFAULT
        hook = chain.hook
        sm.machine.fire(E_HOOK_ERROR)
        sm.answer_error(500, f"plugin failed in {hook.name if hook else '?'}", close=True)
        return C_NONE
    if sm.synthetic is not None:
        sm.machine.fire(E_RESPOND)
        send_synthetic(sm)
        return C_NONE
    return sm.machine.fire(E_HOOKS_DONE)


def send_synthetic(sm: HttpSM) -> None:
    """The response a plugin's ``respond()`` set, instead of the origin's."""
    assert sm.synthetic is not None
    status, headers, body = sm.synthetic
    req = sm.request
    close = not sm.client_keep_alive or (
        req is not None and not sm.machine.request_done and req.body is not _NONE
    )
    sm.client_keep_alive = not close
    sm.drop_origin()
    sm.status_sent = status
    client = sm.client
    head_only = req is not None and req.method == b"HEAD"
    client.write_complete(status, headers, body, close=close, head_only=head_only)
    client.write_reenable()
    counters = sm.proc.counters
    metric = M_STATUS.get(status // 100)
    if metric is not None:
        counters[metric] += 1
    counters[M_COMPLETED] += 1
    if close:
        client.discard_input()
    sm.end_transaction()


def notify_close(sm: HttpSM) -> None:
    """TXN_CLOSE: every callback once; reenable is not needed."""
    callbacks = sm.proc.hooks.get(_TXN_CLOSE)
    txn_hooks = sm.txn_hooks
    if txn_hooks is not None and _TXN_CLOSE in txn_hooks:
        callbacks = (*callbacks, *txn_hooks[_TXN_CLOSE])
    chain = sm.chain
    if chain is None:
        chain = HookChain(sm, sm.schedule_resume, hook_error)
    chain.notify(_TXN_CLOSE, callbacks)


def hook_error(hook: HookID, exc: Exception) -> None:
    """A plugin's HTTP hook raised (called from inside the chain's except clause)."""
    if hook is _TXN_CLOSE:
        _log.exception("HTTP %s hook raised", hook.name)
    else:
        _log.exception("HTTP %s hook raised; answering 500", hook.name)


__all__ = ["hook_error", "hooks_ended", "notify_close", "run_hooks", "send_synthetic"]
