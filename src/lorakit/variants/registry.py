"""The one table of LoRA variants, and the lookup from a config (or a name) to a variant.

Callers ask here rather than test flags: `variant_for(config).save_suffixes` lists the extra
PEFT keys an adapter file holds, `variant_for(config).batched_factors` says whether a server
can gather it. A new variant is a new file with a LoraVariant subclass, added to VARIANTS and
to `variant_name`.
"""

from __future__ import annotations

from lorakit.variants.base import LORA, LoraVariant
from lorakit.variants.dora import DORA

VARIANTS: dict[str, LoraVariant] = {variant.name: variant for variant in (LORA, DORA)}


def variant_name(config) -> str:
    """The variant a LoraConfig (or anything with its flags, e.g. `use_dora`) asks for."""
    flagged = [v for v in VARIANTS.values() if v.config_flag and getattr(config, v.config_flag, False)]
    return flagged[0].name if flagged else LORA.name


def variant_named(name: str) -> LoraVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown LoRA variant {name!r}; known: {sorted(VARIANTS)}") from None


def variant_for(config) -> LoraVariant:
    """The variant of the adapters `config` creates."""
    return variant_named(variant_name(config))


def all_save_suffixes() -> tuple[str, ...]:
    """Every extra PEFT key suffix any variant saves (to recognise a file's variant from its keys)."""
    return tuple(s for variant in VARIANTS.values() for s in variant.save_suffixes)


def variant_of_keys(keys) -> LoraVariant:
    """The variant whose extra tensors appear among the adapter-file keys `keys` (LORA if none)."""
    keys = list(keys)
    for variant in VARIANTS.values():
        # Containment, not endswith: a key may carry PEFT's `.weight` or an adapter name after it.
        if any(s.lstrip(".") in k for k in keys for s in variant.save_suffixes):
            return variant
    return LORA


def file_variant(config, keys) -> LoraVariant:
    """The variant of an adapter file: the one its config names, else the one whose extra
    tensors its keys hold (a file whose config lost the flag still says DoRA by its magnitudes)."""
    variant = variant_for(config)
    return variant if variant is not LORA else variant_of_keys(keys)
