"""TrainConfig: every `lorakit train` flag as a typed field, its validation, and the LoraConfig it implies."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lorakit.core.config import LoraConfig
from lorakit.errors import UsageError

# lorakit's own recipe, used when the user gives no value. LoRA on every linear layer (on
# MiniLM that includes the pooler, which a fresh head sits on) at rank 4 (0.74% of MiniLM's
# parameters train), LoRA dropout 0 so the fused merged-weight path runs, and the model's own
# dropout off (it costs ~40% of a CPU step and gained nothing here). Chosen on SST-2 (20k
# examples, 1 epoch, batch 32, fp32; benchmarks/results/quality_sst2-h100-fp32.json): dev
# accuracy 84.6 / 86.5 / 87.8% at lr 5e-4 / 1e-3 / 2e-3, 86.7% with model dropout 0.1 at 1e-3,
# 87.4% at rank 8 (1.5% of the parameters); full fine-tuning 87.2%.
DEFAULT_RANK = 4
DEFAULT_ALPHA = 8.0
DEFAULT_TARGETS = "all-linear"
DEFAULT_LR = 2e-3
DEFAULT_FULL_LR = 5e-5

# Namespace attributes of the `lorakit` command itself (the subcommand, --config, --version), not settings.
CLI_PLUMBING = frozenset({"command", "config", "func", "version"})


@dataclass
class TrainConfig:
    """Settings of one training run; field names are the `lorakit train` flags (`_` for `-`).

    Attributes:
        train: training data file (JSONL, CSV or TSV).
        out: run folder (adapter/, metrics.jsonl, loss.png, summary.json, checkpoint/).
        model: local Hugging Face model folder; None = the packaged default for the task.
        task: "classify" (labels read from the data) or "causal-lm".
        eval: evaluation data file; or eval_split: a held-out fraction of the training data.
        text_column, label_column, prompt_column, completion_column: data columns.
        max_length: longest tokenized example (longer ones are truncated; None = 256 for classify,
            the model's context length for causal-lm).
        train_on_prompt: chat data: the loss on every token, not only the assistant's turns.
        packing: causal-lm: several short examples per row (lorakit.train.packing).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        loraplus_lr_ratio: LoRA+: lora_B's lr = ratio x lora_A's (lorakit.train.optimizer).
        rank, alpha, dropout, targets, modules_to_save, rslora: the LoRA adapter.
        dora, init, pissa_niter, rank_pattern, alpha_pattern: LoRA variants (DoRA, PiSSA init
            (exact SVD, or randomized with pissa_niter iterations), per-module ranks / alphas).
        full: fine-tune every weight instead (no adapter; the model is saved in full).
        quantize: "nf4" stores the frozen base's linear layers in 4-bit NF4 (QLoRA, lorakit.variants.qlora).
        lr, weight_decay, schedule, warmup: AdamW and its schedule; warmup < 1 is a ratio of
            the steps, >= 1 a number of steps.
        epochs, max_steps: how long (max_steps wins when given); with neither, one epoch, or
            more on small data (batching.auto_epochs).
        batch_size: examples per step on each process; grad_accum: micro-batches per step.
        max_grad_norm: gradient clipping (0 = off).
        precision: "auto" (bf16 autocast on a CUDA GPU with bf16, else fp32), "fp32", "bf16", "fp16".
        model_dropout: the base model's own dropout (None keeps the model's value).
        compile: torch.compile the model.
        eval_every, log_every, checkpoint_every: in optimizer steps (0 = only at the end / never).
        early_stopping: stop after this many evaluations without improvement (0 = never).
        group_by_length: batch examples of similar length (less padding, same examples per epoch).
    """

    train: str | None = None
    out: str | None = None
    model: str | None = None
    task: str = "classify"
    eval: str | None = None
    eval_split: float | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str | None = None
    completion_column: str | None = None
    max_length: int | None = None
    train_on_prompt: bool = False
    packing: bool = False
    gradient_checkpointing: bool = False
    loraplus_lr_ratio: float | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | None = None
    modules_to_save: list[str] | None = None
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    pissa_niter: int | None = None
    rank_pattern: str | dict[str, int] | None = None
    alpha_pattern: str | dict[str, float] | None = None
    full: bool = False
    quantize: str = "none"
    lr: float | None = None
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup: float = 0.06
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    model_dropout: float | None = 0.0
    compile: bool = False
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    early_stopping: int = 0
    group_by_length: bool = True
    resume: bool = False
    overwrite: bool = False
    eval_batch_size: int = 64
    progress: bool = True

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        """A TrainConfig from an argparse Namespace, a mapping, or any object with these attribute
        names; None means "not given" (the field's default). A name that is no setting is a
        UsageError naming the closest setting, never silently dropped: a typo in a key would
        otherwise train with the default without a word."""
        given = dict(args) if isinstance(args, Mapping) else vars(args)
        known = [f.name for f in fields(cls)]
        unknown = [k for k in given if k not in known and k not in CLI_PLUMBING]
        if unknown:
            raise UsageError("; ".join(_unknown_setting(k, known) for k in unknown))
        return cls(**{k: v for k, v in given.items() if k in known and v is not None})

    def validate(self) -> None:
        """Raise one UsageError listing every bad setting."""
        problems = [problem for check in _CHECKS for problem in check(self)]
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def learning_rate(self) -> float:
        """The given lr, or the recipe's default for LoRA / full fine-tuning."""
        return self.lr if self.lr is not None else DEFAULT_FULL_LR if self.full else DEFAULT_LR


def _unknown_setting(name: str, known: list[str]) -> str:
    """One problem line for a name that is no TrainConfig setting, with the closest one."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown setting {name!r}{hint}"


# --- validation: one small check per concern, each a list of problem lines -------------------
def _one_of(flag: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    """[] when `value` is allowed, else "--flag 'x': use a, b or c"."""
    if value in allowed:
        return []
    return [f"{flag} {value!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}"]


def _check_inputs(c: TrainConfig) -> list[str]:
    """The data, the run folder and the task."""
    problems = []
    if not c.train:
        problems.append("--train is required (a JSONL, CSV or TSV file)")
    if not c.out:
        problems.append("--out is required (the run folder)")
    problems += _one_of("--task", c.task, ("classify", "causal-lm"))
    if c.eval and c.eval_split:
        problems.append("give --eval FILE or --eval-split FRACTION, not both")
    return problems


def _check_counts(c: TrainConfig) -> list[str]:
    """Sizes, intervals and the optimizer's numbers."""
    problems = []
    for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(c, name)}: must be at least 1")
    for name in ("eval_every", "log_every", "checkpoint_every", "early_stopping"):
        if getattr(c, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(c, name)}: must be 0 or more")
    if c.max_steps is not None and c.max_steps < 1:
        problems.append(f"--max-steps {c.max_steps}: must be at least 1")
    if c.epochs is not None and c.epochs <= 0:
        problems.append(f"--epochs {c.epochs}: must be positive")
    if c.lr is not None and c.lr <= 0:
        problems.append(f"--lr {c.lr}: must be positive")
    if c.warmup < 0:
        problems.append(f"--warmup {c.warmup}: a ratio in [0, 1) or a number of steps >= 1")
    return problems


def _check_schedule(c: TrainConfig) -> list[str]:
    """The lr schedule, precision, the model's dropout and early stopping."""
    problems = _one_of("--schedule", c.schedule, ("linear", "cosine", "constant"))
    problems += _one_of("--precision", c.precision, ("auto", "fp32", "bf16", "fp16"))
    if c.model_dropout is not None and not 0.0 <= c.model_dropout < 1.0:
        problems.append(f"--model-dropout {c.model_dropout}: must be in [0, 1)")
    if c.early_stopping and not (c.eval or c.eval_split):
        problems.append("--early-stopping needs evaluation data: add --eval FILE or --eval-split 0.1")
    return problems


def _check_adapter(c: TrainConfig) -> list[str]:
    """The adapter's shape and variants, and which of them go together."""
    problems = _one_of("--quantize", c.quantize, ("none", "nf4"))
    if not problems and c.quantize == "nf4" and c.full:
        problems.append("--quantize nf4 trains LoRA over a frozen 4-bit base: drop --full (or --quantize)")
    for flag, value in (("--rank-pattern", c.rank_pattern), ("--alpha-pattern", c.alpha_pattern)):
        try:
            parse_pattern(value, flag)
        except UsageError as err:
            problems.append(str(err))
    problems += _one_of("--init", c.init, ("kaiming", "gaussian", "pissa"))
    if (c.dora or c.init != "kaiming" or c.rank_pattern or c.alpha_pattern) and c.full:
        problems.append("--dora / --init / --rank-pattern / --alpha-pattern shape a LoRA adapter: drop --full")
    if c.dora and c.quantize == "nf4":
        problems.append("--dora over a 4-bit base is not supported: drop --dora or --quantize nf4")
    return problems


def _check_causal_lm(c: TrainConfig) -> list[str]:
    """Flags that only a causal LM (or only a LoRA adapter) uses."""
    problems = []
    if c.task != "causal-lm":
        problems += [
            f"{flag} is for --task causal-lm"
            for flag, on in (("--packing", c.packing), ("--train-on-prompt", c.train_on_prompt))
            if on
        ]
    if c.loraplus_lr_ratio is not None:
        if c.full:
            problems.append("--loraplus-lr-ratio sets LoRA's B matrices' lr: drop --full")
        elif c.loraplus_lr_ratio <= 0:
            problems.append(f"--loraplus-lr-ratio {c.loraplus_lr_ratio}: must be positive (the paper uses 16)")
    return problems


def _check_run_mode(c: TrainConfig) -> list[str]:
    """--resume and --overwrite."""
    if c.resume and c.overwrite:
        return ["--resume continues a run and --overwrite deletes it: give one"]
    return []


# In this order, so a config with several problems lists them as it always has.
_CHECKS = (_check_inputs, _check_counts, _check_schedule, _check_adapter, _check_causal_lm, _check_run_mode)


def lora_config_from_args(args: Any, head: list[str] | None = None) -> LoraConfig:
    """The LoraConfig a run trains, from a TrainConfig or argparse Namespace (the ONE place
    flags become a LoraConfig; new adapter flags extend it here). `head` names modules
    trained in full and saved with the adapter (a classifier)."""
    targets = getattr(args, "targets", None) or DEFAULT_TARGETS
    if isinstance(targets, str) and targets != "all-linear" and ("," in targets or _plain_name(targets)):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    saved = list(getattr(args, "modules_to_save", None) or [])
    for name in head or []:
        if name not in saved:
            saved.append(name)
    rank = getattr(args, "rank", None) or DEFAULT_RANK
    alpha = getattr(args, "alpha", None)
    return LoraConfig(
        r=rank,
        alpha=alpha if alpha is not None else (DEFAULT_ALPHA if rank == DEFAULT_RANK else 2.0 * rank),
        dropout=getattr(args, "dropout", 0.0) or 0.0,
        target_modules=targets,
        modules_to_save=saved or None,
        use_rslora=bool(getattr(args, "rslora", False)),
        use_dora=bool(getattr(args, "dora", False)),
        init=_init_mode(getattr(args, "init", None), getattr(args, "pissa_niter", None)),
        rank_pattern=parse_pattern(getattr(args, "rank_pattern", None), "--rank-pattern"),
        alpha_pattern=parse_pattern(getattr(args, "alpha_pattern", None), "--alpha-pattern"),
    )


def _init_mode(init: str | None, niter: int | None) -> str:
    """LoraConfig.init from --init and --pissa-niter (which implies --init pissa)."""
    if niter is None:
        return init or "kaiming"
    if init not in (None, "pissa"):
        raise UsageError(f"--pissa-niter {niter} goes with --init pissa, not --init {init}")
    if niter < 1:
        raise UsageError(f"--pissa-niter {niter}: must be at least 1 (or leave it out for the exact SVD)")
    return f"pissa_niter_{niter}"


def parse_pattern(text: str | dict | None, flag: str = "--rank-pattern") -> dict[str, float]:
    """'query=16,value=4' -> {'query': 16, 'value': 4} (--rank-pattern / --alpha-pattern); a dict
    passes through."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    pattern = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip() or number is None:
            raise UsageError(f"{flag} {text!r}: {item!r} is not NAME=NUMBER; write e.g. query=16,value=4")
        pattern[key.strip()] = int(number) if number.is_integer() else number
    return pattern


def _plain_name(targets: str) -> bool:
    """A single module name like "query" (a suffix), as opposed to a regex or "all-linear"."""
    return targets != "all-linear" and targets.replace("_", "").replace(".", "").isalnum()
