"""ConfigProcessor: snapshots live exactly as long as someone uses them."""

from __future__ import annotations

import pytest

from iocore.records.config_processor import ConfigHandle, ConfigProcessor


class Table:
    """A stand-in for a certificate table: records when it is freed."""

    def __init__(self, name: str, freed: list[str]) -> None:
        self.name = name
        self._freed = freed

    def on_release(self) -> None:
        self._freed.append(self.name)


def test_ids_are_allocated_and_reused() -> None:
    proc: ConfigProcessor[str] = ConfigProcessor()
    a = proc.set(0, "a")
    b = proc.set(None, "b")
    assert a != b and a > 0 and b > 0
    assert proc.set(a, "a2") == a
    assert proc.get_current(a) == "a2"
    assert proc.get_current(b) == "b"
    with pytest.raises(KeyError):
        proc.acquire(999)


def test_unheld_snapshot_is_dropped_when_replaced() -> None:
    freed: list[str] = []
    proc: ConfigProcessor[Table] = ConfigProcessor()
    cid = proc.set(0, Table("v1", freed))
    proc.set(cid, Table("v2", freed))
    assert freed == ["v1"]
    assert proc.live_snapshots(cid) == 1


def test_replaced_while_held_lives_until_released_then_dropped_once() -> None:
    freed: list[str] = []
    proc: ConfigProcessor[Table] = ConfigProcessor()
    cid = proc.set(0, Table("v1", freed))
    held1 = proc.acquire(cid)
    held2 = proc.acquire(cid)
    proc.set(cid, Table("v2", freed))
    assert freed == []  # in-flight users keep their snapshot
    assert held1.name == "v1"
    assert proc.acquire(cid).name == "v2"  # new users see the new one
    proc.release(cid, held1)
    assert freed == []
    proc.release(cid, held2)
    assert freed == ["v1"]
    with pytest.raises(ValueError, match="not held"):
        proc.release(cid, held2)  # a double release is a bug, not a second drop
    assert freed == ["v1"]


def test_current_snapshot_is_never_dropped_by_release() -> None:
    freed: list[str] = []
    proc: ConfigProcessor[Table] = ConfigProcessor()
    cid = proc.set(0, Table("v1", freed))
    with proc.scoped(cid) as table:
        assert table.name == "v1"
    assert freed == []
    assert proc.get_current(cid).name == "v1"


def test_scoped_releases_on_error_and_reloads_do_not_accumulate() -> None:
    freed: list[str] = []
    proc: ConfigProcessor[Table] = ConfigProcessor()
    cid = proc.set(0, Table("v0", freed))
    with pytest.raises(RuntimeError), proc.scoped(cid):
        proc.set(cid, Table("v1", freed))
        raise RuntimeError("handshake failed")
    assert freed == ["v0"]
    for i in range(2, 100):
        with proc.scoped(cid):
            proc.set(cid, Table(f"v{i}", freed))
    assert proc.live_snapshots(cid) == 1
    assert freed == [f"v{i}" for i in range(99)]  # every old table freed, once, in order


def test_handle_scoped_config_holds_a_replaced_snapshot_until_the_block_ends() -> None:
    freed: list[str] = []
    proc: ConfigProcessor[object] = ConfigProcessor()
    certs: ConfigHandle[Table] = ConfigHandle(proc, "ssl_multicert")
    params: ConfigHandle[Table] = ConfigHandle(proc, "records")
    certs.set(Table("certs1", freed))
    params.set(Table("params1", freed))
    assert certs.config_id != params.config_id
    with certs.scoped_config() as lookup:
        assert lookup.name == "certs1"
        certs.set(Table("certs2", freed))  # a reload while the block runs
        params.set(Table("params2", freed))
        assert freed == ["params1"]  # nobody held it
        assert certs.live_snapshots() == 2
        assert certs.current().name == "certs2"
    assert freed == ["params1", "certs1"]
    held = certs.acquire()
    certs.release(held)
    assert certs.live_snapshots() == 1 and freed == ["params1", "certs1"]
