"""ConfigProcessor: reference-counted configuration snapshots (after ATS's ConfigProcessor).

Theory of operation: a subsystem that can be reloaded (the certificate table, remap rules,
the records themselves) keeps its configuration as immutable snapshot objects under one
integer id. ``set`` installs a new current snapshot; code that needs one for a while (a
handshake, a transaction) ``acquire``s it and ``release``s it when done, or uses
``scoped``. A snapshot that is replaced while someone holds it stays alive, and usable, until
the last holder releases it; then it is dropped exactly once, calling its ``on_release()``
method if it has one (to free SSL contexts, close files). A snapshot nobody holds is dropped
as soon as it is replaced. The current snapshot is never dropped.

States of one snapshot: CURRENT (refcount >= 0) -> RETIRED (refcount > 0) -> DROPPED.

There are no locks: each process runs one event loop on one thread, and each owns its own
ConfigProcessor (handed to whoever needs it, never a module global).

The module is compiled (setup.py): every HTTP transaction acquires and releases its
``HttpConfig`` here, which then costs two native calls and a dict lookup each way.

``ConfigHandle`` is one subsystem's id in a processor, as ATS's ``SSLConfig`` and
``SSLCertificateConfig`` wrap their ``configid``: ``set`` / ``acquire`` / ``release`` and
``scoped_config()`` (ATS ``SSLCertificateConfig::scoped_config lookup;``) without passing the id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Snapshot(Generic[T]):
    __slots__ = ("obj", "refcount")

    def __init__(self, obj: T) -> None:
        self.obj = obj
        self.refcount = 0


class ConfigProcessor(Generic[T]):
    """Snapshots by id; ``ConfigProcessor[Any]`` when one processor holds several kinds."""

    def __init__(self) -> None:
        self._next_id = 1
        self._current: dict[int, _Snapshot[T]] = {}
        self._retired: dict[int, list[_Snapshot[T]]] = {}

    def set(self, config_id: int | None, obj: T) -> int:
        """Install ``obj`` as the current snapshot of ``config_id`` (0/None: a new id)."""
        if not config_id:
            config_id = self._next_id
            self._next_id += 1
        elif config_id >= self._next_id:
            self._next_id = config_id + 1
        old = self._current.get(config_id)
        if old is not None and old.obj is obj:
            return config_id
        self._current[config_id] = _Snapshot(obj)
        if old is not None:
            if old.refcount == 0:
                _drop(old)
            else:
                self._retired.setdefault(config_id, []).append(old)
        return config_id

    def get_current(self, config_id: int) -> T:
        """The current snapshot without taking a reference (for a quick look only)."""
        return self._current[config_id].obj

    def acquire(self, config_id: int) -> T:
        """The current snapshot, kept alive until the matching ``release``."""
        snap = self._current[config_id]
        snap.refcount += 1
        return snap.obj

    def release(self, config_id: int, obj: T) -> None:
        """Give back a snapshot from ``acquire``; the last release of a replaced one drops it."""
        snap = self._current.get(config_id)
        if snap is not None and snap.obj is obj and snap.refcount > 0:
            snap.refcount -= 1
            return
        retired = self._retired.get(config_id, [])
        for i, old in enumerate(retired):
            if old.obj is obj:
                old.refcount -= 1
                if old.refcount == 0:
                    del retired[i]
                    if not retired:
                        del self._retired[config_id]
                    _drop(old)
                return
        raise ValueError(f"release of config {config_id} snapshot that is not held")

    @contextmanager
    def scoped(self, config_id: int) -> Iterator[T]:
        """``with processor.scoped(id) as cfg:`` acquires and always releases."""
        obj = self.acquire(config_id)
        try:
            yield obj
        finally:
            self.release(config_id, obj)

    def live_snapshots(self, config_id: int) -> int:
        """How many snapshots of ``config_id`` are alive (current + retired but held).

        Reload tests use it to show that repeated reloads do not pile up old tables.
        """
        current = 1 if config_id in self._current else 0
        return current + len(self._retired.get(config_id, []))


class ConfigHandle(Generic[T]):
    """One reloadable subsystem's snapshots in a shared ConfigProcessor (ATS SSLCertificateConfig)."""

    __slots__ = ("config_id", "name", "processor")

    def __init__(self, processor: ConfigProcessor[Any], name: str) -> None:
        self.processor = processor
        self.name = name
        self.config_id = 0  # allocated by the first set

    def set(self, obj: T) -> None:
        """Install ``obj`` as current; the old one is dropped now or after its last release."""
        self.config_id = self.processor.set(self.config_id, obj)

    def current(self) -> T:
        result: T = self.processor.get_current(self.config_id)
        return result

    def acquire(self) -> T:
        result: T = self.processor.acquire(self.config_id)
        return result

    def release(self, obj: T) -> None:
        self.processor.release(self.config_id, obj)

    def scoped_config(self) -> AbstractContextManager[T]:
        """``with handle.scoped_config() as lookup:`` holds the current snapshot for the block."""
        return self.processor.scoped(self.config_id)

    def live_snapshots(self) -> int:
        return self.processor.live_snapshots(self.config_id)


def _drop(snap: _Snapshot[T]) -> None:
    hook = getattr(snap.obj, "on_release", None)
    if callable(hook):
        hook()
