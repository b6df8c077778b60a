"""Run mergekit merges for benchmarks/vs_mergekit.py, inside mergekit's own virtual environment
(mergekit is not a lorakit dependency: this file imports mergekit and never lorakit).

    <mergekit venv>/bin/python benchmarks/mergekit_driver.py jobs.json

jobs.json is a list of {"config": <YAML text>, "out": <folder>, "masks": <file or null>}. Each
job is mergekit's own run_merge (what `mergekit-yaml config.yml out` runs) on CPU. With "masks",
every random (DARE) mask mergekit draws is saved next to the delta it was drawn for, as
safetensors "delta.<k>" / "mask.<k>": mergekit.sparsify.bernoulli draws the mask with the global
torch RNG and hands (delta, mask) to rescaled_masked_tensor, which is wrapped here to record
them and otherwise left to do its work. lorakit's side then replays the same masks.
"""

from __future__ import annotations

import json
import sys

import torch
import yaml
from mergekit import sparsify
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import save_file


def run_job(job: dict) -> None:
    recorded: dict[str, torch.Tensor] = {}
    original = sparsify.rescaled_masked_tensor

    def recording(tensor, mask, norm, eps=1e-7):
        k = len(recorded) // 2
        recorded[f"delta.{k}"] = tensor.detach().clone().contiguous()
        recorded[f"mask.{k}"] = mask.detach().clone().contiguous()
        return original(tensor, mask, norm, eps)

    if job.get("masks"):
        sparsify.rescaled_masked_tensor = recording
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(job["config"]))
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0, device="cpu")
        run_merge(config, job["out"], options=options, config_source=job["config"])
    finally:
        sparsify.rescaled_masked_tensor = original
    if job.get("masks"):
        save_file(recorded, job["masks"])


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        run_job(job)


if __name__ == "__main__":
    main()
