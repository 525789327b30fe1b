"""expunge: keep trained models right when their training data changes.

    from expunge import DeltaGrad, TrainRecipe, load_dataset
    train, test = load_dataset("digits")
    fitted = DeltaGrad(T0=5, j0=20, m=2).fit(train, TrainRecipe(batch_size=256), out="runs/digits", test=test,
                                             source="digits")
    report = fitted.forget([3, 17, 42], compare=True)   # UpdateReport, JSON-serialisable
    fitted.model                                        # a plain torch.nn.Module
"""

from .data import IndexedDataset, load_dataset
from .errors import ExpungeError
from .recipe import BatchPlan, TrainRecipe
from .tables import ReadOptions
from .unlearn import DeltaGrad, Fitted, Retrain, UpdateReport

__version__ = "0.1.0"
__all__ = ["BatchPlan", "DeltaGrad", "ExpungeError", "Fitted", "IndexedDataset", "ReadOptions", "Retrain",
           "TrainRecipe", "UpdateReport", "load_dataset"]
