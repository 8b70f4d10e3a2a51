"""EThread's pollers: readiness reaches the registered callback, with either implementation."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from iocore.eventsystem import ethread
from iocore.eventsystem.ethread import EThread
from iocore.eventsystem.event import EVENT_IMMEDIATE, Continuation

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
POLLERS = [ethread._SelectorsPoller] + ([ethread._EpollPoller] if ethread._HAVE_EPOLL else [])


@pytest.fixture(params=POLLERS, ids=lambda cls: cls.__name__)
def thread(request: pytest.FixtureRequest) -> Iterator[EThread]:
    t = EThread()
    t.poller.close()
    t.poller = request.param()
    yield t
    t.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_read_write_modify_unregister(thread: EThread, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen: list[int] = []
    thread.register(a.fileno(), READ, seen.append)
    thread.run_once(max_wait=0.0)
    assert seen == []  # nothing to read yet
    b.send(b"x")
    thread.run_once(max_wait=0.5)
    assert seen == [READ]
    thread.modify(a.fileno(), READ | WRITE, seen.append)
    seen.clear()
    thread.run_once(max_wait=0.5)
    assert seen == [READ | WRITE]
    thread.modify(a.fileno(), WRITE, seen.append)
    seen.clear()
    thread.run_once(max_wait=0.5)
    assert seen == [WRITE]  # the unread byte no longer wakes it
    thread.unregister(a.fileno())
    thread.unregister(a.fileno())  # twice is harmless
    seen.clear()
    thread.run_once(max_wait=0.0)
    assert seen == []


def test_double_register_is_an_error(thread: EThread, pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    thread.register(a.fileno(), READ, lambda mask: None)
    with pytest.raises((KeyError, ValueError)):
        thread.register(a.fileno(), READ, lambda mask: None)


def test_peer_close_wakes_a_reader(thread: EThread, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen: list[int] = []
    thread.register(a.fileno(), READ, seen.append)
    b.close()
    thread.run_once(max_wait=0.5)
    assert seen and seen[0] & READ
    assert a.recv(1) == b""


def test_a_callback_raising_does_not_stop_the_others(
    thread: EThread, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    c, d = socket.socketpair()
    with c, d:
        seen: list[str] = []

        def boom(mask: int) -> None:
            seen.append("boom")
            raise RuntimeError("plugin bug")

        thread.register(a.fileno(), READ, boom)
        thread.register(c.fileno(), READ, lambda mask: seen.append("ok"))
        b.send(b"x")
        d.send(b"y")
        thread.run_once(max_wait=0.5)
        assert sorted(seen) == ["boom", "ok"]


def test_an_event_scheduled_by_a_ready_callback_does_not_wait_for_the_poll(thread: EThread) -> None:
    """Work queued while the ready lists run must keep the poll from sleeping: before, an
    immediate event scheduled there waited for the poll's whole timeout (the next timer)."""
    ran: list[int] = []
    cont = Continuation(lambda event, data: ran.append(event) or 0)
    queued = [False]

    def ready_list() -> bool:
        if not queued[0]:
            queued[0] = True
            thread.schedule_imm(cont)
        return False  # nothing of its own left: only the immediate event is pending

    thread.ready_callbacks.append(ready_list)
    start = time.monotonic()
    thread.run_once(max_wait=30.0)  # the old loop slept the whole 30 s in this poll
    assert time.monotonic() - start < 10.0
    thread.run_once(max_wait=0.0)
    assert ran == [EVENT_IMMEDIATE]
