"""Update methods: each turns a model trained on some rows into the model trained on others.

Names live in registry.py (filled by catalog.py); run.py holds what every run shares, fitted.py the
gradient-trained runs, lm_run.py the language-model runs, and each method has a module of its own."""

from . import catalog  # noqa: F401  (fills the registry before anything looks a name up)
from .base import UpdateReport, Updater
from .deltagrad import DeltaGrad, DeltaGradConfig, deltagrad
from .fitted import Fitted
from .lm_run import LMPrivateTraining, LMRetrain, LMRun, PrivateLMRun
from .registry import make_updater
from .retrain import Retrain
from .run import RunModel

__all__ = ["DeltaGrad", "DeltaGradConfig", "Fitted", "LMPrivateTraining", "LMRetrain", "LMRun", "PrivateLMRun",
           "RunModel", "Retrain", "UpdateReport", "Updater", "deltagrad", "make_updater"]
