"""Corpora: QA pairs and documents from the formats users bring, with stable ids and groups."""

import json

import numpy as np
import pytest

from expunge.errors import ExpungeError
from expunge.lm import load_corpus

from .tiny import DATA, qa_rows, without_shared, write_qa


def test_qa_array_and_json_lines_give_the_same_rows_ids_and_author_groups(tmp_path):
    rows = qa_rows(45)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = load_corpus(tmp_path / "a.json"), load_corpus(tmp_path / "b.jsonl")
    assert a.prompts == b.prompts == tuple(r["question"] for r in rows)
    assert a.targets == tuple(r["answer"] for r in rows)
    assert a.ids.tolist() == list(range(45))
    assert a.groups[:20] == ("author-0",) * 20 and a.groups[20] == "author-1" and a.groups[44] == "author-2"
    assert a.ids_in_groups("author-1").tolist() == list(range(20, 40))
    assert a.fingerprint() == b.fingerprint()


def test_documents_from_muse_lists_text_lines_and_plain_text_files(tmp_path):
    (tmp_path / "forget.json").write_text(json.dumps(["first article", "second article"]))
    (tmp_path / "retain2.json").write_text(json.dumps(["third article"]))
    (tmp_path / "notes.jsonl").write_text('{"text": "a note", "group": "mine"}\n{"text": "another"}\n')
    (tmp_path / "story.txt").write_text("Once upon a time.\n")
    corpus = load_corpus([tmp_path / "forget.json", tmp_path / "retain2.json", tmp_path / "notes.jsonl",
                          tmp_path / "story.txt"])
    assert corpus.prompts == (None,) * 6
    assert corpus.targets == ("first article", "second article", "third article", "a note", "another",
                              "Once upon a time.\n")
    assert corpus.groups == ("forget", "forget", "retain2", "mine", "notes", "story")
    assert corpus.ids_in_groups(["forget", "story"]).tolist() == [0, 1, 5]
    assert corpus.texts() == list(corpus.targets)


def test_empty_documents_are_skipped_with_a_warning_and_their_ids_stay_unused(tmp_path):
    (tmp_path / "docs.json").write_text(json.dumps(["first", " \n", "third"]))
    (tmp_path / "more.jsonl").write_text('{"text": ""}\n{"text": "fifth"}\n')
    with pytest.warns(UserWarning, match="skipped 2 empty document"):
        corpus = load_corpus([tmp_path / "docs.json", tmp_path / "more.jsonl"])
    assert corpus.targets == ("first", "third", "fifth") and corpus.ids.tolist() == [0, 2, 4]
    with pytest.raises(ExpungeError, match="not in"):
        corpus.rows_of([1])


def test_a_folder_means_its_files_in_name_order_and_ids_follow_the_sources(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(["b0"]))
    (tmp_path / "a.json").write_text(json.dumps(["a0", "a1"]))
    (tmp_path / "ignored.csv").write_text("x\n")
    corpus = load_corpus(tmp_path)
    assert corpus.targets == ("a0", "a1", "b0") and corpus.ids.tolist() == [0, 1, 2]
    assert corpus.rows_of([2, 0]).tolist() == [2, 0]
    taken = corpus.take([2])
    assert taken.ids.tolist() == [2] and taken.targets == ("b0",)


def test_qa_rows_mixed_with_documents_keep_their_kind_and_questions_count_for_authors(tmp_path):
    qa = write_qa(tmp_path, 3)
    (tmp_path / "docs.json").write_text(json.dumps(["a document"]))
    corpus = load_corpus([tmp_path / "docs.json", qa])
    assert [corpus.is_qa(r) for r in range(4)] == [False, True, True, True]
    assert corpus.groups == ("docs", "author-0", "author-0", "author-0")
    assert len(corpus.texts()) == 1 + 2 * 3


@pytest.mark.parametrize("content, message", [
    ([{"question": "Who?", "answer": "  "}], "the answer is empty"),
    ([{"question": "Who?"}], "the answer is empty"),
    ([{"question": "", "answer": "Me."}], "question is missing or empty"),
    ([{"title": "x"}], "needs 'question' and 'answer'"),
    ([3], "must be a string"),
    ({"question": "Who?"}, "must hold a JSON array"),
])
def test_bad_rows_are_refused_with_their_place(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ExpungeError, match=message):
        load_corpus(path)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(ExpungeError, match="does not exist"):
        load_corpus(tmp_path / "missing.json")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ExpungeError, match="unknown format"):
        load_corpus(tmp_path / "data.csv")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ExpungeError, match="line 2"):
        load_corpus(tmp_path / "broken.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ExpungeError, match="no rows"):
        load_corpus(tmp_path / "empty.json")
    with pytest.raises(ExpungeError, match="no data given"):
        load_corpus([])


def test_unknown_ids_and_groups_are_named(tmp_path):
    corpus = load_corpus(write_qa(tmp_path, 3))
    with pytest.raises(ExpungeError, match=r"1 id\(s\) are not in .* e.g. \[7\]"):
        corpus.rows_of([0, 7])
    with pytest.raises(ExpungeError, match="unknown group.*author-0"):
        corpus.ids_in_groups("author-9")


@without_shared("tofu/full.json")
def test_tofu_full_has_200_authors_of_20_and_forget10_is_its_last_400_rows():
    full = load_corpus(DATA / "tofu" / "full.json")
    assert len(full) == 4000 and len(full.group_names()) == 200
    forget = load_corpus([DATA / "tofu" / "retain90.json", DATA / "tofu" / "forget10.json"])
    assert forget.targets == full.targets and forget.groups == full.groups  # full = retain90 + forget10, in order
    last = full.ids_in_groups([f"author-{k}" for k in range(180, 200)])
    assert np.array_equal(last, np.arange(3600, 4000))
    alone = load_corpus(DATA / "tofu" / "forget10.json")
    assert alone.targets == full.take(last).targets


@without_shared("muse_news/privleak/forget.json")
def test_muse_splits_are_groups():
    folder = DATA / "muse_news"
    corpus = load_corpus([folder / "privleak" / "retain2.json", folder / "privleak" / "forget.json"])
    assert len(corpus) == 200 and corpus.group_names() == ["retain2", "forget"]
    assert corpus.ids_in_groups("forget").tolist() == list(range(100, 200))
    with pytest.warns(UserWarning, match="row 821"):  # the one empty article of MUSE's raw forget split
        raw = load_corpus(folder / "raw" / "forget.json")
    assert len(raw) == 888 and raw.ids[-1] == 888 and 821 not in raw.ids and all(p is None for p in raw.prompts)
