"""LoRA variants as objects (variants/base.py, variants/registry.py): the lookup by config and
by file keys, what each layer holds, and that a new variant plugs in without touching the layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit
from lorakit.core.layers import LoraLinear
from lorakit.core.layers.forward_path import ForwardPath
from lorakit.variants.base import LORA, LoraVariant
from lorakit.variants.dora import DORA
from lorakit.variants.registry import VARIANTS, file_variant, variant_for


def test_lookup_by_config_and_by_file_keys():
    assert variant_for(lorakit.LoraConfig()) is LORA
    assert variant_for(lorakit.LoraConfig(use_dora=True)) is DORA
    assert set(VARIANTS) == {"lora", "dora"}
    assert LORA.save_suffixes == () and DORA.save_suffixes == (".lora_magnitude_vector",)
    keys = ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_magnitude_vector"]
    assert file_variant(lorakit.LoraConfig(), keys) is DORA  # the magnitudes tell, whatever the config
    assert file_variant(lorakit.LoraConfig(), keys[:1]) is LORA
    assert file_variant(lorakit.LoraConfig(use_dora=True), keys[:1]) is DORA
    assert DORA.batched_factors(None, "a") is None  # not a low-rank add: a server refuses it


def test_layers_hold_the_variant_of_each_adapter_and_drop_its_parameters():
    layer = LoraLinear(nn.Linear(8, 12))
    layer.add_adapter("p", 2, 1.0)
    layer.add_adapter("d", 2, 1.0, use_dora=True)
    assert layer.variants == {"p": LORA, "d": DORA}
    assert [t.shape for t in layer.adapter_parameters("d")] == [(2, 8), (12, 2), (12,)]
    layer.delete_adapter("d")
    assert "d" not in layer.variants and "d" not in layer.lora_magnitude_vector


class HalfScale(LoraVariant):
    """A toy third variant: plain LoRA at half its scaling, with no fused function."""

    name = "half"

    def delta_weight(self, layer, name):
        return 0.5 * layer.plain_delta_weight(name)

    def add_to_weight(self, layer, weight, name):
        return weight + self.delta_weight(layer, name).to(weight.dtype)

    def add_output(self, layer, result, x, name):
        return result + 0.5 * F.linear(F.linear(x, layer.lora_A[name]), layer.full_B(name)) * layer.scaling[name]

    def has_fused_train(self, layer):
        return False


def test_a_new_variant_plugs_in_without_touching_the_layer():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 12))
    layer.add_adapter("h", 2, 1.0, variant=HalfScale())
    with torch.no_grad():
        layer.lora_B["h"].normal_()
    x = torch.randn(4, 6, 8)
    want = layer.base_layer(x) + 0.5 * x @ (layer.lora_B["h"] @ layer.lora_A["h"]).T
    for path in (ForwardPath.FACTORED, ForwardPath.MERGED_WEIGHT):
        with torch.no_grad():
            torch.testing.assert_close(layer.forward_along(path, x, ["h"]), want)
    torch.testing.assert_close(layer(x), want)  # training: planned FACTORED (no fused function)
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
