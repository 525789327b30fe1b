"""Task vectors over state dicts, and the merges they span.

A task vector is tau_n = theta_n - theta_0: what fine-tuning the base theta_0 on task n changed.
A merge is theta(c) = theta_0 + sum_n c_n tau_n. Only floating-point entries of the state dicts
take part (weights, biases, float buffers such as BatchNorm statistics); integer buffers
(``num_batches_tracked``, position ids) are copied from the base. The same code serves the zoo
models and Hugging Face models: both are state dicts of named tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExpungeError

State = Mapping[str, torch.Tensor]


def state_of(model: nn.Module | State) -> dict[str, torch.Tensor]:
    """The state dict of a module, or a state dict itself (tensors detached, not copied)."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        return {k: v.detach() for k, v in model.items()}
    raise ExpungeError(f"expected a torch module or a state dict of tensors, got {type(model).__name__}")


def state_hash(state: State) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes), for manifests and reports."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{state[key].dtype}|{tuple(state[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Task vectors of half-precision models are kept in float32: their differences would lose most bits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_architecture(base: dict, model: dict, name: str) -> None:
    if set(base) != set(model):
        missing, extra = sorted(set(base) - set(model)), sorted(set(model) - set(base))
        raise ExpungeError(f"model {name!r} has a different architecture from the base: missing {missing[:3]}, "
                           f"extra {extra[:3]}; task vectors need models fine-tuned from the same base")
    for key, tensor in base.items():
        other = model[key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise ExpungeError(f"model {name!r} has a different architecture from the base: {key} is "
                               f"{tuple(other.shape)} {other.dtype}, the base's {tuple(tensor.shape)} {tensor.dtype}")


def _cosine(a: State, b: State, keys: list[str]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
    norms = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in keys) * sum(float(b[k].double().pow(2).sum())
                                                                                for k in keys))
    return dot / norms if norms > 0 else 1.0


def check_bounds(c, n: int, bounds: tuple[float, float]) -> np.ndarray:
    """``c`` as a float array of length ``n`` inside ``bounds``, or a clear error."""
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ExpungeError(f"bounds must be two finite numbers lo < hi, got {bounds}")
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    if len(c) != n:
        raise ExpungeError(f"{len(c)} coefficient(s) given for {n} task vector(s); give one per task vector")
    if not np.isfinite(c).all():
        raise ExpungeError(f"merge coefficients must be finite, got {c.tolist()}")
    if (c < lo).any() or (c > hi).any():
        raise ExpungeError(f"merge coefficients {c.tolist()} lie outside the bounds [{lo}, {hi}]; "
                           "widen the bounds explicitly if that merge is meant")
    return c


class TaskVectors:
    """The base theta_0 and T task vectors, stacked per state-dict entry as tensors of shape (T, ...).

    Build with ``from_models``; ``ties`` and ``dare`` (ties_dare.py) return processed copies.
    ``processing`` records what was done to the vectors (empty for plain task arithmetic).
    """

    def __init__(self, base: dict[str, torch.Tensor], stack: dict[str, torch.Tensor], names: list[str],
                 processing: dict | None = None, models: list[dict[str, torch.Tensor]] | None = None):
        self.base, self.stack, self.names = base, stack, list(names)
        self.processing = dict(processing or {})
        self._models = models  # the fine-tuned states, kept only for plain vectors (exact one-hot merges)

    @classmethod
    def from_models(cls, base: nn.Module | State, models: Sequence[nn.Module | State],
                    names: Sequence[str] | None = None, min_cosine: float | None = 0.3) -> "TaskVectors":
        """Task vectors of ``models`` against ``base``.

        Refuses models of another architecture (entry names, shapes or dtypes differ), and models that do
        not look fine-tuned from this base: a fine-tuned model's weights keep the base's direction (their
        cosine similarity is high: 0.7 to 0.9 for the small CNNs of the merge benchmark, above 0.99 for
        fine-tuned language models), while independently initialised models are nearly orthogonal (cosine
        about 0). The cosine is taken over all floating-point entries; distances do not separate the two
        cases, as a briefly trained base can move further in fine-tuning than to another initialisation.
        ``min_cosine=None`` skips that check.

        The base's and models' tensors are referenced, not copied (language models are large): do not
        change them in place while their task vectors are in use.
        """
        if len(models) == 0:
            raise ExpungeError("no models to merge; give at least one fine-tuned model besides the base")
        names = [f"task{i + 1}" for i in range(len(models))] if names is None else list(names)
        if len(names) != len(models) or len(set(names)) != len(names):
            raise ExpungeError(f"give one distinct name per model: {len(models)} model(s), names {names}")
        base_state = state_of(base)
        states = [state_of(m) for m in models]
        for name, state in zip(names, states):
            _check_same_architecture(base_state, state, name)
        keys = [k for k, v in base_state.items() if torch.is_floating_point(v)]
        if not keys:
            raise ExpungeError("the base has no floating-point tensors to merge")
        if min_cosine is not None:
            for name, state in zip(names, states):
                cosine = _cosine(base_state, state, keys)
                if cosine < min_cosine:
                    raise ExpungeError(
                        f"model {name!r} does not look fine-tuned from this base: the cosine similarity of their "
                        f"weights is {cosine:.2f} (below {min_cosine}; independently initialised models are near 0). "
                        "Merge models fine-tuned from the same base, or pass min_cosine=None if this one is")
        stack = {k: torch.stack([s[k].to(_work_dtype(base_state[k].dtype)) for s in states])
                 - base_state[k].to(_work_dtype(base_state[k].dtype)) for k in keys}
        return cls(base_state, stack, names, models=states)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def keys(self) -> list[str]:
        return list(self.stack)

    def vector(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v[n] for k, v in self.stack.items()}

    def norms(self) -> list[float]:
        return [math.sqrt(sum(float(v[n].double().pow(2).sum()) for v in self.stack.values()))
                for n in range(len(self))]

    def hashes(self) -> list[str]:
        """Content hash of each (processed) task vector."""
        return [state_hash(self.vector(n)) for n in range(len(self))]

    def with_stack(self, stack: dict[str, torch.Tensor], processing: dict) -> "TaskVectors":
        """A processed copy: same base and names, new vectors, no exact one-hot shortcut."""
        return TaskVectors(self.base, stack, self.names, {**self.processing, **processing})

    def merge(self, c, bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
        """theta_0 + sum_n c_n tau_n as a new state dict (each entry in the base's dtype).

        For plain vectors a one-hot c returns that fine-tuned model bit for bit (theta_0 + (theta_n -
        theta_0) can differ from theta_n in the last bit), and c = 0 returns the base.
        """
        c = check_bounds(c, len(self), bounds)
        if self._models is not None:
            if not c.any():
                return {k: v.clone() for k, v in self.base.items()}
            if (np.count_nonzero(c) == 1) and c.max() == 1.0:
                model = self._models[int(np.argmax(c))]
                return {k: (model[k] if k in self.stack else self.base[k]).clone() for k in self.base}
        merged = {}
        for key, tensor in self.base.items():
            if key not in self.stack:
                merged[key] = tensor.clone()
                continue
            vectors = self.stack[key]
            weights = torch.as_tensor(c, dtype=vectors.dtype)
            delta = torch.tensordot(weights, vectors, dims=1)
            merged[key] = (tensor.to(vectors.dtype) + delta).to(tensor.dtype)
        return merged

    def describe(self) -> dict:
        """JSON-serialisable summary for manifests: names, hashes, norms, processing."""
        return {"names": self.names, "hashes": self.hashes(), "norms": self.norms(),
                "base_hash": state_hash(self.base), "processing": self.processing,
                "n_parameters": int(sum(v[0].numel() for v in self.stack.values()))}


def load_state(module: nn.Module, state: State) -> nn.Module:
    """A copy of ``module`` holding ``state`` (strict: every entry must match), in eval mode."""
    import copy

    clone = copy.deepcopy(module)
    clone.load_state_dict(dict(state), strict=True)
    return clone.eval()


def interpolation(before: nn.Module | State, after: nn.Module | State) -> TaskVectors:
    """The one-vector family theta(c) = before + c (after - before): c = 0 is ``before``, c = 1 ``after``.

    No similarity check: a deletion may move the weights anywhere (e.g. retraining from scratch)."""
    return TaskVectors.from_models(before, [after], names=["after"], min_cosine=None)
