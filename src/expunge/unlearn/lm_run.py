"""Language-model runs: a causal LM trained on a corpus, in an ordinary run directory (manifest, versions,
hash-chained ledger), updated by exact retraining (``lm-retrain``, what ``retrain`` means on an LM run) or,
for a run trained privately, by exact private retraining (``lm-dp``, what ``dp`` means).

    RUN/manifest.json            recipe (the resolved LMRecipe), data (the corpus's source files, fingerprint),
                                 lm (where the model came from, tiny config, LoRA base hash, CPU threads,
                                 library versions, the tokenized corpus's fingerprint, a public phase)
    RUN/base.json                the corpus, only when it has no source files
    RUN/versions/000002/
        model/                   the current model in the Hugging Face layout (LoRA adapters merged) and its
                                 tokenizer: AutoModelForCausalLM.from_pretrained(RUN/versions/000002/model)
        initial.safetensors      the weights every (re)training starts from; with LoRA only the adapters (the
                                 base is its source, checked by hash); hard-linked from version to version
        adapters.safetensors     the current LoRA adapters (LoRA runs)
        rows.npz                 the corpus ids and which rows are active

Exact retraining. A deletion retrains from ``initial.safetensors`` with the run's recipe, seed, batch plan
(minus the removed rows: holes, nothing shifts), tokenizer and CPU thread count: bit for bit what training
from scratch on the remaining rows gives (expunge.lm.train). The tiny architectures' tokenizer is trained
once, on the original texts, and is part of the fixed architecture: retraining changes the weights, not
the merges.

Private runs. ``lm-dp`` trains through the privacy engine (Poisson-sampled logical batches of
``batch_size * grad_accum`` rows over the active rows, per-sample clipping, Gaussian noise calibrated to the
target epsilon); a deletion retrains privately on the remaining rows with the same settings and seed, and the
manifest records the epsilon spent, as for tabular private runs. A public phase (``public=``) trains
non-privately on public texts first; retraining starts after it (its weights are the initial state) and
the privacy accounting lists it as a public phase, which adds nothing to epsilon.

Data parallel. ``LMPrivateTraining(nproc=N)`` (``expunge train --task lm --dp --nproc N``) runs the private
training in N processes of this machine (expunge.privacy.distributed.spawn: gloo on the CPU, the model in
DistributedDataParallel) and writes the same run directory: the logical batches, the noise and epsilon are one
process's, the ledger's counts are summed over the ranks, the weights equal one process's to the rounding of the
sums over the ranks. N is part of the method's config, so a deletion retrains with the same N (and the recorded
thread count), bit for bit what N processes train from scratch on the remaining rows. The public phase trains in
this process.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ExpungeError
from ..lm import (Corpus, LMRecipe, dp_hook, encode, folder_hash, frozen_hash, load_state, load_tokenizer, prepare,
                  save_pretrained, save_state, train_bpe_tokenizer, train_lm)
from ..lm.determinism import num_threads
from ..lm.metrics import answer_probability
from ..lm.scoring import row_nlls
from ..lm.models import TINY_ARCHITECTURES, parameter_count
from ..privacy.accounting import Phase, check_delta
from ..privacy.distributed import spawn
from ..privacy.engine import check_private_settings
from .base import UpdateReport
from .registry import LM, OWN_RUN, find, kind_of, make_updater, resolve, run_class
from .run import ROWS, Request, RunModel

MODEL, INITIAL, ADAPTERS, BASE_JSON = "model", "initial.safetensors", "adapters.safetensors", "base.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "peft")
# config.json entries that say how or by what a model was saved, not what it is
UNSAVED_CONFIG = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
SCORE_BATCH = 16  # rows per forward pass when merges are scored


def paths(source) -> list[str] | None:
    """A source (one path or several) as the list of strings a manifest records."""
    if source is None:
        return None
    return [str(s) for s in ([source] if isinstance(source, (str, Path)) else source)]


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars while a run loads or saves its small model files (they would interleave with
    the run's own output)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def tokenizer_hash(folder: Path) -> str:
    """Content hash of a saved tokenizer: its tokenizer.json (vocabulary, merges, special tokens), else its vocabulary."""
    file = Path(folder) / "tokenizer.json"
    if file.is_file():
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    vocab = load_tokenizer(folder).get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


class LMRetrain:
    """Exact retraining of a language model: the run's recipe, batch plan and initial weights on the active rows."""

    name = "lm-retrain"
    private = False

    def config(self) -> dict:
        return {}

    def check(self, recipe: LMRecipe, n_rows: int) -> None:
        """Everything about the settings that can be refused before a run directory is made."""

    def train(self, model, data, recipe: LMRecipe, active: np.ndarray, progress: bool = False):
        """Train ``model`` in place on the active rows; return the TrainResult and the privacy summary (None)."""
        return train_lm(model, data, recipe, active, progress=progress), None

    def fit(self, corpus: Corpus, recipe: LMRecipe, out=None, source=None, **options) -> LMRun:
        return LMRun.train(corpus, recipe, self, out=out, source=source, **options)


class LMPrivateTraining(LMRetrain):
    """Private training of a language model through the privacy engine (``expunge.lm.dp_hook``); retraining a
    private run is this training on the remaining rows with the same settings and seed.

    ``nproc`` > 1 trains data parallel in that many processes of this machine (gloo on the CPU, the model in
    DistributedDataParallel: ``expunge.privacy.distributed``): the logical batches, the noise and epsilon are one
    process's with the same seed, and the weights equal one process's to the rounding of the sums over the ranks.
    Retraining uses the run's own ``nproc`` (its config), so a deletion reproduces the training bit for bit. A
    script that trains or retrains such a run keeps its top-level code under ``if __name__ == "__main__":`` (the
    processes start by importing the main module)."""

    name = "lm-dp"
    private = True

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, noise_multiplier: float | None = None,
                 max_grad_norm: float = 1.0, clipping: str = "all-layer", clip_fn: str = "abadi",
                 physical_batch_size: int | None = None, accountant: str = "pld", public_steps: int = 0,
                 nproc: int = 1):
        check_private_settings(epsilon, noise_multiplier, delta, clip_fn, clipping)
        if physical_batch_size is not None and physical_batch_size < 1:
            raise ExpungeError(f"--physical-batch-size must be at least 1, got {physical_batch_size}")
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise ExpungeError(f"--nproc must be a positive number of processes, got {nproc!r}")
        self.epsilon, self.delta, self.noise_multiplier = epsilon, delta, noise_multiplier
        self.max_grad_norm, self.clipping, self.clip_fn = max_grad_norm, clipping, clip_fn
        self.physical_batch_size, self.accountant, self.public_steps = physical_batch_size, accountant, public_steps
        self.nproc = nproc

    def config(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "clipping": self.clipping, "clip_fn": self.clip_fn,
                "physical_batch_size": self.physical_batch_size, "accountant": self.accountant,
                "public_steps": self.public_steps, "nproc": self.nproc}

    def check(self, recipe: LMRecipe, n_rows: int) -> None:
        if recipe.lr_auto:
            raise ExpungeError("--lr auto (GeN) is not available with --dp: its loss probes would read private rows "
                               "without being accounted in epsilon; give a fixed --lr")
        if recipe.max_grad_norm is not None:
            raise ExpungeError("the recipe's max_grad_norm clips a whole step's gradient; private training clips "
                               "each row's gradient with the engine's max_grad_norm instead: leave the recipe's unset")
        if recipe.step_rows > n_rows:
            raise ExpungeError(f"the expected batch (--batch-size {recipe.batch_size} x --grad-accum "
                               f"{recipe.grad_accum} = {recipe.step_rows} rows) is larger than the data ({n_rows} rows)")
        check_delta(self.delta, n_rows)
        if self.nproc > 1:
            if recipe.device is not None and recipe.device != "cpu":
                raise ExpungeError(f"--nproc trains in processes on the CPU (gloo), not on {recipe.device}: add "
                                   "--device cpu, or drop --nproc")
            if self.nproc > recipe.step_rows:
                raise ExpungeError(f"--nproc {self.nproc} is more processes than the expected batch has rows "
                                   f"({recipe.step_rows} = --batch-size x --grad-accum): most ranks would draw nothing; "
                                   f"use at most {recipe.step_rows}")

    def train(self, model, data, recipe: LMRecipe, active: np.ndarray, progress: bool = False):
        if self.nproc == 1:
            return self._train(model, data, recipe, active, progress)
        # every rank trains a copy at this process's thread count (CPU sums depend on it); rank 0 sends back
        # the trained weights, the (whole training's) result and the privacy summary
        state, result, privacy = spawn(_train_rank, self.nproc, self, model, data, recipe, active,
                                       torch.get_num_threads(), progress)
        with torch.no_grad():
            model.load_state_dict(state)
        return result, privacy

    def _train(self, model, data, recipe: LMRecipe, active: np.ndarray, progress: bool, distributed: bool = False):
        public = [Phase(0.0, 0.0, self.public_steps, private=False, name="public")] if self.public_steps else None
        hook = dp_hook(target_epsilon=self.epsilon, target_delta=self.delta, noise_multiplier=self.noise_multiplier,
                       max_grad_norm=self.max_grad_norm, physical_batch_size=self.physical_batch_size,
                       clipping=self.clipping, clip_fn=self.clip_fn, accountant=self.accountant, prior_phases=public,
                       distributed=distributed)
        result = train_lm(model, data, recipe, active, private=hook, progress=progress)
        try:
            privacy = result.engine.summary(self.delta)
        finally:
            result.engine.detach()  # the model leaves with no hooks attached
        privacy["target_epsilon"] = self.epsilon
        return result, privacy


def _train_rank(rank: int, updater: LMPrivateTraining, model, data, recipe: LMRecipe, active: np.ndarray,
                threads: int, progress: bool):
    """One process of ``--nproc`` private LM training (privacy.distributed.spawn)."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    model = copy.deepcopy(model)  # spawn hands every rank the same shared-memory tensors: each needs its own
    # buffers (rotary tables) are constants: no broadcast at each forward, which a rank with an empty draw skips
    # (forward_sync_buffers is the newer torch's name for it)
    import inspect

    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    parallel = DistributedDataParallel(model, **{no_sync: False})
    result, privacy = updater._train(parallel, data, recipe, active, progress and rank == 0, distributed=True)
    result.engine = None  # hooks detached; the privacy summary carries what it knew
    return (model.state_dict(), result, privacy) if rank == 0 else None


class LMRun(RunModel):
    """A causal language model bound to its run directory (see the module docstring)."""

    kind = LM
    base_file = BASE_JSON

    def __init__(self, run, manifest: dict, universe: Corpus, active: np.ndarray, test=None):
        super().__init__(run, manifest, universe, active, None)
        self.recipe = LMRecipe.from_dict(manifest["recipe"])
        self.lm = manifest["lm"]
        self.updater = make_updater(manifest["method"]["name"], **manifest["method"]["config"])
        self._model_hash: str | None = None  # of the current version's saved model
        self._model = None  # the current model, loaded when first asked for
        self._groups: list[str] | None = None  # the groups the request in progress named
        self._scoring = None  # the copy of the model that merges are scored on (state_score)

    # ------------------------------------------------------------------ views

    @property
    def model_path(self) -> Path:
        """The current model and its tokenizer in the Hugging Face layout (``from_pretrained`` loads them)."""
        return self.run.current(self.manifest) / MODEL

    @property
    def model(self) -> torch.nn.Module:
        """The current model (LoRA adapters merged) as a transformers causal LM, on the recipe's device and dtype."""
        if self._model is None:
            from transformers import AutoModelForCausalLM

            with quiet_transformers():
                self._model = AutoModelForCausalLM.from_pretrained(
                    self.model_path, dtype=getattr(torch, self.recipe.dtype), local_files_only=True
                ).to(self.recipe.device)
        return self._model

    @property
    def tokenizer(self):
        return load_tokenizer(self.model_path)

    def current_model_hash(self) -> str:
        return self._model_hash

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        return folder_hash(folder / MODEL)

    def groups(self) -> dict[str, dict]:
        """Every group of the corpus (in order) with its rows: ``{"rows": active, "deleted": removed}``."""
        counts = {}
        for group, active in zip(self.universe.groups, self.active):
            entry = counts.setdefault(group, {"rows": 0, "deleted": 0})
            entry["rows" if active else "deleted"] += 1
        return counts

    def group_members(self) -> dict[str, np.ndarray]:
        """Every group of the corpus with the ids of its rows, deleted ones included (what a service request names)."""
        return {g: self.universe.ids_in_groups([g]) for g in dict.fromkeys(self.universe.groups)}

    def group_ids(self, groups) -> np.ndarray:
        """The ids of the current rows of the named groups (a TOFU author ``author-7``, a MUSE split ``forget``);
        an unknown group, or one with no rows left, is refused."""
        groups = [groups] if isinstance(groups, str) else list(groups)
        if not groups:
            raise ExpungeError("no groups given: name at least one")
        if len(set(groups)) != len(groups):
            raise ExpungeError(f"groups appear more than once in the request: {groups}; list each once")
        ids = self.universe.ids_in_groups(groups)  # refuses unknown groups, naming the known ones
        current = ids[self.active[self.universe.rows_of(ids)]]
        counts = self.groups()
        gone = [g for g in groups if counts[g]["rows"] == 0]
        if gone:
            raise ExpungeError(f"group(s) {gone} have no rows left: every row was already deleted")
        return current

    def describe(self) -> dict:
        """What `expunge info` shows of a language-model run beyond what every run has."""
        return {"model_path": str(self.model_path), "tokenizer_path": str(self.model_path),
                "model": {k: self.lm.get(k) for k in ("kind", "source", "tiny_config", "tokenizer", "parameters",
                                                      "trainable_parameters")},
                "lora": ({"rank": self.recipe.lora_rank, "alpha": self.recipe.lora_alpha or 2 * self.recipe.lora_rank,
                          "base_hash": self.lm.get("base_hash")} if self.recipe.lora else None),
                "threads": self.lm["threads"], "libraries": self.lm["libraries"], "public": self.lm.get("public"),
                "groups": self.groups()}

    # ------------------------------------------------------------------ merging (see RunModel)

    # TOFU's answer probability: per row exp(-mean NLL of its target tokens) (a QA pair's answer, a document's every
    # token), averaged over the rows; in (0, 1], higher is better
    score = "answer probability"

    def architecture(self) -> dict:
        """The saved model's config (what it is, not how it was saved), the recipe's dtype and the tokenizer's hash:
        runs with another tokenizer read the same ids as other text, so their weights do not merge."""
        config = json.loads((self.model_path / "config.json").read_text())
        return {"kind": "lm", "dtype": self.recipe.dtype, "tokenizer": tokenizer_hash(self.model_path),
                **{f"config.{k}": v for k, v in sorted(config.items()) if k not in UNSAVED_CONFIG}}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The current model's state dict (a LoRA run's model has its adapters merged: a full model)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def evaluation_set(self, spec, name: str) -> tuple[Corpus, dict]:
        """TOFU QA pairs (JSON, JSON lines) or documents (JSON, .txt, a folder), as `expunge train --task lm --data`
        reads them; or a Corpus, scored as it is. Tokenized here too, so that rows the model cannot take (a QA
        pair longer than the run's max_length) are refused before any merge is scored."""
        from ..lm import load_corpus

        if isinstance(spec, Corpus):
            corpus, info = spec, {"data": spec.name, "split": "given"}
        else:
            if not isinstance(spec, (str, Path)) or not str(spec).strip():
                raise ExpungeError(f"evaluation set {name!r}: give TOFU QA pairs (.json, .jsonl) or documents (.json, "
                                   ".txt, a folder of them), as `expunge train --task lm --data` takes them")
            path = Path(spec)
            if not path.exists():
                raise ExpungeError(f"evaluation set {name!r}: {spec} does not exist; give TOFU QA pairs (.json, "
                                   ".jsonl) or documents (.json, .txt, a folder of them)")
            corpus = load_corpus(str(path.resolve()), name=name)
            info = {"data": str(path.resolve()), "split": "all rows"}
        if len(corpus) == 0:
            raise ExpungeError(f"evaluation set {name!r} has no rows")
        self._encoded(corpus, name)
        return corpus, {**info, "rows": len(corpus), "fingerprint": corpus.fingerprint()}

    def state_score(self, data: Corpus):
        """state -> answer probability on ``data`` (see ``score``). Every scorer of this run loads the state into
        one private copy of the model (the run's own model is never changed)."""
        tokens = self._encoded(data, data.name)
        if self._scoring is None:
            self._scoring = copy.deepcopy(self.model).eval()
        work = self._scoring

        def score(state) -> float:
            work.load_state_dict(dict(state), strict=True)
            return answer_probability(row_nlls(work, tokens, SCORE_BATCH))

        return score

    def write_merged(self, state: dict[str, torch.Tensor], out, record: dict, files: dict[str, bytes],
                     signing_key=None) -> RunModel:
        return run_class("lm-merge").create(self, state, out, record, files, signing_key)

    def _encoded(self, corpus: Corpus, name: str):
        try:
            return encode(corpus, self.tokenizer, self.recipe.max_length, self.lm["truncate_documents"])
        except ExpungeError as e:
            raise ExpungeError(f"evaluation set {name!r}: {e}") from None

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, corpus: Corpus, recipe: LMRecipe, updater="lm-retrain", out=None, source=None, *,
              public: Corpus | None = None, public_source=None, public_epochs: int | None = None,
              tiny_config: dict | None = None, truncate_documents: bool = True, progress: bool = False,
              signing_key=None, init: RunModel | None = None) -> LMRun:
        """Train a causal LM on ``corpus`` and write a new run directory at ``out`` (a temporary one if omitted).

        ``updater``: ``lm-retrain`` (``retrain``), ``lm-dp`` (``dp``, give an ``LMPrivateTraining`` with its settings)
        or an updater object. ``source``: the corpus's files (a path or a list), read back by fingerprint when the
        run is reopened; without it the corpus is stored in the run. ``public``: a corpus trained on first,
        non-privately, for ``public_epochs`` (default the recipe's), never forgotten (``public_source`` records
        where it came from). ``tiny_config`` overrides the tiny architecture's config (recorded). ``init``: a
        language-model run this one is fine-tuned from; the recipe's model must be its current model folder
        (``init.model_path``), and the manifest records the run and version ("init", what `expunge merge` checks
        its models' base by). Every check runs before anything is written."""
        updater = make_updater(resolve(updater, LM) if isinstance(updater, str) else updater)
        found = find(updater.name)
        if found is None or kind_of(found) != LM:
            raise ExpungeError(f"{updater.name} does not train language models; use retrain (lm-retrain) or dp (lm-dp)")
        if len(corpus) == 0:
            raise ExpungeError("the corpus is empty")
        recipe = recipe.resolved()
        if init is not None:
            if init.kind != LM:
                raise ExpungeError(f"--init {init.path} is a tabular run; a language model is fine-tuned from a "
                                   "language-model run")
            if Path(recipe.model).resolve() != init.model_path.resolve():
                raise ExpungeError(f"fine-tuning from {init.path} starts from its current model: the recipe's model "
                                   f"must be {init.model_path} (the command line sets it: leave --model out), not "
                                   f"{recipe.model}")
        updater.check(recipe, len(corpus))
        if public_epochs is not None and (public is None or public_epochs < 1):
            raise ExpungeError("public_epochs needs public data and must be at least 1")
        tiny = recipe.model in TINY_ARCHITECTURES
        tokenizer, tokenizer_note = None, "the model's own"
        if tiny:  # trained on the texts the release may depend on: for a private run, the public ones when given
            if updater.private and public is not None:
                texts, tokenizer_note = public.texts(), "byte-level BPE trained on the public texts"
            else:
                texts = corpus.texts() + (public.texts() if public is not None else [])
                tokenizer_note = "byte-level BPE trained on the run's texts"
            tokenizer = train_bpe_tokenizer(texts, recipe.vocab_size)
        setup = prepare(recipe, corpus, tokenizer=tokenizer, tiny_config=tiny_config,
                        truncate_documents=truncate_documents)
        public_data = encode(public, setup.tokenizer, recipe.max_length, truncate_documents) if public else None
        notes = []
        if tiny and updater.private and public is None:
            notes.append("the tokenizer (a byte-level BPE) was trained on the private texts: its vocabulary is not "
                         "covered by the privacy guarantee; give public texts (--public-data) to train it on them")

        run, created, signer = cls._new_directory(out, signing_key)
        sources = paths(source)
        manifest = cls._first_manifest({"name": corpus.name, "source": sources, "fingerprint": corpus.fingerprint(),
                                        "n_base": len(corpus), "groups": len(corpus.group_names())},
                                       {"name": updater.name, "config": updater.config()})
        manifest["recipe"] = recipe.to_dict()
        if init is not None:
            manifest["init"] = init.init_record()
        manifest["lm"] = {
            "kind": setup.kind, "source": setup.source, "tiny_config": tiny_config,
            "truncate_documents": truncate_documents, "tokenizer": tokenizer_note,
            "tokens_fingerprint": setup.data.fingerprint(), "threads": torch.get_num_threads(),
            "libraries": library_versions(), "parameters": parameter_count(setup.model),
            "trainable_parameters": parameter_count(setup.model, trainable_only=True),
        }
        with cls._creating(run, manifest, created, corpus, None, sources):
            if public is not None:  # the public phase: its result is the initial state every (re)training starts from
                start = time.perf_counter()
                public_recipe = replace(recipe, epochs=public_epochs or recipe.epochs)
                with num_threads(manifest["lm"]["threads"]):
                    done = train_lm(setup.model, public_data, public_recipe, progress=progress)
                manifest["lm"]["public"] = {
                    "source": paths(public_source),
                    "fingerprint": public.fingerprint(), "rows": len(public), "epochs": public_recipe.epochs,
                    "steps": done.steps, "seconds": time.perf_counter() - start}
                if updater.private:
                    updater.public_steps = done.steps
                    manifest["method"]["config"] = updater.config()
            if recipe.lora:
                manifest["lm"]["base_hash"] = frozen_hash(setup.model)
            model = found.run(run, manifest, corpus, np.ones(len(corpus), bool))
            model.updater = updater
            model._signer, model._writing = signer, {"request": Request(), "ends": [], "notes": notes}
            try:
                with run.staging() as stage:
                    save_state(setup.model, stage / INITIAL, trainable_only=recipe.lora)
                    model._train_version(stage, setup, updater, model.active, "train", [], progress)
            finally:
                model._signer = model._writing = None
        return model

    def _initial_setup(self):
        """The model at the run's initial weights, its tokenizer and the tokenized corpus, ready to train."""
        tokenizer = load_tokenizer(self.model_path)
        recipe = self.recipe
        if not recipe.lora and self.lm["kind"] != "tiny":  # the architecture from the run's own copy: the model's
            recipe = replace(recipe, model=str(self.model_path))  # source is not needed, the initial state replaces it
        try:
            with quiet_transformers():
                setup = prepare(recipe, self.universe, tokenizer=tokenizer, tiny_config=self.lm.get("tiny_config"),
                                truncate_documents=self.lm["truncate_documents"])
        except ExpungeError as e:
            raise ExpungeError(f"the base model of {self.path} ({self.lm['source']}) cannot be rebuilt to retrain "
                               f"from: {e}") from e
        if setup.data.fingerprint() != self.lm["tokens_fingerprint"]:
            raise ExpungeError(f"the corpus tokenizes differently now than when {self.path} was trained (libraries "
                               f"then: {self.lm['libraries']}); retraining would not see the same rows. Use the "
                               "libraries the run was trained with")
        if recipe.lora and frozen_hash(setup.model) != self.lm["base_hash"]:
            raise ExpungeError(f"the base model at {self.lm['source']} is not the one {self.path}'s LoRA adapters were "
                               f"trained on (its weights hash to {frozen_hash(setup.model)}, the run recorded "
                               f"{self.lm['base_hash']}); restore that model to retrain")
        load_state(setup.model, self.run.current(self.manifest) / INITIAL)
        return setup

    def _train_version(self, stage: Path, setup, updater, active: np.ndarray, kind: str, ids: list,
                       progress: bool) -> UpdateReport:
        """Train ``setup.model`` (at the initial weights) on the active rows with ``updater``, write the model,
        adapters and initial state into ``stage`` and commit the version."""
        start = time.perf_counter()
        with num_threads(self.lm["threads"]):
            result, privacy = updater.train(setup.model, setup.data, self.recipe, active, progress)
        seconds = time.perf_counter() - start
        if privacy is not None:
            guarantee = ({"kind": "private", "privacy": privacy} if kind == "train" else
                         {"kind": "exact", "note": "private retraining on the remaining rows", "privacy": privacy})
        else:
            guarantee = {"kind": "exact", "steps": result.steps, "skipped_steps": result.skipped}
        metrics = {"rows": int(active.sum()), "steps": result.steps, "skipped_steps": result.skipped,
                   "row_passes": result.rows, "tokens": result.tokens, "target_tokens": result.target_tokens,
                   "tokens_per_s": result.tokens_per_second,
                   "final_loss": result.losses[-1] if result.losses else None}
        if self.recipe.lr_auto:  # GeN's rate at each optimizer step: a function of the active rows
            metrics["rates"] = list(result.rates)
        return self._write_version(stage, setup, updater, active, kind, ids, seconds, guarantee, metrics)

    def _write_version(self, stage: Path, setup, updater, active: np.ndarray, kind: str, ids: list, seconds: float,
                       guarantee: dict, metrics: dict) -> UpdateReport:
        """Write ``setup.model`` (the model, adapters and initial state) into ``stage`` and commit the version."""
        with quiet_transformers():
            save_pretrained(setup.model, setup.tokenizer, stage / MODEL)
        if self.recipe.lora:
            save_state(setup.model, stage / ADAPTERS, trainable_only=True)
        for name, content in getattr(updater, "evidence", {}).items():  # files the update is judged by (a front)
            (stage / Path(name).name).write_bytes(content)
        if not (stage / INITIAL).exists():  # never changes: linked from the current version, not copied
            current = self.run.current(self.manifest) / INITIAL
            try:
                os.link(current, stage / INITIAL)
            except OSError:
                shutil.copy2(current, stage / INITIAL)
        model_hash = folder_hash(stage / MODEL)
        if self._groups is not None:
            metrics["groups"] = list(self._groups)
        report = UpdateReport(updater.name, kind, list(ids), seconds, self.manifest.get("model_hash"), model_hash,
                              guarantee, metrics)
        now = library_versions()
        if kind != "train" and not getattr(updater, "unlearns", False) and now != self.lm["libraries"] \
                and self._writing is not None:
            self._writing["notes"].append(f"retrained with {now}, the run was trained with {self.lm['libraries']}: "
                                          "the result equals training from scratch under the libraries of now")

        def adopt(folder: Path) -> None:
            self._model_hash, self._model = model_hash, None

        self._commit(stage, report, self.universe, active, adopt)
        return report

    # ------------------------------------------------------------------ data

    @staticmethod
    def _write_base(f, data: Corpus, test) -> None:
        rows = [{"id": int(i), "group": g, "prompt": p, "target": t}
                for i, g, p, t in zip(data.ids.tolist(), data.groups, data.prompts, data.targets)]
        f.write(json.dumps({"name": data.name, "rows": rows}, ensure_ascii=False).encode())

    @classmethod
    def _read_data(cls, run, manifest, folder, data, test, preprocessed):
        info = manifest["data"]
        if data is None and info.get("source"):
            from ..lm import load_corpus

            missing = [s for s in info["source"] if not Path(s).exists()]
            if missing:
                raise ExpungeError(f"{run.path} was trained on {', '.join(missing)}, which no longer exist(s); pass "
                                   "the run's corpus where it is now (--data)")
            data = load_corpus(info["source"], name=info["name"])
        elif data is None:
            stored = json.loads(cls._stored_base(run, info).read_text())
            rows = stored["rows"]
            data = Corpus(tuple(r["prompt"] for r in rows), tuple(r["target"] for r in rows),
                          np.array([r["id"] for r in rows], dtype=np.int64), tuple(r["group"] for r in rows),
                          stored["name"])
        if not isinstance(data, Corpus):
            raise ExpungeError(f"{run.path} is a language-model run: pass its corpus (expunge.lm.load_corpus), not "
                               f"a {type(data).__name__}")
        cls._check_fingerprint(run, info, data)
        with np.load(folder / ROWS) as rows:
            ids, active = rows["ids"], rows["active"]
        if not np.array_equal(ids, data.ids) or active.shape != ids.shape:
            raise ExpungeError(f"versions/{folder.name}/{ROWS} does not list the corpus's ids; restore the version "
                               "from a backup of this run")
        return data, active, None

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> LMRun:
        model = cls(run, manifest, universe, active)
        model._model_hash = folder_hash(folder / MODEL)
        return model

    def _write_rows(self, stage: Path, universe: Corpus, active: np.ndarray) -> None:
        with open(stage / ROWS, "wb") as f:
            np.savez(f, ids=universe.ids, active=active)

    # ------------------------------------------------------------------ requests

    def forget(self, ids=None, method=None, compare: bool = False, progress: bool = False, *, groups=None,
               **request) -> UpdateReport:
        """Remove rows by ``ids`` or whole ``groups`` (one of them) and retrain; the keyword arguments are those
        of ``RunModel.forget`` (requested_by, reason, reference, drop_privacy, signing_key). A group request
        names the groups in the report's metrics and removes their current rows."""
        if (ids is None) == (groups is None):
            raise ExpungeError("give the rows to forget as ids or as groups (one of them)")
        if groups is not None:
            groups = [groups] if isinstance(groups, str) else list(groups)
            ids = self.group_ids(groups)
        self._groups = groups
        try:
            return super().forget(ids, method, compare, progress, **request)
        finally:
            self._groups = None

    def _updater_for(self, method):
        """The updater of a request: the run's own (with its settings) for its own method and for retraining a
        private run, else the registered method (an updater object is used as given)."""
        name = self._method_name(method)  # refuses methods for other kinds of run
        if name == self.updater.name:
            if not isinstance(method, (str, type(None))) and method.config() != self.updater.config():
                raise ExpungeError(f"{self.path} is updated by {name} with the settings it was trained with "
                                   f"({self.updater.config()}), not {method.config()}")
            return self.updater
        if getattr(find(name), "updates", None) == OWN_RUN:
            raise ExpungeError(f"{name} updates only runs trained with it (expunge train --task lm --dp)")
        updater = method if not isinstance(method, str) else make_updater(name)
        if not ((hasattr(updater, "train") or hasattr(updater, "unlearn")) and hasattr(updater, "check")):
            raise ExpungeError(f"{name} cannot update the language-model run {self.path}")
        return updater

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        updater = self._updater_for(method)
        updater.check(self.recipe, int(new_active.sum()))
        setup = self._initial_setup()
        if getattr(updater, "unlearns", False):
            return self._unlearn(setup, updater, new_active, kind, ids.tolist(), progress)
        with self.run.staging() as stage:
            return self._train_version(stage, setup, updater, new_active, kind, ids.tolist(), progress)

    def _unlearn(self, setup, updater, active: np.ndarray, kind: str, ids: list, progress: bool) -> UpdateReport:
        """Update the current model by an unlearning method (lm_unlearn.py): the rows leaving are forgotten, the
        remaining ones kept. ``setup`` is at the initial weights; the current ones are loaded into it first."""
        current = self.run.current(self.manifest)
        if self.recipe.lora:
            load_state(setup.model, current / ADAPTERS)
        else:
            setup.model.load_state_dict(self.model.state_dict())
        forget = setup.data.take(np.flatnonzero(self.active & ~active))
        retain = setup.data.take(np.flatnonzero(active))
        start = time.perf_counter()
        with num_threads(self.lm["threads"]):
            guarantee, metrics = updater.unlearn(setup.model, forget, retain, progress)
        seconds = time.perf_counter() - start
        with self.run.staging() as stage:
            return self._write_version(stage, setup, updater, active, kind, ids, seconds, guarantee,
                                       dict(metrics, rows=int(active.sum())))


class PrivateLMRun(LMRun):
    """A language model trained privately; ``manifest["privacy"]`` holds what the current model spent."""

    own_retraining = True  # "retrain" on a private run is private retraining

    @property
    def privacy(self) -> dict:
        return self.manifest.get("privacy", {})
