"""lorakit.extract / `lorakit extract`: an adapter from a model fully fine-tuned inside the test,
checked against an independent SVD, the tuned model itself, PEFT, and a file round trip."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch

import lorakit
from lorakit.cli import main
from lorakit.core.inject import adapter_configs, lora_layers
from lorakit.errors import DataError, UsageError
from lorakit.tools.extract import delta_error, extract_adapter, low_rank_factors

IDS = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(3))


def finetune(model: torch.nn.Module, steps: int = 4, seed: int = 0) -> torch.nn.Module:
    """A full fine-tune (every parameter trains) of a copy of `model` on random data."""
    tuned = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(tuned.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 12), generator=gen)
        if hasattr(tuned, "classifier"):
            loss = tuned(ids, labels=torch.randint(0, 3, (4,), generator=gen)).loss
        else:
            loss = tuned(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def pair():
    base = tiny.bert(0).eval()
    return base, finetune(base)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_full_rank_is_exact(pair):
    base, tuned = pair
    model, report = extract_adapter(copy.deepcopy(base), tuned, rank=64)
    assert all(r.rank == min(r.shape) for r in report)  # capped to each layer's full rank
    assert all(abs(r.energy - 1) <= 1e-9 for r in report)
    assert delta_error(model, tuned) <= 1e-5
    torch.testing.assert_close(logits(model), logits(tuned), atol=1e-5, rtol=1e-5)


def test_energy_report_and_factors_match_an_independent_svd(pair):
    base, tuned = pair
    rank = 3
    model, report = extract_adapter(copy.deepcopy(base), tuned, rank=rank)
    tuned_modules, by_name = dict(tuned.named_modules()), {r.name: r for r in report}
    assert set(by_name) == {n for n, _ in lora_layers(model)}
    for name, layer in lora_layers(model):
        delta = (tuned_modules[name].weight - layer.original_weight()).detach().double()
        S = torch.linalg.svdvals(delta)
        assert by_name[name].energy == pytest.approx(float(S[:rank].pow(2).sum() / S.pow(2).sum()), abs=1e-9)
        # B A is the best rank-r approximation: its error is exactly the dropped singular values.
        approx = layer.delta_weight("default").detach().double()
        assert layer.scaling["default"] == 1.0
        assert float((delta - approx).norm()) == pytest.approx(float(S[rank:].pow(2).sum().sqrt()), rel=1e-5)
        assert by_name[name].rel_error == pytest.approx(float((delta - approx).norm() / delta.norm()), rel=1e-4)


def test_error_decreases_with_rank(pair):
    base, tuned = pair
    errors, energies = [], []
    for rank in (1, 2, 4, 8, 32):
        model, report = extract_adapter(copy.deepcopy(base), tuned, rank=rank)
        errors.append(float((logits(model) - logits(tuned)).abs().max()))
        energies.append([r.energy for r in report])
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    for low, high in zip(energies, energies[1:], strict=False):
        assert all(h >= lo - 1e-12 for lo, h in zip(low, high, strict=True))
    assert errors[-1] <= 1e-5


def test_other_changes_travel_in_full_and_can_be_left_out(pair):
    base, tuned = pair
    model, _ = extract_adapter(copy.deepcopy(base), tuned, rank=2)
    config = adapter_configs(model)["default"]
    assert "classifier" in config.modules_to_save and config.bias == "lora_only"
    assert any(n.endswith("LayerNorm") for n in config.modules_to_save)
    torch.testing.assert_close(model.classifier.weight, tuned.classifier.weight, atol=0, rtol=0)
    bare, _ = extract_adapter(copy.deepcopy(base), tuned, rank=2, keep_other_changes=False)
    assert torch.equal(bare.classifier.weight, base.classifier.weight)


def test_saved_adapter_round_trip_and_peft(pair, tmp_path):
    base, tuned = pair
    model, _ = extract_adapter(copy.deepcopy(base), tuned, rank=4, targets=["query", "value", "dense"])
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path / "x")
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "x")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=1e-6)
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "x")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_llama_and_lowrank_svd():
    base = tiny.llama(1).eval()
    tuned = finetune(base, steps=3)
    exact, report = extract_adapter(copy.deepcopy(base), tuned, rank=4)
    fast, fast_report = extract_adapter(copy.deepcopy(base), tuned, rank=4, method="lowrank")
    for r, f in zip(report, fast_report, strict=True):
        assert f.energy <= r.energy + 1e-9 and f.energy >= 0.98 * r.energy  # near-optimal, never better
    full, _ = extract_adapter(copy.deepcopy(base), tuned, rank=64)
    torch.testing.assert_close(logits(full), logits(tuned), atol=1e-5, rtol=1e-5)


def test_low_rank_factors_of_an_exact_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 30, generator=gen, dtype=torch.float64
    )
    B, A, energy = low_rank_factors(delta, 3)
    assert energy == pytest.approx(1.0) and torch.allclose(B @ A, delta, atol=1e-10)
    B, A, energy = low_rank_factors(torch.zeros(4, 5), 2)
    assert energy == 1.0 and not (B @ A).any()


def test_bad_inputs_are_refused(pair):
    base, tuned = pair
    with pytest.raises(UsageError, match="rank=0"):
        extract_adapter(copy.deepcopy(base), tuned, rank=0)
    with pytest.raises(DataError, match="not a fine-tune"):
        extract_adapter(copy.deepcopy(base), tiny.gpt2(0), rank=2)
    with pytest.raises(UsageError, match="linear layers only"):
        extract_adapter(copy.deepcopy(base), tuned, rank=2, targets=["word_embeddings"])


def test_cli_extract(pair, tmp_path, capsys):
    base, tuned = pair
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    args = ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "64"]
    assert main([*args, "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "energy kept" in printed and "bert.encoder.layer.1.output.dense" in printed
    rows = json.loads(report.read_text())  # 6 linears per layer, 2 layers, the pooler
    assert len(rows) == 13 and all(abs(r["energy"] - 1) < 1e-9 for r in rows)
    loaded = lorakit.load_adapter(copy.deepcopy(base), out)
    torch.testing.assert_close(logits(loaded), logits(tuned), atol=1e-5, rtol=1e-5)
    # Bad input: one line, exit 2, nothing written.
    assert main(["extract", "--base", str(tmp_path / "base"), "--rank", "4", "--out", str(tmp_path / "n")]) == 2
    assert "--tuned" in capsys.readouterr().err
    assert main([*args[:-1], "0", "--out", str(tmp_path / "n")]) == 2
    assert (
        main(
            [
                "extract",
                "--base",
                str(tmp_path),
                "--tuned",
                str(tmp_path / "tuned"),
                "--rank",
                "2",
                "--out",
                str(tmp_path / "n"),
            ]
        )
        == 2
    )
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_gpt2_conv1d_layout_and_tied_head(tmp_path):
    base = tiny.gpt2(2).eval()
    tuned = finetune(base, steps=2)
    model, report = extract_adapter(copy.deepcopy(base), tuned, rank=64)
    assert [r.shape for r in report[:2]] == [(96, 32), (32, 32)]  # c_attn, c_proj as (d_out, d_in)
    assert {"lm_head", "transformer.wte"} <= set(adapter_configs(model)["default"].modules_to_save)
    lorakit.save_adapter(model, tmp_path / "g")
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "g")
    torch.testing.assert_close(logits(loaded), logits(tuned), atol=1e-5, rtol=1e-5)
