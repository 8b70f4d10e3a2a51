"""Shared statistics: workers count in their own slot, the master sees the sums."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iocore.records.errors import TSError
from iocore.records.stats import (
    METRIC_ID,
    METRICS,
    MetricKind,
    SlotRole,
    SlotState,
    StatsRegion,
)

ACCEPTS = METRIC_ID["proxy.process.net.accepts_total"]
OPEN = METRIC_ID["proxy.process.net.connections_currently_open"]


@pytest.fixture
def region() -> Iterator[StatsRegion]:
    r = StatsRegion(3)
    yield r
    r.close()


def run_child(body: Callable[[], object]) -> None:
    """Fork, run ``body()`` in the child, and fail the test if the child did not exit 0."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_forked_workers_count_and_master_sums(region: StatsRegion) -> None:
    def worker(index: int) -> None:
        slot = region.claim_slot(index, os.getpid(), SlotRole.ET_NET, time.monotonic())
        for _ in range(1000):
            slot.counters[ACCEPTS] += 1
        slot.incr(OPEN, 3)
        slot.state = SlotState.RUNNING

    run_child(lambda: worker(1))
    run_child(lambda: worker(2))
    assert region.sum(ACCEPTS) == 2000
    assert region.value_by_name("proxy.process.net.connections_currently_open") == 6
    header = region.slot_header(1)
    assert header.role == SlotRole.ET_NET and header.state == SlotState.RUNNING
    assert header.pid != os.getpid() and header.heartbeat == header.start_time > 0


def test_respawned_worker_gauges_restart_and_counters_survive(region: StatsRegion) -> None:
    slot = region.claim_slot(1, 100, SlotRole.ET_NET, 1.0)
    slot.incr(ACCEPTS, 50)
    slot.incr(OPEN, 7)  # seven connections open when the worker dies
    region.claim_slot(1, 101, SlotRole.ET_NET, 2.0, generation=4)
    assert region.sum(ACCEPTS) == 50
    assert region.sum(OPEN) == 0
    assert region.slot_header(1).pid == 101 and region.slot_header(1).generation == 4


def test_match_is_sorted_and_zero_clears_every_slot(region: StatsRegion) -> None:
    region.slot(0).incr(METRIC_ID["proxy.process.ssl.ssl_total_tlsv13"], 2)
    region.slot(2).incr(METRIC_ID["proxy.process.ssl.ssl_total_tlsv13"], 3)
    region.slot(1).incr(METRIC_ID["proxy.process.ssl.ssl_total_tlsv12"], 1)
    assert region.match(r"ssl_total_tlsv1[23]$") == [
        ("proxy.process.ssl.ssl_total_tlsv12", 1),
        ("proxy.process.ssl.ssl_total_tlsv13", 5),
    ]
    region.zero(METRIC_ID["proxy.process.ssl.ssl_total_tlsv13"])
    assert region.value_by_name("proxy.process.ssl.ssl_total_tlsv13") == 0
    assert len(region.match(".")) == len(METRICS)
    with pytest.raises(KeyError):
        region.value_by_name("proxy.process.no.such.metric")


def test_dynamic_metrics_agree_across_processes(region: StatsRegion) -> None:
    def worker(index: int) -> None:
        hits = region.register_dynamic("plugin.example.hits")
        live = region.register_dynamic("plugin.example.live", MetricKind.GAUGE)
        assert region.register_dynamic("plugin.example.hits") == hits
        slot = region.claim_slot(index, os.getpid(), SlotRole.ET_NET, time.monotonic())
        slot.incr(hits, 10)
        slot.incr(live, 1)

    run_child(lambda: worker(1))
    run_child(lambda: worker(2))
    # the master registered nothing, yet sees the names and the sums
    assert region.match(r"^plugin\.") == [("plugin.example.hits", 20), ("plugin.example.live", 2)]
    region.reset_gauges(1)
    assert region.value_by_name("plugin.example.live") == 1
    assert region.value_by_name("plugin.example.hits") == 20


def test_dynamic_registration_in_another_order_is_refused(region: StatsRegion) -> None:
    run_child(lambda: region.register_dynamic("plugin.a"))
    with pytest.raises(TSError, match="same order"):
        region.register_dynamic("plugin.b")
    with pytest.raises(TSError, match="built-in"):
        region.register_dynamic("proxy.process.http.incoming_requests")


def test_file_backed_region_is_readable_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    master = StatsRegion(2, path=path)
    try:
        master.slot(1).incr(ACCEPTS, 9)
        reader = StatsRegion.attach(path)  # what `tsproxy metric get` does
        try:
            assert reader.n_slots == 2
            assert reader.value_by_name("proxy.process.net.accepts_total") == 9
        finally:
            reader.close()
    finally:
        master.close()
    path.write_bytes(b"junk" * 100)
    with pytest.raises(TSError, match="another tsproxy version"):
        StatsRegion.attach(path)
    with pytest.raises(TSError, match="cannot open"):
        StatsRegion.attach(tmp_path / "missing")
