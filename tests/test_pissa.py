"""PiSSA: initialisation against PEFT's and the SVD, randomized SVD, conversion to plain LoRA.

References: PEFT 0.21's `init_lora_weights="pissa"` on the same base (factors and residual),
torch.linalg.svd, and the unmodified base model loading the converted file (lorakit and PEFT).
"""

from __future__ import annotations

import json

import peft
import pytest
import tiny
import torch
import torch.nn as nn

import lorakit
from lorakit.core.layers import LoraLinear
from lorakit.variants.pissa_convert import save_pissa_as_lora
from lorakit.variants.pissa_init import PissaError, pissa_factors

TOL = 1e-5
BUILDERS = {"bert": tiny.bert, "gpt2": tiny.gpt2, "llama": tiny.llama}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "down_proj"]}
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))


def base(arch: str) -> nn.Module:
    return BUILDERS[arch](seed=0).eval()


def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


def train_a_little(model: nn.Module, steps: int = 3) -> None:
    """Optimizer steps on the adapter, then a random push (so B A moves well away from B0 A0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        logits(model).float().pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():  # tiny random models give tiny gradients: move the adapter visibly too
        gen = torch.Generator().manual_seed(5)
        for param in params:
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("arch", BUILDERS)
def test_fresh_pissa_adapter_is_the_base_and_matches_peft(arch):
    model = base(arch)
    reference = logits(model)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch], init="pissa")
    lorakit.inject(model, config)
    assert (logits(model) - reference).abs().max() <= TOL
    theirs = peft.get_peft_model(
        base(arch),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa", fan_in_fan_out=arch == "gpt2"
        ),
    )
    peft_state = {
        k.removeprefix("base_model.model.").replace(".default.weight", ".default"): v
        for k, v in theirs.state_dict().items()
    }
    ours = model.state_dict()
    assert set(ours) <= set(peft_state)
    for key, value in ours.items():  # factors and residual base weights alike
        assert (value - peft_state[key]).abs().max() <= 1e-6, key


def test_factors_are_the_scaled_top_singular_triplets():
    torch.manual_seed(0)
    weight = torch.randn(20, 12)
    A, B = pissa_factors(weight, 3, 0.5, "pissa")
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    truncation = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    assert (0.5 * B @ A - truncation).abs().max() <= 1e-5
    assert torch.allclose(A @ A.t(), torch.diag(S[:3] / 0.5), atol=1e-4)  # A's rows: sqrt(S/s) V^T


def test_randomized_svd_is_close_to_the_full_one():
    torch.manual_seed(0)
    # A spectrum that decays (as trained weights' do): rank-4 signal plus small noise.
    weight = torch.randn(64, 4) @ torch.randn(4, 48) + 0.01 * torch.randn(64, 48)
    A, B = pissa_factors(weight, 4, 2.0, "pissa")
    A_fast, B_fast = pissa_factors(weight, 4, 2.0, "pissa_niter_4")
    exact, fast = B @ A, B_fast @ A_fast
    assert (exact - fast).norm() / exact.norm() <= 1e-3
    model = base("llama")
    reference = logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init="pissa_niter_2"))
    assert (logits(model) - reference).abs().max() <= TOL


@pytest.mark.parametrize(("arch", "rslora"), [("bert", False), ("gpt2", True), ("llama", False)])
def test_converted_adapter_on_the_original_base_equals_the_trained_pissa_model(arch, rslora, tmp_path):
    pattern = {"q_proj": 2} if arch == "llama" else {}
    config = lorakit.LoraConfig(
        r=4, alpha=8, target_modules=TARGETS[arch], init="pissa", use_rslora=rslora, rank_pattern=pattern
    )
    model = lorakit.inject(base(arch), config)
    train_a_little(model)
    trained = logits(model).detach()
    assert (trained - logits(base(arch))).abs().max() > 100 * TOL  # training moved the adapter
    save_pissa_as_lora(model, tmp_path / "lora")
    assert (logits(model) - trained).abs().max() == 0  # the model is left as it was
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * (2**0.5 if rslora else 2))
    assert saved["rank_pattern"] == {k: 2 * v for k, v in pattern.items()}
    ours = lorakit.load_adapter(base(arch), tmp_path / "lora")  # the fingerprint check passes: original base
    assert (logits(ours) - trained).abs().max() <= TOL
    theirs = peft.PeftModel.from_pretrained(base(arch), str(tmp_path / "lora")).eval()
    assert (logits(theirs) - trained).abs().max() <= TOL


def test_conversion_from_an_initial_adapter_folder(tmp_path):
    config = lorakit.LoraConfig(r=4, target_modules=TARGETS["llama"], init="pissa")
    model = lorakit.inject(base("llama"), config)
    lorakit.save_adapter(model, tmp_path / "initial")  # right after initialisation, as in PEFT
    train_a_little(model)
    trained = logits(model).detach()
    for layer in (m for _, m in lorakit.lora_layers(model)):
        layer.pissa_initial.clear()  # as if training ran in another process
    with pytest.raises(lorakit.errors.UsageError, match="pass initial="):
        save_pissa_as_lora(model, tmp_path / "lora")
    save_pissa_as_lora(model, tmp_path / "lora", initial=tmp_path / "initial")
    converted = lorakit.load_adapter(base("llama"), tmp_path / "lora")
    assert (logits(converted) - trained).abs().max() <= TOL


def test_refusals_leave_things_unchanged():
    layer = LoraLinear(nn.Linear(12, 12), enable_lora=[True, False, True])
    weight = layer.base_layer.weight.clone()
    with pytest.raises(PissaError, match="fused projections"):
        layer.add_adapter("a", 2, 1.0, init="pissa")
    assert not layer.lora_A and torch.equal(layer.base_layer.weight, weight)
    plain = LoraLinear(nn.Linear(6, 5))
    with pytest.raises(PissaError, match="rank 8 exceeds"):
        plain.add_adapter("a", 8, 1.0, init="pissa")
    plain.add_adapter("a", 2, 1.0)
    with pytest.raises(PissaError, match="already holds adapters"):
        plain.add_adapter("b", 2, 1.0, init="pissa")
    assert list(plain.lora_A) == ["a"]
    model = lorakit.inject(base("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.errors.UsageError, match="not initialised with PiSSA"):
        save_pissa_as_lora(model, "/nonexistent/never-written")
    for bad in ("pissa_niter_0", "pissa_fast", "svd"):
        with pytest.raises(lorakit.ConfigError, match="pissa_niter_<N>"):
            lorakit.LoraConfig(init=bad)


def test_pissa_with_dora_matches_peft():
    model = lorakit.inject(
        base("llama"), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="pissa", use_dora=True)
    )
    theirs = peft.get_peft_model(
        base("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True),
    )
    layer, peft_layer = model.model.layers[0].self_attn.q_proj, theirs.base_model.model.model.layers[0].self_attn.q_proj
    want = peft_layer.lora_magnitude_vector["default"].weight
    assert (layer.lora_magnitude_vector["default"] - want).abs().max() <= 1e-5
    assert (logits(model) - logits(theirs)).abs().max() <= TOL
