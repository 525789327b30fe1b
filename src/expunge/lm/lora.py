"""LoRA adapters through ``peft``: only the adapters train; the base weights stay frozen.

Target modules default to peft's own choice for the architecture (Llama, Qwen2, Mistral: ``q_proj``,
``v_proj``; GPT-2: ``c_attn``; GPT-NeoX: ``query_key_value``); ``alpha`` defaults to 2 * rank. The adapters'
initial values (peft: A random, B zero, so the model starts unchanged) depend on ``seed`` alone.
"""

from __future__ import annotations

import copy
import warnings

import torch

from ..errors import ExpungeError
from .determinism import seeded


def default_lora_targets(model) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ExpungeError(f"no default LoRA target modules for architecture {model_type!r}; name them with "
                           "--lora-targets (e.g. q_proj,v_proj)")
    return list(DEFAULTS[model_type])


def apply_lora(model, rank: int, alpha: float | None = None, targets=None, dropout: float = 0.0, seed: int = 0):
    """Wrap ``model`` with LoRA adapters of ``rank`` on ``targets``; returns the peft model (trainable: adapters)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ExpungeError(f"LoRA rank must be at least 1, got {rank}")
    targets = list(targets) if targets is not None else default_lora_targets(model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ExpungeError(f"LoRA targets {missing} are not modules of this model; its linear layers are {linear}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                        lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2")  # GPT-2's Conv1D
    with seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)  # peft's call, not ours
        return get_peft_model(model, config)


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model):
    """A plain transformers model with the adapters folded into the base weights (a copy; ``model`` is kept)."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
