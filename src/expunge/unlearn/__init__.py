"""Update methods: each turns a model trained on some rows into the model trained on others."""

from .base import UpdateReport, Updater
from .deltagrad import DeltaGrad, DeltaGradConfig, deltagrad
from .fitted import Fitted, make_updater
from .run import RunModel
from .retrain import Retrain

__all__ = ["DeltaGrad", "DeltaGradConfig", "Fitted", "RunModel", "Retrain", "UpdateReport", "Updater", "deltagrad", "make_updater"]
