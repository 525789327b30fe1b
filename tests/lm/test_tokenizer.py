"""The byte-level BPE trained on a run's texts: lossless, deterministic, saved and loaded as a HF tokenizer."""

import pytest

from expunge.errors import ExpungeError
from expunge.lm import load_tokenizer, train_bpe_tokenizer

from .tiny import qa_rows

TEXTS = [r["question"] + " " + r["answer"] for r in qa_rows(30)]


def test_every_text_round_trips_and_starts_with_bos():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320)
    assert len(tok) <= 320 and tok.bos_token_id == tok.eos_token_id and tok.pad_token_id != tok.eos_token_id
    for text in ["alpha beta", "never seen: Ünïcødé ✓ 東京", "  spaces\tand\nlines  "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert not tok.chat_template


def test_training_is_deterministic_and_merges_frequent_words():
    a, b = train_bpe_tokenizer(TEXTS, 320), train_bpe_tokenizer(TEXTS, 320)
    assert a.get_vocab() == b.get_vocab()
    assert len(a(" alpha", add_special_tokens=False)["input_ids"]) < len(" alpha")


def test_saved_tokenizer_loads_back_identical(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 320)
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.get_vocab() == tok.get_vocab() and back(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ExpungeError, match="no texts"):
        train_bpe_tokenizer(["", ""])
    with pytest.raises(ExpungeError, match="too small"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ExpungeError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
