"""A byte-level BPE tokenizer trained on a run's own texts (for the tiny architectures), with Hugging Face
``tokenizers``, wrapped as a ``PreTrainedTokenizerFast`` so that it saves and loads like any HF tokenizer.

Byte-level: every string encodes (no unknown token), and decoding gives the text back. ``<|endoftext|>``
is both BOS (added in front of every encoded text) and EOS; ``<pad>`` pads. It has no chat template, so
QA rows use the plain "Question: ... Answer: ..." format (see data.py).

Caveat for unlearning: the tokenizer is trained once, on the original texts, and is part of the run's fixed
architecture; forgetting rows retrains the weights, not the merges.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ExpungeError

BOS_EOS, PAD = "<|endoftext|>", "<pad>"


def train_bpe_tokenizer(texts, vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ExpungeError("no texts to train the tokenizer on")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ExpungeError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs {len(alphabet) + 2} "
                           "(256 bytes and 2 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BOS_EOS, PAD],
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id(BOS_EOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A $B",
                                                             special_tokens=[(BOS_EOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_EOS, eos_token=BOS_EOS, pad_token=PAD)


def load_tokenizer(folder):
    """A tokenizer saved with ``save_pretrained`` (offline; a clear error when the folder has none)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ExpungeError(f"{folder} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json); "
                           "save one there with tokenizer.save_pretrained or pass the tokenizer's own folder")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExpungeError(f"the tokenizer in {folder} cannot be loaded ({e})") from e
