"""Serve a base model and many LoRA adapters over an OpenAI-compatible HTTP API.

Every adapter is a model name: `"model": "positive"` in a request picks that adapter, the base
model's own name picks the base. Requests with different adapters share one batch (continuous
batching; each row runs with its own adapter).

  lorakit serve                                   the shipped SST-2 GPT and its adapters (chat too)
  lorakit serve --model MINILM --adapter reviews=run/adapter       a classifier from `lorakit train`
  lorakit serve --model DIR --adapter pos=DIR1 --adapter neg=DIR2 --api-keys keys.json
  lorakit serve --model DIR --lora-modules pos=DIR1 neg=DIR2 --max-loras 4 --max-lora-rank 16   vLLM's flags

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true for
server-sent events), POST /v1/classify (classification bases), POST /v1/adapters {name, path}
(path under --adapter-root), DELETE /v1/adapters/NAME, vLLM's POST /v1/load_lora_adapter
{lora_name, lora_path, load_inplace} and POST /v1/unload_lora_adapter {lora_name} (gated as
/v1/adapters is), GET /health. The keys file (JSON or TOML) maps each API key to the models it
may use, "*" for all (and adapter loading).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.errors import UsageError

SHIPPED_ADAPTERS = ("positive", "negative", "chat")
HELP = "serve a base model and many LoRA adapters over an OpenAI-compatible HTTP API"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model folder (Hugging Face format); default: the shipped SST-2 GPT")
    parser.add_argument("--base-name", help="the base model's name in requests (default: the folder's name)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to serve (repeatable)"
    )
    parser.add_argument(
        "--lora-modules", action="extend", nargs="+", default=[], metavar="NAME=DIR|JSON",
        help="vLLM's name for --adapter: NAME=DIR or JSON {\"name\", \"path\", \"base_model_name\"} (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-root", help="folder under which POST /v1/adapters may load adapters (--adapter ones: anywhere)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-keys", help="JSON or TOML file: API key -> list of models it may use ('*': all)")
    parser.add_argument(
        "--max-resident", "--max-loras", dest="max_resident", type=int,
        help="adapters kept loaded in slots at once, all usable in one batch (LRU eviction beyond); "
        "--max-loras is vLLM's name",
    )  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default: 32)")
    parser.add_argument(
        "--max-rank", "--max-lora-rank", dest="max_rank", type=int, default=64,
        help="largest adapter rank accepted (default: 64); --max-lora-rank is vLLM's name",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=16, help="default max_tokens of a request (default: 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """NAME=DIR pairs -> {name: folder}; one UsageError naming every bad one."""
    adapters, problems = {}, []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            problems.append(f"{spec!r} is not NAME=DIR")
        elif name in adapters:
            problems.append(f"adapter name {name!r} is given twice")
        elif not Path(folder).is_dir():
            problems.append(f"adapter folder {folder!r} (for {name}) does not exist")
        else:
            adapters[name] = Path(folder).resolve()  # resolved once, against the working folder
    if problems:
        raise UsageError("--adapter: " + "; ".join(problems))
    return adapters


def lora_module_specs(specs: list[str]) -> tuple[list[str], dict[str, str]]:
    """vLLM's --lora-modules entries -> (NAME=DIR specs for parse_adapters, {name: base_model_name}
    where one is given). An entry is NAME=DIR or JSON {"name", "path", "base_model_name"}."""
    pairs, bases, problems = [], {}, []
    for spec in specs:
        if not spec.lstrip().startswith("{"):
            pairs.append(spec)
            continue
        try:
            module = json.loads(spec)
        except json.JSONDecodeError as err:
            problems.append(f"{spec!r} is not valid JSON ({err.msg})")
            continue
        if not all(isinstance(module.get(key), str) for key in ("name", "path")):
            problems.append(f"{spec!r} needs string fields 'name' and 'path'")
            continue
        pairs.append(f"{module['name']}={module['path']}")
        if module.get("base_model_name") is not None:
            bases[module["name"]] = str(module["base_model_name"])
    if problems:
        raise UsageError("--lora-modules: " + "; ".join(problems))
    return pairs, bases


def check_base_model_names(bases: dict[str, str], accepted: set[str]) -> None:
    """One server serves one base: a --lora-modules base_model_name must name it."""
    wrong = {name: base for name, base in bases.items() if base not in accepted}
    if wrong:
        shown = ", ".join(f"{name}: {base!r}" for name, base in sorted(wrong.items()))
        raise UsageError(f"--lora-modules: base_model_name must be {' or '.join(map(repr, sorted(accepted)))} "
                         f"(the base this server serves), not {shown}")  # fmt: skip


def shipped_adapter_folder() -> Path:
    """The folder of the adapters shipped for the default GPT (positive, negative, chat)."""
    from lorakit import defaults

    return next(iter(defaults.default_causal_lm_adapters().values())).parent


def shipped_adapters(folder: Path) -> dict[str, Path]:
    """What `lorakit serve` with no arguments serves: the shipped adapters present in `folder`,
    the chat one included once it is trained (it answers /v1/chat/completions as "chat")."""
    return {name: folder / name for name in SHIPPED_ADAPTERS if (folder / name).is_dir()}


def adapters_task(adapters: dict[str, Path]) -> tuple[str | None, int | None]:
    """(task, number of labels) the adapters need of the base: (CLASSIFY, n) when they are
    classifiers (`lorakit train --task classify`: one head each, all with n outputs), (None,
    None) when they say nothing of a classifier, and the base's architecture decides."""
    from lorakit import hf

    tasks = {name: hf.adapter_task(folder) for name, folder in adapters.items()}
    classifiers = {name: t.num_labels for name, t in tasks.items() if t.task == hf.CLASSIFY}
    if not classifiers:
        return None, None
    others = sorted(set(tasks) - set(classifiers))
    if others:
        raise UsageError(
            f"--adapter: {', '.join(sorted(classifiers))} classify and {', '.join(others)} do not; "
            "serve classifier adapters and generation adapters from separate servers"
        )
    counts = {n for n in classifiers.values() if n is not None}
    if len(counts) > 1:
        shown = ", ".join(f"{name}: {n}" for name, n in sorted(classifiers.items()))
        raise UsageError(
            f"--adapter: the classifiers have different numbers of labels ({shown}); one server serves "
            "one head shape: start one server per label count"
        )
    return hf.CLASSIFY, counts.pop() if counts else None


def _check(args: argparse.Namespace) -> None:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port} is not in 0..65535")
    for flag in ("max_batch", "max_rank", "max_tokens"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_resident is not None and args.max_resident < 1:
        problems.append("--max-resident must be >= 1")
    if args.adapter_root and not Path(args.adapter_root).is_dir():
        problems.append(f"--adapter-root {args.adapter_root!r} is not a folder")
    if args.model and not (Path(args.model) / "config.json").is_file():
        problems.append(f"--model {args.model!r} holds no config.json: give a Hugging Face model folder")
    if problems:
        raise UsageError("; ".join(problems))


def build_app(args: argparse.Namespace):
    """Load the model, tokenizer and adapters named by `args` and return the FastAPI app."""
    _check(args)
    from lorakit import defaults, hf

    defaults.offline()
    modules, module_bases = lora_module_specs(args.lora_modules)
    adapters = parse_adapters(args.adapter + modules)
    if args.model is None and not adapters:
        adapters = shipped_adapters(shipped_adapter_folder())
    task, num_labels = adapters_task(adapters)
    # picked as every command picks it: --model, else the first adapter's recorded base, else the
    # shipped SST-2 GPT (the packaged MiniLM for classifier adapters)
    first = next(iter(adapters.values()), None)
    model_path = hf.model_path(args.model, task or hf.CAUSAL_LM, first)
    from lorakit.serve.auth import load_api_keys

    api_keys = load_api_keys(args.api_keys) if args.api_keys else None

    import torch

    from lorakit.serve import AdapterRegistry, MultiLoraModel
    from lorakit.serve.app import create_app

    config = hf.load_config(model_path)
    tokenizer = hf.load_tokenizer(model_path)
    task = task or (hf.CLASSIFY if hf.model_task(config) == hf.CLASSIFY else hf.CAUSAL_LM)  # else: a causal LM
    if num_labels is not None:  # the head gets the adapters' shape; each adapter's own weights fill it per row
        config.num_labels = num_labels
    torch.manual_seed(0)  # a head no adapter covers (the base's own answer) is the same every run
    model = hf.load_base(model_path, task, config, tokenizer)
    model = model.to(torch.device(args.device)).eval()
    slots = max(16, args.max_resident or 0, len(adapters))
    multi = MultiLoraModel(model, slots=slots, max_rank=args.max_rank)
    registry = AdapterRegistry(multi, max_resident=args.max_resident, root=args.adapter_root)
    base_name = args.base_name or Path(model_path).name
    check_base_model_names(module_bases, {base_name, *([args.model] if args.model else [])})
    if base_name in adapters:
        raise UsageError(f"adapter name {base_name!r} is the base model's name: rename it or set --base-name")
    # The operator's own adapters (--adapter, or the shipped ones) are trusted: --adapter-root bounds
    # only the folders clients name in POST /v1/adapters. Beyond --max-resident: loaded on first use.
    for i, (name, folder) in enumerate(adapters.items()):
        registry.register(name, folder, load_now=args.max_resident is None or i < args.max_resident, trusted=True)
    app = create_app(
        multi,
        tokenizer,
        registry,
        base_name=base_name,
        api_keys=api_keys,
        adapter_root=args.adapter_root,
        max_batch=args.max_batch,
        default_max_tokens=args.max_tokens,
    )
    return app, base_name, sorted(adapters)


def run(args: argparse.Namespace) -> int:
    """Build the app and serve it until interrupted."""
    import uvicorn

    app, base_name, names = build_app(args)
    shown = ", ".join(names) or "none"
    print(f"lorakit serve: {base_name} with adapters {shown} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
