"""The forward-path plan of LoraLinear (core/layers/forward_path.py): every row of
choose_forward_path's table, forward running the planned path, and every path's output equal
to the dense maths (float64, written out here), for plain LoRA and DoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorakit.core.layers import LoraLinear
from lorakit.core.layers.forward_path import ForwardPath, choose_forward_path

MANY, FEW = (4, 6, 8), (1, 2, 8)  # 24 tokens: forming W + dW pays for an 8 -> 12 layer; 2: it does not
P = ForwardPath


def make(dora: bool = False, base: nn.Module | None = None, enable_lora=None, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    layer = LoraLinear(base if base is not None else nn.Linear(8, 12), enable_lora=enable_lora)
    layer.add_adapter("a", 2, 0.75, dropout=dropout, use_dora=dora)
    with torch.no_grad():
        layer.lora_A["a"].normal_(0, 0.3)
        layer.lora_B["a"].normal_(0, 0.3)
        if dora:
            layer.lora_magnitude_vector["a"].mul_(torch.rand(12) + 0.5)
    return layer


def plan(layer: LoraLinear, shape=MANY, grad: bool = True) -> ForwardPath:
    with torch.set_grad_enabled(grad):
        return choose_forward_path(layer, torch.randn(shape, dtype=layer.base_layer.weight.dtype))


# --- each row of the table, in its order ----------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_no_adapter_to_add_is_the_base_path(dora):
    disabled = make(dora)
    disabled.set_disabled(True)
    merged = make(dora)
    merged.merge()
    inactive = make(dora)
    inactive.set_adapter([])
    for layer in (disabled, merged, inactive):
        assert plan(layer) is P.BASE and plan(layer, grad=False) is P.BASE


@pytest.mark.parametrize("dora", [False, True])
def test_rows_in_order(dora):
    dropout = make(dora, dropout=0.1)
    assert plan(dropout) is P.FACTORED  # training with dropout on
    assert plan(dropout, grad=False) is P.FACTORED  # even without a gradient
    dropout.eval()
    assert plan(dropout, grad=False) is P.MERGED_WEIGHT  # eval: dropout is off
    assert plan(make(dora), FEW, grad=False) is P.FACTORED  # few tokens
    assert plan(make(dora), FEW) is P.FACTORED
    assert plan(make(dora), grad=False) is P.MERGED_WEIGHT
    assert plan(make(dora)) is P.FUSED_TRAIN  # otherwise


def test_a_quantized_base_is_factored():
    layer = make()
    layer.base_layer.weight.quant_state = object()  # what lorakit reads as a 4-bit base
    assert plan(layer, grad=False) is P.FACTORED and plan(layer) is P.FACTORED


@pytest.mark.parametrize("dora", [False, True])
def test_several_adapters_or_a_training_base_are_factored(dora):
    layer = make(dora)
    layer.add_adapter("b", 2, 0.5, use_dora=dora)
    layer.set_adapter(["a", "b"])
    assert plan(layer) is P.FACTORED and plan(layer, grad=False) is P.MERGED_WEIGHT
    trains = make(dora)
    trains.base_layer.weight.requires_grad_(True)
    assert plan(trains) is P.FACTORED


@pytest.mark.parametrize("dora", [False, True])
def test_mixed_dtypes_and_autocast_are_factored(dora):
    half = make(dora, base=nn.Linear(8, 12).to(torch.bfloat16))
    assert half.lora_A["a"].dtype == torch.float32  # adapters over a half base train in fp32
    assert plan(half) is P.FACTORED
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan(make(dora)) is P.FACTORED


def test_fused_projection_trains_factored_for_lora_fused_for_dora():
    assert plan(make(enable_lora=[True, False, True])) is P.FACTORED
    assert plan(make(dora=True, enable_lora=[True, False, True])) is P.FUSED_TRAIN


# --- each path against the dense maths --------------------------------------------------------
def dense_output(layer: LoraLinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """W0 x + b plus each adapter, in float64 from the layer's tensors: plain s B A x, or DoRA's
    (m / ||W0 + s B A||_row - 1) W0 x + m / ||.||_row * s B A x."""
    w0 = layer.original_weight().detach().double()
    w0 = w0.t() if isinstance(layer.base_layer, Conv1D) else w0
    x = x.double()
    out = F.linear(x, w0, layer.base_layer.bias.detach().double())
    for name in names:
        delta = layer.scaling[name] * layer.full_B(name).detach().double() @ layer.lora_A[name].detach().double()
        if name in layer.lora_magnitude_vector:
            g = layer.lora_magnitude_vector[name].detach().double() / (w0 + delta).norm(dim=1)
            out = out + F.linear(x, (g - 1).unsqueeze(1) * w0 + g.unsqueeze(1) * delta)
        else:
            out = out + F.linear(x, delta)
    return out


BASES = {"linear": lambda: nn.Linear(8, 12), "hf_conv1d": lambda: Conv1D(12, 8)}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("enable_lora", [None, [True, False, True]])
@pytest.mark.parametrize("path", [P.MERGED_WEIGHT, P.FUSED_TRAIN, P.FACTORED])
def test_every_path_computes_the_dense_maths(path, enable_lora, dora, base):
    if path is P.FUSED_TRAIN and enable_lora and not dora:
        pytest.skip("plain LoRA has no fused function for loralib's fused projections (planned FACTORED)")
    layer = make(dora, base=BASES[base](), enable_lora=enable_lora)
    x = torch.randn(MANY)
    with torch.set_grad_enabled(path is P.FUSED_TRAIN):
        out = layer.forward_along(path, x, ["a"])
    want = dense_output(layer, x, ["a"])
    assert (want - dense_output(layer, x, [])).abs().max() > 1e-2  # the adapter really changes the output
    assert (out.double() - want).abs().max() <= 1e-5


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("path", [P.MERGED_WEIGHT, P.FACTORED])
def test_several_adapters_add_up_on_each_path(path, dora):
    layer = make(dora)
    layer.add_adapter("b", 3, 0.5, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["b"].normal_(0, 0.3)
    x = torch.randn(MANY)
    with torch.no_grad():
        out = layer.forward_along(path, x, ["a", "b"])
    assert (out.double() - dense_output(layer, x, ["a", "b"])).abs().max() <= 1e-5


def test_the_base_path_is_the_base():
    layer = make()
    x = torch.randn(MANY)
    assert torch.equal(layer.forward_along(P.BASE, x, ["a"]), layer.base_layer(x))


# --- forward runs the planned path ------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("shape, grad", [(MANY, False), (FEW, False), (MANY, True), (FEW, True)])
def test_forward_runs_the_planned_path(shape, grad, dora):
    layer = make(dora)
    x = torch.randn(shape)
    with torch.set_grad_enabled(grad):
        planned = layer.forward_along(choose_forward_path(layer, x), x, layer.active_adapters)
        assert torch.equal(layer(x), planned)
