"""A saved module that contains adapted-looking layers (BERT's pooler) is saved whole, never
given LoRA layers inside: its file must load back (once, it held `pooler.dense.base_layer.*`
and LoRA keys that neither load_adapter nor the server could place)."""

from __future__ import annotations

import torch
from tiny import bert

import lorakit


def _adapted(seed: int):
    model = bert(seed=0)
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier", "pooler"])
    lorakit.inject(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))  # as if trained: B and the saved copies move
    return model.eval()


def test_no_lora_inside_a_saved_module():
    model = _adapted(1)
    adapted = [name for name, module in model.named_modules() if isinstance(module, lorakit.LoraLayer)]
    assert adapted and not [name for name in adapted if ".pooler." in f".{name}."]


def test_saved_pooler_round_trips(tmp_path):
    model = _adapted(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    expected = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = lorakit.load_adapter(bert(seed=0), tmp_path / "adapter").eval()
    assert torch.allclose(fresh(input_ids=ids).logits, expected, atol=1e-6)
