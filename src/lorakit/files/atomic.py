"""Atomic writes: a file or a folder appears whole, or the old one stays as it was.

Every output lorakit writes (adapters, merged models, checkpoints, metrics, plots) goes through
these two functions, so a crash, a full disk or a bad input never leaves a half-written file.
Temp files get the permissions a plain `open()` would (mkstemp/mkdtemp default to 0600/0700,
which would make shipped or shared adapters unreadable to other users).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp file beside `path`, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # again: some writers recreate the file
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange: take the two-rename path
    raise OSError(err, os.strerror(err), str(a))


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = _load_renameat2()


def _owner_alive(name: str) -> bool:
    """Whether the process whose id is in a leftover's name (`.out.tmp-PID-xxx`) still runs."""
    pid = name.rsplit("-", 2)[-2] if name.count("-") >= 2 else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # someone else's live process
    return True


def recover_folder(out: Path) -> None:
    """Undo what a crash inside replace_folder left: if `out` is missing and an old copy
    (`.NAME.old-*`) survives, put it back; then remove the temp and old leftovers of dead processes."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    leftovers = [
        p
        for p in out.parent.iterdir()
        if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and not _owner_alive(p.name)
    ]
    olds = sorted((p for p in leftovers if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.replace(olds[-1], out)
        leftovers.remove(olds[-1])
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` in place of `out`; `out` exists at every moment if it existed before."""
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
    else:  # no atomic exchange here: a crash between the renames is undone by recover_folder
        old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def replace_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp folder beside `out`, then put it in place of `out`.

    On Linux the swap is one renameat2(RENAME_EXCHANGE): `out` is the old folder or the new one
    at every moment. Elsewhere it is two renames, and a crash between them is repaired by
    recover_folder (called here first, and by the commands that write before they start).
    On any error `out` is left exactly as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        for file in tmp.rglob("*"):
            # Some writers (safetensors) create 0600 files: give every entry a plain write's mode.
            os.chmod(file, (0o666 if file.is_file() else 0o777) & ~_umask())
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
