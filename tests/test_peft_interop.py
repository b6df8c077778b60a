"""lorakit <-> PEFT interoperability on tiny random BERT, GPT-2 and Llama models.

Every check is against PEFT itself on the same base weights and the same (random, non-zero)
adapter weights: PEFT loading lorakit's files, lorakit loading PEFT's files, the key sets and
configs both write, and merge_and_unload on both sides.
"""

from __future__ import annotations

import functools
import json
import re

import peft
import pytest
import tiny
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

import lorakit

TOL = 1e-5

pytestmark = [
    # A PEFT load that misses keys leaves those B matrices at zero: make it a failure, not a warning.
    pytest.mark.filterwarnings("error:Found missing adapter keys"),
    # lorakit records fan_in_fan_out for GPT-2's Conv1D as PEFT does; PEFT warns when a file says otherwise.
    pytest.mark.filterwarnings("error:fan_in_fan_out is set to False"),
    # PEFT announcing its own default (saving a targeted embedding's base weight) is noise here.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`"),
]


# --- tiny models -----------------------------------------------------------------------------
_bert, _gpt2, _llama = tiny.bert, tiny.gpt2, tiny.llama


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}
EMBEDDING = {"bert": "word_embeddings", "gpt2": "wte", "llama": "embed_tokens"}


@functools.cache
def _base_state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in BUILDERS[arch]().state_dict().items()}


def base(arch: str) -> torch.nn.Module:
    """A fresh copy of the one base model of `arch` (same weights every call), in eval mode."""
    model = BUILDERS[arch]()
    model.load_state_dict(_base_state(arch))
    return model.eval()


_GEN = torch.Generator().manual_seed(1234)
# 24 tokens take lorakit's merge-on-the-fly inference path on most layers, 5 tokens the factored one.
INPUTS = [torch.randint(0, 100, (2, 12), generator=_GEN), torch.randint(0, 100, (1, 5), generator=_GEN)]


def logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits and last hidden states for INPUTS, flat. The hidden states keep the check sharp
    where a tiny head squeezes the logits (BERT's 3 labels behind a tanh pooler are ~0.01)."""
    parts = []
    with torch.no_grad():
        for ids in INPUTS:
            out = model(input_ids=ids, output_hidden_states=True)
            parts += [out.logits.flatten(), out.hidden_states[-1].flatten()]
    return torch.cat(parts)


@functools.cache
def _base_logits(arch: str) -> torch.Tensor:
    return logits(base(arch))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_adapted(arch: str, out: torch.Tensor) -> None:
    """The adapter really changes the output, so agreement below TOL means something."""
    assert max_diff(out, _base_logits(arch)) > 1e-3


def randomise(model: torch.nn.Module, *fragments: str, seed: int = 0, std: float = 0.1) -> None:
    """Random values for every parameter whose name contains one of `fragments` (B is zero at init)."""
    gen = torch.Generator().manual_seed(seed)
    hit = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(f in name for f in fragments):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
                hit += 1
    assert hit, f"no parameter matches {fragments}"


def file_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def file_config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def peft_load(arch: str, folder) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(base(arch), str(folder)).eval()


def assert_same_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=atol), key


# --- (a) lorakit -> PEFT ------------------------------------------------------------------------
QV = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}

LORAKIT_CASES = {
    **{f"{arch}-default-r": (arch, {"target_modules": QV[arch]}, ("lora_",)) for arch in BUILDERS},
    **{f"{arch}-all-linear": (arch, {}, ("lora_",)) for arch in BUILDERS},
    **{f"{arch}-embedding": (arch, {"target_modules": [EMBEDDING[arch]], "r": 4}, ("lora_",)) for arch in BUILDERS},
    "llama-embedding-and-linear": ("llama", {"target_modules": ["embed_tokens", "q_proj", "o_proj"]}, ("lora_",)),
    "llama-rslora": (
        "llama",
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "alpha": 8, "use_rslora": True},
        ("lora_",),
    ),
    "bert-rank-alpha-pattern": (
        "bert",
        {
            "target_modules": ["query", "key", "value", "dense"],
            "r": 4,
            "rank_pattern": {"key": 2, r"layer\.1\.attention\.self\.query": 6},
            "alpha_pattern": {"value": 3.0, "dense": 5},
        },
        ("lora_",),
    ),
    "llama-rank-alpha-pattern-rslora": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "use_rslora": True,
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 3},
            "alpha_pattern": {"v_proj": 4},
        },
        ("lora_",),
    ),
    "bert-modules-to-save": (
        "bert",
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        ("lora_", "classifier."),
    ),
    "bert-bias-lora-only": (
        "bert",
        {"target_modules": ["query", "value"], "bias": "lora_only"},
        ("lora_", "base_layer.bias"),
    ),
    "gpt2-bias-lora-only": ("gpt2", {"target_modules": ["c_attn"], "bias": "lora_only"}, ("lora_", "base_layer.bias")),
    "gpt2-fused-c-attn": (
        "gpt2",
        {"target_modules": ["c_attn"], "r": 4, "enable_lora": {"c_attn": [True, False, True]}},
        ("lora_",),
    ),
    "gpt2-fused-c-attn-rslora-plus-mlp": (
        "gpt2",
        {
            "target_modules": ["c_attn", "c_fc"],
            "r": 2,
            "use_rslora": True,
            "enable_lora": {"c_attn": [True, False, True]},
        },
        ("lora_",),
    ),
}


@pytest.mark.parametrize("case", sorted(LORAKIT_CASES))
def test_lorakit_adapter_loads_in_peft(case, tmp_path):
    arch, kwargs, fragments = LORAKIT_CASES[case]
    model = lorakit.inject(base(arch), lorakit.LoraConfig(**kwargs))
    randomise(model, *fragments)
    expected = logits(model.eval())
    assert_adapted(arch, expected)

    folder = lorakit.save_adapter(model, tmp_path / "adapter")
    theirs = peft_load(arch, folder)

    assert max_diff(logits(theirs), expected) <= TOL
    # PEFT's own view of the loaded adapter is exactly what lorakit wrote, key for key.
    assert_same_state(file_tensors(folder), get_peft_model_state_dict(theirs, save_embedding_layers=False))


def test_fused_c_attn_is_written_as_plain_lora_of_rank_2r(tmp_path):
    """enable_lora=[T, F, T] with r=4 is the plain LoRA of rank 8 whose B is zero on the k slice."""
    model = lorakit.inject(
        base("gpt2"),
        lorakit.LoraConfig(target_modules=["c_attn"], r=4, alpha=6, enable_lora={"c_attn": [True, False, True]}),
    )
    randomise(model, "lora_")
    folder = lorakit.save_adapter(model, tmp_path / "adapter")
    tensors, config = file_tensors(folder), file_config(folder)
    name = "transformer.h.0.attn.c_attn"
    A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    assert A.shape == (8, 32) and B.shape == (96, 8)
    assert torch.count_nonzero(B[32:64]) == 0  # the k slice is not adapted
    assert config["rank_pattern"][name] == 8
    assert config["alpha_pattern"][name] == pytest.approx(6 / 4 * 8)  # same scaling: alpha'/r' == alpha/r
    layer = dict(lorakit.lora_layers(model))[name]
    delta = (B @ A * config["alpha_pattern"][name] / config["rank_pattern"][name]).t()  # Conv1D layout
    assert torch.allclose(delta, layer.delta_weight("default"), atol=1e-7)


# --- (b) PEFT -> lorakit ------------------------------------------------------------------------
PEFT_CASES = {
    "bert-rslora": (
        "bert",
        {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8, "use_rslora": True},
        ("lora_",),
    ),
    "llama-rank-alpha-pattern": (
        "llama",
        {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "r": 4,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 3, r"layers\.0\.mlp\.up_proj": 20},
        },
        ("lora_",),
    ),
    "bert-seq-cls-modules-to-save": (
        "bert",
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]},
        ("lora_", "modules_to_save"),
    ),
    "bert-explicit-modules-to-save": (
        "bert",
        {"target_modules": ["query", "key"], "modules_to_save": ["classifier"]},
        ("lora_", "modules_to_save"),
    ),
    **{f"{arch}-embedding": (arch, {"target_modules": [EMBEDDING[arch]], "r": 4}, ("lora_",)) for arch in BUILDERS},
    "llama-embedding-and-linear": ("llama", {"target_modules": ["embed_tokens", "q_proj"], "r": 4}, ("lora_",)),
    "bert-gaussian-init": ("bert", {"target_modules": ["query", "value"], "init_lora_weights": "gaussian"}, ("lora_",)),
    "gpt2-c-attn-fan-in-fan-out": ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, ("lora_",)),
    "gpt2-all-linear": ("gpt2", {"target_modules": "all-linear", "fan_in_fan_out": True, "r": 2}, ("lora_",)),
    "llama-q-v": ("llama", {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}, ("lora_",)),
    "llama-regex-targets": ("llama", {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj"}, ("lora_",)),
    "bert-all-linear": ("bert", {"target_modules": "all-linear"}, ("lora_",)),
    "bert-bias-lora-only": (
        "bert",
        {"target_modules": ["query", "value"], "bias": "lora_only"},
        ("lora_", "base_layer.bias"),
    ),
}


def make_peft_adapter(arch, kwargs, fragments, folder, **save_kwargs):
    """A PEFT model with random adapter weights, saved to `folder`; returns it with its logits."""
    model = peft.get_peft_model(base(arch), peft.LoraConfig(**kwargs))
    randomise(model, *fragments)
    expected = logits(model.eval())
    assert_adapted(arch, expected)
    model.save_pretrained(str(folder), **save_kwargs)
    return model, expected


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path):
    arch, kwargs, fragments = PEFT_CASES[case]
    _, expected = make_peft_adapter(arch, kwargs, fragments, tmp_path / "peft")

    ours = lorakit.load_adapter(base(arch), tmp_path / "peft")

    assert max_diff(logits(ours), expected) <= TOL
    # The LoRA weights load frozen (for inference) unless trainable=True.
    lora = [p for _, layer in lorakit.lora_layers(ours) for p in (*layer.lora_A.values(), *layer.lora_B.values())]
    assert lora and not any(p.requires_grad for p in lora)


def test_peft_embedding_default_saves_base_weight_and_lorakit_applies_it(tmp_path):
    """PEFT's save_embedding_layers="auto" also writes a targeted embed_tokens' full base weight
    (`...embed_tokens.base_layer.weight`); loading it replaces the base table, in PEFT and lorakit."""
    model = peft.get_peft_model(base("llama"), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4))
    randomise(model, "lora_", "embed_tokens.base_layer.weight")  # as if the table had been trained too
    model.save_pretrained(str(tmp_path / "peft"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in file_tensors(tmp_path / "peft")

    reference = logits(peft_load("llama", tmp_path / "peft"))
    assert max_diff(reference, logits(model.eval())) <= TOL
    ours = lorakit.load_adapter(base("llama"), tmp_path / "peft")
    assert max_diff(logits(ours), reference) <= TOL


def test_peft_embedding_default_does_not_save_bert_word_embeddings(tmp_path):
    """ "auto" only saves tables named like embed_tokens / lm_head: BERT's word_embeddings LoRA
    file holds the two LoRA tensors and nothing else."""
    make_peft_adapter("bert", {"target_modules": ["word_embeddings"], "r": 4}, ("lora_",), tmp_path / "peft")
    assert sorted(file_tensors(tmp_path / "peft")) == [
        "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A",
        "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B",
    ]


@pytest.mark.parametrize(
    ("arch", "kwargs", "tables"),
    [
        ("llama", {"target_modules": ["q_proj"]}, ["model.embed_tokens.weight", "lm_head.weight"]),
        # Tied: one tensor under two names.
        ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, ["transformer.wte.weight", "lm_head.weight"]),
    ],
    ids=["llama", "gpt2-tied"],
)
def test_peft_save_embedding_layers_true_with_untargeted_embeddings(arch, kwargs, tables, tmp_path):
    """save_embedding_layers=True (what PEFT does by itself after a vocabulary resize) writes the
    full input and output embeddings under their plain names; lorakit must load them as PEFT does."""
    model = peft.get_peft_model(base(arch), peft.LoraConfig(r=4, **kwargs))
    randomise(model, "lora_", *tables)  # as if the tables had been trained too
    model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=True)
    assert {f"base_model.model.{t}" for t in tables} <= set(file_tensors(tmp_path / "peft"))

    reference = logits(peft_load(arch, tmp_path / "peft"))
    assert max_diff(reference, logits(model.eval())) <= TOL
    ours = lorakit.load_adapter(base(arch), tmp_path / "peft")
    assert max_diff(logits(ours), reference) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora_bias": True}, "lora_bias=True: a bias on lora_B is not supported"),
        # Same tensors as plain LoRA, but PEFT applies them only from the invocation tokens on.
        (
            {"task_type": "CAUSAL_LM", "alora_invocation_tokens": [5, 6]},
            "alora_invocation_tokens=[5, 6]: activated LoRA (aLoRA) is not supported",
        ),
        ({"layers_to_transform": [1]}, "layers_to_transform=[1]: adapting only some layers"),
    ],
    ids=["lora-bias", "alora", "layers-to-transform"],
)
# lora_bias on Llama's bias-free layers: PEFT warns about merging and mistakes its own 1-D
# lora_B.bias for an unsharded ZeRO-3 tensor when saving.
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")
def test_peft_features_lorakit_cannot_represent_are_refused(kwargs, match, tmp_path):
    """Loading such a file as plain LoRA would silently give other outputs: refuse it, untouched."""
    peft_model = peft.get_peft_model(base("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    randomise(peft_model, "lora_")
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = base("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.AdapterError, match=re.escape(match)):
        lorakit.load_adapter(model, tmp_path / "peft")
    assert lorakit.lora_layers(model) == []
    assert_same_state(model.state_dict(), before)


# --- (c) lorakit round trip ---------------------------------------------------------------------
ROUND_TRIP_CASES = {
    "bert-classifier-bias-patterns": (
        "bert",
        {
            "target_modules": ["query", "value", "dense"],
            "modules_to_save": ["classifier"],
            "bias": "lora_only",
            "rank_pattern": {"value": 2},
            "alpha_pattern": {"dense": 4},
        },
        ("lora_", "classifier.", "base_layer.bias"),
    ),
    "gpt2-fused-and-embedding": (
        "gpt2",
        {"target_modules": ["c_attn", "wte"], "r": 4, "enable_lora": {"c_attn": [True, False, True]}},
        ("lora_",),
    ),
    "llama-embedding-rslora-patterns": (
        "llama",
        {
            "target_modules": ["embed_tokens", "q_proj", "down_proj"],
            "use_rslora": True,
            "rank_pattern": {"down_proj": 3},
        },
        ("lora_",),
    ),
    "llama-all-linear": ("llama", {}, ("lora_",)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_lorakit_round_trip(case, tmp_path):
    arch, kwargs, fragments = ROUND_TRIP_CASES[case]
    model = lorakit.inject(base(arch), lorakit.LoraConfig(**kwargs))
    randomise(model, *fragments)
    expected = logits(model.eval())
    assert_adapted(arch, expected)
    lorakit.save_adapter(model, tmp_path / "first")

    loaded = lorakit.load_adapter(base(arch), tmp_path / "first")

    assert max_diff(logits(loaded), expected) <= 1e-6
    # Saving what was loaded writes the same adapter again.
    lorakit.save_adapter(loaded, tmp_path / "second")
    assert_same_state(file_tensors(tmp_path / "second"), file_tensors(tmp_path / "first"))
    assert file_config(tmp_path / "second") == file_config(tmp_path / "first")


def test_saved_config_has_peft_fields(tmp_path):
    model = base("bert")
    model.config._name_or_path = "tiny-org/tiny-bert"
    config = lorakit.LoraConfig(
        r=4,
        alpha=8,
        target_modules=["value", "query"],
        modules_to_save=["classifier"],
        bias="lora_only",
        use_rslora=True,
        rank_pattern={"value": 2},
        alpha_pattern={"query": 3},
    )
    lorakit.inject(model, config)
    data = file_config(lorakit.save_adapter(model, tmp_path / "adapter"))

    assert data["peft_type"] == "LORA"
    assert data["task_type"] == "SEQ_CLS"
    assert data["base_model_name_or_path"] == "tiny-org/tiny-bert"
    assert data["r"] == 4 and data["lora_alpha"] == 8
    assert data["target_modules"] == ["query", "value"]
    assert data["use_rslora"] is True and data["use_dora"] is False
    assert data["rank_pattern"] == {"value": 2} and data["alpha_pattern"] == {"query": 3}
    assert data["modules_to_save"] == ["classifier"]
    assert data["fan_in_fan_out"] is False
    assert data["bias"] == "lora_only"
    assert data["init_lora_weights"] is True
    # PEFT itself parses it into the same settings.
    parsed = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(parsed, peft.LoraConfig)
    assert (parsed.r, parsed.lora_alpha, parsed.use_rslora, parsed.bias) == (4, 8, True, "lora_only")
    assert parsed.rank_pattern == {"value": 2} and parsed.alpha_pattern == {"query": 3}
    assert set(parsed.target_modules) == {"query", "value"}


# (arch, lorakit kwargs, equivalent PEFT kwargs)
SAME_CONFIG_CASES = {
    "bert-seq-cls": (
        "bert",
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": "lora_only"},
        {"task_type": "SEQ_CLS", "target_modules": ["query", "value"], "bias": "lora_only", "lora_alpha": 16},
    ),
    "bert-embedding-rslora-patterns": (
        "bert",
        {
            "target_modules": ["word_embeddings", "key"],
            "use_rslora": True,
            "rank_pattern": {"key": 2},
            "alpha_pattern": {"key": 3},
        },
        {
            "task_type": "SEQ_CLS",
            "target_modules": ["word_embeddings", "key"],
            "lora_alpha": 16,
            "use_rslora": True,
            "rank_pattern": {"key": 2},
            "alpha_pattern": {"key": 3},
        },
    ),
    "gpt2-causal-lm": (
        "gpt2",
        {"target_modules": ["c_attn", "c_proj"], "r": 4},
        {
            "task_type": "CAUSAL_LM",
            "target_modules": ["c_attn", "c_proj"],
            "r": 4,
            "lora_alpha": 16,
            "fan_in_fan_out": True,
        },
    ),
    "llama-causal-lm-embedding": (
        "llama",
        {"target_modules": ["embed_tokens", "q_proj", "v_proj"]},
        {"task_type": "CAUSAL_LM", "target_modules": ["embed_tokens", "q_proj", "v_proj"], "lora_alpha": 16},
    ),
}
COMPARED_FIELDS = [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
]


@pytest.mark.parametrize("case", sorted(SAME_CONFIG_CASES))
def test_same_keys_and_config_as_peft(case, tmp_path):
    arch, ours_kwargs, theirs_kwargs = SAME_CONFIG_CASES[case]
    ours = lorakit.inject(base(arch), lorakit.LoraConfig(**ours_kwargs))
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(base(arch), peft.LoraConfig(**theirs_kwargs))
    # Without the (optional) full embedding tables PEFT adds for embed_tokens by default.
    theirs.save_pretrained(str(tmp_path / "theirs"), save_embedding_layers=False)

    ours_t, theirs_t = file_tensors(tmp_path / "ours"), file_tensors(tmp_path / "theirs")
    assert sorted(ours_t) == sorted(theirs_t)
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}
    assert {k: v.dtype for k, v in ours_t.items()} == {k: v.dtype for k, v in theirs_t.items()}

    ours_c, theirs_c = file_config(tmp_path / "ours"), file_config(tmp_path / "theirs")
    assert {f: ours_c[f] for f in COMPARED_FIELDS} == {f: theirs_c[f] for f in COMPARED_FIELDS}
    assert sorted(ours_c["target_modules"]) == sorted(theirs_c["target_modules"])
    # PEFT adds its task's head names ("score" besides "classifier"); lorakit writes what it saved.
    assert set(ours_c["modules_to_save"] or []) <= set(theirs_c["modules_to_save"] or [])


# --- (d) merge_and_unload -----------------------------------------------------------------------
def _lorakit_made(arch, kwargs, fragments, folder):
    model = lorakit.inject(base(arch), lorakit.LoraConfig(**kwargs))
    randomise(model, *fragments)
    lorakit.save_adapter(model, folder)


def _peft_made(arch, kwargs, fragments, folder):
    make_peft_adapter(arch, kwargs, fragments, folder)


# case -> (who writes the adapter, (arch, kwargs, fragments to randomise))
MERGE_CASES = {
    "bert-peft-seq-cls": (_peft_made, PEFT_CASES["bert-seq-cls-modules-to-save"]),
    "bert-lorakit-embedding-bias": (
        _lorakit_made,
        (
            "bert",
            {"target_modules": ["word_embeddings", "query", "value"], "bias": "lora_only"},
            ("lora_", "base_layer.bias"),
        ),
    ),
    "gpt2-peft-c-attn": (_peft_made, PEFT_CASES["gpt2-c-attn-fan-in-fan-out"]),
    "gpt2-lorakit-fused": (_lorakit_made, LORAKIT_CASES["gpt2-fused-c-attn-rslora-plus-mlp"]),
    "llama-peft-patterns": (_peft_made, PEFT_CASES["llama-rank-alpha-pattern"]),
    "llama-lorakit-rslora": (_lorakit_made, LORAKIT_CASES["llama-rank-alpha-pattern-rslora"]),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_and_unload_matches_peft(case, tmp_path):
    maker, (arch, kwargs, fragments) = MERGE_CASES[case]
    maker(arch, kwargs, fragments, tmp_path / "adapter")

    ours = lorakit.load_adapter(base(arch), tmp_path / "adapter")
    unmerged = logits(ours)
    ours = lorakit.merge_and_unload(ours)
    theirs = peft_load(arch, tmp_path / "adapter").merge_and_unload()

    assert lorakit.lora_layers(ours) == []
    assert max_diff(logits(ours), logits(theirs)) <= TOL
    assert max_diff(logits(ours), unmerged) <= TOL
    # Both give an ordinary checkpoint of the base architecture with the same merged weights.
    assert_same_state(ours.state_dict(), theirs.state_dict(), atol=1e-6)
    assert sorted(ours.state_dict()) == sorted(_base_state(arch))


def test_merge_and_unload_tied_gpt2_embedding_keeps_adapter_outputs(tmp_path):
    """GPT-2 ties lm_head to wte. A LoRA on wte changes the input lookup only, so the merged
    model must give the adapter's outputs. (PEFT merges in place into the shared tensor and so
    also changes lm_head; lorakit does not copy that behaviour.)"""
    _peft_made("gpt2", {"target_modules": ["wte"], "r": 4}, ("lora_",), tmp_path / "adapter")
    ours = lorakit.load_adapter(base("gpt2"), tmp_path / "adapter")
    unmerged = logits(ours)
    assert max_diff(unmerged, logits(peft_load("gpt2", tmp_path / "adapter"))) <= TOL

    merged = lorakit.merge_and_unload(ours)

    assert max_diff(logits(merged), unmerged) <= TOL


# --- modules_to_save: a copy per adapter, as PEFT's ModulesToSaveWrapper ---------------------------
def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert sorted(now) == sorted(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


def _gpt2_with_saved_head(seed: int) -> torch.nn.Module:
    config = lorakit.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
    model = lorakit.inject(base("gpt2"), config)
    randomise(model, "lora_", seed=seed)
    head = model.lm_head.weight  # the head in use: the adapter's copy (a plain lm_head would be the tied wte)
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_gpt2_saved_lm_head_leaves_the_tied_wte_alone_and_disable_unload_give_the_base(tmp_path):
    reference = _state(base("gpt2"))
    model = _gpt2_with_saved_head(seed=3)
    assert model.transformer.wte.weight is model.lm_head.original_module.weight  # the tie is kept, untouched
    assert torch.equal(model.transformer.wte.weight, reference["transformer.wte.weight"])
    assert_adapted("gpt2", logits(model))
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model), _base_logits("gpt2"))
    folder = lorakit.save_adapter(model, tmp_path / "a")
    keys = set(file_tensors(folder))
    assert "base_model.model.lm_head.weight" in keys and not any("modules_to_save" in k for k in keys)
    lorakit.unload(model)
    _assert_bit_identical(model, reference)

    loaded = lorakit.load_adapter(base("gpt2"), folder)
    assert torch.equal(loaded.transformer.wte.weight, reference["transformer.wte.weight"])
    assert max_diff(logits(loaded), logits(peft_load("gpt2", folder))) <= TOL
    with lorakit.disable_adapters(loaded):
        assert torch.equal(logits(loaded), _base_logits("gpt2"))
    _assert_bit_identical(lorakit.unload(loaded), reference)


def test_two_adapters_keep_their_own_saved_heads(tmp_path):
    folders, expected = [], []
    for seed in (1, 2):
        model = _gpt2_with_saved_head(seed)
        expected.append(logits(model))
        folders.append(lorakit.save_adapter(model, tmp_path / f"a{seed}"))
    assert max_diff(*expected) > 1e-3
    model = lorakit.load_adapter(base("gpt2"), folders[0], "one")
    lorakit.load_adapter(model, folders[1], "two")
    assert max_diff(logits(model), expected[1]) <= 1e-6
    lorakit.set_adapter(model, "one")
    assert max_diff(logits(model), expected[0]) <= 1e-6
    lorakit.delete_adapter(model, "one")
    lorakit.set_adapter(model, "two")
    assert max_diff(logits(model), expected[1]) <= 1e-6
    merged = lorakit.merge_and_unload(model)
    assert max_diff(logits(merged), expected[1]) <= 1e-5
    assert not any("modules_to_save" in k or "original_module" in k for k in merged.state_dict())


def test_peft_saved_classifier_loads_as_a_copy(tmp_path):
    reference = _state(base("bert"))
    kwargs = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    make_peft_adapter("bert", kwargs, ("lora_", "modules_to_save"), tmp_path / "peft")
    expected = logits(peft_load("bert", tmp_path / "peft"))
    ours = lorakit.load_adapter(base("bert"), tmp_path / "peft")
    assert max_diff(logits(ours), expected) <= TOL
    with lorakit.disable_adapters(ours):
        assert torch.equal(logits(ours), _base_logits("bert"))
    _assert_bit_identical(lorakit.unload(ours), reference)


# --- the README's promise: disable_adapters and unload give back the exact base --------------------
def test_trained_biases_are_put_back_by_disable_and_unload(tmp_path):
    reference = _state(base("bert"))
    config = lorakit.LoraConfig(r=4, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])
    model = lorakit.inject(base("bert"), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as training would: LoRA, the classifier's copy and every bias (in place, as PEFT)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    expected = logits(model)
    folder = lorakit.save_adapter(model, tmp_path / "a")
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model), _base_logits("bert"))
    assert torch.equal(logits(model), expected)  # and back after the block
    _assert_bit_identical(lorakit.unload(model), reference)

    loaded = lorakit.load_adapter(base("bert"), folder)
    assert max_diff(logits(loaded), expected) <= 1e-6
    with lorakit.disable_adapters(loaded):
        assert torch.equal(logits(loaded), _base_logits("bert"))
    _assert_bit_identical(lorakit.unload(loaded), reference)


def test_peft_embedding_tables_are_put_back_by_unload_and_delete(tmp_path):
    reference = _state(base("gpt2"))
    model = peft.get_peft_model(base("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    randomise(model, "lora_", "transformer.wte.weight")  # a trained (tied) table, saved in full
    model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=True)
    ours = lorakit.load_adapter(base("gpt2"), tmp_path / "peft")
    assert max_diff(logits(ours), logits(peft_load("gpt2", tmp_path / "peft"))) <= TOL
    with lorakit.disable_adapters(ours):
        assert torch.equal(logits(ours), _base_logits("gpt2"))
    _assert_bit_identical(lorakit.unload(ours), reference)
    again = lorakit.load_adapter(base("gpt2"), tmp_path / "peft")
    lorakit.delete_adapter(again, "default")
    _assert_bit_identical(again, reference)
