"""How update reports, certificates and privacy figures are printed."""

from __future__ import annotations

from rich.table import Table

from .app import console


def print_certificate(g: dict) -> None:
    left = g["removals_left_estimate"]
    console.print(f"certificate: ({g['epsilon']:g}, {g['delta']:g})-certified removal; gradient-residual budget "
                  f"{g['budget']:.3g}, spent {g['spent']:.3g}, left {g['budget_left']:.3g}"
                  + (f" (about {left} more removals of typical rows)" if left is not None else ""), highlight=False)


def print_report(report, quiet: bool) -> None:
    if quiet:
        return
    metrics, g = report.metrics, report.guarantee
    table = Table(show_header=False, box=None)
    table.add_row("method", report.method)
    table.add_row("request", f"{report.kind} {len(report.ids)} row(s)" if report.ids else report.kind)
    table.add_row("seconds", f"{report.seconds:.3f}")
    if g.get("kind") == "certified":
        table.add_row("guarantee", f"({g['epsilon']:g}, {g['delta']:g})-certified removal"
                      + ("; the budget was exhausted, so the model was retrained with fresh noise" if g.get("retrained") else ""))
        if "removal_bound" in metrics:
            table.add_row("residual bound", f"this removal {metrics['removal_bound']:.3g}; measured residual "
                          f"{metrics['residual_norm']:.3g}")
        left = g["removals_left_estimate"]
        table.add_row("budget", f"spent {g['spent']:.3g} of {g['budget']:.3g}, left {g['budget_left']:.3g}"
                      + (f" (about {left} more typical removals)" if left is not None else ""))
    elif g.get("kind") == "evaluated":  # a merge or a trade-off point
        table.add_row("guarantee", "none by construction; evaluated: " + ", ".join(
            f"{k} {_measured(v, g.get('score', 'accuracy'))}" for k, v in g.get("measured", {}).items())
            + (f" at c = {g['c']}" if g.get("c") is not None else ""))
    elif g.get("kind") in ("scrubbed", "none"):
        table.add_row("guarantee", "none: scrubbing/fine-tuning is judged by `expunge evaluate` against a retrained run"
                      if g["kind"] == "none" else f"none (Fisher scrubbing, lam={g['lam']:g}, noise norm {g['noise_norm']:.3g})")
    elif "rows_full_retrain" in metrics:  # SISA
        table.add_row("guarantee", "exact (only the affected shards were retrained)")
        table.add_row("retrained", f"{metrics['shards_retrained']} shard(s), {metrics['stages_retrained']} stage(s); "
                      f"{metrics['rows_processed']} rows processed vs {metrics['rows_full_retrain']} for full retraining")
        if "identical_to_retrain" in metrics:
            table.add_row("check", f"bit-identical to retraining from scratch: {metrics['identical_to_retrain']} "
                          f"(retrain {metrics['retrain_s']:.3f} s, speedup {metrics['speedup']:.1f}x)")
    elif "privacy" in g:
        pr = g["privacy"]
        table.add_row("guarantee", f"exact private retraining: epsilon {pr['epsilon_pld']:.3f} (PLD; RDP "
                      f"{pr['epsilon_rdp']:.3f}) at delta {pr['delta']:g}, noise multiplier {pr['noise_multiplier']:.4f}")
    elif g.get("kind") == "approximate":
        table.add_row("guarantee", f"approximate: {g['explicit_iterations']}/{g['iterations']} explicit iterations "
                      f"(speedup bound {g['speedup_bound']:.2f}x)")
    else:
        table.add_row("guarantee", "exact")
    if "dist_to_retrain" in metrics:
        table.add_row("retrain seconds", f"{metrics['retrain_s']:.3f} (speedup {metrics['speedup']:.2f}x)")
        table.add_row("|w - w_retrain|", f"{metrics['dist_to_retrain']:.3e}  "
                      f"(before the update: {metrics['dist_previous_to_retrain']:.3e}, ratio "
                      f"{metrics['dist_to_retrain'] / max(metrics['dist_previous_to_retrain'], 1e-300):.4f})")
    if "dist_to_previous" in metrics:
        table.add_row("|w - w_before|", f"{metrics['dist_to_previous']:.3e}")
    if "test_acc" in metrics:
        extra = f" (retrain {100 * metrics['acc_retrain']:.2f}%)" if metrics.get("acc_retrain") is not None else ""
        table.add_row("test accuracy", f"{100 * metrics['test_acc']:.2f}%{extra}")
    table.add_row("rows now", str(metrics.get("rows")))
    before = (report.model_hash_before or "-")[:16]
    table.add_row("model", f"{before} -> {report.model_hash_after[:16]} (version {report.version}; full hashes in --json "
                  "and `expunge ledger`)")
    console.print(table)


def print_privacy(privacy: dict) -> None:
    console.print(f"private: epsilon {privacy['epsilon_pld']:.3f} (PLD; RDP {privacy['epsilon_rdp']:.3f}) at delta "
                  f"{privacy['delta']:g}; noise multiplier {privacy['noise_multiplier']:.4f}, sampling rate "
                  f"{privacy['sample_rate']:.5f}, {privacy['steps']} steps, clipping {privacy['clipping']} "
                  f"({privacy['clip_fn']}, C={privacy['max_grad_norm']:g})")


def _measured(value, score: str) -> str:
    """An evaluated guarantee's figure: accuracies as percentages, counts as counts, other scores as numbers."""
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.2f}%" if score == "accuracy" else f"{value:.4g}"
