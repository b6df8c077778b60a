"""The one adapter-file parser (lorakit.files.plan) and its two users: load_adapter and the
server's MultiLoraModel.prepare accept and refuse the same files for the same reasons.

References: the saved file's own tensors (read back with safetensors), the model's module names
(named_modules), and load_adapter's outputs for what the server computes."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch
import torch.nn as nn
from safetensors import safe_open

import lorakit
from lorakit.cli import main
from lorakit.commands.inspect import describe
from lorakit.files.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterError, write_adapter_folder
from lorakit.files.plan import plan_adapter
from lorakit.serve import MultiLoraModel

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
NOTHING = "no tensor in the file matches a module of this model"


def random_adapter(model: nn.Module, folder, seed: int = 1, **config) -> str:
    """Inject an adapter with random non-zero B into `model` (in place) and save it."""
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": TARGETS, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.2)
    return str(lorakit.save_adapter(model, folder))


def file_parts(folder) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """The raw config JSON, tensors (PEFT keys) and metadata of a saved adapter."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return config, {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def edited(source, out, *, config=None, tensors=None, metadata=None) -> str:
    """A copy of adapter `source` with its config / tensors / metadata replaced by the edits."""
    raw, weights, meta = file_parts(source)
    return str(write_adapter_folder(out, config or raw, tensors or weights, meta if metadata is None else metadata))


def refusals(folder, match: str, seed: int = 0) -> tuple[str, str]:
    """load_adapter's and MultiLoraModel.prepare's messages for `folder`; both must refuse and leave
    the model as it was."""
    model = tiny.llama(seed).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match) as library:
        lorakit.load_adapter(model, folder)
    assert not lorakit.lora_layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    multi = MultiLoraModel(tiny.llama(seed).eval(), slots=2, max_rank=8)
    with pytest.raises(AdapterError, match=match) as served:
        multi.load("x", folder)
    assert multi.names() == [] and multi.free_slots() == 2
    return str(library.value), str(served.value)


def test_plan_of_a_saved_adapter_covers_exactly_its_targets(tmp_path):
    folder = random_adapter(tiny.llama(0).eval(), tmp_path / "a")
    config, tensors, _ = lorakit.read_adapter(folder)
    _, raw, _ = file_parts(tmp_path / "a")
    model = tiny.llama(0).eval()
    plan = plan_adapter(config, tensors, model)
    expected = tuple(n for n, _ in model.named_modules() if n.endswith(tuple(TARGETS)))
    assert len(expected) == 4
    assert plan.coverage.targeted == plan.coverage.matched == expected
    assert plan.coverage.empty == plan.coverage.unused == () and plan.problems == []
    assert not plan.saved and not plan.extras and list(plan.layers) == list(expected)
    for name, entry in plan.layers.items():
        assert (entry.kind, entry.variant, entry.rank, entry.scaling) == ("linear", "lora", 4, 2.0)
        assert torch.equal(entry.A, raw[f"{PREFIX}{name}.lora_A.weight"])
        assert torch.equal(entry.B, raw[f"{PREFIX}{name}.lora_B.weight"])

    # One targeted module without tensors, one tensor for a module the config does not target.
    gone = "model.layers.1.self_attn.v_proj"
    odd = {k: v for k, v in tensors.items() if not k.startswith(gone)}
    odd["model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    plan = plan_adapter(config, odd, model, strict=False)
    assert plan.coverage.empty == (gone,) and gone not in plan.coverage.matched
    assert plan.coverage.unused == ("model.layers.0.self_attn.k_proj.lora_A.weight",)
    assert any("not among the config's target_modules" in p for p in plan.problems)
    assert f"missing key {gone}.lora_A.weight" in plan.problems
    with pytest.raises(AdapterError, match="missing key"):
        plan_adapter(config, odd, model)


def test_a_file_whose_keys_match_nothing_is_refused_by_both_with_the_same_reason(tmp_path):
    source = tmp_path / "a"
    random_adapter(tiny.llama(0).eval(), source)
    _, tensors, _ = file_parts(source)
    renamed = {k.replace(".self_attn.", ".attention_x."): v for k, v in tensors.items()}
    folder = edited(source, tmp_path / "nothing", tensors=renamed, metadata={"format": "pt"})
    library, served = refusals(folder, NOTHING)
    assert "does not fit LlamaForCausalLM" in library and "cannot be served here" in served


def test_the_server_enforces_target_modules_as_the_library_does(tmp_path):
    source = tmp_path / "a"
    random_adapter(tiny.llama(0).eval(), source)
    raw, tensors, _ = file_parts(source)
    # A targeted module whose tensors are absent: the server used to serve it without them.
    gone = f"{PREFIX}model.layers.1.self_attn.v_proj"
    partial = edited(source, tmp_path / "partial", tensors={k: v for k, v in tensors.items() if not k.startswith(gone)})
    for message in refusals(partial, "missing key model.layers.1.self_attn.v_proj.lora_A.weight"):
        assert "missing key model.layers.1.self_attn.v_proj.lora_B.weight" in message
    # Tensors for a hooked module the config does not target: the server used to add them.
    narrow = edited(source, tmp_path / "narrow", config={**raw, "target_modules": ["q_proj"]})
    for message in refusals(narrow, "unexpected key model.layers.0.self_attn.v_proj.lora_A.weight"):
        assert "not among the config's target_modules" in message
    # target_modules that name no module of the model: the server used to ignore the config.
    elsewhere = edited(source, tmp_path / "elsewhere", config={**raw, "target_modules": ["query", "value"]})
    refusals(elsewhere, r"\(made for another model\?\): target_modules=\['query', 'value'\] matches no module")


def test_the_server_checks_the_fingerprint_as_the_library_does_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.variants import qlora as quant

    try:
        quantized = quant.quantize_model(tiny.llama(0).eval(), targets=TARGETS)
    except Exception as err:  # a bitsandbytes build without a working CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {err}")
    folder = random_adapter(quantized, tmp_path / "q")
    # The quantized base, its fp32 original (the 4-bit layers keep its fingerprint): both accept.
    for base in (quant.quantize_model(tiny.llama(0).eval(), targets=TARGETS), tiny.llama(0).eval()):
        reference = lorakit.load_adapter(copy.deepcopy(base), folder)
        multi = MultiLoraModel(base, slots=2, max_rank=8, target_modules=TARGETS)
        multi.load("q", folder)
        with torch.no_grad(), multi.use(["q", None]):
            out = multi.model(IDS).logits
        with torch.no_grad():
            assert (out[:1] - reference(IDS[:1]).logits).abs().max() <= 1e-5
            with lorakit.disable_adapters(reference):
                assert (out[1:] - reference(IDS[1:]).logits).abs().max() <= 1e-5
    # Another base: both refuse.
    refusals(folder, "made for a different base model", seed=1)


def test_inspect_shows_the_coverage_on_a_base(tmp_path, capsys):
    source = tmp_path / "a"
    random_adapter(tiny.llama(0).eval(), source)
    report = describe(source, tiny.llama(0).eval())["coverage"]
    assert report["loadable"] and report["matched"] == report["targeted"] and len(report["targeted"]) == 4
    raw, tensors, _ = file_parts(source)
    narrow = edited(source, tmp_path / "narrow", config={**raw, "target_modules": ["q_proj"]})
    base = tmp_path / "base"
    tiny.llama(0).save_pretrained(base)
    assert main(["inspect", narrow, "--base", str(base), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["coverage"]
    assert not report["loadable"] and len(report["matched"]) == 2 and "not among" in report["problems"][0]
    assert sorted(report["unused"]) == sorted(k.removeprefix(PREFIX) for k in tensors if ".v_proj." in k)
    assert main(["inspect", narrow, "--base", str(base)]) == 0
    assert "2 of 2 targeted modules matched" in capsys.readouterr().out
