"""The pure maths in lorakit.core.functional against autograd and the dense definitions."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.core import functional as LF
from lorakit.core.layers import LoraLinear


def test_merged_lora_linear_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64)  # frozen
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LF.FusedLoraMatmul.apply(*t, 0.7), (x, W, b, A, B))


@pytest.mark.parametrize("tokens", [2, 64])  # the factored path, then the merged-weight function
def test_training_paths_match_textbook_lora_with_input_and_bias_grads(tokens):
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("default", r=4, scale=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(tokens, 16, requires_grad=True)
    layer(x).sin().sum().backward()

    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach().clone().requires_grad_(True)
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, W, b) + 0.5 * (x_ref @ A.T) @ B.T).sin().sum().backward()
    for got, want in (
        (x.grad, x_ref.grad),
        (layer.lora_A["default"].grad, A.grad),
        (layer.lora_B["default"].grad, B.grad),
        (layer.base_layer.bias.grad, b.grad),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expand_fused_B_is_block_structured():
    B = torch.arange(8.0).reshape(4, 2)  # two enabled slices of 2 rows, rank 2 each... as rows
    full = LF.expand_fused_B(B, [True, False, True], out_features=6)
    expected = torch.zeros(6, 4)
    expected[0:2, 0:2] = B[0:2]
    expected[4:6, 2:4] = B[2:4]
    assert torch.equal(full, expected)


def test_conv_delta_peft_equals_explicit_sum():
    torch.manual_seed(0)
    A, B = torch.randn(3, 5, 2, 2), torch.randn(7, 3, 1, 1)
    expected = sum(B[:, k, 0, 0][:, None, None, None] * A[k][None] for k in range(3)) * 0.25
    torch.testing.assert_close(LF.conv_delta_peft(A, B, 0.25), expected)


def test_unmerged_inference_cache_follows_in_place_updates_and_merges():
    """The cached W + dW must never be stale: optimizer steps, merges and adapter switches."""
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("a", r=4, scale=0.5)
    layer.add_adapter("b", r=2, scale=2.0)
    x = torch.randn(64, 16)

    def reference(name):
        W = layer.original_weight() + layer.scaling[name] * layer.lora_B[name] @ layer.lora_A[name]
        return F.linear(x, W, layer.base_layer.bias)

    for _ in range(3):
        with torch.no_grad():
            layer.lora_B["a"].add_(torch.randn(12, 4))  # as an optimizer step would
        layer.set_adapter("a")
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), reference("a"), rtol=0, atol=1e-5)
        layer.set_adapter("b")
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference("b"), rtol=0, atol=1e-5)
    layer.set_adapter("a")
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference("a"), rtol=0, atol=1e-5)
    layer.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference("a"), rtol=0, atol=1e-5)


def test_training_under_autocast_matches_fp32_textbook_lora():
    """Autocast (bf16 on CPU here) takes the textbook path; gradients stay close to fp32."""
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 12))
    layer.add_adapter("default", r=4, scale=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    (F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 0.5 * (x @ A.T) @ B.T).sum().backward()
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=0.05, atol=0.05)
