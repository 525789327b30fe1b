"""Evidence that an update forgot: accuracies, distance to the retrained model, membership
inference, relearn time, and a JSON + Markdown report with a plot.

Everything takes plain ``torch.nn.Module`` models and ``IndexedDataset`` splits, so any method's
output is scored the same way. Membership inference asks whether the forget set still looks like
training data: the attack separates forget rows ("members" of the original training set) from
held-out test rows; after a good removal its AUC is close to that of the retrained model (about
0.5 for a random forget set). A voting ensemble's outputs (vote fractions) are scored as if they were
logits: the attack still ranks rows by them, but its losses are not a model's cross-entropy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from .data import IndexedDataset


def _inputs(model: torch.nn.Module, data: IndexedDataset) -> torch.Tensor:
    return torch.from_numpy(data.X).to(next(model.parameters()).dtype)


@torch.no_grad()
def logits(model: torch.nn.Module, data: IndexedDataset, chunk: int = 4096) -> torch.Tensor:
    X = _inputs(model, data)
    return torch.cat([model(X[i : i + chunk]) for i in range(0, len(X), chunk)]) if len(X) else torch.zeros(0)


def accuracy(model: torch.nn.Module, data: IndexedDataset | None) -> float | None:
    if data is None or len(data) == 0:
        return None
    return float((logits(model, data).argmax(1).numpy() == data.y).mean())


def losses(model: torch.nn.Module, data: IndexedDataset) -> np.ndarray:
    """Per-row cross-entropy (a diverged model's NaN or infinite losses become 1e30)."""
    out = logits(model, data)
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(data.y), reduction="none").double()
    return torch.nan_to_num(loss, nan=1e30, posinf=1e30).numpy()


def parameter_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||w_a - w_b||_2 over all parameters (the models must share an architecture)."""
    flat = lambda m: torch.cat([p.detach().double().reshape(-1) for p in m.parameters()])  # noqa: E731
    return float((flat(a) - flat(b)).norm())


def mean_kl(reference: torch.nn.Module, model: torch.nn.Module, data: IndexedDataset) -> float:
    """Mean over rows of KL(p_reference || p_model) between the output distributions."""
    p = torch.log_softmax(logits(reference, data).double(), 1)
    q = torch.log_softmax(logits(model, data).double(), 1)
    return float((p.exp() * (p - q)).sum(1).mean())


def _auc_tpr(member_scores: np.ndarray, other_scores: np.ndarray, fpr_target: float = 0.01) -> dict:
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(other_scores))]
    scores = np.r_[member_scores, other_scores]
    fpr, tpr, _ = roc_curve(y, scores)
    return {"auc": float(roc_auc_score(y, scores)), "tpr_at_1pct_fpr": float(np.interp(fpr_target, fpr, tpr))}


def loss_threshold_attack(model: torch.nn.Module, members: IndexedDataset, others: IndexedDataset) -> dict:
    """Yeom et al.: lower loss means "member". AUC and TPR at 1% FPR."""
    return _auc_tpr(-losses(model, members), -losses(model, others))


def _confidence_logit(model: torch.nn.Module, data: IndexedDataset) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)), the statistic LiRA models as Gaussian."""
    logp = torch.log_softmax(logits(model, data).double(), 1)
    ly = logp[torch.arange(len(data)), torch.from_numpy(data.y)]
    return torch.nan_to_num(ly - torch.log1p(-ly.exp().clamp(max=1 - 1e-15)), nan=-1e30, neginf=-1e30,
                            posinf=1e30).numpy()


def lira_offline(model: torch.nn.Module, shadows: list[torch.nn.Module], members: IndexedDataset,
                 others: IndexedDataset) -> dict:
    """Offline LiRA (Carlini et al. 2022): shadow models trained without the target rows give, per
    row, a Gaussian of the OUT confidence; the score is how far above it the model's confidence lies."""
    def scores(data):
        phi = _confidence_logit(model, data)
        out = np.stack([_confidence_logit(s, data) for s in shadows])
        mu, sd = out.mean(0), out.std(0) + 1e-6
        return np.array([0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (phi - mu) / sd])
    return _auc_tpr(scores(members), scores(others))


def relearn_steps(model: torch.nn.Module, forget: IndexedDataset, target_loss: float, lr: float = 0.01,
                  batch_size: int = 32, max_steps: int = 500, check_every: int = 5, seed: int = 0) -> int | None:
    """SGD steps of fine-tuning a copy on the forget set until its mean loss is back to
    ``target_loss`` (the original model's), checked every ``check_every`` steps; ``max_steps`` if
    it never gets there; ``None`` for a model that cannot be fine-tuned (a voting ensemble)."""
    import copy

    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    X, y = _inputs(model, forget), torch.from_numpy(forget.y)
    generator = torch.Generator().manual_seed(seed)
    for step in range(max_steps):
        if step % check_every == 0:
            with torch.no_grad():
                if float(torch.nn.functional.cross_entropy(model(X), y)) <= target_loss:
                    return step
        idx = torch.randint(len(y), (min(batch_size, len(y)),), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        if not loss.requires_grad:  # the output is not differentiable in the weights (majority vote)
            return None
        loss.backward()
        optimizer.step()
    return max_steps


def evaluate(model: torch.nn.Module, forget: IndexedDataset, retain: IndexedDataset, test: IndexedDataset,
             reference: torch.nn.Module | None = None, original: torch.nn.Module | None = None,
             shadows: list[torch.nn.Module] | None = None, relearn_lr: float = 0.01,
             heldout: IndexedDataset | None = None) -> dict:
    """Every figure for one model: accuracies, distance and KL to the retrained ``reference``,
    membership inference of the forget set against ``heldout`` rows (default: the test set; for a
    removed class, pass that class's test rows), relearn steps to the ``original``'s loss."""
    heldout = test if heldout is None else heldout
    out = {"forget_acc": accuracy(model, forget), "retain_acc": accuracy(model, retain), "test_acc": accuracy(model, test)}
    if reference is not None:
        out["param_dist_to_retrain"] = parameter_distance(model, reference)
        out["kl_to_retrain"] = mean_kl(reference, model, test)
    if len(forget) and len(heldout):
        attack = loss_threshold_attack(model, forget, heldout)
        out.update(mia_auc=attack["auc"], mia_tpr_at_1pct_fpr=attack["tpr_at_1pct_fpr"])
        if shadows:
            lira = lira_offline(model, shadows, forget, heldout)
            out.update(lira_auc=lira["auc"], lira_tpr_at_1pct_fpr=lira["tpr_at_1pct_fpr"])
    if original is not None and len(forget):
        out["relearn_steps"] = relearn_steps(model, forget, float(losses(original, forget).mean()), lr=relearn_lr)
    return out


def write_report(results: dict[str, dict], folder, title: str = "Forgetting evaluation") -> dict[str, Path]:
    """``results`` maps a model's name (e.g. "original", "retrain", "fisher") to its figures. Writes
    report.json, report.md and report.png in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "md": folder / "report.md", "png": folder / "report.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    keys = sorted({k for r in results.values() for k in r})
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# {title}", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for name, r in results.items()]
    paths["md"].write_text("\n".join(lines) + f"\n\n![accuracies]({paths['png'].name})\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in ("forget_acc", "retain_acc", "test_acc", "mia_auc") if any(k in r for r in results.values())]
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 3, 3.5))
    width = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        ax.bar(np.arange(len(results)) + i * width, [results[n].get(metric) or 0 for n in results], width, label=metric)
    ax.set_xticks(np.arange(len(results)) + width * (len(metrics) - 1) / 2, list(results))
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
