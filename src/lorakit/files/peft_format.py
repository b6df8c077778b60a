"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Key names are PEFT's (`base_model.model.<module>.lora_A.weight`, `lora_embedding_A`, heads
as `base_model.model.<module>.<param>`), so vLLM, LoRAX and PEFT read what lorakit writes.
Loading validates everything (JSON, file integrity, keys, shapes, finite values, base
fingerprint) before touching the model; saving writes a temp folder and renames it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.core.config import ConfigError, LoraConfig
from lorakit.core.inject import (
    TargetError,
    adapter_configs,
    find_modules_to_save,
    find_targets,
    inject,
    lora_layers,
    stash_base_values,
    walk,
)
from lorakit.core.layers import LoraEmbedding, LoraLayer, LoraLinear, adapter_copy, layer_class_for, plain_module
from lorakit.core.layers.linear import linear_dims
from lorakit.errors import LorakitError
from lorakit.files.atomic import replace_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "lorakit_base_fingerprint"
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}


class AdapterError(LorakitError):
    """An adapter folder cannot be saved or loaded; the message says why and what to do."""


# --- fingerprint -------------------------------------------------------------------------------
FingerprintSource = torch.Tensor | tuple[tuple[int, ...], torch.Tensor]


def fingerprint_sample(weight: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """A weight's shape and 16 evenly spaced entries rounded to bfloat16 (as int16 bits)."""
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, 16, device=flat.device).long()
    return tuple(weight.shape), flat[index].float().to(torch.bfloat16).view(torch.int16).cpu()


def base_fingerprint(weights: dict[str, FingerprintSource]) -> str:
    """A short hash of the adapted modules' names, shapes and 16 sampled weights each.

    Samples are rounded to bfloat16 first, so the same base loaded in fp32, fp16 or bf16
    gives the same fingerprint while a different base (or architecture) does not. A value may
    be a precomputed `fingerprint_sample` (a quantized layer keeps the one of its fp32 weight).
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        source = weights[name]
        shape, sample = source if isinstance(source, tuple) else fingerprint_sample(source)
        digest.update(f"{name}{shape}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


# A quantized base layer carries the fingerprint sample of the full-precision weight it was
# made from, so an adapter trained on the 4-bit base also loads on the original model.
FINGERPRINT_ATTR = "lorakit_fingerprint_sample"


def _target_weights(targets: list[tuple[str, nn.Module]]) -> dict[str, FingerprintSource]:
    sources: dict[str, FingerprintSource] = {}
    for name, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        recorded = getattr(base, FINGERPRINT_ATTR, None)
        if recorded is not None:
            sources[name] = recorded
        else:
            sources[name] = module.original_weight() if isinstance(module, LoraLayer) else module.weight
    return sources


# --- save --------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of `model` to folder `path` in PEFT's format, atomically."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"model has no adapter {adapter_name!r} to save; loaded: {sorted(configs) or 'none'}")
    config = configs[adapter_name]
    tensors, rank_pattern, alpha_pattern, targets = {}, {}, {}, []
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        targets.append((name, layer))
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if isinstance(layer, LoraEmbedding):
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = B
            continue
        if isinstance(layer, LoraLinear) and layer.enable_lora is not None:
            # PEFT has no fused slices: write the exact equivalent plain LoRA of rank n*r.
            B = layer.full_B(adapter_name)
            rank_pattern[name] = A.shape[0]
            scale = layer.scaling[adapter_name]
            alpha_pattern[name] = scale * (A.shape[0] ** 0.5 if config.use_rslora else A.shape[0])
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        if adapter_name in getattr(layer, "lora_magnitude_vector", {}):  # DoRA, PEFT's key
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    task_type = _task_type(model)
    saved = find_modules_to_save(model, config)
    heads = _task_heads(model, task_type, [n for n, _ in targets + saved])
    for name, module in saved + heads:
        for pname, param in adapter_copy(module, adapter_name).named_parameters():  # under PEFT's file names
            tensors[f"{PREFIX}{name}.{pname}"] = param
    if config.bias != "none":
        inside = tuple(f"{n}." for n, _ in saved)  # saved in full above
        for pname, param in model.named_parameters():
            if pname.startswith(inside):
                continue
            is_lora_bias = any(pname == f"{n}.base_layer.bias" for n, _ in targets)
            if pname.endswith("bias") and (config.bias == "all" or is_lora_bias):
                tensors.setdefault(f"{PREFIX}{pname}", param)
    peft_config = config.to_peft_dict(_base_name(model), task_type)
    if heads:
        peft_config["modules_to_save"] = [*(config.modules_to_save or []), *(n for n, _ in heads)]
    peft_config["target_modules"] = _portable_targets(model, config, [n for n, _ in targets])
    if any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for _, layer in targets):
        peft_config["fan_in_fan_out"] = True  # as PEFT records Conv1D targets (it warns on false)
    # Exact-name entries first: PEFT uses the first pattern that matches.
    peft_config["rank_pattern"] = {**rank_pattern, **config.rank_pattern}
    peft_config["alpha_pattern"] = {**alpha_pattern, **config.alpha_pattern}
    metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(_target_weights(targets))}
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return write_adapter_folder(path, peft_config, plain, metadata)


def write_adapter_folder(
    path: str | os.PathLike, peft_config: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write an adapter folder (config JSON + safetensors with PEFT keys) atomically.

    Refuses to replace an existing path that is not an adapter folder (AdapterError)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or set(os.listdir(out)) - _ADAPTER_FILES):
        raise AdapterError(
            f"{out} exists and is not an adapter folder; lorakit replaces only folders holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}: choose a new or empty path"
        )

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")

    return replace_folder(out, write)


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for marker, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if marker in name:
            return task
    return None


# PEFT's model classes for these tasks always add their heads to modules_to_save and fail to
# load a file without them. Saving the (frozen) head also keeps the adapter right on a base
# whose head is freshly (randomly) initialised, as from_pretrained does for a new head.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _task_heads(model: nn.Module, task_type: str | None, taken: list[str]) -> list[tuple[str, nn.Module]]:
    """The task's head modules not already saved, adapted, or holding an adapted layer."""
    names = _TASK_HEADS.get(task_type, ())

    def overlaps(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") or t.startswith(name + ".") for t in taken)

    return [(n, m) for n, m in walk(model) if n.split(".")[-1] in names and not overlaps(n)]


def _portable_targets(model: nn.Module, config: LoraConfig, adapted: list[str]) -> list[str] | str:
    """target_modules as other tools read it: the user's suffix list as given, else the
    adapted modules' last names if they select exactly those modules, else an exact regex."""
    if isinstance(config.target_modules, list):
        return sorted(config.target_modules)
    suffixes = sorted({n.split(".")[-1] for n in adapted})
    probe = LoraConfig(
        target_modules=suffixes, exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save
    )
    try:
        if sorted(n for n, _ in find_targets(model, probe)) == sorted(adapted):
            return suffixes
    except TargetError:
        pass
    return "|".join(re.escape(n) for n in adapted)


# --- load --------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an adapter folder: (config, tensors with PREFIX stripped, metadata)."""
    folder = Path(path)
    if not folder.exists():
        raise AdapterError(
            f"{folder}: no such adapter folder; give the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file; give the adapter folder that holds it ({folder.parent})")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterError(f"{folder}: {CONFIG_NAME} is missing; this is not a PEFT/lorakit adapter folder")
    if not weights_file.is_file():
        hint = (
            " (found adapter_model.bin: lorakit never unpickles; re-save it with safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"{folder}: {WEIGHTS_NAME} is missing{hint}")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON, UTF-8 or a 5000-digit number
        reason = f"{type(err).__name__}: {err}" if isinstance(err, OSError | RecursionError) else str(err)
        raise AdapterError(
            f"{config_file}: not valid JSON ({reason[:200]}); fix the file or re-save the adapter"
        ) from None
    try:
        config = LoraConfig.from_peft_dict(data, source=str(config_file))
    except ConfigError as err:
        raise AdapterError(str(err)) from None
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k.removeprefix(PREFIX): handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise AdapterError(
            f"{weights_file}: not a readable safetensors file ({type(err).__name__}: {err}); "
            "it is truncated or corrupt: re-save or re-copy the adapter"
        ) from None
    return config, tensors, metadata


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    force: bool = False,
    trainable: bool = False,
) -> nn.Module:
    """Load an adapter folder (lorakit's or PEFT's) into `model` as `adapter_name` and make
    it active. LoRA layers are injected from the adapter's own config where missing. On any
    error the model is left exactly as it was. `force` skips the base-fingerprint check;
    `trainable=False` (the default) freezes the whole model for inference, as PEFT does."""
    config, tensors, metadata = read_adapter(path)
    assignments, targets = _plan_load(model, config, tensors, path)
    expected = metadata.get(FINGERPRINT_KEY)
    if expected and not force:
        actual = base_fingerprint(_target_weights(targets))
        if actual != expected:
            raise AdapterError(
                f"{path} was made for a different base model (fingerprint {expected} != {actual} "
                "of this model's adapted weights); load the base it was trained on, or pass force=True"
            )
    inject(model, config, adapter_name)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too (lm_head)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for module_name, part, tensor in assignments:
            target = _destination(model, params, layers, adapter_name, module_name, part)
            if not module_name:  # a base bias or embedding table: unload / disable put it back
                stash_base_values(model, [target])
            target.copy_(tensor.to(target.dtype))
    if not trainable:  # inference use, as PEFT's from_pretrained: nothing trains
        model.requires_grad_(False)
    return model


def _destination(model, params, layers, adapter_name: str, module_name: str, part: str) -> torch.Tensor:
    """The tensor an adapter file's tensor is copied into (planned by _plan_load)."""
    if part in ("A", "B"):
        return (layers[module_name].lora_A if part == "A" else layers[module_name].lora_B)[adapter_name]
    if part == "M":  # DoRA magnitude
        return layers[module_name].lora_magnitude_vector[adapter_name]
    if part.startswith(_SAVED):  # the adapter's own copy of a saved module
        return model.get_submodule(module_name).modules_to_save[adapter_name].get_parameter(part.removeprefix(_SAVED))
    return params[_internal_name(params, part)]


_SAVED = "saved:"


def _internal_name(params: dict[str, nn.Parameter], name: str) -> str:
    """A PEFT parameter name as named in this model (wrapped in LoRA layers or not)."""
    if name in params:
        return name
    bare = name.replace(".base_layer.", ".")
    if bare in params:
        return bare
    head, _, leaf = name.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def _embedding_keys(model: nn.Module) -> set[str]:
    """`<module>.weight` of the input and output embeddings: PEFT saves these tables in full
    under their plain names with save_embedding_layers=True (its default after a vocab resize)."""
    tables = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            tables.append(getattr(model, getter)())
        except (AttributeError, NotImplementedError):
            continue
    keys = set()
    for name, module in walk(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if name and any(base is t for t in tables if t is not None):
            keys.add(f"{name}.weight")
    return keys


def _base_key_problem(key: str, exists: bool, config: LoraConfig, targets: set[str], tables: set[str]) -> str:
    """Why a key that is no LoRA tensor and no saved module may not load ("" when it may):
    only the biases the config trains and PEFT's full embedding tables may address base weights."""
    if not exists:
        return "no such parameter in this model"
    plain = key.replace(".base_layer.", ".")
    if plain in tables:
        return ""
    module, _, leaf = plain.rpartition(".")
    if leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and module in targets)):
        return ""
    if leaf == "bias":
        return f"a base bias, but the adapter's bias={config.bias!r} trains none there"
    return "it addresses a base weight: lorakit never overwrites the base model"


def _plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path):
    """Match every tensor to its place and check shapes and values; raise once, listing all."""
    try:
        targets = find_targets(model, config)
        keep = find_modules_to_save(model, config)
    except TargetError as err:
        raise AdapterError(f"{path} does not fit {type(model).__name__} (made for another model?): {err}") from None
    expected: dict[str, tuple[tuple[str, str], tuple[int, ...]]] = {}
    for name, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        options = module.adapter_options() if isinstance(module, LoraLayer) else {}
        cls = layer_class_for(module)
        # A fused layer already in the model keeps its fused shapes, so a file (which holds
        # the plain equivalent) is refused by the shape check below, before anything changes.
        shape_A, shape_B = cls.adapter_shapes(base, config.rank_for(name), **options)
        embedding = cls is LoraEmbedding
        suffix = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        expected[f"{name}.{suffix[0]}"] = ((name, "A"), shape_A)
        expected[f"{name}.{suffix[1]}"] = ((name, "B"), shape_B)
        if config.use_dora and not embedding:
            expected[f"{name}.lora_magnitude_vector"] = ((name, "M"), (linear_dims(base)[1],))
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too (lm_head)
    tables = _embedding_keys(model)
    for name, module in keep:
        for pname, param in plain_module(module).named_parameters():
            expected[f"{name}.{pname}"] = ((name, _SAVED + pname), tuple(param.shape))
    problems, assignments = [], []
    target_names = {n for n, _ in targets}
    for key, tensor in tensors.items():
        if key in expected:
            (module_name, part), shape = expected.pop(key)
        else:
            internal = _internal_name(params, key)  # trained biases, or PEFT's saved embeddings
            why = _base_key_problem(key, internal in params, config, target_names, tables)
            if why:
                problems.append(f"unexpected key {key} ({why})")
                continue
            module_name, part, shape = "", key, tuple(params[internal].shape)
        if tuple(tensor.shape) != tuple(shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}")
        elif not tensor.is_floating_point():
            problems.append(f"{key} has dtype {tensor.dtype}, expected a floating-point tensor")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{key} contains NaN or Inf values")
        else:
            assignments.append((module_name, part, tensor))
    problems += [f"missing key {key}" for key in expected]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterError(f"{path} does not fit {type(model).__name__}: {shown}")
    return assignments, targets
