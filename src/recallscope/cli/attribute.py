"""recallscope attribute: AtP, AtP*, EAP-IG with a circuit, or DLA."""

import argparse
import json
from pathlib import Path
from typing import Any

from recallscope.errors import ConfigError
from recallscope.cli.common import (_placement, _positive_int, _record, _resume_note, _resume_option, _write_figure,
                                    add_command)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from recallscope.attribution import fact_pairs, run_method
    from recallscope.models import load_model
    from recallscope.tasks.pairs import group_by_length

    if args.mib and args.method != "eap-ig":
        raise ConfigError(f"--mib writes EAP-IG edge scores; it needs --method eap-ig (got {args.method}).")
    record = _record(args, "attribute", seed=args.seed)
    with record.timed("load_model"):
        model = load_model(args.model, **_placement(args))
    record.model(model, spec=args.model)
    if args.pairs:
        from recallscope.tasks.loaders import load_prompt_pairs

        pairs = list(load_prompt_pairs(args.pairs))
    else:
        from recallscope.tasks.facts import load_builtin_facts, recalled_facts

        facts = load_builtin_facts(None if args.relation == "all" else [args.relation])
        pairs = fact_pairs(model, recalled_facts(model, facts).kept, n_pairs=args.n_pairs, seed=args.seed)
    record.prompts([p.clean for p in pairs] + [p.corrupt for p in pairs])
    out, summary = Path(args.out), []
    for length, group in group_by_length(model, pairs).items():
        stem = out / f"{args.method.replace('*', '_star')}_len{length}"
        with record.timed(args.method):
            run = run_method(model, group, args.method, args.metric, components=args.components.split(","),
                             top=args.top, top_edges=args.top_edges, progress=not args.quiet,
                             prompts_per_chunk=args.prompts_per_chunk, checkpoint_dir=args.resume_dir)
        _resume_note(run.result)
        record.output(run.result.save(stem))
        for suffix, fig in run.figures.items():
            _write_figure(fig, stem.with_name(stem.name + suffix), record)
        if args.mib:
            _write_mib(run, stem, args.mib, int(model.cfg.d_model), record)
        summary.append({"group": stem.name, "n_pairs": len(group), "n_tokens": length, **run.summary})
        print(f"{len(group)} pairs of {length} tokens -> {stem}: {json.dumps(run.summary, default=str)[:300]}")
    print(f"manifest: {record.write(groups=summary)}")
    return 0


def _write_mib(run: Any, stem: Path, kind: str, d_model: int, record: Any) -> None:
    """MIB circuit-localisation files of an EAP-IG run: ``<stem>_mib/importances.{json,pt}`` (scores of every
    edge, ``in_graph`` = the evaluated circuit)."""
    from recallscope.attribution.mib import write_mib_json
    from recallscope.attribution.mib_pt import write_mib_pt

    target = stem.with_name(stem.name + "_mib") / "importances"
    if kind in ("json", "both"):
        record.output(write_mib_json(run.result, target.with_suffix(".json"), d_model=d_model, circuit=run.circuit))
    if kind in ("pt", "both"):
        record.output(write_mib_pt(run.result, target.with_suffix(".pt"), d_model=d_model, circuit=run.circuit))


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "attribute", "attribution (AtP, AtP*, EAP-IG with a circuit, DLA) on built-in facts or "
                     "your pairs", _cmd_attribute, out="out/attribute")
    sp.add_argument("--method", default="atp", choices=["atp", "atp*", "eap-ig", "dla"], help="default atp")
    sp.add_argument("--pairs", help="file with clean, corrupt, answer, wrong fields (default: built-in facts)")
    sp.add_argument("--relation", default="capital", help="built-in relation when --pairs is not given, or all")
    sp.add_argument("--n-pairs", type=_positive_int, default=8, help="built-in fact pairs (default 8)")
    sp.add_argument("--metric", default="logit_diff", help="logit_diff (default), logprob or prob")
    sp.add_argument("--components", default="resid_pre,attn_out,mlp_out", help="AtP components, comma-separated")
    sp.add_argument("--top", type=int, default=20, help="sites or edges shown (default 20)")
    sp.add_argument("--top-edges", type=int, default=200, help="eap-ig: edges in the evaluated circuit")
    sp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    sp.add_argument("--prompts-per-chunk", type=int, default=None, metavar="N",
                    help="atp/atp*/eap-ig: attribute N pairs at a time (default: all at once); with --resume-dir "
                    "each finished chunk is checkpointed")
    sp.add_argument("--mib", choices=["json", "pt", "both"], default=None,
                    help="eap-ig: also write the edge scores as MIB circuit-localisation files "
                    "(<group>_mib/importances.json and/or .pt; in_graph = the evaluated circuit)")
    _resume_option(sp)
