"""Small corpora and tiny model configs shared by the LM tests (seconds each, nothing downloaded)."""

import json
from pathlib import Path

import pytest
import torch

from expunge.lm import LMRecipe, load_corpus, prepare

from ..bench.shared_data import DATA

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=2)
TINY = {"tiny-llama": TINY_LLAMA, "tiny-gpt2": TINY_GPT2}

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def qa_rows(n: int) -> list[dict]:
    """n QA pairs of varied lengths, deterministic."""
    rows = []
    for i in range(n):
        subject = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 3))
        rows.append({"question": f"What does {subject} write about?",
                     "answer": f"{subject.title()} writes about " + " ".join(WORDS[(3 * i + k) % len(WORDS)]
                                                                          for k in range(2 + i % 5)) + "."})
    return rows


def write_qa(folder: Path, n: int = 12, name: str = "qa.json") -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(qa_rows(n)))
    return path


def qa_corpus(folder: Path, n: int = 12):
    return load_corpus(write_qa(folder, n))


def tiny_setup(corpus, model: str = "tiny-llama", config: dict | None = None, tokenizer=None, **recipe):
    recipe = LMRecipe(model=model, **dict(dict(max_length=64, vocab_size=300, batch_size=2, lr=1e-2), **recipe))
    return prepare(recipe, corpus, tokenizer=tokenizer, tiny_config=dict(TINY[model], **(config or {})))


def without_shared(relative: str):
    """Skip (with the reason) when the shared data file is absent; reading it is fast, so not marked slow."""
    path = DATA / relative
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found (set EXPUNGE_DATA to the shared data folder)")


def hand_logprob(model, data, row) -> tuple[float, int]:
    """Summed log-probability of one row's target tokens, the row alone and unpadded, in float64."""
    ids = torch.from_numpy(data.input_ids[row])
    labels = data.labels[row]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    targets = [t for t in range(1, len(ids)) if labels[t] != -100]
    return float(sum(logp[t - 1, ids[t]] for t in targets)), len(targets)
