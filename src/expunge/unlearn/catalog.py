"""Every update method, registered once: name -> updater, the run class that opens its runs, and what
kind of run it updates. Adding a method: write its module, then add one ``register`` line here."""

from .baselines import FineTune, GradientAscent
from .certified import CertifiedFitted, CertifiedRemoval
from .deltagrad import DeltaGrad
from .fisher import Fisher
from .fitted import Fitted
from .lm_run import LMPrivateTraining, LMRetrain, LMRun, PrivateLMRun
from .lm_unlearn import GradDiffUpdate, LMAscent, NGDiffUpdate, NPOUpdate, SimNPOUpdate
from .merged import LMMerge, Merge, MergedFitted, MergedLMRun
from .private import PrivateFitted, PrivateTraining
from .registry import CERTIFIED, EXACT, GRADIENT_RUN, LM_RUN, OWN_RUN, PRIVATE, Method, register
from .retrain import Retrain
from .sisa import SISA, SISAFitted
from .tradeoff import LMTradeoff, Tradeoff

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
register(Method("tradeoff", Tradeoff, Fitted, GRADIENT_RUN,
                "a chosen point between a model and its deletion (`expunge tradeoff`); no guarantee by construction, "
                "its forget and retain metrics evaluated", serves=("tradeoff",)))
register(Method("merge", Merge, MergedFitted, OWN_RUN,
                "a merged model (`expunge merge`); no updates: forget in the merged runs and merge again", serves=()))
register(Method("lm-retrain", LMRetrain, LMRun, LM_RUN,
                "exact retraining of a language model (what retrain means on an LM run)", reference=True,
                keeps=(EXACT,), alias="retrain"))
register(Method("lm-dp", LMPrivateTraining, PrivateLMRun, OWN_RUN,
                "exact private retraining of a language model (what dp means on an LM run); runs trained with "
                "--task lm --dp", reference=True, holds=(PRIVATE,), keeps=(PRIVATE, EXACT), alias="dp"))
LM_EVALUATED = "; no guarantee by construction, its forget and retain NLLs evaluated"
register(Method("ngdiff", NGDiffUpdate, LMRun, LM_RUN,
                "normalised gradient difference on a language model (Jin et al. 2025)" + LM_EVALUATED,
                serves=("forget",)))
register(Method("graddiff", GradDiffUpdate, LMRun, LM_RUN,
                "gradient difference on a language model: -NLL forget + NLL retain" + LM_EVALUATED, serves=("forget",)))
register(Method("npo", NPOUpdate, LMRun, LM_RUN,
                "negative preference optimisation on a language model" + LM_EVALUATED, serves=("forget",)))
register(Method("simnpo", SimNPOUpdate, LMRun, LM_RUN,
                "simple NPO (length-normalised, no reference) on a language model" + LM_EVALUATED, serves=("forget",)))
register(Method("lm-ascent", LMAscent, LMRun, LM_RUN,
                "gradient ascent on a language model's forgotten rows (what ascent means on an LM run)" + LM_EVALUATED,
                alias="ascent", serves=("forget",)))
register(Method("lm-tradeoff", LMTradeoff, LMRun, LM_RUN,
                "a chosen point between a language model and its deletion (`expunge tradeoff`; what tradeoff means "
                "on an LM run); no guarantee by construction, its forget and retain answer probabilities evaluated",
                alias="tradeoff",
                serves=("tradeoff",)))
register(Method("lm-merge", LMMerge, MergedLMRun, OWN_RUN,
                "a merged language model (`expunge merge`; what merge means on an LM run); no updates: forget in "
                "the merged runs and merge again", alias="merge", serves=()))
