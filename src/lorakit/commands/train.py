"""Fine-tune a Hugging Face model with LoRA (or in full) on a JSONL, CSV or TSV file.

  lorakit train --train data.tsv --eval dev.tsv --out runs/sst2
  lorakit train --model ./gpt --task causal-lm --train pairs.jsonl \\
      --prompt-column prompt --completion-column completion --eval-split 0.1 --out runs/pairs
  lorakit train --task causal-lm --train chat.jsonl --out runs/chat   (records with "messages")
  torchrun --nproc_per_node=2 -m lorakit.cli train ...     (DDP: gloo on CPU, nccl on CUDA)

Chat data ("messages" or "conversations" records) is rendered with the model's chat template
(a default one for models without) and trains on the assistant's turns; the template is saved
as adapter/chat_template.jinja.

DIR receives adapter/ (PEFT format; the best one when evaluating), metrics.jsonl, loss.png,
summary.json (truncated_examples: how many --max-length cut); checkpoint/ while running
(--checkpoint-every N, continue with --resume).
With no LoRA flags, lorakit's recipe is used: rank 4 on every linear layer, lr 2e-3,
linear decay with 6% warm-up, the model's own dropout off.
"""

from __future__ import annotations

import argparse
import json

from lorakit.train.config import TrainConfig

HELP = "fine-tune a model with LoRA on a data file; writes adapter/, metrics, loss.png, summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lorakit train` (every one may also be a key in --config)."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="local Hugging Face model folder (default: the packaged model for the task)")
    data.add_argument("--task", choices=["classify", "causal-lm"], help="classify (default) or causal-lm")
    data.add_argument("--train", metavar="FILE", help="training data: .jsonl, .csv or .tsv")
    data.add_argument("--eval", metavar="FILE", help="evaluation data (same format)")
    data.add_argument("--eval-split", type=float, metavar="FRACTION", help="hold out this share of --train instead")
    data.add_argument("--out", metavar="DIR", help="run folder")
    data.add_argument("--text-column", help="text column (default: text, else sentence)")
    data.add_argument("--label-column", help="label column for classify (default: label)")
    data.add_argument("--prompt-column", help="causal-lm: prompt column (no loss on it)")
    data.add_argument("--completion-column", help="causal-lm: completion column (the loss is on it)")
    data.add_argument(
        "--max-length",
        type=int,
        help="truncate examples to this many tokens (default: 256 classify, context causal-lm)",
    )
    data.add_argument(
        "--train-on-prompt",
        action="store_true",
        default=None,
        help="chat data: the loss on every token, not only the assistant's turns",
    )
    data.add_argument(
        "--packing", action="store_true", default=None, help="causal-lm: pack short examples into --max-length rows"
    )
    lora = parser.add_argument_group("adapter")
    lora.add_argument("--rank", type=int, help="LoRA rank r (default 4)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha / r (default 2 * rank)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout (default 0: the fused, faster path)")
    lora.add_argument("--targets", help="module suffixes 'query,value', a regex, or all-linear (default)")
    lora.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="modules trained in full and saved")
    lora.add_argument("--rslora", action="store_true", default=None, help="scale by alpha / sqrt(r)")
    lora.add_argument("--dora", action="store_true", default=None, help="DoRA: weight-decomposed LoRA (linear layers)")
    lora.add_argument(
        "--init", choices=["kaiming", "gaussian", "pissa"], help="A's init (kaiming); pissa: from W0's top-r SVD"
    )
    lora.add_argument("--pissa-niter", type=int, metavar="N", help="--init pissa by randomized SVD, N iterations")
    lora.add_argument("--rank-pattern", metavar="K=R,...", help="per-module ranks, e.g. query=16,value=4")
    lora.add_argument("--alpha-pattern", metavar="K=A,...", help="per-module alphas, e.g. query=32")
    lora.add_argument("--full", action="store_true", default=None, help="full fine-tuning instead of LoRA")
    lora.add_argument(
        "--quantize", choices=["none", "nf4"], help="nf4: the base's linear layers in 4-bit NF4 (QLoRA; bitsandbytes)"
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, help="AdamW peak learning rate (default 2e-3; 5e-5 with --full)")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    opt.add_argument(
        "--loraplus-lr-ratio", type=float, metavar="R", help="LoRA+: B matrices' lr = R x the lr (paper: 16)"
    )
    opt.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="decay after warm-up (linear)")
    opt.add_argument(
        "--warmup", type=float, help="warm-up: a ratio of the steps (< 1) or a number of steps (default 0.06)"
    )
    opt.add_argument(
        "--epochs", type=float, help="passes over the data (default 1; small data: enough for 100 steps, max 20)"
    )
    opt.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, help="examples per step per process (default 32)")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    opt.add_argument("--seed", type=int, help="seed for the head, LoRA init, shuffling, dropout (default 0)")
    opt.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA with bf16, else fp32"
    )
    opt.add_argument(
        "--model-dropout",
        type=float,
        help="the base model's own dropout (default 0: on a CPU it costs ~40%% of a training step; "
        "give 0.1 to keep BERT's usual value)",
    )
    opt.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model (for long runs: compiling takes minutes on a CPU)",
    )
    opt.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in backward: less memory, slower steps",
    )
    opt.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        default=None,
        help="random batches instead of length-grouped ones (more padding)",
    )
    run = parser.add_argument_group("evaluation, logging and checkpoints")
    run.add_argument("--eval-every", type=int, help="evaluate every N steps (default: at the end)")
    run.add_argument("--eval-batch-size", type=int, help="examples per evaluation batch (default 64)")
    run.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="stop after N evals without improvement")
    run.add_argument("--log-every", type=int, help="a metrics.jsonl line every N steps (default 10)")
    run.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (for --resume)")
    run.add_argument(
        "--resume", action="store_true", default=None, help="continue the run in --out from its checkpoint"
    )
    run.add_argument(
        "--overwrite", action="store_true", default=None, help="redo the run in --out (old outputs stay until replaced)"
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train, print the summary's main figures as one JSON line, return 0."""
    from lorakit.train.loop import Trainer

    summary = Trainer(TrainConfig.from_args(args)).run()
    shown = {k: summary[k] for k in ("steps", "wall_time_s", "examples_per_s", "trainable_params", "output")}
    shown["eval"] = summary.get("best_eval") or summary.get("final_eval")
    shown["truncated_examples"] = summary.get("truncated_examples", 0)
    print(json.dumps(shown, default=str))
    return 0
