"""LoRA layer and model maths, checked against dense references written here in plain torch.

Every LoRA family (nn.Linear, HF Conv1D, fused projections, nn.Embedding, nn.Conv1d/2d in
PEFT's and loralib's parametrisation) is compared with W0 x + s * (B A) x computed in float64
from the layer's own A and B, without going through lorakit's maths.
"""

from __future__ import annotations

import copy
import math

import loralib
import pytest
import tiny
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.core.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from lorakit.core.layers.forward_path import ForwardPath, choose_forward_path

R = 2
SCALE = 0.75
MASK = [True, False, True]  # fused projection: q and v adapted, k not (loralib's MergedLinear)

KINDS = [
    "linear",
    "hf_conv1d",
    "fused_linear",
    "fused_hf_conv1d",
    "embedding",
    "conv1d",
    "conv2d",
    "conv1d_loralib",
    "conv2d_loralib",
]
LINEAR_KINDS = {"linear", "hf_conv1d", "fused_linear", "fused_hf_conv1d"}
# Families whose forward applies dropout to the LoRA branch (as PEFT / loralib do).
DROPOUT_KINDS = ["linear", "hf_conv1d", "fused_linear", "fused_hf_conv1d", "conv1d", "conv2d"]
PATHS = ["grad", "nograd_many_tokens", "nograd_few_tokens"]
# Only LoraLinear branches on grad mode / token count; the other families have one forward path.
KIND_PATHS = [(kind, path) for kind in KINDS for path in (PATHS if kind in LINEAR_KINDS else PATHS[:1])]


# --- building blocks -------------------------------------------------------------------------
def make_base(kind: str) -> nn.Module:
    if kind in ("linear", "fused_linear"):
        return nn.Linear(8, 12)
    if kind in ("hf_conv1d", "fused_hf_conv1d"):
        return Conv1D(12, 8)  # weight stored (in=8, out=12), as GPT-2
    if kind == "embedding":
        return nn.Embedding(10, 6, padding_idx=0)
    if kind == "conv1d":
        return nn.Conv1d(3, 5, 3, padding=1)
    if kind == "conv2d":
        return nn.Conv2d(3, 5, 3, stride=2, padding=1)
    if kind == "conv1d_loralib":
        return nn.Conv1d(3, 4, 3, padding=1)
    if kind == "conv2d_loralib":
        return nn.Conv2d(3, 4, 3, padding=1)
    raise AssertionError(kind)


def wrap(kind: str, base: nn.Module) -> LoraLayer:
    if kind.startswith("fused"):
        return LoraLinear(base, enable_lora=MASK)
    if kind in LINEAR_KINDS:
        return LoraLinear(base)
    if kind == "embedding":
        return LoraEmbedding(base)
    if kind.endswith("_loralib"):
        return LoraConv(base, style="loralib")
    return LoraConv(base)


def make_input(kind: str, many: bool = True) -> torch.Tensor:
    if kind in LINEAR_KINDS:
        # 24 tokens: forming W + dW pays (24 * (8 + 12) > 8 * 12); 2 tokens: it does not.
        return torch.randn(4, 6, 8) if many else torch.randn(1, 2, 8)
    if kind == "embedding":
        return torch.tensor([[0, 1, 2, 3, 9], [4, 5, 0, 7, 8]])
    if kind.startswith("conv1d"):
        return torch.randn(2, 3, 7)
    return torch.randn(2, 3, 7, 7)


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **adapter):
    """(layer with a fresh adapter 'default', untouched copy of its base module)."""
    torch.manual_seed(seed)
    base = make_base(kind).to(dtype)
    reference_base = copy.deepcopy(base)
    layer = wrap(kind, base)
    layer.add_adapter("default", adapter.pop("r", R), adapter.pop("scale", SCALE), **adapter)
    return layer, reference_base


def randomise(layer: LoraLayer, name: str = "default", std: float = 0.2) -> None:
    with torch.no_grad():
        layer.lora_A[name].normal_(0.0, std)
        layer.lora_B[name].normal_(0.0, std)


# --- independent dense maths -------------------------------------------------------------------
def dense_delta(kind: str, A: torch.Tensor, B: torch.Tensor, scale: float, weight_shape) -> torch.Tensor:
    """scale * B @ A laid out like the base weight, written out from the papers' definitions."""
    if kind in ("linear", "hf_conv1d"):
        delta = scale * B @ A  # (out, in)
    elif kind.startswith("fused"):
        out_per_slice, in_features = 12 // len(MASK), 8
        blocks, k = [], 0
        for enabled in MASK:
            if enabled:  # slice j uses rows k of B and rank block k of A
                B_k = B[k * out_per_slice : (k + 1) * out_per_slice]
                A_k = A[k * R : (k + 1) * R]
                blocks.append(B_k @ A_k)
                k += 1
            else:
                blocks.append(torch.zeros(out_per_slice, in_features, dtype=A.dtype))
        delta = scale * torch.cat(blocks)
    elif kind == "embedding":
        return (scale * B @ A).T  # (num_embeddings, dim)
    elif kind == "conv1d":
        return scale * torch.einsum("or,rik->oik", B[:, :, 0], A)
    elif kind == "conv2d":
        return scale * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
    elif kind.endswith("_loralib"):
        return scale * (B @ A).reshape(weight_shape)
    else:
        raise AssertionError(kind)
    return delta.T if "hf_conv1d" in kind else delta  # Conv1D stores (in, out)


def ref_forward(base: nn.Module, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """The base module's maths in float64 with weight W0 + delta."""
    W = base.weight.detach().double()
    if delta is not None:
        W = W + delta.double()
    b = getattr(base, "bias", None)
    b = None if b is None else b.detach().double()
    if isinstance(base, Conv1D):
        return x.double() @ W + b
    if isinstance(base, nn.Linear):
        return F.linear(x.double(), W, b)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, W, base.padding_idx)
    conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
    return conv(x.double(), W, b, base.stride, base.padding, base.dilation, base.groups)


def layer_delta(kind: str, layer: LoraLayer, name: str, scale: float) -> torch.Tensor:
    A, B = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double()
    return dense_delta(kind, A, B, scale, layer.original_weight().shape)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run(layer: LoraLayer, x: torch.Tensor, path: str) -> torch.Tensor:
    if path == "grad":
        return layer(x)
    with torch.no_grad():
        return layer(x)


def check_path(kind: str, path: str, layer: LoraLayer, x: torch.Tensor) -> None:
    """Linear layers must plan the fly-merge path exactly for no_grad with many tokens."""
    if kind in LINEAR_KINDS:
        with torch.set_grad_enabled(path == "grad"):
            plan = choose_forward_path(layer, x)
        assert (plan is ForwardPath.MERGED_WEIGHT) == (path == "nograd_many_tokens"), (path, plan)


# --- (a) fresh adapter, (b) dense maths ----------------------------------------------------------
@pytest.mark.parametrize("kind, path", KIND_PATHS)
def test_fresh_adapter_gives_exactly_base_output(kind, path):
    layer, reference_base = build(kind)
    x = make_input(kind, many=path != "nograd_few_tokens")
    out = run(layer, x, path)
    with torch.no_grad():
        expected = reference_base(x)
    assert torch.equal(out, expected)
    check_path(kind, path, layer, x)


@pytest.mark.parametrize("kind, path", KIND_PATHS)
def test_forward_equals_dense_maths(kind, path):
    layer, reference_base = build(kind)
    randomise(layer)
    x = make_input(kind, many=path != "nograd_few_tokens")
    out = run(layer, x, path)
    delta = layer_delta(kind, layer, "default", SCALE)
    assert delta.abs().max() > 1e-2  # the update is not negligible
    assert max_diff(out, ref_forward(reference_base, x, delta)) <= 1e-5
    assert max_diff(out, ref_forward(reference_base, x)) > 1e-3  # and really changes the output
    check_path(kind, path, layer, x)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_equals_dense_delta(kind):
    layer, _ = build(kind)
    randomise(layer)
    expected = layer_delta(kind, layer, "default", SCALE)
    got = layer.delta_weight("default")
    assert got.shape == layer.original_weight().shape
    assert max_diff(got, expected) <= 1e-6


# --- (c) gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_lora_params_and_match_dense_autograd(kind):
    layer, reference_base = build(kind)
    randomise(layer)
    layer.train()
    x = make_input(kind)
    if kind == "embedding":
        # Dense maths would stop all gradient at padding_idx; LoRA (PEFT, loralib, lorakit) stops
        # it for A only, so B's gradient there is checked against loralib in test_loralib_compat.
        x = x.clamp(min=1)
    layer(x).square().sum().backward()

    for name, param in layer.named_parameters():
        if name.startswith(("lora_A.", "lora_B.")):
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name

    A = layer.lora_A["default"].detach().double().requires_grad_(True)
    B = layer.lora_B["default"].detach().double().requires_grad_(True)
    delta = dense_delta(kind, A, B, SCALE, layer.original_weight().shape)
    ref_forward(reference_base, x, delta).square().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad.double(), A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad.double(), B.grad, rtol=1e-4, atol=1e-5)


# --- (d) merged == unmerged, (e) merge twice, (f) exact unmerge ------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged(kind):
    layer, reference_base = build(kind)
    randomise(layer)
    layer.eval()
    x = make_input(kind, many=False)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
    assert max_diff(merged, unmerged) <= 1e-6
    # the merged weight is W0 + dW
    expected_weight = reference_base.weight.double() + layer_delta(kind, layer, "default", SCALE)
    assert max_diff(layer.base_layer.weight, expected_weight) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_merge_twice_is_a_noop(kind):
    layer, _ = build(kind)
    randomise(layer)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    assert layer.merged_adapters == ["default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_restores_base_weight_bit_for_bit(kind, dtype):
    layer, reference_base = build(kind, dtype=dtype)
    randomise(layer, std=0.5)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)
    for _ in range(10):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)
    assert torch.equal(layer.base_layer.weight, reference_base.weight)
    assert not layer.merged
    x = make_input(kind)
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():  # unmerged forward still adds the adapter
        assert max_diff(layer(x), reference_base(x)) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_parameters_and_state_dict_keys(kind):
    layer, _ = build(kind)
    randomise(layer)
    names = [n for n, _ in layer.named_parameters()]
    shapes = {k: v.shape for k, v in layer.state_dict().items()}
    layer.merge()
    assert [n for n, _ in layer.named_parameters()] == names
    assert {k: v.shape for k, v in layer.state_dict().items()} == shapes
    fresh, _ = build(kind, seed=1)
    fresh.load_state_dict(layer.state_dict(), strict=True)  # a merged layer's state loads strictly


def test_cast_while_merged_then_unmerge_restores_converted_weight():
    layer, reference_base = build("linear")
    randomise(layer)
    layer.merge()
    layer.double()  # .to() / .double() while merged must convert the kept unmerged weight too
    layer.unmerge()
    assert layer.base_layer.weight.dtype == torch.float64
    assert torch.equal(layer.base_layer.weight, reference_base.weight.double())


def test_bf16_loralib_drifts_but_lorakit_restores_exactly():
    """loralib unmerges by subtracting dW again, which rounds in bfloat16; lorakit keeps W0."""
    torch.manual_seed(0)
    theirs = loralib.Linear(8, 12, r=R, lora_alpha=2).to(torch.bfloat16)
    with torch.no_grad():
        theirs.lora_A.normal_(0.0, 0.5)
        theirs.lora_B.normal_(0.0, 0.5)
    base = nn.Linear(8, 12).to(torch.bfloat16)
    base.load_state_dict({"weight": theirs.weight.detach().clone(), "bias": theirs.bias.detach().clone()})
    ours = LoraLinear(base)
    ours.add_adapter("default", R, 2 / R)
    with torch.no_grad():
        ours.lora_A["default"].copy_(theirs.lora_A.float())
        ours.lora_B["default"].copy_(theirs.lora_B.float())
    before = theirs.weight.detach().clone()

    for _ in range(10):
        theirs.eval()  # merge: W += dW
        theirs.train()  # unmerge: W -= dW
        ours.merge()
        ours.unmerge()

    assert not torch.equal(theirs.weight, before)  # loralib drifted
    assert torch.equal(ours.base_layer.weight, before)  # lorakit did not


# --- (g) disabled ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_disabled_gives_exactly_base_output(kind):
    layer, reference_base = build(kind)
    randomise(layer)
    layer.eval()
    x = make_input(kind)
    with torch.no_grad():
        base_out = reference_base(x)
        adapted = layer(x)
        assert max_diff(adapted, ref_forward(reference_base, x, layer_delta(kind, layer, "default", SCALE))) <= 1e-5

        with layer.disable():
            assert torch.equal(layer(x), base_out)
        assert max_diff(layer(x), adapted) <= 1e-6

        layer.set_disabled(True)
        assert torch.equal(layer(x), base_out)
        layer.set_disabled(False)

        layer.merge()  # disabling a merged layer must give the base output too
        with layer.disable():
            assert torch.equal(layer(x), base_out)
            assert torch.equal(layer.base_layer.weight, reference_base.weight)
        assert max_diff(layer(x), adapted) <= 1e-6


# --- (h) two adapters -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_two_adapters_switch_and_delete(kind):
    torch.manual_seed(1)
    base = make_base(kind)
    reference_base = copy.deepcopy(base)
    layer = wrap(kind, base)
    layer.add_adapter("a", R, 0.5)
    layer.add_adapter("b", R, 1.25)
    randomise(layer, "a")
    randomise(layer, "b")
    x = make_input(kind)
    d_a = layer_delta(kind, layer, "a", 0.5)
    d_b = layer_delta(kind, layer, "b", 1.25)

    def out():
        with torch.no_grad():
            return layer(x)

    assert layer.adapter_names == ["a", "b"]
    assert layer.active_adapters == ["a", "b"]  # a newly added adapter becomes active too
    assert max_diff(out(), ref_forward(reference_base, x, d_a + d_b)) <= 1e-5
    layer.set_adapter("a")
    assert max_diff(out(), ref_forward(reference_base, x, d_a)) <= 1e-5
    layer.set_adapter("b")
    assert max_diff(out(), ref_forward(reference_base, x, d_b)) <= 1e-5
    layer.set_adapter(["a", "b"])
    assert max_diff(out(), ref_forward(reference_base, x, d_a + d_b)) <= 1e-5

    layer.set_adapter("a")
    layer.merge()
    layer.set_adapter("b")  # switching away from a merged adapter unmerges it exactly
    assert torch.equal(layer.base_layer.weight, reference_base.weight)
    assert max_diff(out(), ref_forward(reference_base, x, d_b)) <= 1e-5

    layer.delete_adapter("b")
    assert layer.adapter_names == ["a"] and "b" not in layer.lora_B and "b" not in layer.scaling
    assert layer.active_adapters == []
    assert torch.equal(out(), reference_base(x))
    with pytest.raises(KeyError):
        layer.set_adapter("b")
    layer.set_adapter("a")
    assert max_diff(out(), ref_forward(reference_base, x, d_a)) <= 1e-5

    layer.merge()
    layer.delete_adapter("a")  # deleting a merged adapter unmerges it first
    assert torch.equal(layer.base_layer.weight, reference_base.weight)
    assert torch.equal(out(), reference_base(x))


# --- (i) dropout ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_dropout_is_stochastic_in_train_and_deterministic_in_eval(kind):
    layer, reference_base = build(kind, dropout=0.5)
    randomise(layer)
    x = make_input(kind)
    expected = ref_forward(reference_base, x, layer_delta(kind, layer, "default", SCALE))

    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    assert max_diff(first, expected) > 1e-4
    with torch.no_grad():  # no fly-merge shortcut while dropout is active
        third, fourth = layer(x), layer(x)
    assert not torch.equal(third, fourth)

    layer.eval()
    with torch.no_grad():
        one, two = layer(x), layer(x)
    assert torch.equal(one, two)
    assert max_diff(one, expected) <= 1e-5
    assert torch.equal(layer(x), layer(x))


# --- (j) model level: small torch models ------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.block(h))


TINY_KIND = {"emb": "embedding", "conv": "conv1d", "block.0": "linear", "block.2": "linear"}


def tiny_reference(base: Tiny, ids: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tiny's forward in float64 with W0 + delta on the named modules."""
    h = ref_forward(base.emb, ids, deltas.get("emb"))
    h = ref_forward(base.conv, h.transpose(1, 2), deltas.get("conv")).transpose(1, 2)
    h = torch.relu(ref_forward(base.block[0], h, deltas.get("block.0")))
    h = ref_forward(base.block[2], h, deltas.get("block.2"))
    return ref_forward(base.head, h)


def tiny_pair(seed: int = 0) -> tuple[Tiny, Tiny, torch.Tensor]:
    torch.manual_seed(seed)
    model = Tiny()
    ids = torch.randint(0, 20, (2, 6))
    return model, copy.deepcopy(model), ids


def model_deltas(model: nn.Module, name: str, alpha: float, rslora: bool = False) -> dict[str, torch.Tensor]:
    """Dense deltas of adapter `name` per module, with the scaling computed here."""
    deltas = {}
    for module_name, layer in lorakit.lora_layers(model):
        if name in layer.lora_A:
            r = layer.lora_A[name].shape[0]
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            deltas[module_name] = layer_delta(TINY_KIND[module_name], layer, name, scale)
    return deltas


@pytest.mark.parametrize("use_rslora", [False, True])
def test_sequential_scaling_matches_dense_maths(use_rslora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, use_rslora=use_rslora, target_modules=["0", "2"]))
    expected_scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for _, layer in lorakit.lora_layers(model):
        assert layer.scaling["default"] == expected_scale
        randomise(layer)
    x = torch.randn(3, 8)

    def dense(i):
        layer = model[i]
        return expected_scale * layer.lora_B["default"].detach().double() @ layer.lora_A["default"].detach().double()

    h = torch.relu(ref_forward(reference[0], x, dense(0)))
    expected = ref_forward(reference[2], h, dense(2))
    assert max_diff(model(x), expected) <= 1e-5


def test_custom_module_injection_all_families_match_dense_maths():
    model, reference, ids = tiny_pair()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["emb", "conv", "block.0", "2"]))
    layers = dict(lorakit.lora_layers(model))
    assert set(layers) == {"emb", "conv", "block.0", "block.2"}
    assert isinstance(layers["emb"], LoraEmbedding) and isinstance(layers["conv"], LoraConv)
    assert isinstance(layers["block.0"], LoraLinear) and not isinstance(model.head, LoraLayer)
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))  # fresh adapters add nothing
    for layer in layers.values():
        randomise(layer)
    out = model(ids)
    assert max_diff(out, tiny_reference(reference, ids, model_deltas(model, "default", 3))) <= 1e-5
    assert max_diff(out, reference(ids)) > 1e-3


def test_model_merge_unmerge_disable():
    model, reference, ids = tiny_pair()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["emb", "conv", "block.0", "2"]))
    for _, layer in lorakit.lora_layers(model):
        randomise(layer)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_out, adapted = reference(ids), model(ids)
        lorakit.merge(model)
        assert all(layer.merged for _, layer in lorakit.lora_layers(model))
        merged = model(ids)
        assert max_diff(merged, adapted) <= 1e-5
        merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
        lorakit.merge(model)  # twice: no-op
        assert all(torch.equal(v, merged_weights[k]) for k, v in model.state_dict().items())

        with lorakit.disable_adapters(model):
            assert torch.equal(model(ids), base_out)
        assert all(layer.merged for _, layer in lorakit.lora_layers(model))  # merged again after
        assert torch.equal(model(ids), merged)

        lorakit.unmerge(model)
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        with lorakit.disable_adapters(model):
            assert torch.equal(model(ids), base_out)
        assert max_diff(model(ids), adapted) <= 1e-6


def test_model_set_adapter_and_delete_adapter():
    model, reference, ids = tiny_pair()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["block.0", "2"]), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=6, target_modules=["2", "conv"]), "b")
    for _, layer in lorakit.lora_layers(model):
        for name in layer.adapter_names:
            randomise(layer, name)
    d_a, d_b = model_deltas(model, "a", 2), model_deltas(model, "b", 6)
    assert set(d_a) == {"block.0", "block.2"} and set(d_b) == {"block.2", "conv"}
    both = {k: d_a.get(k, 0) + d_b.get(k, 0) for k in {*d_a, *d_b}}

    def out():
        with torch.no_grad():
            return model(ids)

    assert max_diff(out(), tiny_reference(reference, ids, d_b)) <= 1e-5  # the newest is active
    lorakit.set_adapter(model, "a")
    assert max_diff(out(), tiny_reference(reference, ids, d_a)) <= 1e-5
    lorakit.set_adapter(model, ["a", "b"])
    assert max_diff(out(), tiny_reference(reference, ids, both)) <= 1e-5
    with pytest.raises(KeyError):
        lorakit.set_adapter(model, "nope")

    lorakit.delete_adapter(model, "b")
    assert type(model.conv) is nn.Conv1d  # the layer only b used goes back to its base
    assert model.block[2].adapter_names == ["a"]
    assert max_diff(out(), tiny_reference(reference, ids, d_a)) <= 1e-5
    with pytest.raises(KeyError):
        lorakit.set_adapter(model, "b")


# --- (j) model level: Hugging Face BERT ---------------------------------------------------------
def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    return tiny.bert(seed).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(0, 100, (2, 7), generator=g),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }


def adapted_names(model: nn.Module) -> set[str]:
    return {n for n, _ in lorakit.lora_layers(model)}


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def encoder_names(*suffixes: str) -> set[str]:
    return {f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in suffixes}


def test_bert_target_suffix_list():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "value"]))
    assert adapted_names(model) == encoder_names("attention.self.query", "attention.self.value")


def test_bert_target_regex():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=r".*\.attention\.self\.(query|key)"))
    assert adapted_names(model) == encoder_names("attention.self.query", "attention.self.key")
    # a regex string must match the whole module name (it is not a suffix)
    with pytest.raises(lorakit.TargetError):
        lorakit.inject(tiny_bert(), lorakit.LoraConfig(target_modules="query"))


def test_bert_all_linear_skips_classifier():
    model = tiny_bert()
    expected = linear_names(model) - {"classifier"}
    assert len(expected) == 2 * 6 + 1  # q, k, v, attn out, intermediate, out per layer + pooler
    lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear"))
    assert adapted_names(model) == expected
    assert type(model.classifier) is nn.Linear


@pytest.mark.parametrize(
    "exclude, is_dropped",
    [
        (["pooler.dense", "intermediate.dense"], lambda n: n.endswith(("pooler.dense", "intermediate.dense"))),
        (r"bert\.encoder\.layer\.1\..*", lambda n: n.startswith("bert.encoder.layer.1.")),
    ],
    ids=["suffixes", "regex"],
)
def test_bert_exclude_modules(exclude, is_dropped):
    model = tiny_bert()
    everything = linear_names(model) - {"classifier"}
    dropped = {n for n in everything if is_dropped(n)}
    assert len(dropped) in (3, 6)
    lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear", exclude_modules=exclude))
    assert adapted_names(model) == everything - dropped


def test_bert_no_match_names_candidates():
    model = tiny_bert()
    with pytest.raises(lorakit.TargetError) as info:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for candidate in ("query", "value", "dense", "word_embeddings"):
        assert candidate in message
    assert not lorakit.lora_layers(model)  # nothing was changed


def lora_param_names(model: nn.Module, targets: set[str]) -> set[str]:
    return {f"{t}.lora_{ab}.default" for t in targets for ab in "AB"}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bert_modules_to_save_makes_classifier_trainable():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    targets = encoder_names("attention.self.query", "attention.self.value")
    # A trainable copy per adapter, as PEFT's ModulesToSaveWrapper; the original stays frozen.
    copies = {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"}
    assert trainable(model) == lora_param_names(model, targets) | copies


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bert_bias_modes(bias):
    model = tiny_bert()
    all_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "value"], bias=bias))
    targets = encoder_names("attention.self.query", "attention.self.value")
    expected = lora_param_names(model, targets)
    if bias == "all":  # every bias of the model, LayerNorms and classifier included
        for name in all_biases:
            owner = name.removesuffix(".bias")
            expected.add(f"{owner}.base_layer.bias" if owner in targets else name)
    elif bias == "lora_only":  # only the biases of the adapted layers
        expected |= {f"{t}.base_layer.bias" for t in targets}
    assert trainable(model) == expected
    if bias == "all":
        assert "bert.embeddings.LayerNorm.bias" in expected and "classifier.bias" in expected


def test_bert_parameter_report_equals_hand_count():
    model = tiny_bert()
    base_total = sum(p.numel() for p in model.parameters())
    r = 4
    lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=["query", "value"], modules_to_save=["classifier"]))
    lora_count = 4 * r * (32 + 32)  # 2 layers x (query, value), A (r, 32) + B (32, r)
    classifier = 32 * 3 + 3
    expected = {"trainable": lora_count + classifier, "total": base_total + lora_count + classifier}  # + the copy
    report = lorakit.parameter_report(model)
    assert report["trainable"] == expected["trainable"]
    assert report["total"] == expected["total"]
    assert report["percent"] == pytest.approx(100 * expected["trainable"] / expected["total"])
    lorakit.merge(model)  # merging changes no parameter count
    assert lorakit.parameter_report(model) == report
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())
    lorakit.unmerge(model)
    assert lorakit.parameter_report(model) == report


def test_bert_merge_and_unload_then_save_and_reload(tmp_path):
    model = tiny_bert()
    reference = copy.deepcopy(model)
    inputs = bert_inputs()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for _, layer in lorakit.lora_layers(model):
        randomise(layer, std=0.1)
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        base = reference(**inputs).logits
        with lorakit.disable_adapters(model):
            assert torch.equal(model(**inputs).logits, base)
    assert max_diff(adapted, base) > 1e-3

    unloaded = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    assert type(unloaded.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert set(unloaded.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        merged = unloaded(**inputs).logits
    assert max_diff(merged, adapted) <= 1e-5

    unloaded.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, merged)


def test_bert_merge_unmerge_is_bit_exact():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["query", "value", "dense"]))
    for _, layer in lorakit.lora_layers(model):
        randomise(layer, std=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = bert_inputs()
    with torch.no_grad():
        adapted = model(**inputs).logits
        for _ in range(3):
            lorakit.merge(model)
            assert max_diff(model(**inputs).logits, adapted) <= 1e-5
            lorakit.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_saved_module_keeps_the_original_and_follows_the_models_mode():
    model = tiny_bert().eval()
    original = model.classifier
    before = {k: v.clone() for k, v in original.state_dict().items()}
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    saved = model.classifier
    assert saved.original_module is original and not any(p.requires_grad for p in original.parameters())
    copy_ = saved.modules_to_save["default"]
    assert all(p.requires_grad for p in copy_.parameters()) and not copy_.training and not saved.training
    with torch.no_grad():
        saved.weight.add_(1.0)  # attributes reach the module in use: the copy
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(2, 32)
    assert torch.equal(saved(x), copy_(x))
    with lorakit.disable_adapters(model):
        assert torch.equal(saved(x), original(x))
    assert lorakit.unload(model).classifier is original
