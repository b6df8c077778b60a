"""Adapter arithmetic: several LoRA adapters of one base combined into one adapter file.

With weights w_i and each adapter's scaling s_i (alpha_i / r_i), per adapted module:

- "cat" (exact): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], rank = sum r_i, so
  B @ A = sum_i w_i s_i B_i A_i exactly. Like PEFT's add_weighted_adapter "cat".
- "svd": the best rank-R approximation (truncated SVD) of sum_i w_i s_i B_i A_i; R = --rank,
  default the largest input rank. Like PEFT's "svd" (PEFT's is in the adapters' dtype).
- "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties" (and PEFT's names
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd for the same): the method of
  lorakit.tools.merge_methods (PEFT's merge_utils maths) applied to the dense updates
  dW_i = s_i B_i A_i with weights w_i, then truncated to rank R by SVD like "svd". This is the
  dense definition, which is also what PEFT's "<method>_svd" computes; PEFT's factor-space
  "ties"/"dare_*" (no _svd) prune the factors instead and are not offered. The recipe in the
  file's metadata records the SVD residual (relative Frobenius error per module, max and mean).
- "linear": PEFT's add_weighted_adapter "linear", reproduced exactly: the factors are mixed,
  not the updates. With c_i = w_i s_i: A = sum_i sign(c_i) sqrt|c_i| A_i,
  B = sum_i sqrt|c_i| B_i, rank unchanged (all inputs must have the same rank). B @ A then holds
  the wanted sum_i c_i B_i A_i plus cross terms sqrt|c_i c_j| B_i A_j (i != j); it equals the
  weighted sum of updates only for one adapter or adapters with disjoint factors. Use "cat"
  for the exact sum.

The result has alpha = r in every module (scaling 1; per-module ranks in rank_pattern). The
inputs must adapt the same modules of the same base (same base fingerprint when recorded);
tensors saved in full must be identical in all of them, except the heads (modules_to_save,
e.g. a classifier and its pooler): every classifier adapter trains its own, and a head cannot
be mixed, so `head_from` names the input whose heads the result keeps (with its label names).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.errors import UsageError
from lorakit.files.card import read_card, write_card
from lorakit.files.peft_format import (
    CONFIG_NAME,
    FINGERPRINT_KEY,
    PREFIX,
    AdapterError,
    read_adapter,
    write_adapter_folder,
)
from lorakit.tools import merge_methods
from lorakit.tools.extract import low_rank_factors
from lorakit.variants.base import LORA
from lorakit.variants.registry import file_variant

METHODS = ("linear", "cat", *merge_methods.METHODS, *merge_methods.ALIASES)
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass
class _Adapter:
    path: str
    raw: dict
    scaling: dict[str, float]  # module -> alpha / r (or alpha / sqrt(r))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[str, str]]]  # module -> (A, B, key suffixes)
    full: dict[str, torch.Tensor]  # tensors saved in full (heads, biases)
    fingerprint: str | None

    def head_keys(self) -> set[str]:
        """The full tensors that belong to a module saved in full (modules_to_save: the heads)."""
        names = self.raw.get("modules_to_save") or []
        return {k for k in self.full if any(_inside(k, n) for n in names)}


def _inside(key: str, module: str) -> bool:
    """Whether tensor `key` belongs to a module whose name ends with `module` (PEFT's suffix match)."""
    return key.startswith(module + ".") or f".{module}." in key


def _read(path: str | os.PathLike) -> _Adapter:
    config, tensors, metadata = read_adapter(path)
    raw = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    variant = file_variant(config, tensors)
    if variant is not LORA:
        raise AdapterError(f"{path} is a {variant.label} adapter; combine works on plain LoRA adapters only")
    factors, full = {}, dict(tensors)
    for key in tensors:
        for a_suffix, b_suffix in _FACTOR_SUFFIXES:
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)]
                A, B = full.pop(key), full.pop(module + b_suffix, None)
                if B is None or A.dim() != 2 or B.dim() != 2:
                    raise AdapterError(
                        f"{path}: {module} has no 2-D {b_suffix.lstrip('.')} to pair with {a_suffix.lstrip('.')}; "
                        "combine handles linear and embedding adapters (not convolutions)"
                    )
                factors[module] = (A, B, (a_suffix, b_suffix))
    scaling = {m: config.scaling_for(m) for m in factors}
    return _Adapter(str(path), raw, scaling, factors, full, metadata.get(FINGERPRINT_KEY))


def _check_compatible(adapters: list[_Adapter]) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if set(first.factors) != set(other.factors):
            only_first = sorted(set(first.factors) - set(other.factors))[:3]
            only_other = sorted(set(other.factors) - set(first.factors))[:3]
            raise AdapterError(
                f"{first.path} and {other.path} adapt different modules (only in the first: {only_first}, only in "
                f"the second: {only_other}); combine adapters with the same target modules"
            )
        if first.fingerprint and other.fingerprint and first.fingerprint != other.fingerprint:
            raise AdapterError(
                f"{first.path} and {other.path} were made for different base models (base fingerprints "
                f"{first.fingerprint} != {other.fingerprint}); combine adapters of one base only"
            )
        names = (first.raw.get("base_model_name_or_path"), other.raw.get("base_model_name_or_path"))
        if not (first.fingerprint and other.fingerprint) and all(names) and names[0] != names[1]:
            raise AdapterError(
                f"{first.path} is for base {names[0]!r} but {other.path} for {names[1]!r}; combine adapters of one base"
            )
        for module, (A, B, _) in first.factors.items():
            A2, B2, _ = other.factors[module]
            if (A.shape[1], B.shape[0]) != (A2.shape[1], B2.shape[0]):
                raise AdapterError(
                    f"{module}: {first.path} has shape {(B.shape[0], A.shape[1])} but {other.path} "
                    f"{(B2.shape[0], A2.shape[1])}; these adapters are for different bases"
                )
        _check_full_tensors(first, other)


def _check_full_tensors(first: _Adapter, other: _Adapter) -> None:
    """The same full tensors; equal values, except in the heads (see _differing_heads)."""
    heads = first.head_keys() | other.head_keys()
    if set(first.full) != set(other.full) or any(
        not torch.equal(v, other.full[k]) for k, v in first.full.items() if k not in heads
    ):
        raise AdapterError(
            f"{first.path} and {other.path} save different full modules or biases (e.g. trained heads); "
            "combine mixes LoRA updates only: combine adapters whose saved modules are identical"
        )


def _differing_heads(adapters: list[_Adapter]) -> list[str]:
    """The head modules (modules_to_save) whose saved tensors differ between the inputs."""
    first = adapters[0]
    keys = sorted(k for k in first.head_keys() if any(not torch.equal(first.full[k], a.full[k]) for a in adapters))
    return sorted({k.rsplit(".", 1)[0] for k in keys})


def _head_index(paths: list[str | os.PathLike], head_from: str | os.PathLike | int) -> int:
    """Which input `head_from` names: its index, or the path as given, resolved, or its folder's
    name (the first of these that names exactly one input)."""
    if isinstance(head_from, int) and not isinstance(head_from, bool):
        if 0 <= head_from < len(paths):
            return head_from
    else:
        given = Path(head_from)
        tests = (
            lambda p: str(p) == str(head_from),
            lambda p: Path(p).resolve() == given.resolve(),
            lambda p: Path(p).name == str(head_from),
        )
        for test in tests:
            hits = [i for i, p in enumerate(paths) if test(p)]
            if len(hits) == 1:
                return hits[0]
    raise UsageError(f"--head-from {head_from}: not one of the inputs ({', '.join(map(str, paths))}); give one of them")


@dataclass(frozen=True)
class MergeOptions:
    """The options of the dense-update methods: target rank, DARE/TIES density, TIES sign
    election, DARE seed (the same seed gives the same file)."""

    rank: int | None = None
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0


def _factor_mix(
    factors: list[tuple[torch.Tensor, torch.Tensor]], coeffs: list[float], method: str, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of methods "cat" and "linear", which mix the factors (c_i = w_i * s_i)."""
    As = [A.double() for A, _ in factors]
    Bs = [B.double() for _, B in factors]
    if method == "cat":
        return torch.cat([c * A for c, A in zip(coeffs, As, strict=True)]), torch.cat(Bs, dim=1)
    ranks = sorted({A.shape[0] for A in As})
    if len(ranks) > 1:
        raise UsageError(f"--method linear needs equal ranks, but {module} has ranks {ranks}: use --method cat or svd")
    A = sum(((1.0 if c >= 0 else -1.0) * abs(c) ** 0.5) * A for c, A in zip(coeffs, As, strict=True))
    B = sum(abs(c) ** 0.5 * B for c, B in zip(coeffs, Bs, strict=True))
    return A, B


def _dense_merge(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    scalings: list[float],
    weights: list[float],
    method: str,
    options: MergeOptions,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, SVD residual) of one module: the merged dense update truncated to rank R."""
    updates = [s * (B.double() @ A.double()) for s, (A, B) in zip(scalings, factors, strict=True)]
    merged = merge_methods.merge_updates(
        updates, weights, method, options.density, options.majority_sign_method, generator
    )
    target = options.rank or max(A.shape[0] for A, _ in factors)
    B, A, _ = low_rank_factors(merged, target)
    return A, B, merge_methods.relative_residual(merged, B @ A)


def _check_options(paths: list, method: str, weights: list[float] | None, options: MergeOptions) -> list[float]:
    """The weights to use (1/n each by default); one UsageError for an option that does not fit."""
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not known: use one of {', '.join(METHODS)}")
    if len(paths) < 1:
        raise UsageError("give at least one adapter folder to combine")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise UsageError(f"{len(weights)} weights for {len(paths)} adapters: give one weight per adapter")
    rank = options.rank
    dense = merge_methods.ALIASES.get(method, method) in merge_methods.METHODS
    if rank is not None and (not dense or not isinstance(rank, int) or rank <= 0):
        raise UsageError(
            f"rank={rank!r}: a positive target rank, for method svd only (and the other SVD methods: not cat or linear)"
        )
    if not 0 < options.density <= 1:
        raise UsageError(f"density={options.density!r}: the fraction of each update to keep, in (0, 1]")
    if options.majority_sign_method not in merge_methods.SIGN_METHODS:
        raise UsageError(
            f"majority_sign_method={options.majority_sign_method!r}: use one of {', '.join(merge_methods.SIGN_METHODS)}"
        )
    return weights


def _head_source(adapters: list[_Adapter], head_from: str | os.PathLike | int | None) -> int | None:
    """The index of the input whose heads the result keeps: `head_from`'s, or None when the heads
    are all equal (nothing to choose). Differing heads without `head_from` are refused."""
    paths = [a.path for a in adapters]
    if head_from is not None:
        index = _head_index(paths, head_from)
        if not adapters[index].head_keys():
            raise UsageError(f"--head-from {head_from}: these adapters save no head (modules_to_save) to choose")
        return index
    differing = _differing_heads(adapters)
    if differing:
        raise UsageError(
            f"the inputs save different heads ({', '.join(differing)}): a head cannot be mixed, so choose "
            f"which input's head the result keeps with --head-from, e.g. --head-from {paths[0]}"
        )
    return None


def _merge_modules(
    adapters: list[_Adapter], weights: list[float], method: str, options: MergeOptions
) -> tuple[dict[str, torch.Tensor], dict[str, int], list[float]]:
    """The combined factors of every module (PEFT keys without the prefix), their ranks, and the
    SVD residual per module (empty for cat and linear)."""
    dense_method = merge_methods.ALIASES.get(method, method)
    generator = torch.Generator().manual_seed(options.seed)  # DARE: one stream, modules in file order
    tensors, ranks, residuals = {}, {}, []
    for module, (A0, _, (a_suffix, b_suffix)) in adapters[0].factors.items():
        pairs = [a.factors[module][:2] for a in adapters]
        scalings = [a.scaling[module] for a in adapters]
        if dense_method in merge_methods.METHODS:
            A, B, residual = _dense_merge(pairs, scalings, weights, dense_method, options, generator)
            residuals.append(residual)
        else:
            A, B = _factor_mix(pairs, [w * s for w, s in zip(weights, scalings, strict=True)], method, module)
        tensors[module + a_suffix] = A.to(A0.dtype).contiguous()
        tensors[module + b_suffix] = B.to(A0.dtype).contiguous()
        ranks[module] = A.shape[0]
    return tensors, ranks, residuals


def _recipe(method: str, weights: list[float], options: MergeOptions, residuals: list[float]) -> dict:
    """What the metadata records about how the file was made (and how well SVD kept it)."""
    recipe: dict = {"method": method, "weights": weights}
    dense_method = merge_methods.ALIASES.get(method, method)
    if dense_method in merge_methods.DENSITY_METHODS:
        recipe["density"] = options.density
    if dense_method in ("ties", "dare_ties"):
        recipe["majority_sign_method"] = options.majority_sign_method
    if dense_method.startswith("dare"):
        recipe["seed"] = options.seed
    if residuals:
        recipe["svd_residual"] = {"max": max(residuals), "mean": sum(residuals) / len(residuals)}
    return recipe


def combine_adapters(
    paths: list[str | os.PathLike],
    method: str = "cat",
    weights: list[float] | None = None,
    rank: int | None = None,
    head_from: str | os.PathLike | int | None = None,
    options: MergeOptions | None = None,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """Combine the adapter folders `paths`; return (adapter_config dict, tensors with PEFT keys, metadata).

    `weights` defaults to 1/n each (an even mix). `rank` is the target rank of the SVD methods
    (also settable in `options`, with density, majority_sign_method and the DARE seed).
    `head_from` (an input's path, folder name or index) is the input whose heads
    (modules_to_save) the result keeps; needed when the inputs' heads differ.
    Nothing is written; `combine` writes the folder. The metadata's "lorakit_combine" recipe
    holds the SVD residual (relative Frobenius error per module: max, mean) of the SVD methods.
    """
    options = replace(options or MergeOptions(), **({"rank": rank} if rank is not None else {}))
    weights = _check_options(paths, method, weights, options)
    adapters = [_read(p) for p in paths]
    _check_compatible(adapters)
    source = _head_source(adapters, head_from)
    first = adapters[0]
    full = dict(first.full)
    if source is not None:
        chosen = adapters[source]
        full.update({k: chosen.full[k] for k in chosen.head_keys()})
    factors, ranks, residuals = _merge_modules(adapters, weights, method, options)
    out_tensors: dict[str, torch.Tensor] = {PREFIX + k: v for k, v in {**full, **factors}.items()}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    config = dict(first.raw)
    config.update(
        r=common,
        lora_alpha=common,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        inference_mode=True,
    )
    recipe = _recipe(method, weights, options, residuals)
    if source is not None:
        recipe["head_from"] = adapters[source].path
    metadata = {"format": "pt", "lorakit_combine": json.dumps(recipe)}
    if first.fingerprint:
        metadata[FINGERPRINT_KEY] = first.fingerprint
    return config, out_tensors, metadata


def combine(
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "cat",
    weights: list[float] | None = None,
    rank: int | None = None,
    head_from: str | os.PathLike | int | None = None,
    options: MergeOptions | None = None,
) -> Path:
    """Combine adapter folders `paths` into the adapter folder `out` (written atomically). The
    result's card (README.md) is that of the input whose head it keeps (the first when all are
    equal): the head's label names and columns, the inputs' base."""
    config, tensors, metadata = combine_adapters(paths, method, weights, rank, head_from, options)
    sources = {Path(p).resolve() for p in paths}
    if Path(out).resolve() in sources:
        raise UsageError(f"--out {out} is one of the inputs: write the combined adapter to a new folder")
    folder = write_adapter_folder(out, config, tensors, metadata)
    index = 0 if head_from is None else _head_index(list(paths), head_from)
    card = read_card(paths[index]) or read_card(paths[0])
    if card is not None:
        write_card(folder, replace(card, base_fingerprint=None, lorakit_version=None))
    return folder


def combine_recipe(folder: str | os.PathLike) -> dict:
    """The recipe a combined adapter folder records (method, weights, options, svd_residual)."""
    _, _, metadata = read_adapter(folder)
    return json.loads(metadata.get("lorakit_combine", "{}"))
