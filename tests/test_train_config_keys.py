"""No training setting is swallowed: TrainConfig has no catch-all, a name that is no setting is
one UsageError naming the closest setting (exit 2 from `lorakit train`), and every TrainConfig
field is a `lorakit train` flag, so every setting can also be a --config key."""

from __future__ import annotations

import argparse
from dataclasses import fields
from types import SimpleNamespace

import pytest

from lorakit.cli import apply_config, build_parser, command_modules, main
from lorakit.errors import UsageError
from lorakit.train import TrainConfig


def train_parser() -> argparse.ArgumentParser:
    _, subparsers = build_parser(command_modules())
    return subparsers["train"]


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lorakit train: error: "), err
    return err[0]


def test_an_unknown_name_is_an_error_naming_the_closest_setting():
    args = argparse.Namespace(train="t.tsv", out="run", max_step=3, command="train", config=None, version=False)
    with pytest.raises(UsageError) as err:
        TrainConfig.from_args(args)
    assert str(err.value) == "unknown setting 'max_step' (did you mean max_steps?)"


def test_every_unknown_name_is_listed_in_one_line_also_from_a_mapping():
    with pytest.raises(UsageError) as err:
        TrainConfig.from_args({"train": "t.tsv", "lerning_rate": 1e-3, "rnak": 8, "zzzz": 1})
    message = str(err.value)
    assert "unknown setting 'rnak' (did you mean rank?)" in message
    assert "unknown setting 'lerning_rate'" in message and "unknown setting 'zzzz'" in message
    assert "\n" not in message


def test_known_names_pass_and_none_keeps_the_default():
    config = TrainConfig.from_args(SimpleNamespace(train="t.tsv", out="run", rank=8, lr=None, command="train"))
    assert (config.train, config.out, config.rank, config.lr) == ("t.tsv", "run", 8, None)
    assert config == TrainConfig(train="t.tsv", out="run", rank=8)


def test_there_is_no_catch_all_field():
    assert "extra" not in {f.name for f in fields(TrainConfig)}
    with pytest.raises(TypeError):
        TrainConfig(train="t.tsv", extra={"anything": 1})


def test_every_setting_is_a_train_flag_and_every_flag_a_setting():
    flags = {a.dest for a in train_parser()._actions} - {"help", "config"}
    assert flags == {f.name for f in fields(TrainConfig)}


def test_eval_batch_size_can_be_given_in_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('train = "t.tsv"\nout = "run"\neval-batch-size = 16\n')
    parser, subparsers = build_parser(command_modules())
    apply_config(subparsers["train"], str(config))
    assert TrainConfig.from_args(parser.parse_args(["train"])).eval_batch_size == 16


def test_the_cli_refuses_an_unknown_config_key_with_exit_2(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'train = "t.tsv"\nout = "{tmp_path / "run"}"\nmax_step = 3\n')
    line = one_error_line(capsys, main(["train", "--config", str(config)]))
    assert "unknown key 'max_step' (did you mean max-steps?)" in line
    assert not (tmp_path / "run").exists()


def test_the_cli_checks_eval_batch_size_like_the_other_sizes(tmp_path, capsys):
    argv = ["train", "--train", "t.tsv", "--out", str(tmp_path / "run"), "--eval-batch-size", "0"]
    line = one_error_line(capsys, main(argv))
    assert line.endswith("--eval-batch-size 0: must be at least 1")
    assert not (tmp_path / "run").exists()
