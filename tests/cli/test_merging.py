"""`expunge merge` and `expunge tradeoff`: one-hot merges bit for bit, the merged run's manifest, the trade-off's
version and ledger row accepted by `expunge verify`, JSON for scripts, and bad input refused before writing."""

import importlib.util
import json
import shutil

import pytest
import torch

from expunge.unlearn import RunModel

from ..merge.zoo import build
from .helpers import assert_clean_failure, invoke, squash


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("zoo"))


def merge_args(zoo, out, *extra):
    return ("merge", "--base", zoo["base"], "--models", zoo["plain"], "--models", zoo["inverted"], "--eval",
            "plain=digits", "--eval", f"inverted={zoo['npz']}", "--out", out, "--quiet", *extra)


def test_one_hot_c_gives_the_fine_tuned_model_bit_for_bit(zoo, tmp_path):
    out = tmp_path / "merged"
    result = invoke(*merge_args(zoo, out, "--method", "task-arithmetic", "--c", "0,1"))
    assert result.exit_code == 0, result.output
    merged, inverted = RunModel.load(out), RunModel.load(zoo["inverted"])
    assert torch.equal(merged.w, inverted.w) and merged.manifest["model_hash"] == inverted.manifest["model_hash"]


def test_merge_writes_a_run_whose_manifest_records_the_merge(zoo, tmp_path):
    out, report = tmp_path / "merged", tmp_path / "merge.json"
    result = invoke(*merge_args(zoo, out, "--prefer", "plain=2,inverted=1", "--json", report))
    assert result.exit_code == 0, result.output
    payload = json.loads(report.read_text())
    record = RunModel.load(out).manifest["merge"]
    assert payload["record"]["c"] == record["c"] and payload["model_hash"] == RunModel.load(out).manifest["model_hash"]
    assert record["base"]["path"] == str(zoo["base"].resolve()) and record["preferences"] == {"plain": 2.0,
                                                                                             "inverted": 1.0}
    assert len(record["task_vectors"]["hashes"]) == 2 and record["predicted"] and record["measured"]
    assert invoke("verify", out).exit_code == 0


def test_merge_prints_the_front_and_where_it_wrote(zoo, tmp_path):
    out = tmp_path / "merged"
    result = invoke(*[a for a in merge_args(zoo, out, "--method", "grid", "--steps", "3") if a != "--quiet"])
    assert result.exit_code == 0, result.output
    text = squash(result.output)
    assert "9evaluatedmerges" in text and "chosenc=" in text and squash(str(out)) in text and "front.png" in text


@pytest.mark.parametrize("extra, words", [
    (("--prefer", "plain=1,fashion=2"), ["unknown metric(s) ['fashion']"]),
    (("--method", "task-arithmetic", "--c", "1.2,0"), ["outside the bounds"]),
    (("--method", "task-arithmetic", "--c", "1,x"), ["--c", "comma-separated numbers"]),
    (("--eval", "broken"), ["--eval 'broken' must look like NAME=VALUE"]),
    (("--eval", "plain=digits"), ["names 'plain' twice"]),
    (("--bounds", "1,0"), ["lo < hi"]),
])
def test_bad_input_is_refused_before_anything_is_written(zoo, tmp_path, extra, words):
    out = tmp_path / "merged"
    assert_clean_failure(invoke(*merge_args(zoo, out, *extra)), *words)
    assert not out.exists()


def test_other_architectures_other_bases_and_existing_out_are_refused(zoo, tmp_path):
    out = tmp_path / "merged"
    args = ("merge", "--base", zoo["base"], "--eval", "plain=digits", "--out", out)
    assert_clean_failure(invoke(*args, "--models", zoo["plain"], "--models", zoo["mlp"]), "another architecture")
    assert_clean_failure(invoke(*args, "--models", zoo["plain"], "--models", zoo["stranger"]),
                         "fine-tuned from another run")
    assert not out.exists()
    out.mkdir()
    assert_clean_failure(invoke(*args, "--models", zoo["plain"]), "exists; --out must name a new directory")
    assert list(out.iterdir()) == []


def test_stray_values_are_refused_with_the_repeated_form(zoo, tmp_path):
    result = invoke("merge", "--base", zoo["base"], "--models", zoo["plain"], zoo["inverted"], "--eval",
                    "plain=digits", "--out", tmp_path / "merged")
    assert_clean_failure(result, "repeat the option before each value")


def test_help_explains_both_commands():
    merge_help, tradeoff_help = squash(invoke("merge", "--help").output), squash(invoke("tradeoff", "--help").output)
    for words in ("theta_0+sum_nc_ntau_n", "--prefer", "front.json", "--c"):
        assert squash(words) in merge_help, words
    for words in ("nonebyconstruction", "deleted", "copyofRUN", "--before"):
        assert squash(words) in tradeoff_help, words


def test_tradeoff_records_an_update_that_verify_accepts(zoo, tmp_path):
    run, copy = tmp_path / "run", tmp_path / "run.v1"
    shutil.copytree(zoo["plain"], run, ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(run, copy)
    assert invoke("forget", run, "--class", "3", "--method", "finetune", "--no-compare", "--quiet").exit_code == 0
    assert_clean_failure(invoke("tradeoff", run, "--before", "1", "--quiet"),
                         "keeps the weights of its current version only", "give a copy of the run")
    assert_clean_failure(invoke("tradeoff", run, "--before", copy, "--eval", "forget=deleted", "--eval",
                                "utility=test"), "--eval forget=DATA and --eval retain=DATA")
    assert RunModel.load(run).version == 2
    result = invoke("tradeoff", run, "--before", copy, "--prefer", "forget=1,retain=3", "--reason", "trade-off",
                    "--json", "-", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["version"] == 3 and payload["record"]["before"]["version"] == 1
    verify = invoke("verify", run)
    assert verify.exit_code == 0, verify.output
    assert invoke("ledger", run, "--json", tmp_path / "ledger.json").exit_code == 0
    last = json.loads((tmp_path / "ledger.json").read_text())[-1]
    assert last["kind"] == "tradeoff" and last["reason"] == "trade-off"
    assert last["guarantee"]["by_construction"] == "none" and set(last["guarantee"]["measured"]) == {"forget", "retain"}


def test_train_init_refuses_what_it_cannot_fine_tune(zoo, tmp_path):
    out = tmp_path / "tuned"
    assert_clean_failure(invoke("train", "--data", "digits", "--out", out, "--init", zoo["base"], "--dp"),
                         "--init fine-tunes a gradient-trained run")
    assert_clean_failure(invoke("train", "--data", "digits", "--out", out, "--init", zoo["mlp"], "--epochs", "1"),
                         "another architecture")
    assert not out.exists()


LM_MISSING = [m for m in ("transformers", "tokenizers", "peft") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(LM_MISSING), reason=f"the lm extra is not installed ({LM_MISSING})")
@pytest.mark.usefixtures("one_thread")
def test_language_model_runs_train_from_a_base_merge_and_trade_off(tmp_path):
    """`train --task lm --init BASE`, `merge` (one-hot: the fine-tune itself; map: a run from_pretrained loads) and
    `tradeoff` after an ngdiff deletion, on tiny Llamas."""
    from transformers import AutoModelForCausalLM

    from ..lm.tiny import qa_rows
    from .test_lm import LM

    rows = qa_rows(24)
    data = {}
    for name, part in (("base", rows), ("a", rows[:8]), ("b", rows[8:16])):
        data[name] = tmp_path / f"{name}.json"
        data[name].write_text(json.dumps([dict(r, group=f"{name}-{i // 4}") for i, r in enumerate(part)]))
    settings = LM[LM.index("--vocab-size"):]  # the recipe without --model and --tiny-config
    assert invoke("train", "--data", data["base"], "--out", tmp_path / "base", *LM, "--quiet").exit_code == 0
    assert_clean_failure(invoke("train", "--data", data["a"], "--out", tmp_path / "x", *LM, "--init",
                                tmp_path / "base"), "--init fine-tunes the init run's current model", "drop --model")
    for name in ("a", "b"):
        result = invoke("train", "--task", "lm", "--init", tmp_path / "base", "--data", data[name], "--out",
                        tmp_path / name, *settings, "--quiet")
        assert result.exit_code == 0, result.output
    base = RunModel.load(tmp_path / "base")
    assert RunModel.load(tmp_path / "a").manifest["init"]["run_id"] == base.run_id

    args = ("merge", "--base", tmp_path / "base", "--models", tmp_path / "a", "--models", tmp_path / "b", "--eval",
            f"a={data['a']}", "--eval", f"b={data['b']}")
    result = invoke(*args, "--method", "task-arithmetic", "--c", "0,1", "--out", tmp_path / "one_hot", "--quiet")
    assert result.exit_code == 0, result.output
    assert RunModel.load(tmp_path / "one_hot").manifest["model_hash"] == RunModel.load(tmp_path / "b").manifest[
        "model_hash"]
    result = invoke(*args, "--method", "map", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert squash("answer probability") in squash(result.output) and "chosen c" in result.output
    merged = RunModel.load(tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(merged.model_path).config.model_type == "llama"
    assert invoke("verify", tmp_path / "merged").exit_code == 0
    assert squash("answer probability") in squash(invoke("merge", "--help").output)

    run, copy = tmp_path / "a", tmp_path / "a.v1"
    shutil.copytree(run, copy)
    assert invoke("forget", run, "--group", "a-1", "--method", "ngdiff", "--quiet").exit_code == 0
    assert_clean_failure(invoke("tradeoff", run, "--before", copy, "--quiet"), "no test split", "'rows'")
    result = invoke("tradeoff", run, "--before", copy, "--eval", "forget=deleted", "--eval", "retain=rows",
                    "--method", "grid", "--steps", "5", "--json", "-", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["version"] == 3 and payload["record"]["score"] == "answer probability"
    assert invoke("verify", run).exit_code == 0
