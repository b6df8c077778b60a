"""Serving many adapters over one base: mixed-adapter batches and the adapter registry."""

from lorakit.serve.batched import AdapterPlan, MultiLoraModel, NoFreeSlotError, UnknownAdapterError
from lorakit.serve.registry import AdapterRegistry

__all__ = ["MultiLoraModel", "AdapterRegistry", "AdapterPlan", "UnknownAdapterError", "NoFreeSlotError"]
