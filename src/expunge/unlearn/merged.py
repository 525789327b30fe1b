"""Merged runs: a model theta_0 + sum_n c_n tau_n made by `expunge merge` from a base run and runs fine-tuned
from it, written as a run of its own so that it is opened, verified, evaluated and audited like any other.

A merged run keeps the base run's data record (its rows are the base's current rows: the run opens and
evaluates like the base) and says in its manifest's "merge" section which runs, task vectors, coefficients
and metrics made it. It has no update method: the rows it learned from live in several runs, so a
deletion is served by those runs and a new merge (the refusal says so).

``MergedFitted`` holds a merged zoo model (method ``merge``); ``MergedLMRun`` a merged language model (method
``lm-merge``, what ``merge`` means on an LM run): the merge in the Hugging Face layout with the base's tokenizer
(``from_pretrained`` loads it), on the base run's corpus record.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpungeError
from ..lm import folder_hash, save_pretrained
from ..lm.models import parameter_count
from ..models import weights_hash
from .base import UpdateReport
from .fitted import Fitted
from .lm_run import MODEL, LMRun, library_versions, quiet_transformers

MERGE = "merge"


def evaluated_guarantee(measured: dict, **details) -> dict:
    """What a merge or a trade-off point promises: nothing by construction; its metrics were measured. ``score``
    says what the measured values are ("accuracy", "answer-probability", "nll"): how reports show them."""
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


class LMMerge(Merge):
    name = "lm-merge"


def _refuse_update(run, kind: str):
    record = run.manifest.get("merge", {})
    sources = [record.get("base", {}).get("path")] + [m.get("path") for m in record.get("models", [])]
    raise ExpungeError(f"{run.path} is a merged model; it learned from the rows of several runs "
                       f"({', '.join(str(s) for s in sources if s)}). Serve {kind} requests on those runs, then "
                       "merge them again with `expunge merge`")


class MergedFitted(Fitted):
    """A merged zoo model (weights w = the merge, w0 = the base run's model theta_0)."""

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        _refuse_update(self, kind)

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
                                      evaluated_guarantee(record.get("measured", {}), c=record.get("c"),
                                                          score=record.get("score", "accuracy")), metrics)
                merged._commit_weights(stage, None, report, w, base.universe, merged.active)
        return merged


class MergedLMRun(LMRun):
    """A merged language model: ``versions/N/model`` holds the merge and the base's tokenizer."""

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        _refuse_update(self, kind)

    @classmethod
    def create(cls, base: LMRun, state: dict[str, torch.Tensor], out, record: dict, files: dict[str, bytes],
               signing_key=None) -> MergedLMRun:
        """Write the merged state as a new run at ``out`` on ``base``'s corpus record; ``record`` is the manifest's
        "merge" section, ``files`` (name -> bytes) go into the version folder (sealed). The recipe is the base's
        without LoRA: the merge is a full model whatever its runs trained."""
        model = copy.deepcopy(base.model)
        try:
            model.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise ExpungeError(f"the merged state does not fit the base's model ({e})") from None
        info, corpus = base.manifest["data"], base.universe
        run, created, signer = cls._new_directory(out, signing_key)
        manifest = cls._first_manifest({k: v for k, v in info.items() if k not in ("base_sha256", "base_file")},
                                       {"name": LMMerge.name, "config": {}})
        manifest["recipe"] = replace(base.recipe, lora_rank=0, lora_alpha=None, lora_targets=None).to_dict()
        count = parameter_count(model)
        manifest["lm"] = {**{k: v for k, v in base.lm.items() if k != "base_hash"}, "parameters": count,
                          "trainable_parameters": count, "libraries": library_versions()}  # what wrote the merge
        manifest["merge"] = record
        with cls._creating(run, manifest, created, corpus, None, info.get("source")):
            merged = cls(run, manifest, corpus, base.active.copy())
            merged._signer = signer
            with run.staging() as stage:
                start = time.perf_counter()
                with quiet_transformers():
                    save_pretrained(model, base.tokenizer, stage / MODEL)
                for name, content in files.items():
                    (stage / Path(name).name).write_bytes(content)
                model_hash = folder_hash(stage / MODEL)
                report = UpdateReport(LMMerge.name, MERGE, [], time.perf_counter() - start, None, model_hash,
                                      evaluated_guarantee(record.get("measured", {}), c=record.get("c"),
                                                          score=record.get("score", "accuracy")),
                                      {"rows": int(merged.active.sum())})

                def adopt(folder: Path) -> None:
                    merged._model_hash, merged._model = model_hash, None

                merged._commit(stage, report, corpus, merged.active, adopt)
        return merged
