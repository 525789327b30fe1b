"""The demo behind the README's first command: `expunge demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, friendly
from .report import print_report

# full-batch gradient descent, 100 iterations, of which DeltaGrad computes 10 + 90/5 = 28 in full (a speedup
# bound of 3.6x); full batches keep DeltaGrad's L-BFGS approximation close (within about 1% of the deletion's move)
DEMO_ROWS, DEMO_ITERATIONS, DEMO_T0, DEMO_J0, DEMO_M = 20_000, 100, 5, 10, 2


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory to create (replaced if it holds an earlier demo)."),
    ratio: float = typer.Option(0.01, help="Fraction of rows to delete."),
    rows: int = typer.Option(DEMO_ROWS, help="Training rows of the generated problem (the default shows the speedup "
                             "in about half a minute on two cores; fewer rows run faster but hide it)."),
):
    """Train logistic regression on a generated 20,000-row problem, delete 1% with DeltaGrad and add them back,
    each time retraining exactly to show the speedup and the distance to retraining."""
    import shutil

    from ..data import load_dataset, make_synthetic
    from ..errors import ExpungeError
    from ..recipe import TrainRecipe
    from ..unlearn import DeltaGrad

    if rows < 100:
        raise ExpungeError(f"--rows must be at least 100, got {rows}")
    if (out / "manifest.json").exists():
        shutil.rmtree(out)
    default = rows == DEMO_ROWS  # the `synthetic` dataset: the run reads it back by name instead of storing a copy
    train_set, test_set = load_dataset("synthetic") if default else make_synthetic(n_train=rows, n_test=rows // 4)
    console.rule(f"1. data: a generated multinomial logistic-regression problem, {len(train_set):,} training rows x "
                 f"{train_set.n_features} features, {train_set.n_classes} classes (deterministic, no download)")
    recipe = TrainRecipe(model="logreg", epochs=DEMO_ITERATIONS, batch_size=None, lr=1.0, weight_decay=1e-4,
                         dtype="float64", seed=0)
    console.rule(f"2. train: logistic regression, full-batch gradient descent, {DEMO_ITERATIONS} iterations, "
                 "the trajectory cached for DeltaGrad")
    fitted = DeltaGrad(T0=DEMO_T0, j0=DEMO_J0, m=DEMO_M).fit(
        train_set, recipe, out=out, test=test_set, source="synthetic" if default else None, progress=True)
    console.print(f"test accuracy {100 * fitted.accuracy():.2f}%, run directory {out}")
    ids = fitted.sample_ids(ratio, seed=0)
    console.rule(f"3. forget {len(ids)} rows ({100 * ratio:g}%) with DeltaGrad, then retrain exactly to compare")
    forgot = fitted.forget(ids, compare=True)
    print_report(forgot, quiet=False)
    console.rule("4. add the same rows back with DeltaGrad (online: it starts from the updated trajectory)")
    added = fitted.add(train_set.take(train_set.rows_of(ids)), compare=True)
    print_report(added, quiet=False)
    console.rule("ledger")
    for e in fitted.ledger.entries():
        console.print(f"v{e['version']} {e['kind']:7s} {e['method']:9s} {e['n_rows']:5d} rows  model "
                      f"{e['model_hash_after'][:16]}  row hash {e['entry_hash'][:16]}")
    console.rule("what this shows")
    for report, verb in ((forgot, "forgot"), (added, "added back")):
        console.print(_summary(report, verb), highlight=False)
    console.print(f"Next: expunge forget {out} --ratio 0.01 --json report.json ; expunge ledger {out} ; "
                  "the MNIST benchmark: expunge bench deltagrad --data ../shared/data", highlight=False)


def _summary(report, verb: str) -> str:
    """One sentence: how much faster than retraining, and how close to it."""
    m, g = report.metrics, report.guarantee
    share = m["dist_to_retrain"] / max(m["dist_previous_to_retrain"], 1e-300)
    return (f"DeltaGrad {verb} {len(report.ids)} rows in {report.seconds:.2f} s; retraining from scratch took "
            f"{m['retrain_s']:.2f} s: a speedup of {m['speedup']:.1f}x (bound {g['speedup_bound']:.2f}x: "
            f"{g['explicit_iterations']} of {g['iterations']} iterations computed in full). It landed "
            f"{m['dist_to_retrain']:.2e} from the retrained weights, {100 * share:.2f}% of the distance the request "
            f"moved them ({m['dist_previous_to_retrain']:.2e}); test accuracy {100 * m['test_acc']:.2f}% "
            f"(retrained {100 * m['acc_retrain']:.2f}%).")
