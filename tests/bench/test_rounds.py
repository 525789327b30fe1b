"""The round-selection rule of the timing benchmarks, on synthetic per-round ratios and a fake clock."""

import itertools

import pytest

from expunge.bench.rounds import RoundRule, Rounds, error_bars, relative_iqr, rounds_text, spread_text, stop_reason
from expunge.errors import ExpungeError


def drive(ratios, rule=None, seconds_per_round=1.0, **more):
    """Run the rule over an endless supply of per-round ratios (one or several named series)."""
    now = [0.0]
    rounds = Rounds(rule or RoundRule(), clock=lambda: now[0])
    series = {"speedup": iter(ratios), **{name: iter(values) for name, values in more.items()}}
    while rounds.more():
        now[0] += seconds_per_round
        rounds.add(**{name: next(values) for name, values in series.items()})
    return rounds


def steady(value=2.0, wobble=0.01):
    return itertools.cycle([value, value * (1 + wobble), value * (1 - wobble)])


def noisy(value=2.0, swing=0.3):
    return itertools.cycle([value * (1 - swing), value, value * (1 + swing)])


def test_stable_ratios_stop_at_the_floor():
    rounds = drive(steady())
    assert rounds.count == RoundRule().floor == 5 and rounds.stop == "stable"


def test_never_fewer_rounds_than_the_floor_even_when_identical():
    rounds = drive(itertools.repeat(3.0), RoundRule(floor=7))
    assert rounds.count == 7 and rounds.stop == "stable"
    assert stop_reason({"speedup": [3.0] * 6}, 6, 0.0, RoundRule(floor=7)) is None


def test_noisy_ratios_keep_going_up_to_the_ceiling():
    rounds = drive(noisy())
    assert rounds.count == RoundRule().ceiling == 25 and rounds.stop == "ceiling"
    assert relative_iqr(rounds.ratios["speedup"]) >= 0.05


def test_noise_that_settles_stops_once_the_iqr_is_small():
    early = [1.0, 3.0, 1.5, 2.5, 2.0, 2.0, 2.01, 1.99]  # wild for five rounds, then steady
    rounds = drive(itertools.chain(early, steady()))
    assert 5 < rounds.count < 25 and rounds.stop == "stable"
    assert relative_iqr(rounds.ratios["speedup"]) < 0.05


def test_one_outlier_does_not_hold_the_rounds_back():
    rounds = drive(itertools.chain([6.0], steady()))  # the IQR ignores a single far-off round
    assert rounds.count == 5 and rounds.stop == "stable"
    assert rounds.fields()["speedup_max"] == 6.0


def test_every_ratio_must_settle():
    rounds = drive(steady(), other=noisy())
    assert rounds.count == 25 and rounds.stop == "ceiling"


def test_the_time_cap_stops_past_the_floor_only():
    capped = drive(noisy(), RoundRule(time_cap_s=300), seconds_per_round=100.0)
    assert capped.count == 5 and capped.stop == "time cap"  # 500 s spent at the floor, which still holds
    later = drive(noisy(), RoundRule(time_cap_s=700), seconds_per_round=100.0)
    assert later.count == 7 and later.stop == "time cap"


def test_repeats_fix_the_count_whatever_the_spread():
    for series in (noisy(), steady()):
        rounds = drive(series, RoundRule.for_repeats(3))
        assert rounds.count == 3 and rounds.stop == "fixed"
    assert RoundRule.for_repeats(None) == RoundRule()
    with pytest.raises(ExpungeError, match="at least 1"):
        RoundRule.for_repeats(0)


def test_fields_report_the_median_and_its_spread():
    rounds = drive(iter([2.0, 2.1, 1.9, 2.05, 1.95]), RoundRule.for_repeats(5))
    fields = rounds.fields()
    assert fields["speedup"] == 2.0 and fields["speedup_min"] == 1.9 and fields["speedup_max"] == 2.1
    assert fields["speedup_iqr"] == pytest.approx(2.05 - 1.95)
    assert fields["speedup_rounds"] == [2.0, 2.1, 1.9, 2.05, 1.95]
    assert (fields["rounds"], fields["rounds_stop"]) == (5, "fixed")
    assert rounds.ratio_fields("speedup", "ratio")["ratio_iqr"] == fields["speedup_iqr"]
    assert spread_text(fields, "speedup") == "1.90-2.10, 5.0%" and rounds_text(fields) == "5 fixed"
    assert error_bars([fields], "speedup").tolist() == [[pytest.approx(0.1)], [pytest.approx(0.1)]]


def test_a_round_must_name_the_same_ratios():
    rounds = Rounds(RoundRule())
    rounds.add(a=1.0)
    with pytest.raises(ValueError, match="ratios"):
        rounds.add(b=1.0)


def test_rounds_without_a_ratio_stop_at_the_floor():
    rounds = Rounds(RoundRule())
    while rounds.more():
        rounds.add()
    assert rounds.count == 5 and rounds.fields() == {"rounds": 5, "rounds_stop": "stable"}
