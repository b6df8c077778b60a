"""Checkpoints: everything a killed run needs to continue exactly, written atomically, no pickle.

`DIR/checkpoint/` holds three files, written as one folder (atomic.replace_folder):

  tensors.safetensors  the trainable tensors, the optimizer's state tensors and the RNG states
                       of torch / CUDA / numpy (as uint8 tensors)
  state.json           the step (the data position: batch plans are a pure function of seed and
                       epoch), the optimizer's param groups, scheduler and grad scaler states,
                       python's RNG state and the run's figures ("book": stats.RunStats.to_book)
  manifest.json        the format version, the step and the sha256 of the two files above

Loading checks every checksum before reading anything, so a flipped byte, a torn or foreign
file is refused with one line. Nothing is unpickled: a pickle `state.pt` of an older lorakit is
refused too (a pickle can run code when loaded).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.errors import UsageError
from lorakit.files.atomic import recover_folder, replace_folder

CHECKPOINT_DIR = "checkpoint"
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
JSON_FILE = "state.json"
LEGACY_FILE = "state.pt"  # lorakit <= 0.x: a pickle, never loaded
FORMAT = 2


def rng_state() -> dict[str, Any]:
    """The RNG states a training step draws from (dropout, shuffles)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (LoRA A/B, saved heads, or all with full fine-tuning)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- flattening: tensors to safetensors, the rest to JSON -------------------------------------
def _split_rng(rng: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors["rng.torch"] = rng["torch"].clone()
    for i, cuda in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = cuda.cpu().clone()
    version, internal, gauss = rng["python"]
    meta: dict[str, Any] = {"python": [version, list(internal), gauss], "cuda": len(rng.get("cuda", []))}
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        tensors["rng.numpy"] = torch.frombuffer(bytearray(keys.astype("<u4").tobytes()), dtype=torch.uint8)
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    return meta


def _join_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    version, internal, gauss = meta["python"]
    rng: dict[str, Any] = {"torch": tensors["rng.torch"], "python": (version, tuple(internal), gauss)}
    if meta.get("cuda"):
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(meta["cuda"])]
    if "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        keys = np.frombuffer(tensors["rng.numpy"].numpy().tobytes(), dtype="<u4").astype(np.uint32)
        rng["numpy"] = (kind, keys, pos, has_gauss, cached)
    return rng


def _split_optimizer(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        plain[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().clone()
            else:
                plain[str(index)][key] = value
    return {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- saving and loading -----------------------------------------------------------------------
def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write `state` (step, trainable, optimizer, scheduler, scaler, rng, book, world, plan) to
    out/checkpoint/ as one folder swapped in atomically: a run killed while writing keeps the
    previous checkpoint whole. A full disk or any other write error is a one-line UsageError."""
    from safetensors.torch import save_file

    tensors = {f"trainable.{k}": v for k, v in state["trainable"].items()}
    rest = {k: v for k, v in state.items() if k not in ("trainable", "optimizer", "rng")}
    rest["optimizer"] = _split_optimizer(state["optimizer"], tensors)
    rest["rng"] = _split_rng(state["rng"], tensors)

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        (tmp / JSON_FILE).write_text(json.dumps(rest, allow_nan=True), encoding="utf-8")
        files = {name: _sha256(tmp / name) for name in (TENSORS_FILE, JSON_FILE)}
        manifest = {"format": FORMAT, "step": state["step"], "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    folder = out / CHECKPOINT_DIR
    try:
        replace_folder(folder, write)
    except OSError as err:
        raise UsageError(
            f"could not write the checkpoint {folder}: {err.strerror or err}; the previous checkpoint is kept "
            "(free some space, then continue with --resume)"
        ) from None
    return folder


def has_checkpoint(out: Path) -> bool:
    """Whether out/ holds a checkpoint (of any format, valid or not) that --resume would read."""
    folder = out / CHECKPOINT_DIR
    return (folder / MANIFEST_FILE).is_file() or (folder / LEGACY_FILE).is_file()


def _verified_manifest(folder: Path) -> dict[str, Any]:
    damaged = f"--resume: the checkpoint {folder} is damaged"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != {TENSORS_FILE, JSON_FILE}:
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{damaged} (unreadable {MANIFEST_FILE}); start the run again with --overwrite") from None
    for name, digest in files.items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise UsageError(f"{damaged} ({name} fails its sha256 check); start the run again with --overwrite")
    return manifest


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The state saved by save_checkpoint, after checking its checksums; UsageError when there is
    none, it is damaged, or it is an old pickle checkpoint (never unpickled)."""
    from safetensors.torch import load_file

    folder = out / CHECKPOINT_DIR
    recover_folder(folder)
    if not (folder / MANIFEST_FILE).is_file():
        if (folder / LEGACY_FILE).is_file():
            raise UsageError(
                f"--resume: {folder / LEGACY_FILE} is an old pickle checkpoint, which lorakit no longer loads "
                "(unpickling can run code); restart the run with --overwrite"
            )
        raise UsageError(f"--resume: {out} has no checkpoint ({folder}); train with --checkpoint-every N first")
    _verified_manifest(folder)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
        state = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
        missing = [k for k in ("step", "optimizer", "scheduler", "rng", "book", "plan") if k not in state]
        if missing:
            raise KeyError(f"no {missing[0]!r}")
        state["trainable"] = {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
        state["optimizer"] = _join_optimizer(state["optimizer"], tensors)
        state["rng"] = _join_rng(state["rng"], tensors)
    except Exception as err:  # checksums matched, yet not our layout: a foreign or hand-made folder
        raise UsageError(f"--resume: the checkpoint {folder} cannot be read ({type(err).__name__}: {err})") from None
    return state


def check_step(state: dict[str, Any], total_steps: int, out: Path) -> int:
    """The checkpoint's step, refused unless 1 <= step < total_steps (a later step has nothing left to do)."""
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 < step < total_steps:
        raise UsageError(
            f"--resume: the checkpoint in {out} is at step {step!r}, outside this run's schedule of {total_steps} "
            "steps; resume with the same flags, or start again with --overwrite"
        )
    return step


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed tensors back into the model's trainable parameters."""
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(
            f"--resume: the checkpoint does not fit this model (no parameter {missing[0]}); "
            "resume with the same --model and adapter flags"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
