"""Model merging: `expunge merge` (runs fine-tuned from one base -> a merged run) and `expunge tradeoff`
(the forgetting front between a run's model before a deletion and after it -> the run's next version)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import ExpungeError
from .app import (
    DATA_OPTION,
    JSON_OPTION,
    QUIET_OPTION,
    RUN_ARGUMENT,
    app,
    console,
    friendly,
    write_json,
)
from .report import print_report
from .updates import (
    DROP_PRIVACY_OPTION,
    REASON_OPTION,
    REFERENCE_OPTION,
    REQUESTED_BY_OPTION,
    SIGNING_KEY_OPTION,
    WAIT_OPTION,
    _load,
)

# values follow their option one by one (--models A --models B); stray values get a clear error, not click's
REPEAT = {"allow_extra_args": True}


def _refuse_stray(ctx: typer.Context) -> None:
    if ctx.args:
        raise ExpungeError(f"unexpected value(s) {ctx.args}: repeat the option before each value, e.g. --models RUN1 "
                           "--models RUN2, --eval mnist=DATA1 --eval fashion=DATA2")


def _pairs(values: list[str], option: str, example: str) -> dict[str, str]:
    """NAME=VALUE items (repeated options, or comma-separated in one) as a dict, refusing repeats."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ExpungeError(f"{option} {value!r} must look like NAME=VALUE, e.g. {example}")
        if name.strip() in pairs:
            raise ExpungeError(f"{option} names {name.strip()!r} twice; give each name once")
        pairs[name.strip()] = rest.strip()
    return pairs


def _preferences(prefer: str | None) -> dict[str, float] | None:
    if prefer is None:
        return None
    out = {}
    for name, value in _pairs([v for v in prefer.split(",") if v.strip()], "--prefer", "mnist=2,fashion=1").items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ExpungeError(f"--prefer {name}={value}: the weight must be a number") from None
    return out


def _numbers(text: str | None, option: str, example: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ExpungeError(f"{option} {text!r} must be comma-separated numbers, e.g. {example}") from None


def _print_outcome(outcome, what: str, quiet: bool) -> None:
    if quiet:
        return
    result, chosen, record = outcome.result, outcome.chosen, outcome.record
    names = [m.name for m in result.metrics]
    table = Table("c", *[f"{n} ({m.goal})" for n, m in zip(names, result.metrics)], title=f"front ({result.method}, "
                  f"{result.n_evaluations} evaluated merges; {record.get('score', 'accuracy')}, "
                  f"{'predicted' if chosen['predicted'] else 'measured'})")
    from ..merge import thin

    # accuracies as percentages; other scores (an LM's answer probability, often small) with their digits
    shown = (lambda v: f"{100 * v:.2f}%") if record.get("score", "accuracy") == "accuracy" else (lambda v: f"{v:.4g}")
    front = result.front_values()
    for i in thin(front, 10):
        point = result.front[int(i)]
        mark = " *" if point["c"] == chosen["c"] else ""
        table.add_row(", ".join(f"{v:.3f}" for v in point["c"]) + mark, *[shown(v) for v in front[int(i)]])
    console.print(table)
    r2 = {k: v for k, v in (record.get("r2_heldout") or {}).items() if v is not None}
    if r2:
        console.print("surrogate R^2 on held-out merges: " + ", ".join(f"{k} {v:.3f}" for k, v in r2.items()),
                      highlight=False)
    predicted = (" (predicted " + ", ".join(f"{k} {shown(v)}" for k, v in chosen["predicted"].items()) + ")"
                 if chosen["predicted"] else "")
    console.print(f"chosen c = {[round(v, 4) for v in chosen['c']]}: measured "
                  + ", ".join(f"{k} {shown(v)}" for k, v in chosen["measured"].items()) + predicted, highlight=False)
    folder = outcome.run.run.current(outcome.run.manifest)
    console.print(f"{what} -> {outcome.run.path} (version {outcome.run.version}); front: {folder / 'front.json'}, "
                  f"{folder / 'front.png'}", highlight=False)


MERGE_HELP = (
    "Merge runs fine-tuned from one base (theta = theta_0 + sum_n c_n tau_n) and write the merged model "
    "as a new run. Zoo runs (tabular, image) and Hugging Face language-model runs (`expunge train --task lm "
    "--init BASE`, full fine-tunes or LoRA: a LoRA run's model has its adapters merged) both merge.\n\n"
    "The score of each task: accuracy for zoo runs; for language-model runs TOFU's answer probability, "
    "exp(-mean NLL of a row's answer tokens (a document's every token)) averaged over the rows, in (0, 1], "
    "higher is better. MAP fits a quadratic surrogate of each task's score in c from a few evaluated "
    "merges and searches it for the Pareto front of trade-offs between the tasks; the point --prefer "
    "favours is merged, measured and written. The run's manifest records the base, the models, the task "
    "vectors' hashes, c, and the predicted and measured scores (section 'merge'); its version folder holds "
    "front.json and front.png (a merged LM also its model, for from_pretrained). A merged run has no update "
    "method: to delete rows, forget them in the runs it merges and merge again.\n\n"
    "Example: expunge merge --base pre --models mnist --models fashion --eval mnist=DIR1 --eval "
    "fashion=DIR2 --prefer mnist=2,fashion=1 --out merged; LM: expunge merge --base tofu-base --models "
    "authors-a --models authors-b --eval a=a.json --eval b=b.json --out tofu-merged"
)


@app.command(context_settings=REPEAT, help=MERGE_HELP)
@friendly
def merge(
    ctx: typer.Context,
    base: Path = typer.Option(..., help="The base run: the model the others were fine-tuned from (theta_0)."),
    models: list[Path] = typer.Option(..., help="A run fine-tuned from the base (`expunge train [--task lm] --init "
                                      "BASE`); repeat "
                                      "for each: --models RUN1 --models RUN2. Its task vector is its model minus the "
                                      "base's."),
    eval_sets: list[str] = typer.Option(..., "--eval", help="TASK=DATA: score merges on DATA; repeat for each task. "
                                        "Zoo runs: accuracy on a dataset as `train --data` takes it, read as the base "
                                        "run was (its test split if it has one, else all rows). Language-model runs: "
                                        "answer probability on TOFU QA pairs (.json, .jsonl) or documents (.json, "
                                        ".txt, a folder), as `train --task lm --data` takes them, all rows."),
    method: str = typer.Option("map", help="map (quadratic surrogates fitted to a few merges, searched for the "
                               "front), bayesian-map, nested-map, ties or dare (MAP on TIES- or DARE-processed task "
                               "vectors), grid (every merge on a grid, --steps per coefficient) or task-arithmetic "
                               "(one shared coefficient)."),
    points: int | None = typer.Option(None, help="MAP: merges to fit the surrogates on (default: twice the "
                                         "quadratic's parameters, (T+1)(T+2)); a quarter more are held out for R^2."),
    steps: int = typer.Option(11, help="grid, task-arithmetic: coefficient values per task vector."),
    c: str | None = typer.Option(None, "--c", help="Merge at these coefficients, one per model, instead of "
                                    "searching: --c 1,0 is the first model itself (with task-arithmetic, ties, dare)."),
    prefer: str | None = typer.Option(None, help="Weights of the tasks when picking the front point: "
                                         "task1=2,task2=1 (tasks left out weigh 0; default all alike)."),
    bounds: str = typer.Option("0,1", help="LO,HI: the box the coefficients are searched in (and --c must lie in)."),
    density: float = typer.Option(0.2, help="ties: fraction of each task vector's entries kept."),
    drop: float = typer.Option(0.5, help="dare: probability of dropping an entry."),
    seed: int = typer.Option(0, help="Seed of the design points and of DARE's drops."),
    out: Path = typer.Option(..., help="New run directory for the merged model (must not exist)."),
    signing_key: Path | None = SIGNING_KEY_OPTION,
    json_out: str | None = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """Merge runs fine-tuned from one base into a new run (--help: MERGE_HELP)."""
    from ..merge import merge_runs

    _refuse_stray(ctx)
    evals = _pairs(eval_sets, "--eval", "mnist=/data/mnist")
    lo_hi = _numbers(bounds, "--bounds", "0,1")
    if len(lo_hi) != 2:
        raise ExpungeError(f"--bounds takes two numbers LO,HI, got {bounds!r}")
    outcome = merge_runs(base, models, evals, method, out=out, c=_numbers(c, "--c", "1,0"), points=points, steps=steps,
                         preferences=_preferences(prefer), bounds=tuple(lo_hi), density=density, p=drop, seed=seed,
                         signing_key=signing_key, progress=not quiet)
    _print_outcome(outcome, "merged model", quiet)
    write_json(json_out, outcome.to_dict())


TRADEOFF_HELP = (
    "The forgetting trade-off of a deletion: how much utility each increment of forgetting costs.\n\n"
    "The merges theta(c) = theta_before + c (theta_after - theta_before) run from the model before (c = "
    "0) to the one after (c = 1). Scored on the forget and retain sets, their front is the trade-off "
    "curve; the point --prefer favours is measured and recorded as RUN's next version, an update by "
    "method 'tradeoff' with its ledger row. Its guarantee is none by construction: the ledger records the "
    "measured forget and retain scores (and front.json, front.png sit in the version folder). Exact, "
    "certified and private runs refuse it (their guarantees would end). Scores: accuracy for zoo runs; for "
    "language-model runs (full fine-tunes; a LoRA run cannot hold a full model) TOFU's answer probability, "
    "exp(-mean answer-token NLL) averaged over rows: an LM run has no test split, so give retain=rows or "
    "retain=DATA.\n\n"
    "Example: cp -r run run.v1; expunge forget run --ids ids.txt --method fisher; expunge tradeoff run "
    "--before run.v1 --prefer forget=1,retain=2. LM: cp -r lm lm.v1; expunge forget lm --group author-3 "
    "--method ngdiff; expunge tradeoff lm --before lm.v1 --eval forget=deleted --eval retain=rows"
)


@app.command(context_settings=REPEAT, help=TRADEOFF_HELP)
@friendly
def tradeoff(
    ctx: typer.Context,
    run: Path = RUN_ARGUMENT,
    before: str = typer.Option(..., help="The model before the deletion: a version of RUN, which keeps the weights "
                               "of its current version only, or (for earlier versions) a copy of RUN saved at that "
                               "version (`cp -r RUN COPY` before the update); the ledger must record the copy's model."),
    after: str | None = typer.Option(None, help="The model after it: RUN's current version (the default and the "
                                        "only choice: the chosen point becomes its next version)."),
    eval_sets: list[str] = typer.Option(["forget=deleted", "retain=test"], "--eval", help="forget=DATA and "
                                        "retain=DATA: the forget score (accuracy; LM: answer probability) is "
                                        "minimised, the retain score maximised. DATA is a dataset (LM: QA pairs or "
                                        "documents), or 'deleted' (the rows deleted since --before), 'test' (the "
                                        "run's test split), 'rows' (its current rows)."),
    method: str = typer.Option("map", help="map (quadratic surrogates in c from a few merges) or grid (--steps "
                               "evaluated merges)."),
    points: int | None = typer.Option(None, help="map: merges to fit the surrogates on (default 6)."),
    steps: int = typer.Option(21, help="grid: evaluated values of c."),
    prefer: str | None = typer.Option(None, help="Weights when picking the point: forget=1,retain=3 (default "
                                         "equal)."),
    bounds: str = typer.Option("0,1", help="LO,HI: the range of c (it must contain [0, 1]; beyond 1 extrapolates "
                               "past the deletion)."),
    seed: int = typer.Option(0, help="Seed of the design points."),
    requested_by: str | None = REQUESTED_BY_OPTION,
    reason: str | None = REASON_OPTION,
    reference: str | None = REFERENCE_OPTION,
    drop_privacy: bool = DROP_PRIVACY_OPTION,
    signing_key: Path | None = SIGNING_KEY_OPTION,
    wait: float = WAIT_OPTION,
    data: str | None = DATA_OPTION,
    json_out: str | None = JSON_OPTION,
    quiet: bool = QUIET_OPTION,
):
    """The forgetting front of a deletion; the chosen point becomes the run's next version (--help: TRADEOFF_HELP)."""
    from ..merge import tradeoff_run

    _refuse_stray(ctx)
    evals = _pairs(eval_sets, "--eval", "forget=deleted")
    lo_hi = _numbers(bounds, "--bounds", "0,1.5")
    if len(lo_hi) != 2:
        raise ExpungeError(f"--bounds takes two numbers LO,HI, got {bounds!r}")
    with _load(run, data, wait) as fitted:
        outcome = tradeoff_run(fitted, before, after, evals, method, points=points, steps=steps,
                               preferences=_preferences(prefer), bounds=tuple(lo_hi), seed=seed,
                               requested_by=requested_by, reason=reason, reference=reference, drop_privacy=drop_privacy,
                               signing_key=signing_key, progress=not quiet)
    _print_outcome(outcome, "trade-off point recorded", quiet)
    if not quiet:
        from ..unlearn import UpdateReport

        print_report(UpdateReport(**outcome.record["report"]), quiet)
    write_json(json_out, outcome.to_dict())
