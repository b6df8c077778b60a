"""lorakit.combine / `lorakit combine`: each method against dense float64 maths and against
PEFT's add_weighted_adapter on the same adapters; incompatible inputs refused."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch

import lorakit
from lorakit.cli import main
from lorakit.core.inject import lora_layers
from lorakit.errors import UsageError
from lorakit.tools.combine import combine, combine_adapters

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(5))


def make_adapter(
    path, r: int, alpha: float, seed: int, base_seed: int = 0, targets=("q_proj", "v_proj", "up_proj"), **extra
):
    """Save an adapter with random (non-zero) A and B on the tiny Llama; return its dense updates."""
    base = tiny.llama(base_seed)  # seeds torch itself: the adapter's own seed comes after
    torch.manual_seed(seed)
    model = lorakit.inject(base, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=list(targets), **extra))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=0.2)
    lorakit.save_adapter(model, path)
    return {n: layer.delta_weight("default").detach().double() for n, layer in lora_layers(model)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    deltas = [make_adapter(root / "a", 4, 8, 1), make_adapter(root / "b", 4, 2, 2), make_adapter(root / "c", 2, 4, 3)]
    return root, deltas


def combined_deltas(path) -> dict[str, torch.Tensor]:
    model = lorakit.load_adapter(tiny.llama(0), path)
    for _, layer in lora_layers(model):
        assert layer.scaling["default"] == 1.0
    return {n: layer.delta_weight("default").detach().double() for n, layer in lora_layers(model)}


def test_cat_is_the_exact_weighted_sum(adapters, tmp_path):
    root, deltas = adapters
    weights = [0.7, -0.4, 1.5]
    combine([root / "a", root / "b", root / "c"], tmp_path / "cat", method="cat", weights=weights)
    got = combined_deltas(tmp_path / "cat")
    for name, delta in got.items():
        expected = sum(w * d[name] for w, d in zip(weights, deltas, strict=True))
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["r"] == 10 and config["lora_alpha"] == 10  # ranks add: 4 + 4 + 2


def test_svd_is_the_best_rank_r_approximation(adapters, tmp_path):
    root, deltas = adapters
    weights, rank = [1.0, 0.5, 2.0], 3
    combine([root / "a", root / "b", root / "c"], tmp_path / "svd", method="svd", weights=weights, rank=rank)
    for name, delta in combined_deltas(tmp_path / "svd").items():
        dense = sum(w * d[name] for w, d in zip(weights, deltas, strict=True))
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(delta, best, atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(delta, rtol=1e-5) == rank
    # Default rank: the largest input rank.
    config, _, _ = combine_adapters([root / "a", root / "c"], method="svd")
    assert config["r"] == 4


def test_linear_is_pefts_factor_mix_as_documented(adapters, tmp_path):
    root, deltas = adapters
    w = [0.6, -0.3]
    combine([root / "a", root / "b"], tmp_path / "lin", method="linear", weights=w)
    scales = [8 / 4, 2 / 4]
    _, ta, _ = lorakit.read_adapter(root / "a")
    _, tb, _ = lorakit.read_adapter(root / "b")
    for name, delta in combined_deltas(tmp_path / "lin").items():
        c = [wi * si for wi, si in zip(w, scales, strict=True)]
        A = sum(
            (1 if ci >= 0 else -1) * abs(ci) ** 0.5 * t[f"{name}.lora_A.weight"].double()
            for ci, t in zip(c, (ta, tb), strict=True)
        )
        B = sum(abs(ci) ** 0.5 * t[f"{name}.lora_B.weight"].double() for ci, t in zip(c, (ta, tb), strict=True))
        torch.testing.assert_close(delta, B @ A, atol=1e-5, rtol=1e-5)
    # One adapter: linear is exactly the weighted update.
    combine([root / "a"], tmp_path / "one", method="linear", weights=[0.25])
    for name, delta in combined_deltas(tmp_path / "one").items():
        torch.testing.assert_close(delta, 0.25 * deltas[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_outputs_equal_pefts_add_weighted_adapter(adapters, tmp_path, method):
    peft = pytest.importorskip("peft")
    root, _ = adapters
    weights = [0.8, 0.5]
    combine([root / "a", root / "b"], tmp_path / "c", method=method, weights=weights)
    ours = lorakit.load_adapter(tiny.llama(0).eval(), tmp_path / "c")
    model = peft.PeftModel.from_pretrained(tiny.llama(0).eval(), str(root / "a"), adapter_name="a")
    model.load_adapter(str(root / "b"), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=method)
    model.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_incompatible_adapters_are_refused(adapters, tmp_path):
    root, _ = adapters
    make_adapter(tmp_path / "other_base", 4, 8, 1, base_seed=7)
    make_adapter(tmp_path / "other_targets", 4, 8, 1, targets=("q_proj",))
    with pytest.raises(lorakit.AdapterError, match="different base models"):
        combine_adapters([root / "a", tmp_path / "other_base"])
    with pytest.raises(lorakit.AdapterError, match="adapt different modules"):
        combine_adapters([root / "a", tmp_path / "other_targets"])
    with pytest.raises(UsageError, match="equal ranks"):
        combine_adapters([root / "a", root / "c"], method="linear")
    with pytest.raises(UsageError, match="weights for"):
        combine_adapters([root / "a", root / "b"], weights=[1.0])
    with pytest.raises(UsageError, match="svd only"):
        combine_adapters([root / "a", root / "b"], method="cat", rank=2)


def test_cli_combine(adapters, tmp_path, capsys):
    root, deltas = adapters
    out = tmp_path / "ab"
    assert main(["combine", str(root / "a"), str(root / "b"), "--out", str(out), "--weights", "2,1"]) == 0
    assert "combined 2 adapters (cat" in capsys.readouterr().out
    for name, delta in combined_deltas(out).items():
        torch.testing.assert_close(delta, 2 * deltas[0][name] + deltas[1][name], atol=1e-5, rtol=1e-5)
    before = (out / "adapter_model.safetensors").read_bytes()
    # Bad input: exit 2 with one line; the existing output stays as it was.
    bad = [
        ["combine", str(root / "a"), "--out", str(out)],
        ["combine", str(root / "a"), str(root / "b"), "--out", str(out), "--weights", "1,x"],
        ["combine", str(root / "a"), str(root / "c"), "--out", str(out), "--method", "linear"],
        ["combine", str(root / "a"), str(tmp_path / "missing"), "--out", str(out)],
        ["combine", str(root / "a"), str(root / "b")],
    ]
    for argv in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lorakit combine: error:") and err.count("\n") == 1, err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    model = copy.deepcopy(tiny.llama(0))
    lorakit.load_adapter(model, out)  # still a valid adapter
