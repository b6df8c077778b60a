"""One parser for adapter files: a LoraConfig + tensors -> a validated, typed plan for a model.

Every way an adapter meets a model goes through `plan_adapter`: `load_adapter` (LoRA layers
injected into the model), the server's `MultiLoraModel.prepare` (stacked slots over a plain
base) and `lorakit inspect --base` (its coverage report). So they accept and refuse the same
files for the same reasons; the server then adds only its own restrictions. Nothing in the
model changes here.

A plan that would change nothing (no tensor of the file reaches the model) is refused: a
silent no-op load is the worst outcome, as it serves the base under the adapter's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.inject import TargetError, find_modules_to_save, find_targets, walk
from lorakit.core.layers import LoraEmbedding, LoraLayer, LoraLinear, layer_class_for, plain_module
from lorakit.core.layers.linear import linear_dims
from lorakit.files.errors import AdapterError
from lorakit.files.fingerprint import FINGERPRINT_KEY, model_fingerprint
from lorakit.variants.dora import DORA
from lorakit.variants.registry import file_variant, variant_for, variant_named

# PEFT's key suffixes of the two LoRA factors, per layer kind.
LORA_KEYS = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "conv": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

# --- variants ------------------------------------------------------------------------------
# A variant (lorakit.variants: plain LoRA, DoRA, ...) names the extra per-layer tensors it adds;
# each is saved under PEFT's key `<module>.<layer attribute>` (DoRA: lora_magnitude_vector).


def variant_of(config: LoraConfig) -> str:
    """The variant's name ("lora", "dora", ...) that the config asks for."""
    return variant_for(config).name


def is_dora_file(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> bool:
    """True when the config says DoRA or the file holds DoRA's magnitudes."""
    return file_variant(config, tensors) is DORA


def _variant_shapes(variant: str, base: nn.Module) -> dict[str, tuple[int, ...]]:
    """The variant's extra tensors on one linear layer: key suffix -> shape."""
    d_in, d_out = linear_dims(base)
    return variant_named(variant).extra_shapes(d_in, d_out)


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerEntry:
    """One adapted module: its LoRA factors, their scaling and the variant's extra tensors."""

    module: str
    kind: str  # "linear", "conv" or "embedding"
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    variant: str = "lora"
    variant_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key suffix -> tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class Coverage:
    """How the file and the model's modules met."""

    targeted: tuple[str, ...] = ()  # modules the config's target_modules selects in the model
    matched: tuple[str, ...] = ()  # targeted modules that got all their tensors
    empty: tuple[str, ...] = ()  # targeted modules no usable tensor of the file reached
    unused: tuple[str, ...] = ()  # file keys that fit no place in the model

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in ("targeted", "matched", "empty", "unused")}


@dataclass
class LoadPlan:
    """Where every tensor of an adapter file goes in one model, or why it cannot go there."""

    config: LoraConfig
    targets: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, module) the config adapts
    layers: dict[str, LayerEntry] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save: {param: tensor}
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # file key -> trained bias / full embedding
    coverage: Coverage = field(default_factory=Coverage)
    problems: list[str] = field(default_factory=list)
    unfit: str | None = None  # target_modules / modules_to_save do not fit this model at all

    def failure(self, header: str, more: list[str] | tuple[str, ...] = ()) -> AdapterError | None:
        """One AdapterError listing every problem (these and `more`) under `header`; None if none."""
        if self.unfit:
            return AdapterError(f"{header} (made for another model?): {self.unfit}")
        problems = [*self.problems, *more]
        if not problems:
            return None
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        return AdapterError(f"{header}: {shown}")


@dataclass(frozen=True)
class _Slot:
    """A place a file key must fill: part "A"/"B", a variant suffix, or SAVED + a parameter name."""

    module: str
    part: str
    shape: tuple[int, ...]
    rank_dim: int | None = None  # the rank's dimension (A: 0, B: 1), for a clearer message


SAVED = "saved:"


def plan_adapter(
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    source: str = "adapter",
    strict: bool = True,
) -> LoadPlan:
    """Match every tensor (keys without PEFT's prefix) to its place in `model` and check shapes,
    dtypes and values. With `strict`, raise one AdapterError listing every problem; otherwise
    return the plan with its `problems` (for reports)."""
    plan = LoadPlan(config)
    try:
        plan.targets = find_targets(model, config)
        keep = find_modules_to_save(model, config)
    except TargetError as err:
        plan.unfit = str(err)
        plan.coverage = Coverage(unused=tuple(tensors))
    else:
        _fill(plan, model, tensors, keep)
    error = plan.failure(f"{source} does not fit {type(model).__name__}")
    if strict and error is not None:
        raise error
    return plan


def _fill(plan: LoadPlan, model: nn.Module, tensors: dict[str, torch.Tensor], keep) -> None:
    """Sort the tensors into the plan's layers, saved modules and extras; record problems."""
    config = plan.config
    slots, kinds = _layer_slots(plan, config)
    for name, module in keep:
        for pname, param in plain_module(module).named_parameters():
            slots[f"{name}.{pname}"] = _Slot(name, SAVED + pname, tuple(param.shape))
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too (lm_head)
    base_keys = _BaseKeys(params, _embedding_keys(model), config, {n for n, _ in plan.targets})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unused, problems = [], []
    for key, tensor in tensors.items():
        slot = slots.pop(key, None)
        if slot is None:
            why, shape = base_keys.problem(key)
            if why:
                unused.append(key)
                problems.append(f"unexpected key {key} ({why})")
                continue
            slot = _Slot("", key, shape)
        bad = _tensor_problem(key, tensor, slot, config)
        if bad:
            problems.append(bad)
        elif slot.module:
            parts.setdefault(slot.module, {})[slot.part] = tensor
        else:
            plan.extras[key] = tensor
    problems += [f"missing key {key}" for key in slots]
    _assemble(plan, parts, kinds)
    if len(unused) == len(tensors):  # also an empty file
        problems.insert(0, "no tensor in the file matches a module of this model (loading it would change nothing)")
    plan.problems += problems
    targeted = tuple(n for n, _ in plan.targets)
    plan.coverage = Coverage(
        targeted=targeted,
        matched=tuple(n for n in targeted if n in plan.layers),
        empty=tuple(n for n in targeted if n not in parts),
        unused=tuple(unused),
    )


def _layer_slots(plan: LoadPlan, config: LoraConfig) -> tuple[dict[str, _Slot], dict[str, str]]:
    """The keys every targeted module needs (A, B, the variant's tensors) and each module's kind."""
    slots: dict[str, _Slot] = {}
    kinds: dict[str, str] = {}
    variant = variant_of(config)
    for name, module in plan.targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        options = module.adapter_options() if isinstance(module, LoraLayer) else {}
        cls = layer_class_for(module)
        kind = "embedding" if cls is LoraEmbedding else "linear" if cls is LoraLinear else "conv"
        kinds[name] = kind
        # A fused layer already in the model keeps its fused shapes, so a file (which holds
        # the plain equivalent) is refused by the shape check, before anything changes.
        shape_A, shape_B = cls.adapter_shapes(base, config.rank_for(name), **options)
        key_A, key_B = LORA_KEYS[kind]
        slots[f"{name}.{key_A}"] = _Slot(name, "A", tuple(shape_A), 0)
        slots[f"{name}.{key_B}"] = _Slot(name, "B", tuple(shape_B), 1)
        # Variants adapt linear layers only; inject refuses them elsewhere (TargetError).
        for suffix, shape in (_variant_shapes(variant, base) if kind == "linear" else {}).items():
            slots[f"{name}.{suffix}"] = _Slot(name, suffix, shape)
    return slots, kinds


def _tensor_problem(key: str, tensor: torch.Tensor, slot: _Slot, config: LoraConfig) -> str:
    """Why `tensor` cannot fill `slot` ("" when it can)."""
    if tuple(tensor.shape) != slot.shape:
        message = f"{key} has shape {tuple(tensor.shape)}, the model needs {slot.shape}"
        if slot.rank_dim is not None and _only_rank_differs(tuple(tensor.shape), slot):
            message += f" (its rank disagrees with the config's r={config.rank_for(slot.module)})"
        return message
    if not tensor.is_floating_point():
        return f"{key} has dtype {tensor.dtype}, expected a floating-point tensor"
    if not torch.isfinite(tensor).all():
        return f"{key} contains NaN or Inf values"
    return ""


def _only_rank_differs(shape: tuple[int, ...], slot: _Slot) -> bool:
    if len(shape) != len(slot.shape):
        return False
    return all(a == b for i, (a, b) in enumerate(zip(shape, slot.shape, strict=True)) if i != slot.rank_dim)


def _assemble(plan: LoadPlan, parts: dict[str, dict[str, torch.Tensor]], kinds: dict[str, str]) -> None:
    """Typed entries for the modules whose tensors all arrived."""
    variant = variant_of(plan.config)
    for name, got in parts.items():
        if name not in kinds:  # a saved module
            plan.saved[name] = {p.removeprefix(SAVED): t for p, t in got.items()}
        elif "A" in got and "B" in got:
            extra = {p: t for p, t in got.items() if p not in ("A", "B")}
            scaling = plan.config.scaling_for(name)
            plan.layers[name] = LayerEntry(name, kinds[name], got["A"], got["B"], scaling, variant, extra)


# --- keys that address base parameters ---------------------------------------------------------
def internal_name(params: dict[str, nn.Parameter], name: str) -> str:
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


@dataclass
class _BaseKeys:
    """Judges file keys that are no LoRA tensor and no saved module's: only the biases the
    config trains and PEFT's full embedding tables may address base parameters."""

    params: dict[str, nn.Parameter]
    tables: set[str]
    config: LoraConfig
    targets: set[str]

    def problem(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(why the key may not load or "", the shape the model needs)."""
        internal = internal_name(self.params, key)
        if internal not in self.params:
            module = key.rpartition(".")[0].removesuffix(".lora_A").removesuffix(".lora_B")
            if key.endswith(LORA_SUFFIXES) and module in self.modules:
                return f"{module} is not among the config's target_modules", ()
            return "no such parameter in this model", ()
        plain = key.replace(".base_layer.", ".")
        module, _, leaf = plain.rpartition(".")
        trains = self.config.bias == "all" or (self.config.bias == "lora_only" and module in self.targets)
        if plain in self.tables or (leaf == "bias" and trains):
            return "", tuple(self.params[internal].shape)
        if leaf == "bias":
            return f"a base bias, but the adapter's bias={self.config.bias!r} trains none there", ()
        return "it addresses a base weight: lorakit never overwrites the base model", ()

    @cached_property
    def modules(self) -> set[str]:
        """The model's module names that hold parameters, as PEFT names them."""
        return {name.rpartition(".")[0].replace(".base_layer", "") for name in self.params}


# --- the base-model fingerprint ----------------------------------------------------------------
def check_fingerprint(
    targets: list[tuple[str, nn.Module]],
    metadata: dict[str, str],
    source: str,
    *,
    force: bool = False,
    remedy: str = "load the base it was trained on",
) -> None:
    """Refuse a file whose recorded base fingerprint differs from these adapted modules'.
    `force` skips it; a file without a fingerprint (PEFT's) passes."""
    expected = metadata.get(FINGERPRINT_KEY)
    if not expected or force:
        return
    actual = model_fingerprint(targets)
    if actual != expected:
        raise AdapterError(
            f"{source} was made for a different base model (fingerprint {expected} != {actual} "
            f"of this model's adapted weights); {remedy}, or pass force=True"
        )


__all__ = [
    "plan_adapter",
    "LoadPlan",
    "LayerEntry",
    "Coverage",
    "check_fingerprint",
    "internal_name",
    "variant_of",
    "is_dora_file",
    "LORA_KEYS",
    "LORA_SUFFIXES",
]
