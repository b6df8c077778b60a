"""Bad adapter folders are refused with one clear AdapterError and the model left untouched;
saving never leaves a half-written or mixed folder behind; bad configs list every problem."""

from __future__ import annotations

import json
import os
import re

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, GPT2LMHeadModel

import lorakit
import lorakit.files.atomic
import lorakit.files.peft_format
from lorakit.core.inject import CONFIGS_ATTR

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
QUERY_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


def bert(seed: int = 0) -> BertForSequenceClassification:
    return tiny.bert(seed).eval()


def gpt2() -> GPT2LMHeadModel:
    return tiny.gpt2(0).eval()


def with_adapter(model: torch.nn.Module, seed: int = 1, **kwargs) -> torch.nn.Module:
    """`model` with a LoRA whose A and B are random (B is zero at init)."""
    kwargs.setdefault("target_modules", ["query", "value"])
    lorakit.inject(model, lorakit.LoraConfig(r=4, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture
def adapter(tmp_path):
    """A valid lorakit adapter for bert(seed=0): LoRA on query/value plus the classifier."""
    return lorakit.save_adapter(with_adapter(bert(), modules_to_save=["classifier"]), tmp_path / "adapter")


def read_tensors(folder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def rewrite_tensors(folder, edit) -> None:
    """Re-save the weights file after `edit(tensors)`, keeping its metadata (the fingerprint)."""
    tensors, metadata = read_tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)


def edit_config(folder, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / CONFIG).write_text(json.dumps(data))


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {n: p.requires_grad for n, p in model.named_parameters()}


def assert_untouched(model: torch.nn.Module, before) -> None:
    state, grads = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorakit.lora_layers(model) == []
    assert not model.__dict__.get(CONFIGS_ATTR)


def assert_refused(path, expected: str, model=None, **kwargs) -> str:
    """load_adapter raises one one-line AdapterError containing `expected`; the model is unchanged."""
    model = bert() if model is None else model
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterError, match=re.escape(expected)) as info:
        lorakit.load_adapter(model, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert_untouched(model, before)
    return message


# --- refused folders ------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    message = assert_refused(tmp_path / "nope", "no such adapter folder")
    assert str(tmp_path / "nope") in message


def test_file_instead_of_folder(adapter):
    message = assert_refused(adapter / CONFIG, "is a file; give the adapter folder")
    assert str(adapter) in message


def test_missing_config(adapter):
    (adapter / CONFIG).unlink()
    assert_refused(adapter, f"{CONFIG} is missing")


def test_missing_weights(adapter):
    (adapter / WEIGHTS).unlink()
    message = assert_refused(adapter, f"{WEIGHTS} is missing")
    assert "adapter_model.bin" not in message


def test_missing_weights_with_only_a_bin_file_gives_a_hint(adapter):
    (adapter / WEIGHTS).rename(adapter / "adapter_model.bin")  # never unpickled: its content is irrelevant
    assert_refused(adapter, "found adapter_model.bin: lorakit never unpickles")


def test_malformed_json(adapter):
    (adapter / CONFIG).write_text('{"r": 4, "lora_alpha": ')
    assert_refused(adapter, "not valid JSON")


def test_json_not_an_object(adapter):
    (adapter / CONFIG).write_text("[4, 8]")
    assert_refused(adapter, "expected a JSON object, got list")


def test_peft_type_not_lora(adapter):
    edit_config(adapter, peft_type="IA3")
    assert_refused(adapter, "peft_type='IA3': lorakit reads LoRA adapters only")


def test_config_problems_are_listed_together(adapter):
    edit_config(adapter, peft_type="LOHA", lora_bias=True, r=None)
    message = assert_refused(adapter, "peft_type='LOHA'")
    assert "lora_bias=True" in message and "'r' is missing" in message


def test_invalid_config_values_are_listed_together(adapter):
    edit_config(adapter, r=-1, lora_dropout=2)
    message = assert_refused(adapter, "r=-1: must be a positive integer")
    assert "dropout=2: must be in [0, 1)" in message


def test_missing_key(adapter):
    rewrite_tensors(adapter, lambda t: t.pop(QUERY_A))
    assert_refused(adapter, "missing key bert.encoder.layer.0.attention.self.query.lora_A.weight")


def test_unexpected_key(adapter):
    def add(tensors):
        tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_C.weight"] = torch.zeros(4, 32)

    rewrite_tensors(adapter, add)
    assert_refused(adapter, "unexpected key bert.encoder.layer.0.attention.self.query.lora_C.weight")


@pytest.mark.parametrize(
    "key",
    [
        "bert.encoder.layer.0.attention.output.LayerNorm.bias",  # a base bias in a bias="none" adapter
        "bert.encoder.layer.0.attention.self.query.base_layer.weight",  # an adapted layer's base weight
        "bert.encoder.layer.0.attention.self.key.weight",  # a weight no config entry covers
    ],
)
def test_keys_addressing_base_weights_are_refused(adapter, key):
    model = bert()
    shape = model.state_dict()[key.replace(".base_layer.", ".")].shape

    def add(tensors):
        tensors[f"base_model.model.{key}"] = torch.full(shape, 7.0)

    rewrite_tensors(adapter, add)
    message = assert_refused(adapter, f"unexpected key {key}", model=model)
    assert "base" in message


def test_gpt2_base_layer_weight_key_is_refused(tmp_path):
    folder = lorakit.save_adapter(with_adapter(gpt2(), target_modules=["c_attn"]), tmp_path / "gpt2")
    shapes = gpt2().state_dict()
    for key in ("transformer.h.0.attn.c_attn.base_layer.weight", "transformer.h.0.ln_1.bias"):
        shape = shapes[key.replace(".base_layer.", ".")].shape
        rewrite_tensors(folder, lambda t, k=key, s=shape: t.__setitem__(f"base_model.model.{k}", torch.ones(s)))
        assert_refused(folder, f"unexpected key {key}", model=gpt2())
        rewrite_tensors(folder, lambda t, k=key: t.pop(f"base_model.model.{k}"))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha=nan: must be a positive number, finite and at most 1e+06"),
        ({"lora_alpha": float("inf")}, "lora_alpha=inf: must be a positive number, finite"),
        ({"lora_alpha": 1e308}, "lora_alpha=1e+308: must be a positive number, finite and at most 1e+06"),
        ({"alpha_pattern": {"query": float("nan")}}, "alpha_pattern['query']=nan: must be a positive number"),
        ({"r": "null"}, "r=null: give a value (a positive integer, e.g. 8)"),
        ({"lora_alpha": "null"}, "lora_alpha=null: give a value"),
    ],
    ids=["nan", "inf", "1e308", "pattern-nan", "r-null", "alpha-null"],
)
def test_hostile_config_numbers_are_refused(adapter, changes, expected):
    data = json.loads((adapter / CONFIG).read_text())
    data.update({k: (None if v == "null" else v) for k, v in changes.items()})
    (adapter / CONFIG).write_text(json.dumps(data))  # NaN / Infinity as Python's json writes them
    message = assert_refused(adapter, expected)
    assert message.count("adapter_config.json") == 1


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e308, 0, True])
def test_lora_config_refuses_non_finite_or_absurd_alpha(alpha):
    with pytest.raises(lorakit.ConfigError, match="alpha="):
        lorakit.LoraConfig(alpha=alpha)
    with pytest.raises(lorakit.ConfigError, match="alpha_pattern"):
        lorakit.LoraConfig(alpha_pattern={"query": alpha})


def test_load_adapter_into_an_eval_model_has_no_dropout(tmp_path):
    folder = lorakit.save_adapter(with_adapter(bert(), dropout=0.5), tmp_path / "a")
    model = lorakit.load_adapter(bert(), folder)  # bert() is in eval mode, as from_pretrained gives
    assert not any(m.training for m in model.modules())
    ids = torch.randint(0, 100, (2, 3), generator=torch.Generator().manual_seed(0))  # 6 tokens: factored path
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_inject_follows_the_replaced_modules_mode():
    model = lorakit.inject(bert(), lorakit.LoraConfig(r=4, dropout=0.5, target_modules=["query"]))
    assert not any(layer.training for _, layer in lorakit.lora_layers(model))
    model.train()
    assert all(layer.training for _, layer in lorakit.lora_layers(model))
    trained = lorakit.inject(tiny.bert(0).train(), lorakit.LoraConfig(r=4, target_modules=["query"]))
    assert all(layer.training for _, layer in lorakit.lora_layers(trained))


def test_wrong_shape(adapter):
    def reshape(tensors):
        tensors[QUERY_A] = torch.zeros(5, 32)

    rewrite_tensors(adapter, reshape)
    assert_refused(adapter, "query.lora_A.weight has shape (5, 32), the model needs (4, 32)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values(adapter, bad):
    def poison(tensors):
        tensors[QUERY_A][1, 3] = bad

    rewrite_tensors(adapter, poison)
    assert_refused(adapter, "query.lora_A.weight contains NaN or Inf values")


def test_truncated_weights_file(adapter):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert_refused(adapter, "not a readable safetensors file")


def test_garbage_weights_file(adapter):
    (adapter / WEIGHTS).write_bytes(b"\x00\xffnot safetensors at all" * 40)
    message = assert_refused(adapter, "not a readable safetensors file")
    assert "truncated or corrupt" in message


def test_adapter_for_another_architecture(tmp_path):
    folder = lorakit.save_adapter(with_adapter(gpt2(), target_modules=["c_attn"]), tmp_path / "gpt2")
    message = assert_refused(folder, "does not fit BertForSequenceClassification (made for another model?)")
    assert "c_attn" in message


def test_adapter_for_another_base_is_refused_unless_forced(adapter):
    other = bert(seed=7)  # same architecture, different weights
    assert_refused(adapter, "was made for a different base model", model=other)

    lorakit.load_adapter(other, adapter, force=True)

    tensors, _ = read_tensors(adapter)
    layers = dict(lorakit.lora_layers(other))
    adapted = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors if ".lora_" in k}
    assert sorted(layers) == sorted(adapted)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"], tensors[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B["default"], tensors[f"base_model.model.{name}.lora_B.weight"])
    assert torch.equal(other.classifier.weight, tensors["base_model.model.classifier.weight"])


# --- saving ---------------------------------------------------------------------------------------
def leftovers(parent, *expected: str) -> list[str]:
    """Entries of `parent` besides `expected` (temp or backup folders a save left behind)."""
    return sorted(set(os.listdir(parent)) - set(expected))


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_save_over_an_adapter_folder_replaces_it_completely(tmp_path):
    out = tmp_path / "out"
    lorakit.save_adapter(with_adapter(bert(), modules_to_save=["classifier"]), out)
    (out / "README.md").write_text("model card PEFT writes next to the adapter\n")
    second = with_adapter(bert(), seed=2, target_modules=["key"])
    reference = lorakit.save_adapter(second, tmp_path / "reference")

    lorakit.save_adapter(second, out)

    # Nothing of the first adapter survives. (Compared by content: safetensors writes the
    # metadata entries in no fixed order, so equal files need not be equal bytes.)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference)) == [CONFIG, WEIGHTS]
    assert (out / CONFIG).read_text() == (reference / CONFIG).read_text()
    (ours, ours_meta), (ref, ref_meta) = read_tensors(out), read_tensors(reference)
    assert ours_meta == ref_meta
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert leftovers(tmp_path, "out", "reference") == []


def test_save_into_a_folder_with_unrelated_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    (out / CONFIG).write_text("{}")
    before = folder_bytes(out)

    with pytest.raises(lorakit.AdapterError, match="exists and is not an adapter folder"):
        lorakit.save_adapter(with_adapter(bert()), out)

    assert folder_bytes(out) == before
    assert leftovers(tmp_path, "mine") == []


def test_save_onto_an_existing_file_is_refused(tmp_path):
    out = tmp_path / "adapter"
    out.write_text("not a folder\n")
    with pytest.raises(lorakit.AdapterError, match="exists and is not an adapter folder"):
        lorakit.save_adapter(with_adapter(bert()), out)
    assert out.read_text() == "not a folder\n"
    assert leftovers(tmp_path, "adapter") == []


def test_save_an_adapter_the_model_does_not_have(tmp_path):
    with pytest.raises(lorakit.AdapterError, match="model has no adapter 'other' to save; loaded: \\['default'\\]"):
        lorakit.save_adapter(with_adapter(bert()), tmp_path / "out", adapter_name="other")
    with pytest.raises(lorakit.AdapterError, match="model has no adapter 'default' to save; loaded: none"):
        lorakit.save_adapter(bert(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a first, partial chunk
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = with_adapter(bert())
    lorakit.save_adapter(first, out)
    before = folder_bytes(out)
    monkeypatch.setattr(lorakit.files.peft_format, "save_file", _failing_save_file)

    with pytest.raises(OSError, match="No space left on device"):
        lorakit.save_adapter(with_adapter(bert(), seed=2), out)

    assert folder_bytes(out) == before
    assert leftovers(tmp_path, "out") == []
    monkeypatch.undo()
    loaded = lorakit.load_adapter(bert(), out)  # still a complete, loadable adapter
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, first(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("swap", ["two-renames", "exchange"])
def test_failed_final_rename_keeps_the_previous_adapter(tmp_path, monkeypatch, swap):
    out = tmp_path / "out"
    lorakit.save_adapter(with_adapter(bert()), out)
    before = folder_bytes(out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # the new adapter cannot be moved into place
            raise OSError(13, "Permission denied")
        return real_replace(src, dst)

    def exchange(a, b):
        if swap == "exchange":  # renameat2 itself refuses
            raise OSError(13, "Permission denied", str(a))
        return False  # a file system without RENAME_EXCHANGE: the two-rename path

    monkeypatch.setattr(lorakit.files.atomic, "_exchange", exchange)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Permission denied"):
        lorakit.save_adapter(with_adapter(bert(), seed=2), out)
    monkeypatch.undo()

    assert folder_bytes(out) == before
    assert leftovers(tmp_path, "out") == []


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(lorakit.files.peft_format, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left on device"):
        lorakit.save_adapter(with_adapter(bert()), tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- LoraConfig validation ------------------------------------------------------------------------
def test_config_lists_every_invalid_field_in_one_error():
    with pytest.raises(lorakit.ConfigError) as info:
        lorakit.LoraConfig(
            r=0,
            alpha=-1,
            dropout=1.5,
            bias="some",
            init="zeros",
            target_modules="(",
            rank_pattern={"query": 0},
            alpha_pattern={"value": "big"},
            enable_lora={"c_attn": [False, False, False]},
        )
    message = str(info.value)
    assert "\n" not in message and message.startswith("invalid LoraConfig: ")
    for fragment in (
        "r=0: must be a positive integer",
        "alpha=-1: must be a positive number",
        "dropout=1.5: must be in [0, 1)",
        "bias='some'",
        "init='zeros'",
        "target_modules='(' is not a valid regular expression",
        "rank_pattern['query']=0",
        "alpha_pattern['value']='big'",
        "enable_lora['c_attn']=[False, False, False]: enable at least one slice",
    ):
        assert fragment in message, fragment
    assert message.count(";") == 8  # nine problems, one error


def test_plain_adapter_into_an_existing_fused_layer_is_refused_before_any_change(tmp_path):
    """A GPT-2 file saved from a fused c_attn holds the plain rank-2r equivalent; loading it
    where a fused layer already sits must fail on shapes and leave that model untouched."""
    fused = lorakit.LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})
    source = lorakit.inject(gpt2(), fused)
    lorakit.save_adapter(source, tmp_path / "adapter")
    target = lorakit.inject(gpt2(), fused, adapter_name="mine")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lorakit.AdapterError, match="has shape"):
        lorakit.load_adapter(target, tmp_path / "adapter", adapter_name="other")
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = lorakit.load_adapter(gpt2(), tmp_path / "adapter")  # a fresh base takes it as plain LoRA
    assert len(lorakit.lora_layers(fresh)) == 2


def test_saved_files_get_the_permissions_of_a_plain_write(tmp_path):
    """Temp folders are 0700 and temp files 0600 by default; a saved adapter must not keep that,
    or an adapter shipped in a package or shared on a server is unreadable to other users."""
    import os

    old = os.umask(0o022)
    try:
        model = lorakit.inject(tiny.bert(0), lorakit.LoraConfig(r=2, target_modules=["query"]))
        out = lorakit.save_adapter(model, tmp_path / "a")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for file in out.iterdir():
        assert file.stat().st_mode & 0o777 == 0o644, file.name
