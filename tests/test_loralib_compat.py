"""`import lorakit as lora` against Microsoft's loralib (0.1.2): same parameter and state-dict
names and shapes, interchangeable checkpoints, same outputs, same trainable-parameter rules,
and merge_weights behaving as in loralib (but unmerging bit for bit)."""

from __future__ import annotations

import loralib
import pytest
import torch
import torch.nn as nn

import lorakit as lora

MASK = [True, False, True]

# name -> constructor taking the library module (loralib or lorakit) and extra keyword arguments
CASES = {
    "linear": lambda lib, **kw: lib.Linear(8, 12, r=2, lora_alpha=4, **kw),
    "linear_no_bias": lambda lib, **kw: lib.Linear(8, 12, r=2, lora_alpha=4, bias=False, **kw),
    "linear_fan_in_fan_out": lambda lib, **kw: lib.Linear(8, 12, r=2, lora_alpha=4, fan_in_fan_out=True, **kw),
    "merged_linear": lambda lib, **kw: lib.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=MASK, **kw),
    "merged_linear_fan_in_fan_out": lambda lib, **kw: lib.MergedLinear(
        8, 12, r=2, lora_alpha=4, enable_lora=MASK, fan_in_fan_out=True, **kw
    ),
    "embedding": lambda lib, **kw: lib.Embedding(10, 6, r=2, lora_alpha=4, padding_idx=0, **kw),
    "conv2d": lambda lib, **kw: lib.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1, **kw),
    "conv1d": lambda lib, **kw: lib.Conv1d(3, 4, 1, r=2, lora_alpha=4, **kw),  # loralib's Conv1d: k=1 only
}
NAMES = list(CASES)


def make_input(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if case == "embedding":
        return torch.tensor([[0, 1, 2, 3, 9], [4, 5, 0, 7, 8]])
    if case == "conv2d":
        return torch.randn(2, 3, 6, 6, generator=g)
    if case == "conv1d":
        return torch.randn(2, 3, 7, generator=g)
    return torch.randn(2, 5, 8, generator=g)  # 10 tokens: lorakit's no_grad fly-merge path applies


def build(case: str, lib, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[case](lib, **kw)


def randomise_lora(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Random A and B (B non-zero) on every parameter named lora_*."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


def pair(case: str, **kw) -> tuple[nn.Module, nn.Module]:
    """(loralib layer with random LoRA weights, lorakit layer loaded from its full state_dict)."""
    theirs = build(case, loralib, **kw)
    randomise_lora(theirs)
    ours = build(case, lora, seed=5, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def main_weight(module: nn.Module) -> torch.Tensor:
    return module.conv.weight if hasattr(module, "conv") else module.weight


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output with autograd on, output under no_grad)."""
    with torch.no_grad():
        fast = module(x)
    return module(x), fast


# --- names and shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", NAMES)
def test_same_state_dict_names_and_shapes(case):
    theirs, ours = build(case, loralib), build(case, lora)
    assert shapes(ours) == shapes(theirs)
    theirs.eval()  # merged (merge_weights=True): still the same keys
    ours.eval()
    assert shapes(ours) == shapes(theirs)
    for bias in ("none", "all", "lora_only"):
        assert set(lora.lora_state_dict(ours, bias)) == set(loralib.lora_state_dict(theirs, bias)), bias
    assert {k for k in shapes(ours) if "lora_" in k} == {"lora_A", "lora_B"}


def test_r0_linear_is_a_plain_trainable_layer_as_in_loralib():
    torch.manual_seed(0)
    theirs, ours = loralib.Linear(8, 12), lora.Linear(8, 12)
    assert shapes(ours) == shapes(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input("linear")
    assert torch.equal(ours(x), theirs(x))
    assert all(p.requires_grad for p in ours.parameters())
    assert lora.lora_state_dict(ours) == {} == loralib.lora_state_dict(theirs)


# --- checkpoints both ways, same outputs -----------------------------------------------------------
@pytest.mark.parametrize("case", NAMES)
def test_loralib_state_dict_loads_into_lorakit_with_same_outputs_and_grads(case):
    theirs, ours = pair(case)
    x = make_input(case)
    theirs.train()
    ours.train()
    t_grad, ref = theirs(x), theirs(x).detach()
    o_grad, o_fast = outputs(ours, x)  # lorakit: factored path, and W + dW path under no_grad
    assert max_diff(o_grad, ref) <= 1e-6
    assert max_diff(o_fast, ref) <= 1e-6

    # the same gradients reach the same (loralib-named) parameters
    t_grad.square().sum().backward()
    o_grad.square().sum().backward()
    t_params = theirs.state_dict(keep_vars=True)
    o_params = ours.state_dict(keep_vars=True)
    assert theirs.lora_A.grad is not None and theirs.lora_B.grad.abs().sum() > 0
    for key, param in t_params.items():
        if param.grad is None:
            assert o_params[key].grad is None, key
        else:
            torch.testing.assert_close(o_params[key].grad, param.grad, rtol=1e-5, atol=1e-5)

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= 1e-6
        assert max_diff(ours(x), ref) <= 1e-5


@pytest.mark.parametrize("case", NAMES)
def test_lorakit_state_dict_loads_into_loralib_with_same_outputs(case):
    ours = build(case, lora)
    randomise_lora(ours, seed=3)
    theirs = build(case, loralib, seed=9)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input(case)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= 1e-6
        ours.eval()
        theirs.eval()
        assert max_diff(ours(x), theirs(x)) <= 1e-6
        # a checkpoint written in eval mode (merged weights, as loralib writes it) loads strictly
        merged_state = ours.state_dict()
        for key, value in theirs.state_dict().items():
            assert max_diff(merged_state[key], value) <= 1e-6, key
        fresh = build(case, loralib, seed=11)
        fresh.eval()  # loralib's train() returns None, so no chaining
        fresh.load_state_dict(merged_state, strict=True)
        assert max_diff(fresh(x), theirs(x)) <= 1e-6


# --- a whole model: loralib checkpoint files into lorakit -----------------------------------------
class Net(nn.Module):
    def __init__(self, lib) -> None:
        super().__init__()
        self.emb = lib.Embedding(20, 8, r=2, lora_alpha=4)
        self.qkv = lib.MergedLinear(8, 24, r=2, lora_alpha=4, enable_lora=MASK, fan_in_fan_out=True)
        self.fc = lib.Linear(24, 8, r=2, lora_alpha=4)
        self.conv = lib.Conv2d(1, 2, 3, r=2, lora_alpha=4, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.qkv(self.emb(ids)))
        h = self.conv(h.unsqueeze(1)).mean(1)
        return self.head(self.norm(h))


def ids() -> torch.Tensor:
    return torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(4))


def test_loralib_checkpoint_files_load_into_lorakit(tmp_path):
    torch.manual_seed(0)
    theirs = Net(loralib)
    randomise_lora(theirs)
    pretrained = {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}
    torch.save(pretrained, tmp_path / "pretrained.pt")
    torch.save(loralib.lora_state_dict(theirs), tmp_path / "lora.pt")

    torch.manual_seed(1)
    ours = Net(lora)
    # loralib's recipe: load the pretrained checkpoint, then the LoRA one, both strict=False
    first = ours.load_state_dict(torch.load(tmp_path / "pretrained.pt"), strict=False)
    second = ours.load_state_dict(torch.load(tmp_path / "lora.pt"), strict=False)
    assert first.unexpected_keys == [] and second.unexpected_keys == []
    assert len(first.missing_keys) == 8  # the four layers' A and B
    assert set(ours.state_dict()) == set(theirs.state_dict())

    x = ids()
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        with torch.no_grad():
            assert max_diff(ours(x), theirs(x)) <= 1e-5, mode
    assert lora.lora_state_dict(ours).keys() == loralib.lora_state_dict(theirs).keys()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_marks_same_names_as_loralib(bias):
    torch.manual_seed(0)
    theirs, ours = Net(loralib), Net(lora)
    loralib.mark_only_lora_as_trainable(theirs, bias)
    lora.mark_only_lora_as_trainable(ours, bias)
    t_flags = {k: p.requires_grad for k, p in theirs.state_dict(keep_vars=True).items()}
    o_flags = {k: p.requires_grad for k, p in ours.state_dict(keep_vars=True).items()}
    assert o_flags == t_flags
    assert sum(t_flags.values()) >= 8  # A and B of four layers at least
    # what trains is what lora_state_dict saves
    trained = {k for k, flag in o_flags.items() if flag}
    assert set(lora.lora_state_dict(ours, bias)) == trained == set(loralib.lora_state_dict(theirs, bias))


# --- merge_weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", NAMES)
def test_merge_weights_true_merges_on_eval_and_unmerges_exactly_on_train(case):
    theirs, ours = pair(case)
    x = make_input(case)
    ours.train()
    before = main_weight(ours).detach().clone()
    with torch.no_grad():
        train_out = ours(x)
        ours.eval()
        theirs.eval()
        assert not torch.equal(main_weight(ours), before)
        assert max_diff(main_weight(ours), main_weight(theirs)) <= 1e-6  # same merged weight as loralib
        eval_out = ours(x)
        assert max_diff(eval_out, train_out) <= 1e-6
        assert max_diff(eval_out, theirs(x)) <= 1e-6
        ours.train()
        assert torch.equal(main_weight(ours), before)
        assert torch.equal(ours(x), train_out)


@pytest.mark.parametrize("case", NAMES)
def test_merge_weights_false_does_not_merge_on_eval(case):
    theirs, ours = pair(case, merge_weights=False)
    x = make_input(case)
    before = main_weight(ours).detach().clone()
    with torch.no_grad():
        train_out = ours(x)
        ours.eval()
        theirs.eval()
        assert torch.equal(main_weight(ours), before)
        assert not ours.merged
        assert max_diff(ours(x), train_out) <= 1e-6
        assert max_diff(ours(x), theirs(x)) <= 1e-6
