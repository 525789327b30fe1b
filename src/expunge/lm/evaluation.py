"""The evaluation of an unlearned LM against exact retraining, as for the other models: TOFU and MUSE figures
(tofu.py, muse.py), the distance to the retrained model's weights, relearn steps, and a plot.

    ref = evaluate_lm(retrained, tok, tofu=splits)
    out = evaluate_lm(unlearned, tok, tofu=splits, reference=ref, retrained=retrained,
                      forget=forget_data, original=target)
    plot_evaluations({"target": ..., "retrain": ref.figures, "ngdiff": out.figures}, "report.png")

- ``param_dist_to_retrain``: ||w - w_retrain||_2 over every floating-point tensor of the two state dicts
  (LoRA adapters merged first), which must share an architecture.
- ``relearn_steps``: how many steps of fine-tuning on the forget rows (SGD, seeded batches) bring a copy of the
  model back to the original (target) model's mean forget NLL, checked every ``check_every`` steps;
  ``max_steps`` when it never gets there. Fewer steps = the knowledge is still close at hand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpungeError
from .data import TokenDataset
from .determinism import deterministic, seeded, step_seed
from .lora import merged
from .muse import MuseData, MuseEvaluation, evaluate_muse
from .scoring import row_nlls
from .tofu import TofuEvaluation, TofuSplit, evaluate_tofu
from .train import row_losses


def parameter_distance(model, reference) -> float:
    """||w_model - w_reference||_2 over the floating-point tensors of the state dicts (adapters merged)."""
    a, b = merged(model).state_dict(), merged(reference).state_dict()
    if a.keys() != b.keys():
        raise ExpungeError("the two models have different tensors; a distance needs the same architecture")
    total = 0.0
    for name, t in a.items():
        if t.is_floating_point():
            if t.shape != b[name].shape:
                raise ExpungeError(f"{name} has shape {tuple(t.shape)} in one model and {tuple(b[name].shape)} in the other")
            total += float((t.detach().double().cpu() - b[name].detach().double().cpu()).pow(2).sum())
    return float(np.sqrt(total))


def relearn_steps(model, forget: TokenDataset, target_nll: float, *, lr: float = 1e-3, batch_size: int = 8,
                  max_steps: int = 50, check_every: int = 5, seed: int = 0, eval_batch_size: int = 16) -> int:
    """SGD steps on the forget rows until a copy of ``model`` has mean forget NLL <= ``target_nll``."""
    if max_steps < 1 or check_every < 1:
        raise ExpungeError("relearning needs max_steps >= 1 and check_every >= 1")
    copy_ = copy.deepcopy(model)
    params = [p for p in copy_.parameters() if p.requires_grad]
    if not params:
        raise ExpungeError("the model has no trainable parameters to relearn with")
    optimizer = torch.optim.SGD(params, lr=lr)
    rng = np.random.default_rng(seed)
    device = next(copy_.parameters()).device
    try:
        for step in range(max_steps):
            if step % check_every == 0 and float(row_nlls(copy_, forget, eval_batch_size).mean()) <= target_nll:
                return step
            rows = rng.choice(len(forget), size=min(batch_size, len(forget)), replace=False)
            copy_.train()
            with deterministic(), seeded(step_seed(seed, step)):
                optimizer.zero_grad(set_to_none=True)
                row_losses(copy_, forget.batch(rows, device)).mean().backward()
                optimizer.step()
        return max_steps
    finally:
        del copy_, optimizer


@dataclass
class LMEvaluation:
    """Every figure of one model (flat, JSON-able) and the parts a later evaluation is compared with."""

    figures: dict
    tofu: TofuEvaluation | None = field(default=None, repr=False)
    muse: MuseEvaluation | None = field(default=None, repr=False)


def evaluate_lm(model, tokenizer, *, tofu: dict[str, TofuSplit] | None = None, muse: MuseData | None = None,
                reference: LMEvaluation | None = None, retrained=None, forget: TokenDataset | None = None,
                original=None, relearn: dict | None = None, tofu_options: dict | None = None,
                muse_options: dict | None = None) -> LMEvaluation:
    """TOFU figures on ``tofu`` splits, MUSE figures on ``muse`` items (forget quality and PrivLeak against
    ``reference``, the retrained model's LMEvaluation), the distance to the ``retrained`` model, and relearn
    steps on the ``forget`` rows back to the ``original`` model's forget NLL (``relearn``: options of
    relearn_steps; leave ``original`` out to skip it)."""
    if tofu is None and muse is None:
        raise ExpungeError("nothing to evaluate: give TOFU splits, MUSE data or both")
    figures: dict = {}
    tofu_eval = muse_eval = None
    if tofu is not None:
        tofu_eval = evaluate_tofu(model, tokenizer, tofu, reference=reference.tofu if reference else None,
                                  **(tofu_options or {}))
        figures.update(tofu_eval.figures)
    if muse is not None:
        muse_eval = evaluate_muse(model, tokenizer, muse, reference=reference.muse if reference else None,
                                  **(muse_options or {}))
        figures.update(muse_eval.figures)
    if retrained is not None:
        figures["param_dist_to_retrain"] = parameter_distance(model, retrained)
    if original is not None:
        if forget is None:
            raise ExpungeError("relearn steps need the forget rows (forget=TokenDataset)")
        target = float(row_nlls(original, forget).mean())
        figures["relearn_steps"] = relearn_steps(model, forget, target, **(relearn or {}))
    return LMEvaluation(figures, tofu_eval, muse_eval)


PLOTTED = (("forget_quality", "forget quality (KS p)", True), ("model_utility", "model utility", False),
           ("forget_truth_ratio", "forget truth ratio", False), ("verbmem_forget", "VerbMem (forget)", False),
           ("knowmem_forget", "KnowMem (forget)", False), ("knowmem_retain", "KnowMem (retain)", False),
           ("privleak", "PrivLeak", False))


def plot_evaluations(results: dict[str, dict], path) -> Path:
    """One bar panel per figure present (forget quality on a log scale), one bar per model; writes ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title, log) for key, title, log in PLOTTED
              if any(isinstance(r.get(key), (int, float)) for r in results.values())]
    if not panels:
        raise ExpungeError("no plottable figures (forget quality, model utility, truth ratio or MUSE figures)")
    names = list(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.8), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], panels):
        values = [results[n].get(key) for n in names]
        heights = [v if isinstance(v, (int, float)) else np.nan for v in values]
        if log:
            heights = [max(v, 1e-300) if np.isfinite(v) else np.nan for v in heights]
            ax.set_yscale("log")
        ax.bar(range(len(names)), heights, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
