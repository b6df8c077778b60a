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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

import lorakit
from lorakit.errors import UsageError
from lorakit.files.atomic import recover_folder, replace_folder
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.batching import collate, pad_id_of, plan_epoch, shard
from lorakit.train.config import TrainConfig, lora_config_from_args
from lorakit.train.evaluate import evaluate, forward_logits, loss_sum
from lorakit.train.metrics import BEST_METRIC
from lorakit.train.model import head_names, load_model, load_tokenizer, max_tokens, model_path, write_card
from lorakit.train.prepare import build_datasets, check_out_dir, lr_lambda, resolve_precision
from lorakit.train.report import (
    SUMMARY_FILE,
    MetricsLog,
    folder_bytes,
    peak_memory,
    plot_losses,
    read_records,
    write_json,
)


class Trainer:
    """One training run of TrainConfig `config`; `run()` returns the summary dict."""

    def __init__(self, config: TrainConfig, on_step: Callable[[int], None] | None = None) -> None:
        """`on_step(step)` (Python API only) is called after each optimizer step, its log line and
        checkpoint: tests use it to stop or kill a run at a known point."""
        config.validate()
        self.config = config
        self.on_step = on_step
        self.out = Path(config.out)
        self.dist = distributed.setup()
        if self.dist.main:  # a crash inside an earlier run's folder swap: put the old folder back
            for name in ("adapter", "model", ckpt.CHECKPOINT_DIR):
                recover_folder(self.out / name)
        check_out_dir(self.out, config.resume, config.overwrite)
        self.base = model_path(config.model, config.task)
        self.tokenizer = load_tokenizer(self.base)
        config.max_length = max_tokens(self.base, self.tokenizer, config.max_length)
        self.train_data, self.eval_data = build_datasets(config, self.tokenizer)
        self.labels = getattr(self.train_data, "labels", None)
        self.autocast = resolve_precision(config.precision, self.dist.device)
        if self.autocast is torch.bfloat16 and self.dist.device.type == "cpu":
            print("lorakit train: bf16 on this CPU is emulated and much slower than fp32", file=sys.stderr)
        torch.manual_seed(config.seed)  # the fresh head and the LoRA A matrices
        random.seed(config.seed)
        self.model = load_model(self.base, config.task, self.labels, config.model_dropout)
        if config.full:
            self.model.requires_grad_(True)
            self.lora = None
        else:
            heads = head_names(self.model) if config.task == "classify" else []
            self.lora = lora_config_from_args(config, head=heads)
            if config.quantize == "nf4":  # QLoRA: every linear layer but heads / saved modules in 4 bits
                from lorakit.variants.qlora import quantize_model

                quantize_model(self.model, keep=self.lora.modules_to_save)
            lorakit.inject(self.model, self.lora)
        self.model.to(self.dist.device)
        if self.dist.rank:  # different dropout masks per process, same initial weights
            torch.manual_seed(config.seed + 7919 * self.dist.rank)

    # --- the plan ---------------------------------------------------------------------------
    def _plan(self) -> None:
        c = self.config
        self.global_batch = c.batch_size * self.dist.world  # one micro-batch over all processes
        self.step_size = self.global_batch * c.grad_accum  # examples per optimizer step
        self.lengths = [len(e.input_ids) for e in self.train_data.examples]
        self.steps_per_epoch = math.ceil(len(self.lengths) / self.step_size)
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * self.steps_per_epoch))
        self.warmup_steps = int(c.warmup) if c.warmup >= 1 else round(c.warmup * self.total_steps)
        self._plans: dict[int, list[list[int]]] = {}

    def _micro_batches(self, step: int) -> list[list[int]]:
        """The global micro-batches of optimizer step `step` (1-based) of the endless stream of
        epochs. The step's examples do not depend on how they are split (accumulation,
        processes), so every split computes the same update."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        if epoch not in self._plans:
            c = self.config
            self._plans = {epoch: plan_epoch(self.lengths, self.step_size, c.seed, epoch, c.group_by_length)}
        examples = self._plans[epoch][index]
        gb = self.global_batch
        return [examples[i : i + gb] for i in range(0, len(examples), gb)]

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

            replace_folder(self.out / "model", write)
            return
        if self.lora.init.startswith("pissa"):  # a plain LoRA for the ORIGINAL base, not the residual
            from lorakit.variants.pissa_convert import save_pissa_as_lora

            folder = save_pissa_as_lora(self.model, self.out / "adapter")
        else:
            folder = lorakit.save_adapter(self.model, self.out / "adapter")
        write_card(folder, self.config.task, self.labels, str(self.base))

    def _checkpoint(self, step: int, optimizer, scheduler, scaler, book: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        state = {
            "step": step,
            "trainable": ckpt.trainable_state(self.model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": ckpt.rng_state(),
            "book": book,
            "world": self.dist.world,
            "plan": self._plan_key(),
        }
        ckpt.save_checkpoint(self.out, state)

    def _plan_key(self) -> dict[str, Any]:
        """What fixes the data order and the schedule: a resumed run must match it exactly."""
        c = self.config
        keys = ("batch_size", "grad_accum", "seed", "group_by_length", "lr", "schedule", "warmup", "max_length")
        return {**{k: getattr(c, k) for k in keys}, "total_steps": self.total_steps, "examples": len(self.lengths)}

    def _resume(self, optimizer, scheduler, scaler, book: dict[str, Any]) -> int:
        """Load the checkpoint into the model, optimizer, scheduler, scaler, RNGs and `book`; its step."""
        state = ckpt.load_checkpoint(self.out)
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
        start = ckpt.check_step(state, self.total_steps, self.out)
        try:
            ckpt.restore_trainable(self.model, state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            ckpt.set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            if isinstance(err, UsageError):
                raise
            raise UsageError(
                f"--resume: the checkpoint in {self.out} does not fit this run ({type(err).__name__}: {err}); "
                "resume with the same flags, or start again with --overwrite"
            ) from None
        book.update(state["book"])
        return start

    def _accumulate(self, wrapped: nn.Module, micro: list[list[int]], pad: int, total_weight: float, scaler) -> Any:
        """Forward and backward every micro-batch of one optimizer step; this process's summed loss."""
        d = self.dist
        local_loss: Any = 0.0
        for j, batch_ids in enumerate(micro):
            local, scale = shard(batch_ids, d.rank, d.world), 1.0
            if not local:  # a short last batch: join DDP's all-reduce with a zero contribution
                local, scale = batch_ids[:1], 0.0
            batch = collate([self.train_data.examples[i] for i in local], pad, d.device)
            sync = d.world == 1 or j == len(micro) - 1
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                with torch.autocast(d.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    logits = forward_logits(wrapped, batch)
                summed = loss_sum(logits, batch["labels"]) * scale
                loss = summed * (d.world / total_weight)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            local_loss += summed.detach().double()  # no device sync per micro-batch; read once by the caller
        return local_loss

    def _wrapped(self) -> nn.Module:
        """The model as the steps call it: compiled (--compile), in DDP with several processes."""
        d, wrapped = self.dist, self.model
        if self.config.compile:
            wrapped = torch.compile(wrapped, dynamic=True)
        if d.world > 1:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    def _optimizer_step(self, optimizer, scaler, params: list[nn.Parameter]) -> None:
        """Unscale (fp16), clip and step."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train, evaluate, save; returns the summary (also written to DIR/summary.json)."""
        try:
            return self._run()
        finally:
            distributed.teardown(self.dist)

    def _run(self) -> dict[str, Any]:
        c, d = self.config, self.dist
        self._plan()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(c.schedule, self.warmup_steps, self.total_steps)
        )
        scaler = torch.amp.GradScaler("cuda") if self.autocast is torch.float16 else None
        book: dict[str, Any] = {"best": None, "best_step": None, "bad_evals": 0, "train_time": 0.0}
        book.update({"win_loss": 0.0, "win_weight": 0, "win_examples": 0, "win_time": 0.0, "examples": 0})
        start = 0
        if c.resume:
            start = self._resume(optimizer, scheduler, scaler, book)
        elif d.main:  # with --overwrite the old outputs stay until this run's replace them (see _finish)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "train_config.json", {k: v for k, v in vars(c).items() if k != "extra"})
        d.barrier()
        log = MetricsLog(self.out / "metrics.jsonl", keep_until_step=start) if d.main else None

        wrapped = self._wrapped()
        metric, higher = BEST_METRIC[c.task]
        pad = pad_id_of(self.tokenizer)
        weights = [e.weight for e in self.train_data.examples]
        bar = tqdm(
            total=self.total_steps, initial=start, desc="training", unit="step", disable=not (d.main and c.progress)
        )
        began = time.perf_counter()
        last_eval: dict[str, float] | None = None
        self.model.train()
        step = start
        for step in range(start + 1, self.total_steps + 1):
            tick = time.perf_counter()
            micro = self._micro_batches(step)
            total_weight = sum(weights[i] for batch in micro for i in batch)
            local_loss = self._accumulate(wrapped, micro, pad, total_weight, scaler)
            self._optimizer_step(optimizer, scaler, params)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            (step_loss,) = d.all_sum([float(local_loss)])
            if not math.isfinite(step_loss):  # every later step would be garbage: stop with advice
                raise UsageError(
                    f"the training loss became {step_loss} at step {step}: lower --lr, keep --max-grad-norm on, "
                    "or use --precision fp32"
                )
            n_examples = sum(len(b) for b in micro)
            elapsed = time.perf_counter() - tick
            book["win_loss"] += step_loss
            book["win_weight"] += total_weight
            book["win_examples"] += n_examples
            book["win_time"] += elapsed
            book["examples"] += n_examples
            book["train_time"] += elapsed

            evaluated = self.eval_data is not None and (
                step == self.total_steps or (c.eval_every and step % c.eval_every == 0)
            )
            stop = False
            if evaluated:
                last_eval = evaluate(
                    self.model,
                    self.tokenizer,
                    self.eval_data,
                    batch_size=c.eval_batch_size,
                    device=d.device,
                    autocast_dtype=self.autocast,
                )
                value = last_eval[metric]
                if book["best"] is None or (value > book["best"] if higher else value < book["best"]):
                    book.update(best=value, best_step=step, bad_evals=0, best_eval=last_eval)
                    self._save_output()
                else:
                    book["bad_evals"] += 1
                    stop = bool(c.early_stopping) and book["bad_evals"] >= c.early_stopping
            if evaluated or step % max(c.log_every, 1) == 0 or step == self.total_steps or stop:
                record = {
                    "step": step,
                    "epoch": round(step / self.steps_per_epoch, 4),
                    "loss": book["win_loss"] / max(book["win_weight"], 1),
                    "lr": lr,
                    "examples_per_s": book["win_examples"] / max(book["win_time"], 1e-9),
                }
                if evaluated:
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                if log is not None:
                    log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ex_s=f"{record['examples_per_s']:.0f}")
                book.update(win_loss=0.0, win_weight=0, win_examples=0, win_time=0.0)
            bar.update(1)
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < self.total_steps and not stop:
                self._checkpoint(step, optimizer, scheduler, scaler, book)
            if self.on_step is not None:
                self.on_step(step)
            if stop:
                break
        bar.close()
        if self.eval_data is None:
            self._save_output()
        return self._finish(step, book, last_eval, time.perf_counter() - began)

    def _finish(self, step: int, book: dict[str, Any], last_eval: dict | None, wall: float) -> dict[str, Any]:
        report = lorakit.parameter_report(self.model)
        output = self.out / ("model" if self.lora is None else "adapter")
        summary: dict[str, Any] = {
            "task": self.config.task,
            "model": str(self.base),
            "steps": step,
            "total_steps": self.total_steps,
            "world_size": self.dist.world,
            "train_examples": len(self.train_data),
            "examples_seen": book["examples"],
            "wall_time_s": wall,
            "train_time_s": book["train_time"],
            "examples_per_s": book["examples"] / max(book["train_time"], 1e-9),
            "trainable_params": report["trainable"],
            "total_params": report["total"],
            "trainable_percent": report["percent"],
            "adapter_bytes": folder_bytes(output),
            "output": str(output),
            "precision": str(self.autocast or "fp32").replace("torch.", ""),
            "device": str(self.dist.device),
            "final_eval": last_eval,
            "best_eval": book.get("best_eval"),
            "best_step": book["best_step"],
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
