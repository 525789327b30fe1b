"""Weights as a run needs them: the current model in the Hugging Face layout, the initial weights for exact
retraining, and a content hash.

- ``save_pretrained(model, tokenizer, folder)``: ``config.json`` + ``model.safetensors`` (+ the tokenizer),
  loadable with ``AutoModelForCausalLM.from_pretrained(folder)``; a LoRA model is saved with its adapters
  merged into the base weights (the model in memory keeps them separate).
- ``save_state`` / ``load_state``: every parameter and persistent buffer (or only the trainable ones, e.g. the
  LoRA adapters when the frozen base can be rebuilt from its source) in one safetensors file, restored bit for
  bit into a model of the same architecture. Tied weights are stored once.
- ``weights_hash(model)``: sha256 over the state dict (names, dtypes, shapes, bytes) in name order;
  ``frozen_hash(model)`` the same over the tensors that do not train (a LoRA model's base);
  ``folder_hash(folder)`` the same over the tensors of a folder's safetensors files (what ``save_pretrained``
  wrote: tied weights once), so that a saved model is hashed without building it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import ExpungeError
from .lora import merged


def _hash_tensors(items) -> str:
    h = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{str(t.dtype)}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_hash(model) -> str:
    """Short content hash of every tensor of the model's state dict (tied weights appear under each name)."""
    return _hash_tensors(sorted(model.state_dict().items()))


def frozen_hash(model) -> str:
    """``weights_hash`` over the tensors that do not train: the base weights under LoRA adapters."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return _hash_tensors(sorted((n, t) for n, t in model.state_dict().items() if n not in trainable))


def folder_hash(folder) -> str:
    """``weights_hash``'s form over every tensor in the safetensors files of ``folder`` (a saved model), in name
    order, read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ExpungeError(f"{folder} holds no .safetensors weights")
    handles = [safe_open(f, "pt") for f in files]
    where = sorted((name, i) for i, handle in enumerate(handles) for name in handle.keys())  # noqa: SIM118 (safe_open has keys(), no __iter__)
    return _hash_tensors((name, handles[i].get_tensor(name)) for name, i in where)


def save_pretrained(model, tokenizer, folder) -> Path:
    """The model (adapters merged) and its tokenizer in the Hugging Face layout at ``folder``."""
    folder = Path(folder)
    merged(model).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def save_state(model, path, trainable_only: bool = False) -> str:
    """Write the model's tensors (all, or only the trainable ones) to ``path``; return ``weights_hash(model)``."""
    from safetensors.torch import save_file

    if trainable_only:
        state = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not state:
            raise ExpungeError("the model has no trainable parameters to save")
    else:
        state = model.state_dict()
    tensors, aliases, first = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in first:  # a tied weight: stored once, restored under every name
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().contiguous()
    kind = "trainable" if trainable_only else "all"
    save_file(tensors, Path(path), metadata={"expunge": kind, "aliases": json.dumps(aliases)})
    return weights_hash(model)


def load_state(model, path) -> None:
    """Restore tensors written by ``save_state`` into ``model`` (same architecture; LoRA applied if it was).
    Checked before anything is copied: a file that does not fit leaves the model as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ExpungeError(f"{path} is missing; the run's saved weights cannot be restored")
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(path)
    tensors.update({alias: tensors[name] for alias, name in json.loads(metadata.get("aliases", "{}")).items()})
    if metadata.get("expunge") == "trainable":
        current = {name: p for name, p in model.named_parameters() if p.requires_grad}
    else:
        current = model.state_dict()
    expected = set(current)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ExpungeError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); load it "
                           "into the architecture it was saved from (with LoRA applied if it was trained with LoRA)")
    wrong = [n for n in sorted(expected) if tensors[n].shape != current[n].shape]
    if wrong:
        raise ExpungeError(f"{path} holds {wrong[0]} with shape {tuple(tensors[wrong[0]].shape)} but the model's is "
                           f"{tuple(current[wrong[0]].shape)} ({len(wrong)} tensor(s) differ); load it into the "
                           "architecture it was saved from")
    model.load_state_dict(tensors, strict=metadata.get("expunge") != "trainable")
