"""The ``tsproxy`` command (click): start, stop, restart, status, top, reload, metric, config check.

Every subcommand takes ``--config-dir DIR`` (default: ``$TSPROXY_CONFIG_DIR``, else the
shipped ``etc/tsproxy/``). Commands other than ``start`` and ``config check`` talk to the
running master over its control socket (``proxy.config.local_state_dir/tsproxy.sock``).
An error tsproxy raises on purpose (a TSError) is printed as ``tsproxy: message`` and exits
with the code named in ``tsproxy.exitcodes``; never with a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import psutil

from iocore.records.errors import ConfigError, TSError
from tsproxy import control
from tsproxy.exitcodes import EX_FAILURE, exit_code_for

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "etc" / "tsproxy"
ENV_CONFIG_DIR = "TSPROXY_CONFIG_DIR"
_STATE_DIR_RE = re.compile(r"^\s*(?:CONFIG|LOCAL)\s+proxy\.config\.local_state_dir\s+STRING\s+(\S.*?)\s*$")


class _Group(click.Group):
    """Turns a TSError anywhere below into ``tsproxy: message`` and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TSError as exc:
            click.echo(f"tsproxy: {exc}", err=True)
            ctx.exit(exit_code_for(exc))


def _inherit_config_dir(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """``--config-dir`` may come before the subcommand (``tsproxy --config-dir D status``), after
    it, or between a group and its command (``tsproxy metric --config-dir D get N``): the one
    nearest the command wins, then ``$TSPROXY_CONFIG_DIR`` (read by the top-level option)."""
    parent = ctx.parent
    while value is None and parent is not None:
        value = parent.params.get("config_dir")
        parent = parent.parent
    return value


def _config_dir_option(func: Any, *, envvar: str | None = None) -> Any:
    return click.option(
        "--config-dir",
        "config_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=envvar,
        default=None,
        callback=_inherit_config_dir,
        help=f"Directory holding records.config and friends (env {ENV_CONFIG_DIR}; "
        "default: the shipped etc/tsproxy). Accepted before or after the command.",
    )(func)


def resolve_config_dir(config_dir: Path | None) -> Path:
    return (config_dir if config_dir is not None else DEFAULT_CONFIG_DIR).absolute()


def state_dir_of(config_dir: Path) -> Path:
    """proxy.config.local_state_dir of ``config_dir``, even when records.config is broken.

    A control command must still reach the master (e.g. ``reload`` to be told what is wrong)
    while records.config holds an error, so a bad file falls back to a lenient scan.
    """
    from iocore.records.parser import load_records

    try:
        return load_records(config_dir).resolve_path("proxy.config.local_state_dir") or config_dir
    except ConfigError:
        pass
    value = "run"
    try:
        for line in (config_dir / "records.config").read_text(errors="replace").splitlines():
            m = _STATE_DIR_RE.match(line)
            if m:
                value = m.group(1)
    except OSError:
        pass
    return config_dir / Path(value).expanduser()


def _shutdown_timeout(config_dir: Path) -> float:
    from iocore.records.parser import load_records

    try:
        return float(load_records(config_dir).get("proxy.config.stop.shutdown_timeout"))
    except (TSError, TypeError, ValueError):
        return 30.0


def _call(config_dir: Path | None, method: str, params: Any = None, timeout: float = 15.0) -> Any:
    cdir = resolve_config_dir(config_dir)
    path = control.socket_path(state_dir_of(cdir))
    return control.call(path, method, params, timeout, config_dir=cdir)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@functools.partial(_config_dir_option, envvar=ENV_CONFIG_DIR)
def cli(config_dir: Path | None) -> None:
    """tsproxy: a TLS-terminating HTTP proxy built like Apache Traffic Server."""


@cli.command()
@_config_dir_option
@click.option("--debug", is_flag=True, help="Log at DEBUG level.")
def start(config_dir: Path | None, debug: bool) -> None:
    """Start the proxy in the foreground (master + workers) until stopped."""
    from tsproxy.api import load_plugins
    from tsproxy.master import Master

    master = Master(
        resolve_config_dir(config_dir), plugin_loader=load_plugins, log_level=10 if debug else None
    )
    code = master.run()
    sys.exit(code)


@cli.command()
@_config_dir_option
@click.option("--timeout", type=float, default=None, help="Seconds to wait (default: shutdown_timeout + 15).")
def stop(config_dir: Path | None, timeout: float | None) -> None:
    """Stop the proxy gracefully and wait until the master has exited."""
    cdir = resolve_config_dir(config_dir)
    wait = timeout if timeout is not None else _shutdown_timeout(cdir) + 15.0
    deadline = time.monotonic() + wait
    status = _call(cdir, "status")
    pid = int(status["master"]["pid"])
    # The master answers once it has stopped; a closed connection means it is gone as well.
    with contextlib.suppress(control.NotRunningError):
        _call(cdir, "stop", timeout=wait)
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        raise control.ControlTimeoutError(f"tsproxy master {pid} did not exit within {wait:g} s")
    click.echo(f"tsproxy stopped (master pid {pid})")


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _fmt_rss(rss: int | None) -> str:
    return "-" if rss is None else f"{rss / (1 << 20):.1f}M"


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def status_lines(result: dict[str, Any]) -> list[str]:
    """The ``tsproxy status`` table (also each frame of ``tsproxy top``) for a status result."""
    rows = [("ROLE", "SLOT", "PID", "UPTIME", "CPU%", "RSS", "CONNS", "HS/S", "REQ/S", "GEN", "PORTS")]
    m = result["master"]
    rows.append(
        (
            "master",
            "-",
            str(m["pid"]),
            _fmt_uptime(m["uptime"]),
            _fmt(m["cpu_percent"]),
            _fmt_rss(m["rss"]),
            "-",
            "-",
            "-",
            str(m["generation"]),
            "",
        )
    )
    booting = False
    total_hs = total_req = 0.0
    for w in result["workers"]:
        booting = booting or bool(w["pid"] and not w["ready"])
        total_hs += w.get("handshakes_per_s") or 0.0
        total_req += w.get("requests_per_s") or 0.0
        rows.append(
            (
                w["role"],
                str(w["slot"]),
                _fmt(w["pid"]) + ("" if w["ready"] or not w["pid"] else "*"),
                _fmt_uptime(w["uptime"]),
                _fmt(w["cpu_percent"]),
                _fmt_rss(w["rss"]),
                _fmt(w["connections"]),
                _fmt_rate(w.get("handshakes_per_s")),
                _fmt_rate(w.get("requests_per_s")),
                _fmt(w["generation"]),
                " ".join(w.get("ports", [])),
            )
        )
    draining = result.get("draining", [])
    for d in draining:
        rows.append(
            (
                d["role"],
                str(d["slot"]),
                f"{d['pid']}~",
                _fmt_uptime(d["uptime"]),
                "-",
                "-",
                _fmt(d["connections"]),
                "-",
                "-",
                "-",
                "(old worker)",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    period = result.get("rate_period", 1.0)
    lines.append(
        f"total {total_hs:.1f} handshakes/s, {total_req:.1f} requests/s (rates over the last {period:g} s)"
    )
    legend = [
        *(["* booting"] if booting else []),
        *(["~ replaced by a restart, draining"] if draining else []),
    ]
    if legend:
        lines.append("; ".join(legend))
    state = " (stopping)" if result.get("stopping") else " (restarting)" if result.get("restarting") else ""
    lines.append(f"config dir {result['config_dir']}, generation {result['generation']}{state}")
    return lines


@cli.command()
@_config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(config_dir: Path | None, as_json: bool) -> None:
    """Show the master and each worker: role, pid, uptime, CPU, RSS, connections, handshakes/s,
    requests/s, config generation.

    Rates are per worker process over the master's last one-second sample ("-" during a
    worker's first second).
    """
    result = _call(config_dir, "status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in status_lines(result):
        click.echo(line)


@cli.command()
@_config_dir_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after this many refreshes (default: until Ctrl-C).",
)
def top(config_dir: Path | None, interval: float, iterations: int) -> None:
    """Show the 'tsproxy status' table live, refreshed every INTERVAL seconds.

    Ctrl-C quits (exit status 0). On a terminal each refresh clears the screen; otherwise the
    frames are printed one after another, separated by a blank line.
    """
    # A shell starts a background job with SIGINT ignored, and a process inherits ignored
    # signals: without this, Ctrl-C (or kill -INT) would not stop top once brought forward.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cdir = resolve_config_dir(config_dir)
    tty = sys.stdout.isatty()
    frames = 0
    try:
        while True:
            result = _call(cdir, "status")
            stamp = time.strftime("%H:%M:%S")
            header = f"tsproxy top - {stamp} - every {interval:g} s, Ctrl-C to quit"
            if tty:
                click.clear()
            elif frames:
                click.echo("")
            click.echo("\n".join([header, *status_lines(result)]))
            frames += 1
            if iterations and frames >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            click.echo("")
        return


@cli.command()
@_config_dir_option
def reload(config_dir: Path | None) -> None:
    """Validate the config files and switch every worker to them (SIGHUP does the same)."""
    result = _call(config_dir, "reload", timeout=30.0)
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"generation {result['generation']}")
    for name in result["files"]:
        click.echo(f"file changed: {name}")
    for name in result["changed"]:
        click.echo(f"record changed: {name}")
    for name in result["restart_required"]:
        click.echo(f"record changed, needs restart: {name}")
    plugins = result.get("plugins_restart_required", [])
    for note in plugins:
        click.echo(note)
    if not (result["files"] or result["changed"] or result["restart_required"] or plugins):
        click.echo("nothing changed")
    failed = [w for w in result["workers"] if not w["ok"]]
    for w in failed:
        click.echo(f"tsproxy: worker {w['role']}[{w['slot']}] pid {w['pid']}: {w['error']}", err=True)
    if failed:
        sys.exit(EX_FAILURE)
    pending = len(result["restart_required"]) + len(plugins)
    later = f"; {pending} change(s) above wait for a restart" if pending else ""
    click.echo(f"reloaded {len(result['workers'])} workers{later}")


@cli.command()
@_config_dir_option
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for the whole restart (default: generous, from shutdown_timeout).",
)
def restart(config_dir: Path | None, timeout: float | None) -> None:
    """Restart the workers one at a time, without closing the listening sockets.

    For each worker: fork a replacement, wait until it is ready, then tell the old worker to
    drain (stop accepting, finish open transactions up to proxy.config.stop.shutdown_timeout,
    close idle keep-alive connections) and go on with the next. Clients see no error; at most
    an idle keep-alive connection is closed between two responses. Prints old -> new pid per
    worker and exits 0 once every old worker has exited.

    Limit: the master forks the replacements, so they run the code the master loaded when it
    started. A restart picks up the current configuration and plugin code loaded by the
    workers, but upgrading tsproxy itself needs a master restart (tsproxy stop, then start).
    """
    from tsproxy.master import RESTART_BOOT_TIMEOUT, STOP_GRACE

    cdir = resolve_config_dir(config_dir)
    if timeout is None:
        n = len(_call(cdir, "status")["workers"])
        timeout = _shutdown_timeout(cdir) + STOP_GRACE + n * RESTART_BOOT_TIMEOUT + 10.0
    result = _call(cdir, "restart", timeout=timeout)
    replaced = 0
    for w in result["workers"]:
        if w["old_pid"] is None:
            click.echo(f"{w['role']}[{w['slot']}]: pid {_fmt(w['new_pid'])} was starting; left alone")
        else:
            replaced += 1
            click.echo(f"{w['role']}[{w['slot']}]: pid {w['old_pid']} -> pid {w['new_pid']}")
    click.echo(f"restarted {replaced} workers in {result['seconds']:.2f} s")


@cli.group()
@_config_dir_option
def metric(config_dir: Path | None) -> None:
    """Read or zero proxy.process.* statistics, summed over the workers.

    The list of metrics, with their units, is in docs/records.md (section Metrics). An
    unknown metric name or a bad regex exits 65.
    """


def _print_metrics(result: dict[str, Any]) -> None:
    for name, value in result["metrics"]:
        click.echo(f"{name} {value}")


@metric.command("get")
@_config_dir_option
@click.argument("names", nargs=-1, required=True)
def metric_get(config_dir: Path | None, names: tuple[str, ...]) -> None:
    """Print NAME VALUE for each metric."""
    _print_metrics(_call(config_dir, "metric.get", {"names": list(names)}))


@metric.command("match")
@_config_dir_option
@click.argument("regex")
def metric_match(config_dir: Path | None, regex: str) -> None:
    """Print NAME VALUE for each metric whose name REGEX matches."""
    _print_metrics(_call(config_dir, "metric.match", {"regex": regex}))


@metric.command("zero")
@_config_dir_option
@click.argument("names", nargs=-1, required=True)
def metric_zero(config_dir: Path | None, names: tuple[str, ...]) -> None:
    """Reset the metrics to 0 in every worker."""
    _print_metrics(_call(config_dir, "metric.zero", {"names": list(names)}))


@cli.group()
@_config_dir_option
def config(config_dir: Path | None) -> None:
    """Configuration tools."""


@config.command("check")
@_config_dir_option
def config_check(config_dir: Path | None) -> None:
    """Load and validate every config file without starting anything."""
    from tsproxy.config import load_proxy_config

    cdir = resolve_config_dir(config_dir)
    cfg = load_proxy_config(cdir, None)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    ports = " ".join(p.describe() for p in cfg.ports) or "(none)"
    click.echo(f"{cdir}: configuration OK (ports {ports})")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="tsproxy")
    except TSError as exc:  # raised outside a command's invoke (should not happen)
        click.echo(f"tsproxy: {exc}", err=True)
        sys.exit(exit_code_for(exc))


if __name__ == "__main__":
    main()
