"""TrainRecipe validation and schedule; BatchPlan determinism, coverage and stability under changes."""

import math

import numpy as np
import pytest

from expunge.errors import ExpungeError
from expunge.recipe import BatchPlan, TrainRecipe

# ----------------------------------------------------------------------------- TrainRecipe


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"model": "svm"}, "unknown model"),
        ({"dtype": "float16"}, "unknown dtype"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -5}, "batch size"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": 0.0}, "learning rates"),
        ({"lr": -0.1}, "learning rates"),
        ({"lr": float("nan")}, "learning rates"),
        ({"lr_steps": ((5, 0.0),)}, "learning rates"),
        ({"weight_decay": -1e-4}, "weight decay"),
        ({"weight_decay": float("nan")}, "weight decay"),
        ({"lr": float("inf")}, "learning rates"),
        ({"lr_steps": ((3, float("nan")),)}, "learning rates"),
        ({"epochs": 2.5}, "epochs"),
        ({"seed": -1}, "seed"),
        ({"model": "mlp", "hidden": (16, 0)}, "hidden"),
    ],
)
def test_recipe_rejects_bad_settings(kwargs, words):
    with pytest.raises(ExpungeError, match=words):
        TrainRecipe(**kwargs)


def test_recipe_defaults_are_valid():
    r = TrainRecipe()
    assert r.model == "logreg" and r.batch_size is None and r.epochs >= 1


def test_lr_at_follows_steps():
    r = TrainRecipe(lr=0.1, lr_steps=((10, 0.05), (5, 0.08)))  # unsorted on purpose
    assert r.lr_steps == ((5, 0.08), (10, 0.05))
    assert [r.lr_at(e) for e in (0, 4, 5, 9, 10, 30)] == [0.1, 0.1, 0.08, 0.08, 0.05, 0.05]


def test_lr_at_without_steps_is_constant():
    r = TrainRecipe(lr=0.3)
    assert r.lr_at(0) == r.lr_at(100) == 0.3


def test_to_dict_from_dict_round_trip():
    r = TrainRecipe(model="mlp", hidden=(32, 16), epochs=7, batch_size=128, lr=0.2, lr_steps=((3, 0.1),),
                    weight_decay=1e-3, dtype="float32", seed=42)
    d = r.to_dict()
    assert d["hidden"] == [32, 16] and d["lr_steps"] == [[3, 0.1]]
    back = TrainRecipe.from_dict(d)
    assert back == r


def test_to_dict_survives_json():
    import json

    r = TrainRecipe(lr_steps=((2, 0.01),), batch_size=None)
    assert TrainRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# ----------------------------------------------------------------------------- BatchPlan


def plan_rows(plan, active, ids=None):
    ids = np.arange(len(active)) if ids is None else ids
    return plan.iterations(np.asarray(active, bool), np.asarray(ids, np.int64))


def epoch_batches(plan, iterations, epoch):
    nb = plan.batches_per_epoch
    return iterations[epoch * nb : (epoch + 1) * nb]


def flatten(batches):
    return np.concatenate(batches) if batches else np.array([], np.int64)


def test_plan_is_deterministic_for_a_seed():
    a = plan_rows(BatchPlan(50, 8, 3, seed=1), np.ones(50))
    b = plan_rows(BatchPlan(50, 8, 3, seed=1), np.ones(50))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_plan_differs_for_another_seed():
    a = plan_rows(BatchPlan(50, 8, 3, seed=1), np.ones(50))
    b = plan_rows(BatchPlan(50, 8, 3, seed=2), np.ones(50))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_plan_differs_between_epochs():
    plan = BatchPlan(50, 8, 2, seed=0)
    its = plan_rows(plan, np.ones(50))
    assert not np.array_equal(flatten(epoch_batches(plan, its, 0)), flatten(epoch_batches(plan, its, 1)))


def test_every_active_row_appears_once_per_epoch():
    n = 53
    plan = BatchPlan(n, 10, 4, seed=3)
    active = np.ones(n, bool)
    active[[0, 7, 52]] = False
    its = plan_rows(plan, active)
    assert len(its) == plan.n_iterations
    for epoch in range(plan.epochs):
        rows = flatten(epoch_batches(plan, its, epoch))
        assert sorted(rows.tolist()) == np.flatnonzero(active).tolist()


def test_batches_have_the_planned_size():
    plan = BatchPlan(53, 10, 1, seed=0)
    sizes = [len(b) for b in plan_rows(plan, np.ones(53))]
    assert sizes == [10, 10, 10, 10, 10, 3]


def test_removed_rows_leave_holes_not_shifts():
    n = 40
    plan = BatchPlan(n, 6, 3, seed=5)
    full = plan_rows(plan, np.ones(n))
    active = np.ones(n, bool)
    removed = [3, 17, 29]
    active[removed] = False
    fewer = plan_rows(plan, active)
    assert len(fewer) == len(full)
    for before, after in zip(full, fewer):
        expected = before[~np.isin(before, removed)]
        np.testing.assert_array_equal(after, expected)


def test_removing_a_whole_batch_leaves_it_empty():
    n = 12
    plan = BatchPlan(n, 4, 1, seed=0)
    full = plan_rows(plan, np.ones(n))
    active = np.ones(n, bool)
    active[full[1]] = False
    after = plan_rows(plan, active)
    assert len(after) == 3 and len(after[1]) == 0
    np.testing.assert_array_equal(after[0], full[0])
    np.testing.assert_array_equal(after[2], full[2])


def test_added_row_appears_once_per_epoch_and_base_rows_stay():
    n_base = 30
    plan = BatchPlan(n_base, 7, 4, seed=9)
    base = plan_rows(plan, np.ones(n_base))
    ids = np.concatenate([np.arange(n_base), [1000]])
    grown = plan_rows(plan, np.ones(n_base + 1), ids)
    assert len(grown) == len(base)
    for epoch in range(plan.epochs):
        rows = flatten(epoch_batches(plan, grown, epoch)).tolist()
        assert rows.count(n_base) == 1
    for before, after in zip(base, grown):
        np.testing.assert_array_equal(after[~np.isin(after, [n_base])], before)


def test_added_row_slot_is_independent_of_other_added_rows():
    n_base = 30
    plan = BatchPlan(n_base, 7, 3, seed=9)
    one = plan_rows(plan, np.ones(n_base + 1), np.concatenate([np.arange(n_base), [1000]]))
    two = plan_rows(plan, np.ones(n_base + 2), np.concatenate([np.arange(n_base), [1000, 2000]]))
    where_one = [t for t, b in enumerate(one) if n_base in b]
    where_two = [t for t, b in enumerate(two) if n_base in b]
    assert where_one == where_two


def test_inactive_added_row_is_not_trained_on():
    n_base = 20
    plan = BatchPlan(n_base, 5, 2, seed=0)
    active = np.ones(n_base + 1, bool)
    active[-1] = False
    its = plan_rows(plan, active, np.concatenate([np.arange(n_base), [500]]))
    assert n_base not in flatten(its)


def test_full_batch_gives_one_batch_per_epoch_with_all_active_rows():
    n_base = 25
    plan = BatchPlan(n_base, None, 3, seed=0)
    assert plan.batches_per_epoch == 1 and plan.n_iterations == 3
    active = np.ones(n_base + 2, bool)
    active[4] = False
    ids = np.concatenate([np.arange(n_base), [100, 101]])
    its = plan_rows(plan, active, ids)
    assert len(its) == 3
    for batch in its:
        assert sorted(batch.tolist()) == np.flatnonzero(active).tolist()


def test_batch_larger_than_data_is_full_batch():
    plan = BatchPlan(10, 64, 2, seed=0)
    assert plan.batches_per_epoch == 1
    assert [len(b) for b in plan_rows(plan, np.ones(10))] == [10, 10]


@pytest.mark.parametrize("n, bs, epochs", [(100, 10, 3), (101, 10, 3), (7, 3, 5), (1437, 256, 4)])
def test_n_iterations(n, bs, epochs):
    plan = BatchPlan(n, bs, epochs, seed=0)
    assert plan.n_iterations == epochs * math.ceil(n / bs)
    assert len(plan_rows(plan, np.ones(n))) == plan.n_iterations
    assert plan.epoch_of(plan.n_iterations - 1) == epochs - 1


def test_for_recipe_copies_settings():
    r = TrainRecipe(epochs=3, batch_size=16, seed=4)
    plan = BatchPlan.for_recipe(r, 100)
    assert (plan.n_base, plan.batch_size, plan.epochs, plan.seed) == (100, 16, 3, 4)
