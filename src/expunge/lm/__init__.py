"""Language models: loading causal LMs (Hugging Face folders, GGUF, tiny configs), corpora of QA pairs and
documents with stable ids and groups, tokenized datasets with answer masks, and the LM trainer whose
retraining after a deletion is exact.

    corpus = load_corpus("tofu/full.json")                   # ids 0..3999, groups author-0..author-199
    setup = prepare(LMRecipe(model="tiny-llama"), corpus)     # model, tokenizer, TokenDataset; writes nothing
    result = train_lm(setup.model, setup.data, setup.recipe)
"""
from .corpus import Corpus, load_corpus
from .data import TokenDataset, encode, trim_padding
from .lora import apply_lora, default_lora_targets, is_lora, merged
from .models import (LoadedLM, TINY_ARCHITECTURES, check_max_length, check_vocab, find_smollm2_gguf, load_lm,
                     resolve_device, resolve_dtype)
from .recipe import LMRecipe
from .setup import LMSetup, prepare
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .train import TrainResult, dp_hook, lm_plan, make_optimizer, make_schedule, row_losses, train_lm
from .weights import folder_hash, frozen_hash, load_state, save_pretrained, save_state, weights_hash

__all__ = ["Corpus", "LMRecipe", "LMSetup", "LoadedLM", "TINY_ARCHITECTURES", "TokenDataset", "TrainResult",
           "apply_lora", "check_max_length", "check_vocab", "default_lora_targets", "dp_hook", "encode",
           "find_smollm2_gguf", "folder_hash", "frozen_hash", "is_lora", "lm_plan", "load_corpus", "load_lm",
           "load_state", "load_tokenizer",
           "make_optimizer", "make_schedule", "merged", "prepare", "resolve_device", "resolve_dtype", "row_losses",
           "save_pretrained", "save_state", "train_bpe_tokenizer", "train_lm", "trim_padding", "weights_hash"]
