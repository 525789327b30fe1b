"""LMRecipe: everything that decides a language model's trained weights, given its texts.

Two LM trainings with the same recipe, the same initial weights and the same rows give the same weights
bit for bit (on the same device and thread count); that is what makes retraining after a deletion the exact
reference. ``device`` and ``dtype`` default to None (chosen by ``resolved()``: CUDA with bfloat16 where
there is a GPU that supports it, else CPU with float32); a run records the resolved values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import ExpungeError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class LMRecipe:
    """How a causal language model is trained.

    ``model``: ``tiny-llama``, ``tiny-gpt2``, a Hugging Face model folder or a ``.gguf`` file (see models.py).
    ``batch_size`` rows go through one forward pass; ``grad_accum`` such micro-batches make one optimizer
    step, so a step of the batch plan holds ``batch_size * grad_accum`` rows (``step_rows``).
    ``schedule`` is the learning-rate shape over optimizer steps after ``warmup_steps`` of linear warm-up.
    ``max_grad_norm`` clips the whole gradient of a step (None: no clipping). ``lora_rank`` > 0 trains
    LoRA adapters only (``lora_alpha`` default 2 * rank; ``lora_targets`` default peft's modules for the
    architecture). ``vocab_size`` is the size of the byte-level BPE trained for the tiny architectures.
    ``lr_auto``: GeN sets the rate (``expunge.optim.GeN``, started from ``lr``, an estimate every ``lr_every``
    optimizer steps on the probe rows of the batch plan's probe stream); ``schedule`` is then GeN's horizon
    (linear or cosine fade of its proposals), and there is no warm-up. See expunge.lm.train.
    """

    model: str = "tiny-llama"
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    vocab_size: int = 4096
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    lr_auto: bool = False
    lr_every: int = 4

    def __post_init__(self):
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(str(t) for t in self.lora_targets))
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "vocab_size"):
            value = getattr(self, name)
            if not (float(value).is_integer() and value >= 1):
                raise ExpungeError(f"{name} must be a whole number, at least 1; got {value}")
            object.__setattr__(self, name, int(value))
        if self.max_length < 2:
            raise ExpungeError(f"max_length must be at least 2 tokens (a context and a target), got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ExpungeError(f"the learning rate must be a positive, finite number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ExpungeError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ExpungeError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ExpungeError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ExpungeError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.warmup_steps < 0:
            raise ExpungeError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ExpungeError(f"max_grad_norm must be a positive number (or None for no clipping), got {self.max_grad_norm}")
        if self.lora_rank < 0:
            raise ExpungeError(f"lora_rank must be >= 0 (0 trains every weight), got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ExpungeError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ExpungeError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ExpungeError("lora_targets is empty; name at least one module (or omit it for the defaults)")
        if self.vocab_size < 260:
            raise ExpungeError(f"vocab_size must be at least 260 (256 bytes and the special tokens), got {self.vocab_size}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ExpungeError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {self.seed}")
        if not isinstance(self.lr_auto, bool):
            raise ExpungeError(f"lr_auto must be true or false, got {self.lr_auto!r}")
        if not (float(self.lr_every).is_integer() and self.lr_every >= 1):
            raise ExpungeError(f"lr_every (optimizer steps between GeN estimates) must be a positive integer, got "
                               f"{self.lr_every}")
        object.__setattr__(self, "lr_every", int(self.lr_every))
        if self.lr_auto and self.warmup_steps:
            raise ExpungeError("an automatic learning rate (GeN) has no warm-up: drop --warmup-steps (GeN starts "
                               "from the starting rate and moves it from the first step)")

    @property
    def step_rows(self) -> int:
        """Rows per optimizer step (the batch plan's batch)."""
        return self.batch_size * self.grad_accum

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    def resolved(self) -> "LMRecipe":
        """This recipe with device and dtype filled in (see models.resolve_device / resolve_dtype)."""
        from .models import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        return replace(self, device=str(device), dtype=str(dtype).removeprefix("torch."))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMRecipe":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExpungeError(f"unknown LM recipe field(s) {unknown}; this expunge knows {sorted(known)}")
        return cls(**d)
