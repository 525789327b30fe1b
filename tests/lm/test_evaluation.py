"""Distance to the retrained model, relearn steps, the combined evaluation and its plot."""

import copy
import math

import numpy as np
import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm import apply_lora, train_lm
from expunge.lm.evaluation import evaluate_lm, parameter_distance, plot_evaluations, relearn_steps
from expunge.lm.muse import MuseData
from expunge.lm.scoring import row_nlls
from expunge.lm.unlearning import make_unlearner

from .test_tofu import ROWS, split
from .tiny import qa_corpus, tiny_setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    s = tiny_setup(qa_corpus(tmp_path_factory.mktemp("qa"), 12), epochs=6, lr=2e-2, max_length=96)
    train_lm(s.model, s.data, s.recipe)
    return s


def test_parameter_distance_is_the_l2_norm_of_the_weight_difference(trained):
    other = copy.deepcopy(trained.model)
    assert parameter_distance(trained.model, other) == 0.0
    _name, weight = next((n, p) for n, p in other.named_parameters() if n.endswith("q_proj.weight"))
    with torch.no_grad():
        weight.add_(0.5)
    assert parameter_distance(trained.model, other) == pytest.approx(0.5 * math.sqrt(weight.numel()))
    assert parameter_distance(apply_lora(copy.deepcopy(trained.model), 2), trained.model) == 0.0  # fresh adapters: B = 0
    with pytest.raises(ExpungeError, match="same architecture"):
        parameter_distance(trained.model, torch.nn.Linear(2, 2))


def test_relearning_takes_longer_after_forgetting(trained):
    forget = trained.data.take(np.arange(4))
    target = float(row_nlls(trained.model, forget).mean())
    assert relearn_steps(trained.model, forget, target, lr=0.1, batch_size=4) == 0  # already there
    unlearned = copy.deepcopy(trained.model)
    make_unlearner("ascent", lr=5e-3, epochs=3, batch_size=2).update(unlearned, forget)
    assert float(row_nlls(unlearned, forget).mean()) > target
    before = copy.deepcopy(unlearned.state_dict())
    steps = relearn_steps(unlearned, forget, target, lr=0.1, batch_size=4, max_steps=200, check_every=2)
    assert 0 < steps < 200 and steps % 2 == 0
    assert relearn_steps(unlearned, forget, target, lr=1e-6, batch_size=4, max_steps=4, check_every=2) == 4  # capped
    assert all(torch.equal(before[k], v) for k, v in unlearned.state_dict().items())  # a copy relearns


def test_evaluate_lm_gathers_the_figures_and_plots_them(trained, tmp_path):
    tofu = {"forget": split("forget01", ROWS[:4]), "retain": split("retain", ROWS[4:8])}
    muse = MuseData(privleak_forget=tuple(ROWS[i]["answer"] for i in range(4)),
                    privleak_holdout=tuple(ROWS[i]["answer"] for i in range(8, 12)))
    options = dict(tofu_options=dict(max_new_tokens=4), muse_options=dict(max_length=64))
    ref = evaluate_lm(trained.model, trained.tokenizer, tofu=tofu, muse=muse, **options)
    unlearned = copy.deepcopy(trained.model)
    forget = trained.data.take(np.arange(4))
    make_unlearner("graddiff", lr=5e-3, epochs=2, batch_size=2).update(unlearned, forget, trained.data.take(np.arange(4, 12)))
    out = evaluate_lm(unlearned, trained.tokenizer, tofu=tofu, muse=muse, reference=ref, retrained=trained.model,
                      forget=forget, original=trained.model, relearn=dict(lr=0.1, max_steps=10, check_every=2),
                      **options)
    f = out.figures
    assert {"forget_quality", "model_utility", "forget_truth_ratio", "privleak_auc", "privleak", "param_dist_to_retrain",
            "relearn_steps"} <= set(f)
    assert 0 <= f["forget_quality"] <= 1 and f["param_dist_to_retrain"] > 0 and f["relearn_steps"] > 0
    assert ref.figures["forget_quality"] is None and ref.figures["privleak"] is None
    path = plot_evaluations({"retrain": ref.figures, "graddiff": f}, tmp_path / "eval.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ExpungeError, match="nothing to evaluate"):
        evaluate_lm(trained.model, trained.tokenizer)
    with pytest.raises(ExpungeError, match="need the forget rows"):
        evaluate_lm(trained.model, trained.tokenizer, tofu=tofu, original=trained.model, **options)
