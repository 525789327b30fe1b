"""The MUSE evaluation: Min-K% by hand, VerbMem of a model that memorised its documents, PrivLeak against the
retrained model, and the shared MUSE-News files."""

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import load_corpus, metrics, train_lm
from expunge.lm.muse import MuseData, evaluate_muse, knowmem, load_muse, min_k_of_texts, verbmem

from .tiny import DATA, WORDS, tiny_setup, without_shared

DOCS = [" ".join(WORDS[(7 * d + 3 * i) % len(WORDS)] for i in range(24)) + "." for d in range(4)]
HOLDOUT = [" ".join(WORDS[(5 * d + 2 * i + 1) % len(WORDS)] for i in range(24)) + "." for d in range(4)]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("docs") / "docs.json"
    path.write_text(json.dumps(DOCS))
    s = tiny_setup(load_corpus(path), epochs=60, lr=2e-2, batch_size=4, vocab_size=300, max_length=64)
    train_lm(s.model, s.data, s.recipe)
    return s


def test_min_k_of_texts_equals_a_hand_computation(memorised):
    model, tok = memorised.model.eval(), memorised.tokenizer
    got = min_k_of_texts(model, tok, DOCS[:2] + HOLDOUT[:1], k=0.4, batch_size=2)
    for text, score in zip(DOCS[:2] + HOLDOUT[:1], got):
        ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        token_logp = np.sort([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))])
        assert score == pytest.approx(token_logp[:int(0.4 * len(token_logp))].mean(), abs=1e-5)


def test_a_model_that_memorised_its_documents_repeats_them_and_leaks_them(memorised):
    model, tok = memorised.model, memorised.tokenizer
    items = [(doc[:40], doc[40:]) for doc in DOCS]
    memorised_score = verbmem(model, tok, items, max_new_tokens=24)
    fresh = tiny_setup(load_corpus_of(DOCS), tokenizer=tok, seed=5)  # same architecture, never trained
    assert memorised_score.mean() > 0.6 > verbmem(fresh.model, tok, items, max_new_tokens=24).mean()
    data = MuseData(verbmem=tuple(items), privleak_forget=tuple(DOCS), privleak_holdout=tuple(HOLDOUT))
    reference = evaluate_muse(fresh.model, tok, data, verbmem_new_tokens=24)
    out = evaluate_muse(model, tok, data, reference=reference, verbmem_new_tokens=24)
    assert out.figures["privleak_auc"] == 1.0  # members and non-members apart
    assert out.figures["privleak"] == pytest.approx(metrics.privleak(1.0, reference.auc))
    assert evaluate_muse(model, tok, data, reference=out.auc).figures["privleak"] == 0.0  # itself as the reference
    assert reference.figures["privleak"] is None


def load_corpus_of(texts):
    from expunge.lm.corpus import Corpus

    return Corpus((None,) * len(texts), tuple(texts), np.arange(len(texts)), ("docs",) * len(texts))


def test_knowmem_answers_after_in_context_examples_and_stops_at_the_next_question(memorised, monkeypatch):
    from expunge.lm import muse

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, stop=()):
        seen.update(prompts=[tokenizer.decode(p) for p in prompts], stop=stop, max_new_tokens=max_new_tokens)
        return ["alpha beta", "nothing"]

    monkeypatch.setattr(muse, "generate", fake_generate)
    tok = memorised.tokenizer
    scores = knowmem(memorised.model, tok, [("q1?", "alpha beta"), ("q2?", "gamma")], [("e?", "f")])
    assert scores.tolist() == [1.0, 0.0] and seen["max_new_tokens"] == 32 and "\n\n" in seen["stop"]
    assert seen["prompts"][0] == f"{tok.bos_token}Question: e?\nAnswer: f\n\nQuestion: q1?\nAnswer:"
    with pytest.raises(ExpungeError, match="nothing to evaluate"):
        evaluate_muse(memorised.model, tok, MuseData())
    with pytest.raises(ExpungeError, match="unknown MUSE part"):
        MuseData().take(books=3)


@without_shared("muse_news/verbmem/forget.json")
def test_the_shared_muse_news_files_load():
    data = load_muse(DATA / "muse_news")
    assert (len(data.verbmem), len(data.knowmem_forget), len(data.knowmem_retain)) == (100, 100, 100)
    assert len(data.privleak_forget) == len(data.privleak_holdout) == 100 and len(data.icl_forget) > 0
    small = data.take(verbmem=3, privleak_forget=5)
    assert len(small.verbmem) == 3 and len(small.privleak_forget) == 5 and len(small.privleak_holdout) == 100
