"""QLoRA: frozen base linear weights stored in 4-bit NF4 (bitsandbytes), LoRA trained on top.

`quantize_model` swaps the targeted nn.Linear (and HF Conv1D) modules for bitsandbytes
`Linear4bit` with NF4 codes and double quantisation (the per-block absmax scales are themselves
quantised to 8 bits); embeddings, layer norms and output heads stay in full precision. Then
`lorakit.inject` works as usual: LoraLinear wraps a Linear4bit like any nn.Linear, its adapter
parameters stay fp32 and get the only gradients.

A 4-bit base cannot take a merge (W0 + dW re-quantised loses most of dW), so merging is refused;
`dequantize_model` turns the NF4 weights back into dense ones, into which the adapters merge.
bitsandbytes is optional: importing this module works without it, using it says what to install.

Adapter files: an adapter trained here is plain LoRA in PEFT's format. It loads into the same
4-bit base (lorakit, or PEFT over a quantize_model base) as is. Each 4-bit layer keeps the
fingerprint sample of the full-precision weight it was made from, so the adapter's base
fingerprint is that of the fp32 original and it loads there without force=True (the two
bases differ by the quantisation error, which the adapter was trained over).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorakit.core.config import LoraConfig
from lorakit.core.inject import find_targets, lora_layers, walk
from lorakit.core.layers import LoraLayer
from lorakit.errors import UsageError
from lorakit.files.fingerprint import FINGERPRINT_ATTR, fingerprint_sample

logger = logging.getLogger(__name__)


def bnb_available() -> bool:
    """True when bitsandbytes can be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(
            "4-bit quantisation needs bitsandbytes: pip install 'bitsandbytes>=0.45' (its CPU backend works)"
        ) from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a module whose weight is a bitsandbytes quantized parameter (e.g. Linear4bit)."""
    return hasattr(getattr(module, "weight", None), "quant_state")


# The check quantize_model runs on every layer it made. NF4 rounds w / s (s: the block's absmax)
# to the nearest of 16 levels; the widest gap is on the negative side (-1.0 to -0.6962, the positive
# side's widest is 1.0 - 0.7230), so the rounding error is at most 0.1519 s. Double quantisation
# stores s in 8 bits (bitsandbytes' dynamic map over s - mean(s), nested blocks of 256): its widest
# half step is 0.00703 of the nested block's largest |s - mean|, which is at most the weight's absmax
# A, and that scale error reaches the weight at most once (|level| <= 1). So a healthy block has
#     max |w - dequant(w)| <= 0.1519 s + 0.00703 A (+ rounding of the output dtype).
# Measured with bitsandbytes 0.48.2 on this CPU (48 shapes from 2x34 to 768x512, 4 seeds, Gaussian,
# nn.Linear init, 1% 20x outliers, lognormal row scales, cubed Gaussian): no double quantisation
# reaches exactly 0.1519 s; with it the excess over 0.1519 s is at most 0.0063 A. The bound below
# allows 0.152 s + 0.02 A (about 3x the worst double-quant excess seen): a healthy weight passes,
# a damaged one (seen on some CPUs with bitsandbytes 0.49/0.50: 0.35-0.46 of absmax) does not.
NF4_HALF_GAP = 0.152
DOUBLE_QUANT_ALLOWANCE = 0.02


@dataclass
class QuantReport:
    """What `quantize_model` did: the layers now 4-bit, the layers kept in full precision because
    their NF4 copy failed the error check (name -> worst block error / allowed error, > 1), and
    `memory_report` of the model afterwards. Also at `model.quant_report` after the call."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int | float] = field(default_factory=dict)

    def summary(self) -> str:
        saved = self.memory.get("fp32_bytes", 0) - self.memory.get("base_bytes", 0)
        line = f"quantized {len(self.quantized)} layers to NF4, {saved / 2**20:.2f} MiB saved"
        if self.kept:
            line += f"; kept in full precision (NF4 error over the bound): {', '.join(self.kept)}"
        return line


def _quantize_layer(module: nn.Module, weight: torch.Tensor, compute_dtype, double_quant, blocksize) -> nn.Module:
    """A bitsandbytes Linear4bit computing `module` from `weight` (out, in). Tests replace it."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    quantized = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        weight.contiguous().clone(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        blocksize=blocksize,
    )
    if module.bias is not None:
        quantized.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    # bitsandbytes' bf16-packed CPU inference path (AVX512-BF16 machines only) computes in
    # bf16; keep the fp32 maths this module promises, identical in training and inference.
    quantized.support_avx512bf16_for_cpu = False
    return quantized.to(weight.device)  # moving a Params4bit to a device quantises it


def nf4_error_ratio(weight: torch.Tensor, dequantized: torch.Tensor, blocksize: int, double_quant: bool) -> float:
    """Worst ratio, over NF4 blocks of the flattened weight, of max |error| to the allowed error
    (see NF4_HALF_GAP above): <= 1 for a healthy quantisation."""
    w = weight.detach().float().flatten()
    err = (dequantized.detach().float().flatten() - w).abs()
    pad = (-w.numel()) % blocksize
    block_err = F.pad(err, (0, pad)).view(-1, blocksize).amax(1)
    block_max = F.pad(w.abs(), (0, pad)).view(-1, blocksize).amax(1)
    rounding = torch.finfo(weight.dtype).eps if weight.dtype.is_floating_point else 0.0
    allowance = DOUBLE_QUANT_ALLOWANCE if double_quant else 1e-6
    allowed = (NF4_HALF_GAP + rounding) * block_max + allowance * block_max.max() + 1e-30
    return float((block_err / allowed).max())


def quantize_model(
    model: nn.Module,
    targets: list[str] | str = "all-linear",
    *,
    keep: list[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """Replace the `targets` linear layers of `model` by 4-bit NF4 `Linear4bit`, in place.

    `targets` selects modules as LoraConfig.target_modules does ("all-linear" leaves the output
    head / classifier alone); `keep` names modules left in full precision (e.g. the adapter's
    modules_to_save, which train in full). Embeddings and layer norms are never quantized.
    Each new layer's dequantised weight is checked against the original, block by block
    (`nf4_error_ratio`); a layer over the bound keeps its original full-precision module. The
    outcome (a QuantReport) is logged as one line and stored as `model.quant_report`.
    Call it before `lorakit.inject`. Returns the model.
    """
    _bnb()
    if lora_layers(model):
        raise UsageError("quantize_model must run before lorakit.inject: quantize the plain base, then add adapters")
    found = find_targets(model, LoraConfig(target_modules=targets, modules_to_save=keep or None))
    report = QuantReport()
    for name, module in found:
        if is_quantized(module) or not isinstance(module, nn.Linear | Conv1D):
            continue
        weight = module.weight.detach()
        fingerprint = fingerprint_sample(weight)  # of the full-precision weight, as the fp32 model has it
        # Conv1D stores (in, out) and computes x @ W: Linear4bit with W^T computes the same.
        weight = weight.t() if isinstance(module, Conv1D) else weight
        quantized = _quantize_layer(module, weight, compute_dtype, double_quant, blocksize)
        ratio = nf4_error_ratio(weight, dequantize_weight(quantized), blocksize, double_quant)
        if ratio > 1:  # a bad quantisation: the original module stays
            report.kept[name] = ratio
            continue
        quantized.train(module.training)
        setattr(quantized, FINGERPRINT_ATTR, fingerprint)
        model.set_submodule(name, quantized)
        report.quantized.append(name)
    report.memory = memory_report(model)
    (logger.warning if report.kept else logger.info)("%s", report.summary())
    model.quant_report = report
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight (out, in) a Linear4bit computes with, in the dtype it was quantized from."""
    bnb = _bnb()
    weight = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference packing
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), state)
    return bnb.functional.dequantize_4bit(data, state).to(state.dtype)


def _dense_copy(module: nn.Module) -> nn.Linear:
    weight = dequantize_weight(module)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().clone().to(weight.dtype), requires_grad=False)
    dense.train(module.training)
    return dense


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every 4-bit layer by an nn.Linear holding its dequantised weight, in place.

    LoRA layers keep their adapters and now wrap the dense layer, so `lorakit.merge` works:
    the merged model computes what the unmerged one over the 4-bit base computed. Returns the model.
    """
    for name, module in list(walk(model)):
        if isinstance(module, LoraLayer) and is_quantized(module.base_layer):
            module.base_layer = _dense_copy(module.base_layer)
            module.refresh_caches()
        elif name and is_quantized(module):
            model.set_submodule(name, _dense_copy(module))
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module) -> dict[str, int | float]:
    """Bytes of the model's base parameters as stored, against the same model all in fp32.

    Quantized weights count their packed 4-bit codes plus the quantisation state saved with them
    (absmax scales, nested scales, code books). LoRA adapter parameters are left out: the figure
    is the frozen base's memory. Keys: quantized_layers, base_bytes, fp32_bytes, ratio, and
    quantized_bytes / quantized_fp32_bytes: the quantized weights alone, as stored and in fp32.
    """
    adapter_params = {
        id(p) for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.values()
    }
    stored = fp32 = layers = q_stored = q_fp32 = 0
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or id(param) in adapter_params:
                continue
            seen.add(id(param))
            state = getattr(param, "quant_state", None)
            if state is None:
                stored += _tensor_bytes(param)
                fp32 += param.numel() * 4
                continue
            layers += 1
            extra = sum(_tensor_bytes(v) for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor))
            q_stored += _tensor_bytes(param.data) + extra
            q_fp32 += int(torch.Size(state.shape).numel()) * 4
    return {
        "quantized_layers": layers,
        "base_bytes": stored + q_stored,
        "fp32_bytes": fp32 + q_fp32,
        "ratio": (stored + q_stored) / max(fp32 + q_fp32, 1),
        "quantized_bytes": q_stored,
        "quantized_fp32_bytes": q_fp32,
    }
