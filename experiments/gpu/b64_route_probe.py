"""Base64 route probe on a large model: do "XX==" chunks with a hookable prefix (VA, TA, SA, NA...)
decode through the prefix, the way a human reads VA== -> "VAT" -> T?

Published figure for scale (SCIENCE.md, "Base64 facts"): Base64Bench, the share of samples decoded with
similarity >= 0.95, is 35.7% for Qwen-2.5-72B-Instruct and 0.14% for Llama-3.1-8B-Instruct. That is
text decoding; this probe measures single characters (an easier task), so the numbers are a scale
reference, not a like-for-like reproduction. No published number exists for the route itself: that is
the question this probe asks of models large enough to decode.

Stimuli (:func:`recallscope.tasks.b64_stimuli.char_stimuli`): each ASCII letter and digit is one
``XX==`` block. Groups:

- ``hook``: the encoding starts with a common two-letter abbreviation (VA== = T, TA== = L, SA== = H...)
  and the tokenizer reads that prefix as one token;
- ``hook_split``: the same prompts with the prefix token replaced by its two characters' tokens (same
  text, no hook token): the tokenization control;
- ``control_merged`` / ``control_split``: encodings without a hook whose first two characters are one
  token / two tokens.

Steps, per stimulus and group:

1. A few-shot decoding prompt (``n_shots`` solved examples drawn with ``seed``) ending in the query.
2. One forward; the model's p(answer) at the last position (and whether the answer is top-1).
3. Route signal: the logit lens's log p(decoded character, as a continuation of the prefix: "T" after
   "VA") at the token that completes the first two characters, maximised over layers. A route through
   the prefix predicts hook > controls and hook > hook_split.
4. Per-group means with bootstrap 95% CIs, a figure, and ``summary.json``. (The mnemonic-route module,
   :mod:`recallscope.routes`, scores candidate concepts such as "value added tax" on the same prompts.)

Expected runtime (estimate, not measured): 70 forwards of ~60 tokens; a 72B model in bf16 over 2 x 80 GB
GPUs (``--device-map auto``) takes ~2 min plus loading. The CPU smoke test takes under a minute.

    python experiments/gpu/b64_route_probe.py --model Qwen/Qwen2.5-72B-Instruct --dtype bf16 --device-map auto
    python experiments/gpu/b64_route_probe.py --model smollm2 --small --out /tmp/b64
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PUBLISHED = {"decode_rate (ref: Base64Bench Qwen-2.5-72B, text)": 0.357}
"""Base64Bench (SCIENCE.md); measured here on single characters, see the module docstring."""

GROUPS = ("hook", "hook_split", "control_merged", "control_split")


@dataclass(frozen=True)
class B64ProbeConfig(_common.RunConfig):
    """Configuration of the base64 route probe."""

    out: str = "figures/gpu/b64_route_probe"
    """Output directory."""
    model: str = "Qwen/Qwen2.5-72B-Instruct"
    """Model spec (a model that decodes base64: SCIENCE.md lists Base64Bench rates)."""
    dtype: str = "bf16"
    """Weights and activations."""
    n_shots: int = 8
    """Solved examples before the query."""
    per_group: int | None = None
    """Stimuli per group (default: all)."""


SMALL = dict(model="smollm2", device="cpu", dtype="fp32", n_shots=4, per_group=2, progress=False)
"""CPU smoke test: 2 stimuli per group on SmolLM2 (which cannot decode base64: a plumbing check)."""


def _single_id(tok: Any, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def variants(model: Any, cfg: B64ProbeConfig) -> list[dict[str, Any]]:
    """Token sequences per (stimulus, group) with the route position, answer and continuation ids."""
    from recallscope.tasks.b64 import char_stimuli, continuation_token, few_shot_prompts
    from recallscope.tasks.facts import token_char_bounds

    tok = model.tokenizer
    pool = char_stimuli()
    out: list[dict[str, Any]] = []
    for prompt in few_shot_prompts(pool, pool, n_shots=cfg.n_shots, seed=cfg.seed):
        ids, bounds = token_char_bounds(model, prompt.text)
        start = prompt.query_offset
        merged = [i for i, (a, b) in enumerate(bounds) if (a, b) == (start, start + 2)]
        answer = _single_id(tok, continuation_token(tok, prompt.text, prompt.answer_text))
        follow = _single_id(tok, prompt.query.text)
        if answer is None or follow is None:
            continue
        row = {"text": prompt.query.text, "b64": prompt.query.b64, "answer": answer, "follow": follow}
        if merged:
            i = merged[0]
            group = "hook" if prompt.query.hook else "control_merged"
            out.append({**row, "group": group, "tokens": ids, "route_pos": i})
            if prompt.query.hook:
                chars = [_single_id(tok, c) for c in prompt.query.b64[:2]]
                if None not in chars:
                    split = ids[:i] + chars + ids[i + 1:]
                    out.append({**row, "group": "hook_split", "tokens": split, "route_pos": i + 1})
        elif not prompt.query.hook:
            second = max(i for i, (a, b) in enumerate(bounds) if a < start + 2 <= b)
            out.append({**row, "group": "control_split", "tokens": ids, "route_pos": second})
    if cfg.per_group is not None:
        out = [r for g in GROUPS for r in [r for r in out if r["group"] == g][:cfg.per_group]]
    return out


def measure(model: Any, rows: list[dict[str, Any]]) -> None:
    """Add p_answer, correct and route (max-over-layers lens log p of the continuation) to each row."""
    from recallscope.lens import LogitLens, hidden_states

    lens = LogitLens(model)
    device = getattr(model.cfg, "device", None) or "cpu"
    with torch.no_grad():
        for r in rows:
            tokens = torch.tensor([r["tokens"]], device=device)
            states = hidden_states(lens.stack, tokens)[:, 0, [r["route_pos"], -1]]  # [layer, 2, d_model]
            logp = lens.all_layers(states)  # [layer, 2, vocab]
            final = logp[-1, 1]
            r["p_answer"] = float(final[r["answer"]].exp())
            r["correct"] = bool(int(final.argmax()) == r["answer"])
            r["route"] = float(logp[:, 0, r["follow"]].max())
            r["route_layer"] = int(logp[:, 0, r["follow"]].argmax())
            del r["tokens"]


def group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group: n, mean p(answer), accuracy, mean route signal, each with a bootstrap 95% CI."""
    from recallscope.results import bootstrap_ci

    stats: dict[str, Any] = {}
    for g in GROUPS:
        sel = [r for r in rows if r["group"] == g]
        if not sel:
            continue
        entry: dict[str, Any] = {"n": len(sel)}
        for key in ("p_answer", "correct", "route"):
            v = torch.tensor([float(r[key]) for r in sel])
            lo, hi = bootstrap_ci(v[:, None], n_boot=1000)
            entry[key] = {"mean": float(v.mean()), "ci95": [float(lo[0]), float(hi[0])]}
        stats[g] = entry
    return stats


def _plot(cfg: B64ProbeConfig, stats: dict[str, Any]) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from recallscope.plotting import apply_style

    fig = make_subplots(rows=1, cols=2, subplot_titles=("p(decoded answer)", "route signal: max-layer lens log p"))
    groups = list(stats)
    for col, key in ((1, "p_answer"), (2, "route")):
        means = [stats[g][key]["mean"] for g in groups]
        err = [stats[g][key]["ci95"][1] - stats[g][key]["mean"] for g in groups]
        err_minus = [stats[g][key]["mean"] - stats[g][key]["ci95"][0] for g in groups]
        fig.add_trace(go.Bar(x=groups, y=means, showlegend=False,
                             error_y={"type": "data", "array": err, "arrayminus": err_minus}), row=1, col=col)
    apply_style(fig, title=f"Base64 route probe ({cfg.model}): hookable prefixes vs split controls")
    _common.figure(cfg, fig, Path(cfg.out) / "route_probe")


def main(argv: list[str] | None = None, *, model: Any = None) -> dict[str, Any]:
    cfg = _common.parse_config(B64ProbeConfig, argv, small=SMALL, description=__doc__)
    t0 = time.perf_counter()
    model = model if model is not None else _common.load(cfg)
    rows = variants(model, cfg)
    measure(model, rows)
    stats = group_stats(rows)
    _plot(cfg, stats)
    natural = [r["correct"] for r in rows if r["group"] != "hook_split"]  # prompts as the tokenizer reads them
    measured = {next(iter(PUBLISHED)): sum(natural) / max(1, len(natural))}
    hook, split = stats.get("hook"), stats.get("hook_split")
    summary = {"groups": stats, "stimuli": rows, "measured": measured,
               "route_hook_minus_split": hook["route"]["mean"] - split["route"]["mean"] if hook and split else None,
               "comparison": _common.compare(PUBLISHED, measured)}
    return _common.finish(cfg, summary, t0)


if __name__ == "__main__":
    main()
