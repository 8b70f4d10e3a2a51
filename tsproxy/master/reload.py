"""Reload: validate the config directory, then switch every worker to it (SIGHUP, ``reload``).

Theory of operation: the master loads the whole config directory first, as a worker would;
only a config that loads cleanly goes further, and a broken one leaves everything running as
it was (the answer carries the file and line). A clean one becomes the master's config with
the next generation, so workers forked from then on boot with it, and every live worker is
sent ``reload`` with that generation. The answer comes once each of them has said
``reloaded`` (or died, or stayed silent ``RELOAD_TIMEOUT`` seconds): which records changed,
which of those need a restart, which files changed, and each worker's result.

"Files changed" compares content: ``_file_fingerprints`` keeps (size, mtime, sha256) of every
file under the config dir but the state and log dirs, and a file whose size and mtime match
keeps its hash without being read again. Plugins load when a worker boots (as ATS loads
plugin.config at start-up only): a reload does not add, remove or re-initialise one, and lists
every plugin.config or plugin code change since the workers last loaded them (at start or the
last restart) as needing a restart.

One reload at a time (``SlotTable.reload``); none while stopping.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iocore.records.errors import ConfigError, TSError
from tsproxy import control
from tsproxy.exitcodes import EX_CONFIG, EX_UNAVAILABLE, exit_code_for
from tsproxy.logs import RollingPolicy, get_logger
from tsproxy.master.slots import PendingReload, Slot

if TYPE_CHECKING:
    from tsproxy.config import PluginSpec
    from tsproxy.master.state import MasterState

RELOAD_TIMEOUT = 10.0

_log = get_logger("tsproxy.master")

# (size, mtime_ns, sha256 of the content) of one config file; the hash decides "changed".
_Fingerprint = tuple[int, int, bytes]


def _file_fingerprints(
    config_dir: Path, exclude: list[Path], previous: Mapping[str, _Fingerprint] | None = None
) -> dict[str, _Fingerprint]:
    """Fingerprints of every file under the config dir except the state and log dirs.

    A file whose size and mtime match ``previous`` keeps its hash without being read again;
    any other is hashed, so a file that was only touched (or rewritten with the same bytes)
    compares equal and a reload does not report it as changed."""
    result: dict[str, _Fingerprint] = {}
    previous = previous or {}
    excluded = [p.resolve() for p in exclude]
    root_dir = config_dir.resolve()
    for root, dirs, files in os.walk(config_dir):
        here = Path(root).resolve()
        dirs[:] = [d for d in dirs if (here / d) not in excluded and not d.startswith(".")]
        for name in files:
            path = here / name
            rel = str(path.relative_to(root_dir))
            with contextlib.suppress(OSError):
                st = path.stat()
                old = previous.get(rel)
                if old is not None and old[:2] == (st.st_size, st.st_mtime_ns):
                    result[rel] = old
                    continue
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(1 << 16):
                        digest.update(block)
                result[rel] = (st.st_size, st.st_mtime_ns, digest.digest())
    return result


def _plugin_code_hashes(plugins: list[PluginSpec]) -> dict[str, bytes]:
    """SHA-256 of each plugin given as a file (a module name has none here)."""
    hashes: dict[str, bytes] = {}
    for spec in plugins:
        if spec.target.endswith(".py") or "/" in spec.target:
            with contextlib.suppress(OSError):
                hashes[spec.target] = hashlib.sha256(Path(spec.target).read_bytes()).digest()
    return hashes


def _content(fp: _Fingerprint | None) -> bytes | None:
    return None if fp is None else fp[2]


class Reloader:
    """The ``reload`` method and SIGHUP: one PendingReload at a time in the slot table."""

    def __init__(self, state: MasterState) -> None:
        self.state = state
        self._fingerprints: dict[str, _Fingerprint] = {}
        self._plugins_loaded: tuple[list[PluginSpec], dict[str, bytes]] = ([], {})

    def snapshot(self) -> None:
        """At boot: the config files as they are now, and the plugins the workers will load."""
        state = self.state
        self._fingerprints = _file_fingerprints(state.config_dir, state.private_dirs())
        self.note_plugins_loaded()

    def note_plugins_loaded(self) -> None:
        """Workers forked from now on import the config's plugins, as their files are now."""
        plugins = self.state.config.plugins
        self._plugins_loaded = (list(plugins), _plugin_code_hashes(plugins))

    def reload(self, responder: control.Responder | None) -> None:
        """Validate the config dir; if clean, tell every worker to switch to it."""
        from tsproxy.config import load_proxy_config, plugin_restart_notes

        def fail(code: int, message: str, data: dict[str, Any] | None = None) -> None:
            _log.error("reload failed: %s", message)
            if responder is not None:
                responder.error(code, message, data)

        state, table = self.state, self.state.table
        if state.stopping:
            fail(control.E_BUSY, "tsproxy is stopping", {"exit_code": EX_UNAVAILABLE})
            return
        if table.reload is not None:
            fail(control.E_BUSY, "a reload is already in progress", {"exit_code": EX_UNAVAILABLE})
            return
        old = state.config
        try:
            new = load_proxy_config(
                state.config_dir,
                state.ticket_keys,
                generation=state.generation + 1,
                session_cache=old.session_cache,
            )
        except ConfigError as exc:
            data = {"path": exc.path, "line": exc.line, "exit_code": EX_CONFIG}
            fail(control.E_CONFIG, str(exc), data)
            return
        except TSError as exc:
            fail(control.E_CONFIG, str(exc), {"exit_code": exit_code_for(exc)})
            return
        except Exception as exc:  # e.g. a file the proxy user may not read: never fatal here
            _log.exception("reload failed; the running configuration stays")
            fail(control.E_CONFIG, f"reload failed: {type(exc).__name__}: {exc}", {"exit_code": EX_CONFIG})
            return
        changed = old.records.diff(new.records)
        restart = old.records.restart_required(new.records)
        fingerprints = _file_fingerprints(state.config_dir, state.private_dirs(), self._fingerprints)
        files = sorted(
            name
            for name in set(fingerprints) | set(self._fingerprints)
            if _content(fingerprints.get(name)) != _content(self._fingerprints.get(name))
        )
        # Compared with what the workers loaded (at start or the last restart), not with the last
        # reload: a change stays listed until a restart has loaded it.
        loaded, loaded_code = self._plugins_loaded
        code_now = _plugin_code_hashes(new.plugins)
        changed_code = frozenset(Path(t) for t, h in code_now.items() if loaded_code.get(t, h) != h)
        plugins = plugin_restart_notes(loaded, new.plugins, changed_code)
        for warning in new.warnings:
            _log.warning("%s", warning)
        state.generation += 1
        state.config = new
        self._fingerprints = fingerprints
        if state.roller is not None:
            state.roller.set_policy(RollingPolicy.from_records(new.records))
        pending = PendingReload(
            generation=state.generation,
            changed=[n for n in changed if n not in restart],
            restart_required=restart,
            files=files,
            plugins=plugins,
            warnings=list(new.warnings),
            waiting={},
            replies={},
            deadline=time.monotonic() + RELOAD_TIMEOUT,
            responder=responder,
        )
        table.reload = pending
        for slot in table.slots:
            if slot.pid and slot.send({"cmd": "reload", "generation": state.generation}):
                pending.waiting[slot.index] = slot.pid
        if not pending.waiting:
            self._finish()

    def on_reloaded(self, slot: Slot, event: dict[str, Any]) -> None:
        """A worker's ``reloaded`` event."""
        generation = event.get("generation")
        if event.get("ok") and isinstance(generation, int):
            slot.generation = generation
        pending = self.state.table.reload
        if pending is not None and slot.index in pending.waiting and generation == pending.generation:
            del pending.waiting[slot.index]
            pending.replies[slot.index] = {
                "slot": slot.index,
                "role": slot.role,
                "pid": slot.pid,
                "ok": bool(event.get("ok")),
                "error": event.get("error"),
            }
            if not pending.waiting:
                self._finish()

    def on_worker_exit(self, slot: Slot, pid: int, how: str) -> None:
        """Worker ``pid`` of ``slot`` exited: a reload waiting for it counts it as failed."""
        pending = self.state.table.reload
        if pending is not None and slot.index in pending.waiting:
            del pending.waiting[slot.index]
            pending.replies[slot.index] = {
                "slot": slot.index,
                "role": slot.role,
                "pid": pid,
                "ok": False,
                "error": f"worker exited ({how})",
            }
            if not pending.waiting:
                self._finish()

    def check_deadline(self) -> None:
        """Answer a reload whose workers stayed silent for RELOAD_TIMEOUT."""
        pending = self.state.table.reload
        if pending is None or time.monotonic() < pending.deadline:
            return
        self._expire(pending)

    def finish_now(self) -> None:
        """At stop: answer a reload still in flight, as if its time was up."""
        pending = self.state.table.reload
        if pending is not None:
            self._expire(pending)

    def _expire(self, pending: PendingReload) -> None:
        slots = self.state.table.slots
        for index, pid in pending.waiting.items():
            pending.replies[index] = {
                "slot": index,
                "role": slots[index].role,
                "pid": pid,
                "ok": False,
                "error": f"no answer within {RELOAD_TIMEOUT:g} s",
            }
        pending.waiting.clear()
        self._finish()

    def _finish(self) -> None:
        table = self.state.table
        pending, table.reload = table.reload, None
        if pending is None:
            return
        workers = [pending.replies[i] for i in sorted(pending.replies)]
        ok = all(w["ok"] for w in workers)
        result = {
            "ok": ok,
            "generation": pending.generation,
            "changed": pending.changed,
            "restart_required": pending.restart_required,
            "files": pending.files,
            "plugins_restart_required": pending.plugins,
            "warnings": pending.warnings,
            "workers": workers,
        }
        if ok:
            _log.info(
                "reloaded to generation %d: records changed %s; needs restart %s; files %s",
                pending.generation,
                pending.changed or "none",
                pending.restart_required or "none",
                pending.files or "none",
            )
            for note in pending.plugins:
                _log.warning("reload: %s", note)
        else:
            for w in workers:
                if not w["ok"]:
                    _log.error("reload: worker %s[%d] pid %d: %s", w["role"], w["slot"], w["pid"], w["error"])
        if pending.responder is not None:
            pending.responder.result(result)
