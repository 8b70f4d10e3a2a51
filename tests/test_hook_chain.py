"""HookChain, the one hook runner: callbacks in order, pause until reenable, errors, close.

Sans-IO: the callbacks are plain functions and ``resume`` records that the owner would have been
put back on the loop; no sockets, no event loop.
"""

from __future__ import annotations

from typing import Any

import pytest

from iocore.net.hook_chain import HookChain
from iocore.net.hooks import HookID, HookOp

H = HookID.SSL_CERT


class Owner:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.resumes = 0
        self.errors: list[tuple[HookID, Exception]] = []
        self.chain = HookChain(self, self.resume, lambda hook, exc: self.errors.append((hook, exc)))

    def resume(self) -> None:
        self.resumes += 1

    def cb(self, name: str, *, reenable: bool = True, error: bool = False) -> Any:
        def callback(hook: HookID, subject: Any) -> None:
            assert subject is self
            self.calls.append(f"{name}:{hook.name}")
            if reenable:
                self.chain.reenable(error=error)

        return callback


def test_hook_chain_runs_callbacks_in_order_once() -> None:
    o = Owner()
    assert o.chain.start(H, (o.cb("a"), o.cb("b"), o.cb("c"))) is True
    assert o.calls == ["a:SSL_CERT", "b:SSL_CERT", "c:SSL_CERT"]
    assert o.chain.op is HookOp.DEFAULT
    assert not o.chain.running
    assert o.chain.advance() is True  # nothing left: no callback runs twice
    assert len(o.calls) == 3
    assert o.resumes == 0  # every reenable was synchronous


def test_hook_chain_empty_list_finishes_at_once() -> None:
    o = Owner()
    assert o.chain.start(H, ()) is True
    assert o.calls == [] and not o.chain.active


def test_hook_chain_pauses_until_async_reenable() -> None:
    o = Owner()
    assert o.chain.start(H, (o.cb("a", reenable=False), o.cb("b"))) is False
    assert o.calls == ["a:SSL_CERT"] and o.chain.active and o.chain.running
    assert o.chain.advance() is False  # still paused: advancing early does nothing
    assert o.calls == ["a:SSL_CERT"]
    assert o.chain.reenable() is True
    assert o.resumes == 1  # the owner is told to continue from its loop
    assert o.chain.advance() is True
    assert o.calls == ["a:SSL_CERT", "b:SSL_CERT"]


def test_hook_chain_reenable_exactly_once() -> None:
    o = Owner()
    o.chain.start(H, (o.cb("a", reenable=False), o.cb("b", reenable=False)))
    assert o.chain.reenable() is True
    assert o.chain.reenable() is False  # a second reenable for the same callback is ignored
    assert o.resumes == 1
    assert o.chain.advance() is False  # b paused
    assert o.calls == ["a:SSL_CERT", "b:SSL_CERT"]


def test_hook_chain_reenable_without_pause_is_ignored() -> None:
    o = Owner()
    assert o.chain.reenable() is False
    assert o.resumes == 0 and o.chain.op is HookOp.DEFAULT


def test_hook_chain_error_reenable_terminates_and_skips_the_rest() -> None:
    o = Owner()
    assert o.chain.start(H, (o.cb("a", error=True), o.cb("b"))) is True
    assert o.calls == ["a:SSL_CERT"]
    assert o.chain.op is HookOp.TERMINATE


def test_hook_chain_async_error_reenable_terminates() -> None:
    o = Owner()
    o.chain.start(H, (o.cb("a", reenable=False), o.cb("b")))
    o.chain.reenable(error=True)
    assert o.chain.advance() is True
    assert o.calls == ["a:SSL_CERT"] and o.chain.op is HookOp.TERMINATE


def test_hook_chain_raising_callback_is_an_error_not_a_crash() -> None:
    o = Owner()

    def boom(hook: HookID, subject: Any) -> None:
        raise RuntimeError("plugin bug")

    assert o.chain.start(H, (boom, o.cb("b"))) is True
    assert o.chain.op is HookOp.TERMINATE and not o.chain.active
    assert [(h, str(e)) for h, e in o.errors] == [(H, "plugin bug")]
    assert o.calls == []


def test_hook_chain_tunnel_request_persists_across_runs() -> None:
    o = Owner()

    def tunnel(hook: HookID, subject: Any) -> None:
        o.chain.request_tunnel("origin.example:443")
        o.chain.reenable()

    assert o.chain.start(HookID.SSL_CLIENT_HELLO, (tunnel,)) is True
    assert o.chain.start(HookID.SSL_SERVERNAME, (o.cb("b"),)) is True
    assert o.chain.op is HookOp.TUNNEL
    assert o.chain.tunnel_destination == "origin.example:443"
    assert o.calls == ["b:SSL_SERVERNAME"]


def test_hook_chain_stop_ends_run_after_current_callback() -> None:
    o = Owner()

    def answer(hook: HookID, subject: Any) -> None:
        o.calls.append("answer")
        o.chain.stop()  # e.g. a transaction hook that answered locally

    assert o.chain.start(H, (answer, o.cb("b"))) is False  # answer has not re-enabled yet
    o.chain.reenable()
    assert o.chain.advance() is True
    assert o.calls == ["answer"] and o.chain.op is HookOp.DEFAULT


def test_hook_chain_close_while_paused_ts4075() -> None:
    o = Owner()
    o.chain.start(H, (o.cb("a", reenable=False), o.cb("b")))
    assert o.chain.close() is True  # a callback was paused: the owner reports failure itself
    assert o.chain.reenable() is False  # the plugin's late reenable touches nothing
    assert o.resumes == 0
    assert o.chain.advance() is True
    assert o.calls == ["a:SSL_CERT"]  # b never ran on a closed subject
    assert o.chain.close() is False  # closing twice: nothing was paused


def test_hook_chain_close_when_idle_reports_no_pause() -> None:
    o = Owner()
    o.chain.start(H, (o.cb("a"),))
    assert o.chain.close() is False
    assert o.chain.start(H, (o.cb("b"),)) is True
    assert o.calls == ["a:SSL_CERT"]


def test_hook_chain_close_from_inside_a_callback() -> None:
    o = Owner()

    def closes(hook: HookID, subject: Any) -> None:
        o.calls.append("closes")
        o.chain.close()

    assert o.chain.start(H, (closes, o.cb("b"))) is True
    assert o.calls == ["closes"]


def test_hook_chain_append_during_run_runs_the_new_callback() -> None:
    o = Owner()

    def adds(hook: HookID, subject: Any) -> None:
        o.chain.append(o.cb("late"))
        o.chain.reenable()

    assert o.chain.start(HookID.READ_REQUEST_HDR, (adds,)) is True
    assert o.calls == ["late:READ_REQUEST_HDR"]
    o.chain.append(o.cb("never"))  # no run in progress: nothing to add to
    assert o.chain.start(HookID.READ_REQUEST_HDR, ()) is True
    assert o.calls == ["late:READ_REQUEST_HDR"]


def test_hook_chain_notify_calls_every_callback_and_survives_errors() -> None:
    o = Owner()

    def boom(hook: HookID, subject: Any) -> None:
        raise ValueError("x")

    o.chain.notify(HookID.VCONN_CLOSE, (o.cb("a", reenable=False), boom, o.cb("c", reenable=False)))
    assert o.calls == ["a:VCONN_CLOSE", "c:VCONN_CLOSE"]
    assert not o.chain.active and o.chain.op is HookOp.DEFAULT
    assert len(o.errors) == 1


@pytest.mark.parametrize("pause_at", [0, 1, 2])
def test_hook_chain_each_callback_may_pause(pause_at: int) -> None:
    o = Owner()
    cbs = tuple(o.cb(str(i), reenable=i != pause_at) for i in range(3))
    assert o.chain.start(H, cbs) is False
    assert len(o.calls) == pause_at + 1
    o.chain.reenable()
    assert o.chain.advance() is True
    assert [c.split(":")[0] for c in o.calls] == ["0", "1", "2"]
