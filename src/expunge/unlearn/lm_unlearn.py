"""Language-model unlearning as update methods of LM runs: ``ngdiff``, ``graddiff``, ``npo``, ``simnpo`` and
``lm-ascent`` (what ``ascent`` means on an LM run), the methods of expunge.lm.unlearning.

    run.forget(groups=["author-7"], method="ngdiff")                    # the method's default settings
    run.forget([3, 7], method=NGDiffUpdate(lr=1e-4, max_steps=20))       # or chosen settings

Each update starts from the run's current model (with LoRA, its current adapters) and unlearns the request's
rows, keeping the run's remaining rows, and is written as an ordinary new version with its ledger row. No
guarantee holds by construction: the ledger says so (``evaluated``) and records the forget and retain NLLs
measured before and after (on every forgotten row and a seeded sample of at most ``RETAIN_SCORED`` remaining
rows); `expunge evaluate RUN --reference RETRAINED_RUN` judges the result against exact retraining.

A crash in the middle commits nothing: the update works on a model rebuilt from the committed version, which
the run's version, model and ledger never see until the new version is committed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..lm import make_unlearner
from ..lm.scoring import row_nlls
from .merged import evaluated_guarantee

RETAIN_SCORED = 64  # remaining rows scored before and after an update (a seeded sample of larger retain sets)


class LMUnlearning:
    """An LM unlearning method as a run's updater: ``settings`` are those of the library's method (lr, epochs,
    max_steps, batch_size, ...; see expunge.lm.unlearning), its defaults where not given."""

    name: ClassVar[str]
    library: ClassVar[str]  # the method's name in expunge.lm.unlearning
    private = False
    unlearns = True  # LMRun updates from the current model, not by retraining from the initial weights

    def __init__(self, **settings):
        self.unlearner = make_unlearner(self.library, **settings)

    def config(self) -> dict:
        return self.unlearner.config()

    def check(self, recipe, n_rows: int) -> None:
        """Nothing to refuse beyond what the settings refused when built (the loop checks the data)."""

    def unlearn(self, model, forget, retain, progress: bool = False) -> tuple[dict, dict]:
        """Unlearn the ``forget`` rows (TokenDatasets) from ``model`` in place; return the guarantee (nothing by
        construction, the NLLs measured) and the update's metrics."""
        rng = np.random.default_rng(np.random.SeedSequence([self.unlearner.seed, 2]))
        scored = retain.take(np.sort(rng.choice(len(retain), min(len(retain), RETAIN_SCORED), replace=False)))
        batch = self.unlearner.batch_size
        before = row_nlls(model, forget, batch).mean(), row_nlls(model, scored, batch).mean()
        # restore=False: on failure the caller drops this model (it was rebuilt from the committed version)
        result = self.unlearner.update(model, forget, retain, progress=progress, restore=False)
        after = row_nlls(model, forget, batch).mean(), row_nlls(model, scored, batch).mean()
        measured = {"forget_nll_before": float(before[0]), "forget_nll_after": float(after[0]),
                    "retain_nll_before": float(before[1]), "retain_nll_after": float(after[1]),
                    "forget_rows": len(forget), "retain_rows_scored": len(scored)}
        guarantee = evaluated_guarantee(measured, score="nll", steps=result.steps,
                                        note="judge it against exact retraining: expunge evaluate RUN --reference "
                                             "RETRAINED_RUN")
        metrics = {"steps": result.steps, "tokens": result.tokens, "unlearn_seconds": result.seconds,
                   "final_objective": result.losses[-1] if result.losses else None,
                   "last_rate": result.rates[-1] if result.rates else None}
        return guarantee, metrics


class LMAscent(LMUnlearning):
    """Gradient ascent on the forgotten rows (what ``ascent`` means on a language-model run)."""

    name, library = "lm-ascent", "ascent"


class GradDiffUpdate(LMUnlearning):
    name = library = "graddiff"


class NPOUpdate(LMUnlearning):
    name = library = "npo"


class SimNPOUpdate(LMUnlearning):
    name = library = "simnpo"


class NGDiffUpdate(LMUnlearning):
    name = library = "ngdiff"
