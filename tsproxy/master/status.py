"""The ``status`` and ``metric.*`` control methods: what the master reports about its workers.

Theory of operation: ``status`` is built on demand from the slot table, the stats region and
psutil: per worker, its slot, pid, readiness, uptime, CPU and RSS, open connections, config
generation (the newer of what the master sent and what the worker wrote in its stats slot) and
ports; per retiree (an old worker draining after a restart), its connections and whether it
has been told to stop. CPU is psutil's percentage since the last call, or the lifetime average
on the first call for a process.

Rates are per worker process: every ``RATE_PERIOD`` the supervisor's tick calls
``maybe_sample``, which reads each worker's handshake and request counters; ``status`` reports
the last period's rate, and none for a process younger than one period or a period in which
``metric zero`` ran (a negative delta).

``metric.get`` / ``metric.zero`` / ``metric.match`` read (or zero) sums over every stats slot,
so totals survive worker restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import TYPE_CHECKING, Any

import psutil

from iocore.records.stats import METRIC_ID
from tsproxy import control
from tsproxy.exitcodes import EX_DATAERR

if TYPE_CHECKING:
    from tsproxy.master.state import MasterState

CONNECTIONS_METRIC = "proxy.process.net.connections_currently_open"
HANDSHAKES_METRIC = "proxy.process.ssl.total_success_handshake_count_in"
REQUESTS_METRIC = "proxy.process.http.incoming_requests"
RATE_PERIOD = 1.0  # seconds between the master's samples of each worker's counters


class Status:
    """Answers ``status`` and ``metric.*`` from the shared state; samples the worker rates."""

    def __init__(self, state: MasterState) -> None:
        self.state = state
        self._proc = psutil.Process()
        self._next_sample = 0.0

    def prime(self) -> None:
        """At boot: start the master's CPU measurement."""
        self._proc.cpu_percent(None)

    def maybe_sample(self, now: float) -> None:
        """Sample the rates when RATE_PERIOD has passed since the last sample."""
        if now >= self._next_sample:
            self._next_sample = now + RATE_PERIOD
            self._sample_rates(now)

    def _sample_rates(self, now: float) -> None:
        """Per worker process: handshakes/s and requests/s over the last RATE_PERIOD."""
        hs_id, req_id = METRIC_ID[HANDSHAKES_METRIC], METRIC_ID[REQUESTS_METRIC]
        table = self.state.table
        for slot in table.slots:
            if not slot.pid:
                slot.rate_key, slot.rate_sample, slot.rates = (0, -1), None, None
                continue
            stats = table.region.slot(slot.stats_index)
            sample = (now, stats.get(hs_id), stats.get(req_id))
            prev = slot.rate_sample
            key = (slot.pid, slot.stats_index)
            if prev is not None and slot.rate_key == key and sample[0] > prev[0]:
                dt = sample[0] - prev[0]
                d_hs, d_req = sample[1] - prev[1], sample[2] - prev[2]
                # A negative delta means ``metric zero`` ran: no honest rate for that period.
                slot.rates = (d_hs / dt, d_req / dt) if d_hs >= 0 and d_req >= 0 else None
            else:
                slot.rates = None  # a new process: its first rate comes one period later
            slot.rate_key, slot.rate_sample = key, sample

    def metric(self, method: str, params: dict[str, Any], responder: control.Responder) -> None:
        region = self.state.table.region
        if method == "metric.match":
            regex = params.get("regex")
            if not isinstance(regex, str):
                responder.error(control.INVALID_PARAMS, "metric.match needs a 'regex' string")
                return
            try:
                metrics = region.match(regex)
            except re.error as exc:
                message = f"bad regex {regex!r}: {exc}"
                responder.error(control.INVALID_PARAMS, message, {"exit_code": EX_DATAERR})
                return
            responder.result({"metrics": [[name, value] for name, value in metrics]})
            return
        names = params.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            responder.error(control.INVALID_PARAMS, f"{method} needs a non-empty 'names' list")
            return
        ids: list[int] = []
        unknown: list[str] = []
        for name in names:
            try:
                ids.append(region.metric_id(name))
            except KeyError:
                unknown.append(name)
        if unknown:
            message = f"unknown metric {', '.join(unknown)}"
            responder.error(control.E_NOT_FOUND, message, {"exit_code": EX_DATAERR})
            return
        if method == "metric.zero":
            for metric_id in ids:
                region.zero(metric_id)
        responder.result({"metrics": [[n, region.sum(i)] for n, i in zip(names, ids, strict=True)]})

    def status(self) -> dict[str, Any]:
        state, table = self.state, self.state.table
        now = time.time()
        master = {
            "role": "master",
            "pid": os.getpid(),
            "uptime": now - state.started_wall,
            "cpu_percent": self._cpu(self._proc, state.started_wall),
            "rss": self._rss(self._proc),
            "connections": None,
            "generation": state.generation,
        }
        workers = []
        for slot in table.slots:
            entry: dict[str, Any] = {
                "slot": slot.index,
                "role": slot.role,
                "pid": slot.pid or None,
                "ready": slot.ready,
                "uptime": now - slot.spawned_wall if slot.pid else None,
                "cpu_percent": None,
                "rss": None,
                "connections": None,
                "handshakes_per_s": None,
                "requests_per_s": None,
                "generation": slot.generation,
                "stats_slot": slot.stats_index,
                "ports": [lst.descriptor.describe() for lst in slot.listeners],
            }
            if slot.pid:
                if slot.proc is None or slot.proc.pid != slot.pid:
                    with contextlib.suppress(psutil.Error):
                        slot.proc = psutil.Process(slot.pid)
                        slot.proc.cpu_percent(None)
                if slot.proc is not None:
                    entry["cpu_percent"] = self._cpu(slot.proc, slot.spawned_wall)
                    entry["rss"] = self._rss(slot.proc)
                stats = table.region.slot(slot.stats_index)
                entry["connections"] = stats.get(METRIC_ID[CONNECTIONS_METRIC])
                entry["generation"] = max(slot.generation, stats.generation)
                if slot.rates is not None and slot.rate_key == (slot.pid, slot.stats_index):
                    entry["handshakes_per_s"] = round(slot.rates[0], 1)
                    entry["requests_per_s"] = round(slot.rates[1], 1)
            workers.append(entry)
        draining = [
            {
                "slot": r.slot,
                "role": r.role,
                "pid": r.pid,
                "uptime": now - r.spawned_wall,
                "connections": table.region.slot(r.stats_index).get(METRIC_ID[CONNECTIONS_METRIC]),
                "stats_slot": r.stats_index,
                "stopping": bool(r.deadline),
            }
            for r in table.retirees
        ]
        return {
            "config_dir": str(state.config_dir),
            "generation": state.generation,
            "stopping": state.stopping,
            "restarting": table.restart is not None,
            "rate_period": RATE_PERIOD,
            "master": master,
            "workers": workers,
            "draining": draining,
        }

    @staticmethod
    def _cpu(proc: psutil.Process, started_wall: float) -> float | None:
        try:
            value = float(proc.cpu_percent(None))
            if value == 0.0:  # first sample: fall back to the lifetime average
                times = proc.cpu_times()
                value = 100.0 * (times.user + times.system) / max(time.time() - started_wall, 1e-3)
            return round(value, 1)
        except psutil.Error:
            return None

    @staticmethod
    def _rss(proc: psutil.Process) -> int | None:
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return None
