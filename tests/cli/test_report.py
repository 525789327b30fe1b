"""How an update report shows an evaluated guarantee: accuracies as percentages, other scores as numbers."""
from expunge.cli import report
from expunge.unlearn.base import UpdateReport
from expunge.unlearn.merged import evaluated_guarantee


def shown(guarantee, capsys) -> str:
    update = UpdateReport(method="m", kind="forget", ids=[1], seconds=0.5, model_hash_before="a" * 64,
                          model_hash_after="b" * 64, guarantee=guarantee, version=2)
    report.print_report(update, quiet=False)
    return " ".join(capsys.readouterr().out.split())


def test_an_unlearning_update_shows_its_nlls_and_row_counts_as_numbers(capsys):
    text = shown(evaluated_guarantee({"forget_nll_after": 3.25, "forget_rows": 20}, score="nll"), capsys)
    assert "forget_nll_after 3.25" in text and "forget_rows 20" in text and "%" not in text


def test_a_merge_scored_by_accuracy_shows_percentages(capsys):
    text = shown(evaluated_guarantee({"t1": 0.9512}, c=[0.5, 0.5], score="accuracy"), capsys)
    assert "t1 95.12%" in text and "c = [0.5, 0.5]" in text
