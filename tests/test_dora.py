"""DoRA: the maths against dense float64 autograd, PEFT's DoRA both ways, merge / unmerge, errors.

References: the DoRA formula written out densely (W' = W0 + s B A, y = m / ||W'||_row * W' x + b,
the norm a constant for the gradient), and PEFT 0.21's DoRA on the same base and adapter weights.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import tiny
import torch
import torch.nn as nn
from test_train_fixtures import bert_dir, cls_files  # noqa: F401
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.core.layers import LoraLinear
from lorakit.variants import dora

TOL = 1e-5
BUILDERS = {"bert": tiny.bert, "gpt2": tiny.gpt2, "llama": tiny.llama}
TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_fc", "c_proj"], "llama": ["q_proj", "down_proj"]}
pytestmark = pytest.mark.filterwarnings("error:Found missing adapter keys")


def base(arch: str) -> nn.Module:
    return BUILDERS[arch](seed=0).eval()


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial adapter weights (a fresh DoRA adapter is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)


# 24 tokens take the merged paths (fused training function / merged inference), 5 the reference one.
INPUTS = [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(7)), torch.randint(0, 100, (1, 5))]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def dense_dora(x, w0, bias, A, B, m, s):
    """The formula, densely: W' = W0 + s B A, y = m / ||W'||_row (detached) * (x W'^T) + bias."""
    adapted = w0 + s * B @ A
    norm = adapted.detach().norm(dim=1)
    y = (m / norm) * (x @ adapted.t())
    return y + bias if bias is not None else y


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [40, 3])  # fused autograd function / reference path
def test_forward_and_gradients_equal_dense_float64(kind, tokens):
    torch.manual_seed(0)
    d_in, d_out, r, s = 12, 10, 3, 0.7
    module = nn.Linear(d_in, d_out).double() if kind == "linear" else Conv1D(d_out, d_in).double()
    with torch.no_grad():
        module.bias.normal_()
    layer = LoraLinear(module)
    layer.add_adapter("a", r, s, use_dora=True)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_magnitude_vector["a"].mul_(torch.rand(d_out, dtype=torch.float64) + 0.5)
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w0 = module.weight.t() if kind == "conv1d" else module.weight
    params = [layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]]
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = dense_dora(x_ref, w0.detach(), module.bias.detach(), refs[0], refs[1], refs[2], s)
    assert torch.allclose(y, y_ref, atol=1e-12, rtol=1e-10)
    weights = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x_ref, *refs])
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_fused_function_passes_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(4, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A, B = torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    m = torch.rand(4, dtype=torch.float64) + 0.5
    A, B, m = (t.requires_grad_(True) for t in (A, B, m))

    # gradcheck differentiates the norm too; the function treats it as a constant (DoRA 4.3):
    # check x, bias and m (whose gradients do not involve the norm's derivative) numerically.
    def f(x, bias, m):
        return dora.DoraLinearFunction.apply(x, w0, bias, A.detach(), B.detach(), m, 0.5)

    assert torch.autograd.gradcheck(f, (x, bias, m))


@pytest.mark.parametrize("arch", BUILDERS)
def test_fresh_dora_adapter_is_the_base(arch):
    model = base(arch)
    reference = [logits(model, ids) for ids in INPUTS]
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    for ids, want in zip(INPUTS, reference, strict=True):
        assert torch.allclose(logits(model, ids), want, atol=1e-6)
        with torch.enable_grad():
            assert torch.allclose(logits(model, ids), want, atol=1e-6)


@pytest.mark.parametrize("arch", BUILDERS)
def test_lorakit_file_in_peft_and_peft_file_in_lorakit(arch, tmp_path):
    ours = lorakit.inject(base(arch), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    randomise(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(arch), str(tmp_path / "ours")).eval()
    for ids in INPUTS:
        assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= TOL
    # PEFT's own DoRA adapter, trained-looking, into lorakit.
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, fan_in_fan_out=arch == "gpt2"
    )
    peft_model = peft.get_peft_model(base(arch), peft_config).eval()
    randomise(peft_model, seed=5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = lorakit.load_adapter(base(arch), tmp_path / "peft")
    for ids in INPUTS:
        assert (logits(loaded, ids) - logits(peft_model, ids)).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_training_gradients_equal_peft(arch, tmp_path):
    ours = lorakit.inject(base(arch), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    randomise(ours)
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(base(arch), str(tmp_path / "a"), is_trainable=True).eval()
    ids = INPUTS[0]
    weights = torch.randn(logits(ours, ids).shape)
    (logits(ours, ids) * weights).sum().backward()
    (logits(theirs, ids) * weights).sum().backward()
    peft_grads = {
        n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters()
        if "lora_" in n
    }
    checked = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            want = peft_grads[name.replace(".default", "")]
            assert (param.grad - want).abs().max() <= 1e-5 * want.abs().max() + 1e-8
            checked += 1
    assert checked == len(peft_grads) and checked == 3 * len(lorakit.lora_layers(ours))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_equals_unmerged_and_unmerge_restores_bits(arch):
    model = lorakit.inject(base(arch), lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], use_dora=True))
    randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = [logits(model, ids) for ids in INPUTS]
    lorakit.merge(model)
    for ids, want in zip(INPUTS, unmerged, strict=True):
        assert (logits(model, ids) - want).abs().max() <= TOL
    lorakit.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = lorakit.merge_and_unload(model)
    assert not lorakit.lora_layers(plain)
    assert (logits(plain, INPUTS[0]) - unmerged[0]).abs().max() <= TOL


def test_fused_projection_with_dora_equals_dense_and_peft(tmp_path):
    """GPT-2's c_attn with only q and v adapted (enable_lora): DoRA over the block-structured B."""
    enable = {"c_attn": [True, False, True]}
    config = lorakit.LoraConfig(r=2, target_modules=["c_attn"], enable_lora=enable, use_dora=True)
    model = lorakit.inject(base("gpt2"), config)
    randomise(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(40, layer.in_features, requires_grad=True)
    w0 = layer.base_layer.weight.t()
    A, m = layer.lora_A["default"], layer.lora_magnitude_vector["default"]
    want = dense_dora(x, w0, layer.base_layer.bias, A, layer.full_B("default"), m, layer.scaling["default"])
    assert (layer(x) - want).abs().max() <= TOL  # fused training function
    assert (layer(x[:3]) - want[:3]).abs().max() <= TOL  # reference path
    lorakit.save_adapter(model, tmp_path / "a")  # written as the equivalent plain rank-2r DoRA
    theirs = peft.PeftModel.from_pretrained(base("gpt2"), str(tmp_path / "a")).eval()
    assert (logits(theirs, INPUTS[0]) - logits(model, INPUTS[0])).abs().max() <= TOL


def test_dora_and_plain_adapters_active_together_add_up():
    model = base("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True), "d")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["q_proj"]), "p")
    randomise(model)
    lorakit.set_adapter(model, ["d", "p"])
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(30, layer.in_features)
    w0 = layer.base_layer.weight
    A, B, m, s = layer.lora_A["d"], layer.lora_B["d"], layer.lora_magnitude_vector["d"], layer.scaling["d"]
    want = dense_dora(x, w0, None, A, B, m, s) + x @ (layer.scaling["p"] * layer.lora_B["p"] @ layer.lora_A["p"]).t()
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= TOL  # merged inference path
        assert (layer(x[:3]) - want[:3]).abs().max() <= TOL  # reference path
    assert (layer(x) - want).abs().max() <= TOL  # with autograd: reference path (two adapters)
    layer.merge()
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= TOL


def test_dropout_follows_peft():
    """With LoRA dropout PEFT computes (g - 1) W0 drop(x) + g s B A drop(x) on top of W0 x + b."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("a", 2, 1.5, dropout=0.5, use_dora=True)
    randomise(layer)
    layer.train()
    x = torch.randn(40, 8)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    w0, A, B, m = layer.base_layer.weight, layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]
    g = m / (w0 + 1.5 * B @ A).norm(dim=1)
    want = layer.base_layer(x) + (g - 1) * (dropped @ w0.t()) + g * 1.5 * (dropped @ A.t() @ B.t())
    assert (y - want).abs().max() <= TOL


def test_magnitude_trains_and_saves_under_peft_key(tmp_path):
    model = lorakit.inject(base("bert"), lorakit.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("lora_magnitude_vector" in n for n in trainable) == 2
    lorakit.save_adapter(model, tmp_path / "a")
    _, tensors, _ = lorakit.read_adapter(tmp_path / "a")
    key = "bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    assert tensors[key].shape == (32,)
    assert torch.equal(tensors[key], model.bert.encoder.layer[0].attention.self.query.lora_magnitude_vector["default"])


def test_missing_magnitude_and_non_linear_targets_are_refused(tmp_path):
    model = lorakit.inject(base("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lorakit.save_adapter(model, tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json").read_text()
    plain = lorakit.inject(base("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(plain, tmp_path / "plain")
    (tmp_path / "plain" / "adapter_config.json").write_text(config)  # says DoRA, has no magnitudes
    fresh = base("llama")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(lorakit.AdapterError, match="missing key .*lora_magnitude_vector"):
        lorakit.load_adapter(fresh, tmp_path / "plain")
    assert not lorakit.lora_layers(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(lorakit.TargetError, match="DoRA adapts linear layers only"):
        lorakit.inject(fresh, lorakit.LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert not lorakit.lora_layers(fresh)


def test_config_round_trip_and_validation():
    config = lorakit.LoraConfig(use_dora=True)
    assert config.to_peft_dict(None, None)["use_dora"] is True
    assert lorakit.LoraConfig.from_peft_dict(config.to_peft_dict(None, None)).use_dora is True
    with pytest.raises(lorakit.ConfigError, match="use_dora='yes'"):
        lorakit.LoraConfig(use_dora="yes")


# --- the train command's variant flags -------------------------------------------------------
def test_train_cli_dora_pissa_and_patterns(tmp_path, bert_dir, cls_files):  # noqa: F811
    """--dora / --init pissa / --rank-pattern / --alpha-pattern / --rslora reach the adapter file,
    and the PiSSA run's adapter (converted) works on the ORIGINAL base in PEFT."""
    from transformers import AutoModelForSequenceClassification

    from lorakit.cli import main

    common = ["--model", str(bert_dir), "--train", str(cls_files[0]), "--max-steps", "2", "--batch-size", "8"]
    common += ["--no-progress", "--targets", "query,value", "--rank", "4"]
    config = tmp_path / "variants.toml"
    config.write_text('dora = true\nrank-pattern = "query=2"\nalpha-pattern = "value=3"\nrslora = true\n')
    assert main(["train", *common, "--out", str(tmp_path / "dora"), "--config", str(config)]) == 0
    saved = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    assert saved["rank_pattern"] == {"query": 2} and saved["alpha_pattern"] == {"value": 3}
    _, tensors, _ = lorakit.read_adapter(tmp_path / "dora" / "adapter")
    assert tensors["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (2, 32)
    assert "bert.encoder.layer.0.attention.self.value.lora_magnitude_vector" in tensors

    assert main(["train", *common, "--out", str(tmp_path / "pissa"), "--init", "pissa", "--pissa-niter", "3"]) == 0
    saved = json.loads((tmp_path / "pissa" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # rank 2r: plain LoRA on the original base

    def classifier():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3).eval()

    ours = lorakit.load_adapter(classifier(), tmp_path / "pissa" / "adapter")
    theirs = peft.PeftModel.from_pretrained(classifier(), str(tmp_path / "pissa" / "adapter")).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    assert (ours(ids).logits - theirs(ids).logits).abs().max() <= TOL
    with torch.no_grad():
        assert (ours(ids).logits - classifier()(ids).logits).abs().max() > 0  # the adapter does something


def test_train_cli_variant_flag_errors(tmp_path, capsys, bert_dir, cls_files):  # noqa: F811
    from lorakit.cli import main

    common = ["train", "--model", str(bert_dir), "--train", str(cls_files[0]), "--out", str(tmp_path / "r")]
    for flags, expected in [
        (["--pissa-niter", "2", "--init", "gaussian"], "--pissa-niter 2 goes with --init pissa"),
        (["--rank-pattern", "query:4"], "query:4"),
        (["--dora", "--full"], "drop --full"),
    ]:
        code = main([*common, "--no-progress", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "r").exists()


def test_inference_cache_sees_a_changed_magnitude():
    """Merged inference caches W0 + dW; an in-place update of m alone must not serve a stale weight."""
    layer = LoraLinear(nn.Linear(16, 12))
    layer.add_adapter("a", 2, 1.0, use_dora=True)
    randomise(layer)
    x = torch.randn(64, 16)
    with torch.no_grad():
        first = layer(x)
        layer.lora_magnitude_vector["a"].mul_(2.0)
        second = layer(x)
    bias = layer.base_layer.bias
    assert (second - bias - 2 * (first - bias)).abs().max() <= TOL
