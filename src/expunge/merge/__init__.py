"""Model merging and its Pareto fronts: task vectors, TIES/DARE, MAP (plain, Bayesian, nested), the
evaluated baselines, front quality, and the forgetting trade-off between a model and its deletion; runs.py merges
runs (`expunge merge`, `expunge tradeoff`)."""

from .baselines import grid_front, shared_coefficient_front
from .evaluation import Evaluations, merge_objective, module_evaluator
from .front import hypervolume, igd, igd_plus, non_dominated, pick, thin
from .map import bayesian_map_front, map_front, nested_map_front
from .objectives import Metric
from .pipeline import METHODS, find_front, materialise, process, reprocess
from .result import FrontResult
from .runs import MergeOutcome, merge_runs, tradeoff_run
from .surrogate import Quadratic, fit_quadratic, quadratic_features, r_squared
from .ties_dare import dare, ties
from .tradeoff import measured_tradeoff, tradeoff_front
from .vectors import TaskVectors, interpolation, load_state, state_hash, state_of

__all__ = ["TaskVectors", "interpolation", "load_state", "state_hash", "state_of", "ties", "dare", "Metric",
           "Quadratic", "fit_quadratic", "quadratic_features", "r_squared", "Evaluations", "merge_objective",
           "module_evaluator", "map_front", "bayesian_map_front", "nested_map_front", "grid_front",
           "shared_coefficient_front", "non_dominated", "igd", "igd_plus", "hypervolume", "thin", "pick", "FrontResult",
           "tradeoff_front", "measured_tradeoff", "find_front", "materialise", "process", "reprocess", "METHODS",
           "merge_runs", "tradeoff_run", "MergeOutcome"]
