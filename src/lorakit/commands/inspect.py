"""Describe an adapter folder without loading a model.

Shows the LoRA settings, every adapted module with its rank and shapes, the saved head
modules, parameter counts, file sizes, the base-model fingerprint lorakit recorded, and
whether PEFT can load the folder (its config is read with `peft.LoraConfig` when PEFT is
installed, and the tensor names are checked against PEFT's layout). With `--base DIR` it also
parses the file against that model exactly as loading does (`lorakit.files.plan`) and shows the
coverage: which targeted modules got tensors, which got none, which tensors fit nowhere.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

HELP = "describe an adapter folder: settings, ranks per module, parameters, size, PEFT compatibility"


def _lora_suffixes() -> dict[str, str]:
    """PEFT's LoRA key suffixes -> "A" / "B", as the loader's parser names them."""
    from lorakit.files.plan import LORA_KEYS

    return {suffix: part for pair in LORA_KEYS.values() for suffix, part in zip(pair, "AB", strict=True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit inspect`."""
    parser.add_argument("adapter", nargs="?", metavar="DIR", help="the adapter folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--base", metavar="DIR", help="a base model folder: also show how the adapter's tensors cover its modules"
    )


def run(args: argparse.Namespace) -> int:
    """Print the description of the adapter folder."""
    from lorakit.cli import require

    require(args, "adapter")
    model = None
    if getattr(args, "base", None):
        from lorakit.commands.extract import load_pretrained

        model = load_pretrained(args.base, "base")
    report = describe(args.adapter, model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_as_text(report))
    return 0


def describe(adapter: str | Path, model: Any = None) -> dict[str, Any]:
    """Everything `lorakit inspect` shows, as a JSON-ready dict. Raises AdapterError for a
    folder that is not a readable adapter. With a `model`, adds "coverage" (see `coverage`)."""
    from lorakit.files.peft_format import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, read_adapter

    folder = Path(adapter)
    config, tensors, metadata = read_adapter(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    modules: dict[str, dict[str, Any]] = defaultdict(dict)
    saved: dict[str, int] = defaultdict(int)
    suffixes = _lora_suffixes()
    for key, tensor in tensors.items():
        for suffix, part in suffixes.items():
            if key.endswith("." + suffix):
                modules[key.removesuffix("." + suffix)][part] = list(tensor.shape)
                break
        else:
            saved[key.rpartition(".")[0]] += tensor.numel()  # a saved head or bias: trained in full
    targets = []
    for name in sorted(modules):
        shapes = modules[name]
        rank = shapes["A"][0] if "A" in shapes else None  # A is (r, in ...) for every layer kind, as in PEFT
        params = sum(math.prod(s) for s in shapes.values())
        targets.append({"module": name, "rank": rank, "A": shapes.get("A"), "B": shapes.get("B"), "params": params})
    lora_params = sum(t["params"] for t in targets)
    saved_params = sum(saved.values())
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    report = {
        "path": str(folder),
        "peft_type": raw.get("peft_type", "LORA"),
        "task_type": raw.get("task_type"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "r": config.r,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "targets": targets,
        "saved_modules": dict(sorted(saved.items())),
        "params": {"lora": lora_params, "saved_modules": saved_params, "total": lora_params + saved_params},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "files": files,
        "weights_bytes": files.get(WEIGHTS_NAME, 0),
        "base_fingerprint": metadata.get(FINGERPRINT_KEY),
        "peft": peft_check(folder, raw, tensors),
        "card": _card(folder),
    }
    if model is not None:
        report["coverage"] = coverage(config, tensors, model)
    return report


def coverage(config: Any, tensors: dict[str, Any], model: Any) -> dict[str, Any]:
    """How the adapter meets `model`, parsed as load_adapter parses it: {"model", "targeted",
    "matched", "empty", "unused", "problems", "loadable"} (problems: load_adapter's reasons)."""
    from lorakit.files.plan import plan_adapter

    plan = plan_adapter(config, tensors, model, strict=False)
    error = plan.failure("the adapter")
    problems = [str(error)] if error is not None else []
    return {"model": type(model).__name__, **plan.coverage.as_dict(), "problems": problems, "loadable": not problems}


def peft_check(folder: Path, raw: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """{"loadable": bool, "checked_with": ..., "problems": [...]}: PEFT's own config class reads
    the config (when PEFT is installed), and every tensor name follows PEFT's layout."""
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}, PEFT needs 'LORA' in adapter_config.json")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            problems.append(f"adapter_config.json has no {key!r}")
    lora_keys = [k for k in tensors if any(k.endswith("." + s) for s in _lora_suffixes())]
    if not lora_keys:
        problems.append("no lora_A / lora_B tensors in the weights file")
    odd = [k for k in lora_keys if ".lora_A.default." in k or ".lora_B.default." in k]
    if odd:
        problems.append(f"tensor names carry an adapter name ({odd[0]}); PEFT files do not")
    checked_with = "names only (peft is not installed)"
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        checked_with = f"peft {peft.__version__}"
        try:
            with warnings.catch_warnings():  # PEFT warns about keys it does not know; the verdict is what counts
                warnings.simplefilter("ignore")
                loaded = peft.LoraConfig.from_pretrained(str(folder))
            if int(loaded.r) != int(raw.get("r", -1)):
                problems.append(f"PEFT reads r={loaded.r}, the file says {raw.get('r')}")
        except Exception as err:  # PEFT raises many types for configs it cannot read
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"peft.LoraConfig.from_pretrained fails: {first}")
    return {"loadable": not problems, "checked_with": checked_with, "problems": problems}


def _card(folder: Path) -> dict[str, Any] | None:
    """The adapter card (README.md) as a dict, with the base it resolves to here; None without one."""
    from lorakit.files.card import read_card

    card = read_card(folder)
    if card is None:
        return None
    found = card.base_path()
    return {**card.to_json(), "base_here": str(found) if found else None}


def _card_text(card: dict[str, Any] | None) -> str:
    if card is None:
        return "card           none (no lorakit README.md)"
    columns = [f"{k}={v}" for k, v in card.items() if k.endswith("_column")]
    where = f"here: {card['base_here']}" if card["base_here"] else "not here"
    return (
        f"card           {card.get('task') or 'no task'}, labels {', '.join(card.get('labels') or []) or 'n/a'}, "
        f"base {card.get('base') or 'not recorded'} ({where})" + (f", columns {', '.join(columns)}" if columns else "")
    )


def _as_text(report: dict[str, Any]) -> str:
    kib = report["weights_bytes"] / 1024
    peft = report["peft"]
    verdict = "yes" if peft["loadable"] else "NO: " + "; ".join(peft["problems"])
    targets = report["target_modules"]
    lines = [
        f"adapter        {report['path']}",
        f"type           {report['peft_type']} ({report['task_type'] or 'no task type'})",
        f"base model     {report['base_model_name_or_path'] or 'not recorded'}",
        f"fingerprint    {report['base_fingerprint'] or 'none (not written by lorakit)'}",
        f"rank, alpha    r={report['r']}, alpha={report['alpha']}"
        + (" (rsLoRA)" if report["use_rslora"] else "")
        + f", dropout {report['dropout']}, bias {report['bias']}",
        f"targets        {', '.join(targets) if isinstance(targets, list) else targets}",
        f"parameters     {report['params']['total']:,} ({report['params']['lora']:,} LoRA"
        + f" + {report['params']['saved_modules']:,} in saved modules), {', '.join(report['dtypes'])}",
        f"weights file   {kib:,.1f} KiB",
        f"PEFT loadable  {verdict} (checked with {peft['checked_with']})",
        _card_text(report["card"]),
        f"adapted modules ({len(report['targets'])}):",
    ]
    width = max((len(t["module"]) for t in report["targets"]), default=10)
    for t in report["targets"]:
        lines.append(f"  {t['module']:<{width}}  r={t['rank']:<4} A{tuple(t['A'] or ())} B{tuple(t['B'] or ())}")
    if report["saved_modules"]:
        lines.append("saved modules (trained in full):")
        for name, count in report["saved_modules"].items():
            lines.append(f"  {name:<{width}}  {count:,} parameters")
    if "coverage" in report:
        lines += _coverage_text(report["coverage"])
    return "\n".join(lines)


def _coverage_text(cover: dict[str, Any]) -> list[str]:
    verdict = "yes" if cover["loadable"] else "NO: " + "; ".join(cover["problems"])
    lines = [
        f"on {cover['model']}: {len(cover['matched'])} of {len(cover['targeted'])} targeted modules matched",
        f"  loadable     {verdict}",
    ]
    if cover["empty"]:
        lines.append(f"  no tensors   {', '.join(cover['empty'])}")
    if cover["unused"]:
        lines.append(f"  unused       {', '.join(cover['unused'])}")
    return lines
