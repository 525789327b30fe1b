"""One home for update-method names.

Every update method is reached by name: ``--method deltagrad`` on the command line, the method a run's
manifest records, the benchmark harness. The registry maps each name to the updater class that computes
its updates, the run class that opens runs trained with it, and the kind of run it can update. It is
filled once, in catalog.py; run.py and fitted.py look names up here, so no method module imports another
and a new method is one new module plus one ``register`` line in catalog.py.

Runs come in kinds: ``tabular`` (features and labels) and ``lm`` (language models on a corpus). Names are
unique across kinds; a method of one kind may answer to another kind's name on its own runs (``alias``):
``lm-retrain`` is what ``retrain`` means on a language-model run, ``lm-dp`` what ``dp`` means. A request
names a method as the user says it; ``resolve(name, kind)`` gives the registered name for the run's kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ExpungeError

# what kind of run a method can update
GRADIENT_RUN = "gradient"  # any run trained by gradient descent on the zoo models (Fitted and its subclasses)
OWN_RUN = "own"            # only a run trained with this very method (it keeps state of its own)
LM_RUN = "lm-run"          # any language-model run (LMRun and its subclasses)

# kinds of run (a run class's ``kind``)
TABULAR = "tabular"  # features and labels (IndexedDataset)
LM = "lm"            # a causal language model on a corpus of texts (expunge.lm.Corpus)
KIND_NAMES = {TABULAR: "tabular", LM: "language-model"}  # as messages say them: "a language-model run"

# guarantees a run can promise for its whole life, and that an update keeps or ends
PRIVATE = "private"      # the model is (epsilon, delta)-differentially private
CERTIFIED = "certified"  # removals are (epsilon, delta)-certified
EXACT = "exact"          # the model equals training from scratch on the current rows
GUARANTEES = (PRIVATE, CERTIFIED, EXACT)


@dataclass(frozen=True)
class Method:
    name: str
    updater: type  # ``updater(**config)`` computes updates (and ``fit`` trains a run for it)
    run: type      # the RunModel subclass that opens a run whose manifest names this method
    updates: str   # GRADIENT_RUN or OWN_RUN
    summary: str   # one line for --help
    reference: bool = False  # its result is the exact reference itself (no extra retraining to compare)
    holds: tuple[str, ...] = ()  # what a run trained with this method promises (kept until an update ends it)
    keeps: tuple[str, ...] = ()  # which of those promises an update by this method keeps
    alias: str | None = None  # the name it answers to on runs of its kind (another kind's method name)
    serves: tuple[str, ...] = ("forget", "add")  # the requests it computes (a run's `kind` of update)

    def __post_init__(self):
        if self.updates not in (GRADIENT_RUN, OWN_RUN, LM_RUN):
            raise ValueError(f"method {self.name}: updates must be {GRADIENT_RUN!r}, {OWN_RUN!r} or {LM_RUN!r}")
        unknown = (set(self.holds) | set(self.keeps)) - set(GUARANTEES)
        if unknown:
            raise ValueError(f"method {self.name}: unknown guarantees {sorted(unknown)}")
        if not set(self.holds) <= set(self.keeps):
            raise ValueError(f"method {self.name}: an update by a run's own method keeps what the run holds")


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def kind_of(method: Method) -> str:
    """The kind of run a method updates: language-model runs for LM methods, else its run class's kind."""
    return LM if method.updates == LM_RUN else getattr(method.run, "kind", TABULAR)


def resolve(name: str, kind: str) -> str:
    """The registered name ``name`` means on a run of ``kind``: itself when it is registered for that kind (or
    not at all), else the method of that kind that answers to it (``retrain`` on an LM run: ``lm-retrain``)."""
    found = _METHODS.get(name)
    if found is None or kind_of(found) == kind:
        return name
    for method in _METHODS.values():
        if method.alias == name and kind_of(method) == kind:
            return method.name
    return name


def runs_of_kind(kind: str) -> list[str]:
    """The names (as said on such runs: aliases first) of the methods that update runs of ``kind``."""
    return [f"{m.alias} ({m.name})" if m.alias else m.name for m in _METHODS.values() if kind_of(m) == kind]


def names(updates: str | None = None, serves: str | None = None) -> list[str]:
    """Registered method names, in registration order (optionally only those updating ``updates`` runs, only
    those serving ``serves`` requests)."""
    return [m.name for m in _METHODS.values()
            if (updates is None or m.updates == updates) and (serves is None or serves in m.serves)]


def get(name: str) -> Method:
    if name not in _METHODS:
        raise ExpungeError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def find(name: str) -> Method | None:
    """The method registered under ``name``, or None (for updaters built outside the registry)."""
    return _METHODS.get(name)


def make_updater(method, **config):
    """An updater from its name and settings, or the updater object given."""
    if not isinstance(method, str):
        return method
    return get(method).updater(**config)


def run_class(name: str) -> type:
    """The run class that opens a run trained with method ``name``."""
    return get(name).run


def help_text(serves: str | None = None) -> str:
    """'name (summary), ...' for every method (serving ``serves`` requests), for --help."""
    return "; ".join(f"{m.name} ({m.summary})" for m in _METHODS.values() if serves is None or serves in m.serves)
