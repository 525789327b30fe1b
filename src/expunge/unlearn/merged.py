"""Merged runs: a model theta_0 + sum_n c_n tau_n made by `expunge merge` from a base run and runs fine-tuned
from it, written as a run of its own so that it is opened, verified, evaluated and audited like any other.

A merged run keeps the base run's data record (its rows are the base's current rows: the run opens and
evaluates like the base) and says in its manifest's "merge" section which runs, task vectors, coefficients
and metrics made it. It has no update method: the rows it learned from live in several runs, so a
deletion is served by those runs and a new merge (the refusal says so).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpungeError
from ..models import weights_hash
from .base import UpdateReport
from .fitted import Fitted

MERGE = "merge"


def evaluated_guarantee(measured: dict, **details) -> dict:
    """What a merge or a trade-off point promises: nothing by construction; its metrics were measured."""
    return {"kind": "evaluated", "by_construction": "none", "measured": measured, **details}


class Merge:
    """The method a merged run's manifest names. It computes no updates (see the module docstring)."""

    name = MERGE
    writes_trajectory = False

    def __init__(self, **config):
        self._config = dict(config)

    def config(self) -> dict:
        return dict(self._config)

    def update(self, *args, **kwargs):
        raise ExpungeError("merge is not an update method: merged runs are made by `expunge merge`. To delete rows "
                           "from a merged model, forget them in the runs it merges and merge again")


class MergedFitted(Fitted):
    """A merged zoo model (weights w = the merge, w0 = the base run's model theta_0)."""

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        record = self.manifest.get("merge", {})
        sources = [record.get("base", {}).get("path")] + [m.get("path") for m in record.get("models", [])]
        raise ExpungeError(f"{self.path} is a merged model; it learned from the rows of several runs "
                           f"({', '.join(str(s) for s in sources if s)}). Serve {kind} requests on those runs, then "
                           "merge them again with `expunge merge`")

    @classmethod
    def create(cls, base: Fitted, w: torch.Tensor, out, record: dict, files: dict[str, bytes],
               signing_key=None) -> MergedFitted:
        """Write the merged weights ``w`` as a new run at ``out`` on ``base``'s data record; ``record`` is
        the manifest's "merge" section, ``files`` (name -> bytes) go into the version folder (sealed)."""
        if w.shape != base.w.shape or w.dtype != base.w.dtype:
            raise ExpungeError(f"merged weights of shape {tuple(w.shape)} {w.dtype} do not fit the base's "
                               f"{tuple(base.w.shape)} {base.w.dtype}")
        data = base.universe.take(np.arange(base.n_base))
        info = base.manifest["data"]
        run, manifest, created, signer = cls._new_run(data, out, base.test, info.get("source"),
                                                      {"name": MERGE, "config": {}}, info.get("preprocess"),
                                                      signing_key)
        manifest["data"] = {k: v for k, v in info.items() if k != "base_sha256"}  # read back exactly as the base
        manifest["recipe"] = dict(base.manifest["recipe"])
        manifest["merge"] = record
        with cls._creating(run, manifest, created, data, base.test, info.get("source")):
            merged = cls(run, manifest, base.universe, base.active.copy(), base.test)
            merged.w0, merged._signer = base.w.clone(), signer
            with run.staging() as stage:
                start = time.perf_counter()
                for name, content in files.items():
                    (stage / Path(name).name).write_bytes(content)
                metrics = merged._metrics(w, merged.active)
                report = UpdateReport(MERGE, MERGE, [], time.perf_counter() - start, None, weights_hash(w),
                                      evaluated_guarantee(record.get("measured", {}), c=record.get("c")), metrics)
                merged._commit_weights(stage, None, report, w, base.universe, merged.active)
        return merged
