"""LoraConfig: what to adapt and how, with validation that reports every problem at once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lorakit.core.functional import scaling
from lorakit.errors import LorakitError

BiasMode = Literal["none", "all", "lora_only"]
InitMode = str  # "kaiming", "gaussian", "pissa" or "pissa_niter_<N>"

# adapter_config.json keys lorakit reads; everything else PEFT writes is ignored on load.
_PEFT_TO_LORAKIT = {
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target_modules",
    "exclude_modules": "exclude_modules",
    "modules_to_save": "modules_to_save",
    "bias": "bias",
    "use_rslora": "use_rslora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_dora": "use_dora",
}

# PEFT settings that change what the adapter computes (or which modules it covers) beyond plain
# LoRA. Ignoring them would load the tensors and silently give other outputs, so they are refused.
_UNSUPPORTED_PEFT = {
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layers_to_transform": "adapting only some layers (layers_to_transform)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}


class ConfigError(LorakitError):
    """A LoraConfig (or an adapter_config.json) is invalid; the message lists every problem."""


@dataclass
class LoraConfig:
    """How LoRA adapters are added to a model.

    Attributes:
        r: rank of the update B @ A (a positive integer).
        alpha: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout applied to the LoRA branch's input during training (0 costs nothing).
        target_modules: module-name suffixes (list), a regex matched against the full module
            name (str), or "all-linear" (every linear layer except the output head / classifier).
        exclude_modules: suffixes (list) or a regex (str) of modules never adapted.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
        bias: which biases train and are saved: "none", "all" or "lora_only" (adapted layers).
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.
        rank_pattern: per-module rank overrides, {name suffix or regex: r}.
        alpha_pattern: per-module alpha overrides, {name suffix or regex: alpha}.
        init: initialisation of A (B starts at zero): "kaiming" (uniform) or "gaussian"; or PiSSA:
            "pissa" (A, B from the top-r singular vectors of W0, which keeps the residual) or
            "pissa_niter_<N>" (the same from a randomized SVD with N subspace iterations).
        use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per output times the
            row-normalised W0 + dW (linear layers only).
        fan_in_fan_out: the target stores its weight as (in, out); detected for HF Conv1D.
        enable_lora: fused projections where only some slices are adapted, as loralib's
            MergedLinear: {name suffix: [True, False, True]} adapts q and v of GPT-2's c_attn.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: BiasMode = "none"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: InitMode = "kaiming"
    fan_in_fan_out: bool = False
    use_dora: bool = False
    enable_lora: dict[str, list[bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError listing every invalid field, or return quietly."""
        problems = self._scalar_problems() + self._module_problems() + self._pattern_problems()
        if problems:
            raise ConfigError("invalid LoraConfig: " + "; ".join(problems))

    def _scalar_problems(self) -> list[str]:
        problems = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r={self.r!r}: must be a positive integer (e.g. 8)")
        if not is_alpha(self.alpha):
            problems.append(f"alpha={self.alpha!r}: {ALPHA_RULE} (e.g. 16)")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r}: must be one of 'none', 'all', 'lora_only'")
        if not is_init_mode(self.init):
            problems.append(f"init={self.init!r}: must be 'kaiming', 'gaussian', 'pissa' or 'pissa_niter_<N>' (N >= 1)")
        for name in ("use_dora", "use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be true or false")
        return problems

    def _module_problems(self) -> list[str]:
        problems = []
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                if name == "target_modules":
                    problems.append("target_modules=None: give suffixes, a regex or 'all-linear'")
                continue
            if isinstance(value, str):
                problems += _regex_problem(name, value)
            elif not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{name}={value!r}: must be a list of module-name suffixes or a regex string")
            elif name == "target_modules" and not value:
                problems.append("target_modules=[]: name at least one module")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list) or not all(isinstance(v, str) for v in self.modules_to_save)
        ):
            problems.append(f"modules_to_save={self.modules_to_save!r}: must be a list of module names")
        return problems

    def _pattern_problems(self) -> list[str]:
        problems: list[str] = []
        for key, rank in _dict_items(self.rank_pattern, "rank_pattern", problems):
            problems += _regex_problem(f"rank_pattern key {key!r}", key)
            if not _is_int(rank) or rank <= 0:
                problems.append(f"rank_pattern[{key!r}]={rank!r}: must be a positive integer")
        for key, alpha in _dict_items(self.alpha_pattern, "alpha_pattern", problems):
            problems += _regex_problem(f"alpha_pattern key {key!r}", key)
            if not is_alpha(alpha):
                problems.append(f"alpha_pattern[{key!r}]={alpha!r}: {ALPHA_RULE}")
        for key, mask in _dict_items(self.enable_lora, "enable_lora", problems):
            if not isinstance(mask, list) or not mask or not all(isinstance(b, bool) for b in mask):
                problems.append(f"enable_lora[{key!r}]={mask!r}: must be a non-empty list of booleans")
            elif not any(mask):
                problems.append(f"enable_lora[{key!r}]={mask!r}: enable at least one slice")
        return problems

    # --- per-module resolution -------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank for one module: a rank_pattern match, else r."""
        key = match_pattern(self.rank_pattern, module_name)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_name: str) -> float:
        """The alpha for one module: an alpha_pattern match, else alpha."""
        key = match_pattern(self.alpha_pattern, module_name)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scaling_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, for one module."""
        return scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def enable_lora_for(self, module_name: str) -> list[bool] | None:
        """The slice mask of a fused projection, or None for an ordinary layer."""
        for key, mask in self.enable_lora.items():
            if module_name == key or module_name.endswith("." + key):
                return list(mask)
        return None

    # --- PEFT's adapter_config.json --------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None, task_type: str | None) -> dict[str, Any]:
        """The adapter_config.json that PEFT, vLLM and LoRAX read."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target if isinstance(target, str) else sorted(target or []),
            "exclude_modules": self.exclude_modules,
            "modules_to_save": self.modules_to_save,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: Any, source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's adapter_config.json contents; unsupported settings are refused clearly."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        problems = []
        if data.get("peft_type", "LORA") != "LORA":
            problems.append(f"peft_type={data.get('peft_type')!r}: lorakit reads LoRA adapters only ('LORA')")
        for key, what in _UNSUPPORTED_PEFT.items():
            if data.get(key):
                problems.append(f"{key}={data[key]!r}: {what} is not supported by this version of lorakit")
        init = data.get("init_lora_weights", True)
        # A PiSSA file holds plain factors for the residual base it was trained on: loading
        # never re-runs the SVD (that would change the base), so it reads as plain LoRA.
        if isinstance(init, str) and init.startswith("pissa"):
            init = True
        if init not in (True, False, "gaussian"):
            problems.append(f"init_lora_weights={init!r}: only plain LoRA initialisations are supported")
        if "r" not in data:
            problems.append("'r' is missing: the adapter's rank is required")
        for key in _NULL_HINT:
            if key in data and data[key] is None:
                problems.append(f"{key}=null: give a value ({_NULL_HINT[key]})")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        kwargs = {ours: data[theirs] for theirs, ours in _PEFT_TO_LORAKIT.items() if data.get(theirs) is not None}
        kwargs.setdefault("target_modules", "all-linear")
        if isinstance(kwargs["target_modules"], list):
            kwargs["target_modules"] = sorted(set(kwargs["target_modules"]))
        if kwargs.get("modules_to_save"):
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        if init == "gaussian":
            kwargs["init"] = "gaussian"
        try:
            return cls(**kwargs)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{source}: {_peft_names(str(err))}") from None


MAX_ALPHA = 1e6
ALPHA_RULE = f"must be a positive number, finite and at most {MAX_ALPHA:g}"
_NULL_HINT = {
    "r": "a positive integer, e.g. 8",
    "lora_alpha": "a positive number, e.g. 16",
    "lora_dropout": "a number in [0, 1)",
    "bias": "'none', 'all' or 'lora_only'",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_alpha(value: Any) -> bool:
    """True for a finite number in (0, MAX_ALPHA] (not a bool): alpha and alpha_pattern values."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return 0 < value <= MAX_ALPHA and math.isfinite(value)  # NaN fails the comparison


def _peft_names(message: str) -> str:
    """A LoraConfig message in adapter_config.json's key names (lora_alpha, lora_dropout)."""
    return re.sub(r"(?<![\w\[])(alpha|dropout)=", r"lora_\1=", message)


def is_init_mode(init: Any) -> bool:
    """True for "kaiming", "gaussian", "pissa" and "pissa_niter_<N>" with N >= 1."""
    if init in ("kaiming", "gaussian", "pissa"):
        return True
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", init) is not None


def match_pattern(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of `patterns` that matches `module_name` as PEFT matches rank_pattern:
    the key, read as a regex, must match the whole name or a dotted suffix of it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _regex_problem(what: str, pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as err:
        return [f"{what}={pattern!r} is not a valid regular expression ({err})"]
    return []


def _dict_items(value: Any, name: str, problems: list[str]) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        problems.append(f"{name}={value!r}: must be a dict")
        return []
    return list(value.items())
