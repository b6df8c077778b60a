"""lorakit combine's dense-update merging methods (ties, dare_linear, dare_ties, magnitude_prune,
task_arithmetic; PEFT's *_svd names as aliases) against PEFT: the helpers tensor for tensor
against peft.utils.merge_utils, and end to end against PEFT's add_weighted_adapter(...,
combination_type="<method>_svd") on the same adapter files; rsLoRA against the dense definition;
undefined combinations refused."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from peft import PeftModel
from peft.tuners.lora import model as peft_lora_model
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file
from test_combine import make_adapter

import lorakit
from lorakit.cli import main
from lorakit.core.inject import lora_layers
from lorakit.errors import UsageError
from lorakit.tools import merge_methods
from lorakit.tools.combine import METHODS, MergeOptions, combine, combine_adapters, combine_recipe

WEIGHTS = [0.7, -0.4, 1.2]
DENSE = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    deltas = [make_adapter(root / "a", 4, 8, 1), make_adapter(root / "b", 4, 2, 2), make_adapter(root / "c", 2, 4, 3)]
    return [root / n for n in "abc"], deltas


@pytest.fixture(scope="module")
def q_only(tmp_path_factory):
    """Adapters of q_proj only: one module per layer, so the DARE masks come in the same order
    as PEFT's (named_modules order = file order)."""
    root = tmp_path_factory.mktemp("q_only")
    for i, n in enumerate("abc"):
        make_adapter(root / n, 4, 8 - 2 * i, 10 + i, targets=("q_proj",))
    return [root / n for n in "abc"]


def lorakit_deltas(path) -> dict[str, torch.Tensor]:
    model = lorakit.load_adapter(tiny.llama(0), path)
    return {n: layer.delta_weight("default").detach().double() for n, layer in lora_layers(model)}


def peft_deltas(paths, method, rank, density, sign) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter(combination_type=method + "_svd") on the same adapter files."""
    model = PeftModel.from_pretrained(tiny.llama(0), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(paths))]
    kind = "svd" if method == "task_arithmetic" else method + "_svd"
    model.add_weighted_adapter(
        names, WEIGHTS, "m", combination_type=kind, svd_rank=rank, density=density, majority_sign_method=sign
    )
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("m").detach().double()
    return out


def relative_error(got: dict, expected: dict) -> tuple[float, float]:
    """(max abs error, max relative Frobenius error) over the modules."""
    assert set(got) == set(expected)
    abs_err = max(float((got[k] - expected[k]).abs().max()) for k in got)
    rel_err = max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in got)
    return abs_err, rel_err


# --- the helpers, tensor for tensor against peft.utils.merge_utils ------------------------------


@pytest.fixture
def updates():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(16, 12, generator=g) for _ in range(3)]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
def test_magnitude_prune_equals_peft(updates, density):
    for u in updates:
        assert torch.equal(merge_methods.magnitude_prune_update(u, density), merge_utils.prune(u, density, "magnitude"))


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_sign_election_and_disjoint_mean_equal_peft(updates, sign):
    stacked = torch.stack(updates)
    mask = merge_methods.majority_sign_mask(stacked, sign)
    assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, sign))
    assert torch.equal(merge_methods.disjoint_mean(stacked, mask), merge_utils.disjoint_merge(stacked, mask))


def test_random_prune_equals_peft_under_the_same_seed(updates):
    torch.manual_seed(11)
    expected = [merge_utils.prune(u, 0.4, "random", rescale=True) for u in updates]
    g = torch.Generator().manual_seed(11)
    got = [merge_methods.random_prune_update(u, 0.4, g) for u in updates]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", DENSE)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_merge_updates_equals_peft(updates, method, sign):
    weights = torch.tensor(WEIGHTS)
    peft_fn = getattr(merge_utils, method)
    args = {"task_arithmetic": (), "magnitude_prune": (0.5,), "dare_linear": (0.5,)}.get(method, (0.5, sign))
    torch.manual_seed(5)
    expected = peft_fn(updates, weights, *args)
    got = merge_methods.merge_updates(updates, WEIGHTS, method, 0.5, sign, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --- end to end against PEFT's add_weighted_adapter ----------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties"])
@pytest.mark.parametrize("rank", [4, 16])
def test_deterministic_methods_equal_peft_svd(trio, tmp_path, method, rank):
    """At rank 16 (PEFT's largest here: full rank of v_proj, 16x32) and at rank 4."""
    paths, _ = trio
    sign = "frequency" if rank == 4 else "total"
    options = MergeOptions(rank=rank, density=0.3, majority_sign_method=sign)
    combine(paths, tmp_path / "m", method=method, weights=WEIGHTS, options=options)
    expected = peft_deltas(paths, method, rank, 0.3, sign)
    abs_err, rel_err = relative_error(lorakit_deltas(tmp_path / "m"), expected)
    print(f"{method} rank {rank}: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
    assert rel_err < 1e-4  # PEFT truncates in float32, lorakit in float64: ~1e-6, up to ~3e-5 at small gaps


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_under_the_same_seed(q_only, tmp_path, monkeypatch, method):
    """add_weighted_adapter draws the new adapter's random init first, so PEFT's DARE is seeded
    just before its first mask: the same torch stream as lorakit's --seed, in the same order."""
    options = MergeOptions(rank=32, density=0.5, seed=123)
    combine(q_only, tmp_path / "m", method=method + "_svd", weights=WEIGHTS, options=options)
    helper = getattr(peft_lora_model, method)
    calls = []

    def seeded(*args, **kwargs):
        if not calls:
            torch.manual_seed(123)
        calls.append(1)
        return helper(*args, **kwargs)

    monkeypatch.setattr(peft_lora_model, method, seeded)
    expected = peft_deltas(q_only, method, 32, 0.5, "total")
    assert len(calls) == 2  # one per q_proj: lorakit's file order is PEFT's module order here
    abs_err, rel_err = relative_error(lorakit_deltas(tmp_path / "m"), expected)
    print(f"{method} rank 32: max abs {abs_err:.2e}, max rel {rel_err:.2e}")
    assert rel_err < 1e-5


def test_aliases_are_the_same_methods(trio):
    paths, _ = trio
    for alias, method in merge_methods.ALIASES.items():
        assert alias in METHODS
        options = MergeOptions(density=0.5, seed=4)
        _, ours, _ = combine_adapters(paths, method, WEIGHTS, options=options)
        _, theirs, _ = combine_adapters(paths, alias, WEIGHTS, options=options)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_seeded_dare_is_reproducible(trio, tmp_path):
    paths, _ = trio
    for name, seed in (("one", 7), ("two", 7), ("three", 8)):
        combine(
            paths, tmp_path / name, method="dare_ties", weights=WEIGHTS, options=MergeOptions(density=0.5, seed=seed)
        )

    def saved(name):  # tensors and metadata (the header's key order is not fixed, so not the bytes)
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    (one, meta_one), (two, meta_two), (three, _) = saved("one"), saved("two"), saved("three")
    assert meta_one == meta_two and set(one) == set(two)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], three[k]) for k in one)


def test_svd_residual_is_recorded(trio, tmp_path):
    """The recipe's residual is ||merged - result|| / ||merged|| of the dense definition."""
    paths, deltas = trio
    combine(paths, tmp_path / "m", method="ties", weights=WEIGHTS, options=MergeOptions(rank=3, density=0.4))
    got = lorakit_deltas(tmp_path / "m")
    residuals = []
    for name, delta in got.items():
        merged = merge_utils.ties([d[name] for d in deltas], torch.tensor(WEIGHTS, dtype=torch.float64), 0.4)
        residuals.append(float((merged - delta).norm() / merged.norm()))
    recipe = combine_recipe(tmp_path / "m")
    assert recipe["method"] == "ties" and recipe["density"] == 0.4
    assert recipe["svd_residual"]["max"] == pytest.approx(max(residuals), rel=1e-4)
    assert recipe["svd_residual"]["mean"] == pytest.approx(sum(residuals) / len(residuals), rel=1e-4)
    assert 0 < recipe["svd_residual"]["max"] < 1


def test_rslora_against_the_dense_definition(tmp_path):
    """rsLoRA inputs (scaling alpha / sqrt(r)): lorakit merges each input's own dW and checks
    against PEFT's helper on the dense updates. PEFT's add_weighted_adapter gives the merged
    adapter use_rslora and lora_alpha = R, so its update is sqrt(R) times too big (peft PR#3449):
    asserted here too, so that a PEFT fix shows up."""
    rank = 16
    deltas = [
        make_adapter(tmp_path / n, r, 8, s, use_rslora=True) for n, r, s in (("a", 4, 1), ("b", 2, 2), ("c", 4, 3))
    ]
    paths = [tmp_path / n for n in "abc"]
    combine(paths, tmp_path / "m", method="ties", weights=WEIGHTS, options=MergeOptions(rank=rank, density=0.5))
    got = lorakit_deltas(tmp_path / "m")
    full = combine_adapters(paths, "ties", WEIGHTS, options=MergeOptions(rank=64, density=0.5))
    assert full[0]["use_rslora"] is False
    combine(paths, tmp_path / "full", method="ties", weights=WEIGHTS, options=MergeOptions(rank=64, density=0.5))
    for name, delta in lorakit_deltas(tmp_path / "full").items():  # rank 64 >= full rank: no truncation
        expected = merge_utils.ties([d[name] for d in deltas], torch.tensor(WEIGHTS, dtype=torch.float64), 0.5)
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    peft = peft_deltas(paths, "ties", rank, 0.5, "total")
    _, rel_err = relative_error(got, {k: v / rank**0.5 for k, v in peft.items()})
    assert rel_err < 1e-4


def test_cli_prints_the_residual(trio, tmp_path, capsys):
    paths, _ = trio
    argv = ["combine", *map(str, paths), "--out", str(tmp_path / "m"), "--method", "dare_linear_svd"]
    assert main([*argv, "--density", "0.5", "--seed", "3", "--rank", "4", "--weights", "0.7,-0.4,1.2"]) == 0
    out = capsys.readouterr().out
    assert "SVD residual" in out and "dare_linear_svd" in out
    recipe = combine_recipe(tmp_path / "m")
    assert recipe["seed"] == 3 and recipe["density"] == 0.5
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["r"] == 4


# --- refusals ----------------------------------------------------------------------------------


def test_undefined_combinations_are_refused(trio, tmp_path):
    paths, _ = trio
    make_adapter(tmp_path / "dora", 4, 8, 1, use_dora=True)
    other = lorakit.inject(
        tiny.llama(7), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    lorakit.save_adapter(other, tmp_path / "other_base")
    with pytest.raises(lorakit.AdapterError, match="plain LoRA"):
        combine_adapters([paths[0], tmp_path / "dora"], method="ties")
    with pytest.raises(lorakit.AdapterError, match="different base models"):
        combine_adapters([paths[0], tmp_path / "other_base"], method="dare_ties")
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError, match="density"):
            combine_adapters(paths, method="ties", options=MergeOptions(density=density))
    with pytest.raises(UsageError, match="majority_sign_method"):
        combine_adapters(paths, method="ties", options=MergeOptions(majority_sign_method="mean"))
    with pytest.raises(UsageError, match="not known"):
        combine_adapters(paths, method="ties_cat")
    with pytest.raises(UsageError, match="rank"):
        combine_adapters(paths, method="linear", options=MergeOptions(rank=2))


def test_differing_heads_are_refused_without_head_from(tmp_path):
    """Two classifier adapters whose saved heads differ (as each trains its own)."""
    config = lorakit.LoraConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    for n, s in (("a", 1), ("b", 2)):
        base = tiny.bert(0)
        torch.manual_seed(s)
        model = lorakit.inject(base, config)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].normal_(std=0.2)
        lorakit.save_adapter(model, tmp_path / n)
        file = tmp_path / n / "adapter_model.safetensors"
        with safe_open(str(file), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        for key in [k for k in tensors if "classifier" in k]:
            tensors[key] = torch.randn_like(tensors[key])  # this adapter's own trained head
        save_file(tensors, str(file), metadata=metadata)
    pair = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(UsageError, match="head-from"):
        combine_adapters(pair, method="ties", options=MergeOptions(density=0.5))
    _, tensors, _ = combine_adapters(pair, "ties", head_from="b", options=MergeOptions(density=0.5))
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        assert all(torch.equal(tensors[k], f.get_tensor(k)) for k in f.keys() if "classifier" in k)


def test_command_lists_every_method():
    from lorakit.commands.combine import METHOD_NAMES

    assert set(METHOD_NAMES) == set(METHODS)
