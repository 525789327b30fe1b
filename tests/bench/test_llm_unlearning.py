"""The llm-unlearning benchmark's frame: registered, its table and plot, the quick switch, its settings. The run
itself (minutes even in quick mode) is the benchmark's job, not a unit test's."""

import pytest

from expunge.bench import BENCHMARKS, read_results, read_rows
from expunge.bench import llm_unlearning as bench
from expunge.errors import ExpungeError


def rows():
    tofu = [dict(benchmark="tofu", method=m, lr=lr, forget_quality=fq, model_utility=mu, forget_truth_ratio=0.6,
                 seconds=s, retrain_seconds=100.0, speedup=100.0 / s, param_dist_to_retrain=1.0)
            for m, lr, fq, mu, s in [("target", None, 1e-8, 0.5, 200.0), ("retrain", None, None, 0.45, 100.0),
                                     ("ngdiff", 1e-5, 0.3, 0.44, 9.0), ("ascent", 1e-5, 1e-300, 0.0, 4.0)]]
    muse = [dict(benchmark="muse-news", method=m, lr=None, verbmem_forget=v, privleak_auc=0.9, privleak=p, seconds=5.0,
                 retrain_seconds=50.0, speedup=10.0) for m, v, p in [("target", 0.9, 0.5), ("retrain", 0.1, None)]]
    return tofu + muse


def test_registered_with_a_table_and_a_plot(tmp_path):
    assert BENCHMARKS["llm-unlearning"].module == "expunge.bench.llm_unlearning"
    assert bench.table(rows()).row_count == 6
    bench.plot(rows(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_limit_asks_for_the_quick_mode_until_the_cli_has_a_flag(tmp_path, monkeypatch):
    seen = {}

    def fake_run(data, quick, progress, console, partial=None, methods=None):
        seen["quick"], seen["methods"] = quick, methods
        return rows()

    monkeypatch.setattr(bench, "run", fake_run)
    bench.main(tmp_path, tmp_path / "out.json", limit=1)
    assert seen["quick"] is True and len(read_rows(tmp_path / "out.json")) == 6
    seen.clear()
    bench.main(tmp_path, tmp_path / "out.json", methods="npo, ngdiff")
    assert seen["quick"] is False and seen["methods"] == ("ngdiff", "npo")
    assert read_results(tmp_path / "out.json")[1]["settings"]["methods"] == ["ngdiff", "npo"]


def test_methods_are_chosen_by_name_and_ngdiff_runs_at_every_rate_first():
    assert bench.select_methods(None) == bench.RUN_ORDER
    assert bench.select_methods(["ascent", "ngdiff"]) == ("ngdiff", "ascent")
    for bad in ("ngdif", "", "target"):
        with pytest.raises(ExpungeError, match="--methods"):
            bench.select_methods(bad)
    plan = bench._update_plan(bench.FULL, bench.RUN_ORDER)
    ngdiff = [("ngdiff", lr) for lr in bench.FULL.lrs["ngdiff"]]
    assert plan[:len(ngdiff)] == ngdiff and len(plan) == sum(map(len, bench.FULL.lrs.values()))
    # the others: each at its first rate before any at its second
    assert [m for m, _ in plan[len(ngdiff):len(ngdiff) + 4]] == ["npo", "simnpo", "graddiff", "ascent"]
    assert bench._update_plan(bench.FULL, ("npo",)) == [("npo", lr) for lr in bench.FULL.lrs["npo"]]


def test_the_cli_passes_methods_only_to_a_benchmark_that_takes_them(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from expunge.cli import app

    seen = {}
    monkeypatch.setattr(bench, "main", lambda data, out, methods=None, **kw: seen.update(methods=methods))
    result = CliRunner().invoke(app, ["bench", "llm-unlearning", "--data", str(tmp_path), "--json",
                                      str(tmp_path / "o.json"), "--methods", "ngdiff"])
    assert result.exit_code == 0, result.output
    assert seen["methods"] == "ngdiff"
    result = CliRunner().invoke(app, ["bench", "dp-filters", "--data", str(tmp_path), "--json",
                                      str(tmp_path / "o.json"), "--methods", "ngdiff"])
    assert result.exit_code != 0 and "no choice of methods" in result.output


def test_settings_give_every_method_two_or_three_rates_and_a_missing_folder_is_refused(tmp_path):
    for settings in (bench.FULL, bench.QUICK):
        assert set(settings.lrs) == set(bench.METHOD_ORDER)
        assert all(2 <= len(rates) <= 3 for rates in settings.lrs.values())
    assert not bench.QUICK.world_knowledge and bench.FULL.world_knowledge
    with pytest.raises(ExpungeError, match="tofu/full.json"):
        bench.run(tmp_path)
