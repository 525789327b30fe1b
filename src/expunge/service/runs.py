"""The runs a service serves: the run directories under one folder, each named by its folder name.

A request is checked against the run before it is queued (are its ids rows of the run?), which needs the run's
ids. Loading a run in full (its data, its model) costs seconds, so ``RunCatalog.view`` loads each run once and
then follows it cheaply: a run's training ids never change, and each version's added ids and mask of active rows
are read from that version alone (``RunModel.current_rows``).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import RunDirectory
from ..errors import ExpungeError
from ..unlearn import registry
from ..unlearn.run import RunModel, guarantees_of

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RECHECK_S = 1.0


class UnknownRun(ExpungeError):
    pass


@dataclass
class RunView:
    """What requests are checked against: every id the run knows, which are active, and its named groups."""

    name: str
    run_id: str
    version: int
    head: str
    ids: np.ndarray       # every id, sorted
    active: np.ndarray    # whether each of ``ids`` is a current training row
    n_features: int
    n_classes: int
    groups: dict = field(default_factory=dict)  # group name -> ids (as of ``groups_version``)
    groups_version: int = 0

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        """The ids the run has never held."""
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return ids[self.ids[pos] != ids]

    def deleted(self, ids: np.ndarray) -> np.ndarray:
        """The known ids that are not current training rows."""
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return ids[(self.ids[pos] == ids) & ~self.active[pos]]


def describe(name: str, manifest: dict) -> dict:
    """A run's method and guarantees, from its manifest alone: the method and its settings, what the model promises,
    and the figures behind it (a certified run's budget left, a private run's epsilon, a SISA run's shards)."""
    method = manifest["method"]
    last = (manifest.get("last_entry") or {}).get("guarantee") or {}
    figures: dict = {}
    if method["name"] == "certified":
        figures = {k: last.get(k) for k in ("epsilon", "delta", "budget", "spent", "budget_left",
                                            "removals_left_estimate", "removals", "retrains")}
    elif method["name"] == "sisa":
        figures = {k: method["config"].get(k) for k in ("shards", "slices", "aggregation")}
    elif method["name"] == "deltagrad":
        figures = {k: method["config"].get(k) for k in ("T0", "j0", "m")}
    if "privacy" in manifest:
        pr = manifest["privacy"]
        figures.update(epsilon=pr.get("epsilon_pld"), delta=pr.get("delta"))
    if "privacy_ended" in manifest:
        figures["privacy_ended_at_version"] = manifest["privacy_ended"].get("version")
    head = manifest.get("ledger") or {}
    return {"name": name, "run_id": manifest.get("run_id"), "version": manifest["version"], "method": method["name"],
            "config": method.get("config"), "guarantees": sorted(guarantees_of(manifest)),
            "last_guarantee": last.get("kind"), "figures": figures, "data": manifest["data"].get("name"),
            "ledger_rows": head.get("length"), "ledger_head": head.get("head"),
            "signed": bool(manifest.get("signing"))}


class RunCatalog:
    """The run directories under ``root``."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ExpungeError(f"--runs {self.root}: no such folder; give the folder that holds your run directories")
        self._views: dict[str, RunView] = {}
        self._base: dict[str, tuple] = {}  # name -> (run_id, training ids, n_base)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._seen: dict[str, float] = {}  # run -> when its manifest was last seen (monotonic seconds)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if NAME.match(p.name) and RunDirectory(p).exists())

    def path(self, name: str) -> Path:
        """The run directory of ``name``; UnknownRun (naming the runs there are) if there is none. A run seen in the
        last second is not looked for again (a busy API would stat its manifest on every call)."""
        if time.monotonic() - self._seen.get(name, -RECHECK_S) < RECHECK_S:
            return self.root / name
        if not NAME.match(name or "") or not RunDirectory(self.root / name).exists():
            known = self.names()
            raise UnknownRun(f"no run {name!r} here; runs: {', '.join(known) if known else 'none yet'}")
        self._seen[name] = time.monotonic()
        return self.root / name

    def manifest(self, name: str) -> dict:
        return RunDirectory(self.path(name)).read_manifest()

    def describe(self, name: str) -> dict:
        return describe(name, self.manifest(name))

    def cached(self, name: str) -> RunView | None:
        """The view last taken of ``name``, without touching the disk (None if none yet)."""
        return self._views.get(name)

    def warm(self) -> None:
        """Take every run's view now (a load each), so that the first requests do not wait for it."""
        for name in self.names():
            try:
                self.view(name)
            except Exception:  # a damaged run is reported when a request names it
                pass

    def view(self, name: str, fresh: bool = False, groups: bool = False) -> RunView:
        """The run's ids and which are active: as last seen (cheap; enough to know an id is a row, since a run never
        loses ids), ``fresh`` as it is now, or with ``groups`` as of its current version."""
        path = self.path(name)
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            cached = self._views.get(name)
            if cached is not None and not fresh and not groups:
                return cached
            manifest, added, active = RunModel.current_rows(path)
            base = self._base.get(name)
            if base is None or base[0] != manifest["run_id"] or (groups and cached.groups_version != manifest["version"]):
                return self._load(name, path)
            if cached.head == manifest["ledger"]["head"]:
                return cached
            ids = np.concatenate([base[1], added])
            order = np.argsort(ids, kind="stable")
            view = RunView(name, manifest["run_id"], manifest["version"], manifest["ledger"]["head"], ids[order],
                           active[order], cached.n_features, cached.n_classes, cached.groups, cached.groups_version)
            self._views[name] = view
            return view

    def _load(self, name: str, path: Path) -> RunView:
        model = RunModel.load(path)
        ids = model.universe.ids
        order = np.argsort(ids, kind="stable")
        view = RunView(name, model.run_id, model.version, model.manifest["ledger"]["head"], ids[order],
                       model.active[order], model.universe.n_features, model.n_classes,
                       {g: np.sort(v) for g, v in model.group_members().items()}, model.version)
        self._base[name] = (model.run_id, ids[: model.n_base].copy(), model.n_base)
        self._views[name] = view
        return view

    def check_method(self, name: str, method: str | None) -> None:
        """Refuse a policy method the run cannot be updated with, or that would end one of its guarantees."""
        if method is None:
            return
        manifest = self.manifest(name)
        own = manifest["method"]["name"]
        found = registry.get(method)  # unknown names: a clear error listing the methods
        if found.updates == registry.OWN_RUN and method != own:
            raise ExpungeError(f"{method} updates only runs trained with it; {name} was trained with {own}")
        if registry.get(own).updates == registry.OWN_RUN and method not in (own, "retrain"):
            raise ExpungeError(f"{name} was trained with {own}: it is updated by {own} (or retrain), not {method}")
        lost = guarantees_of(manifest) - set(found.keeps) if method != own else set()
        if own == "dp" and method == "retrain":
            lost = set()  # retraining a private run is private retraining
        if lost:
            raise ExpungeError(f"{method} would end {name}'s {', '.join(sorted(lost))} guarantee; the service never "
                               f"ends a guarantee: use {own} (the run's own method), or update it by hand with "
                               "`expunge forget` and the flag that says so")


def run_summary(catalog: RunCatalog, queue, name: str, depth: dict) -> dict:
    """``describe`` plus the run's policy and queue (``depth``: ``Queue.depth()``)."""
    summary = catalog.describe(name)
    summary["policy"] = vars(queue.policy(name))
    d = depth.get(name) or {}
    now = time.time()
    summary["queue"] = {"queued": d.get("queued", 0), "applying": d.get("applying", 0),
                        "oldest_age_s": None if d.get("oldest_at") is None else now - d["oldest_at"],
                        "oldest_deadline_in_s": None if d.get("oldest_deadline_at") is None
                        else d["oldest_deadline_at"] - now}
    return summary
