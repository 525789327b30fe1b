"""The tiny-LM task of the long DP-optimizers benchmark, on real TOFU rows (a few hundred): held-out perplexity
against a per-token loop, the private run's accounting, and the task inside the benchmark (tuning, table, plot)."""

import math

import numpy as np
import pytest
import torch

from expunge.bench import dp_mnist, dp_optimizers_long, dp_tiny_lm, read_results

from .shared_data import DATA, needs

pytestmark = needs("tofu/full.json")
SOURCE = DATA / "tofu" / "full.json"


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    return dp_tiny_lm.load(SOURCE, limit=96)


def test_split_holds_out_every_fifth_pair_of_each_author():
    train, test = dp_tiny_lm.load(SOURCE, limit=None)
    assert (len(train), len(test)) == (1600, 400)
    assert set(train.data.ids) & set(test.data.ids) == set()
    assert all(i % dp_tiny_lm.HOLD_OUT == dp_tiny_lm.HOLD_OUT - 1 for i in test.data.ids)


def test_heldout_loss_is_the_token_weighted_answer_nll(rows):
    _, test = rows
    model = dp_tiny_lm._model(test, seed=3).eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for i in range(len(test)):  # one row at a time, every answer token by hand
            x, y = test.data.input_ids[i], test.data.labels[i]
            logp = torch.log_softmax(model(input_ids=torch.tensor(x)[None]).logits[0].double(), -1)
            for t in range(1, len(x)):
                if y[t] != -100:
                    nll -= float(logp[t - 1, y[t]])
                    tokens += 1
    assert dp_tiny_lm.heldout_loss(model, test, batch=5) == pytest.approx(nll / tokens, rel=1e-5)


def test_private_run_spends_its_budget_and_scores_perplexity(rows):
    train, test = rows
    from expunge.privacy import DiSK

    recipe = dp_mnist.Recipe(batch_size=16, epochs=2, lr=0.004, optimizer="adam", max_grad_norm=1.0)
    row = dp_tiny_lm.train(train, test, 8.0, recipe, seed=0, transforms=[DiSK(0.7, 0.3 / 0.7)])
    assert row["epsilon_pld"] == pytest.approx(8.0, rel=1e-3) and row["steps"] == 2 * math.ceil(len(train) / 16)
    assert row["perplexity"] == pytest.approx(math.exp(row["heldout_loss"]))
    assert row["heldout_loss"] < row["initial_heldout_loss"]  # it learned something at epsilon 8
    again = dp_tiny_lm.train(train, test, 8.0, recipe, seed=0, transforms=[DiSK(0.7, 0.3 / 0.7)])
    assert again["perplexity"] == row["perplexity"]  # seeded: the same run twice


def test_the_benchmark_tunes_and_reports_the_task(tmp_path):
    out = tmp_path / "dp-optimizers-long.json"
    rows = dp_optimizers_long.main(DATA, out, limit=120, progress=False, epsilons=(8.0,), datasets=("tofu-lm",),
                                   methods=("dp-sgd", "dp-adam", "disk"), workers=1)
    written, _ = read_results(out)
    assert written == rows and out.with_suffix(".png").exists()
    final = [r for r in rows if not r.get("tuning")]
    assert sorted(r["method"] for r in final) == ["disk", "dp-adam"]  # dp-sgd (momentum) is not one of the task's
    for r in final:
        assert r["metric"] == "perplexity" and r["higher_is_better"] is False and r["rows"] == 120
        tuning = [t for t in rows if t.get("tuning") and t["method"] == r["method"]]
        assert r["lr"] == min(tuning, key=lambda t: t["perplexity"])["lr"]  # lower is better
        assert all(t["rows"] == 120 - t["validation_rows"] for t in tuning)
    assert np.isfinite([r["perplexity"] for r in final]).all()


def test_a_run_of_one_task_keeps_the_other_tasks_rows(tmp_path):
    from rich.console import Console

    from expunge.bench import report

    out = tmp_path / "dp-optimizers-long.json"
    earlier = [{"dataset": "mnist", "method": "disk", "epsilon": 1.0, "seed": 0, "lr": 8.0, "test_acc": 0.95,
                "metric": "test_acc", "epochs": 40, "seconds": 400.0}]  # stands for an earlier MNIST run's row
    report(earlier, out, dp_optimizers_long.table, dp_optimizers_long.plot, Console(file=None, quiet=True))
    rows = dp_optimizers_long.main(DATA, out, limit=120, progress=False, epsilons=(8.0,), tasks="tofu-lm",
                                   methods="dp-adam", workers=1)
    written, provenance = read_results(out)
    assert written == rows and rows[0] == earlier[0]
    assert {r["dataset"] for r in rows} == {"mnist", "tofu-lm"}
    assert provenance["settings"]["kept_rows"]["datasets"] == ["mnist"]
    with pytest.raises(Exception, match="unknown task"):
        dp_optimizers_long.main(DATA, out, tasks="tofu-qa")
