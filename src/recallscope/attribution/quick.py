"""One call per attribution method, with its standard figures: for the CLI, the demo and notebooks.

:func:`run_method` runs a named method on one group of equal-length pairs and returns the typed result,
the figures that present it and a small JSON-able summary:

- ``atp`` / ``atp*``: node attribution (AtP; AtP* adds the QK fix and GradDrop); figures: the ranked
  sites, and one layer x position heatmap per residual/attention/MLP component.
- ``eap-ig``: EAP-IG edge scores; figures: the ranked edges and the top-``top_edges`` circuit (pruned),
  whose faithfulness is measured (edges shown in the site vocabulary, ``z L0.H1 -> q L1.H0``).
- ``dla``: direct logit attribution; figures: the ranked components and, when the pairs carry token
  spans, the top heads split by source tokens (subject vs relation).

Cheap by design: on SmolLM2, ``run_method(model, pairs[:8], "atp")`` costs about three forward passes.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import plotly.graph_objects as go

from recallscope.attribution.atp import atp
from recallscope.attribution.circuits import evaluate_circuit
from recallscope.attribution.dla import direct_logit_attribution
from recallscope.attribution.eap import eap_ig
from recallscope.attribution.edges import edge_display_label
from recallscope.errors import ConfigError
from recallscope.tasks.pairs import PromptPair, TokenizedPairs

METHODS = ("atp", "atp*", "eap-ig", "dla")
"""Methods :func:`run_method` knows."""


@dataclass(frozen=True)
class MethodRun:
    """A method's result (it has ``.save()``), the figures that show it (name suffix -> figure) and a
    summary (top sites or edges, faithfulness)."""

    result: Any
    figures: dict[str, go.Figure] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    circuit: Any = None
    """``eap-ig``: the evaluated top-``top_edges`` circuit (pruned); None for node methods."""


def run_method(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    method: str = "atp",
    metric: Any = "logit_diff",
    *,
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    top: int = 20,
    top_edges: int = 200,
    steps: int = 5,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> MethodRun:
    """Run ``method`` (one of :data:`METHODS`) on ``pairs`` (one token length); see the module docstring.

    ``prompts_per_chunk`` / ``checkpoint_dir``: resumable AtP and EAP-IG runs (see :func:`atp`); DLA and
    the circuit's faithfulness are cheap and always recomputed.
    """
    resume = {"prompts_per_chunk": prompts_per_chunk, "checkpoint_dir": checkpoint_dir}
    if method in ("atp", "atp*"):
        star = method == "atp*"
        res = atp(model, pairs, metric, components=components, qk_fix=star, graddrop=star, progress=progress,
                  **resume)
        figures = {"": res.plot(top=top)}
        if any(c.startswith(("resid", "attn_out", "mlp_out")) for c in res.components):
            figures["_grid"] = res.plot_grid()
        ranked = res.ranked(top, score="graddrop" if star else "values")
        return MethodRun(res, figures, {"top": [[res.site_label(s), v] for s, v in ranked]})
    if method == "eap-ig":
        scores = eap_ig(model, pairs, metric, steps=steps, progress=progress, **resume)
        circuit = scores.top(top_edges).pruned()
        ev = evaluate_circuit(model, pairs, metric, circuit)
        circuit = replace(circuit, info={**circuit.info, **ev.to_dict()})
        shown = [[edge_display_label(scores.graph, label), v] for label, v in scores.ranked(top)]
        summary = {"top_edges": shown, "circuit": {"requested": top_edges, "edges": circuit.n_edges,
                                                                "nodes": len(circuit.nodes()), **ev.to_dict()}}
        return MethodRun(scores, {"": scores.plot(top=top), "_circuit": circuit.plot()}, summary, circuit)
    if method == "dla":
        dla = direct_logit_attribution(model, pairs, metric if metric in ("logit_diff", "logit") else "logit")
        figures = {"": dla.plot(top=top)}
        if dla.spans and all(dla.spans):
            figures["_sources"] = dla.plot_sources(top=min(top, 12))
        labels, flat = dla.components()
        mean = flat.mean(0)
        order = mean.abs().argsort(descending=True)[:top].tolist()
        return MethodRun(dla, figures, {"top": [[labels[i], float(mean[i])] for i in order]})
    raise ConfigError(f"unknown attribution method {method!r}; use one of {list(METHODS)}.")
