"""lorakit: LoRA adapters for PyTorch and Hugging Face models.

Train small low-rank adapters on a frozen model, save them in PEFT's file format, merge
them for zero-latency inference, or keep several on one base. `import lorakit as lora`
also runs code written for Microsoft's loralib. The trainer is `lorakit.train`, the
multi-adapter engine and server `lorakit.serve` (imported on use: they pull in more).
"""

from lorakit.compat.loralib import (
    Conv1d,
    Conv2d,
    Embedding,
    Linear,
    MergedLinear,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from lorakit.core.adapters import (
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge,
)
from lorakit.core.config import ConfigError, LoraConfig
from lorakit.core.inject import TargetError, inject, lora_layers, parameter_report
from lorakit.core.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from lorakit.errors import DataError, LorakitError, UsageError
from lorakit.files.peft_format import AdapterError, load_adapter, read_adapter, save_adapter
from lorakit.tools.combine import combine, combine_adapters
from lorakit.tools.extract import extract_adapter
from lorakit.variants.dora import DoraError
from lorakit.variants.pissa_convert import save_pissa_as_lora
from lorakit.variants.pissa_init import PissaError
from lorakit.variants.qlora import dequantize_model, quantize_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "inject",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "lora_layers",
    "parameter_report",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "save_pissa_as_lora",
    "quantize_model",
    "dequantize_model",
    "extract_adapter",
    "combine",
    "combine_adapters",
    "LorakitError",
    "UsageError",
    "DataError",
    "ConfigError",
    "TargetError",
    "AdapterError",
    "DoraError",
    "PissaError",
]
