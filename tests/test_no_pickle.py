"""Nothing lorakit reads is unpickled: a base folder holding only pytorch_model.bin (a pickle)
is refused with one line and exit 2 by every command that loads a base, and the pickle's
payload never runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_fixtures import gpt_dir  # noqa: F401

MARK = "lorakit-pickle-ran"


class _Payload:
    """Unpickling this object writes MARK to a file: the test looks for that file."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (Path(self.target).write_text, (MARK,))


@pytest.fixture
def bin_only(gpt_dir, tmp_path) -> tuple[Path, Path]:  # noqa: F811
    folder = tmp_path / "bin-model"
    shutil.copytree(gpt_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    ran = tmp_path / "ran.txt"
    torch.save({**state, "payload": _Payload(ran)}, folder / "pytorch_model.bin")
    return folder, ran


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "hi", "--max-new-tokens", "2"],
        ["eval", "--data", "DATA"],
        ["merge", "--adapter", "ADAPTER", "--out", "OUT"],
    ],
    ids=["generate", "eval", "merge"],
)
def test_commands_refuse_pickled_base(bin_only, tmp_path, argv):
    folder, ran = bin_only
    argv = [a.replace("DATA", str(tmp_path / "d.jsonl")).replace("OUT", str(tmp_path / "out")) for a in argv]
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    argv = [a.replace("ADAPTER", str(tmp_path / "none")) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *argv, "--model", str(folder)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not ran.exists()
    assert not (tmp_path / "out").exists()


def test_loader_refuses_pickled_base(bin_only):
    from transformers import AutoConfig

    from lorakit.commands._common import _from_pretrained
    from lorakit.errors import UsageError

    folder, ran = bin_only
    with pytest.raises(UsageError, match="cannot load"):
        _from_pretrained(folder, "causal-lm", AutoConfig.from_pretrained(folder))
    assert not ran.exists()
