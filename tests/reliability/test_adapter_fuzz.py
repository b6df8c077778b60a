"""Fuzzed adapter folders: damaged or hostile mutations of one valid saved adapter.

Every case must be refused with lorakit's AdapterError (never a raw torch / safetensors /
json exception) and leave the model's state dict bit-identical. The cases are generated from
one seed, so a failure names a case that reproduces. Prints tried / refused / untouched.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from lorakit.core.inject import CONFIGS_ATTR

SEED = 20260
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class Source:
    """The valid adapter every case starts from: its config, tensors, metadata and bytes."""

    def __init__(self, folder: Path) -> None:
        self.config = json.loads((folder / CONFIG).read_text())
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            self.tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            self.metadata = handle.metadata()
        self.raw = (folder / WEIGHTS).read_bytes()
        (length,) = struct.unpack("<Q", self.raw[:8])
        self.header_len = length
        self.header = json.loads(self.raw[8 : 8 + length])


Mutation = Callable[[Path, Source, random.Random], None]


# --- writing helpers ---------------------------------------------------------------------------
def write_config(folder: Path, data) -> None:
    (folder / CONFIG).write_text(json.dumps(data))


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS), metadata=metadata)


def write_header(folder: Path, src: Source, header: dict, data: bytes | None = None) -> None:
    """A weights file with `header` (JSON) in front of the original (or given) data buffer."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = src.raw[8 + src.header_len :] if data is None else data
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + body)


def lora_keys(src: Source) -> list[str]:
    return sorted(k for k in src.tensors if ".lora_" in k)


def base_weight_keys(model_state: dict[str, torch.Tensor], src: Source) -> list[str]:
    """Base parameters the adapter does not save: what a hostile key may try to overwrite.
    (Embedding tables are left out: PEFT's save_embedding_layers legitimately saves them.)"""
    saved = {k.removeprefix(PREFIX) for k in src.tensors}
    return sorted(
        k for k in model_state if k not in saved and "word_embeddings" not in k and not k.startswith("classifier.")
    )


# --- mutation families -------------------------------------------------------------------------
def truncated(cut: str) -> Mutation:
    def mutate(folder, src, rng):
        if cut == "header":
            end = rng.randrange(0, 8 + src.header_len)
        else:
            end = rng.randrange(8 + src.header_len, len(src.raw) - 1)
        (folder / WEIGHTS).write_bytes(src.raw[:end])

    return mutate


def garbage(folder, src, rng):
    (folder / WEIGHTS).write_bytes(rng.randbytes(rng.randrange(1, 4096)))


def bit_flipped_length(folder, src, rng):
    data = bytearray(src.raw)
    data[rng.randrange(0, 8)] ^= 1 << rng.randrange(8)
    (folder / WEIGHTS).write_bytes(bytes(data))


def header_edit(kind: str) -> Mutation:
    def mutate(folder, src, rng):
        header = json.loads(json.dumps(src.header))
        key = rng.choice(lora_keys(src))
        entry = header[key]
        if kind == "dtype":
            entry["dtype"] = rng.choice(["I8", "I16", "I32", "I64", "U8", "BOOL", "XX", "", "F32 "])
            if entry["dtype"] in ("I16",):
                entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]
        elif kind == "shape":
            entry["shape"] = rng.choice([[10**12, 10**12], [], [-1, 4], [0], [entry["shape"][0] + 1, 1]])
        elif kind == "offsets":
            start, end = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[end, start], [start, end + 4], [start + 4, end], [0, 2**62]])
        elif kind == "not-a-dict":
            header = rng.choice([[1, 2], "header", 7, None])
        elif kind == "metadata":
            header["__metadata__"] = rng.choice([["x"], {"format": 5}, "pt"])
        write_header(folder, src, header)

    return mutate


def bad_utf8_header(folder, src, rng):
    data = bytearray(src.raw)
    data[8 + rng.randrange(1, src.header_len - 1)] = rng.choice([0xFF, 0xC3, 0x80])
    (folder / WEIGHTS).write_bytes(bytes(data))


def tensor_edit(kind: str) -> Mutation:
    def mutate(folder, src, rng):
        tensors = dict(src.tensors)
        key = rng.choice(sorted(tensors))
        value = tensors[key].clone()
        if kind == "nonfinite":
            flat = value.view(-1)
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        elif kind == "int-dtype":
            value = value.to(rng.choice([torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8]))
        elif kind == "shape":
            value = rng.choice([value.t().contiguous(), value.reshape(-1), value[..., :-1], value.unsqueeze(0)])
            if tuple(value.shape) == tuple(tensors[key].shape):
                value = value.unsqueeze(0)
        elif kind == "empty":
            value = torch.zeros((0,) * value.dim())
        elif kind == "missing":
            del tensors[key]
            write_tensors(folder, tensors, src.metadata)
            return
        tensors[key] = value
        write_tensors(folder, tensors, src.metadata)

    return mutate


def extra_key(kind: str, model_state: dict[str, torch.Tensor]) -> Mutation:
    def mutate(folder, src, rng):
        tensors = dict(src.tensors)
        if kind == "base":
            name = rng.choice(base_weight_keys(model_state, src))
            tensors[PREFIX + name] = torch.randn(model_state[name].shape)
        elif kind == "base_layer":
            target = rng.choice(lora_keys(src)).removeprefix(PREFIX).split(".lora_")[0]
            leaf = rng.choice(["weight", "bias"])
            tensors[f"{PREFIX}{target}.base_layer.{leaf}"] = torch.randn(model_state[f"{target}.{leaf}"].shape)
        elif kind == "internal":
            name = rng.choice(["classifier.original_module.weight", "classifier.modules_to_save.default.weight"])
            tensors[PREFIX + name] = torch.randn(3, 32)
        else:  # names that address nothing
            name = rng.choice(["", ".", "..weight", "bert..bias", PREFIX + "bert.pooler.dense.weight", "x" * 300])
            tensors[PREFIX + name] = torch.randn(2, 2)
        write_tensors(folder, tensors, src.metadata)

    return mutate


def fingerprint(folder, src, rng):
    metadata = dict(src.metadata)
    metadata["lorakit_base_fingerprint"] = f"{rng.getrandbits(128):032x}"
    write_tensors(folder, src.tensors, metadata)


def config_text(folder, src, rng):
    text = json.dumps(src.config)
    (folder / CONFIG).write_text(
        rng.choice(
            [
                text[: rng.randrange(len(text))],  # truncated
                "",
                "[" * 100_000,  # nesting bomb
                '{"r": 1' + "0" * 5000 + "}",  # a number Python refuses to parse
                "null",
                '"LORA"',
                text.replace('"r"', '"r" "r"'),
            ]
        )
    )


def config_bytes(folder, src, rng):
    (folder / CONFIG).write_bytes(rng.choice([b"\xff\xfe\x00{", rng.randbytes(64), b'{"r": 4, "x": "\xc3"}']))


HOSTILE_VALUES = {
    "r": [0, -4, 4.5, "4", True, None, 10**9, 2**63, 10**400, [4], 1e308],
    "lora_alpha": [float("nan"), float("inf"), -1, 0, 1e308, "16", None, [], 10**400],
    "lora_dropout": [1.0, -0.1, float("nan"), "0.1", None],
    "target_modules": ["(", 5, [5], [], ["nonexistent"], "nothing|matches", [""]],
    "modules_to_save": ["nope", ["nope"], 5, [5]],
    "bias": ["some", 1, None, True],
    "use_rslora": ["false", 1, "yes"],
    "use_dora": ["no", 1],
    "fan_in_fan_out": ["true", 2],
    "rank_pattern": [{"query": 10**9}, {"query": 0}, {"(": 4}, [1], {"query": "big"}],
    "alpha_pattern": [{"query": float("nan")}, {"value": float("inf")}, {"query": -2}, "x"],
    "exclude_modules": [["query", "value"], "(", 3],
    "peft_type": ["LOHA", "IA3", None, 5, "lora"],
    "init_lora_weights": ["olora", "loftq", 3],
    "lora_bias": [True],
    "layers_to_transform": [[0]],
    "layer_replication": [[[0, 1]]],
    "use_bdlora": [True],
}


def hostile_config(folder, src, rng):
    data = dict(src.config)
    key = rng.choice(sorted(HOSTILE_VALUES))
    data[key] = rng.choice(HOSTILE_VALUES[key])
    write_config(folder, data)


def folder_shape(folder, src, rng):
    kind = rng.choice(["empty-config", "empty-weights", "both-empty", "weights-dir", "config-dir", "no-config"])
    if kind in ("empty-config", "both-empty"):
        (folder / CONFIG).write_bytes(b"")
    if kind in ("empty-weights", "both-empty"):
        (folder / WEIGHTS).write_bytes(b"")
    if kind == "weights-dir":
        (folder / WEIGHTS).unlink()
        (folder / WEIGHTS).mkdir()
    if kind == "config-dir":
        (folder / CONFIG).unlink()
        (folder / CONFIG).mkdir()
    if kind == "no-config":
        (folder / CONFIG).unlink()


def symlinks(folder, src, rng):
    name = rng.choice([CONFIG, WEIGHTS])
    (folder / name).unlink()
    kind = rng.choice(["dangling", "loop", "dir", "device", "fifo", "other-file"])
    if kind == "dangling":
        (folder / name).symlink_to(folder / "nowhere")
    elif kind == "loop":
        (folder / name).symlink_to(folder / "loop")
        (folder / "loop").symlink_to(folder / name)
    elif kind == "dir":
        (folder / name).symlink_to(folder)
    elif kind == "device":
        (folder / name).symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(folder / name)  # reading it would block forever: it is no file
    else:  # the other file of the pair under this name
        (folder / name).symlink_to(folder / (WEIGHTS if name == CONFIG else CONFIG))


def family_list(model_state: dict[str, torch.Tensor]) -> list[tuple[str, Mutation, int]]:
    """(family name, mutation, number of cases)."""
    return [
        ("truncated-header", truncated("header"), 6),
        ("truncated-data", truncated("data"), 6),
        ("garbage", garbage, 4),
        ("bit-flip-length", bit_flipped_length, 8),
        ("bad-utf8-header", bad_utf8_header, 4),
        ("header-dtype", header_edit("dtype"), 6),
        ("header-shape", header_edit("shape"), 5),
        ("header-offsets", header_edit("offsets"), 5),
        ("header-not-dict", header_edit("not-a-dict"), 3),
        ("header-metadata", header_edit("metadata"), 3),
        ("nan-inf", tensor_edit("nonfinite"), 6),
        ("int-dtype", tensor_edit("int-dtype"), 5),
        ("wrong-shape", tensor_edit("shape"), 6),
        ("empty-tensor", tensor_edit("empty"), 3),
        ("missing-key", tensor_edit("missing"), 4),
        ("extra-base-key", extra_key("base", model_state), 10),
        ("extra-base-layer-key", extra_key("base_layer", model_state), 6),
        ("extra-internal-key", extra_key("internal", model_state), 2),
        ("extra-junk-key", extra_key("junk", model_state), 4),
        ("fingerprint", fingerprint, 2),
        ("config-text", config_text, 8),
        ("config-bytes", config_bytes, 3),
        ("hostile-config", hostile_config, 30),
        ("folder-shape", folder_shape, 6),
        ("symlink", symlinks, 8),
    ]


def make_source(folder: Path) -> Path:
    model = lorakit.inject(
        tiny.bert(0).eval(),
        lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return lorakit.save_adapter(model, folder)


def test_fuzzed_adapters_are_refused_and_leave_the_model_untouched(tmp_path, capsys):
    source_folder = make_source(tmp_path / "source")
    src = Source(source_folder)
    assert lorakit.lora_layers(lorakit.load_adapter(tiny.bert(0).eval(), source_folder))  # the source is valid

    model = tiny.bert(0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(SEED)
    tried = refused = untouched = 0
    failures = []
    for family, mutate, count in family_list(state):
        for index in range(count):
            case = f"{family}#{index}"
            folder = tmp_path / "cases" / case.replace("#", "-")
            folder.mkdir(parents=True)
            for name in (CONFIG, WEIGHTS):
                (folder / name).write_bytes((source_folder / name).read_bytes())
            mutate(folder, src, rng)
            tried += 1
            try:
                lorakit.load_adapter(model, folder)
                failures.append(f"{case}: loaded")
            except lorakit.AdapterError as err:
                refused += 1
                assert "\n" not in str(err), case
            except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
                failures.append(f"{case}: raw {type(err).__name__}: {str(err)[:120]}")
            now = model.state_dict()
            same = list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)
            clean = not lorakit.lora_layers(model) and not model.__dict__.get(CONFIGS_ATTR)
            if same and clean:
                untouched += 1
            else:
                failures.append(f"{case}: model changed")
                model = tiny.bert(0).eval()  # keep the other cases meaningful
    with capsys.disabled():
        print(f"\nadapter fuzz: tried={tried} refused={refused} untouched={untouched}")
    assert tried >= 100
    assert not failures, failures
    assert refused == untouched == tried


@pytest.mark.parametrize("family", ["symlink-to-valid-file"])
def test_a_symlinked_valid_adapter_still_loads(tmp_path, family):
    """Hugging Face's cache holds adapters as symlinks into its blob store: those must load."""
    source = make_source(tmp_path / "source")
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (CONFIG, WEIGHTS):
        (linked / name).symlink_to(source / name)
    assert lorakit.lora_layers(lorakit.load_adapter(tiny.bert(0).eval(), linked))
