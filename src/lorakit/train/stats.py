"""RunStats: a training run's running figures (best eval, patience, examples, time, the log window).

A checkpoint carries them as its state.json "book" (RunStats.to_book / from_book, the same keys
lorakit has always written), so a resumed run logs and picks its best adapter exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunStats:
    """Figures that change every step; the field order is the order of the checkpoint's "book"."""

    best: float | None = None  # the best value of the task's metric so far (metrics.BEST_METRIC)
    best_step: int | None = None  # the step whose adapter is in DIR/adapter
    bad_evals: int = 0  # evaluations since the best one (for --early-stopping)
    train_time: float = 0.0  # seconds inside optimizer steps (no evaluation, no saving)
    win_loss: float = 0.0  # summed loss since the last metrics.jsonl line ...
    win_weight: int = 0  # ... over this many examples (classify) or predicted tokens (causal-lm)
    win_examples: int = 0  # examples since the last line
    win_time: float = 0.0  # step seconds since the last line
    examples: int = 0  # examples trained on, over all processes
    best_eval: dict[str, Any] | None = None  # every metric of the best evaluation

    def add_step(self, loss: float, weight: int, examples: int, seconds: float) -> None:
        """Count one optimizer step: its summed `loss` over `weight`, `examples`, `seconds`."""
        self.win_loss += loss
        self.win_weight += weight
        self.win_examples += examples
        self.win_time += seconds
        self.examples += examples
        self.train_time += seconds

    def window(self) -> tuple[float, float]:
        """(mean loss, examples per second) since the last metrics.jsonl line."""
        return self.win_loss / max(self.win_weight, 1), self.win_examples / max(self.win_time, 1e-9)

    def reset_window(self) -> None:
        """Start the next metrics.jsonl line's window."""
        self.win_loss, self.win_weight, self.win_examples, self.win_time = 0.0, 0, 0, 0.0

    def record_eval(self, step: int, result: dict[str, Any], value: float, higher_is_better: bool) -> bool:
        """Count an evaluation whose metric is `value`; whether it is the best so far. A tie
        (accuracy on a small eval set moves in steps of 1/n) goes to the lower eval loss; it
        replaces the best adapter but is no improvement for --early-stopping, which watches the
        metric itself (so patience means what it always has)."""
        if self.best is None or _better(value, self.best, higher_is_better):
            self.best, self.best_step, self.bad_evals, self.best_eval = value, step, 0, result
            return True
        self.bad_evals += 1
        if self._wins_tie(value, result):
            self.best_step, self.best_eval = step, result
            return True
        return False

    def _wins_tie(self, value: float, result: dict[str, Any]) -> bool:
        """`value` equals the best, and `result` has a strictly lower "loss" than the best evaluation."""
        best_loss = (self.best_eval or {}).get("loss")
        loss = result.get("loss")
        return value == self.best and loss is not None and best_loss is not None and loss < best_loss

    def to_book(self) -> dict[str, Any]:
        """The checkpoint's "book": every field, "best_eval" only once there is one."""
        book = asdict(self)
        if book["best_eval"] is None:
            del book["best_eval"]
        return book

    @classmethod
    def from_book(cls, book: dict[str, Any]) -> RunStats:
        """The RunStats a checkpoint's "book" holds (missing keys keep their start value)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in book.items() if k in names})


def _better(value: float, best: float, higher_is_better: bool) -> bool:
    return value > best if higher_is_better else value < best
