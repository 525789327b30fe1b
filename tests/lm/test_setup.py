"""prepare: every refusal comes before anything is written, and a good request is ready to train."""

import json
import os

import pytest

from expunge.errors import ExpungeError
from expunge.lm import LMRecipe, load_corpus, prepare, save_pretrained, train_bpe_tokenizer

from .tiny import TINY_LLAMA, qa_corpus, qa_rows, tiny_setup


@pytest.fixture
def nothing_written(tmp_path, monkeypatch):
    """Run in an empty folder and check it stays empty."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    assert os.listdir(work) == []


def test_a_document_corpus_is_ready_to_train(tmp_path):
    (tmp_path / "forget.json").write_text(json.dumps(["alpha beta gamma " * 3, "delta epsilon"]))
    (tmp_path / "retain2.json").write_text(json.dumps(["zeta eta theta"]))
    setup = tiny_setup(load_corpus([tmp_path / "forget.json", tmp_path / "retain2.json"]), max_length=32)
    assert setup.kind == "tiny" and setup.recipe.device == "cpu" and setup.recipe.dtype == "float32"
    assert setup.data.groups == ("forget", "forget", "retain2") and setup.data.qa_format is None
    assert setup.model.config.vocab_size == len(setup.tokenizer)


def test_bad_input_is_refused_before_anything_is_written(tmp_path, nothing_written):
    corpus = qa_corpus(tmp_path, 4)
    with pytest.raises(ExpungeError, match="unknown model"):
        prepare(LMRecipe(model="tiny-mamba"), corpus)
    with pytest.raises(ExpungeError, match="longer than max_length 8"):
        tiny_setup(corpus, max_length=8)
    folder = tmp_path / "model"
    small = tiny_setup(corpus)
    save_pretrained(small.model, small.tokenizer, folder)
    with pytest.raises(ExpungeError, match="longer than the model's 64 positions"):
        prepare(LMRecipe(model=str(folder), max_length=65), corpus)
    bigger = train_bpe_tokenizer([r["answer"] for r in qa_rows(40)] * 2 + ["qq rr ss tt uu vv ww"], 420)
    with pytest.raises(ExpungeError, match="do not belong together"):
        prepare(LMRecipe(model=str(folder), max_length=64), corpus, tokenizer=bigger)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExpungeError, match="no weights"):
        prepare(LMRecipe(model=str(folder), max_length=64), corpus)
    (tmp_path / "empty.json").write_text(json.dumps([{"question": "Who?", "answer": ""}]))
    with pytest.raises(ExpungeError, match="answer is empty"):
        load_corpus(tmp_path / "empty.json")
    with pytest.raises(ExpungeError, match="not modules of this model"):
        prepare(LMRecipe(model="tiny-llama", lora_rank=2, lora_targets=("nope",), max_length=64, vocab_size=300),
                corpus, tiny_config=TINY_LLAMA)
