"""Private training: make_private (DP-SGD/DP-Adam with per-sample clipping), gradient transformations
(DiSK, DOPPLER, DiceSGD, public/private coupling), DP-Adam bias correction, private loss probes for GeN, accounting on
dp-accounting."""
from .accounting import Phase, calibrate_noise, epsilon
from .engine import DPOptimizer, PrivacyEngine, make_private
from .losses import causal_lm_loss
from .optimizers import DPAdamBC
from .persample import replace_batchnorm
from .probes import PrivateLossProbe, probe_phase, split_budget
from .transforms import DOPPLER, DiceSGD, DiSK, PublicCoupling, Transform

__all__ = ["DOPPLER", "DPAdamBC", "DPOptimizer", "DiSK", "DiceSGD", "Phase", "PrivacyEngine", "PrivateLossProbe",
           "PublicCoupling", "Transform", "calibrate_noise", "causal_lm_loss", "epsilon", "make_private",
           "probe_phase", "replace_batchnorm", "split_budget"]
