"""atomic.replace_folder: `out` exists at every moment of a swap, and leftovers of a crash are repaired."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.files import atomic


class Crash(BaseException):
    """A process dying at this point: no except clause of replace_folder runs."""


def write(text):
    return lambda tmp: (tmp / "f.txt").write_text(text)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.skipif(atomic._renameat2 is None, reason="renameat2 is Linux-only")
def test_the_swap_never_leaves_out_missing(tmp_path, monkeypatch):
    out = atomic.replace_folder(tmp_path / "adapter", write("old"))
    real, seen = os.replace, []

    def crash_on_second_rename(src, dst):  # the old two-rename swap died between its renames
        seen.append(dst)
        if len(seen) == 2:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second_rename)
    atomic.replace_folder(out, write("new"))  # one renameat2 exchange: no os.replace at all
    assert (out / "f.txt").read_text() == "new" and names(tmp_path) == ["adapter"]


def test_two_rename_fallback_is_recovered_after_a_crash(tmp_path, monkeypatch):
    out = atomic.replace_folder(tmp_path / "adapter", write("old"))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a file system with no exchange
    real, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second_rename)
    with pytest.raises(Crash):
        atomic.replace_folder(out, write("new"))
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not out.exists() and any(".adapter.old-" in n for n in names(tmp_path))  # the crash window
    atomic.recover_folder(out)  # what the next command does on start
    assert (out / "f.txt").read_text() == "old" and names(tmp_path) == ["adapter"]


def test_recover_puts_back_the_old_copy_and_cleans_leftovers(tmp_path):
    out = tmp_path / "adapter"
    for name, text in ((".adapter.old-999999999", "old"), (".adapter.tmp-999999999-abc", "half")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    atomic.replace_folder(out, write("new"))  # recovers first, then replaces
    assert (out / "f.txt").read_text() == "new" and names(tmp_path) == ["adapter"]
    (tmp_path / ".adapter.tmp-1-x").mkdir()  # pid 1 is alive: a running writer's folder is left alone
    (tmp_path / ".adapter.old-4242424242-y").mkdir()  # dead writer, out present: just removed
    atomic.recover_folder(out)
    assert names(tmp_path) == [".adapter.tmp-1-x", "adapter"] and (out / "f.txt").read_text() == "new"


def test_a_failed_write_leaves_out_as_it_was(tmp_path):
    out = atomic.replace_folder(tmp_path / "m", write("old"))

    def broken(tmp):
        (tmp / "f.txt").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.replace_folder(out, broken)
    assert (out / "f.txt").read_text() == "old" and names(tmp_path) == ["m"]
