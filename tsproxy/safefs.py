"""Files tsproxy writes while it may still be root: never through a symbolic link.

Theory of operation: started as root, the master creates the pidfile, the control socket,
``tsproxy.log`` and the development certificate before it switches to
``proxy.config.admin.user_id``, in directories that user may write to (the state and log
directories tsproxy creates are handed to it, so that it can remove its pidfile and write its
logs). Whoever
can write there can plant a symbolic link (or a hard link) where tsproxy is about to write,
so every operation here refuses to follow one:

* a directory is first checked (``check_private_dir``): owned by root or the run user, not
  writable by its group or others; otherwise root refuses to start, naming it;
* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name and renamed
  into place (``write_atomic``): a link planted at the final name is replaced, never written;
* a file that is appended to or read is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked
  with ``fstat`` on the open descriptor (a regular file with one link) before use;
* ownership changes only what tsproxy made itself (a directory or file it has just created;
  devcert/server.key, root's with a single link), through its own descriptor (``fchown``), so
  there is no window in which a path could be swapped for a link.

Paths inside a directory are opened relative to a descriptor of that directory (``dir_fd``)
where a second lookup of the directory's path could be redirected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from iocore.records.errors import TSError
from tsproxy.exitcodes import EX_NOPERM

__all__ = [
    "UnsafePathError",
    "check_private_dir",
    "make_dir",
    "open_append",
    "open_dir",
    "read_file",
    "write_atomic",
]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafePathError(TSError):
    """A path tsproxy would write to as root is a link, or others may write next to it."""

    exit_code = EX_NOPERM


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_private_dir(path: Path, allowed_uids: set[int]) -> None:
    """Refuse ``path`` (a directory tsproxy writes to as root) when a user other than those
    in ``allowed_uids`` could create entries in it: another owner, or group/other write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # tsproxy creates it (make_dir)
    except OSError as exc:
        raise UnsafePathError(f"{path}: cannot check: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path}: not a directory")
    if st.st_uid not in allowed_uids:
        raise UnsafePathError(
            f"refusing to start as root: {path} is owned by {_user(st.st_uid)}, who could plant "
            f"symbolic links where tsproxy writes as root; chown it to root or to the "
            f"proxy.config.admin.user_id user"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"refusing to start as root: {path} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w {path}"
        )


def make_dir(path: Path, owner: tuple[int, int] | None = None, mode: int = 0o755) -> bool:
    """Create ``path`` (and missing parents) unless it exists; a directory created here gets
    ``owner`` (uid, gid). Returns whether it was created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise UnsafePathError(f"{path}: not a directory") from None
        return False
    if owner is not None:
        fd = open_dir(path)
        try:
            os.fchown(fd, *owner)
        finally:
            os.close(fd)
    return True


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of the directory ``name``; a symbolic link there is refused."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(name, dir_fd, exc, "a directory") from exc


def _where(name: str | Path, dir_fd: int | None) -> str:
    if dir_fd is None:
        return str(name)
    with contextlib.suppress(OSError):
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), str(name))
    return str(name)


def _refusal(name: str | Path, dir_fd: int | None, exc: OSError, what: str) -> TSError:
    where = _where(name, dir_fd)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafePathError(
            f"{where}: is a symbolic link or not {what}; tsproxy never follows links in its "
            f"state and log directories (remove it)"
        )
    return TSError(f"{where}: {exc.strerror or exc}")


def _check_regular(fd: int, name: str | Path, dir_fd: int | None) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
        raise UnsafePathError(f"{_where(name, dir_fd)}: {why}; tsproxy refuses to write to it (remove it)")


def open_append(path: Path, owner: tuple[int, int] | None = None, mode: int = 0o644) -> int:
    """Open ``path`` for appending, creating it; never through a link. A file created here
    gets ``owner``."""
    flags = os.O_WRONLY | os.O_APPEND | _NOFOLLOW
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise _refusal(path, None, exc, "a regular file") from exc
    except OSError as exc:
        raise _refusal(path, None, exc, "a regular file") from exc
    _check_regular(fd, path, None)
    if created and owner is not None:
        os.fchown(fd, *owner)
    return fd


def read_file(name: str | Path, dir_fd: int | None = None, limit: int = 1 << 20) -> bytes | None:
    """The content of a regular file (at most ``limit`` bytes), or None when it is missing,
    is a link, or is not a regular file with a single link."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data``: written to a new file under
    a random name (``O_EXCL | O_NOFOLLOW``), then renamed over ``name`` (a link there is
    replaced, not followed). A crash never leaves a half-written ``name``."""
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise TSError(f"{_where(tmp, dir_fd)}: cannot create: {exc.strerror}") from exc
        break
    else:  # pragma: no cover - 100 random 64-bit names all taken
        raise TSError(f"{_where(name, dir_fd)}: cannot create a temporary file")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise TSError(f"{_where(name, dir_fd)}: cannot write: {exc.strerror}") from exc
