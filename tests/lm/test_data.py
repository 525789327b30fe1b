"""Tokenized rows: answer-only targets (plain and chat formats), the length policy, padded batches."""

import copy
import json

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import encode, load_corpus, train_bpe_tokenizer, trim_padding
from expunge.lm.data import IGNORE

from .tiny import qa_rows, write_qa

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([r["question"] + " " + r["answer"] for r in qa_rows(30)] + ["<|im_start|>"], 400)


def targets(data, row):
    return [int(t) for t in data.labels[row] if t != IGNORE]


def test_plain_format_masks_the_question_and_targets_the_answer_and_eos(tmp_path, tok):
    corpus = load_corpus(write_qa(tmp_path, 3))
    data = encode(corpus, tok, 64)
    assert data.qa_format == "plain" and data.ids.tolist() == [0, 1, 2]
    for row in range(3):
        answer = tok(" " + corpus.targets[row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert targets(data, row) == answer
        n = len(data.input_ids[row])
        assert data.labels[row][n - len(answer):].tolist() == answer  # the answer closes the row
        assert (data.labels[row][:n - len(answer)] == IGNORE).all()  # everything before it is masked
        assert tok.decode(data.input_ids[row]) == (f"{tok.bos_token}Question: {corpus.prompts[row]}\nAnswer: "
                                                   f"{corpus.targets[row]}{tok.eos_token}")
    assert data.target_counts().tolist() == [len(targets(data, r)) for r in range(3)]


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path, tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT
    corpus = load_corpus(write_qa(tmp_path, 2))
    data = encode(corpus, chat, 96)
    assert data.qa_format == "chat"
    text = chat.decode(data.input_ids[0])
    assert text == f"<|im_start|>user\n{corpus.prompts[0]}<|im_end|>\n<|im_start|>assistant\n{corpus.targets[0]}<|im_end|>\n"
    assert chat.decode(targets(data, 0)) == f"{corpus.targets[0]}<|im_end|>\n"


def test_documents_target_every_token_after_bos(tmp_path, tok):
    (tmp_path / "d.json").write_text(json.dumps(["alpha beta gamma", "delta"]))
    data = encode(load_corpus(tmp_path / "d.json"), tok, 64)
    assert data.qa_format is None
    ids = data.input_ids[0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert data.labels[0][0] == IGNORE and data.labels[0][1:].tolist() == ids[1:]


def test_too_long_qa_is_refused_and_too_long_documents_are_truncated_with_a_warning(tmp_path, tok):
    qa = load_corpus(write_qa(tmp_path, 6))
    longest = max(len(x) for x in encode(qa, tok, 512).input_ids)
    with pytest.raises(ExpungeError, match=f"longer than max_length 10 tokens \\(longest {longest}.*--max-length"):
        encode(qa, tok, 10)
    (tmp_path / "d.json").write_text(json.dumps(["alpha beta gamma delta epsilon zeta eta theta " * 3, "mu"]))
    docs = load_corpus(tmp_path / "d.json")
    with pytest.warns(UserWarning, match="1 document\\(s\\) are longer than max_length 8.*ids \\[0\\]"):
        data = encode(docs, tok, 8)
    assert data.lengths.tolist()[0] == 8 and data.input_ids[0][-1] != tok.eos_token_id
    full = encode(docs, tok, 512)
    assert data.input_ids[0].tolist() == full.input_ids[0][:8].tolist()
    with pytest.raises(ExpungeError, match="longer than max_length 8"):
        encode(docs, tok, 8, truncate_documents=False)


def test_batches_are_right_padded_with_masks_and_ignored_labels(tmp_path, tok):
    data = encode(load_corpus(write_qa(tmp_path, 5)), tok, 64)
    rows = np.array([3, 0, 4])
    batch = data.batch(rows)
    width = data.lengths[rows].max()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.int64
    for k, r in enumerate(rows):
        n = data.lengths[r]
        assert batch["input_ids"][k, :n].tolist() == data.input_ids[r].tolist()
        assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][k, n:] == IGNORE).all() and (batch["input_ids"][k, n:] == data.pad_id).all()
    item = data[1]
    assert item["input_ids"].shape == (data.width,)
    stacked = {k: torch.stack([data[int(r)][k] for r in rows]) for k in item}
    trimmed = trim_padding(stacked)
    assert all(torch.equal(trimmed[k], batch[k]) for k in batch)


def test_take_rows_of_and_fingerprint(tmp_path, tok):
    data = encode(load_corpus(write_qa(tmp_path, 5)), tok, 64)
    part = data.take(data.rows_of([4, 1]))
    assert part.ids.tolist() == [4, 1] and part.input_ids[0].tolist() == data.input_ids[4].tolist()
    assert part.fingerprint() != data.fingerprint() and data.take(np.arange(5)).fingerprint() == data.fingerprint()
    with pytest.raises(ExpungeError, match="not in"):
        data.rows_of([9])
