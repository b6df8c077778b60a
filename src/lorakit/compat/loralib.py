"""loralib's surface (`import lorakit as lora`): the same constructors, parameter names and
state-dict keys as Microsoft's loralib, built on lorakit's own layers.

Each class is a thin constructor over the lorakit layer of its family plus state-dict hooks
that rename `base_layer.weight` <-> `weight` and `lora_A.default` <-> `lora_A`, so a
`lora_state_dict` saved with loralib loads here (and the other way round). With
`merge_weights=True` (loralib's default) eval() merges and train() unmerges, as in loralib,
except that unmerging restores the weights bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lorakit.core.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear

ADAPTER = "default"
_LINEAR_NAMES = {
    "weight": "base_layer.weight",
    "bias": "base_layer.bias",
    "lora_A": f"lora_A.{ADAPTER}",
    "lora_B": f"lora_B.{ADAPTER}",
}
_CONV_NAMES = {
    "conv.weight": "base_layer.weight",
    "conv.bias": "base_layer.bias",
    "lora_A": f"lora_A.{ADAPTER}",
    "lora_B": f"lora_B.{ADAPTER}",
}


class _LoralibNames:
    """Mixin: loralib's hyper-parameter attributes and state-dict key names."""

    loralib_names: dict[str, str] = _LINEAR_NAMES

    def _setup_loralib(
        self: LoraLayer, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, enabled: bool = True
    ) -> None:
        self.r, self.lora_alpha = r, lora_alpha
        if r > 0 and enabled:
            self.add_adapter(ADAPTER, r, lora_alpha / r, lora_dropout)
            if self.bias is not None:  # loralib freezes only the weight (via .bias: nn.Embedding has none)
                self.bias.requires_grad_(True)
        else:
            self.base_layer.requires_grad_(True)  # r=0: a plain trainable layer, as in loralib
        self.merge_on_eval = merge_weights
        self.register_state_dict_post_hook(type(self)._to_loralib_keys)
        self.register_load_state_dict_pre_hook(type(self)._from_loralib_keys)

    def _to_loralib_keys(self, state_dict, prefix, local_metadata) -> None:
        for theirs, ours in self.loralib_names.items():
            if prefix + ours in state_dict:
                state_dict[prefix + theirs] = state_dict.pop(prefix + ours)

    def _from_loralib_keys(self, state_dict, prefix, *args) -> None:
        for theirs, ours in self.loralib_names.items():
            if prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


def _linear_base(in_features: int, out_features: int, fan_in_fan_out: bool, bias: bool = True, **kwargs) -> nn.Module:
    """loralib stores a fan_in_fan_out weight as (in, out): that is HF's Conv1D."""
    if not fan_in_fan_out:
        return nn.Linear(in_features, out_features, bias=bias, **kwargs)
    if not bias:
        raise ValueError("fan_in_fan_out=True needs bias=True (the transposed layer is HF's Conv1D)")
    return Conv1D(out_features, in_features)


class Linear(_LoralibNames, LoraLinear):
    """loralib.Linear: an nn.Linear (or, with fan_in_fan_out, a transposed Conv1D) with LoRA."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        bias: bool = True,
        **kwargs,
    ) -> None:
        LoraLinear.__init__(self, _linear_base(in_features, out_features, fan_in_fan_out, bias=bias, **kwargs))
        self._setup_loralib(r, lora_alpha, lora_dropout, merge_weights)


class MergedLinear(_LoralibNames, LoraLinear):
    """loralib.MergedLinear: a fused projection where `enable_lora` picks the adapted slices."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] | None = None,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        enable_lora = list(enable_lora or [False])
        base = _linear_base(in_features, out_features, fan_in_fan_out, **kwargs)
        LoraLinear.__init__(self, base, enable_lora=enable_lora)
        self._setup_loralib(r, lora_alpha, lora_dropout, merge_weights, enabled=any(enable_lora))


class Embedding(_LoralibNames, LoraEmbedding):
    """loralib.Embedding: an nn.Embedding with a low-rank update table."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        LoraEmbedding.__init__(self, nn.Embedding(num_embeddings, embedding_dim, **kwargs))
        self._setup_loralib(r, lora_alpha, 0.0, merge_weights)


class _ConvLoRA(_LoralibNames, LoraConv):
    loralib_names = _CONV_NAMES
    conv_type: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        if not isinstance(kernel_size, int):
            raise ValueError(f"kernel_size={kernel_size!r}: loralib's conv LoRA takes a single int")
        LoraConv.__init__(self, self.conv_type(in_channels, out_channels, kernel_size, **kwargs), style="loralib")
        self._setup_loralib(r, lora_alpha, lora_dropout, merge_weights)

    @property
    def conv(self) -> nn.Module:  # loralib's name for the wrapped convolution
        return self.base_layer


class Conv1d(_ConvLoRA):
    """loralib.Conv1d."""

    conv_type = nn.Conv1d


class Conv2d(_ConvLoRA):
    """loralib.Conv2d."""

    conv_type = nn.Conv2d


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """loralib's rule: parameters named lora_* train; biases too with "all" or "lora_only"."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias={bias!r}: must be 'none', 'all' or 'lora_only'")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or (bias == "all" and "bias" in name))
    if bias == "lora_only":
        for module in model.modules():
            # loralib's conv layers have no .bias (it is .conv.bias), so loralib leaves it frozen
            # and lora_state_dict(bias="lora_only") does not save it: training it would be lost.
            if isinstance(module, LoraLayer) and not isinstance(module, _ConvLoRA) and module.bias is not None:
                module.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """loralib's lora_state_dict: the lora_* entries of model.state_dict(), plus biases by mode."""
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    if bias == "lora_only":
        out = {}
        for key, value in state.items():
            if "lora_" in key:
                out[key] = value
                bias_name = key.split("lora_")[0] + "bias"
                if bias_name in state:
                    out[bias_name] = state[bias_name]
        return out
    raise ValueError(f"bias={bias!r}: must be 'none', 'all' or 'lora_only'")
