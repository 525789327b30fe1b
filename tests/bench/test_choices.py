"""Choosing a benchmark's tasks or methods by name."""
import pytest

from expunge.bench.choices import chosen
from expunge.errors import ExpungeError

KNOWN = ("mnist", "fashion-mnist", "tofu-lm")


def test_none_is_all_and_names_come_back_in_the_benchmarks_order():
    assert chosen(None, KNOWN, "--tasks", "task(s)", "b") == KNOWN
    assert chosen("tofu-lm, mnist", KNOWN, "--tasks", "task(s)", "b") == ("mnist", "tofu-lm")
    assert chosen(["fashion-mnist"], KNOWN, "--tasks", "task(s)", "b") == ("fashion-mnist",)


@pytest.mark.parametrize("given, problem", [("mnist,cifar", r"unknown task\(s\) \['cifar'\]"), (" , ", "no task")])
def test_a_wrong_or_empty_choice_names_the_option_and_the_choices(given, problem):
    with pytest.raises(ExpungeError, match=rf"--tasks: {problem}.* for bench b; choose among mnist, fashion-mnist, "
                                           r"tofu-lm \(why\)"):
        chosen(given, KNOWN, "--tasks", "task(s)", "b", note="why")
