"""lorakit serve's command line with --adapter-root: operator adapters are trusted, paths resolved once."""

from __future__ import annotations

import argparse
import copy

import tiny
from test_registry import make_adapter

from lorakit.commands import serve
from lorakit.serve import AdapterRegistry, MultiLoraModel


def test_relative_adapter_paths_resolve_once_and_the_root_does_not_bound_them(tmp_path, monkeypatch):
    base = tiny.gpt2(0).eval()
    make_adapter(base, tmp_path / "adroot" / "positive", 1)
    make_adapter(base, tmp_path / "elsewhere" / "negative", 2)
    monkeypatch.chdir(tmp_path)
    adapters = serve.parse_adapters(["positive=adroot/positive", "negative=elsewhere/negative"])
    assert adapters["positive"] == (tmp_path / "adroot" / "positive").resolve()  # not adroot/adroot/positive
    registry = AdapterRegistry(MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=16), root="adroot")
    for name, folder in adapters.items():  # what build_app does with them
        registry.register(name, folder, trusted=True)
    assert registry.known() == ["negative", "positive"]


def test_the_adapter_root_flag_parses_alongside_defaults():
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--adapter-root", "."])
    assert args.adapter_root == "." and args.adapter == []
