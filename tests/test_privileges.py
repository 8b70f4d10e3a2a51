"""Issue 14, item 1: started as root, tsproxy runs as ``nobody`` and never follows a link.

Every test here starts the real ``tsproxy start`` as root (the suite runs as root in CI and on
the dev box; the skip reason says why a test cannot run otherwise). Config directories an
operator would install live in ``public_dir``: a root-owned 0755 directory under /tmp, which
``nobody`` can read, unlike pytest's 0700 tmp_path (used here on purpose where a test wants an
unreadable config). Links are planted where the run user (the only other user that may write
the state and log directories) could plant them, pointing at "victims": root-owned files in a
directory only root can read; each test asserts that their owner, mode and content stay.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import trustme
from conftest import (
    REPO_ROOT,
    TSPROXY_CMD,
    ProxyProcess,
    free_port,
    subprocess_env,
)

from tsproxy.exitcodes import EX_CONFIG, EX_NOPERM


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="tsproxy only switches users when started as root, and these tests switch to 'nobody'",
)

# A user id nobody on the box has: the owner of a directory "some other user" controls.
OTHER_UID = 54321


@pytest.fixture
def public_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tsproxy-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nobody_factory(
    public_dir: Path, tsproxy_factory: Callable[..., ProxyProcess]
) -> Callable[..., ProxyProcess]:
    """tsproxy_factory with the config dir in public_dir and proxy.config.admin.user_id at its
    default (nobody). Set up after public_dir, so its proxies stop before the dir goes."""

    def factory(records: dict[str, object] | None = None, **kwargs: object) -> ProxyProcess:
        merged: dict[str, object] = {"proxy.config.admin.user_id": None, **(records or {})}
        return tsproxy_factory(records=merged, parent=public_dir, **kwargs)

    return factory


def _uids(proxy: ProxyProcess) -> set[int]:
    uids: set[int] = set()
    for pid in [proxy.pid, *proxy.worker_pids()]:
        real, effective, saved = psutil.Process(pid).uids()
        uids |= {real, effective, saved}
    return uids


def _owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _tls_get(port: int, cafile: Path, path: str = "/_stats") -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _plain_get(port: int, path: str = "/_stats") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _start_again(proxy: ProxyProcess) -> ProxyProcess:
    """``tsproxy start`` once more on the same config dir (the second-start path)."""
    with proxy.out_path.open("ab") as sink:
        proc = subprocess.Popen(
            [*TSPROXY_CMD, "start", "--config-dir", str(proxy.config_dir)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,
        )
    again = ProxyProcess(proxy.config_dir, proxy.ports, proc, proxy.out_path, proxy.records)
    try:
        again.wait_ready()
    except BaseException:
        again.stop()
        raise
    return again


def _quick_start_copy(public_dir: Path, plain: int, tls: int) -> Path:
    """The shipped etc/tsproxy/, as an operator installs it (root-owned, world-readable), on
    free ports instead of 8080/8443; every other record at its shipped value."""
    config_dir = public_dir / "etc" / "tsproxy"
    shutil.copytree(REPO_ROOT / "etc" / "tsproxy", config_dir, ignore=shutil.ignore_patterns("run", "log"))
    records = config_dir / "records.config"
    text = records.read_text()
    assert "CONFIG proxy.config.http.server_ports STRING 8080 8443:ssl\n" in text
    assert "CONFIG proxy.config.admin.user_id STRING nobody\n" in text
    text = text.replace(
        "CONFIG proxy.config.http.server_ports STRING 8080 8443:ssl\n",
        f"CONFIG proxy.config.http.server_ports STRING {plain}:ip-in=127.0.0.1 {tls}:ssl:ip-in=127.0.0.1\n",
    )
    records.write_text(text)
    with (config_dir / "plugin.config").open("a") as f:
        f.write("plugins.access_log\n")
    return config_dir


def test_quick_start_as_root_runs_as_nobody_end_to_end(public_dir: Path, tmp_path: Path) -> None:
    """The README quick start, started as root: master and workers run as nobody, and the
    development certificate, TLS, the logs, reload with new certificates, stop and a second
    start all work, steered by root's ``tsproxy`` commands over the control socket."""
    assert NOBODY is not None
    plain, tls = free_port(), free_port()
    config_dir = _quick_start_copy(public_dir, plain, tls)
    out = public_dir / "tsproxy.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [*TSPROXY_CMD, "start", "--config-dir", str(config_dir)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=tmp_path,
            start_new_session=True,
        )
    proxy = ProxyProcess(config_dir, [plain, tls], proc, out, {})
    second: ProxyProcess | None = None
    try:
        proxy.wait_ready()
        assert _uids(proxy) == {NOBODY.pw_uid}
        assert f"started as user nobody (uid {NOBODY.pw_uid})" in proxy.output()
        run, log = config_dir / "run", config_dir / "log"
        devcert = run / "devcert"
        assert _owner_mode(run)[:2] == _owner_mode(log)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)
        # The CLI (root) steers it; the socket is root's, 0600: nobody else can.
        assert _owner_mode(run / "tsproxy.sock") == (0, 0, 0o600)
        status = proxy.ctl("status")
        assert status.returncode == 0, status.stderr
        # Development certificate: root's directory; the run user may read the key, not the CA key.
        assert _owner_mode(devcert) == (0, 0, 0o755)
        assert _owner_mode(devcert / "ca.key") == (0, 0, 0o600)
        assert _owner_mode(devcert / "server.key")[0] == NOBODY.pw_uid
        assert _plain_get(plain).startswith(b"HTTP/1.1 200 ")
        assert _tls_get(tls, devcert / "ca.pem").startswith(b"HTTP/1.1 200 ")
        # Logs: written after the switch, by the master and by the workers (access log).
        assert _owner_mode(log / "tsproxy.log")[0] == NOBODY.pw_uid
        access = log / "access.log"
        _wait_for(lambda: access.exists() and b"/_stats" in access.read_bytes(), 10, "the access log line")
        assert _owner_mode(access)[0] == NOBODY.pw_uid
        assert b"ready" in (log / "tsproxy.log").read_bytes()

        # A reload reads everything as nobody, the development certificate included.
        reload = proxy.ctl("reload")
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert _tls_get(tls, devcert / "ca.pem").startswith(b"HTTP/1.1 200 ")

        # Reload with a real certificate, installed as the docs say (key 0600, owned by the user).
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost")
        leaf.cert_chain_pems[0].write_to_path(str(config_dir / "server.pem"))
        for blob in leaf.cert_chain_pems[1:]:
            blob.write_to_path(str(config_dir / "server.pem"), append=True)
        leaf.private_key_pem.write_to_path(str(config_dir / "server.key"))
        os.chown(config_dir / "server.key", NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(config_dir / "server.key", 0o600)
        ca.cert_pem.write_to_path(str(public_dir / "ca.pem"))
        multicert = config_dir / "ssl_multicert.config"
        multicert.write_text("dest_ip=* ssl_cert_name=server.pem ssl_key_name=server.key\n")
        reload = proxy.ctl("reload")
        assert reload.returncode == 0, reload.stdout + reload.stderr
        assert _tls_get(tls, public_dir / "ca.pem").startswith(b"HTTP/1.1 200 ")
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_get(tls, devcert / "ca.pem")

        # Worker restart: replacements fork from the master (nobody) and import plugins as it.
        before = proxy.worker_pids()
        restart = proxy.ctl("restart")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        assert set(proxy.worker_pids()).isdisjoint(before)
        assert _uids(proxy) == {NOBODY.pw_uid}
        assert _tls_get(tls, public_dir / "ca.pem").startswith(b"HTTP/1.1 200 ")

        stop = proxy.ctl("stop")
        assert stop.returncode == 0, stop.stderr
        assert proxy.wait_exit() == 0
        assert not (run / "tsproxy.pid").exists() and not (run / "tsproxy.sock").exists()

        second = _start_again(proxy)  # run/ and log/ exist now, owned by nobody
        assert _uids(second) == {NOBODY.pw_uid}
        assert _tls_get(tls, public_dir / "ca.pem").startswith(b"HTTP/1.1 200 ")
        assert second.ctl("stop").returncode == 0
        assert second.wait_exit() == 0
    finally:
        proxy.stop()
        if second is not None:
            second.stop()


def test_minus_one_keeps_root_and_says_so(tsproxy_factory: Callable[..., ProxyProcess]) -> None:
    proxy = tsproxy_factory(records={"proxy.config.admin.user_id": "#-1"})
    assert _uids(proxy) == {0}
    assert "running as root: proxy.config.admin.user_id is '#-1'" in proxy.output()
    assert "started as user root (uid 0)" in proxy.output()


def test_config_unreadable_by_the_user_is_a_clear_error(tsproxy_factory: Callable[..., ProxyProcess]) -> None:
    """A config under pytest's tmp_path (0700 parents): nobody could never reload it, so the
    start is refused before anything is bound, naming the directory in the way."""
    proxy = tsproxy_factory(records={"proxy.config.admin.user_id": None}, wait=False)
    assert proxy.wait_exit(30) == EX_NOPERM
    blocked = next(p for p in reversed(proxy.config_dir.parents) if not os.stat(p).st_mode & stat.S_IXOTH)
    assert (
        f"user nobody (proxy.config.admin.user_id) cannot read {proxy.config_dir / 'records.config'}: "
        f"{blocked} is not searchable" in proxy.output()
    )
    assert not (proxy.state_dir / "tsproxy.pid").exists()
    assert not (proxy.state_dir / "tsproxy.sock").exists()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", proxy.port(0)))  # never bound, or released


def test_reload_unreadable_as_the_user_fails_and_keeps_serving(
    nobody_factory: Callable[..., ProxyProcess],
) -> None:
    """After the switch, a reload reads the files as nobody: one it cannot read fails the
    reload cleanly, and the proxy keeps serving the running config."""
    assert NOBODY is not None
    proxy = nobody_factory()
    assert _uids(proxy) == {NOBODY.pw_uid}
    assert _plain_get(proxy.port(0), "/").startswith(b"HTTP/1.1 404")  # served (no remap rule)
    (proxy.config_dir / "records.config").chmod(0o600)  # root-owned: unreadable for nobody
    result = proxy.ctl("reload")
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert "records.config: cannot read: Permission denied" in result.stderr
    assert proxy.proc.poll() is None
    assert proxy.status()["generation"] == 1
    assert _plain_get(proxy.port(0), "/").startswith(b"HTTP/1.1 404")


# --------------------------------------------------------------------------- planted links


class Victims:
    """Root-owned files (and one directory) in a directory only root may enter."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "victims"
        self.dir.mkdir(mode=0o700)
        self.before: dict[Path, tuple[int, int, int, bytes | tuple[str, ...]]] = {}

    def file(self, name: str) -> Path:
        path = self.dir / name
        path.write_bytes(f"victim {name}: root's own content\n".encode())
        path.chmod(0o640)
        self.before[path] = self._state(path)
        return path

    def directory(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(mode=0o750)
        (path / "keep").write_bytes(b"keep\n")
        self.before[path] = self._state(path)
        return path

    @staticmethod
    def _state(path: Path) -> tuple[int, int, int, bytes | tuple[str, ...]]:
        st = os.lstat(path)
        content: bytes | tuple[str, ...] = (
            tuple(sorted(os.listdir(path))) if stat.S_ISDIR(st.st_mode) else path.read_bytes()
        )
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), content

    def assert_untouched(self) -> None:
        changed = {
            str(p): (before, self._state(p)) for p, before in self.before.items() if self._state(p) != before
        }
        assert not changed, f"targets of planted links changed (before, after): {changed}"


def _plant(link: Path, target: Path) -> None:
    """A link as the run user would make it (owned by nobody)."""
    assert NOBODY is not None
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)


def _ssl_records() -> dict[str, object]:
    return {"proxy.config.http.server_ports": "{0}:ip-in=127.0.0.1 {1}:ssl:ip-in=127.0.0.1"}


def test_links_planted_in_run_log_and_devcert_leave_their_targets_untouched(
    nobody_factory: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """After a first run, links are planted in log/, run/ and run/devcert/ at every name tsproxy
    (this version or the one before) writes, chowns or reads as root. The second start, as
    root, replaces or ignores them: it serves with a fresh development certificate, and no
    target changed owner, mode or content."""
    victims = Victims(tmp_path)
    proxy = nobody_factory(records=_ssl_records())
    run, log = proxy.state_dir, proxy.config_dir / "log"
    devcert = run / "devcert"
    assert proxy.ctl("stop").returncode == 0
    assert proxy.wait_exit() == 0
    plants = {
        log / "old.log": victims.file("old.log"),
        log / "access.log": victims.file("access.log"),
        run / "tsproxy.pid": victims.file("pid"),
        run / "tsproxy.sock": victims.file("sock"),
        devcert / "server.pem": victims.file("server.pem"),  # makes the cert unusable: regenerated
        devcert / "stray.pem": victims.file("stray.pem"),
    }
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):  # the fixed temporary names of old
        plants[devcert / f"{name}.tmp"] = victims.file(f"{name}.tmp")
    for link, target in plants.items():
        _plant(link, target)

    again = _start_again(proxy)
    try:
        assert _tls_get(again.port(1), devcert / "ca.pem", "/").startswith(b"HTTP/1.1 404")
        victims.assert_untouched()
        assert not (devcert / "server.pem").is_symlink()  # replaced by a new file, not written through
    finally:
        again.stop()
    victims.assert_untouched()


@pytest.mark.parametrize("where", ["log/tsproxy.log", "run/devcert"])
def test_link_at_a_path_tsproxy_opens_as_root_refuses_the_start(
    nobody_factory: Callable[..., ProxyProcess], public_dir: Path, tmp_path: Path, where: str
) -> None:
    """A link where root would append (tsproxy.log) or create files (devcert/): the start is
    refused, naming the path, and the target is untouched."""
    assert NOBODY is not None
    victims = Victims(tmp_path)
    target = victims.file("tsproxy.log") if where.endswith(".log") else victims.directory("devcert")
    config_dir = public_dir / "etc-planted"
    link = config_dir / where
    link.parent.mkdir(parents=True)  # as a previous run left it: owned by the run user
    os.chown(link.parent, NOBODY.pw_uid, NOBODY.pw_gid)
    _plant(link, target)
    proxy = nobody_factory(records=_ssl_records(), name="etc-planted", wait=False)
    assert proxy.wait_exit(30) == EX_NOPERM
    assert f"{link}: is a symbolic link" in proxy.output()
    victims.assert_untouched()


@pytest.mark.parametrize(
    ("where", "how"),
    [("run", "mode 0777"), ("log", "mode 0775"), ("log", "owned by another user")],
)
def test_state_or_log_dir_writable_by_another_user_refuses_the_start(
    nobody_factory: Callable[..., ProxyProcess], public_dir: Path, where: str, how: str
) -> None:
    config_dir = public_dir / "etc-unsafe"
    directory = config_dir / where
    directory.mkdir(parents=True)
    if how.startswith("mode"):
        directory.chmod(int(how.split()[1], 8))
    else:
        os.chown(directory, OTHER_UID, OTHER_UID)
    proxy = nobody_factory(name="etc-unsafe", wait=False)
    assert proxy.wait_exit(30) == EX_NOPERM
    mode = how.split()[1] if how.startswith("mode") else None
    why = f"writable by other users (mode {mode})" if mode else f"owned by uid {OTHER_UID}"
    expected = f"refusing to start as root: {directory} is {why}"
    assert expected in proxy.output()
    assert not (config_dir / "run" / "tsproxy.pid").exists()


def test_directories_owned_by_root_are_used_and_warned_about(
    nobody_factory: Callable[..., ProxyProcess], public_dir: Path
) -> None:
    """Directories an operator made as root (0755) are safe (only root writes there) and kept
    as they are, not chowned; the start says what the user cannot do in them."""
    assert NOBODY is not None
    config_dir = public_dir / "etc-rootdirs"
    for name in ("run", "log"):
        (config_dir / name).mkdir(parents=True, mode=0o755)
    proxy = nobody_factory(name="etc-rootdirs")
    assert _uids(proxy) == {NOBODY.pw_uid}
    for name in ("run", "log"):
        assert _owner_mode(config_dir / name) == (0, 0, 0o755)
        assert f"user nobody cannot write to {config_dir / name}: " in proxy.output()
    assert _plain_get(proxy.port(0), "/").startswith(b"HTTP/1.1 404")
    assert proxy.ctl("stop").returncode == 0
    assert proxy.wait_exit() == 0  # a clean stop, though nobody could not remove its pidfile


@pytest.mark.parametrize("owner", ["nobody", "root"])
def test_devcert_dir_left_by_an_earlier_version_is_taken_back(
    nobody_factory: Callable[..., ProxyProcess], public_dir: Path, owner: str
) -> None:
    """The previous version left run/devcert/ 0700, handed to the run user (user_id set) or
    root's (the old default, no switch): root makes it root's 0755 before writing into it, and
    a reload as nobody still reads the certificate."""
    assert NOBODY is not None
    config_dir = public_dir / "etc-legacy"
    devcert = config_dir / "run" / "devcert"
    devcert.mkdir(parents=True, mode=0o700)
    devcert.chmod(0o700)
    if owner == "nobody":
        for d in (devcert.parent, devcert):
            os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    proxy = nobody_factory(records=_ssl_records(), name="etc-legacy")
    assert _owner_mode(devcert) == (0, 0, 0o755)
    reload = proxy.ctl("reload")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert _tls_get(proxy.port(1), devcert / "ca.pem", "/").startswith(b"HTTP/1.1 404")
