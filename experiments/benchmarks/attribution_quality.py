"""Benchmark: cost and quality of AtP, AtP* and EAP-IG against exact patching, on SmolLM2 and the built-in facts.

One group of equal-length counterfactual pairs of the facts SmolLM2 recalls (``attribution.fact_pairs``
over ``tasks.facts.recalled_facts``), all in this process:

1. **Cost**, in forward equivalents: each method's median wall time divided by the median time of a
   plain forward pass of the clean prompts (recallscope's functional forward, full logits, no
   gradients), timed alternately with it. AtP over the whole grid = every site of all ten components
   of the patching engine (resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern), one backward.
2. **Quality**: exact patching (the sweep engine) of resid_pre, attn_out and mlp_out at every (layer,
   position); Spearman correlation and precision@20 of each method's mean estimates against the mean
   exact effects. AtP*'s QK fix changes only query/key sites, so its estimates there are compared too
   (``--keys``: exact patching of every key site), and its GradDrop ranking by precision@20.
3. The last line is JSON: ``{"atp_forward_equivalents": x, "atp_spearman": y, "eapig_spearman": z}``.

    python experiments/benchmarks/attribution_quality.py                    # 16 pairs, ~5-10 min on 2 cores
    python experiments/benchmarks/attribution_quality.py --n-pairs 8 --repeats 2 --no-keys
"""

import argparse
import json
import statistics
import time

import torch

from recallscope import load_model
from recallscope.attribution import atp, fact_pairs, precision_at_k, spearman
from recallscope.attribution.verify import exact_effects
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.tasks.facts import load_builtin_facts, recalled_facts
from recallscope.tasks.pairs import tokenize_pairs

GRID = ("resid_pre", "attn_out", "mlp_out")


def timed(fn, repeats: int, baseline) -> tuple[float, float, object]:
    """Median seconds of ``fn`` and of ``baseline`` (alternating), and ``fn``'s last result."""
    ts, tb, out = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        baseline()
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), statistics.median(tb), out


def quality(name: str, estimate: torch.Tensor, exact: torch.Tensor, k: int) -> dict:
    return {"method": name, "spearman": spearman(estimate, exact), f"precision@{k}": precision_at_k(estimate, exact, k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--keys", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare AtP and AtP* on every key site (exact patching of k)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    model = load_model(args.model)
    known = recalled_facts(model, load_builtin_facts()).kept
    pairs = fact_pairs(model, known, n_pairs=args.n_pairs, seed=args.seed)
    tp = tokenize_pairs(model, pairs)
    stack = build_stack(model)
    print(f"{len(known)} facts recalled; {len(pairs)} pairs of {tp.n_pos} tokens, e.g. {pairs[0].clean!r} vs "
          f"{pairs[0].corrupt!r}")

    def forward() -> None:
        with torch.no_grad():
            run(stack, tp.clean)

    forward()  # warm-up
    methods = {
        "atp (all 10 site types)": lambda: atp(model, tp, progress=False),
        "atp (resid/attn/mlp)": lambda: atp(model, tp, components=GRID, progress=False),
        "eap-ig (nodes, resid/attn/mlp)": lambda: atp(model, tp, components=GRID, ig_steps=args.ig_steps, progress=False),
        "atp* (QK fix + GradDrop, all)": lambda: atp(model, tp, qk_fix=True, graddrop=True, progress=False),
    }
    cost, results = {}, {}
    for name, fn in methods.items():
        reps = 1 if "GradDrop" in name else args.repeats
        t_method, t_fwd, results[name] = timed(fn, reps, forward)
        cost[name] = t_method / t_fwd
        print(f"{name:<34} {t_method:7.2f} s  = {cost[name]:6.2f} forward equivalents (forward {t_fwd:.2f} s)")

    t0 = time.perf_counter()
    full, star = results["atp (all 10 site types)"], results["atp* (QK fix + GradDrop, all)"]
    sites = [s for s in full.flat()[0] if s.component.value in GRID]
    exact = exact_effects(model, tp, "logit_diff", sites, progress=False).mean(0)
    print(f"exact patching of {len(sites)} resid/attn/mlp sites: {time.perf_counter() - t0:.1f} s")

    def means(result, score="values") -> torch.Tensor:
        all_sites, flat = result.flat(score=score)
        keep = [i for i, s in enumerate(all_sites) if s.component.value in GRID]
        return flat.mean(0)[keep]

    rows = [quality("atp", means(full), exact, args.k),
            quality("atp* (= atp off q/k)", means(star), exact, args.k),
            quality("atp* GradDrop vs |exact|", means(star, "graddrop"), exact.abs(), args.k),
            quality(f"eap-ig ({args.ig_steps} steps)", means(results["eap-ig (nodes, resid/attn/mlp)"]), exact, args.k)]
    if args.keys:
        t0 = time.perf_counter()
        key_sites = [s for s in full.flat()[0] if s.component.value == "k"]
        exact_k = exact_effects(model, tp, "logit_diff", key_sites, progress=False).mean(0)
        pick = lambda r: r.mean("k").flatten()  # noqa: E731
        rows += [quality("atp on keys", pick(full), exact_k, args.k), quality("atp* on keys", pick(star), exact_k, args.k)]
        print(f"exact patching of {len(key_sites)} key sites: {time.perf_counter() - t0:.1f} s")
    print(f"\n{'method':<28} {'Spearman':>9} {'precision@' + str(args.k):>13}")
    for row in rows:
        print(f"{row['method']:<28} {row['spearman']:9.3f} {row[f'precision@{args.k}']:13.2f}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"atp_forward_equivalents": round(cost["atp (all 10 site types)"], 3),
                      "atp_spearman": round(rows[0]["spearman"], 4), "eapig_spearman": round(rows[3]["spearman"], 4)}))


if __name__ == "__main__":
    main()
