"""The training loop: AdamW with warm-up and decay, accumulation, DDP, eval, best adapter, checkpoints.

Losses are sums over examples (or predicted tokens) divided by the whole optimizer step's
count, known in advance from the batch plan. So gradient accumulation, any number of DDP
processes and a resumed run all compute the same step as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

import lorakit
from lorakit.core.config import LoraConfig
from lorakit.errors import UsageError
from lorakit.files.atomic import recover_folder, replace_folder
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.batching import StepPlan, collate, pad_id_of, shard
from lorakit.train.chat import write_template
from lorakit.train.config import TrainConfig, lora_config_from_args
from lorakit.train.evaluate import evaluate, forward_logits, loss_sum
from lorakit.train.metrics import BEST_METRIC
from lorakit.train.model import (
    default_max_length,
    enable_gradient_checkpointing,
    head_names,
    load_model,
    load_tokenizer,
    max_tokens,
    model_path,
    write_card,
)
from lorakit.train.optimizer import Optimization
from lorakit.train.packing import PackedRow, check_packing, collate_packed, pack
from lorakit.train.prepare import build_datasets, check_out_dir, resolve_precision
from lorakit.train.report import (
    SUMMARY_FILE,
    MetricsLog,
    folder_bytes,
    peak_memory,
    plot_losses,
    read_records,
    write_json,
)
from lorakit.train.stats import RunStats


@dataclass
class _Run:
    """What one call of Trainer.run() works with, handed to each stage of a step."""

    wrapped: nn.Module  # the model as steps call it (compiled, DDP)
    opt: Optimization
    stats: RunStats
    log: MetricsLog | None  # metrics.jsonl, on the main process only
    bar: tqdm
    last_eval: dict[str, Any] | None = None  # the latest evaluation (the summary's "final_eval")


class Trainer:
    """One training run of TrainConfig `config`; `run()` returns the summary dict.

    The stages of a run, each a method: set-up (__init__), the plan (StepPlan), a fresh start
    or `_resume`, then per step `_train_step`, `_maybe_evaluate`, `_maybe_log`,
    `_maybe_checkpoint`, and at the end `_finish`."""

    def __init__(self, config: TrainConfig, on_step: Callable[[int], None] | None = None) -> None:
        """`on_step(step)` (Python API only) is called after each optimizer step, its log line and
        checkpoint: tests use it to stop or kill a run at a known point."""
        config.validate()
        self.config = config
        self.on_step = on_step
        self.out = Path(config.out)
        self.dist = distributed.setup()
        self._check_out_dir()
        self.base = model_path(config.model, config.task)
        self.tokenizer = load_tokenizer(self.base)
        self.pad = pad_id_of(self.tokenizer)
        config.max_length = max_tokens(self.base, self.tokenizer, config.max_length or default_max_length(config.task))
        self.train_data, self.eval_data = build_datasets(config, self.tokenizer)
        self.chat_template = getattr(self.train_data, "chat_template", None)
        self.labels = getattr(self.train_data, "labels", None)
        self.autocast = self._precision()
        torch.manual_seed(config.seed)  # the fresh head and the LoRA A matrices
        random.seed(config.seed)
        self.model, self.lora = self._build_model()
        self.model.to(self.dist.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.dist.rank:  # different dropout masks per process, same initial weights
            torch.manual_seed(config.seed + 7919 * self.dist.rank)
        # What a step's batches are made of: examples, or with --packing rows of several examples.
        self.rows = self._packed_rows() if config.packing else self.train_data.examples
        self.plan = StepPlan.of(config, [len(r.input_ids) for r in self.rows], self.dist.world)
        self.weights = [r.weight for r in self.rows]  # loss terms per example / row
        note = self.plan.length_note()
        if note and self.dist.main:
            print(note, file=sys.stderr)

    # --- set-up -------------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        if self.dist.main:  # a crash inside an earlier run's folder swap: put the old folder back
            for name in ("adapter", "model", ckpt.CHECKPOINT_DIR):
                recover_folder(self.out / name)
        check_out_dir(self.out, self.config.resume, self.config.overwrite)

    def _precision(self) -> torch.dtype | None:
        autocast = resolve_precision(self.config.precision, self.dist.device)
        if autocast is torch.bfloat16 and self.dist.device.type == "cpu":
            print("lorakit train: bf16 on this CPU is emulated and much slower than fp32", file=sys.stderr)
        return autocast

    def _build_model(self) -> tuple[nn.Module, LoraConfig | None]:
        """The model to train and its LoraConfig (None with --full: every weight trains)."""
        c = self.config
        model = load_model(self.base, c.task, self.labels, c.model_dropout)
        if c.full:
            model.requires_grad_(True)
            return model, None
        heads = head_names(model) if c.task == "classify" else []
        lora = lora_config_from_args(c, head=heads)
        if c.quantize == "nf4":  # QLoRA: every linear layer but heads / saved modules in 4 bits
            from lorakit.variants.qlora import quantize_model

            quantize_model(model, keep=lora.modules_to_save)
        lorakit.inject(model, lora)
        return model, lora

    def _packed_rows(self) -> list[PackedRow]:
        """--packing: the training examples first-fit into rows of --max-length tokens."""
        check_packing(self.model)
        return pack(self.train_data.examples, self.config.max_length)

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of these rows (examples, or packed rows with positions and a block mask)."""
        rows = [self.rows[i] for i in indices]
        if self.config.packing:
            return collate_packed(rows, self.pad, self.dist.device)
        return collate(rows, self.pad, self.dist.device)

    def _wrapped(self) -> nn.Module:
        """The model as the steps call it: compiled (--compile), in DDP with several processes."""
        d, wrapped = self.dist, self.model
        if self.config.compile:
            wrapped = torch.compile(wrapped, dynamic=True)
        if d.world > 1:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    # --- saving ------------------------------------------------------------------------------
    def _save_output(self) -> None:
        if not self.dist.main:
            return
        try:
            self._write_output()
        except OSError as err:
            name = "model" if self.lora is None else "adapter"
            raise UsageError(
                f"could not write {self.out / name}: {err.strerror or err}; the previous one is kept "
                "(free some space, then train again)"
            ) from None

    def _write_output(self) -> None:
        if self.lora is None:  # the previous best stays whole until the new one is in place

            def write(tmp: Path) -> None:
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                if self.chat_template is not None:
                    write_template(tmp, self.chat_template)

            replace_folder(self.out / "model", write)
            return
        if self.lora.init.startswith("pissa"):  # a plain LoRA for the ORIGINAL base, not the residual
            from lorakit.variants.pissa_convert import save_pissa_as_lora

            folder = save_pissa_as_lora(self.model, self.out / "adapter")
        else:
            folder = lorakit.save_adapter(self.model, self.out / "adapter")
        if self.chat_template is not None:  # a server formats prompts exactly as training did
            write_template(folder, self.chat_template)
        c = self.config  # the card records the columns, so eval / predict need none of them again
        columns = {"text_column": c.text_column, "prompt_column": c.prompt_column}
        columns["completion_column"] = c.completion_column
        if c.task == "classify":
            columns["label_column"] = c.label_column
        write_card(folder, c.task, self.labels, str(self.base), **columns)

    # --- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, step: int, opt: Optimization, stats: RunStats) -> None:
        if not self.dist.main:
            return
        state = {
            "step": step,
            "trainable": ckpt.trainable_state(self.model),
            **opt.state(),
            "rng": ckpt.rng_state(),
            "book": stats.to_book(),
            "world": self.dist.world,
            "plan": self._plan_key(),
        }
        ckpt.save_checkpoint(self.out, state)

    def _plan_key(self) -> dict[str, Any]:
        """What fixes the data order and the schedule: a resumed run must match it exactly."""
        c = self.config
        keys = ("batch_size", "grad_accum", "seed", "group_by_length", "lr", "schedule", "warmup", "max_length")
        plan = self.plan
        return {**{k: getattr(c, k) for k in keys}, "total_steps": plan.total_steps, "examples": len(plan.lengths)}

    def _resume(self, opt: Optimization) -> tuple[int, RunStats]:
        """Load the checkpoint into the model, optimizer, scheduler, scaler and RNGs; its step and stats."""
        state = ckpt.load_checkpoint(self.out)
        self._check_same_run(state)
        start = ckpt.check_step(state, self.plan.total_steps, self.out)
        try:
            ckpt.restore_trainable(self.model, state["trainable"])
            opt.load(state)
            ckpt.set_rng_state(state["rng"])
            stats = RunStats.from_book(state["book"])
        except UsageError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            raise UsageError(
                f"--resume: the checkpoint in {self.out} does not fit this run ({type(err).__name__}: {err}); "
                "resume with the same flags, or start again with --overwrite"
            ) from None
        return start, stats

    def _check_same_run(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another number of processes or another plan."""
        if state.get("world", 1) != self.dist.world:
            raise UsageError(
                f"--resume: the checkpoint was made by {state.get('world')} processes; resume with as many"
            )
        old, plan = state.get("plan", {}), self._plan_key()
        changed = [f"{k} {old[k]!r} -> {plan[k]!r}" for k in plan if k in old and old[k] != plan[k]]
        if changed:
            raise UsageError(
                f"--resume: the run was started with other settings ({'; '.join(changed)}); "
                "resume with the same flags and data, or start a new run"
            )

    def _start_fresh(self) -> None:
        """With --overwrite the old outputs stay until this run's replace them (see _finish)."""
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "train_config.json", asdict(self.config))

    # --- one optimizer step ------------------------------------------------------------------
    def _accumulate(self, run: _Run, micro: list[list[int]], total_weight: float) -> Any:
        """Forward and backward every micro-batch of one optimizer step; this process's summed loss."""
        d = self.dist
        local_loss: Any = 0.0
        for j, batch_ids in enumerate(micro):
            local, scale = shard(batch_ids, d.rank, d.world), 1.0
            if not local:  # a short last batch: join DDP's all-reduce with a zero contribution
                local, scale = batch_ids[:1], 0.0
            batch = self._collate(local)
            sync = d.world == 1 or j == len(micro) - 1
            with contextlib.nullcontext() if sync else run.wrapped.no_sync():
                with torch.autocast(d.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    logits = forward_logits(run.wrapped, batch)
                summed = loss_sum(logits, batch["labels"]) * scale
                loss = summed * (d.world / total_weight)
                run.opt.scale(loss).backward()
            local_loss += summed.detach().double()  # no device sync per micro-batch; read once by the caller
        return local_loss

    def _train_step(self, run: _Run, step: int) -> float:
        """Optimizer step `step`: forward, backward, update; counted in run.stats. Its lr."""
        tick = time.perf_counter()
        micro = self.plan.micro_batches(step)
        total_weight = sum(self.weights[i] for batch in micro for i in batch)
        local_loss = self._accumulate(run, micro, total_weight)
        lr = run.opt.step()
        (step_loss,) = self.dist.all_sum([float(local_loss)])
        if not math.isfinite(step_loss):  # every later step would be garbage: stop with advice
            raise UsageError(
                f"the training loss became {step_loss} at step {step}: lower --lr, keep --max-grad-norm on, "
                "or use --precision fp32"
            )
        run.stats.add_step(step_loss, total_weight, sum(len(b) for b in micro), time.perf_counter() - tick)
        return lr

    def _maybe_evaluate(self, run: _Run, step: int) -> tuple[dict[str, Any] | None, bool]:
        """Evaluate when due (every --eval-every steps and at the end), save a new best adapter;
        (this step's evaluation or None, whether early stopping ends the run)."""
        c = self.config
        due = step == self.plan.total_steps or (c.eval_every and step % c.eval_every == 0)
        if self.eval_data is None or not due:
            return None, False
        result = evaluate(
            self.model,
            self.tokenizer,
            self.eval_data,
            batch_size=c.eval_batch_size,
            device=self.dist.device,
            autocast_dtype=self.autocast,
        )
        run.last_eval = result
        metric, higher = BEST_METRIC[c.task]
        if run.stats.record_eval(step, result, result[metric], higher):
            self._save_output()
        return result, bool(c.early_stopping) and run.stats.bad_evals >= c.early_stopping

    def _maybe_log(self, run: _Run, step: int, lr: float, evaluated: dict[str, Any] | None, stop: bool) -> None:
        """A metrics.jsonl line every --log-every steps, after an evaluation and at the end."""
        last = step == self.plan.total_steps or stop
        if evaluated is None and step % max(self.config.log_every, 1) and not last:
            return
        loss, speed = run.stats.window()
        record = {
            "step": step,
            "epoch": round(step / self.plan.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "examples_per_s": speed,
        }
        if evaluated is not None:
            record.update({f"eval_{k}": v for k, v in evaluated.items()})
        if run.log is not None:
            run.log.write(record)
        run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{speed:.0f}")
        run.stats.reset_window()

    def _maybe_checkpoint(self, run: _Run, step: int, stop: bool) -> None:
        """A checkpoint every --checkpoint-every steps, unless the run ends at this step."""
        every = self.config.checkpoint_every
        if every and step % every == 0 and step < self.plan.total_steps and not stop:
            self._checkpoint(step, run.opt, run.stats)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train, evaluate, save; returns the summary (also written to DIR/summary.json)."""
        try:
            return self._run()
        finally:
            distributed.teardown(self.dist)

    def _run(self) -> dict[str, Any]:
        c, d = self.config, self.dist
        opt = Optimization.create(self.model, c, self.plan, self.autocast)
        start, stats = 0, RunStats()
        if c.resume:
            start, stats = self._resume(opt)
        else:
            self._start_fresh()
        d.barrier()
        log = MetricsLog(self.out / "metrics.jsonl", keep_until_step=start) if d.main else None
        total = self.plan.total_steps
        bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not (d.main and c.progress))
        run = _Run(self._wrapped(), opt, stats, log, bar)
        began = time.perf_counter()
        self.model.train()
        step = self._steps(run, start)
        bar.close()
        if self.eval_data is None:
            self._save_output()
        return self._finish(step, stats, run.last_eval, time.perf_counter() - began)

    def _steps(self, run: _Run, start: int) -> int:
        """Steps start+1 ... total (or until early stopping); the last step taken."""
        step = start
        for step in range(start + 1, self.plan.total_steps + 1):
            lr = self._train_step(run, step)
            evaluated, stop = self._maybe_evaluate(run, step)
            self._maybe_log(run, step, lr, evaluated, stop)
            run.bar.update(1)
            self._maybe_checkpoint(run, step, stop)
            if self.on_step is not None:
                self.on_step(step)
            if stop:
                break
        return step

    def _finish(self, step: int, stats: RunStats, last_eval: dict | None, wall: float) -> dict[str, Any]:
        report = lorakit.parameter_report(self.model)
        output = self.out / ("model" if self.lora is None else "adapter")
        summary: dict[str, Any] = {
            "task": self.config.task,
            "model": str(self.base),
            "steps": step,
            "total_steps": self.plan.total_steps,
            "world_size": self.dist.world,
            "train_examples": len(self.train_data),
            "examples_seen": stats.examples,
            "wall_time_s": wall,
            "train_time_s": stats.train_time,
            "examples_per_s": stats.examples / max(stats.train_time, 1e-9),
            "trainable_params": report["trainable"],
            "total_params": report["total"],
            "trainable_percent": report["percent"],
            "adapter_bytes": folder_bytes(output),
            "output": str(output),
            "precision": str(self.autocast or "fp32").replace("torch.", ""),
            "device": str(self.dist.device),
            "final_eval": last_eval,
            "best_eval": stats.best_eval,
            "best_step": stats.best_step,
            "max_length": self.config.max_length,
            "truncated_examples": getattr(self.train_data, "truncated", 0),
            "packed_rows": len(self.rows) if self.config.packing else None,
            "auto_epochs": self.plan.epochs,
            **peak_memory(),
        }
        if self.dist.main:
            plot_losses(read_records(self.out / "metrics.jsonl"), self.out / "loss.png")
            write_json(self.out / SUMMARY_FILE, summary)
            shutil.rmtree(self.out / ckpt.CHECKPOINT_DIR, ignore_errors=True)
            stale = self.out / ("adapter" if self.lora is None else "model")  # an --overwrite'n run's other kind
            shutil.rmtree(stale, ignore_errors=True)
        return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Run `config` (see TrainConfig) and return the summary written to DIR/summary.json."""
    if not isinstance(config, TrainConfig):
        raise TypeError("train() takes a lorakit.train.TrainConfig")
    return Trainer(config).run()
