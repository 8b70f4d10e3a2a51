"""What every part of the master shares: the configuration, its directories, the slot table.

Theory of operation: one ``MasterState`` per master, made (empty) by ``Master.__init__`` and
filled by the boot sequence (tsproxy.master.boot) in order: the directories, the config,
the listening sockets, the control socket and selector, then the slot table. The supervisor,
reload, restart and status parts each hold a reference to it and to nothing else they do not
need; a reload replaces ``config`` and bumps ``generation`` here, so workers forked later boot
with the new one. ``stopping`` goes true once, when the stop begins, and every part refuses new
work after that.

The accessors ``config``, ``selector`` and ``state_dir`` assert what the boot sequence
guarantees: nothing past boot runs before they are set.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsproxy.master.slots import SlotTable

if TYPE_CHECKING:
    from tsproxy import control
    from tsproxy.config import ProxyConfig
    from tsproxy.logs import LogRoller
    from tsproxy.master.boot import RunAs
    from tsproxy.worker import Listener, Worker

    # tsproxy.api.load_plugins, injected by the CLI (the plugin facade sits above this layer)
    PluginLoader = Callable[[ProxyConfig, Worker], list[Any]]

STOP_GRACE = 2.0  # extra seconds past shutdown_timeout before leftovers are SIGKILLed


class MasterState:
    """The master's shared state (see the module doc)."""

    def __init__(self, config_dir: Path, plugin_loader: PluginLoader | None, log_level: int | None) -> None:
        self.config_dir = config_dir
        self.plugin_loader = plugin_loader
        self.log_level = log_level
        self.generation = 1
        self.ticket_keys: bytes | None = None
        self.log_dir: Path | None = None
        self.roller: LogRoller | None = None  # proxy.config.log.rolling_* (one roller: the master)
        self.run_as: RunAs | None = None
        self.started_wall = 0.0
        self.listeners: list[Listener] = []
        self.control_server: control.ControlServer | None = None
        self.table = SlotTable()
        self.stopping = False
        self._config: ProxyConfig | None = None
        self._state_dir: Path | None = None
        self._selector: selectors.BaseSelector | None = None

    @property
    def config(self) -> ProxyConfig:
        assert self._config is not None, "config not loaded yet"
        return self._config

    @config.setter
    def config(self, value: ProxyConfig) -> None:
        self._config = value

    @property
    def state_dir(self) -> Path:
        assert self._state_dir is not None, "state dir not known yet"
        return self._state_dir

    @state_dir.setter
    def state_dir(self, value: Path) -> None:
        self._state_dir = value

    @property
    def has_selector(self) -> bool:
        return self._selector is not None

    @property
    def selector(self) -> selectors.BaseSelector:
        assert self._selector is not None, "selector not created yet"
        return self._selector

    @selector.setter
    def selector(self, value: selectors.BaseSelector) -> None:
        self._selector = value

    def close_selector(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    def shutdown_timeout(self) -> float:
        return float(self.config.records.get("proxy.config.stop.shutdown_timeout"))

    def private_dirs(self) -> list[Path]:
        """The state and log directories (the config walk skips them; run_as must write them)."""
        return [d for d in (self._state_dir, self.log_dir) if d is not None]
