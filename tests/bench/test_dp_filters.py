"""The noisy-quadratic analysis of the DP optimizers' filters: the closed loops reduce to the known
closed forms, the library's transforms run in the loop land on the analytic stationary error, and the
DOPPLER default's narrow stable range (the reason its learning rate must be tuned far below DP-SGD's)."""

import math

import pytest

from expunge.bench import dp_filters as bench
from expunge.bench import read_results


@pytest.mark.parametrize("rate", [1e-3, 0.1, 1.0, 1.9])
def test_sgd_loop_is_the_closed_form(rate):
    assert bench.stationary_error("sgd", rate) == pytest.approx(rate / (2 - rate), rel=1e-9)
    assert bench.spectral_radius("sgd", rate) == pytest.approx(abs(1 - rate), abs=1e-9)


def test_stable_ranges_match_the_known_limits():
    assert bench.stable_rate("sgd") == pytest.approx(2.0, rel=1e-6)
    # heavy ball: lr * lambda < 2 (1 + beta), i.e. an effective rate lr / (1 - beta) * lambda < 38 at beta 0.9
    assert bench.stable_rate("momentum") == pytest.approx(2 * (1 + 0.9) / (1 - 0.9), rel=1e-6)
    assert bench.stable_rate("disk") == pytest.approx(2.0, rel=1e-6)  # the extrapolation undoes the filter's lag
    assert 0.0140 < bench.stable_rate("doppler") < 0.0150  # 1/138 of SGD's range


def test_doppler_default_never_beats_sgd_at_the_same_effective_rate():
    for rate in bench.RATES:
        doppler = bench.stationary_error("doppler", rate)
        assert doppler >= bench.stationary_error("sgd", rate) * (1 - 1e-9)
    assert bench.stationary_error("doppler", 0.01) > 3 * bench.stationary_error("sgd", 0.01)
    assert math.isinf(bench.stationary_error("doppler", 0.02))


@pytest.mark.parametrize("method, rate", [("doppler", 0.005), ("disk", 1.0), ("momentum", 0.3)])
def test_the_transforms_in_the_loop_land_on_the_analytic_error(method, rate):
    """DOPPLER's and DiSK's own transforms (and torch's momentum SGD) on 4,000 independent coordinates: the
    time-averaged x^2 after the start is forgotten (over the second half of the run) agrees with the Lyapunov
    solution."""
    mixing = 1 / (1 - bench.spectral_radius(method, rate))  # steps to forget by a factor e
    simulated = bench.simulate(method, rate, steps=int(2 * (4 * mixing + 100)), dims=4000)
    assert simulated == pytest.approx(bench.stationary_error(method, rate), rel=0.05)


def test_report_writes_rows_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RATES", (1e-3, 1e-2, 0.1, 1.0))
    monkeypatch.setattr(bench, "SIMULATED_RATES", (0.1,))
    out = tmp_path / "dp-filters.json"
    rows = bench.main(None, out, limit=1, progress=False)
    written, provenance = read_results(out)
    assert written == rows and provenance["torch"] and out.with_suffix(".png").exists()
    doppler = next(r for r in rows if r["kind"] == "filter" and r["method"] == "doppler")
    assert doppler["peak_gain"] == pytest.approx(10 ** 0.5, rel=1e-2) and doppler["dc_group_delay"] == pytest.approx(7, abs=0.1)
    assert {r["method"] for r in rows if r["kind"] == "simulation"} == {"sgd", "momentum", "disk"}  # DOPPLER: unstable at 0.1
