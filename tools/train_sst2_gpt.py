"""Build lorakit's shipped causal-LM default: a byte-level BPE tokenizer and a small GPT-2 trained on SST-2 text.

    python tools/train_sst2_gpt.py tokenizer            # ~10 s on one core
    python tools/train_sst2_gpt.py model                # ~40 s on an H100; CPU works but takes hours on one core

Both write into src/lorakit/models/sst2-gpt/ (override with --out). The model step reads the tokenizer
from that folder, trains from scratch on the SST-2 train sentences (each one as `<bos> text <eos>`),
keeps the epoch with the lowest held-out perplexity on dev.tsv, and saves a folder that
`transformers.AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer` load offline.
The adapter script (tools/train_sst2_adapters.py) imports the data helpers below.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "lorakit" / "models" / "sst2-gpt"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
EOT = "<|endoftext|>"
MAX_LEN = 128


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """Rows of an SST-2 file (`sentence<TAB>label` with a header) as (text, label), text stripped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            if text.strip():
                rows.append((text.strip(), int(label)))
    return rows


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE over `texts` wrapped as a PreTrainedTokenizerFast that prepends `<|endoftext|>`.

    The prepended token gives every sentence the same start the model was trained with, so
    `tokenizer(prompt)` is directly usable for generation and perplexity; eos is the same token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eot = tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=MAX_LEN,
        padding_side="right",
    )


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as `<bos> text <eos>`, cut to the model's MAX_LEN positions."""
    ids = tokenizer(texts)["input_ids"]
    return [(row + [tokenizer.eos_token_id])[:MAX_LEN] for row in ids]


def batches(
    seqs: list[list[int]], max_tokens: int, pad_id: int, shuffle: bool, rng: random.Random | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of similar-length sequences (about `max_tokens` padded tokens each).

    Labels are -100 on padding; attention masks mark the real tokens. Sorting by length keeps padding
    small (SST-2 phrases run from 3 to ~70 tokens); shuffling the batch order keeps training stochastic.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    if shuffle:  # shuffle within length buckets, then the batches themselves
        order = sorted(order, key=lambda i: (len(seqs[i]) // 4, rng.random()))
    groups, current, longest = [], [], 0
    for i in order:
        longest_next = max(longest, len(seqs[i]))
        if current and longest_next * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest_next = [], len(seqs[i])
        current.append(i)
        longest = longest_next
    if current:
        groups.append(current)
    if shuffle:
        rng.shuffle(groups)
    for group in groups:
        width = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def perplexity(model, seqs: list[list[int]], pad_id: int, device: str = "cpu", max_tokens: int = 8192) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of `seqs` (eos included)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(seqs, max_tokens, pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


def pick_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_tokenizer(args: argparse.Namespace) -> None:
    """Train the tokenizer on train.tsv's text and save it into args.out."""
    texts = [t for t, _ in read_tsv(Path(args.data) / "train.tsv")]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name; the alias every version knows keeps the folder portable
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    lengths = [len(s) for s in encode(tokenizer, texts)]
    print(f"vocab {len(tokenizer)}; {sum(lengths)} training tokens, mean {sum(lengths) / len(lengths):.1f} per row")


def build_model(args: argparse.Namespace) -> None:
    """Train the GPT-2 from scratch, keep the best epoch on dev perplexity, save it with a report."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = pick_device(args.device)
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = Path(args.data)
    train = encode(tokenizer, [t for t, _ in read_tsv(data / "train.tsv")][: args.max_rows])
    dev = encode(tokenizer, [t for t, _ in read_tsv(data / "dev.tsv")])
    pad = tokenizer.pad_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MAX_LEN,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        dtype="float32",
    )
    model = GPT2LMHeadModel(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = sum(1 for _ in batches(train, args.batch_tokens, pad, shuffle=False))
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 50)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on biases, norms and embeddings
        (decay if p.ndim == 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history, best, best_state = [], float("inf"), None
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"training {n_params / 1e6:.1f}M-param GPT on {device}", unit="step")
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses = []
        for batch in batches(train, args.batch_tokens, pad, shuffle=True, rng=rng):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
        dev_ppl = perplexity(model, dev, pad, device)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev_ppl": dev_ppl})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", dev_ppl=f"{dev_ppl:.2f}")
        if dev_ppl < best:
            best = dev_ppl
            best_state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    bar.close()
    seconds = time.perf_counter() - started
    model = GPT2LMHeadModel(config)
    model.load_state_dict(best_state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=pad,
        max_new_tokens=40,
    )
    model.save_pretrained(out)
    report = {
        "parameters": n_params,
        "config": {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")},
        "train_rows": len(train),
        "train_tokens": sum(len(s) for s in train),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "epochs": args.epochs,
        "best_epoch": min(history, key=lambda h: h["dev_ppl"])["epoch"],
        "dev_ppl": best,
        "seconds": round(seconds, 1),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "out", "data", "report")},
        "history": history,
    }
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    p.add_argument("--vocab-size", type=int, default=6144)
    p.set_defaults(func=build_tokenizer)
    p = sub.add_parser("model", help="train the GPT-2 from scratch (needs the tokenizer)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows", type=int, default=None, help="train on the first N rows only (smoke runs)")
    p.add_argument("--report", default=None, help="write the training report (JSON) here")
    p.set_defaults(func=build_model)
    for p in sub.choices.values():
        p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with SST-2 train.tsv and dev.tsv")
        p.add_argument("--out", default=str(DEFAULT_OUT), help="the model folder")
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
