"""Continue a prompt with a causal language model, optionally with a LoRA adapter.

Greedy decoding when --temperature is 0 (the default), else sampling with --temperature and
--top-p from a seeded generator, so the same --seed gives the same text. Without --model the
base the adapter was trained on (its card) is used, else the small GPT that lorakit ships
(trained on SST-2 text) when it is installed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from lorakit.commands._common import add_model_arguments

HELP = "generate text from a prompt with a causal LM + adapter (greedy or sampling)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lorakit generate`."""
    add_model_arguments(
        parser,
        model_help="base causal LM folder; default: the adapter's base (its card), else lorakit's small SST-2 GPT",
        adapter_help="adapter folder (PEFT format); optional",
    )
    parser.add_argument("--prompt", action="append", help="the prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add (default: 40)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 0 < p <= 1 (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    """Check the options, load, generate, print."""
    from lorakit.commands._common import CAUSAL_LM, load_adapted
    from lorakit.errors import UsageError
    from lorakit.serve.request import SamplingParams

    problems = []
    if not args.prompt:
        problems.append('give --prompt "..."')
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature} must be 0 (greedy) or positive")
    if not 0.0 < args.top_p <= 1.0:
        problems.append(f"--top-p {args.top_p} must be in (0, 1]")
    if problems:
        raise UsageError("; ".join(problems))
    model, tokenizer, info = load_adapted(args.model, args.adapter, task=CAUSAL_LM, force=args.force)
    if tokenizer is None:
        raise UsageError(f"{info['model']} has no tokenizer files; generate needs the base model's tokenizer")
    sampling = SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    for prompt in args.prompt:
        text = generate(model, tokenizer, prompt, sampling)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
        else:
            print(prompt + text)
    return 0


def generate(model: Any, tokenizer: Any, prompt: str, sampling: Any = None) -> str:
    """The text generated after `prompt` (prompt not included), stopping at the end-of-text token.

    `sampling` is a lorakit.serve.request.SamplingParams (max_tokens new tokens, temperature,
    top_p, seed); the default is 40 greedy tokens."""
    from lorakit import hf
    from lorakit.errors import UsageError
    from lorakit.serve.request import SamplingParams

    sampling = sampling or SamplingParams(max_tokens=40, temperature=0.0)
    max_new_tokens, temperature = sampling.max_tokens, sampling.temperature
    batch = tokenizer(prompt, return_tensors="pt")
    if batch["input_ids"].shape[1] == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise UsageError("the prompt is empty and the tokenizer has no start token; give a non-empty --prompt")
        batch = {"input_ids": torch.tensor([[bos]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    limit = hf.context_length(model.config)
    if limit and batch["input_ids"].shape[1] + max_new_tokens > limit:
        raise UsageError(
            f"prompt ({batch['input_ids'].shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds "
            f"the model's {limit} positions; shorten the prompt or lower --max-new-tokens"
        )
    sample = temperature > 0
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)  # no sampling settings from generation_config
    pad = hf.pad_token_id(tokenizer, model.config)
    torch.manual_seed(sampling.seed or 0)  # transformers samples from the global generator
    with torch.inference_mode():
        out = model.generate(**batch, pad_token_id=pad, **options)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
