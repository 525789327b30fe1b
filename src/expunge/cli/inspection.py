"""Inspection and audit: `expunge info`, `evaluate`, `ledger`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from ..errors import ExpungeError
from .app import JSON_HELP, app, console, errors, friendly, write_json


@app.command()
@friendly
def info(
    run: Path = typer.Argument(..., help="Run directory."),
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
):
    """Show a run: recipe, data, current version, rows, accuracy (and the certificate's budget)."""
    from ..unlearn import RunModel

    fitted = RunModel.load(run)
    summary = {
        "run": str(run), "version": fitted.version, "model_hash": fitted.manifest["model_hash"],
        "recipe": fitted.manifest.get("recipe"), "data": {k: v for k, v in fitted.manifest["data"].items()},
        "method": fitted.manifest["method"], "rows": int(fitted.active.sum()),
        "rows_deleted": int((~fitted.active).sum()), "rows_added": len(fitted.universe) - fitted.n_base,
        "test_acc": fitted.accuracy(),
    }
    table = Table(show_header=False, box=None)
    for key in ("version", "model_hash", "rows", "rows_deleted", "rows_added", "test_acc"):
        table.add_row(key, str(summary[key]))
    if summary["recipe"]:
        table.add_row("recipe", json.dumps(summary["recipe"]))
    table.add_row("method", json.dumps(summary["method"]))
    if hasattr(fitted, "describe"):  # a language-model run: its model folder, groups, LoRA, threads
        from .lm import describe_lm

        describe_lm(fitted, table, summary)
    if hasattr(fitted, "guarantee"):
        summary["certificate"] = fitted.guarantee()
        table.add_row("certificate", json.dumps(summary["certificate"]))
    if "privacy" in fitted.manifest:
        pr = summary["privacy"] = fitted.manifest["privacy"]
        table.add_row("privacy", f"epsilon {pr['epsilon_pld']:.3f} (PLD; RDP {pr['epsilon_rdp']:.3f}) at delta "
                      f"{pr['delta']:g}, noise multiplier {pr['noise_multiplier']:.4f}, {pr['steps']} steps")
    if "privacy_ended" in fitted.manifest:
        ended = summary["privacy_ended"] = fitted.manifest["privacy_ended"]
        before = ended.get("privacy") or {}
        table.add_row("privacy", f"none: the guarantee ended at version {ended['version']} ({ended['method']}, "
                      f"--drop-privacy); the model was (epsilon {before.get('epsilon_pld', float('nan')):.3f}, delta "
                      f"{before.get('delta', float('nan')):g})-private before")
    summary["guarantees"] = sorted(fitted.guarantees())
    table.add_row("guarantees", ", ".join(summary["guarantees"]) or "none beyond the last update's own")
    table.add_row("data", f"{summary['data']['name']} ({summary['data']['source'] or 'stored in the run'})")
    head = fitted.manifest["ledger"]
    signing = fitted.manifest.get("signing")
    summary["ledger"] = {"length": head["length"], "head": head["head"], "signing": signing and
                         {k: signing[k] for k in ("alg", "key_id")}, "pending": fitted.pending is not None}
    table.add_row("ledger", f"{head['length']} row(s), head {head['head'][:16]}..., "
                  + (f"signed ({signing['alg']}, key {signing['key_id']})" if signing else "not signed"))
    console.print(table)
    if fitted.pending is not None:
        console.print(f"[yellow]note[/] ledger row {fitted.pending.seq} is in the manifest but not yet in the ledger "
                      "file (a crash between commit and append); the next forget or add appends it", highlight=False)
    summary["cache_problems"] = [p.to_dict() for p in fitted.cache_problems]
    for problem in fitted.cache_problems:
        console.print(f"[yellow]note[/] cache {problem}", highlight=False)
    write_json(json_out, summary)


@app.command()
@friendly
def evaluate(
    run: Path = typer.Argument(..., help="Run whose current model is scored (its deleted rows are the forget set)."),
    reference: Optional[Path] = typer.Option(None, help="Run retrained without the same rows (the exact reference)."),
    original: Optional[Path] = typer.Option(None, help="Run holding the model before the deletion (for relearn steps)."),
    shadows: int = typer.Option(0, help="Shadow models for offline LiRA (trained with the run's recipe on halves of the "
                                "retained rows); 0 skips LiRA."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default RUN/reports/vVERSION)."),
    tofu: Optional[Path] = typer.Option(None, help="Language-model runs: TOFU's evaluation folder (forget01.json, "
                                        "retain_perturbed.json, ...; the shared data's tofu/)."),
    forget_split: str = typer.Option("forget01", help="Language-model runs: TOFU's forget split (forget01, forget05, "
                                     "forget10): the questions about the authors the run forgot."),
    world_knowledge: bool = typer.Option(True, help="Language-model runs: include real authors and world facts in "
                                         "model utility (--no-world-knowledge for a model without world knowledge, "
                                         "such as the tiny CPU models: the retain part only)."),
    max_new_tokens: int = typer.Option(128, help="Language-model runs: greedy answer length for ROUGE-L."),
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
):
    """Score a model against exact retraining: forget/retain/test accuracy, distance and KL to the
    retrained model, membership inference on the forget set, relearn steps; writes JSON, Markdown, a plot.
    Language-model runs: TOFU's forget quality (KS test of truth ratios against the retrained model's) and
    model utility, and the distance to the retrained weights; writes JSON and a plot."""
    from .. import evaluate as ev
    from ..unlearn import RunModel, registry

    fitted = RunModel.load(run)
    if fitted.kind == registry.LM:
        return _evaluate_lm(fitted, run, reference, tofu, forget_split, world_knowledge, max_new_tokens, out,
                            json_out)
    if tofu is not None:
        raise ExpungeError(f"--tofu scores language-model runs; {run} is a tabular run: drop it")
    if not hasattr(fitted, "model"):
        raise ExpungeError(f"{run} has no single torch model to score")
    deleted = np.flatnonzero(~fitted.active)
    if len(deleted) == 0:
        raise ExpungeError(f"{run} has deleted no rows yet: there is no forget set to score")
    forget, retain, test = fitted.universe.take(deleted), fitted.data, fitted.test
    if test is None:
        raise ExpungeError(f"{run} has no test split: train it on a dataset with one (npz with x_test, digits, location)")
    gone = sorted(set(forget.y.tolist()) - set(retain.y.tolist()))  # classes removed completely
    heldout = test.take(np.flatnonzero(np.isin(test.y, gone))) if gone else test
    scored_test = test.take(np.flatnonzero(~np.isin(test.y, gone))) if gone else test
    import copy

    models = {"model": copy.deepcopy(fitted.model)}
    ref = orig = None
    if reference is not None:
        ref_run = RunModel.load(reference)
        if not np.array_equal(np.sort(ref_run.universe.ids[ref_run.active]), np.sort(retain.ids)):
            raise ExpungeError(f"{reference} is not trained on the same remaining rows as {run}; retrain a copy of the "
                               "original run with the same ids (expunge forget COPY --ids ... --method retrain)")
        ref = models["retrain"] = ref_run.model
    if original is not None:
        orig = models["original"] = RunModel.load(original).model
    shadow_models = _shadow_models(fitted, retain, shadows) if shadows else None
    results = {name: ev.evaluate(m, forget, retain, scored_test, reference=ref, original=orig, shadows=shadow_models,
                                 heldout=heldout) for name, m in models.items()}
    folder = out or Path(run) / "reports" / f"v{fitted.version}"
    paths = ev.write_report(results, folder, title=f"Forgetting evaluation of {run} (version {fitted.version})")
    table = Table("figure", *results)
    for key in sorted({k for r in results.values() for k in r}):
        table.add_row(key, *(f"{r[key]:.4g}" if isinstance(r.get(key), float) else str(r.get(key, "-"))
                             for r in results.values()))
    console.print(table)
    console.print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    write_json(json_out, results)


def _evaluate_lm(fitted, run: Path, reference: Optional[Path], tofu: Optional[Path], forget_split: str,
                 world_knowledge: bool, max_new_tokens: int, out: Optional[Path], json_out: Optional[str]):
    """TOFU figures of a language-model run's current model, against the retrained run's when given."""
    from ..lm import evaluate_lm, load_tofu_splits, plot_evaluations
    from ..unlearn import RunModel, registry

    if tofu is None:
        raise ExpungeError(f"{run} is a language-model run, scored on TOFU's evaluation files: give --tofu DIR (the "
                           "shared data's tofu/ folder, or files in its layout)")
    splits = load_tofu_splits(tofu, forget_split, world_knowledge)
    options = {"max_new_tokens": max_new_tokens}
    results, ref = {}, None
    if reference is not None:
        ref_run = RunModel.load(reference)
        if ref_run.kind != registry.LM:
            raise ExpungeError(f"{reference} is a tabular run; the reference of a language-model run is the same run "
                               "retrained without the forgotten rows (expunge forget COPY --group G --method retrain)")
        remaining = np.sort(fitted.universe.ids[fitted.active])
        if not np.array_equal(np.sort(ref_run.universe.ids[ref_run.active]), remaining):
            raise ExpungeError(f"{reference} is not trained on the same remaining rows as {run}; retrain a copy of the "
                               "original run without the same rows (expunge forget COPY --group G --method retrain)")
        ref = evaluate_lm(ref_run.model, ref_run.tokenizer, tofu=splits, tofu_options=options)
        results["retrain"] = ref.figures
    evaluation = evaluate_lm(fitted.model, fitted.tokenizer, tofu=splits, reference=ref, tofu_options=options,
                             retrained=ref_run.model if reference is not None else None)
    results = {"model": evaluation.figures, **results}
    folder = Path(out or Path(run) / "reports" / f"v{fitted.version}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lm-evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_evaluations(results, folder / "lm-evaluation.png")
    table = Table("figure", *results)
    for key in evaluation.figures:
        table.add_row(key, *(f"{r[key]:.4g}" if isinstance(r.get(key), float) else str(r.get(key, "-"))
                             for r in results.values()))
    console.print(table)
    if not world_knowledge:
        console.print("model utility: the retain split only (--no-world-knowledge)")
    console.print(f"wrote {folder / 'lm-evaluation.json'}, {folder / 'lm-evaluation.png'}")
    write_json(json_out, results)


def _shadow_models(fitted, retain, k: int):
    """k models trained with the run's recipe on random halves of the retained rows (never the targets)."""
    import copy

    from ..train import train as train_model

    if not hasattr(fitted, "ws"):
        raise ExpungeError("shadow models need a gradient-trained run (deltagrad/retrain recipe)")
    rng = np.random.default_rng(0)
    rows = np.flatnonzero(fitted.active)
    models = []
    for _ in range(k):
        half = np.zeros(len(fitted.active), bool)
        half[rng.choice(rows, len(rows) // 2, replace=False)] = True
        models.append(copy.deepcopy(fitted.flat.set_flat(train_model(fitted.ws, half, fitted.w0))))
    fitted.flat.set_flat(fitted.w)
    return models


CSV_COLUMNS = ("seq", "version", "at", "kind", "method", "n_rows", "ids_sha256", "guarantee_kind", "guarantee",
               "requested_by", "reason", "reference", "request_id", "batch_id", "batch_index", "batch_size",
               "model_hash_before", "model_hash_after", "state_sha256", "prev_hash", "entry_hash", "signer", "signature",
               "migrated", "in_ledger_file")


def _csv_row(entry: dict) -> dict:
    guarantee = entry.get("guarantee") or {}
    signer = entry.get("signer")
    batch = entry.get("batch") or {}
    return {**{k: entry.get(k) for k in CSV_COLUMNS}, "guarantee_kind": guarantee.get("kind"),
            "batch_id": batch.get("id"), "batch_index": batch.get("index"), "batch_size": batch.get("size"),
            "guarantee": json.dumps(guarantee, sort_keys=True),
            "signer": f"{signer['alg']}:{signer['key_id']}" if signer else ""}


def _guarantee(g: dict | None) -> str:
    g = g or {}
    text = g.get("kind", "?")
    if g.get("kind") == "certified":
        text += f" (eps {g.get('epsilon'):g})"
    elif "privacy" in g:
        text += f", private (eps {g['privacy'].get('epsilon_pld', float('nan')):.2f})"
    if "privacy_ended" in g:
        text += ", privacy ended"
    return text


@app.command()
@friendly
def ledger(
    run: Path = typer.Argument(..., help="Run directory."),
    json_out: Optional[str] = typer.Option(None, "--json", help=JSON_HELP),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows as CSV for an auditor (one row per "
                                          "request, every field)."),
):
    """List every request the run has served: who asked, why, the guarantee, the model before and after. Read-only:
    mismatches are reported (see `expunge verify`), never repaired here."""
    import csv

    from ..artifact import RunDirectory
    from ..integrity import reconcile
    from ..unlearn.run import reading_verifier

    directory = RunDirectory(run)
    manifest = directory.read_manifest()
    state = reconcile(manifest, directory.ledger, str(run), full=True, verifier=reading_verifier(manifest))
    entries = [dict(e.to_dict(), in_ledger_file=True) for e in state.entries or []]
    entries += [dict(e.to_dict(), in_ledger_file=False) for e in state.pending_rows]
    table = Table("version", "at", "kind", "method", "rows", "guarantee", "requested by", "reason", "reference",
                  "model before -> after", "signed")
    for e in entries:
        before = (e.get("model_hash_before") or "-")[:12]
        batch = e.get("batch")  # a batch's rows share a version: tell them apart
        place = f" ({batch['index'] + 1}/{batch['size']})" if batch and batch["size"] > 1 else ""
        table.add_row(str(e["version"]) + place + ("" if e["in_ledger_file"] else "*"), e["at"], e["kind"], e["method"],
                      str(e["n_rows"]), _guarantee(e.get("guarantee")), e.get("requested_by") or "",
                      e.get("reason") or "", e.get("reference") or "", f"{before} -> {e['model_hash_after'][:12]}",
                      (e["signer"]["key_id"] if e.get("signer") else "no") + (" (migrated)" if e.get("migrated") else ""))
    console.print(table)
    if state.pending_rows:
        console.print("* in the manifest, not yet in the ledger file (a crash between commit and append): the next "
                      "forget or add appends it", highlight=False)
    for problem in state.problems:
        errors.print(f"[bold red]mismatch:[/] {problem}", highlight=False)
    if state.problems:
        errors.print(f"`expunge verify {run}` checks everything (files and models too)")
    write_json(json_out, entries)
    if csv_out is not None:
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(_csv_row(e) for e in entries)
