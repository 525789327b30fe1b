"""LM unlearning methods (ngdiff, graddiff, npo, simnpo, lm-ascent) as updates of language-model runs: an ordinary
new version with a ledger row that verifies, the guarantee "none by construction, evaluated" with the measured
NLLs, and a crash in the middle that leaves the previous version."""

import importlib.util

import numpy as np
import pytest

from expunge.errors import ExpungeError
from expunge.unlearn import RunModel

missing = [m for m in ("transformers", "tokenizers", "peft") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.skipif(bool(missing), reason=f"the lm extra is not installed ({missing})"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

if not missing:
    from expunge.lm import weights_hash
    from expunge.lm.unlearning import NGDiff
    from expunge.unlearn.audit import verify_run
    from expunge.unlearn.lm_run import LMRun
    from expunge.unlearn.lm_unlearn import NGDiffUpdate

    from .test_lm_run import train_run

UNLEARN = {"lr": 1e-2, "max_steps": 4, "batch_size": 2}


def test_ngdiff_writes_a_version_whose_ledger_row_verifies_and_raises_the_forget_loss(tmp_path):
    run, _ = train_run(tmp_path, n=24)
    first = run.manifest["model_hash"]
    report = run.forget(groups="author-1", method=NGDiffUpdate(**UNLEARN), requested_by="dpo@example.org")
    assert report.method == "ngdiff" and report.version == 2 and report.ids == [20, 21, 22, 23]
    assert report.model_hash_before == first != report.model_hash_after
    guarantee = report.guarantee
    assert guarantee["kind"] == "evaluated" and guarantee["by_construction"] == "none"
    measured = guarantee["measured"]
    assert measured["forget_nll_after"] > measured["forget_nll_before"]
    assert measured["forget_rows"] == 4 and measured["retain_rows_scored"] == 20
    assert report.metrics["steps"] == 4 and report.metrics["groups"] == ["author-1"]  # max_steps of 2 a pass

    reopened = RunModel.load(run.path)
    assert isinstance(reopened, LMRun) and reopened.version == 2 and reopened.manifest["method"]["name"] == "lm-retrain"
    row = reopened.ledger.entries()[-1]
    assert row["method"] == "ngdiff" and row["guarantee"]["kind"] == "evaluated" and row["requested_by"] == "dpo@example.org"
    assert verify_run(run.path).ok
    # the forgotten rows' loss, recomputed from the saved model, went up (as the ledger says)
    from expunge.lm import encode
    from expunge.lm.scoring import row_nlls

    tokens = encode(reopened.universe, reopened.tokenizer, reopened.recipe.max_length)
    assert row_nlls(reopened.model, tokens.take(np.arange(20, 24))).mean() == pytest.approx(
        measured["forget_nll_after"], rel=1e-4)
    # retraining afterwards is still exact retraining on the remaining rows
    assert reopened.forget([0], method="retrain").guarantee["kind"] == "exact"


@pytest.mark.parametrize("method", ["graddiff", "npo", "simnpo", "ascent"])
def test_every_lm_method_is_reached_by_name_on_an_lm_run(method, tmp_path):
    run, _ = train_run(tmp_path, n=12)
    report = run.forget([1, 2], method=method)
    assert report.method == ("lm-ascent" if method == "ascent" else method) and report.version == 2
    assert report.guarantee["by_construction"] == "none" and report.guarantee["steps"] == 5  # defaults: 5 epochs
    assert verify_run(run.path).ok


def test_a_lora_run_updates_its_adapters(tmp_path):
    run, _ = train_run(tmp_path, n=12, lora_rank=2)
    adapters = run.run.current(run.manifest) / "adapters.safetensors"
    before = adapters.read_bytes()
    report = run.forget([1, 2], method=NGDiffUpdate(**UNLEARN))
    assert report.version == 2 and (run.run.current(run.manifest) / "adapters.safetensors").read_bytes() != before
    assert verify_run(run.path).ok


def test_a_crash_in_the_middle_leaves_the_previous_version(tmp_path, monkeypatch):
    run, _ = train_run(tmp_path, n=12)
    model_hash, weights = run.manifest["model_hash"], weights_hash(run.model)
    calls = []

    def crash(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed in the middle")
        return original(self, *args, **kwargs)

    original = NGDiff.step
    monkeypatch.setattr(NGDiff, "step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run.forget([1, 2], method=NGDiffUpdate(**UNLEARN))
    reopened = RunModel.load(run.path)
    assert reopened.version == 1 and reopened.manifest["model_hash"] == model_hash
    assert weights_hash(reopened.model) == weights and len(reopened.ledger.entries()) == 1
    assert verify_run(run.path).ok
    monkeypatch.setattr(NGDiff, "step", original)
    assert reopened.forget([1, 2], method="ngdiff").version == 2


def test_methods_of_the_wrong_kind_and_bad_settings_are_refused(tmp_path):
    from expunge import IndexedDataset, TrainRecipe
    from expunge.unlearn import Fitted

    run, _ = train_run(tmp_path, n=12)
    with pytest.raises(ExpungeError, match="fisher updates tabular runs"):
        run.forget([1], method="fisher")
    with pytest.raises(ExpungeError, match="learning rate must be a positive"):
        NGDiffUpdate(lr=-1)
    with pytest.raises(ExpungeError, match="has no setting"):
        NGDiffUpdate(steps=3)
    rng = np.random.default_rng(0)
    data = IndexedDataset.from_arrays(rng.normal(size=(60, 4)), rng.integers(0, 2, 60))
    tabular = Fitted.train(data, TrainRecipe(model="logreg", epochs=1, batch_size=32), "retrain", out=tmp_path / "tab")
    for method in ("ngdiff", "npo"):
        with pytest.raises(ExpungeError, match=f"{method} updates language-model runs"):
            tabular.forget([1], method=method)
    assert tabular.version == 1 and run.version == 1
