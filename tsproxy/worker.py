"""A worker process: one EThread running the NetHandler, the acceptors and the HTTP processor.

Theory of operation
-------------------
The master forks a worker with a ``WorkerBoot``: its role (ET_NET or ET_SSL), its stats slot,
the listening sockets it accepts on, the validated config and its end of a control socketpair.
``worker_main`` builds the loop (EThread + NetHandler), loads the plugins into this worker's
HookRegistry, starts a NetAccept per listener and runs until told to stop.

* TLS ports: each accepted socket becomes an SSLNetVConnection whose handshake starts at once
  (VCONN_START hooks before any byte is read); a finished handshake hands the VC to the HTTP
  processor, a tunnel decision to a BlindTunnel.
* Plain ports: each accepted socket becomes an HTTP client session; ``blind`` ports tunnel.
* ``pp`` ports (either kind): the PROXY protocol header is read first (net_accept.read_proxy_header).
* Control messages (newline-delimited JSON from the master): ``stop`` drains (stop accepting,
  let open transactions finish up to the timeout, close idle keep-alive connections) and exits;
  ``reload`` loads the config files again (the master validated them already) and swaps the
  snapshots: new connections see the new config, connections in flight keep theirs.
* OCSP stapling (proxy.config.ssl.ocsp.enabled): the worker's OCSPUpdater refreshes the
  responses of its config generation on a small thread pool (iocore/net/ocsp_stapling).
* Liveness: a heartbeat in the stats slot every 0.5 s; EOF on the control socket means the
  master died, and the worker exits rather than serve a stale config as an orphan.
* Memory after a burst: every TLS handshake in flight holds ~30 KiB that OpenSSL frees when it
  ends (handshake and record buffers), between allocations that live on. glibc keeps those
  holes mapped, so after a burst of handshakes the worker would stay at the burst's high-water
  mark. The first heartbeat with no connection opened or closed since the one before, after
  some were, calls ``malloc_trim(0)``, which hands the free pages back to the kernel (~2 MB
  after handshakes 100 at a time; the call takes ~0.3 ms). Under steady churn it does not
  run: the holes are reused there.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iocore.eventsystem.diags import DbgCtl
from iocore.eventsystem.ethread import EThread
from iocore.eventsystem.event import EVENT_INTERVAL, Continuation
from iocore.net.hooks import HookRegistry
from iocore.net.net_accept import NetAccept, read_proxy_header
from iocore.net.net_handler import NetHandler
from iocore.net.net_vconnection import NetVConnection, PlainNetVConnection
from iocore.net.ocsp_stapling import OCSPUpdater
from iocore.net.ports import PortDescriptor
from iocore.net.ssl_net_vconnection import SSLAcceptConfig, SSLNetVConnection
from iocore.records.config_processor import ConfigHandle, ConfigProcessor
from iocore.records.errors import TSError
from iocore.records.stats import METRIC_ID, SlotState, StatsRegion
from tsproxy.control import encode_line, pop_lines, recv_ready
from tsproxy.http_sm import HttpProcessor
from tsproxy.logs import get_logger, set_process_label
from tsproxy.tunnel import BlindTunnel

if TYPE_CHECKING:
    from collections.abc import Callable

    from tsproxy.config import ProxyConfig

_log = get_logger("tsproxy.worker")
_dbg_config = DbgCtl("ssl_config")

_M_ACCEPTS = METRIC_ID["proxy.process.net.accepts_total"]
_M_OPEN = METRIC_ID["proxy.process.net.connections_currently_open"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None elsewhere (musl, macOS), where nothing is trimmed."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()

# ALPN protocols with an endpoint in tsproxy, in server preference order.
REGISTERED_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1", b"http/1.0")
HEARTBEAT_PERIOD = 0.5


class SSLSnapshot:
    """One generation's TLS configuration in the worker's ConfigProcessor (ATS SSLConfigParams +
    SSLCertLookup, with sni.yaml): an ``SSLAcceptConfig`` per TLS port. Each TLS connection
    acquires the current snapshot when it is accepted and releases it when it closes, so a
    reload replaces it for new connections while the open ones keep theirs; the replaced one is
    released (``on_release``) when its last connection closed."""

    __slots__ = ("by_port", "generation")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.by_port: dict[int, SSLAcceptConfig] = {}

    def on_release(self) -> None:
        if _dbg_config.on:
            _dbg_config("TLS config generation %d released (its last connection closed)", self.generation)


@dataclass
class Listener:
    descriptor: PortDescriptor
    sock: socket.socket  # bound + listening, non-blocking


@dataclass
class WorkerBoot:
    role: str  # "ET_NET" or "ET_SSL"
    slot: int  # index into the StatsRegion
    config_dir: Path
    config: ProxyConfig
    listeners: list[Listener]  # the ports this worker accepts on
    stats: StatsRegion
    control: socket.socket  # worker end of a socketpair with the master
    # Loads plugin.config into the worker (tsproxy.api.load_plugins, injected by the CLI so
    # that tsproxy never imports the plugin facade that sits above it).
    plugin_loader: Callable[[ProxyConfig, Worker], list[Any]] | None = None


def port_protocols(desc: PortDescriptor, plugin_protocols: tuple[bytes, ...] = ()) -> tuple[bytes, ...]:
    """The ALPN offer of a port: plugin protocols (api.register_protocol) first, then the
    built-in ones, restricted by ``proto=``."""
    registered = (*plugin_protocols, *REGISTERED_PROTOCOLS)
    if desc.protocols is None:
        return registered
    wanted = {p.encode("ascii") for p in desc.protocols}
    return tuple(p for p in registered if p in wanted)


class Worker(Continuation):
    def __init__(self, boot: WorkerBoot) -> None:
        super().__init__(self._tick)
        self.boot = boot
        self.config = boot.config
        self.thread = EThread()
        self.slot = boot.stats.slot(boot.slot)
        self.nh = NetHandler(self.thread, self.slot)
        self.hooks = HookRegistry()
        # The worker's config snapshots (iocore/records/config_processor.py): TLS here, HTTP
        # in the HttpProcessor.
        self.config_processor: ConfigProcessor[object] = ConfigProcessor()
        self.http = HttpProcessor(self.nh, self.config, self.hooks, self.config_processor)
        self.acceptors: list[NetAccept] = []
        self.ssl_config: ConfigHandle[SSLSnapshot] = ConfigHandle(self.config_processor, "ssl")
        self.control_buf = bytearray()
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.plugins: list[Any] = []
        self.protocol_endpoints: dict[bytes, Callable[[SSLNetVConnection], None]] = {}
        self._churn_seen = (0, 0)  # (accepts, open connections) at the last heartbeat
        self._trim_owed = False
        self.ocsp = OCSPUpdater(self.thread, self.slot.counters)

    # -- setup ---------------------------------------------------------------------------
    def start(self) -> None:
        apply_diags(self.config)
        loader = self.boot.plugin_loader
        if loader is not None:
            self.plugins = loader(self.config, self)
        elif self.config.plugins:
            raise TSError("plugin.config lists plugins but this worker has no plugin loader")
        self._build_ssl_configs()
        self.ocsp.set_stapling(self.config.cert_lookup.ocsp if self.config.cert_lookup else None)
        # proxy.config.net.max_connections_in is split evenly over the workers of this role,
        # which share the same listeners.
        role_record = (
            "proxy.config.ssl.number.threads"
            if self.boot.role == "ET_SSL"
            else "proxy.config.exec_thread.limit"
        )
        self.accepting_workers = max(self.config.records.get_int(role_record), 1)
        self.http.request_share = self.accepting_workers  # proxy.config.net.max_requests_in, split too
        for lst in self.boot.listeners:
            self.acceptors.append(self._make_acceptor(lst))
        self.thread.register(self.boot.control.fileno(), 1, self._on_control)
        self.boot.control.setblocking(False)
        self.thread.schedule_every(self, HEARTBEAT_PERIOD, EVENT_INTERVAL)
        self.slot.state = int(SlotState.RUNNING)
        self.slot.generation = self.config.generation
        self.slot.heartbeat(time.monotonic())
        self._send({"event": "ready"})

    def max_connections(self) -> int:
        total = self.config.records.get_int("proxy.config.net.max_connections_in")
        return max(math.ceil(total / self.accepting_workers), 1)

    def _build_ssl_configs(self) -> None:
        cfg = self.config
        snapshot = SSLSnapshot(cfg.generation)
        release = functools.partial(self.ssl_config.release, snapshot)  # once per snapshot
        configs = snapshot.by_port
        for lst in self.boot.listeners:
            desc = lst.descriptor
            if not desc.ssl or cfg.cert_lookup is None or cfg.ssl_params is None:
                continue
            port = desc.port
            configs[port] = SSLAcceptConfig(
                lookup=cfg.cert_lookup,
                hooks=self.hooks,
                protocols=port_protocols(desc, tuple(self.protocol_endpoints)),
                # 0 must not mean "forever" (ATS CLOSE_WAIT pile-ups): fall back to the
                # default inactivity timeout so a stalled or paused handshake always ends.
                handshake_timeout=float(
                    cfg.ssl_params.handshake_timeout_in
                    or cfg.records.get_int("proxy.config.net.default_inactivity_timeout")
                ),
                tr_pass=desc.tr_pass,
                tunnel_route=cfg.ssl_params.tunnel_route or None,
                on_ready=functools.partial(self._https_ready, port=port),
                on_tunnel=self._tunnel,
                max_client_hello=cfg.ssl_params.client_hello_max_size,
                alpn_no_overlap_alert=cfg.ssl_params.alpn_no_overlap_alert,
                wire_trace=cfg.ssl_params.wire_trace,
                fallback_ctx=cfg.fallback_ctx,
                sni=cfg.sni,
                on_close=release,
            )
        self.ssl_config.set(snapshot)

    def _make_acceptor(self, lst: Listener) -> NetAccept:
        desc = lst.descriptor
        port = desc.port
        if desc.ssl:

            def make_ssl(sock: socket.socket, nh: NetHandler) -> NetVConnection:
                return SSLNetVConnection(sock, nh, self.ssl_config.acquire().by_port[port])

            def on_accept_ssl(vc: NetVConnection) -> None:
                assert isinstance(vc, SSLNetVConnection)
                vc.start_handshake()

            return NetAccept(self.nh, lst.sock, make_ssl, self._pp(desc, on_accept_ssl), self.max_connections)

        def on_accept_plain(vc: NetVConnection) -> None:
            if desc.blind:
                self._tunnel(vc, b"", self.config.records.get_str("proxy.config.tunnel.route") or None)
            else:
                self.http.new_session(vc, "http", port)

        return NetAccept(
            self.nh, lst.sock, PlainNetVConnection, self._pp(desc, on_accept_plain), self.max_connections
        )

    def _pp(
        self, desc: PortDescriptor, on_accept: Callable[[NetVConnection], None]
    ) -> Callable[[NetVConnection], None]:
        """``on_accept`` itself, or on a ``pp`` port: the PROXY header first (net_accept)."""
        if not desc.proxy_protocol:
            return on_accept

        def on_accept_pp(vc: NetVConnection) -> None:
            cfg = self.config  # the snapshot at accept time: a reload applies to new connections
            # 0 must not mean "wait forever" for a header: the default inactivity timeout then.
            timeout = float(
                cfg.records.get_int("proxy.config.http.accept_no_activity_timeout")
                or cfg.records.get_int("proxy.config.net.default_inactivity_timeout")
            )
            read_proxy_header(vc, cfg.proxy_protocol_allowlist, timeout, on_accept)

        return on_accept_pp

    def _https_ready(self, vc: SSLNetVConnection, port: int) -> None:
        protocol = vc.negotiated_protocol
        if protocol == b"h2":
            self.http.new_h2_session(vc, port)
            return
        endpoint = self.protocol_endpoints.get(protocol) if protocol else None
        if endpoint is not None:
            endpoint(vc)
        else:
            self.http.new_session(vc, "https", port)

    def register_protocol(self, name: bytes, endpoint: Callable[[SSLNetVConnection], None]) -> None:
        """An ALPN protocol served by a plugin (offered on every ssl port from now on)."""
        if name in REGISTERED_PROTOCOLS:
            raise TSError(f"ALPN protocol {name!r} is built in and cannot be registered")
        self.protocol_endpoints[name] = endpoint

    def _tunnel(self, vc: NetVConnection, replay: bytes, dest: str | None) -> None:
        timeout = float(self.config.records.get_int("proxy.config.net.default_inactivity_timeout"))
        BlindTunnel(self.nh, vc, replay, dest, self.http.resolver, timeout)

    # -- control channel -------------------------------------------------------------------
    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.boot.control.setblocking(True)
            self.boot.control.sendall(encode_line(msg))
        except OSError:
            pass
        finally:
            self.boot.control.setblocking(False)

    def _on_control(self, mask: int) -> None:
        data = recv_ready(self.boot.control)
        if data is None:
            return
        if not data:
            # The master is gone: exit now instead of serving as an orphan.
            _log.warning("master went away; worker exiting")
            self.exit_code = 1
            self.thread.stop()
            return
        self.control_buf += data
        for line in pop_lines(self.control_buf):
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self._handle_command(msg)

    def _handle_command(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("cmd")
        if cmd == "stop":
            self.begin_stop(float(msg.get("timeout", 10)))
        elif cmd == "reload":
            self.reload(int(msg.get("generation", self.config.generation + 1)))

    def reload(self, generation: int) -> None:
        from tsproxy.config import load_proxy_config

        try:
            config = load_proxy_config(
                self.boot.config_dir, self.config.ticket_keys, generation, self.config.session_cache
            )
        except TSError as exc:
            _log.error("reload to generation %d failed: %s", generation, exc)
            self._send({"event": "reloaded", "generation": generation, "ok": False, "error": str(exc)})
            return
        self.config = config
        apply_diags(config)
        self.http.set_config(config)
        self._build_ssl_configs()
        self.ocsp.set_stapling(config.cert_lookup.ocsp if config.cert_lookup else None)
        for plugin in self.plugins:
            plugin.notify_reload()
        self.slot.generation = generation
        _log.info("reloaded configuration (generation %d)", generation)
        self._send({"event": "reloaded", "generation": generation, "ok": True, "error": None})

    # -- stopping ----------------------------------------------------------------------------
    def begin_stop(self, timeout: float) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + timeout
        self.slot.state = int(SlotState.STOPPING)
        for acceptor in self.acceptors:
            acceptor.stop()
        for reader in list(self.nh.proxy_protocol_pending):
            reader.abort()  # still waiting for a PROXY header: nothing in flight, like an idle client
        self.ocsp.stop()
        self.http.drain()
        self._check_stopped()

    def _check_stopped(self) -> None:
        if not self.nh.open_vcs or time.monotonic() >= self.stop_deadline:
            self.thread.stop()

    def _tick(self, event: int, data: Any) -> None:
        self.slot.heartbeat(time.monotonic())
        self._release_memory()
        if self.stopping:
            self.http.drain()
            self._check_stopped()

    def _release_memory(self) -> None:
        """malloc_trim on the first quiet heartbeat after connections came or went (see above)."""
        counters = self.slot.counters
        churn = (counters[_M_ACCEPTS], counters[_M_OPEN])
        if churn != self._churn_seen:
            self._churn_seen = churn
            self._trim_owed = True
        elif self._trim_owed:
            self._trim_owed = False
            if _malloc_trim is not None:
                _malloc_trim(0)

    def run(self) -> int:
        self.start()
        self.thread.run()
        self.nh.close_all()
        return self.exit_code


def apply_diags(config: ProxyConfig) -> None:
    rec = config.records
    enabled = bool(rec.get_int("proxy.config.diags.debug.enabled"))
    DbgCtl.configure(enabled, rec.get_str("proxy.config.diags.debug.tags"))
    logging.getLogger("tsproxy.debug").setLevel(logging.DEBUG if enabled else logging.INFO)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Only record it; the master's "stop" drives the graceful path. A bare SIGTERM to a worker
    # makes it exit at the next loop iteration.
    raise SystemExit(0)


def worker_main(boot: WorkerBoot) -> int:
    """Run one worker in the forked child; returns the process exit code."""
    set_process_label(f"{boot.role}[{boot.slot}]")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is the master's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        worker = Worker(boot)
        return worker.run()
    except TSError as exc:
        print(f"tsproxy: worker {boot.role}[{boot.slot}]: {exc}", file=sys.stderr)
        _log.error("worker %s[%d] cannot start: %s", boot.role, boot.slot, exc)
        return 3
