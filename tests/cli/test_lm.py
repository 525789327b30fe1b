"""`expunge train --task lm`, `forget --ids/--group`, `info`, `ledger`, `verify`, `receipt` on language-model runs
(a tiny Llama, seconds each). Bad input exits with code 2, says what is wrong and writes nothing."""

import importlib.util
import json

import numpy as np
import pytest

from .helpers import assert_clean_failure, invoke, snapshot, squash, write_ids

missing = [m for m in ("transformers", "tokenizers", "peft") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.skipif(bool(missing), reason=f"the lm extra is not installed ({missing})"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

TINY = json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2})
LM = ["--task", "lm", "--model", "tiny-llama", "--tiny-config", TINY, "--vocab-size", "300", "--max-length", "128",
      "--batch-size", "2", "--lr", "0.05", "--epochs", "2", "--seed", "1"]


def qa_file(folder, n=24, name="qa.json"):
    from ..lm.tiny import write_qa

    return write_qa(folder, n, name)


def train(tmp_path, *extra, n=24, name="run"):
    data = qa_file(tmp_path, n, f"{name}.json")
    out = tmp_path / name
    result = invoke("train", "--data", data, "--out", out, *LM, *extra, "--json", tmp_path / f"{name}-train.json")
    assert result.exit_code == 0, result.output
    return out, data, result


def test_train_forget_info_ledger_verify_receipt(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expunge.lm import load_corpus, prepare, train_lm, weights_hash
    from expunge.lm.recipe import LMRecipe

    run, data, result = train(tmp_path)
    assert squash("trained tiny-llama") in squash(result.stdout) and "from_pretrained" in result.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"]["name"] == "lm-retrain" and manifest["recipe"]["model"] == "tiny-llama"
    assert manifest["lm"]["threads"] == 1 and manifest["data"]["source"] == [str(data.resolve())]
    assert json.loads((tmp_path / "run-train.json").read_text())["kind"] == "train"

    info = invoke("info", run, "--json", tmp_path / "info.json")
    assert info.exit_code == 0, info.output
    summary = json.loads((tmp_path / "info.json").read_text())
    assert summary["lm"]["groups"] == {"author-0": {"rows": 20, "deleted": 0}, "author-1": {"rows": 4, "deleted": 0}}
    assert summary["lm"]["model_path"] == str(run / "versions" / "000001" / "model")
    assert "author-1 4" in info.stdout and squash("versions/000001/model") in squash(info.stdout)

    ids = write_ids(tmp_path / "ids.txt", [2, 9])
    forget = invoke("forget", run, "--ids", ids, "--method", "retrain", "--requested-by", "dpo@example.org",
                    "--reason", "GDPR art. 17", "--reference", "T-9", "--json", tmp_path / "forget.json")
    assert forget.exit_code == 0, forget.output
    report = json.loads((tmp_path / "forget.json").read_text())
    assert report["method"] == "lm-retrain" and report["ids"] == [2, 9] and report["guarantee"]["kind"] == "exact"
    group = invoke("forget", run, "--group", "author-1", "--json", tmp_path / "group.json")
    assert group.exit_code == 0, group.output
    report = json.loads((tmp_path / "group.json").read_text())
    assert report["ids"] == [20, 21, 22, 23] and report["metrics"]["groups"] == ["author-1"] and report["version"] == 3

    # the current weights load with from_pretrained and equal training from scratch on the remaining rows
    model = AutoModelForCausalLM.from_pretrained(run / "versions" / "000003" / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "versions" / "000003" / "model")
    corpus = load_corpus(data)
    setup = prepare(LMRecipe.from_dict(manifest["recipe"]), corpus, tokenizer=tokenizer, tiny_config=json.loads(TINY))
    active = np.ones(24, bool)
    active[[2, 9, 20, 21, 22, 23]] = False
    train_lm(setup.model, setup.data, setup.recipe, active)
    assert weights_hash(model) == weights_hash(setup.model)

    ledger = invoke("ledger", run, "--json", tmp_path / "ledger.json")
    assert ledger.exit_code == 0, ledger.output
    rows = json.loads((tmp_path / "ledger.json").read_text())
    assert [r["kind"] for r in rows] == ["train", "forget", "forget"] and rows[1]["requested_by"] == "dpo@example.org"
    assert rows[1]["reference"] == "T-9" and rows[2]["n_rows"] == 4
    verify = invoke("verify", run)
    assert verify.exit_code == 0, verify.output
    receipt = invoke("receipt", run, "--version", "2", "--out", tmp_path / "receipt.json")
    assert receipt.exit_code == 0, receipt.output
    checked = invoke("verify", run, "--receipt", tmp_path / "receipt.json", "--id", "9")
    assert checked.exit_code == 0, checked.output

    weights = run / "versions" / "000003" / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = bytes(4)
    weights.write_bytes(bytes(raw))
    tampered = invoke("verify", run)
    assert tampered.exit_code == 1 and squash("versions/000003/model/model.safetensors") in squash(tampered.output)


def test_train_with_lr_auto_records_gens_rates_and_forget_retrains_them_exactly(tmp_path):
    from expunge.lm import load_corpus, load_tokenizer, prepare, train_lm, weights_hash
    from expunge.lm.recipe import LMRecipe

    auto = [a for a in LM if a not in ("--lr", "0.05")] + ["--lr", "auto", "--lr-start", "0.01", "--lr-every", "2",
                                                             "--schedule", "cosine"]
    data = qa_file(tmp_path, 16)
    run = tmp_path / "run"
    result = invoke("train", "--data", data, "--out", run, *auto, "--json", tmp_path / "train.json")
    assert result.exit_code == 0, result.output
    assert squash("GeN learning rate: 0.01 at the start") in squash(result.stdout)
    manifest = json.loads((run / "manifest.json").read_text())
    recipe = LMRecipe.from_dict(manifest["recipe"])
    assert recipe.lr_auto and recipe.lr == 0.01 and recipe.lr_every == 2 and recipe.schedule == "cosine"
    trained = json.loads((tmp_path / "train.json").read_text())["metrics"]
    assert len(trained["rates"]) == trained["steps"] and len(set(trained["rates"])) > 1

    forget = invoke("forget", run, "--ids", write_ids(tmp_path / "ids.txt", [0, 5]), "--method", "retrain",
                    "--json", tmp_path / "forget.json")
    assert forget.exit_code == 0, forget.output
    report = json.loads((tmp_path / "forget.json").read_text())
    model_dir = run / "versions" / "000002" / "model"
    setup = prepare(recipe, load_corpus(data), tokenizer=load_tokenizer(model_dir), tiny_config=json.loads(TINY))
    active = np.ones(16, bool)
    active[[0, 5]] = False
    scratch = train_lm(setup.model, setup.data, setup.recipe, active)
    from transformers import AutoModelForCausalLM

    assert weights_hash(AutoModelForCausalLM.from_pretrained(model_dir)) == weights_hash(setup.model)  # bit for bit
    assert report["metrics"]["rates"] == scratch.rates  # and the rates too


def test_bad_lm_requests_exit_cleanly_and_change_nothing(tmp_path):
    run, data, _ = train(tmp_path, n=24)
    before = snapshot(run)
    for args, words in [
        (("forget", run, "--group", "author-7"), ["unknown group(s) ['author-7']", "author-0, author-1"]),
        (("forget", run, "--class", "1"), ["rows have no class", "--group"]),
        (("forget", run, "--group", "author-1", "--method", "deltagrad"), ["deltagrad updates tabular runs"]),
        (("forget", run, "--group", "author-1", "--method", "dp"), ["lm-dp updates only runs trained with it"]),
        (("forget", run, "--ids", write_ids(tmp_path / "bad.txt", [99])), ["not in"]),
        (("forget", run, "--group", "author-1", "--drop-privacy"), ["this run is not private"]),
        (("forget", run, "--group", "author-1", "--lr", "0.1"), ["--lr, --epochs and --steps", "ngdiff"]),
        (("forget", run, "--group", "author-1", "--method", "retrain", "--steps", "2"), ["--lr, --epochs and --steps"]),
        (("forget", run, "--group", "author-1", "--method", "ngdiff", "--lr", "-1"), ["learning rate must be a positive"]),
        (("add", run, "--rows", data), ["takes no added rows"]),
        (("evaluate", run), ["language-model run", "--tofu DIR"]),
    ]:
        assert_clean_failure(invoke(*args), *words)
    assert snapshot(run) == before


def test_a_tabular_run_refuses_groups_and_language_model_methods(run, tmp_path):
    before = snapshot(run)
    assert_clean_failure(invoke("forget", run, "--group", "author-1"), "is a tabular run")
    ids = write_ids(tmp_path / "ids.txt", [0])
    assert_clean_failure(invoke("forget", run, "--ids", ids, "--method", "lm-retrain"),
                         "lm-retrain updates language-model runs", "is a tabular run")
    assert_clean_failure(invoke("forget", run, "--ids", ids, "--method", "ngdiff"),
                         "ngdiff updates language-model runs", "is a tabular run")
    assert_clean_failure(invoke("forget", run, "--ids", ids, "--method", "fisher", "--lr", "0.1"),
                         "--lr, --epochs and --steps")
    assert snapshot(run) == before


def test_forget_with_an_lm_unlearning_method_writes_a_version_that_verifies(tmp_path):
    run, _, _ = train(tmp_path, n=24)
    forget = invoke("forget", run, "--group", "author-1", "--method", "ngdiff", "--lr", "0.01", "--steps", "3",
                    "--json", tmp_path / "ngdiff.json")
    assert forget.exit_code == 0, forget.output
    report = json.loads((tmp_path / "ngdiff.json").read_text())
    assert report["method"] == "ngdiff" and report["version"] == 2 and report["ids"] == [20, 21, 22, 23]
    assert report["guarantee"]["kind"] == "evaluated" and report["guarantee"]["by_construction"] == "none"
    measured = report["guarantee"]["measured"]
    assert measured["forget_nll_after"] > measured["forget_nll_before"] and report["metrics"]["steps"] == 3
    ascent = invoke("forget", run, "--ids", write_ids(tmp_path / "ids.txt", [0]), "--method", "ascent", "--epochs", "1",
                    "--json", tmp_path / "ascent.json")
    assert ascent.exit_code == 0, ascent.output
    assert json.loads((tmp_path / "ascent.json").read_text())["method"] == "lm-ascent"
    ledger = invoke("ledger", run, "--json", tmp_path / "ledger.json")
    assert ledger.exit_code == 0, ledger.output
    assert invoke("verify", run).exit_code == 0


def test_bad_training_input_exits_before_writing(tmp_path):
    data = qa_file(tmp_path, 6)
    out = tmp_path / "out"
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "no-answer.json").write_text(json.dumps([{"question": "Who?", "answer": " "}]))
    for args, words in [
        ((*LM, "--hidden", "32"), ["--hidden apply to tabular runs"]),
        ((*LM, "--method", "sisa"), ["--method apply to tabular runs"]),
        ((*LM[:4], "--tiny-config", "{oops"), ["--tiny-config must be a JSON object"]),
        ((*LM, "--max-length", "16"), ["longer than max_length 16"]),
        (("--task", "lm", "--model", str(empty)), ["no weights"]),
        (("--task", "lm"), ["--task lm needs --model"]),
        (("--lora-rank", "2",), ["--lora-rank apply to language models"]),
        ((*LM, "--dp", "--noise-multiplier", "1", "--delta", "1e-3", "--batch-size", "4", "--grad-accum", "2"),
         ["expected batch", "larger than the data (6 rows)"]),
        ((*LM, "--lr", "auto", "--dp", "--noise-multiplier", "1", "--delta", "1e-3"),
         ["--lr auto (GeN) is not available with --dp", "without being accounted"]),
        ((*LM, "--lr", "auto", "--warmup-steps", "2"), ["has no warm-up"]),
        ((*LM, "--nproc", "2"), ["--nproc trains privately", "add --dp"]),
        ((*LM, "--dp", "--noise-multiplier", "1", "--delta", "1e-3", "--nproc", "0"), ["--nproc must be a positive"]),
        ((*LM, "--dp", "--noise-multiplier", "1", "--delta", "1e-3", "--nproc", "100000"), ["CPU cores"]),
        ((*LM, "--dp", "--noise-multiplier", "1", "--delta", "1e-3", "--batch-size", "1", "--nproc", "2"),
         ["--nproc 2 is more processes than the expected batch has rows", "use at most 1"]),
        ((*LM, "--lr", "fast"), ["'auto'"]),
    ]:
        assert_clean_failure(invoke("train", "--data", data, "--out", out, *args), *words)
    assert_clean_failure(invoke("train", "--data", tmp_path / "no-answer.json", "--out", out, *LM), "answer is empty")
    assert not out.exists()


def test_lora_run_via_the_cli_with_its_corpus_moved(tmp_path):
    run, data, result = train(tmp_path, "--lora-rank", "2", "--method", "retrain", n=12)
    assert squash("LoRA rank 2") in squash(result.stdout)
    info = invoke("info", run, "--json", tmp_path / "info.json")
    assert json.loads((tmp_path / "info.json").read_text())["lm"]["lora"]["rank"] == 2
    moved = data.rename(tmp_path / "moved.json")
    ids = write_ids(tmp_path / "ids.txt", [0])
    assert_clean_failure(invoke("forget", run, "--ids", ids), "no longer exist", "--data")
    forget = invoke("forget", run, "--ids", ids, "--data", moved, "--json", tmp_path / "f.json")
    assert forget.exit_code == 0, forget.output
    assert json.loads((tmp_path / "f.json").read_text())["method"] == "lm-retrain" and info.exit_code == 0


def test_private_run_with_a_public_phase_via_the_cli(tmp_path):
    public = qa_file(tmp_path, 6, "public.json")
    run, _, result = train(tmp_path, "--dp", "--epsilon", "8", "--delta", "1e-3", "--grad-accum", "2",
                           "--public-data", public, "--public-epochs", "1", n=16)
    assert "private: epsilon" in result.stdout and "public phase: 6 rows" in result.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    privacy = manifest["privacy"]
    assert manifest["method"]["name"] == "lm-dp" and privacy["epsilon_pld"] <= 8.0 * 1.001
    assert [p["private"] for p in privacy["phases"]] == [False, True] and manifest["lm"]["public"]["steps"] == 2
    forget = invoke("forget", run, "--group", "author-0", "--ids", write_ids(tmp_path / "ids.txt", [1]))
    assert_clean_failure(forget, "give exactly one of")
    forget = invoke("forget", run, "--ids", write_ids(tmp_path / "ids.txt", [1, 2]), "--method", "retrain",
                    "--json", tmp_path / "f.json")
    assert forget.exit_code == 0, forget.output
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["method"] == "lm-dp" and report["guarantee"]["privacy"]["sample_rate"] == 4 / 14
    assert_clean_failure(invoke("forget", run, "--ids", write_ids(tmp_path / "more.txt", [3]), "--drop-privacy"),
                         "lm-dp keeps the privacy guarantee")
    info = invoke("info", run)
    assert info.exit_code == 0 and "private" in info.stdout


@pytest.mark.slow
def test_private_run_in_two_processes_via_the_cli(tmp_path):
    """`train --task lm --dp --nproc 2`: the run of one process (its epsilon, privacy summary and counts), the
    count recorded for retraining."""
    runs = [train(tmp_path, "--dp", "--epsilon", "8", "--delta", "1e-3", "--grad-accum", "2", *extra, n=16, name=name)
            for name, extra in (("one", ()), ("two", ("--nproc", "2")))]
    (one, _, _), (two, _, result) = runs
    assert squash("(2 processes, data parallel)") in squash(result.stdout) and "private: epsilon" in result.stdout
    a, b = (json.loads((run / "manifest.json").read_text()) for run in (one, two))
    assert b["privacy"] == a["privacy"] and a["privacy"]["epsilon_pld"] <= 8.0 * 1.001
    assert b["method"]["config"] == dict(a["method"]["config"], nproc=2)
    ra, rb = (json.loads((tmp_path / f"{name}-train.json").read_text())["metrics"] for name in ("one", "two"))
    assert {k: rb[k] for k in ("rows", "steps", "tokens", "target_tokens")} == \
        {k: ra[k] for k in ("rows", "steps", "tokens", "target_tokens")}


def tofu_folder(folder, n=24):
    """TOFU's evaluation files in its layout, hand-built from the run's QA pairs: forget01 = author-1 (rows 20..23),
    retain = the rest; paraphrases reword the answer, perturbed answers swap its words."""
    from ..lm.tiny import WORDS, qa_rows

    def shift(text, j):
        return " ".join(WORDS[(WORDS.index(w) + j) % len(WORDS)] if w in WORDS else w for w in text.split())

    def records(rows):
        return [{"question": r["question"], "answer": r["answer"],
                 "paraphrased_answer": r["answer"].replace("writes", "is writing"),
                 "perturbed_answer": [shift(r["answer"], j + 1) for j in range(2)]} for r in rows]

    rows = qa_rows(n)
    folder.mkdir()
    (folder / "forget01.json").write_text(json.dumps(records(rows[20:])))
    (folder / "retain_perturbed.json").write_text(json.dumps(records(rows[:20])))
    return folder


def test_evaluate_an_lm_run_against_its_retrained_reference(tmp_path):
    run, _, _ = train(tmp_path, n=24)
    reference, _, _ = train(tmp_path, n=24, name="reference")
    assert invoke("forget", run, "--group", "author-1", "--method", "ngdiff", "--lr", "0.01", "--steps", "3").exit_code == 0
    assert invoke("forget", reference, "--group", "author-1", "--method", "retrain").exit_code == 0
    tofu = tofu_folder(tmp_path / "tofu")
    scored = invoke("evaluate", run, "--reference", reference, "--tofu", tofu, "--no-world-knowledge",
                    "--max-new-tokens", "8", "--json", tmp_path / "eval.json")
    assert scored.exit_code == 0, scored.output
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"model", "retrain"} and results["retrain"]["forget_quality"] is None
    model = results["model"]
    assert 0 <= model["forget_quality"] <= 1 and 0 <= model["model_utility"] and model["param_dist_to_retrain"] > 0
    assert (run / "reports" / "v2" / "lm-evaluation.png").is_file() and "forget_quality" in scored.stdout
    # the retrained model against itself: the same truth ratios, forget quality 1
    itself = invoke("evaluate", reference, "--reference", reference, "--tofu", tofu, "--no-world-knowledge",
                    "--max-new-tokens", "8", "--json", tmp_path / "self.json")
    assert itself.exit_code == 0, itself.output
    same = json.loads((tmp_path / "self.json").read_text())["model"]
    assert same["forget_quality"] == pytest.approx(1.0) and same["param_dist_to_retrain"] == 0
    before = snapshot(run)
    other, _, _ = train(tmp_path, n=24, name="other")
    assert_clean_failure(invoke("evaluate", run, "--reference", other, "--tofu", tofu, "--no-world-knowledge"),
                         "not trained on the same remaining rows")
    assert_clean_failure(invoke("evaluate", run, "--tofu", tmp_path / "nowhere"), "not found")
    assert snapshot(run) == before
