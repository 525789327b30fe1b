"""Every update method, registered once: name -> updater, the run class that opens its runs, and what
kind of run it updates. Adding a method: write its module, then add one ``register`` line here."""

from .baselines import FineTune, GradientAscent
from .certified import CertifiedFitted, CertifiedRemoval
from .deltagrad import DeltaGrad
from .fisher import Fisher
from .fitted import Fitted
from .private import PrivateFitted, PrivateTraining
from .registry import CERTIFIED, EXACT, GRADIENT_RUN, OWN_RUN, PRIVATE, Method, register
from .retrain import Retrain
from .sisa import SISA, SISAFitted

register(Method("deltagrad", DeltaGrad, Fitted, GRADIENT_RUN, "fast, approximate, from the cached trajectory"))
register(Method("retrain", Retrain, Fitted, GRADIENT_RUN, "exact", reference=True, keeps=(EXACT,)))
register(Method("certified", CertifiedRemoval, CertifiedFitted, OWN_RUN,
                "Newton step with an (epsilon, delta) certificate; runs trained with --method certified",
                holds=(CERTIFIED,), keeps=(CERTIFIED,)))
register(Method("sisa", SISA, SISAFitted, OWN_RUN,
                "exact: retrains the affected shards; runs trained with --method sisa", holds=(EXACT,), keeps=(EXACT,)))
register(Method("dp", PrivateTraining, PrivateFitted, OWN_RUN,
                "exact private retraining; runs trained with --dp", reference=True, holds=(PRIVATE,),
                keeps=(PRIVATE, EXACT)))
register(Method("fisher", Fisher, Fitted, GRADIENT_RUN, "Fisher-noise scrubbing"))
register(Method("finetune", FineTune, Fitted, GRADIENT_RUN, "fine-tuning on the remaining rows"))
register(Method("ascent", GradientAscent, Fitted, GRADIENT_RUN,
                "gradient ascent on the forgotten rows"))
