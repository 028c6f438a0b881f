"""ROME causal-trace replication on GPT-2 XL (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", Section 2 and Figure 2).

Published figures this script should reproduce (GPT-2 XL, ~1000 known facts, Gaussian noise of 3 sigma
of the token embeddings on the subject, 10 noise samples per fact):

- total effect, p(answer | clean) - p(answer | subject noised): 18.6%;
- average indirect effect (AIE) of restoring the hidden state at the last subject token: 8.7%,
  peaking around layer 15 of 48;
- restoring a window of 10 MLP outputs at the last subject token: AIE peak 6.6%; 10 attention
  outputs: 1.6% (the MLP effect is the large one).

Steps:

1. Load the model (``--device``, ``--dtype``, ``--device-map auto`` for models bigger than one GPU).
2. Keep the facts it recalls top-1 (ROME's "known facts"): the built-in facts, or ``--facts-file``
   (JSONL/CSV of subject, template, attribute; e.g. ROME's known_1000 converted), sampled with ``seed``.
3. :func:`recallscope.patching.causal_trace` three times: hidden states (window 1), MLP outputs and
   attention outputs (window 10), pooled by ROME's token categories, with bootstrap CIs.
4. Write each result (``.save()``), its figure (HTML/PNG), and ``summary.json`` comparing the published
   numbers with the measured ones.

Expected runtime (estimate from FLOPs, not measured here: no GPU on the development machines): each
fact costs about 110 TFLOP for the three traces with 10 samples, so 1000 facts take ~20-40 min on one
H100 in fp32/tf32 (about half in bf16), a few hours on a 24 GB consumer GPU. ``--ray-workers N``
shards the sweep over N GPUs. The CPU smoke test (``--model smollm2 --small``) takes under a minute.

    python experiments/gpu/rome_causal_trace.py --model gpt2-xl --device cuda --n-facts 1000
    python experiments/gpu/rome_causal_trace.py --model smollm2 --small --out /tmp/rome
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PUBLISHED = {
    "total_effect": 0.186,
    "aie_hidden_last_subject_peak": 0.087,
    "aie_hidden_last_subject_peak_layer": 15,
    "aie_mlp_window10_last_subject_peak": 0.066,
    "aie_attn_window10_last_subject_peak": 0.016,
}
"""Meng et al. 2022 on GPT-2 XL (48 layers)."""

TRACES = (("hidden", "resid_post", 1), ("mlp", "mlp_out", 10), ("attn", "attn_out", 10))


@dataclass(frozen=True)
class RomeConfig(_common.FactRunConfig):
    """Configuration of the ROME causal-trace replication."""

    out: str = "figures/gpu/rome_causal_trace"
    """Output directory."""
    samples: int = 10
    """Noise samples per fact (ROME: 10)."""
    noise_scale: float = 3.0
    """Noise std in units of the token-embedding std (ROME: 3)."""
    window: int = 10
    """Layers restored together for MLP and attention (ROME: 10)."""
    layers: tuple[int, ...] | None = None
    """Layers to restore (default: all)."""


SMALL = dict(model="smollm2", device="cpu", dtype="fp32", n_facts=2, samples=2, window=4,
             layers=(0, 8, 16, 24), relations=("capital",), memory_budget_mb="256", progress=False)
"""CPU smoke test: 2 facts, 2 samples, 4 layers of SmolLM2."""


def category_peak(result: Any, category: str) -> dict[str, Any]:
    """Largest mean indirect effect within one token category, with its layer and 95% CI."""
    eff = result.effect()
    mean, (lo, hi) = eff.mean(), eff.ci()
    col = result.labels["token"].index(category)
    i = int(mean[:, col].nan_to_num(nan=-1e9).argmax())
    return {"layer": int(result.labels["layer"][i]), "aie": float(mean[i, col]),
            "ci95": [float(lo[i, col]), float(hi[i, col])]}


def main(argv: list[str] | None = None, *, model: Any = None) -> dict[str, Any]:
    from recallscope.patching import causal_trace
    from recallscope.tasks.facts import trace_items

    cfg = _common.parse_config(RomeConfig, argv, small=SMALL, description=__doc__)
    t0 = time.perf_counter()
    model = model if model is not None else _common.load(cfg)
    items = trace_items(model, _common.known_facts(model, cfg))
    out = Path(cfg.out)
    summary: dict[str, Any] = {"n_facts": len(items), "facts": [it.clean + it.answer for it in items]}
    measured: dict[str, Any] = {}
    with _common.sweeps_on(cfg, model):
        for name, component, window in TRACES:
            res = causal_trace(model, items, component=component, window=1 if window == 1 else cfg.window,
                               n_samples=cfg.samples, noise_scale=cfg.noise_scale, seed=cfg.seed,
                               layers=cfg.layers, memory_budget_mb=_common.budget(cfg, model),
                               progress=cfg.progress, checkpoint_dir=cfg.checkpoint_dir)
            res.save(out / f"trace_{name}")
            _common.figure(cfg, res.effect().plot(title=f"Causal trace, {name}: indirect effect on p(answer)"),
                       out / f"trace_{name}")
            summary[name] = {"last_subject": category_peak(res, "subject_last"), "last": category_peak(res, "last")}
            measured["total_effect"] = float((res.clean - res.corrupt).mean())
    measured["aie_hidden_last_subject_peak"] = summary["hidden"]["last_subject"]["aie"]
    measured["aie_hidden_last_subject_peak_layer"] = summary["hidden"]["last_subject"]["layer"]
    measured["aie_mlp_window10_last_subject_peak"] = summary["mlp"]["last_subject"]["aie"]
    measured["aie_attn_window10_last_subject_peak"] = summary["attn"]["last_subject"]["aie"]
    summary["measured"] = measured
    summary["comparison"] = _common.compare(PUBLISHED, measured)
    return _common.finish(cfg, summary, t0)


if __name__ == "__main__":
    main()
