"""One home for update-method names.

Every update method is reached by name: ``--method deltagrad`` on the command line, the method a run's
manifest records, the benchmark harness. The registry maps each name to the updater class that computes
its updates, the run class that opens runs trained with it, and the kind of run it can update. It is
filled once, in catalog.py; run.py and fitted.py look names up here, so no method module imports another
and a new method is one new module plus one ``register`` line in catalog.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ExpungeError

# what kind of run a method can update
GRADIENT_RUN = "gradient"  # any run trained by gradient descent on the zoo models (Fitted and its subclasses)
OWN_RUN = "own"            # only a run trained with this very method (it keeps state of its own)

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

    def __post_init__(self):
        if self.updates not in (GRADIENT_RUN, OWN_RUN):
            raise ValueError(f"method {self.name}: updates must be {GRADIENT_RUN!r} or {OWN_RUN!r}")
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


def names(updates: str | None = None) -> list[str]:
    """Registered method names, in registration order (optionally only those updating ``updates`` runs)."""
    return [m.name for m in _METHODS.values() if updates is None or m.updates == updates]


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


def help_text() -> str:
    """'name (summary), ...' for every method, for --help."""
    return "; ".join(f"{m.name} ({m.summary})" for m in _METHODS.values())
