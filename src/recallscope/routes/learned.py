"""Learned-subspace scores as optional extras of a route report: one call a report can make per concept.

:func:`learned_route_scores` runs, for one route query and one candidate concept, the Jacobian-lens
readout and concept swap (:mod:`.jacobian`) and, when the caller gives a concept variable over inputs, the
DAS score with its controls (:mod:`.das`). It returns :class:`LearnedScores`, whose :meth:`~LearnedScores.row`
is a flat dict of numbers for a report table. Neither score alone makes a verdict; they are evidence beside
the interchange score of the report.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from recallscope.errors import ConfigError
from recallscope.routes.das import ConceptVariable, DASConfig, DASRouteResult, das_route_score
from recallscope.routes.jacobian import JLensConfig, JLensRouteResult, jacobian_lens, jlens_route_score


@dataclass(frozen=True)
class LearnedScores:
    """The optional learned-subspace scores of one concept in a route query (either may be None)."""

    concept: str
    jlens: JLensRouteResult | None
    das: DASRouteResult | None

    def row(self, alpha: float = 0.05) -> dict[str, Any]:
        """Flat numbers for a report table: ``jlens_*`` and ``das_*`` keys (absent scores are left out)."""
        out: dict[str, Any] = {"concept": self.concept}
        if self.jlens is not None:
            best = self.jlens.best_rank()
            lo, hi = self.jlens.ci()
            out.update(jlens_swap_margin=self.jlens.swap_score, jlens_swap_ci95=(lo, hi), jlens_p=self.jlens.p_value,
                       jlens_best_layer=best["layer"], jlens_best_rank=best["median_rank"],
                       jlens_layer=self.jlens.config["layer"], jlens_drop_per_norm=float(self.jlens.per_norm()[0]),
                       jlens_control_drop_per_norm_max=float(self.jlens.per_norm()[1:].max()))
        if self.das is not None:
            out.update(das_iia=self.das.score, das_ci95=self.das.ci(), das_p=self.das.p_value,
                       das_carries=self.das.carries(alpha),
                       **{f"das_{k}": v for k, v in self.das.control_scores().items()})
        return out


def learned_route_scores(model: Any, prompts: Sequence[str], input_text: str, output: str, concept: str, *,
                         counter: str, controls: Sequence[str], layer: int, lens: Any = None,
                         lens_config: JLensConfig = JLensConfig(), variable: ConceptVariable | None = None,
                         das_config: DASConfig = DASConfig(), das_layer: int | None = None) -> LearnedScores:
    """The J-lens readout/swap score of ``concept`` for the query (``prompts`` each containing ``input_text``,
    continued by ``output``; the swap scores ``output``'s first token), and, with ``variable``, the DAS score.

    Args:
        counter: the counter-concept swapped in (J-lens); controls: the control tokens swapped instead of the
            concept: pass the input itself, the output itself and unrelated words as competitors.
        layer: the J-lens swap layer; it must be fitted (``lens_config.layers``, default
            :func:`~recallscope.routes.jacobian.auto_layers`).
        lens: a fitted ``JacobianLens``; default: :func:`~recallscope.routes.jacobian.jacobian_lens` (cached).
        variable / das_config / das_layer: the concept variable over inputs for DAS, its settings, and the layer
            whose entering residual holds the subspace (default: ``layer + 1``, the J-lens site's residual).
    """
    from recallscope.routes.das import single_token_id

    if not prompts:
        raise ConfigError("learned_route_scores needs at least one prompt.")
    first = model.tokenizer.encode(output, add_special_tokens=False)
    if not first:
        raise ConfigError(f"the output {output!r} has no tokens.")
    out_token = model.tokenizer.decode(first[:1])
    single_token_id(model, out_token)
    lens = lens if lens is not None else jacobian_lens(model, lens_config)
    jl = jlens_route_score(model, lens, prompts, input_text, out_token, concept, counter, controls, layer=layer)
    das = None
    if variable is not None:
        site = das_layer if das_layer is not None else min(layer + 1, int(model.cfg.n_layers) - 1)
        das = das_route_score(model, variable.pairs(model, seed=das_config.seed), site, das_config)
    return LearnedScores(concept, jl, das)
