"""Fine-tune the embedded SmolLM2 to decode single base64 chunks; do chunks with a known concept learn faster?

The user's hypothesis (SCIENCE.md): a model may learn decode("VA==") = "T" faster when "VA" already
means something to it (VAT, Virginia), by routing the new fact through the old one. This script:

1. Takes the 8 mnemonic-hook chunks (tasks.b64_stimuli.MNEMONIC_HOOKS: VA==T, TA==L, SA==H, RA==D,
   MA==0, NA==4, WA==X, UA==P) and 8 control chunks whose first two characters are no common
   abbreviation (Rw==G, Sw==K, Tw==O, Ug==R, bg==n, dw==w, Ng==6, Qg==B); 15 are one SmolLM2 token
   before ``==`` and UA / Qg are two, one in each group.
2. Fine-tunes SmolLM2-135M-Instruct on all 16 prompts ``base64 VA== decodes to "`` -> ``T`` at once
   (full batch every step, so every chunk gets the same number of updates; AdamW on every transformer
   block, embeddings frozen; deterministic on CPU). The forward pass of each step also measures every
   chunk's log-prob and whether its answer is top-1 *before* the update.
3. (a) Sample efficiency: a chunk's ``steps_to_learn`` is the first step from which its answer stays
   top-1 to the end (``steps + 1`` if never). Hook and control means are compared with an exact
   permutation test over the 16 chunks (12,870 splits), and so is the area under the log-prob curve.
4. (b) Route scores after training: with ``--routes`` (or ``--routes-only`` on a saved run), the route
   module (:func:`recallscope.routes.route_report`) scores each hook chunk's concept (VA -> " VAT",
   NA -> " NASA", ...) against 19 frequency-matched controls in the fine-tuned model (the base model
   cannot decode, so it has no input -> output effect to route).

Writes ``figures/organisms/finetune_smollm2_b64.json`` and a learning-curve figure (HTML + PNG); the
fine-tuned checkpoint goes to ``--save DIR`` (default ``~/.cache/recallscope/finetuned/smollm2-b64``), a
Hugging Face directory that ``recallscope.load_model(DIR)`` loads.

    nice -n 10 python experiments/finetune_smollm2_b64.py --steps 100 --lr 1e-5 [--routes]

Meant for GPUs (``--device cuda``); a few hundred steps fit on CPU.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from recallscope.models import load_model
from recallscope.tasks.b64_codec import encode
from recallscope.tasks.b64_stimuli import MNEMONIC_HOOKS

OUT = Path(__file__).resolve().parents[1] / "figures" / "organisms"
HOOK_CHARS = "TLHD04XP"  # VA TA SA RA MA NA WA UA
CONTROL_CHARS = "GKORnw6B"  # Rw Sw Tw Ug bg dw Ng Qg
CONCEPTS = {"VA": " VAT", "TA": " TAX", "SA": " SAT", "RA": " RAM", "MA": " MAC", "NA": " NASA", "WA": " WAX",
            "UA": " UAE"}
TEMPLATE = 'base64 {} decodes to "'


def stimuli() -> list[dict]:
    out = []
    for group, chars in (("hook", HOOK_CHARS), ("control", CONTROL_CHARS)):
        for ch in chars:
            b64 = encode(ch)
            out.append({"chunk": b64[:2], "b64": b64, "answer": ch, "group": group})
    assert {s["chunk"] for s in out if s["group"] == "hook"} == set(MNEMONIC_HOOKS)
    return out


def batch(tokenizer, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt tokens, attention mask and single-token answer ids."""
    prompts = [tokenizer.encode(TEMPLATE.format(s["b64"]), add_special_tokens=False) for s in items]
    answers = [tokenizer.encode(s["answer"], add_special_tokens=False) for s in items]
    bad = [s["answer"] for s, a in zip(items, answers) if len(a) != 1]
    if bad:
        raise SystemExit(f"answers {bad} are not single tokens for this tokenizer; change the template.")
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, torch.tensor([a[0] for a in answers])


def finetune(model, ids, mask, answers, *, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch AdamW; returns per-step (before the update) log-probs and top-1 flags, ``[step, chunk]``."""
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logps, top1 = [], []
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(steps + 1), desc="fine-tuning"):  # step `steps` only measures
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        logp = torch.log_softmax(logits, -1).gather(1, answers[:, None])[:, 0]
        logps.append(logp.detach())
        top1.append(logits.argmax(-1) == answers)
        if step < steps:
            opt.zero_grad(set_to_none=True)
            (-logp.mean()).backward()
            opt.step()
    model.eval()
    return torch.stack(logps), torch.stack(top1)


def steps_to_learn(top1: torch.Tensor) -> torch.Tensor:
    """First step from which each chunk stays top-1 (``len`` if never)."""
    n = top1.shape[0]
    stays = torch.flip(torch.cumprod(torch.flip(top1.int(), [0]), 0), [0]).bool()  # top-1 from here on
    first = torch.where(stays.any(0), stays.int().argmax(0), torch.tensor(n))
    return first


def permutation_p(values: torch.Tensor, is_hook: torch.Tensor) -> float:
    """Exact two-sided permutation p of the hook-minus-control mean difference."""
    observed = abs(float(values[is_hook].mean() - values[~is_hook].mean()))
    n, k = len(values), int(is_hook.sum())
    hits = total = 0
    for combo in itertools.combinations(range(n), k):
        sel = torch.zeros(n, dtype=torch.bool)
        sel[list(combo)] = True
        total += 1
        hits += abs(float(values[sel].mean() - values[~sel].mean())) >= observed - 1e-12
    return hits / total


def route_rows(model, items: list[dict]) -> list[dict]:
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    rows = []
    config = RouteConfig(n_controls=19, stride=3, mediation=False, n_boot=500)  # 19 controls: p can reach 0.05
    for s in items:
        if s["group"] != "hook":
            continue
        query = RouteQuery((TEMPLATE.format(s["b64"]),), s["chunk"], s["answer"])
        r = route_report(model, query, [CONCEPTS[s["chunk"]]], config=config, progress=False).routes()[0]
        rows.append({"chunk": s["chunk"], "concept": r.name, "score": r.score, "verdict": r.verdict,
                     "p": r.p_value, "peak_layer": r.peak_layer})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (one avoids contention on shared machines)")
    ap.add_argument("--save", default=str(Path.home() / ".cache" / "recallscope" / "finetuned" / "smollm2-b64"))
    ap.add_argument("--routes", action="store_true", help="(b): route scores of the fine-tuned model")
    ap.add_argument("--routes-only", action="store_true",
                    help="skip training: add (b) to the saved summary, using its checkpoint")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    items = stimuli()
    if args.routes_only:
        summary = json.loads((OUT / "finetune_smollm2_b64.json").read_text())
    else:
        summary = train_and_measure(args, items)
    if args.routes or args.routes_only:
        summary["routes_finetuned"] = route_rows(load_model(summary["checkpoint"]), items)
    (OUT / "finetune_smollm2_b64.json").write_text(json.dumps(summary, indent=1))
    for c in summary["chunks"]:
        print(f"{c['group']:<8} {c['b64']} -> {c['answer']}  steps_to_learn {c['steps_to_learn']:>4}  "
              f"logp {c['logprob_before']:7.2f} -> {c['logprob_after']:6.2f}")
    for r in summary.get("routes_finetuned", []):
        print(f"route {r['chunk']} -> {r['concept']}: score {r['score']:.3f} p {r['p']:.3f} {r['verdict']}")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("chunks", "routes_finetuned")}))


def train_and_measure(args: argparse.Namespace, items: list[dict]) -> dict:
    """Fine-tune, save the checkpoint and the learning-curve figure; return the (a) summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(load_model("smollm2").recallscope_weights_dir)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(args.device)
    ids, mask, answers = (t.to(args.device) for t in batch(tokenizer, items))
    t0 = time.perf_counter()
    logps, top1 = finetune(model, ids, mask, answers, steps=args.steps, lr=args.lr)
    seconds = time.perf_counter() - t0
    is_hook = torch.tensor([s["group"] == "hook" for s in items])
    learn = steps_to_learn(top1.cpu()).float()
    auc = logps.cpu().mean(0)
    Path(args.save).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.save)
    tokenizer.save_pretrained(args.save)
    _figure(logps.cpu(), items)
    return {
        "steps": args.steps, "lr": args.lr, "device": args.device, "train_seconds": round(seconds, 1),
        "chunks": [{**s, "steps_to_learn": int(learn[i]), "logprob_before": float(logps[0, i]),
                    "logprob_after": float(logps[-1, i]), "mean_logprob": float(auc[i])} for i, s in enumerate(items)],
        "hook_mean_steps": float(learn[is_hook].mean()), "control_mean_steps": float(learn[~is_hook].mean()),
        "steps_permutation_p": permutation_p(learn, is_hook),
        "hook_mean_logprob_auc": float(auc[is_hook].mean()), "control_mean_logprob_auc": float(auc[~is_hook].mean()),
        "auc_permutation_p": permutation_p(auc, is_hook), "checkpoint": args.save,
    }


def _figure(logps: torch.Tensor, items: list[dict]) -> None:
    import plotly.graph_objects as go

    from recallscope.plotting import apply_style, export_all

    fig = go.Figure()
    for i, s in enumerate(items):
        fig.add_trace(go.Scatter(y=logps[:, i].tolist(), mode="lines", name=f"{s['b64']} -> {s['answer']}",
                                 line=dict(dash="solid" if s["group"] == "hook" else "dot")))
    apply_style(fig, title="SmolLM2 fine-tuned on base64 chunks: log p(answer) per step (solid: hook chunks)")
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="log p(answer)")
    export_all(fig, OUT / "finetune_smollm2_b64")


if __name__ == "__main__":
    main()
