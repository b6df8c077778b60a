"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Key names are PEFT's (`base_model.model.<module>.lora_A.weight`, `lora_embedding_A`, heads
as `base_model.model.<module>.<param>`), so vLLM, LoRAX and PEFT read what lorakit writes.
Loading validates everything (JSON, file integrity, keys, shapes, finite values, base
fingerprint) before touching the model; saving writes a temp folder and renames it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit import hf
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
from lorakit.core.layers import LoraEmbedding, LoraLinear, adapter_copy
from lorakit.files.atomic import replace_folder
from lorakit.files.errors import AdapterError
from lorakit.files.fingerprint import (  # noqa: F401  (FINGERPRINT_ATTR, fingerprint_sample, base_fingerprint: public here)
    FINGERPRINT_ATTR,
    FINGERPRINT_KEY,
    base_fingerprint,
    fingerprint_sample,
    model_fingerprint,
)
from lorakit.files.plan import LoadPlan, check_fingerprint, internal_name, plan_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md", "chat_template.jinja"}  # + the card and template


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
        variant = getattr(layer, "variants", {}).get(adapter_name)
        for attr, suffix in (variant.extra_parameters.items() if variant else ()):  # DoRA: PEFT's magnitude key
            tensors[f"{PREFIX}{name}{suffix}"] = getattr(layer, attr)[adapter_name]
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
    metadata = {"format": "pt", FINGERPRINT_KEY: model_fingerprint(targets)}
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
    return hf.peft_task_type(model)


# PEFT's model classes for these tasks always add their heads to modules_to_save and fail to
# load a file without them. Saving the (frozen) head also keeps the adapter right on a base
# whose head is freshly (randomly) initialised, as from_pretrained does for a new head.
_TASK_HEADS = {
    "SEQ_CLS": hf.CLASSIFIER_HEADS,
    "TOKEN_CLS": hf.CLASSIFIER_HEADS,
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
    plan = plan_adapter(config, tensors, model, source=str(path))
    check_fingerprint(plan.targets, metadata, str(path), force=force)
    inject(model, config, adapter_name)
    _apply_plan(model, plan, adapter_name)
    if not trainable:  # inference use, as PEFT's from_pretrained: nothing trains
        model.requires_grad_(False)
    return model


@torch.no_grad()
def _apply_plan(model: nn.Module, plan: LoadPlan, adapter_name: str) -> None:
    """Copy the plan's tensors into adapter `adapter_name` (already injected) and, for trained
    biases and PEFT's embedding tables, into the base, stashing those base values first so
    unload / disable put them back."""
    layers = dict(lora_layers(model))
    copies = []
    for name, entry in plan.layers.items():
        layer = layers[name]
        copies += [(layer.lora_A[adapter_name], entry.A), (layer.lora_B[adapter_name], entry.B)]
        copies += [(getattr(layer, suffix)[adapter_name], t) for suffix, t in entry.variant_tensors.items()]
    for name, values in plan.saved.items():  # the adapter's own copy of a saved module
        own = model.get_submodule(name).modules_to_save[adapter_name]
        copies += [(own.get_parameter(pname), t) for pname, t in values.items()]
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too (lm_head)
    bases = [(params[internal_name(params, key)], t) for key, t in plan.extras.items()]
    stash_base_values(model, [target for target, _ in bases])
    for target, tensor in copies + bases:
        target.copy_(tensor.to(target.dtype))
