"""Attribution and circuit discovery: the fast way to rank every component, and circuits with measured faithfulness.

- :func:`atp` / :func:`atp_star`: attribution patching of every site of every patching component in
  one backward pass; AtP*'s exact-softmax QK fix and GradDrop; node-level integrated gradients.
- :func:`eap` / :func:`eap_ig`: edge attribution (EAP, EAP-IG on inputs or activations) over the graph
  of embeddings, heads (q/k/v inputs), MLPs and logits; optional per-position edges.
- :func:`direct_logit_attribution`: DLA by layer, head and source position (subject vs relation tokens).
- :func:`attribute_then_verify`: rank with AtP / AtP* / EAP-IG, re-score the top k exactly.
- :func:`run_method`: one named method (atp, atp*, eap-ig, dla) with its standard figures (CLI, demo).
- :func:`fact_pairs`: equal-length counterfactual pairs of (recalled) built-in facts, ready to attribute.
- Circuits: ``EdgeScores.top(n)`` / ``.threshold(tau)``, :func:`acdc`, :func:`evaluate_circuit`
  (faithfulness, completeness), :func:`faithfulness_curve`, :func:`score_recovery` (TPR/FPR, ROC AUC
  against a known circuit).
"""

from recallscope.attribution.atp import AtPConfig, atp, atp_star
from recallscope.attribution.circuits import (
    CircuitEval,
    CircuitRunner,
    FaithfulnessCurve,
    acdc,
    evaluate_circuit,
    faithfulness_curve,
)
from recallscope.attribution.common import fact_pairs
from recallscope.attribution.dla import DLAResult, direct_logit_attribution
from recallscope.attribution.eap import EAPConfig, EdgeMethod, eap, eap_ig
from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.attribution.quick import MethodRun, run_method
from recallscope.attribution.results import AttributionResult
from recallscope.attribution.scoring import RecoveryScore, roc_auc, score_recovery
from recallscope.attribution.verify import VerifyResult, attribute_then_verify, precision_at_k, spearman

__all__ = [
    "AtPConfig", "AttributionResult", "Circuit", "CircuitEval", "CircuitRunner", "DLAResult", "EAPConfig",
    "EdgeMethod", "EdgeScores", "FaithfulnessCurve", "Graph", "MethodRun", "RecoveryScore", "VerifyResult", "acdc", "atp",
    "atp_star", "attribute_then_verify", "direct_logit_attribution", "eap", "eap_ig", "evaluate_circuit",
    "fact_pairs", "faithfulness_curve", "precision_at_k", "roc_auc", "run_method", "score_recovery", "spearman",
]
