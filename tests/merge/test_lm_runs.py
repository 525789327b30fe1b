"""merge_runs and tradeoff_run on Hugging Face LM runs (tiny-llama): fine-tunes recorded by --init, one-hot c bit for
bit, the merged run's record and its answer-probability scores checked by hand on the model from_pretrained loads,
LoRA runs merged as full models, the forgetting trade-off as the run's next version, and bad input refused before
anything is written."""

import importlib.util
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.unlearn import RunModel

missing = [m for m in ("transformers", "tokenizers", "peft") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.skipif(bool(missing), reason=f"the lm extra is not installed ({missing})"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

if not missing:
    from expunge.lm import LMRecipe, encode, load_corpus
    from expunge.merge import TaskVectors, interpolation, merge_runs, tradeoff_run
    from expunge.unlearn.audit import verify_run
    from expunge.unlearn.lm_run import LMRun
    from expunge.unlearn.lm_unlearn import NGDiffUpdate

    from ..lm.tiny import TINY_LLAMA, hand_logprob, qa_rows

RECIPE = dict(max_length=128, vocab_size=300, batch_size=2, lr=0.05, epochs=1, seed=3)


def write(path, rows, groups):
    path.write_text(json.dumps([dict(r, group=g) for r, g in zip(rows, groups)]))
    return path


def train(root, name, data, init=None, tiny=None, **changes):
    recipe = LMRecipe(model=str(init.model_path) if init is not None else "tiny-llama", **dict(RECIPE, **changes))
    tiny_config = None if init is not None else dict(TINY_LLAMA, **(tiny or {}))
    return LMRun.train(load_corpus(data), recipe, out=root / name, source=data, tiny_config=tiny_config, init=init)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """{name: path}: base (tiny-llama on 24 QA pairs), task_a and task_b (8 pairs each, groups a-0/a-1, b-0/b-1),
    a and b (full fine-tunes of base on them), lora (a LoRA fine-tune on b), stranger (fine-tuned from another
    base), wide (another hidden size), own_tokenizer (a tiny-llama whose BPE was trained on other texts)."""
    root = tmp_path_factory.mktemp("lm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (function-scoped) does for the tests
    try:
        return _build(root)
    finally:
        torch.set_num_threads(threads)


def _build(root) -> dict:
    rows = qa_rows(24)
    base_data = write(root / "base.json", rows, ["author-0"] * 12 + ["author-1"] * 12)
    task_a = write(root / "task_a.json", rows[:8], ["a-0"] * 4 + ["a-1"] * 4)
    task_b = write(root / "task_b.json", rows[8:16], ["b-0"] * 4 + ["b-1"] * 4)
    base = train(root, "base", base_data)
    other = train(root, "other_base", base_data, seed=7)
    runs = {"root": root, "task_a": task_a, "task_b": task_b, "base": base.path, "other_base": other.path}
    runs["a"] = train(root, "a", task_a, init=base, epochs=3, seed=1).path
    runs["b"] = train(root, "b", task_b, init=base, epochs=3, seed=2).path
    runs["lora"] = train(root, "lora", task_b, init=base, epochs=3, seed=2, lora_rank=2).path
    runs["stranger"] = train(root, "stranger", task_a, init=other, epochs=1).path
    runs["wide"] = train(root, "wide", base_data, tiny={"hidden_size": 48}).path
    runs["own_tokenizer"] = train(root, "own_tokenizer", task_b).path
    return runs


def evals(lm):
    return {"a": str(lm["task_a"]), "b": str(lm["task_b"])}


def hand_probability(model_path, data, rows=None) -> float:
    """TOFU's answer probability by hand: each row alone and unpadded, float64, the model from_pretrained loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokens = encode(load_corpus(data), AutoTokenizer.from_pretrained(model_path), RECIPE["max_length"])
    rows = range(len(tokens)) if rows is None else rows
    return float(np.mean([np.exp(total / n) for total, n in (hand_logprob(model, tokens, r) for r in rows)]))


def test_init_fine_tunes_the_base_model_and_records_it(lm):
    base, a, lora = RunModel.load(lm["base"]), RunModel.load(lm["a"]), RunModel.load(lm["lora"])
    for run in (a, lora):
        assert run.manifest["init"] == {"path": str(base.path.resolve()), "run_id": base.run_id, "version": 1,
                                        "model_hash": base.manifest["model_hash"]}
        assert run.architecture() == base.architecture()  # same config and tokenizer; LoRA's model is a full one
    recipe = replace(a.recipe, model="tiny-llama")
    with pytest.raises(ExpungeError, match="the recipe's model must be"):
        LMRun.train(load_corpus(lm["task_a"]), recipe, out=lm["root"] / "never", init=base)
    assert not (lm["root"] / "never").exists()


def test_one_hot_c_gives_the_fine_tuned_model_bit_for_bit(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    for c, name in (([1.0, 0.0], "a"), ([0.0, 1.0], "b")):
        out = tmp_path / name
        merge_runs(lm["base"], [lm["a"], lm["b"]], evals(lm), "task-arithmetic", c=c, out=out)
        merged, model = RunModel.load(out), RunModel.load(lm[name])
        assert merged.manifest["model_hash"] == model.manifest["model_hash"]
        loaded, tuned = (AutoModelForCausalLM.from_pretrained(r.model_path).state_dict() for r in (merged, model))
        assert loaded.keys() == tuned.keys() and all(torch.equal(loaded[k], tuned[k]) for k in loaded)
    zero = merge_runs(lm["base"], [lm["a"], lm["b"]], evals(lm), "task-arithmetic", c=[0, 0], out=tmp_path / "zero")
    assert zero.run.manifest["model_hash"] == RunModel.load(lm["base"]).manifest["model_hash"]


def test_the_merged_run_records_what_made_it_and_its_scores_are_answer_probabilities(lm, tmp_path):
    out = tmp_path / "merged"
    outcome = merge_runs(lm["base"], [lm["a"], lm["b"]], evals(lm), "map", preferences={"a": 1, "b": 1}, out=out)
    merged = RunModel.load(out)  # opens like any run, its integrity checked
    assert isinstance(merged, LMRun) and verify_run(out).ok
    record = merged.manifest["merge"]
    base, a, b = (RunModel.load(lm[k]) for k in ("base", "a", "b"))
    assert record["score"] == "answer probability" and record["base"]["model_hash"] == base.manifest["model_hash"]
    assert [m["model_hash"] for m in record["models"]] == [a.manifest["model_hash"], b.manifest["model_hash"]]
    assert [m["base_check"] for m in record["models"]] == ["init", "init"]
    vectors = TaskVectors.from_models(base.model_state(), [a.model_state(), b.model_state()], min_cosine=None)
    assert record["task_vectors"]["hashes"] == vectors.hashes()
    state, expected = merged.model_state(), vectors.merge(record["c"])
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert set(record["predicted"]) == set(record["measured"]) == {"a", "b"}
    for task, data in (("a", lm["task_a"]), ("b", lm["task_b"])):
        assert 0 < record["measured"][task] < 1
        assert record["measured"][task] == pytest.approx(hand_probability(merged.model_path, data), rel=1e-5)
    assert record["evaluations"] == outcome.result.n_evaluations == 15  # 12 design points + 3 held out
    folder = merged.run.current(merged.manifest)
    assert json.loads((folder / "front.json").read_text())["chosen"]["c"] == record["c"]
    assert {"front.json", "front.png"} <= set(merged.manifest["files"])
    assert merged.manifest["method"]["name"] == "lm-merge" and merged.guarantees() == set()
    row = merged.ledger.entries()[-1]
    assert row["kind"] == "merge" and row["guarantee"]["kind"] == "evaluated"
    with pytest.raises(ExpungeError, match="does not serve forget requests"):
        merged.forget(groups="a-0" if "a-0" in merged.groups() else "author-0")
    assert RunModel.load(out).version == merged.version


def test_a_lora_run_merges_as_the_full_model_its_adapters_make(lm, tmp_path):
    out = tmp_path / "with_lora"
    merge_runs(lm["base"], [lm["a"], lm["lora"]], evals(lm), "task-arithmetic", c=[0.0, 1.0], out=out)
    merged, lora = RunModel.load(out), RunModel.load(lm["lora"])
    assert merged.manifest["model_hash"] == lora.manifest["model_hash"]
    assert not merged.recipe.lora and merged.describe()["lora"] is None


@pytest.mark.parametrize("case, words", [
    ("architecture", ["another architecture", "config.hidden_size: 48 vs 32"]),
    ("tokenizer", ["another architecture", "tokenizer:"]),
    ("other base", ["fine-tuned from another run"]),
    ("eval missing", ["evaluation set 'b'", "does not exist"]),
    ("eval too long", ["evaluation set 'b'", "longer than max_length 128"]),
    ("c outside", ["outside the bounds"]),
])
def test_bad_input_is_refused_before_anything_is_written(lm, tmp_path, case, words):
    out, models, ev, kwargs = tmp_path / "merged", [lm["a"], lm["b"]], evals(lm), {}
    if case == "architecture":
        models = [lm["a"], lm["wide"]]
    elif case == "tokenizer":
        models = [lm["a"], lm["own_tokenizer"]]
    elif case == "other base":
        models = [lm["a"], lm["stranger"]]
    elif case == "eval missing":
        ev["b"] = str(tmp_path / "absent.json")
    elif case == "eval too long":
        ev["b"] = str(write(tmp_path / "long.json", [{"question": "Why?", "answer": " ".join(["alpha"] * 300)}], ["x"]))
    elif case == "c outside":
        kwargs = {"c": [1.5, 0.0]}
    with pytest.raises(ExpungeError) as caught:
        merge_runs(lm["base"], models, ev, "task-arithmetic" if kwargs else "map", out=out, **kwargs)
    for w in words:
        assert w in str(caught.value)
    assert not out.exists()


def test_tradeoff_records_the_chosen_point_between_an_lm_run_and_its_unlearning(lm, tmp_path):
    work, copy = tmp_path / "a", tmp_path / "a.v1"
    shutil.copytree(lm["a"], work)
    shutil.copytree(lm["a"], copy)
    with RunModel.locked(work) as run:
        before = run.model_state()
        run.forget(groups="a-1", method=NGDiffUpdate(lr=1e-2, max_steps=4, batch_size=2))
        after = run.model_state()
        outcome = tradeoff_run(run, str(copy), evals={"forget": "deleted", "retain": "rows"}, method="grid", steps=5,
                               preferences={"forget": 1, "retain": 1})
    run = RunModel.load(work)
    assert run.version == 3 and verify_run(work).ok
    row = run.ledger.entries()[-1]
    assert row["kind"] == "tradeoff" and row["method"] == "lm-tradeoff" and row["guarantee"]["kind"] == "evaluated"
    c = outcome.chosen["c"]
    expected, state = interpolation(before, after).merge(c), run.model_state()
    assert all(torch.equal(state[k], expected[k]) for k in state)  # the next version is the chosen point
    record = outcome.record
    assert record["score"] == "answer probability" and record["eval"]["forget"]["rows"] == 4
    forgotten = hand_probability(run.model_path, lm["task_a"], rows=[4, 5, 6, 7])  # group a-1
    assert record["measured"]["forget"] == pytest.approx(forgotten, rel=1e-5)
    assert {"front.json", "front.png"} <= set(run.manifest["files"])


def test_tradeoff_refuses_a_lora_run_before_writing(lm, tmp_path):
    work, copy = tmp_path / "lora", tmp_path / "lora.v1"
    shutil.copytree(lm["lora"], work)
    shutil.copytree(lm["lora"], copy)
    with RunModel.locked(work) as run:
        run.forget(groups="b-1", method=NGDiffUpdate(lr=1e-2, max_steps=2, batch_size=2))
        with pytest.raises(ExpungeError, match="LoRA run cannot hold it"):
            tradeoff_run(run, str(copy), evals={"forget": "deleted", "retain": "rows"}, method="grid", steps=3)
    assert RunModel.load(work).version == 2


def test_a_zoo_run_and_an_lm_run_do_not_merge(lm, tmp_path):
    from expunge import Fitted
    from expunge.data import load_dataset

    from .zoo import RECIPE

    train_set, test_set = load_dataset("digits")
    zoo = Fitted.train(train_set, RECIPE, "deltagrad", out=tmp_path / "zoo", test=test_set, source="digits")
    with pytest.raises(ExpungeError, match="another architecture \\(kind: zoo vs lm\\)"):
        merge_runs(lm["base"], [lm["a"], zoo.path], evals(lm), "map", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
