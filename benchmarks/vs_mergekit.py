"""lorakit's merge methods against mergekit (issue 14, section 1), on weights.

    python benchmarks/vs_mergekit.py                        # all cases, table + results/vs_mergekit.json
    python benchmarks/vs_mergekit.py --mergekit-python /work/venv-mergekit/bin/python

mergekit is not a lorakit dependency (it pulls datasets, scipy, sentencepiece...): it lives in
its own virtual environment (LORAKIT_MERGEKIT_PYTHON or --mergekit-python, default
/work/venv-mergekit/bin/python) and runs there through benchmarks/mergekit_driver.py.

Set-up: a tiny random Llama base (float64, hidden 32, 2 layers), three LoRA adapters of it with
distinct random factors on every linear layer (ranks 4/4/2, alphas 8/2/4), and each adapter's
full fine-tuned model base + dW_i (dW_i = alpha_i/r_i B_i A_i from the adapter file, float64),
saved as Hugging Face folders. mergekit merges the fine-tuned models (base_model = the base);
lorakit's merge_methods.merge_updates merges the dW_i (the dense path of `lorakit combine`,
before its SVD truncation), and `lorakit combine` itself writes an adapter at full rank (exact
SVD, factors in float32). Per adapted layer: max |dW_mergekit - dW_lorakit| and
||dW_mergekit - dW_lorakit||_F / ||dW_lorakit||_F, where dW_mergekit = merged weight - base.
The tensors no adapter touches must come out of mergekit equal to the base.

DARE is random: mergekit's masks are recorded (the driver wraps mergekit.sparsify's
rescaled_masked_tensor) and replayed into lorakit's random_prune_update (torch.bernoulli
patched for that call only), so both sides prune the same entries and the comparison is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import lorakit  # noqa: E402
from lorakit.core.inject import lora_layers  # noqa: E402
from lorakit.tools import merge_methods  # noqa: E402
from lorakit.tools.combine import MergeOptions, combine_adapters  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DRIVER = Path(__file__).parent / "mergekit_driver.py"
DEFAULT_PYTHON = "/work/venv-mergekit/bin/python"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = ((4, 8.0, 1), (4, 2.0, 2), (2, 4.0, 3))  # (rank, alpha, seed)
SIGNED = [0.7, -0.4, 1.2]  # unequal weights, one negative (as in the PEFT comparison)
POSITIVE = [0.7, 0.4, 1.2]  # unequal positive weights
EVEN = [0.5, 0.5, 0.5]  # equal weights: where TIES agrees


def mergekit_python(given: str | None = None) -> str:
    return given or os.environ.get("LORAKIT_MERGEKIT_PYTHON", DEFAULT_PYTHON)


def mergekit_available(python: str) -> bool:
    """Whether `python` exists and has mergekit installed (a quick look, not an import)."""
    if not Path(python).is_file():
        return False
    look = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mergekit') is None)"
    probe = subprocess.run([python, "-c", look], capture_output=True, check=False)
    return probe.returncode == 0


@dataclass(frozen=True)
class Case:
    """One comparison: mergekit's method and parameters against lorakit's method and weights."""

    name: str
    mergekit_method: str
    lorakit_method: str
    weights: list[float]
    density: float = 1.0
    parameters: dict = field(default_factory=dict)  # mergekit's global parameters (normalize, lambda...)
    model_parameters: dict = field(default_factory=dict)  # per model, besides weight and density
    lorakit_weights: list[float] | None = None  # when lorakit needs other weights for the same merge
    equal: bool = True  # whether these settings are meant to agree
    note: str = ""

    @property
    def random(self) -> bool:
        return self.lorakit_method.startswith("dare") and self.density < 1


CASES = (
    Case("task_arithmetic", "task_arithmetic", "task_arithmetic", SIGNED, note="mergekit normalize false (default)"),
    Case(
        "task_arithmetic normalize",
        "task_arithmetic",
        "task_arithmetic",
        SIGNED,
        parameters={"normalize": True},
        lorakit_weights=[w / sum(SIGNED) for w in SIGNED],
        note="normalize true = lorakit weights w_i / sum w",
    ),
    Case(
        "magnitude_prune",
        "breadcrumbs",
        "magnitude_prune",
        SIGNED,
        0.3,
        model_parameters={"gamma": 0.0},
        note="= breadcrumbs with gamma 0",
    ),
    Case(
        "magnitude_prune vs breadcrumbs default",
        "breadcrumbs",
        "magnitude_prune",
        SIGNED,
        0.3,
        equal=False,
        note="breadcrumbs' default gamma 0.01 also drops the top 1%",
    ),
    Case(
        "ties, equal weights",
        "ties",
        "ties",
        EVEN,
        0.3,
        parameters={"normalize": True, "lambda": 0.5},
        note="normalize true, lambda = w; lorakit majority_sign_method total = mergekit sum",
    ),
    Case(
        "ties, unequal weights",
        "ties",
        "ties",
        POSITIVE,
        0.3,
        equal=False,
        note="mergekit defaults: weighted sign vote, divides by sum of agreeing weights",
    ),
    Case("ties, signed weights", "ties", "ties", SIGNED, 0.3, equal=False, note="as above, one weight negative"),
    Case("dare_linear, density 1", "dare_linear", "dare_linear", SIGNED, 1.0, note="no pruning: task arithmetic"),
    Case(
        "dare_linear",
        "dare_linear",
        "dare_linear",
        SIGNED,
        0.5,
        parameters={"rescale": False, "lambda": 2.0},
        note="same masks; rescale false, lambda = 1/density",
    ),
    Case(
        "dare_linear, mergekit rescale",
        "dare_linear",
        "dare_linear",
        SIGNED,
        0.5,
        equal=False,
        note="same masks; mergekit default rescale true: L1 norm, not 1/density",
    ),
    Case(
        "dare_ties, equal weights",
        "dare_ties",
        "dare_ties",
        EVEN,
        0.5,
        parameters={"normalize": True, "rescale": False, "lambda": 1.0},
        note="same masks; normalize true, rescale false, lambda = w/density",
    ),
    Case(
        "dare_ties, mergekit defaults",
        "dare_ties",
        "dare_ties",
        POSITIVE,
        0.5,
        equal=False,
        note="same masks; normalize false, rescale true (L1), weighted sign vote",
    ),
)


# --- the models ------------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def file_updates(folder: Path) -> dict[str, torch.Tensor]:
    """dW = alpha/r B @ A (float64) of every module of an adapter file, by weight name
    (model.layers.0.self_attn.q_proj.weight): read straight from the files, not through lorakit."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    updates = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            updates[module + ".weight"] = scale * (B.double() @ A.double())
    return updates


@dataclass
class Fixture:
    root: Path
    base: dict[str, torch.Tensor]  # the base's weights (float64)
    adapters: list[Path]
    updates: list[dict[str, torch.Tensor]]  # dW_i by weight name
    tuned: list[Path]  # base + dW_i, Hugging Face folders


def build_fixture(root: Path) -> Fixture:
    """The base, the adapters and their fine-tuned models under `root`."""
    base_model = tiny_llama(0).double()
    base_model.save_pretrained(root / "base")
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    adapters, updates, tuned = [], [], []
    for i, (rank, alpha, seed) in enumerate(ADAPTERS):
        model = tiny_llama(0)
        torch.manual_seed(seed)
        model = lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=alpha, target_modules=list(TARGETS)))
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].normal_(std=0.2)
        folder = root / f"adapter{i}"
        lorakit.save_adapter(model, folder)
        update = file_updates(folder)
        full = tiny_llama(0).double()
        with torch.no_grad():
            for name, param in full.named_parameters():
                if name in update:
                    param.add_(update[name])
        full.save_pretrained(root / f"tuned{i}")
        adapters.append(folder)
        updates.append(update)
        tuned.append(root / f"tuned{i}")
    return Fixture(root, base, adapters, updates, tuned)


# --- mergekit --------------------------------------------------------------------------------


def mergekit_config(case: Case, fixture: Fixture) -> str:
    """The merge's YAML (written as JSON, which is YAML)."""
    models = [
        {"model": str(path), "parameters": {"weight": w, "density": case.density, **case.model_parameters}}
        for path, w in zip(fixture.tuned, case.weights, strict=True)
    ]
    config = {
        "merge_method": case.mergekit_method,
        "base_model": str(fixture.root / "base"),
        "dtype": "float64",
        "out_dtype": "float64",
        "models": models,
    }
    if case.parameters:
        config["parameters"] = case.parameters
    return json.dumps(config, indent=1)


def run_mergekit(cases: list[Case], fixture: Fixture, python: str) -> list[Path]:
    """Run every case's merge in one mergekit process; the merged model folders, in order."""
    jobs = []
    for k, case in enumerate(cases):
        out = fixture.root / f"merged{k}"
        masks = str(fixture.root / f"masks{k}.safetensors") if case.random else None
        jobs.append({"config": mergekit_config(case, fixture), "out": str(out), "masks": masks})
    jobs_file = fixture.root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    done = subprocess.run([python, str(DRIVER), str(jobs_file)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mergekit failed ({python}):\n{done.stderr[-3000:]}")
    return [Path(job["out"]) for job in jobs]


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def recorded_masks(file: Path, fixture: Fixture) -> dict[tuple[str, int], torch.Tensor]:
    """mergekit's DARE masks by (weight name, adapter index): each recorded delta is matched to
    the dW_i it equals (mergekit prunes in float32 on CPU, hence the tolerance)."""
    recorded = load_file(file)
    masks = {}
    for k in range(len(recorded) // 2):
        delta, mask = recorded[f"delta.{k}"].double(), recorded[f"mask.{k}"]
        if not delta.any():
            continue  # a tensor no adapter touches
        hits = [
            (name, i)
            for i, update in enumerate(fixture.updates)
            for name, dW in update.items()
            if dW.shape == delta.shape and torch.allclose(delta, dW, rtol=1e-6, atol=1e-9)
        ]
        if len(hits) != 1:
            raise RuntimeError(f"recorded delta {k} matches {len(hits)} adapter updates, not one")
        masks[hits[0]] = mask
    return masks


# --- lorakit and the comparison --------------------------------------------------------------


def lorakit_updates(case: Case, fixture: Fixture, masks: dict | None) -> dict[str, torch.Tensor]:
    """lorakit's merged dense update of every adapted layer (merge_methods.merge_updates), DARE
    with mergekit's masks replayed through torch.bernoulli."""
    weights = case.lorakit_weights or case.weights
    merged = {}
    for name in fixture.updates[0]:
        updates = [u[name] for u in fixture.updates]
        if masks is None:
            merged[name] = merge_methods.merge_updates(updates, weights, case.lorakit_method, case.density)
            continue
        replay = [masks[(name, i)] for i in range(len(updates))]  # one draw per adapter, in order
        with mock.patch.object(torch, "bernoulli", side_effect=replay) as drawn:
            merged[name] = merge_methods.merge_updates(updates, weights, case.lorakit_method, case.density)
        if drawn.call_count != len(updates):
            raise RuntimeError(f"{name}: lorakit drew {drawn.call_count} DARE masks, not one per adapter")
    return merged


def combine_updates(case: Case, fixture: Fixture) -> dict[str, torch.Tensor]:
    """The dense update of every layer of the adapter `lorakit combine` writes at full rank."""
    weights = case.lorakit_weights or case.weights
    options = MergeOptions(rank=64, density=case.density)
    _, tensors, _ = combine_adapters(fixture.adapters, case.lorakit_method, weights, options=options)
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module + ".weight"] = tensors[key.replace(".lora_A.", ".lora_B.")].double() @ A.double()
    return out


def _outlier_prune(update: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers (breadcrumbs): drop the gamma share of largest |values| and
    the smallest, keeping int(density * numel)."""
    if density >= 1:
        return update
    n, keep = update.numel(), int(density * update.numel())
    bottom = max(0, n - keep - int(gamma * n))
    order = torch.sort(update.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=update.dtype)
    mask[order[bottom : bottom + keep]] = 1
    return update * mask.reshape(update.shape)


def mergekit_rule(case: Case, updates: list[torch.Tensor], masks: list[torch.Tensor] | None) -> torch.Tensor:
    """mergekit's generalized task arithmetic written out from its source (merge_group in
    merge_methods/generalized_task_arithmetic.py, sparsify.py), to show which differences the
    cases that disagree come from: prune (DARE: L1 rescale when `rescale`), multiply by the
    weights, elect the sign from the *weighted* deltas, divide by the sum of the (agreeing)
    weights when `normalize`, multiply by lambda."""
    defaults = {"ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True)}
    normalize, rescale = defaults.get(case.mergekit_method, (False, False))
    normalize = case.parameters.get("normalize", normalize)
    rescale = case.parameters.get("rescale", rescale)
    if masks is not None:
        pruned = []
        for u, m in zip(updates, masks, strict=True):
            kept = u * m.double()
            pruned.append(kept * (u.abs().sum() / kept.abs().sum()) if rescale else kept)
    elif case.mergekit_method == "breadcrumbs":
        gamma = case.model_parameters.get("gamma", 0.01)
        pruned = [_outlier_prune(u, case.density, gamma) for u in updates]
    elif case.mergekit_method == "ties":
        pruned = [merge_methods.magnitude_prune_update(u, case.density) for u in updates]
    else:
        pruned = updates
    weights = torch.tensor(case.weights, dtype=torch.float64).view(-1, 1, 1)
    weighted = torch.stack(pruned) * weights
    if case.mergekit_method in ("ties", "dare_ties"):
        agree = merge_methods.majority_sign_mask(weighted, "total")
        mixed, divisor = (weighted * agree).sum(0), (weights * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), weights.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * case.parameters.get("lambda", 1.0)


def differences(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
    """Max abs and max relative Frobenius difference over the layers."""
    abs_diff = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    rel_diff = max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected)
    return {"max_abs": abs_diff, "max_rel": rel_diff}


def compare(case: Case, fixture: Fixture, folder: Path, mask_file: Path | None, with_combine: bool) -> dict:
    """One case's figures: mergekit against lorakit's dense path (and its combine file)."""
    merged = merged_weights(folder)
    untouched = max(float((merged[k] - v).abs().max()) for k, v in fixture.base.items() if k not in fixture.updates[0])
    mergekit_dW = {k: merged[k] - fixture.base[k] for k in fixture.updates[0]}
    masks = recorded_masks(mask_file, fixture) if mask_file else None
    row = {"case": case.name, "mergekit": case.mergekit_method, "lorakit": case.lorakit_method}
    row.update(weights=case.weights, density=case.density, parameters={**case.parameters, **case.model_parameters})
    row.update(meant_equal=case.equal, note=case.note, untouched_max_abs=untouched)
    row["dense"] = differences(mergekit_dW, lorakit_updates(case, fixture, masks))
    if masks:
        row["mask_kept"] = float(torch.stack([m.float().mean() for m in masks.values()]).mean())
    rule = {
        name: mergekit_rule(case, [u[name] for u in fixture.updates], masks and [masks[(name, i)] for i in range(3)])
        for name in fixture.updates[0]
    }
    row["rule"] = differences(mergekit_dW, rule)
    if with_combine and not case.random:
        row["combine"] = differences(mergekit_dW, combine_updates(case, fixture))
    return row


def run_cases(cases: list[Case], root: Path, python: str, with_combine: bool = True) -> list[dict]:
    fixture = build_fixture(root)
    folders = run_mergekit(cases, fixture, python)
    rows = []
    for k, (case, folder) in enumerate(zip(cases, folders, strict=True)):
        mask_file = fixture.root / f"masks{k}.safetensors" if case.random else None
        rows.append(compare(case, fixture, folder, mask_file, with_combine))
    return rows


def _pair(figures: dict | None) -> str:
    return f"{figures['max_abs']:.1e} / {figures['max_rel']:.1e}" if figures else "-"


def table(rows: list[dict]) -> str:
    """The markdown table of BENCHMARKS.md: mergekit against lorakit's dense merge, lorakit
    combine's file, and mergekit's rule written out (max abs / max relative per layer)."""
    lines = [
        "| case | weights, density | mergekit settings | lorakit dense | lorakit combine file | mergekit's rule |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        settings = ", ".join(f"{k} {v}" for k, v in r["parameters"].items()) or "defaults"
        name = r["case"] if r["meant_equal"] else f"{r['case']} (differs)"
        lines.append(
            f"| {name} | {'/'.join(map(str, r['weights']))}, {r['density']} | {r['mergekit']}: {settings} | "
            f"{_pair(r['dense'])} | {_pair(r.get('combine'))} | {_pair(r['rule'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-python", help=f"python of mergekit's venv (default {DEFAULT_PYTHON})")
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_mergekit.json")
    args = parser.parse_args()
    python = mergekit_python(args.mergekit_python)
    hf_logging.disable_progress_bar()
    if not mergekit_available(python):
        sys.exit(f"error: {python} cannot import mergekit: give its venv's python with --mergekit-python")
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_cases(list(CASES), Path(tmp), python)
    print(table(rows))
    result = {
        "mergekit": versions[0],
        "mergekit_transformers": versions[1],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
