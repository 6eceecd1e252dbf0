"""FisherTune (CVPR 2025): sparse fine-tuning of a VFM's own parameters, chosen by the Domain-Related
Fisher Information Matrix (fishertune.md). One module per part:

    fisher.py        diagonal empirical Fisher (float32 sums of squared gradients)
    perturbation.py  the simulated domain shift x' (feature statistics perturbed by a hook)
    drfim.py         the plain and the variational estimate, the DR-FIM scores
    selection.py     global top-k, the delta_min -> delta_max schedule, ablation scores
    sparse.py        theta = theta_pt + scatter(delta) inside the forward pass
    method.py        the TuningMethod (three stages), merge_into_dense
    report.py        selection statistics, `dgss fisher` (stages 1-2 alone, files and plots)
    plots.py         matplotlib figures of the selection and the score distribution
"""

from .drfim import DomainRelatedFisher, DRFIMOptions, FisherEstimate, domain_scores, selection_scores, task_scores
from .fisher import squared_gradient_sums
from .method import FisherTune, build_fishertune, merge_into_dense
from .perturbation import FeatureStatisticsPerturbation
from .selection import Selection, active_count, rank_top_entries, selection_count, tuned_fraction
from .sparse import DeltaInjector, apply_delta, eligible_tensors

__all__ = [
    "FisherTune", "build_fishertune", "merge_into_dense",
    "DomainRelatedFisher", "DRFIMOptions", "FisherEstimate", "task_scores", "domain_scores", "selection_scores",
    "squared_gradient_sums", "FeatureStatisticsPerturbation",
    "Selection", "active_count", "rank_top_entries", "selection_count", "tuned_fraction",
    "DeltaInjector", "apply_delta", "eligible_tensors",
]
