"""A route analysis sized for a demo: acronym routes for a couple of acronyms and the human-mnemonic
comparison on a handful of cards (about two minutes for SmolLM2 on two idle CPU cores).

1. For each acronym the model expands (:func:`~recallscope.routes.acronyms.known_acronyms`), a route report
   of its expansion's concepts against their competitors (coarse layers, 2 alternatives, 2 matched random
   directions and 2 output neighbours, no mean ablation).
2. If cards are given, :func:`~recallscope.routes.human.compare_human` on the first ``n_cards`` cards
   with a keyword (small vocabulary pool).
"""

from dataclasses import dataclass
from typing import Any, Sequence

from recallscope.routes.acronyms import acronym_query, known_acronyms
from recallscope.routes.concepts import load_acronym_lexicon
from recallscope.routes.human import HumanComparison, HumanConfig, compare_human
from recallscope.routes.mnemonics import Card
from recallscope.routes.report import RouteConfig, RouteReport


@dataclass(frozen=True)
class QuickRoutes:
    """Route reports of the acronyms and, when cards were given, the human comparison."""

    acronyms: tuple[RouteReport, ...]
    human: HumanComparison | None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: each acronym's verdict and routes, and the human agreement (causal score)."""
        out: dict[str, Any] = {"acronyms": [r.summary() for r in self.acronyms]}
        if self.human is not None:
            out["human"] = {"n_cards": len(self.human.rows), "causal": self.human.agreement("causal"),
                            "similarity": self.human.agreement("similarity"),
                            "examples": [{k: r[k] for k in ("term", "keyword", "link", "keyword_rank", "own")}
                                         for r in self.human.rows[:5]]}
        return out

    def figures(self) -> dict[str, Any]:
        """Name -> plotly Figure: one route diagram per acronym and the agreement figure."""
        figs = {f"routes_{r.query['input'].strip()}": r.plot() for r in self.acronyms}
        if self.human is not None:
            figs["human_agreement"] = self.human.plot()
        return figs


def quick_routes(model: Any, *, acronyms: Sequence[str] = ("VAT", "NASA"), cards: Sequence[Card] | None = None,
                 n_cards: int = 20, n_controls: int = 9, stride: int = 5, seed: int = 0,
                 progress: bool = False) -> QuickRoutes:
    """Acronym route reports and (optionally) the human comparison on ``n_cards`` cards; see the module doc.

    Acronyms the model does not expand (first expansion word outside its top 3) are left out.
    """
    lexicon = load_acronym_lexicon()
    chosen = {a: lexicon[a] for a in acronyms if a in lexicon}
    config = RouteConfig(n_controls=n_controls, stride=stride, seed=seed, n_boot=500, n_alternatives=2, n_random=2,
                         n_neighbours=2, ablation=False)
    from recallscope.routes.analysis import route_report

    reports = []
    for known in known_acronyms(model, chosen, min_letters=2):
        query, concepts = acronym_query(known)
        reports.append(route_report(model, query, concepts, config=config, progress=progress))
    human = None
    if cards:
        human = compare_human(model, cards, config=HumanConfig(max_cards=n_cards, n_controls=n_controls,
                                                              own_vocabulary=200, n_perm=2000, seed=seed),
                              progress=progress)
    return QuickRoutes(tuple(reports), human)
