"""The origin resolver: answers from its cache or an IP literal at once, resolves names in a
thread and calls back on the loop, expires entries like ATS HostDB (timeout, serve_stale_for,
fail.timeout). getaddrinfo and the clock are injected; the loop is a real EThread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from iocore.eventsystem.ethread import EThread
from iocore.eventsystem.event import Continuation
from iocore.records.parser import RecordsConfig
from tsproxy.resolver import AddrInfo, Resolver, ResolveResult

NXDOMAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class FakeDNS:
    """getaddrinfo with a table of answers, a call log and an optional gate to hold calls."""

    def __init__(self) -> None:
        self.answers: dict[str, str | BaseException] = {}
        self.calls: list[tuple[str, int]] = []
        self.threads: set[int] = set()
        self.gate: threading.Event | None = None
        self.delay = 0.0
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int, *, type: int = 0) -> list[AddrInfo]:
        with self._lock:
            self.calls.append((host, port))
            self.threads.add(threading.get_ident())
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        answer = self.answers.get(host, NXDOMAIN)
        if isinstance(answer, BaseException):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def loop() -> Iterator[EThread]:
    thread = EThread()
    yield thread
    thread.close()


@pytest.fixture
def dns() -> FakeDNS:
    return FakeDNS()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(loop: EThread, dns: FakeDNS, clock: Clock, tmp_path: Path) -> Iterator[Callable[..., Resolver]]:
    made: list[Resolver] = []

    def factory(**records: int) -> Resolver:
        values = {f"proxy.config.hostdb.{k.replace('__', '.')}": v for k, v in records.items()}
        resolver = Resolver(loop, RecordsConfig.from_values(tmp_path, values), getaddrinfo=dns, now=clock)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        resolver.close()


def run_until(loop: EThread, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the loop did not get there in time"
        loop.run_once(0.05)


class Answers:
    """A lookup callback that records what it got and on which thread."""

    def __init__(self) -> None:
        self.results: list[ResolveResult] = []
        self.threads: list[int] = []

    def __call__(self, result: ResolveResult) -> None:
        self.results.append(result)
        self.threads.append(threading.get_ident())


def resolve(loop: EThread, resolver: Resolver, host: str, port: int = 80) -> ResolveResult:
    """lookup, and when it goes to a thread, run the loop until the callback came."""
    got = Answers()
    now = resolver.lookup(host, port, got)
    if now is not None:
        assert not got.results
        return now
    run_until(loop, lambda: bool(got.results))
    return got.results[0]


def test_ip_literals_answer_at_once(make: Callable[..., Resolver], dns: FakeDNS) -> None:
    resolver = make()
    got = Answers()
    assert resolver.lookup("192.0.2.7", 443, got) == ResolveResult(socket.AF_INET, ("192.0.2.7", 443))
    assert resolver.lookup("2001:db8::1", 80, got) == ResolveResult(
        socket.AF_INET6, ("2001:db8::1", 80, 0, 0)
    )
    assert resolver.resolve_cached("127.0.0.1", 8080) == ResolveResult(socket.AF_INET, ("127.0.0.1", 8080))
    assert not dns.calls and not got.results


def test_a_miss_resolves_in_a_thread_and_calls_back_on_the_loop(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS
) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    resolver = make()
    got = Answers()
    assert resolver.lookup("origin.test", 8080, got) is None
    assert not got.results  # never from inside lookup
    run_until(loop, lambda: bool(got.results))
    assert got.results == [ResolveResult(socket.AF_INET, ("192.0.2.10", 8080))]
    loop_thread = threading.get_ident()
    assert got.threads == [loop_thread]
    assert dns.threads and loop_thread not in dns.threads  # getaddrinfo ran elsewhere
    # Now a hit: synchronous, no second query.
    assert resolver.lookup("origin.test", 8080, got) == got.results[0]
    assert dns.calls == [("origin.test", 8080)]


def test_concurrent_lookups_of_one_name_share_one_query(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS
) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    dns.gate = threading.Event()
    resolver = make()
    callbacks = [Answers() for _ in range(3)]
    for got in callbacks:
        assert resolver.lookup("origin.test", 80, got) is None
    dns.gate.set()
    run_until(loop, lambda: all(got.results for got in callbacks))
    assert dns.calls == [("origin.test", 80)]
    assert {got.results[0] for got in callbacks} == {ResolveResult(socket.AF_INET, ("192.0.2.10", 80))}


def test_an_entry_expires_after_hostdb_timeout(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS, clock: Clock
) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    resolver = make(timeout=10)
    resolve(loop, resolver, "origin.test")
    clock.t += 9.9
    assert resolver.lookup("origin.test", 80, Answers()) is not None
    dns.answers["origin.test"] = "192.0.2.11"
    clock.t += 0.2  # 10.1 s old, serve_stale_for 0: wait for the new answer
    assert resolver.lookup("origin.test", 80, Answers()) is None
    assert resolve(loop, resolver, "origin.test").addr == ("192.0.2.11", 80)
    assert len(dns.calls) == 2


def test_stale_is_served_within_serve_stale_for_while_it_is_refreshed(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS, clock: Clock
) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    resolver = make(timeout=10, serve_stale_for=30)
    resolve(loop, resolver, "origin.test")
    dns.answers["origin.test"] = "192.0.2.11"
    dns.gate = threading.Event()
    clock.t += 15  # expired 5 s ago: inside the window
    got = Answers()
    old = ResolveResult(socket.AF_INET, ("192.0.2.10", 80))
    assert resolver.lookup("origin.test", 80, got) == old
    assert resolver.lookup("origin.test", 80, got) == old  # joins the refresh under way
    dns.gate.set()
    run_until(loop, lambda: ("origin.test", 80) not in resolver._inflight)
    assert len(dns.calls) == 2  # one refresh for both stale lookups
    assert resolver.lookup("origin.test", 80, got) == ResolveResult(socket.AF_INET, ("192.0.2.11", 80))
    assert not got.results  # the stale lookups were answered at once, never called back
    # Past timeout + serve_stale_for the lookup waits.
    clock.t += 10 + 30 + 1
    assert resolver.lookup("origin.test", 80, got) is None
    run_until(loop, lambda: bool(got.results))


def test_a_failed_refresh_keeps_the_stale_address_for_the_window(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS, clock: Clock
) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    resolver = make(timeout=10, serve_stale_for=30, fail__timeout=5)
    resolve(loop, resolver, "origin.test")
    del dns.answers["origin.test"]
    clock.t += 15
    stale = ResolveResult(socket.AF_INET, ("192.0.2.10", 80))
    assert resolver.lookup("origin.test", 80, Answers()) == stale
    run_until(loop, lambda: ("origin.test", 80) not in resolver._inflight)
    clock.t += 1  # the refresh failed 1 s ago: still stale, no new query before fail.timeout
    assert resolver.lookup("origin.test", 80, Answers()) == stale
    assert len(dns.calls) == 2
    clock.t += 5
    assert resolver.lookup("origin.test", 80, Answers()) == stale
    run_until(loop, lambda: len(dns.calls) == 3)


def test_a_failure_is_remembered_for_fail_timeout(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS, clock: Clock
) -> None:
    resolver = make(fail__timeout=5)
    failed = resolve(loop, resolver, "nx.test")
    assert failed == ResolveResult(
        socket.AF_UNSPEC, (), "cannot resolve origin nx.test: Name or service not known"
    )
    clock.t += 4
    assert resolver.lookup("nx.test", 80, Answers()) == failed  # at once, from the cache
    assert len(dns.calls) == 1
    clock.t += 2
    assert resolver.lookup("nx.test", 80, Answers()) is None
    run_until(loop, lambda: len(dns.calls) == 2)


def test_with_ats_defaults_a_failure_is_not_remembered(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS
) -> None:
    resolver = make()  # fail.timeout 0, as ATS
    assert resolve(loop, resolver, "nx.test").error is not None
    assert resolver.lookup("nx.test", 80, Answers()) is None
    assert resolver.timeout == 86400


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (NXDOMAIN, "Name or service not known"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "Temporary failure"),
        (UnicodeError("label too long"), "label too long"),
        (ValueError("embedded null character"), "embedded null character"),
    ],
)
def test_error_text(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS, answer: BaseException, reason: str
) -> None:
    dns.answers["bad.test"] = answer
    error = resolve(loop, make(), "bad.test").error
    assert error is not None and error.startswith(f"cannot resolve origin bad.test: {reason}"), error


def test_resolve_cached_blocks_and_fills_the_cache(make: Callable[..., Resolver], dns: FakeDNS) -> None:
    dns.answers["origin.test"] = "192.0.2.10"
    resolver = make()
    assert resolver.resolve_cached("origin.test", 80).addr == ("192.0.2.10", 80)
    assert resolver.lookup("origin.test", 80, Answers()) is not None
    assert (
        resolver.resolve_cached("nx.test", 80).error
        == "cannot resolve origin nx.test: Name or service not known"
    )
    assert len(dns.calls) == 2


def test_a_slow_resolution_does_not_block_the_loop(
    make: Callable[..., Resolver], loop: EThread, dns: FakeDNS
) -> None:
    dns.answers["slow.test"] = "192.0.2.10"
    dns.delay = 0.5
    resolver = make()
    fired: list[float] = []

    class Timer(Continuation):
        def __init__(self) -> None:
            super().__init__(self.fire)

        def fire(self, event: int, data: Any) -> None:
            fired.append(time.monotonic())

    got = Answers()
    start = time.monotonic()
    assert resolver.lookup("slow.test", 80, got) is None
    loop.schedule_in(Timer(), 0.1)
    run_until(loop, lambda: bool(got.results))
    done = time.monotonic()
    assert fired and fired[0] - start < 0.3, "the timer waited for getaddrinfo"
    assert done - start >= 0.5 and got.results[0].addr == ("192.0.2.10", 80)
