"""Mixed-adapter batches: many LoRA adapters over one frozen base, one adapter per batch row.

Every hooked linear layer holds its adapters in fixed slots of two stacked tensors,
A (slots + 1, r_max, d_in) and Bt (slots + 1, r_max, d_out) with the scaling folded into Bt
and ranks zero-padded; the last slot stays all zero and serves rows on the base. A forward
hook adds, for the whole batch at once, `x[i] @ A[id_i].T @ Bt[id_i]` with one gather and two
batched matmuls (`functional.add_lora_rows`): no Python loop over adapters and no
merging, so a batch of 32 rows on 32 adapters costs what a batch on one adapter costs.
Per-adapter heads (`modules_to_save`, e.g. BERT's classifier, or the linear layers of a saved
pooler) are stacked and gathered the same way, as differences from the base head added to its
output, so a row's LoRA on the same layer (another adapter's) still adds; rows on the base add
nothing.

Thread safety: loading writes a free slot completely, then publishes the name -> slot
mapping under a lock; `use()` resolves names under that lock and holds a reference on its
slots, so an unloaded or replaced adapter's slot is only reused once no batch reads it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.functional import add_lora_rows
from lorakit.core.inject import find_targets, walk
from lorakit.core.layers import LoraLayer, is_linear
from lorakit.core.layers.linear import linear_dims
from lorakit.files.peft_format import AdapterError, read_adapter
from lorakit.files.plan import LoadPlan, check_fingerprint, is_dora_file, plan_adapter
from lorakit.hf import CLASSIFIER_HEADS


class UnknownAdapterError(AdapterError):
    """A request names an adapter that is not loaded (or registered)."""


class NoFreeSlotError(AdapterError):
    """Every adapter slot is taken (by pinned adapters or running batches)."""


@dataclass
class AdapterPlan:
    """A validated adapter folder, ready to be written into a slot (nothing in the model changed)."""

    path: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # name -> A, B, scale
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # head name -> {param: tensor}


class _Target:
    """Stacked adapters of one hooked linear layer (buffers on the module, so `.to()` moves them)."""

    def __init__(self, name: str, module: nn.Module, slots: int, max_rank: int) -> None:
        self.name, self.module = name, module
        self.d_in, self.d_out = linear_dims(module)
        self.rank = 0  # the largest rank resident here: the matmuls use only A[:, :rank]
        self.cache: tuple | None = None  # (key, A rows, Bt rows) of the last batch seen
        weight = module.weight
        # A 4-bit base stores packed uint8 codes: the adapters use the dtype it computes in.
        dtype = weight.dtype if weight.is_floating_point() else getattr(module, "compute_dtype", None) or torch.float32
        for buffer, d in (("lorakit_multi_A", self.d_in), ("lorakit_multi_Bt", self.d_out)):
            zeros = torch.zeros(slots + 1, max_rank, d, dtype=dtype, device=weight.device)
            module.register_buffer(buffer, zeros, persistent=False)


class _Head:
    """Per-adapter copies of a linear head stacked over slots, each stored as its difference from
    the base head (zero in the last slot, the base's, and for adapters that do not save it)."""

    def __init__(self, name: str, module: nn.Linear, slots: int) -> None:
        self.name, self.module = name, module
        module.register_buffer("lorakit_multi_W", torch.zeros_like(module.weight).repeat(slots + 1, 1, 1),
                               persistent=False)  # fmt: skip
        bias = module.bias
        stacked = None if bias is None else torch.zeros_like(bias).repeat(slots + 1, 1)
        module.register_buffer("lorakit_multi_b", stacked, persistent=False)

    def write(self, slot: int, params: dict[str, torch.Tensor]) -> None:
        """Slot `slot` holds the head `params` (the base head where they name no weight or bias)."""
        module = self.module
        weight = params.get("weight")
        module.lorakit_multi_W[slot].copy_(weight - module.weight if weight is not None else 0)
        if module.lorakit_multi_b is not None:
            bias = params.get("bias")
            module.lorakit_multi_b[slot].copy_(bias - module.bias if bias is not None else 0)


class MultiLoraModel:
    """Up to `slots` adapters in stacked tensors per target layer of a frozen base model.

    `model` is hooked in place (and returned as `.model`); outside `use()` it computes
    exactly the base model. Inside `with multi.use(["a", None, "b"]):` every forward (and
    `model.generate`) gives row i the adapter named at position i (None: the base).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        slots: int = 16,
        max_rank: int = 64,
        target_modules: list[str] | str = "all-linear",
    ) -> None:
        if not isinstance(slots, int) or slots < 1 or not isinstance(max_rank, int) or max_rank < 1:
            raise AdapterError(f"slots={slots!r}, max_rank={max_rank!r}: both must be positive integers")
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            raise AdapterError("the model already holds lorakit LoRA layers; give MultiLoraModel the plain base model")
        found = find_targets(model, LoraConfig(target_modules=target_modules))
        others = [f"{n} ({type(m).__name__})" for n, m in found if not is_linear(m)]
        if others:
            raise AdapterError(
                f"target_modules={target_modules!r} matches non-linear modules {', '.join(others[:5])}; "
                "mixed-adapter batches support nn.Linear and Conv1D targets only"
            )
        self.model = model
        self.slots, self.max_rank = slots, max_rank
        self.base_slot = slots  # the always-zero slot for rows on the base
        self.targets = {n: _Target(n, m, slots, max_rank) for n, m in found}
        self.heads: dict[str, _Head] = {}
        self._lock = threading.Lock()  # guards the maps below; held only briefly
        self._write_lock = threading.Lock()  # one loader at a time
        self._local = threading.local()  # .batch: this thread's running _Batch (None: the base)
        self._version = 0  # bumped after every slot write: gathered copies of older contents are stale
        self._slot_of: dict[str, int] = {}
        self._path_of: dict[str, Path] = {}
        self._ranks: dict[int, dict[str, int]] = {}  # occupied slot -> layer -> rank
        self._free = list(range(slots - 1, -1, -1))
        self._refs: Counter[int] = Counter()  # slot -> number of running batches using it
        self._retired: set[int] = set()  # replaced/unloaded slots waiting for their batches
        self._held: Counter[int] = Counter()  # slot -> hold() count (also counted in _refs)
        self._handles = [
            t.module.register_forward_hook(self._lora_hook(t), with_kwargs=True) for t in self.targets.values()
        ]

    # --- the forward --------------------------------------------------------------------------
    def _lora_hook(self, target: _Target):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            batch = getattr(self._local, "batch", None)
            if batch is None or target.rank == 0:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            rows = x.shape[0]
            r = target.rank
            # Decoding runs the same rows step after step: keep each layer's gathered A and Bt for
            # the batch's slot list, rank and slot contents (version), and skip two gathers a step.
            key = (batch.key, rows, r, self._version, module.lorakit_multi_A.data_ptr())  # data_ptr: .to() moves
            cached = target.cache
            if cached is not None and cached[0] == key:
                return add_lora_rows(output, x, cached[1], cached[2])
            ids = _rows(batch.ids(), rows)
            A_rows = module.lorakit_multi_A[:, :r].index_select(0, ids)
            Bt_rows = module.lorakit_multi_Bt[:, :r].index_select(0, ids)
            if rows * r <= (self.slots + 1) * self.max_rank:  # bounded: at most the size of the slots
                target.cache = (key, A_rows, Bt_rows)
            return add_lora_rows(output, x, A_rows, Bt_rows)

        return hook

    def _head_hook(self):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            batch = getattr(self._local, "batch", None)
            if batch is None:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            ids = _rows(batch.ids(), x.shape[0])
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            weight = module.lorakit_multi_W.index_select(0, ids).transpose(1, 2)
            if module.lorakit_multi_b is None:
                delta = torch.bmm(x3, weight)
            else:
                delta = torch.baddbmm(module.lorakit_multi_b.index_select(0, ids).unsqueeze(1), x3, weight)
            return output + delta.view(output.shape)

        return hook

    @contextmanager
    def use(self, adapters: Sequence[str | int | None]) -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter `adapters[i]` (None: the base).

        A batch whose size is a multiple k of len(adapters) (generate's num_return_sequences)
        repeats each entry k times, as Hugging Face expands rows. An entry may also be a handle
        from `hold()`: that adapter version, even if its name was replaced since. Names unknown
        here raise UnknownAdapterError before anything runs.
        """
        with self._lock:
            slots = [self._slot_for(a) for a in adapters]
            self._refs.update(slots)
        on_base = all(s == self.base_slot for s in slots)
        device = next(iter(self.targets.values())).module.lorakit_multi_A.device
        previous = getattr(self._local, "batch", None)
        self._local.batch = None if on_base else _Batch(slots, device)
        try:
            yield
        finally:
            self._local.batch = previous
            with self._lock:
                self._refs.subtract(slots)
                for slot in set(slots) & self._retired:
                    if self._refs[slot] <= 0:
                        self._release(slot)

    def hold(self, name: str) -> int:
        """Keep the slot `name` has now for one long-lived user (a request spanning many forwards).

        Returns a handle for `use()` and `release()`: it names this version of the adapter, so
        replacing or unloading `name` meanwhile changes nothing for the holder, whose slot is
        reused only after every hold on it is released.
        """
        with self._lock:
            if name not in self._slot_of:
                raise UnknownAdapterError(f"adapter {name!r} not loaded; loaded: {sorted(self._slot_of) or 'none'}")
            slot = self._slot_of[name]
            self._held[slot] += 1
            self._refs[slot] += 1
            return slot

    def release(self, handle: int) -> None:
        """Give back one `hold()`; a replaced or unloaded slot is freed with its last reference."""
        with self._lock:
            if self._held[handle] <= 0:
                raise AdapterError(f"adapter handle {handle!r} is not held; every release needs a hold")
            self._held[handle] -= 1
            self._refs[handle] -= 1
            if handle in self._retired and self._refs[handle] <= 0:
                self._release(handle)

    # --- loading ------------------------------------------------------------------------------
    def prepare(self, path: str | Path, *, force: bool = False) -> AdapterPlan:
        """Read and check an adapter folder against this model; raise AdapterError listing every
        problem. Nothing changes. `force` skips the base-fingerprint check.

        The file is parsed as `load_adapter` parses it (`plan_adapter`: the config's
        target_modules, every key, shape and value, the fingerprint); then come the limits of
        mixed batches: plain LoRA on hooked linear layers up to max_rank, nn.Linear heads, and
        nothing that changes the shared base."""
        config, tensors, metadata = read_adapter(path)
        # DoRA rescales W + dW per output: not a gathered low-rank add (config flag or saved magnitudes)
        if is_dora_file(config, tensors):
            raise AdapterError(f"{path} is a DoRA adapter; mixed-adapter batches serve plain LoRA adapters only")
        self._check_head_sizes(path, tensors)
        plan = plan_adapter(config, tensors, self.model, source=str(path), strict=False)
        error = plan.failure(f"{path} cannot be served here", self._serve_problems(plan))
        if error is not None:
            raise error
        check_fingerprint(plan.targets, metadata, str(path), force=force, remedy="serve the base it was trained on")
        layers = {n: (e.A, e.B, e.scaling) for n, e in plan.layers.items()}
        return AdapterPlan(Path(path), layers=layers, heads=self._linear_heads(plan.saved))

    def _linear_heads(self, saved: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """The saved modules as linear heads: a saved nn.Linear as itself, a saved block (BERT's
        pooler) as each of its linear layers, named in the model ({param: tensor} each)."""
        modules = dict(walk(self.model))
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for name, params in saved.items():
            for inner, _ in _linears(modules[name]):
                prefix = f"{inner}." if inner else ""
                own = {p: params[prefix + p] for p in ("weight", "bias") if prefix + p in params}
                heads[f"{name}.{inner}" if inner else name] = own
        return heads

    def _check_head_sizes(self, path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
        """A classifier trained on another number of labels, said in labels (not tensor shapes):
        one server's classifier head has one output size, every adapter's head must share it."""
        for name, module in walk(self.model):
            weight = tensors.get(f"{name}.weight")
            if name.rpartition(".")[2] not in CLASSIFIER_HEADS or not isinstance(module, nn.Linear) or weight is None:
                continue
            if weight.dim() == 2 and weight.shape[0] != module.out_features:
                raise AdapterError(
                    f"{path} is a classifier of {weight.shape[0]} labels and this server's has "
                    f"{module.out_features}: serve it from a server started with {weight.shape[0]}-label adapters"
                )

    def _serve_problems(self, plan: LoadPlan) -> list[str]:
        """What a valid adapter may not do in mixed batches over this hooked base."""
        problems = []
        for name, entry in plan.layers.items():
            if entry.kind == "embedding":
                problems.append(f"{name}: LoRA on embeddings is not supported in mixed batches")
            elif name not in self.targets:
                problems.append(f"{name} is adapted but not hooked here; construct MultiLoraModel with it targeted")
            elif entry.rank > self.max_rank:
                problems.append(
                    f"{name}: rank {entry.rank} exceeds max_rank={self.max_rank}; construct with a larger one"
                )
        problems += self._saved_problems(plan)
        problems += [
            f"unexpected key {key} (adapters that change base weights or biases outside "
            "modules_to_save cannot share a base in mixed batches)"
            for key in plan.extras
        ]
        return problems

    def _saved_problems(self, plan: LoadPlan) -> list[str]:
        """Saved modules must be linear layers (or blocks of them) that the adapter does not also adapt."""
        modules = dict(walk(self.model))
        problems = []
        for name, params in plan.saved.items():
            linears = _linears(modules[name])
            covered = {f"{inner}.{p}" if inner else p for inner, m in linears for p, _ in m.named_parameters()}
            others = sorted(set(params) - covered)
            if others:
                problems.append(
                    f"{name}: only linear layers can be swapped per row, and {others[0]} is not in one "
                    f"({type(modules[name]).__name__})"
                )
            both = [f"{name}.{inner}" if inner else name for inner, _ in linears]
            problems += [
                f"{layer} is both adapted with LoRA and saved in full" for layer in both if layer in plan.layers
            ]
        return problems

    def load(self, name: str, path: str | Path, *, force: bool = False) -> None:
        """Load the PEFT/lorakit adapter folder `path` into a free slot as `name`.

        Validated fully before anything changes. Loading a name again with the same path does
        nothing; with a new path the new adapter replaces the old one atomically (batches
        already running keep the old weights until they finish).
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name {name!r}: give a non-empty string")
        with self._lock:
            if self._path_of.get(name) == Path(path):
                return
        plan = self.prepare(path, force=force)
        self.load_plan(name, plan)

    def load_plan(self, name: str, plan: AdapterPlan) -> None:
        """Write an already validated plan (from `prepare`) into a free slot and publish it as `name`."""
        with self._write_lock:
            with self._lock:
                if not self._free:
                    raise NoFreeSlotError(
                        f"all {self.slots} adapter slots are taken ({sorted(self._slot_of)}); "
                        "unload one or construct MultiLoraModel with more slots"
                    )
                slot = self._free.pop()
            try:
                self._write_slot(slot, plan)
            except BaseException:
                with self._lock:
                    self._free.append(slot)
                raise
            ranks = {n: A.shape[0] for n, (A, _, _) in plan.layers.items()}
            with self._lock:
                self._version += 1
                self._ranks[slot] = ranks
                for layer, r in ranks.items():  # widen before publishing: the slot is fully written
                    self.targets[layer].rank = max(self.targets[layer].rank, r)
                old = self._slot_of.get(name)
                self._slot_of[name], self._path_of[name] = slot, plan.path
                if old is not None:
                    self._retire(old)

    def unload(self, name: str) -> None:
        """Remove adapter `name`; its slot is reused once no running batch reads it."""
        with self._lock:
            if name not in self._slot_of:
                raise UnknownAdapterError(f"adapter {name!r} not loaded; loaded: {sorted(self._slot_of) or 'none'}")
            slot = self._slot_of.pop(name)
            del self._path_of[name]
            self._retire(slot)

    def names(self) -> list[str]:
        """The loaded adapters' names, sorted."""
        with self._lock:
            return sorted(self._slot_of)

    def path_of(self, name: str) -> Path | None:
        """The folder adapter `name` was loaded from (None when not loaded)."""
        with self._lock:
            return self._path_of.get(name)

    def free_slots(self) -> int:
        """Slots a new adapter can take now."""
        with self._lock:
            return len(self._free)

    def close(self) -> nn.Module:
        """Remove the hooks and the stacked buffers; the model is the plain base again."""
        for handle in self._handles:
            handle.remove()
        for t in self.targets.values():
            del t.module.lorakit_multi_A, t.module.lorakit_multi_Bt
            t.cache = None
        for h in self.heads.values():
            del h.module.lorakit_multi_W, h.module.lorakit_multi_b
        self._handles.clear()
        return self.model

    # --- internals (callers hold the locks noted) -----------------------------------------------
    def _write_slot(self, slot: int, plan: AdapterPlan) -> None:
        """Fill every layer's and head's slot: the adapter's weights, zeros / base head elsewhere."""
        with torch.no_grad():
            for name, target in self.targets.items():
                A_all, Bt_all = target.module.lorakit_multi_A, target.module.lorakit_multi_Bt
                if name not in plan.layers:
                    A_all[slot].zero_()
                    Bt_all[slot].zero_()
                    continue
                A, B, scale = plan.layers[name]
                r = A.shape[0]
                A_all[slot, r:].zero_()
                Bt_all[slot, r:].zero_()
                A_all[slot, :r].copy_(A)
                Bt_all[slot, :r].copy_(B.t().to(torch.float64).mul(scale))
            for head_name in plan.heads:
                if head_name not in self.heads:
                    module = dict(walk(self.model))[head_name]
                    head = self.heads[head_name] = _Head(head_name, module, self.slots)
                    self._handles.append(module.register_forward_hook(self._head_hook(), with_kwargs=True))
            for head_name, head in self.heads.items():
                head.write(slot, plan.heads.get(head_name, {}))

    def _slot_for(self, adapter: str | int | None) -> int:  # holds self._lock
        if adapter is None:
            return self.base_slot
        if isinstance(adapter, int) and not isinstance(adapter, bool):
            if self._held[adapter] <= 0:  # a stale handle's slot may hold another adapter by now
                raise UnknownAdapterError(f"adapter handle {adapter} is not held: take one with hold()")
            return adapter
        if adapter not in self._slot_of:
            raise UnknownAdapterError(f"adapter {adapter!r} not loaded; loaded: {sorted(self._slot_of) or 'none'}")
        return self._slot_of[adapter]

    def _retire(self, slot: int) -> None:  # holds self._lock
        if self._refs[slot] > 0:
            self._retired.add(slot)
        else:
            self._release(slot)

    def _release(self, slot: int) -> None:  # holds self._lock
        self._retired.discard(slot)
        self._ranks.pop(slot, None)
        self._free.append(slot)
        for name, target in self.targets.items():  # narrow the matmuls to the ranks still resident
            target.rank = max((ranks.get(name, 0) for ranks in self._ranks.values()), default=0)


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name inside `module`, layer) of its nn.Linear layers; ("", module) when it is one."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


class _Batch:
    """The slots of one `use()` block's rows; the device tensor of ids is made on first need."""

    def __init__(self, slots: list[int], device: torch.device) -> None:
        self.key = tuple(slots)
        self.device = device
        self._ids: torch.Tensor | None = None

    def ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = torch.tensor(self.key, dtype=torch.long, device=self.device)
        return self._ids


def _rows(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row slot ids for a batch of `batch` rows (generate may repeat each row k times)."""
    if batch == ids.shape[0]:
        return ids
    if batch % ids.shape[0]:
        raise AdapterError(
            f"the batch has {batch} rows but use() named {ids.shape[0]} adapters; give one entry per row"
        )
    return ids.repeat_interleave(batch // ids.shape[0])


__all__ = ["MultiLoraModel", "AdapterPlan", "UnknownAdapterError", "NoFreeSlotError"]
