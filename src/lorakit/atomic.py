"""Atomic writes: a file or a folder appears whole, or the old one stays as it was.

Every output lorakit writes (adapters, merged models, checkpoints, metrics, plots) goes through
these two functions, so a crash, a full disk or a bad input never leaves a half-written file.
Temp files get the permissions a plain `open()` would (mkstemp/mkdtemp default to 0600/0700,
which would make shipped or shared adapters unreadable to other users).
"""

from __future__ import annotations

import os
import shutil
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


def replace_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp folder beside `out`, then put it in place of `out` by renames.

    On any error `out` is left exactly as it was (the old folder stays whole until the new one
    is in place, and is put back if the final rename fails).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        for file in tmp.rglob("*"):
            # Some writers (safetensors) create 0600 files: give every entry a plain write's mode.
            os.chmod(file, (0o666 if file.is_file() else 0o777) & ~_umask())
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
