"""The adapter card (lorakit.files.card): a file round trip, today's cards still read, malformed
cards refused, a base that resolves on any install; and the commands that read it (eval,
predict, generate, merge) run from another working directory on adapters trained in the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import tiny
from test_train_fixtures import bert_dir, child_env, gpt_dir, make_rows, write_jsonl, write_tsv  # noqa: F401

import lorakit
from lorakit import defaults, hf
from lorakit.errors import UsageError
from lorakit.files.card import (
    PACKAGED,
    AdapterCard,
    portable_base,
    read_card,
    resolve_base,
    write_card,
    write_training_card,
)
from lorakit.files.fingerprint import FINGERPRINT_KEY

LABELS = ["neg", "neu", "pos"]


def saved_adapter(folder):
    model = lorakit.inject(tiny.bert(0), lorakit.LoraConfig(r=2, target_modules=["query"]))
    return lorakit.save_adapter(model, folder)


# --- the file -----------------------------------------------------------------------------------
def test_round_trip_keeps_every_field_and_the_front_matter_hf_tools_read(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    (folder / "README.md").write_text("---\nlicense: mit\ndatasets:\n- sst2\nlibrary_name: other\n---\n\nold body\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    card = AdapterCard(task="classify", labels=LABELS, text_column="review", label_column="stars", base=str(base))
    write_card(folder, card)
    got = read_card(folder)
    fingerprint = lorakit.read_adapter(folder)[2][FINGERPRINT_KEY]  # what the safetensors file records
    expected = AdapterCard(
        task="classify",
        labels=LABELS,
        text_column="review",
        label_column="stars",
        chat_template="chat_template.jinja",
        base=str(base),
        base_fingerprint=fingerprint,
        lorakit_version=lorakit.__version__,
    )
    assert got == expected
    assert got.base_path() == base and got.columns() == {"text_column": "review", "label_column": "stars"}
    front = (folder / "README.md").read_text().split("---")[1].splitlines()
    assert "library_name: peft" in front and f"base_model: {json.dumps(str(base))}" in front
    assert "license: mit" in front and "datasets:" in front and "- sst2" in front  # others' entries are kept
    assert "library_name: other" not in front
    write_card(folder, got)  # rewriting does not duplicate entries
    again = (folder / "README.md").read_text().split("---")[1].splitlines()
    assert sorted(again) == sorted(front)


def test_todays_cards_still_read(tmp_path):
    """The exact README.md that train/model.py's write_card writes today."""
    folder = saved_adapter(tmp_path / "a")
    from lorakit.train.model import write_card as train_write_card

    train_write_card(folder, "classify", LABELS, "/some/base")
    card = read_card(folder)
    assert (card.task, card.labels, card.base, card.text_column) == ("classify", LABELS, "/some/base", None)
    assert hf.adapter_task(folder).labels == LABELS and hf.read_card(folder)["task"] == "classify"
    (folder / "README.md").write_text('---\nbase_model: "b"\nlorakit: {"task": "causal-lm", "labels": null}\n---\n')
    assert read_card(folder) == AdapterCard(task="causal-lm", base="b")


def test_no_card_is_none_and_a_malformed_card_is_one_error_line(tmp_path, capsys):
    folder = saved_adapter(tmp_path / "a")
    assert read_card(folder) is None and read_card(tmp_path / "nowhere") is None
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# PEFT's own card\n")
    assert read_card(folder) is None
    bad = {
        "lorakit: {not json": "not valid JSON",
        "lorakit: [1, 2]": "not a JSON object",
        'lorakit: {"labels": "pos"}': "'labels' must be a list",
        'lorakit: {"task": 3}': "'task' must be a string",
    }
    for line, message in bad.items():
        (folder / "README.md").write_text(f"---\n{line}\n---\n")
        with pytest.raises(lorakit.AdapterError, match=message):
            read_card(folder)
    from lorakit.cli import main

    assert main(["predict", "--adapter", str(folder), "--text", "a b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "README.md" in err[0] and "'task' must be a string" in err[0], err


def test_base_is_portable(tmp_path, monkeypatch):
    try:
        shipped = {"minilm": defaults.default_model_path(), "sst2-gpt": defaults.default_causal_lm_path()}
    except FileNotFoundError:
        pytest.skip("the packaged models are not installed")
    for name, path in shipped.items():
        assert portable_base(path) == PACKAGED + name
        assert resolve_base(PACKAGED + name) == path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert portable_base("mine") == str(tmp_path.resolve() / "mine")  # relative -> absolute
    assert resolve_base(str(tmp_path / "gone")) is None and resolve_base(PACKAGED + "nothing") is None


def test_model_path_picks_the_base_one_way(tmp_path):
    folder = saved_adapter(tmp_path / "a")
    mine, other = tmp_path / "mine", tmp_path / "other"
    for path in (mine, other):
        path.mkdir()
        (path / "config.json").write_text("{}")
    try:
        packaged = defaults.default_model_path()
    except FileNotFoundError:
        pytest.skip("the packaged MiniLM is not installed")
    assert hf.model_path(None, hf.CLASSIFY, folder) == packaged  # no card, a base name that is not here
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    assert hf.model_path(None, hf.CLASSIFY, folder) == other  # adapter_config.json names a folder that is here
    write_training_card(folder, "classify", LABELS, mine)
    assert hf.model_path(None, hf.CLASSIFY, folder) == mine  # the card's base wins over adapter_config.json
    assert hf.model_path(str(other), hf.CLASSIFY, folder) == other  # --model wins over everything
    write_card(folder, AdapterCard(task="classify", base=str(tmp_path / "gone")))
    with pytest.raises(UsageError, match="pass --model"):  # never a quiet fall-back to the packaged model
        hf.model_path(None, hf.CLASSIFY, folder)


# --- the commands, run from another folder ------------------------------------------------------
def lorakit_cli(cwd, *argv):
    """`lorakit ARGV` in a child process run in folder `cwd`; a str item is split at spaces, a Path is not."""
    words = [w for a in argv for w in (a.split() if isinstance(a, str) else [str(a)])]
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *words], cwd=cwd, env=child_env(), capture_output=True, text=True
    )


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bert_dir, gpt_dir):  # noqa: F811
    """A classifier and a causal LM trained with relative paths from work/ (as a user would),
    on a `review` column; (work, elsewhere) folders."""
    root = tmp_path_factory.mktemp("cards")
    work, elsewhere = root / "work", root / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(bert_dir, work / "bert")
    shutil.copytree(gpt_dir, work / "gpt")
    rows = [{"review": r["text"], "label": r["label"]} for r in make_rows(40)]
    write_tsv(work / "train.tsv", rows, ("review", "label"))
    write_tsv(work / "dev.tsv", rows[:12], ("review", "label"))
    lm = [{"prompt": f"say {w}", "completion": f"{w} {w}"} for w in ("good", "bad", "door", "sad") * 4]
    write_jsonl(work / "lm.jsonl", lm)
    fast = "--max-steps 2 --batch-size 8 --no-progress --lr 1e-2"
    ok(lorakit_cli(work, "train --model bert --train train.tsv --text-column review --out cls", fast))
    lm_columns = "--prompt-column prompt --completion-column completion"
    ok(lorakit_cli(work, "train --model gpt --task causal-lm --train lm.jsonl --out lm", lm_columns, fast))
    return work, elsewhere


def one_error_line(proc, command):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"lorakit {command}: error:"), proc.stderr
    return lines[0]


def test_a_relative_base_that_is_not_here_is_refused_not_replaced(runs):
    """A card of the earlier trainer records the base as given (`bert`); from another folder that
    is not the base, and every command says so instead of loading the packaged model."""
    work, elsewhere = runs
    data = work / "dev.tsv"
    for run, task, labels in (("cls", "classify", ["0", "1"]), ("lm", "causal-lm", None)):
        old = work / f"{run}-old" / "adapter"
        shutil.copytree(work / run / "adapter", old, dirs_exist_ok=True)
        card = json.dumps({"task": task, "labels": labels})
        base = "bert" if run == "cls" else "gpt"  # the earlier write_card: the base as given, relative
        front = f'---\nlibrary_name: peft\ntags: [lora, lorakit]\nbase_model: "{base}"\nlorakit: {card}\n---\n'
        (old / "README.md").write_text(front)
    cases = {
        "eval": ["--adapter", work / "cls-old" / "adapter", "--data", data, "--text-column", "review"],
        "predict": ["--adapter", work / "cls-old" / "adapter", "--text", "good"],
        "merge": ["--adapter", work / "cls-old" / "adapter", "--out", elsewhere / "merged-old"],
        "generate": ["--adapter", work / "lm-old" / "adapter", "--prompt", "say"],
    }
    for command, argv in cases.items():
        line = one_error_line(lorakit_cli(elsewhere, command, *argv), command)
        base = "gpt" if command == "generate" else "bert"
        assert f"trained on base '{base}'" in line and "pass --model" in line, line
    assert not (elsewhere / "merged-old").exists()


@pytest.fixture(scope="module")
def carded(runs):
    """Copies of the runs' adapters with the card the trainer writes through write_training_card
    (called from work/, where the relative base resolves)."""
    import os

    work, elsewhere = runs
    folders = {}
    here = os.getcwd()
    os.chdir(work)
    try:
        for name, task, columns in (
            ("cls", "classify", {"text_column": "review", "label_column": "label"}),
            ("lm", "causal-lm", {"prompt_column": "prompt", "completion_column": "completion"}),
        ):
            folder = shutil.copytree(work / name / "adapter", work / f"{name}-carded")
            labels = read_card(folder).labels
            write_training_card(folder, task, labels, "bert" if name == "cls" else "gpt", **columns)
            folders[name] = folder
    finally:
        os.chdir(here)
    return work, elsewhere, folders


def test_eval_from_another_folder_uses_the_cards_base_and_columns(carded):
    work, elsewhere, folders = carded
    got = json.loads(ok(lorakit_cli(elsewhere, "eval --adapter", folders["cls"], "--data", work / "dev.tsv", "--json")))
    explicit = "--model bert --data dev.tsv --text-column review --json"
    want = json.loads(ok(lorakit_cli(work, "eval --adapter", folders["cls"], explicit)))
    assert got == want and got["examples"] == 12
    lm = lorakit_cli(elsewhere, "eval", "--adapter", folders["lm"], "--data", work / "lm.jsonl", "--json")
    assert json.loads(ok(lm))["task"] == "causal-lm"  # prompt/completion columns from the card


def test_predict_merge_generate_from_another_folder_use_the_cards_base(carded):
    work, elsewhere, folders = carded
    got = ok(lorakit_cli(elsewhere, "predict --json --adapter", folders["cls"], "--data", work / "dev.tsv"))
    explicit = "--model bert --data dev.tsv --text-column review --json"
    want = ok(lorakit_cli(work, "predict --adapter", folders["cls"], explicit))
    assert got == want and len(got.splitlines()) == 12
    assert {json.loads(line)["label"] for line in got.splitlines()} <= set(read_card(folders["cls"]).labels)
    out = ok(lorakit_cli(elsewhere, "merge", "--adapter", folders["cls"], "--out", "merged"))
    assert f"into {(work / 'bert').resolve()}" in out
    merged = json.loads((elsewhere / "merged" / "config.json").read_text())
    assert list(merged["id2label"].values()) == read_card(folders["cls"]).labels
    prompt = ["--max-new-tokens", "4", "--prompt", "say"]
    got = ok(lorakit_cli(elsewhere, "generate --adapter", folders["lm"], *prompt))
    want = ok(lorakit_cli(work, "generate --model gpt --adapter", folders["lm"], *prompt))
    assert got == want


def test_inspect_shows_the_card(tmp_path, capsys):
    from lorakit.cli import main

    folder = saved_adapter(tmp_path / "a")
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["card"] is None
    write_card(folder, AdapterCard(task="classify", labels=LABELS, text_column="review", base=str(tmp_path / "gone")))
    assert main(["inspect", str(folder), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert (card["labels"], card["text_column"], card["base_here"]) == (LABELS, "review", None)
    assert main(["inspect", str(folder)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("card "))
    assert "neg, neu, pos" in line and "(not here)" in line and "text_column=review" in line
