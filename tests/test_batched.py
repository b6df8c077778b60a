"""Mixed-adapter batches (lorakit.serve.MultiLoraModel) on tiny random BERT, GPT-2 and Llama models.

The reference for every row is that row run alone through a separate copy of the base with its
adapter loaded by lorakit.load_adapter and merged (merge_and_unload), or the base itself for rows
on the base; the adapters have random non-zero B (and, for BERT, their own classifier heads).
"""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch
import torch.nn as nn

import lorakit
from lorakit.files.peft_format import CONFIG_NAME, AdapterError
from lorakit.serve import MultiLoraModel, NoFreeSlotError, UnknownAdapterError

TOL = 1e-5
MODELS = {"bert": tiny.bert, "gpt2": tiny.gpt2, "llama": tiny.llama}
# Mixed ranks 4 / 8 / 16, rsLoRA, alpha and rank patterns; the last targets only some layers.
CONFIGS = {
    "r4": dict(r=4, alpha=8),
    "r8rs": dict(r=8, alpha=16, use_rslora=True),
    "r16pat": dict(r=16, alpha=32, alpha_pattern={"0\\..*": 5.0}, rank_pattern={"1\\..*": 6}),
}


def make_adapter(model: nn.Module, folder, seed: int, *, head: bool = True, **config) -> str:
    """Inject a random non-zero adapter into a copy of `model` and save it; returns the folder."""
    model = copy.deepcopy(model)
    lorakit.inject(model, lorakit.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=generator) * 0.2)
        classifier = getattr(model, "classifier", None)
        if head and classifier is not None:  # each classifier adapter has its own trained head
            classifier.weight.add_(torch.randn(classifier.weight.shape, generator=generator))
            classifier.bias.add_(torch.randn(classifier.bias.shape, generator=generator))
    return str(lorakit.save_adapter(model, folder))


def make_all(base: nn.Module, root) -> dict[str, str]:
    """One adapter per entry of CONFIGS, each with its own random weights."""
    return {name: make_adapter(base, root / name, seed, **cfg) for seed, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tmp_path_factory):
    """(kind, base model in eval mode, {adapter name: folder})."""
    base = MODELS[request.param](0).eval()
    root = tmp_path_factory.mktemp(request.param)
    return request.param, base, make_all(base, root)


def reference(base: nn.Module, folder: str | None) -> nn.Module:
    model = copy.deepcopy(base)
    if folder is not None:
        lorakit.load_adapter(model, folder)
        lorakit.merge_and_unload(model)
    return model


def loaded(base: nn.Module, folders: dict[str, str], **kwargs) -> MultiLoraModel:
    multi = MultiLoraModel(copy.deepcopy(base), slots=4, max_rank=16, **kwargs)
    for name, folder in folders.items():
        multi.load(name, folder)
    return multi


ROWS = ["r16pat", None, "r4", "r8rs", "r4"]


@torch.no_grad()
def test_forward_rows_match_merged_adapters(setup):
    kind, base, folders = setup
    multi = loaded(base, folders)
    ids = torch.randint(1, 100, (len(ROWS), 9), generator=torch.Generator().manual_seed(1))
    with multi.use(ROWS):
        out = multi.model(ids).logits
    for i, name in enumerate(ROWS):
        expected = reference(base, folders.get(name))(ids[i : i + 1]).logits
        assert (out[i : i + 1] - expected).abs().max() <= TOL, (kind, name)
    assert not torch.allclose(out[0], out[2]), "adapters must differ, or the test proves nothing"
    # outside use() the hooked model is exactly the base
    assert torch.equal(multi.model(ids).logits, base(ids).logits)
    with multi.use([None] * len(ROWS)):
        assert torch.equal(multi.model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@torch.no_grad()
def test_greedy_generate_rows_match_merged_adapters(kind, tmp_path):
    base = MODELS[kind](0).eval()
    folders = make_all(base, tmp_path)
    multi = loaded(base, folders)
    prompt = torch.randint(1, 100, (len(ROWS), 5), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with multi.use(ROWS):
        out = multi.model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
        # sampling restricted to the top token is greedy too, and num_return_sequences repeats rows
        sampled = multi.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=1, num_return_sequences=2,
            max_new_tokens=8, pad_token_id=0,
        )  # fmt: skip
    for i, name in enumerate(ROWS):
        row = prompt[i : i + 1]
        expected = reference(base, folders.get(name)).generate(row, attention_mask=torch.ones_like(row), **settings)
        assert torch.equal(out[i : i + 1], expected), (kind, name)
        assert torch.equal(sampled[2 * i], expected[0]) and torch.equal(sampled[2 * i + 1], expected[0])
    assert len({tuple(r.tolist()) for r in out}) > 2, "rows should generate differently"


def test_linear_base_2d_inputs_against_dense_float64(tmp_path):
    """A plain nn.Module with [batch, in] inputs: each row equals W x + b + scale B A x in float64."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    folders = {f"a{r}": make_adapter(base, tmp_path / f"a{r}", r, r=r, alpha=3) for r in (2, 4)}
    multi = loaded(base, folders)
    x = torch.randn(3, 6)
    rows = ["a4", None, "a2"]
    with torch.no_grad(), multi.use(rows):
        out = multi.model(x)
    for i, name in enumerate(rows):
        h = x[i].double()
        for index in (0, 2):
            layer = base[index]
            weight = layer.weight.double()
            if name is not None:
                config, tensors, _ = lorakit.read_adapter(folders[name])
                A, B = (tensors[f"{index}.lora_{p}.weight"].double() for p in "AB")
                weight = weight + config.scaling_for(str(index)) * B @ A
            h = weight @ h + layer.bias.double()
            h = torch.tanh(h) if index == 0 else h
        assert (out[i].double() - h).abs().max() <= TOL


def test_conv1d_subset_of_targets_and_unhooked_adapters_refused(tmp_path):
    base = tiny.gpt2(0).eval()
    part = make_adapter(base, tmp_path / "attn", 1, r=4, target_modules=["c_attn"])
    full = make_adapter(base, tmp_path / "full", 2, r=4)  # all linear layers
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=8, target_modules=["c_attn"])
    assert sorted(multi.targets) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    multi.load("attn", part)
    with pytest.raises(AdapterError, match="not hooked here"):
        multi.load("full", full)
    assert multi.names() == ["attn"] and multi.free_slots() == 1
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad(), multi.use(["attn", None]):
        out = multi.model(ids).logits
    assert (out[:1] - reference(base, part)(ids[:1]).logits).abs().max() <= TOL


def test_refusals_leave_the_model_untouched(tmp_path):
    base = tiny.llama(0).eval()
    good = make_adapter(base, tmp_path / "good", 1, r=4)
    big = make_adapter(base, tmp_path / "big", 2, r=16)
    other = make_adapter(tiny.llama(5), tmp_path / "other", 3, r=4)  # same shapes, another base
    dora = make_adapter(base, tmp_path / "dora", 4, r=4)
    config = json.loads((tmp_path / "dora" / CONFIG_NAME).read_text())
    (tmp_path / "dora" / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=8)
    multi.load("good", good)
    state = {k: v.clone() for k, v in multi.model.state_dict().items()}
    buffers = {n: b.clone() for n, b in multi.model.named_buffers()}
    for name, folder, message in [
        ("big", big, "exceeds max_rank=8"),
        ("other", other, "different base model"),
        ("dora", dora, "DoRA"),
        ("missing", tmp_path / "nope", "no such adapter folder"),
    ]:
        with pytest.raises(AdapterError, match=message):
            multi.load(name, folder)
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        with multi.use(["good", "nope"]):
            pass
    assert multi.names() == ["good"] and multi.free_slots() == 1
    assert all(torch.equal(v, state[k]) for k, v in multi.model.state_dict().items())
    assert all(torch.equal(b, buffers[n]) for n, b in multi.model.named_buffers())
    multi.load("other", other, force=True)  # the fingerprint check can be overridden
    with pytest.raises(NoFreeSlotError, match="all 2 adapter slots"):
        multi.load("third", make_adapter(base, tmp_path / "third", 5, r=4))


@torch.no_grad()
def test_load_twice_replace_unload_and_slot_reuse(tmp_path):
    base = tiny.gpt2(0).eval()
    one = make_adapter(base, tmp_path / "one", 1, r=4)
    two = make_adapter(base, tmp_path / "two", 2, r=8)
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=8)
    ids = torch.randint(1, 100, (1, 6))
    multi.load("x", one)
    multi.load("x", one)  # same path: nothing happens
    assert multi.free_slots() == 1
    expect_one, expect_two = (reference(base, f)(ids).logits for f in (one, two))
    with multi.use(["x"]):
        before = multi.model(ids).logits
        multi.load("x", two)  # replaced while a batch runs: that batch keeps its slot
        assert multi.free_slots() == 0
        assert torch.equal(multi.model(ids).logits, before)
    assert multi.free_slots() == 1  # the old slot came back when the batch ended
    assert (before - expect_one).abs().max() <= TOL
    with multi.use(["x"]):
        assert (multi.model(ids).logits - expect_two).abs().max() <= TOL
    multi.unload("x")
    assert multi.names() == [] and multi.free_slots() == 2
    assert all(t.rank == 0 for t in multi.targets.values())
    with pytest.raises(UnknownAdapterError):
        multi.unload("x")
    model = multi.close()
    assert torch.equal(model(ids).logits, base(ids).logits)
    assert not any("lorakit" in n for n, _ in model.named_buffers())


@torch.no_grad()
def test_reused_slot_and_moved_model_never_use_stale_gathered_rows(tmp_path):
    """The per-layer copies gathered for a batch are keyed on slot contents and storage."""
    base = tiny.llama(0).eval()
    one = make_adapter(base, tmp_path / "one", 1, r=4)
    two = make_adapter(base, tmp_path / "two", 2, r=4)
    multi = MultiLoraModel(copy.deepcopy(base), slots=1, max_rank=4)
    ids = torch.randint(1, 100, (2, 5))
    multi.load("x", one)
    with multi.use(["x", None]):
        first = multi.model(ids).logits
    multi.unload("x")
    multi.load("y", two)  # the same slot, so the same slot list as before
    with multi.use(["y", None]):
        second = multi.model(ids).logits
    assert (first[:1] - reference(base, one)(ids[:1]).logits).abs().max() <= TOL
    assert (second[:1] - reference(base, two)(ids[:1]).logits).abs().max() <= TOL
    multi.model.double()  # buffers move with the model; nothing gathered in float32 is reused
    with multi.use(["y", None]):
        third = multi.model(ids).logits
    assert third.dtype == torch.float64 and (third[:1] - second[:1]).abs().max() <= TOL
    assert all(t.cache[1].dtype == torch.float64 for t in multi.targets.values())


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@torch.no_grad()
def test_adapters_saved_by_peft_give_peft_outputs(kind, tmp_path):
    """A folder PEFT wrote (its own classifier head for BERT; Conv1D targets for GPT-2), served per
    row, equals PEFT's own forward of that adapter."""
    import peft

    base = MODELS[kind](0).eval()
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    targets = ["query", "value"] if kind == "bert" else ["c_attn", "c_fc"]
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=6, lora_alpha=9, target_modules=targets, task_type=task, fan_in_fan_out=kind == "gpt2"),
    )
    generator = torch.Generator().manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    multi = MultiLoraModel(copy.deepcopy(base), slots=2, max_rank=8, target_modules=targets)
    multi.load("p", tmp_path / "peft")
    ids = torch.randint(1, 100, (2, 7), generator=generator)
    with multi.use([None, "p"]):
        out = multi.model(ids).logits
    expected = peft_model.eval()(input_ids=ids).logits
    assert (out[1:] - expected[1:]).abs().max() <= TOL
    assert (out[:1] - base(ids[:1]).logits).abs().max() <= TOL


@torch.no_grad()
def test_threads_each_see_their_own_rows(tmp_path):
    """use() is per thread: two threads forwarding on different adapters at once do not mix."""
    import threading

    base = tiny.gpt2(0).eval()
    folders = {n: make_adapter(base, tmp_path / n, seed, r=4) for seed, n in enumerate("ab")}
    multi = loaded(base, folders)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    expected = {n: reference(base, f)(ids).logits for n, f in folders.items()}
    failures: list[str] = []

    def work(name: str) -> None:
        try:  # a thread's exception only warns: record it, or a use() that raises off the main thread passes
            for _ in range(15):
                with multi.use([name, name]):
                    if (multi.model(ids).logits - expected[name]).abs().max() > TOL:
                        failures.append(name)
        except BaseException as err:
            failures.append(f"{name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
