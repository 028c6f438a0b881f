"""Attention knockout on GPT-2 XL / GPT-J (Geva et al. 2023, "Dissecting Recall of Factual
Associations in Auto-Regressive Language Models", Section 5, Figure 3).

Published findings this script should reproduce (known facts, window of k layers, p(answer) change):

- blocking the last position's attention to the *relation* (non-subject) tokens hurts at earlier
  layers than blocking its attention to the *subject* tokens: relation information reaches the last
  position first, then the subject's attribute is extracted from the subject positions;
- blocking last -> subject in the upper-middle layers cuts p(answer) sharply (the attribute-extraction
  step), while blocking it in the first layers or the last few changes little;
- blocking last -> last (the position's own token) has little effect beyond the first layers.

Geva et al. used a window of k = 9 layers for GPT-2 XL (48 layers) and GPT-J (28 layers); their
"attribute rate" of the subject representation (~50% at the last subject token) is a separate
vocabulary-projection analysis this script does not compute.

Steps:

1. Load the model; keep the facts it recalls top-1, sampled with ``seed`` (at most ``n_facts``).
2. :func:`recallscope.patching.attention_knockout` for the edges last -> subject, last -> relation,
   last -> last over windows of ``window`` layers; values are p(answer) after the knockout.
3. Relative change (p_blocked - p) / p per layer and edge, averaged over facts; the layer of the largest
   drop per edge; whether the relation drop comes first. Result, figure and ``summary.json`` to ``--out``.

Expected runtime (estimate from FLOPs, not measured): a knockout costs one partial forward per (layer
window, edge) per batch of facts, ~3 x 48 partial forwards of ~10 tokens for GPT-2 XL: about 10 min for
1000 facts on one H100 in fp32; GPT-J (6B) about four times that. The CPU smoke test takes under a minute.

    python experiments/gpu/geva_knockout.py --model gpt2-xl --device cuda --n-facts 1000
    python experiments/gpu/geva_knockout.py --model EleutherAI/gpt-j-6b --dtype bf16 --device-map auto
    python experiments/gpu/geva_knockout.py --model smollm2 --small --out /tmp/knockout
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PUBLISHED = {"relation_drop_before_subject_drop": True}
"""Geva et al. 2023 (qualitative: Figure 3, GPT-2 XL and GPT-J)."""

EDGES = ("subject", "relation", "last")


@dataclass(frozen=True)
class KnockoutConfig(_common.FactRunConfig):
    """Configuration of the attention-knockout replication."""

    out: str = "figures/gpu/geva_knockout"
    """Output directory."""
    window: int = 9
    """Layers blocked together around each layer (Geva et al.: 9)."""


SMALL = dict(model="smollm2", device="cpu", dtype="fp32", n_facts=3, relations=("capital",), progress=False)
"""CPU smoke test: 3 facts of SmolLM2."""


def first_drop_layers(relative: torch.Tensor, threshold: float) -> dict[str, int | None]:
    """Per edge, the first layer whose mean relative change falls below ``-threshold`` (None if none)."""
    out: dict[str, int | None] = {}
    for e, edge in enumerate(EDGES):
        below = (relative[:, e] < -threshold).nonzero().flatten()
        out[edge] = int(below[0]) if len(below) else None
    return out


def main(argv: list[str] | None = None, *, model: Any = None) -> dict[str, Any]:
    from recallscope.patching import attention_knockout
    from recallscope.tasks.facts import trace_items

    cfg = _common.parse_config(KnockoutConfig, argv, small=SMALL, description=__doc__)
    t0 = time.perf_counter()
    model = model if model is not None else _common.load(cfg)
    items = trace_items(model, _common.known_facts(model, cfg))
    res = attention_knockout(model, items, edges=EDGES, query="last", window=cfg.window, metric="prob",
                             progress=cfg.progress, checkpoint_dir=cfg.checkpoint_dir)
    out = Path(cfg.out)
    res.save(out / "knockout")
    _common.figure(cfg, res.effect().plot(title=f"Attention knockout (window {cfg.window}): change in p(answer)"),
               out / "knockout")
    relative = (res.effect().values / res.clean[:, None, None]).mean(0)  # [layer, edge]
    strongest = {edge: {"layer": int(relative[:, e].argmin()), "relative_change": float(relative[:, e].min())}
                 for e, edge in enumerate(EDGES)}
    first = first_drop_layers(relative, threshold=0.5 * abs(min(s["relative_change"] for s in strongest.values())))
    rel, sub = strongest["relation"]["layer"], strongest["subject"]["layer"]
    measured = {"relation_drop_before_subject_drop": rel < sub}
    summary = {"n_facts": len(items), "facts": [it.clean + it.answer for it in items],
               "strongest_drop": strongest, "first_large_drop_layer": first,
               "relative_change_by_layer": {edge: [round(float(v), 5) for v in relative[:, e]]
                                            for e, edge in enumerate(EDGES)},
               "measured": measured, "comparison": _common.compare(PUBLISHED, measured)}
    return _common.finish(cfg, summary, t0)


if __name__ == "__main__":
    main()
