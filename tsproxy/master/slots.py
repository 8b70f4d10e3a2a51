"""The slot table: which worker process serves each worker slot, and what is in flight.

Theory of operation: the master runs a fixed number of worker slots, ``proxy.config.exec_thread.limit``
ET_NET ones then ``proxy.config.ssl.number.threads`` ET_SSL ones, numbered from 0. A ``Slot``
is one of them and the worker occupying it (pid 0 = none yet, or dead and due for respawn).
A ``Retiree`` is an old worker that ``restart`` replaced: it keeps its control socket and its
stats slot while it drains, and leaves the table when it has exited.

Stats slots vs worker slots: a worker writes its counters without locks, so two live processes
must never share a stats slot, and the old worker keeps counting while it drains. The region
therefore has two stats slots per worker slot; ``Slot.stats_index`` says which one the current
worker uses, and a replacement takes one from ``SlotTable.free_stats``. The drained worker's
slot keeps its counters (sums run over every stats slot, so totals survive restarts); once
that worker has exited its gauges are zeroed and the slot goes back to the free list, where a
later replacement carries its counters on.

The table also holds the one reload and the one restart that may be in flight
(``PendingReload``, ``PendingRestart``), so every part of the master sees whether the other is
busy. The table is plain data; the supervisor, reload, restart and status modules act on it.
"""

from __future__ import annotations

import signal
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from iocore.records.stats import StatsRegion
from tsproxy import control

if TYPE_CHECKING:
    from tsproxy.worker import Listener

ET_NET = "ET_NET"
ET_SSL = "ET_SSL"


def describe_exit(code: int) -> str:
    """``exit status N`` or ``signal SIGNAME``, from ``os.waitstatus_to_exitcode``."""
    return f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"


@dataclass
class Slot:
    """One worker slot and the worker occupying it (pid 0 = none yet)."""

    index: int
    role: str
    listeners: list[Listener]
    pid: int = 0
    sock: socket.socket | None = None
    rbuf: bytearray = field(default_factory=bytearray)
    spawned_mono: float = 0.0
    spawned_wall: float = 0.0
    ready: bool = False
    generation: int = 0
    boot_failures: int = 0
    respawn_at: float | None = None
    proc: psutil.Process | None = None
    stats_index: int = -1  # the stats slot the current worker writes (see "Stats slots")
    rate_key: tuple[int, int] = (0, -1)  # (pid, stats_index) the last sample was taken for
    rate_sample: tuple[float, int, int] | None = None  # (monotonic, handshakes, requests)
    rates: tuple[float, float] | None = None  # handshakes/s, requests/s over the last period

    @property
    def label(self) -> str:
        return f"{self.role}[{self.index}]"

    def send(self, message: dict[str, Any]) -> bool:
        """One control line to the worker; False when it cannot take it (no socket, or gone)."""
        if self.sock is None:
            return False
        try:
            self.sock.send(control.encode_line(message))
        except OSError:
            return False
        return True


@dataclass(eq=False)  # identity: ``in`` / ``remove`` on the retiree list
class Retiree:
    """An old worker replaced by ``restart``: serving until its replacement is ready, then draining."""

    slot: int
    role: str
    pid: int
    stats_index: int
    sock: socket.socket | None
    spawned_mono: float
    spawned_wall: float
    generation: int
    rbuf: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0  # 0: not told to stop yet; else SIGKILL after this monotonic time

    @property
    def label(self) -> str:
        return f"{self.role}[{self.slot}]"


@dataclass
class PendingRestart:
    todo: deque[int]  # worker slots still to restart
    responder: control.Responder | None
    started: float
    current: int | None = None  # the slot whose replacement is booting
    old: Retiree | None = None  # that slot's old worker
    boot_deadline: float = 0.0
    pids: set[int] = field(default_factory=set)  # old workers of this restart not yet exited
    results: list[dict[str, Any]] = field(default_factory=list)
    abort_reason: str | None = None


@dataclass
class PendingReload:
    generation: int
    changed: list[str]
    restart_required: list[str]
    files: list[str]
    plugins: list[str]  # plugin.config changes that need a restart, as messages
    warnings: list[str]  # the new configuration's warnings (as config check prints them)
    waiting: dict[int, int]  # slot index -> pid
    replies: dict[int, dict[str, Any]]
    deadline: float
    responder: control.Responder | None


class SlotTable:
    """The worker slots, the retirees, the stats region and the reload/restart in flight."""

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.retirees: list[Retiree] = []
        self.free_stats: list[int] = []  # stats slots no live process writes
        self.reload: PendingReload | None = None
        self.restart: PendingRestart | None = None
        self._stats: StatsRegion | None = None

    @property
    def region(self) -> StatsRegion:
        """The shared stats region (exists once ``make`` has made the slots)."""
        assert self._stats is not None, "stats region not created yet"
        return self._stats

    def make(self, n_net: int, n_ssl: int, listeners: list[Listener]) -> None:
        """The slots and the stats region. With ET_SSL workers, the ssl ports go to them and the
        plain ports to ET_NET; without, every ET_NET worker accepts on every port."""
        if n_ssl > 0:
            net_listeners = [lst for lst in listeners if not lst.descriptor.ssl]
            ssl_listeners = [lst for lst in listeners if lst.descriptor.ssl]
        else:
            net_listeners, ssl_listeners = list(listeners), []
        roles = [(ET_NET, net_listeners)] * n_net + [(ET_SSL, ssl_listeners)] * n_ssl
        self.slots = [
            Slot(index=i, role=r, listeners=lsts, stats_index=i) for i, (r, lsts) in enumerate(roles)
        ]
        # Twice as many stats slots as workers: a restart's replacement and the old worker it
        # replaces both count while the old one drains (see "Stats slots" above).
        n = len(self.slots)
        self._stats = StatsRegion(max(2 * n, 1))
        self.free_stats = list(range(n, 2 * n))

    def processes(self) -> list[Slot | Retiree]:
        """Every slot and every retiree (a slot's pid is 0 when it has no worker)."""
        return [*self.slots, *self.retirees]

    def count(self, role: str) -> int:
        return sum(s.role == role for s in self.slots)
