"""Learning-rate control on top of any torch optimizer: GeN (generalized Newton step sizes from forward passes)."""
from .gen import (BatchProbe, ClosureProbe, Estimate, Fit, GeN, Measurement, cosine_horizon, estimates_in,
                  fit_rate, linear_horizon)

__all__ = ["BatchProbe", "ClosureProbe", "Estimate", "Fit", "GeN", "Measurement", "cosine_horizon", "estimates_in",
           "fit_rate", "linear_horizon"]
