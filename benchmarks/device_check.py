"""lorakit's core equivalences on any device (for a GPU, which CI does not have).

    python benchmarks/device_check.py --device cuda

On tiny random BERT, GPT-2 and Llama models: lorakit -> PEFT file round trip gives the same
logits; merged == unmerged; unmerge restores the weights bit for bit; the fused training
function's gradients pass gradcheck. Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

import peft
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit
from lorakit.core import functional as LF

MODELS = {
    "bert": (
        BertForSequenceClassification,
        BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=3,
        ),
    ),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
}


def check_model(kind: str, device: torch.device) -> dict[str, float]:
    cls, config = MODELS[kind]
    torch.manual_seed(0)
    base_state = cls(config).state_dict()

    def fresh():
        model = cls(config)
        model.load_state_dict(base_state)
        return model.to(device).eval()

    model = lorakit.inject(fresh(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.2)
    ids = torch.randint(0, 100, (4, 48), device=device)
    with torch.inference_mode():
        unmerged = model(ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp).eval()
        with torch.inference_mode():
            peft_logits = theirs(ids).logits
    originals = {n: layer.base_layer.weight.clone() for n, layer in lorakit.lora_layers(model)}
    lorakit.merge(model)
    with torch.inference_mode():
        merged = model(ids).logits
    lorakit.unmerge(model)
    exact = all(torch.equal(layer.base_layer.weight, originals[n]) for n, layer in lorakit.lora_layers(model))
    return {
        f"{kind}: |lorakit - PEFT| logits": (unmerged - peft_logits).abs().max().item(),
        f"{kind}: |merged - unmerged| logits": (merged - unmerged).abs().max().item(),
        f"{kind}: unmerge not bit-exact": 0.0 if exact else 1.0,
    }


def check_gradients(device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64, device=device)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    A = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, device=device, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda *t: LF.FusedLoraMatmul.apply(*t, 0.7), (x, W, b, A, B))
    return {"FusedLoraMatmul gradcheck failed": 0.0 if ok else 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    warnings.filterwarnings("ignore")
    results = check_gradients(device)
    for kind in MODELS:
        results |= check_model(kind, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, peft {peft.__version__}")
    failed = 0
    for check, value in results.items():
        ok = value <= 1e-5
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {check}: {value:.2e}")
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
