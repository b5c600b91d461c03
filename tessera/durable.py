"""Writing directories that must survive a crash and a power cut: permissions that follow the umask, fsync of
everything written, and an atomic swap of a finished directory into place."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `path` whole or not at all, durably: a temporary file, fsynced, renamed over it, the folder fsynced."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, itself included, deepest first."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in (*files, *dirs):
            fsync_path(Path(folder) / name)
    fsync_path(root)


def settle_tree(root: Path) -> None:
    """Give every file and folder under `root` (itself included) the mode a plain open/mkdir would under the
    umask (tempfile.mkdtemp makes 0700, and some writers 0600), then fsync them."""
    mask = current_umask()
    for folder, dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)
    fsync_tree(root)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem
    cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap '{a}' into '{b}': {os.strerror(err)}")


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder `tmp` at `out_dir`, replacing what is there: settled and fsynced first, then
    swapped in one atomic step, so a reader or a crash sees the old folder or the new one, never neither (on
    filesystems without an atomic swap, two renames leave a moment with neither). The parent is fsynced after."""
    settle_tree(tmp)
    if out_dir.exists():
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now at tmp's name
        else:
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to fill; published over `out_dir` (`publish_dir`) when the block ends,
    removed if it raises."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
