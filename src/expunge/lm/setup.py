"""prepare: from a recipe and a corpus to a model, tokenizer and token dataset ready to train, writing nothing.

    setup = prepare(LMRecipe(model="tiny-llama", max_length=128), load_corpus("tofu/full.json"))
    initial = save_state(setup.model, "initial.safetensors")
    result = train_lm(setup.model, setup.data, setup.recipe)
    save_pretrained(setup.model, setup.tokenizer, "model/")

Every check that can refuse the input (model name, weights, GGUF quantisation, vocabularies, max_length
against the model's positions, QA pairs that do not fit) runs here, before a caller writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .corpus import Corpus
from .data import TokenDataset, encode
from .lora import apply_lora
from .models import check_max_length, load_lm
from .recipe import LMRecipe


@dataclass
class LMSetup:
    """The resolved recipe (device and dtype filled in), the model (LoRA-wrapped when the recipe asks), its
    tokenizer, the tokenized rows, and where the model came from (``kind``: tiny, folder or gguf; ``source``)."""

    recipe: LMRecipe
    model: torch.nn.Module
    tokenizer: object
    data: TokenDataset
    kind: str
    source: str


def prepare(recipe: LMRecipe, corpus: Corpus, *, tokenizer=None, tiny_config: dict | None = None,
            truncate_documents: bool = True) -> LMSetup:
    """Load or build the recipe's model (a tiny one trains its tokenizer on ``corpus``, unless ``tokenizer`` is
    given), check it against the recipe, tokenize the corpus and apply LoRA; see models.load_lm and data.encode."""
    recipe = recipe.resolved()
    lm = load_lm(recipe.model, device=recipe.device, dtype=recipe.dtype, seed=recipe.seed, texts=corpus.texts(),
                 tokenizer=tokenizer, max_length=recipe.max_length, vocab_size=recipe.vocab_size, tiny_config=tiny_config)
    check_max_length(lm.model, recipe.max_length)
    data = encode(corpus, lm.tokenizer, recipe.max_length, truncate_documents)
    model = lm.model
    if recipe.lora:
        model = apply_lora(model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets, recipe.lora_dropout,
                           recipe.seed)
    return LMSetup(recipe, model, lm.tokenizer, data, lm.kind, lm.source)
