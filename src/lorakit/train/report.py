"""Run outputs: metrics.jsonl (one line per log step), loss.png, summary.json, and sizes."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import UsageError
from lorakit.files.atomic import replace_file

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends one JSON line per log step; on resume, drops lines after the checkpoint (and a last
    line torn by a kill mid-write)."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        lines = []
        if keep_until_step is not None and path.is_file():
            for record in _parsed_lines(path):
                if record.get("step", 0) <= keep_until_step:
                    lines.append(json.dumps(record))
        write_atomically(path, "".join(line + "\n" for line in lines))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed, so a killed run keeps every finished line)."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far."""
        return read_records(self.path)


def _parsed_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (a run killed mid-write) is dropped,
    a damaged line before it is a UsageError."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines):
                break
            raise UsageError(f"{path} line {number} is damaged; fix or delete that line, then --resume") from None
        records.append(record)
    return records


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] when there is none; a torn last line is dropped)."""
    return _parsed_lines(path) if path.is_file() else []


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and os.replace."""
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, written atomically."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path, eval_key: str = "eval_loss") -> None:
    """loss.png: training loss per log step and, where evaluated, the eval loss."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in worker threads
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r[eval_key]) for r in records if eval_key in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
