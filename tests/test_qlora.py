"""QLoRA: LoRA over a 4-bit NF4 base (lorakit.variants.qlora), checked against dense maths on the
dequantised weights, PEFT on the same quantized base, and file round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

import bitsandbytes as bnb  # noqa: E402
import tiny  # noqa: E402
from test_train_fixtures import bert_dir, cls_files  # noqa: E402, F401

import lorakit  # noqa: E402
from lorakit.core.inject import lora_layers  # noqa: E402
from lorakit.errors import UsageError  # noqa: E402
from lorakit.variants import qlora as quant  # noqa: E402

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def quantized_llama(seed: int = 0) -> nn.Module:
    return quant.quantize_model(tiny.llama(seed).eval())


def with_adapter(model: nn.Module, r: int = 4, seed: int = 2) -> nn.Module:
    """Inject an adapter and give B non-zero values so the adapter really changes outputs."""
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.1)
    return model


def test_quantize_model_replaces_linears_only_and_matches_dequantised_weights():
    model = quantized_llama()
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is bnb.nn.Linear4bit
    assert kinds["model.layers.1.mlp.down_proj"] is bnb.nn.Linear4bit
    assert kinds["lm_head"] is nn.Linear  # the head stays full precision
    assert kinds["model.embed_tokens"] is nn.Embedding
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantisation
    x = torch.randn(5, layer.in_features)
    dense = F.linear(x.double(), quant.dequantize_weight(layer).double())
    torch.testing.assert_close(layer(x).double(), dense, atol=1e-5, rtol=1e-5)
    # NF4 is lossy but close: 16 levels over [-absmax, absmax], widest gap 0.28 of absmax (1.0 - 0.723).
    original = tiny.llama(0).model.layers[0].mlp.up_proj.weight
    assert 0 < (quant.dequantize_weight(layer) - original).abs().max() <= 0.14 * original.abs().max()


def test_fresh_adapter_equals_quantized_base():
    model = quantized_llama()
    base_out = model(IDS).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    assert all(layer.quantized for _, layer in lora_layers(model))
    assert torch.equal(model(IDS).logits, base_out)


@pytest.mark.parametrize("build", [tiny.llama, tiny.gpt2])
def test_lora_on_nf4_equals_dense_maths(build):
    model = with_adapter(quant.quantize_model(build(0).eval()))
    for _, layer in lora_layers(model):
        x = torch.randn(3, 4, layer.in_features)
        A, B = layer.lora_A["default"].double(), layer.lora_B["default"].double()
        W = quant.dequantize_weight(layer.base_layer).double()
        bias = layer.bias.double() if layer.bias is not None else 0
        expected = x.double() @ W.T + bias + layer.scaling["default"] * (x.double() @ A.T) @ B.T
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    # Whole model: the same adapters over the dequantised (dense) base.
    dense = quant.dequantize_model(copy.deepcopy(model))
    assert not any(layer.quantized for _, layer in lora_layers(dense))
    torch.testing.assert_close(model(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=1e-5)


def test_gradients_only_on_adapters_and_equal_to_dense_autograd():
    model = with_adapter(quantized_llama()).train()
    dense = quant.dequantize_model(copy.deepcopy(model))
    for m in (model, dense):
        m(IDS, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, dense_params[name].grad, atol=1e-5, rtol=1e-4)
    # One optimizer step moves only the adapters; the packed 4-bit codes stay as they were.
    codes = model.model.layers[0].self_attn.q_proj.base_layer.weight.data.clone()
    before = model(IDS).logits.detach()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight.data, codes)
    assert not torch.allclose(model(IDS).logits, before)


def test_merge_is_refused_with_the_dequantise_offer_and_changes_nothing():
    model = with_adapter(quantized_llama())
    before = model(IDS).logits
    for action in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(UsageError, match=r"quant.*dequantize_model"):
            action(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    assert torch.equal(model(IDS).logits, before)


def test_dequantise_then_merge_equals_unmerged():
    model = with_adapter(quantized_llama())
    unmerged = model(IDS).logits
    quant.dequantize_model(model)
    lorakit.merge(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(model)
    assert not lora_layers(plain) and not any(quant.is_quantized(m) for m in plain.modules())
    torch.testing.assert_close(plain(IDS).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_memory_report_counts_packed_codes_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 4))
    fp32 = quant.memory_report(model)
    assert fp32["quantized_layers"] == 0 and fp32["base_bytes"] == fp32["fp32_bytes"] == 4 * (512 * 512 + 2052)
    quant.quantize_model(model, targets=["0"])
    report = quant.memory_report(model)
    assert report["quantized_layers"] == 1 and report["fp32_bytes"] == fp32["fp32_bytes"]
    state = model[0].weight.quant_state
    blocks = 512 * 512 // 64
    # 4 bits per weight, one 8-bit absmax per 64-weight block (double quantisation), then small extras.
    assert model[0].weight.data.numel() == 512 * 512 // 2 and state.absmax.dtype == torch.uint8
    assert state.absmax.numel() == blocks
    quantized_bytes = report["base_bytes"] - 4 * 2052
    assert report["quantized_bytes"] == quantized_bytes and report["quantized_fp32_bytes"] == 4 * 512 * 512
    assert 512 * 512 // 2 + blocks <= quantized_bytes < 512 * 512 // 2 + blocks + 4096
    assert report["ratio"] < 0.2
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=["0"]))
    assert quant.memory_report(model) == report  # adapters are not base memory


def test_adapter_round_trip_quantized_fp32_and_peft(tmp_path):
    model = with_adapter(quantized_llama())
    lorakit.save_adapter(model, tmp_path / "a")
    expected = model(IDS).logits
    # Into a fresh quantized base: bit-identical outputs.
    again = lorakit.load_adapter(quantized_llama(), tmp_path / "a")
    assert torch.equal(again(IDS).logits, expected)
    # Into PEFT over the same quantized base.
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(quantized_llama(), str(tmp_path / "a"))
    torch.testing.assert_close(peft_model(IDS).logits, expected, atol=1e-6, rtol=1e-6)
    # Into the original fp32 base: the fingerprint is the fp32 weights' (the 4-bit layers keep
    # it), so no force is needed; another base is still refused.
    with pytest.raises(lorakit.AdapterError, match="different base"):
        lorakit.load_adapter(tiny.llama(1).eval(), tmp_path / "a")
    fp32 = lorakit.load_adapter(tiny.llama(0).eval(), tmp_path / "a")
    for (name, layer), (_, ref) in zip(lora_layers(fp32), lora_layers(model), strict=True):
        assert torch.equal(layer.lora_A["default"], ref.lora_A["default"]), name
        assert torch.equal(layer.lora_B["default"], ref.lora_B["default"]), name
    lorakit.merge(fp32)  # the fp32 base takes the merge
    dense = quant.dequantize_model(copy.deepcopy(model))
    lorakit.merge(dense)
    # Merged fp32 differs from merged-dequantised only by the NF4 error of the base.
    assert (fp32(IDS).logits - dense(IDS).logits).abs().max() < 0.2


def test_quantize_after_inject_is_refused():
    model = lorakit.inject(tiny.llama(0), lorakit.LoraConfig(r=2))
    with pytest.raises(UsageError, match="before lorakit.inject"):
        quant.quantize_model(model)


def test_quantize_targets_and_keep():
    model = quant.quantize_model(tiny.llama(0), targets=["q_proj", "up_proj", "down_proj"], keep=["down_proj"])
    kinds = {name.split(".")[-1]: type(m) for name, m in model.named_modules()}
    assert kinds["q_proj"] is bnb.nn.Linear4bit and kinds["up_proj"] is bnb.nn.Linear4bit
    assert kinds["down_proj"] is nn.Linear and kinds["k_proj"] is nn.Linear


def test_train_cli_quantize_nf4(tmp_path, capsys, bert_dir, cls_files):  # noqa: F811
    from test_train_cli import train_args
    from transformers import AutoModelForSequenceClassification

    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(train_args(bert_dir, cls_files, out, "--quantize", "nf4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    # The adapter was trained over the NF4 base: it loads (fingerprint included) into that base.
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3).eval()
    quant.quantize_model(base, keep=["classifier"])
    loaded = lorakit.load_adapter(base, out / "adapter")
    assert all(layer.quantized for _, layer in lora_layers(loaded))
    assert any(layer.lora_B["default"].abs().sum() > 0 for _, layer in lora_layers(loaded))  # it trained
    capsys.readouterr()
    assert main(train_args(bert_dir, cls_files, tmp_path / "bad", "--quantize", "nf4", "--full")) == 2
    assert "drop --full" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_badly_quantized_layer_stays_full_precision_and_is_reported(monkeypatch, caplog):
    original = tiny.llama(0).eval()
    model = copy.deepcopy(original)
    target, real = model.model.layers[0].mlp.gate_proj, quant._quantize_layer

    def damaging(module, weight, *args):  # this one layer gets the NF4 codes of another weight
        return real(module, weight.flip(0) if module is target else weight, *args)

    monkeypatch.setattr(quant, "_quantize_layer", damaging)
    with caplog.at_level("WARNING", logger="lorakit.variants.qlora"):
        quant.quantize_model(model)
    report = model.quant_report
    assert list(report.kept) == ["model.layers.0.mlp.gate_proj"] and report.kept["model.layers.0.mlp.gate_proj"] > 1
    kept = model.model.layers[0].mlp.gate_proj
    assert type(kept) is nn.Linear and torch.equal(kept.weight, original.model.layers[0].mlp.gate_proj.weight)
    assert type(model.model.layers[0].mlp.up_proj) is bnb.nn.Linear4bit
    assert len(report.quantized) == 13 and all(quant.is_quantized(model.get_submodule(n)) for n in report.quantized)
    assert report.memory == quant.memory_report(model) and report.memory["quantized_layers"] == 13
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "model.layers.0.mlp.gate_proj" in line and "MiB saved" in line


def test_real_bitsandbytes_keeps_nothing_back_and_the_bound_holds():
    original = tiny.llama(0).eval()
    model = quant.quantize_model(copy.deepcopy(original))
    assert model.quant_report.kept == {} and len(model.quant_report.quantized) == 14
    for name in model.quant_report.quantized:
        layer = model.get_submodule(name)
        ratio = quant.nf4_error_ratio(original.get_submodule(name).weight, quant.dequantize_weight(layer), 64, True)
        assert 0 < ratio <= 1, name
