"""Server benchmark: many concurrent clients, many adapters, one lorakit server.

Three modes of the same server, side by side in one run (order rotated between repeats):
  mixed  continuous batching, each row with its own adapter (lorakit's normal mode)
  swap   the one-adapter-at-a-time baseline: requests grouped per adapter, one batch at a time,
         run to its end before the next adapter's batch forms (what a merged model must do)
  base   every request on the plain base model, continuous batching (the floor)

Clients send /v1/completions over HTTP (httpx, `--clients` at once) with a random adapter of
`--adapters`, a random prompt of 8 to 24 token ids and `--max-tokens` new tokens (the default
random model has no EOS, so every request produces exactly that many; `--model default` serves
the shipped SST-2 GPT, whose requests may stop early). Reports requests/s, tokens/s, p50/p99
latency and errors per mode, and the ratios mixed/swap and mixed/base of the medians over repeats.

  python benchmarks/multi_adapter_server.py                       # 1,000 requests per mode
  python benchmarks/multi_adapter_server.py --requests 200 --repeats 1   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lorakit import LoraConfig, inject
from lorakit.files.atomic import replace_file
from lorakit.files.peft_format import save_adapter
from lorakit.serve import AdapterRegistry, MultiLoraModel
from lorakit.serve.app import create_app, serve_in_background

BASE = "bench-gpt"


def small_gpt(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    """A small GPT-2 (4 layers, 256 wide, ~3.6M parameters) with no EOS: every request runs to max_tokens."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=256, n_layer=4, n_head=4, n_positions=256)
    config.eos_token_id = config.bos_token_id = None
    return GPT2LMHeadModel(config).eval()


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Words w0..w{vocab-1}, one id each: decoding any generated id gives text."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1")


def make_adapters(model_fn, count: int, rank: int, folder: Path) -> dict[str, Path]:
    """`count` random rank-`rank` adapters on all linear layers, saved in PEFT format."""
    out = {}
    for i in range(count):
        model = inject(model_fn(), LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        out[f"ad{i:02d}"] = save_adapter(model, folder / f"ad{i:02d}")
    return out


async def drive(url: str, jobs: list[dict], clients: int, bar: tqdm) -> tuple[list[float], int, int]:
    """Send every job with `clients` concurrent workers; latencies (s), completion tokens, errors."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    latencies, tokens, errors = [], 0, 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            job = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await http.post(url + "/v1/completions", json=job)
                if response.status_code != 200:
                    raise RuntimeError(response.text[:200])
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)
            except Exception as err:  # counted, shown once; the run goes on
                if errors == 0:
                    print(f"first error: {err}", file=sys.stderr)
                errors += 1
            bar.update(1)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return latencies, tokens, errors


def run_mode(mode: str, model, tokenizer, adapters, jobs, args) -> dict:
    multi = MultiLoraModel(model, slots=max(16, len(adapters)), max_rank=args.rank)
    registry = AdapterRegistry(multi)
    for name, path in adapters.items():
        registry.register(name, path)
    engine_mode = "swap" if mode == "swap" else "continuous"
    app = create_app(multi, tokenizer, registry, base_name=BASE, max_batch=args.max_batch, mode=engine_mode)
    server, thread, port = serve_in_background(app)
    try:
        if mode == "base":
            jobs = [{**job, "model": BASE} for job in jobs]
        with tqdm(total=len(jobs), desc=f"{mode:>5}", leave=False) as bar:
            start = time.perf_counter()
            latencies, tokens, errors = asyncio.run(drive(f"http://127.0.0.1:{port}", jobs, args.clients, bar))
            wall = time.perf_counter() - start
        engine = app.state.engine
        steps, widest = engine.steps, engine.max_rows_seen
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        multi.close()
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": latencies[len(latencies) // 2] if latencies else None,
        "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "errors": errors,
        "wall_s": wall,
        "decode_steps": steps,
        "widest_batch": widest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode (default 1000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters (default 16)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    parser.add_argument("--max-batch", type=int, default=32, help="engine batch rows (default 32)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; medians reported (default 1)")
    parser.add_argument("--modes", default="mixed,swap,base", help="comma list of mixed, swap, base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--model", help="'default' (the shipped SST-2 GPT) or a causal-LM folder; default: a random small GPT-2"
    )
    parser.add_argument("--out", help="JSON path (default benchmarks/results/multi_adapter_server-<device>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lorakit import defaults

        defaults.offline()
        path = str(defaults.default_causal_lm_path()) if args.model == "default" else args.model

        def build():
            return AutoModelForCausalLM.from_pretrained(path).eval()

        tokenizer = AutoTokenizer.from_pretrained(path)
        vocab = build().config.vocab_size
    else:
        vocab = 1000
        tokenizer = word_tokenizer(vocab)

        def build():
            return small_gpt(vocab)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rng = random.Random(0)
    names = [f"ad{i:02d}" for i in range(args.adapters)]
    jobs = [
        {
            "model": rng.choice(names),
            "prompt": [rng.randrange(2, vocab) for _ in range(rng.randint(8, 24))],  # token ids
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }
        for _ in range(args.requests)
    ]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(build, args.adapters, args.rank, Path(tmp))
        for repeat in range(args.repeats):
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]  # rotate: no mode always first
            for mode in order:
                model = build().to(args.device)
                result = run_mode(mode, model, tokenizer, adapters, jobs, args)
                results[mode].append(result)
                print(f"{mode:>5} #{repeat}: " + ", ".join(f"{k}={v:.3g}" for k, v in result.items() if v is not None))
    median = {
        m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None} for m, rs in results.items()
    }
    ratios = {}
    for other in ("swap", "base"):
        if "mixed" in median and other in median:
            for key in ("requests_per_s", "tokens_per_s", "p50_latency_s", "p99_latency_s"):
                ratios[f"mixed/{other} {key}"] = median["mixed"][key] / median[other][key]
    report = {
        "benchmark": "multi_adapter_server",
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": args.threads,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "median": median,
        "ratios": ratios,
        "runs": results,
        "note": "server and clients share one process (uvicorn thread + asyncio clients); "
        "CPU figures on a busy shared 2-core box are noisy",
    }
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"multi_adapter_server-{device_kind}.json")
    replace_file(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    print(json.dumps({"median": median, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
