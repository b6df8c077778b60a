"""The base-model fingerprint an adapter file records: which base its weights were trained on.

Saving (peft_format.save_adapter) writes it; loading into a model (load_adapter) and into the
server's stacked slots (MultiLoraModel.prepare) both check it through `plan.check_fingerprint`,
with the same samples: those of `fingerprint_sources`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from lorakit.core.layers import LoraLayer

FINGERPRINT_KEY = "lorakit_base_fingerprint"  # the safetensors metadata entry
# A quantized base layer carries the fingerprint sample of the full-precision weight it was
# made from, so an adapter trained on the 4-bit base also loads on the original model.
FINGERPRINT_ATTR = "lorakit_fingerprint_sample"

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


def fingerprint_sources(targets: list[tuple[str, nn.Module]]) -> dict[str, FingerprintSource]:
    """What `base_fingerprint` hashes for these adapted modules: the recorded sample of a
    quantized base layer, else the base weight without any merged adapter."""
    sources: dict[str, FingerprintSource] = {}
    for name, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        recorded = getattr(base, FINGERPRINT_ATTR, None)
        if recorded is not None:
            sources[name] = recorded
        else:
            sources[name] = module.original_weight() if isinstance(module, LoraLayer) else module.weight
    return sources


def model_fingerprint(targets: list[tuple[str, nn.Module]]) -> str:
    """The fingerprint of these adapted modules, as save_adapter records it."""
    return base_fingerprint(fingerprint_sources(targets))
