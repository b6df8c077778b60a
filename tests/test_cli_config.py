"""cli.py's --config handling, checked on the real train parser: values become what the flags
would have parsed, tables become NAME=VALUE text, every bad key is listed in one error."""

from __future__ import annotations

import pytest

from lorakit.cli import apply_config, build_parser, command_modules
from lorakit.errors import UsageError


@pytest.fixture()
def train_parser():
    _, subparsers = build_parser(command_modules())
    return subparsers["train"]


def test_config_values_parse_like_flags_and_flags_win(tmp_path, train_parser):
    config = tmp_path / "run.toml"
    config.write_text("rank = 16\nlr = 0.001\nrslora = true\n[rank-pattern]\nquery = 32\nvalue = 4\n")
    apply_config(train_parser, str(config))
    from_file = train_parser.parse_args([])
    flag_parsed = train_parser.parse_args(["--rank-pattern", "query=32,value=4"])
    assert (from_file.rank, from_file.lr, from_file.rslora) == (16, 0.001, True)
    assert from_file.rank_pattern == flag_parsed.rank_pattern  # the table reads as the flag's text
    assert train_parser.parse_args(["--rank", "2"]).rank == 2  # the command line wins


def test_every_bad_key_in_one_error(tmp_path, train_parser):
    config = tmp_path / "run.yaml"
    config.write_text("rnak: 4\nlr: fast\nrslora: maybe\n")
    with pytest.raises(UsageError) as err:
        apply_config(train_parser, str(config))
    message = str(err.value)
    assert "unknown key 'rnak' (did you mean rank?)" in message
    assert "lr='fast'" in message and "rslora must be true or false" in message
    assert "\n" not in message


def test_unreadable_config_files(tmp_path, train_parser):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("rank = = 3\n")
    latin1 = tmp_path / "latin.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    cases = [(bad_toml, "not valid TOML"), (latin1, "not UTF-8"), (tmp_path / "no.toml", "does not exist")]
    for path, expected in cases:
        with pytest.raises(UsageError, match=expected):
            apply_config(train_parser, str(path))
