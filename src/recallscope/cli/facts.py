"""recallscope facts: count the built-in facts a model recalls."""

import argparse
import json
from pathlib import Path
from typing import Any

from recallscope.cli.common import add_command, _placement


def _cmd_facts(args: argparse.Namespace) -> int:
    from recallscope.models import load_model
    from recallscope.outputs import RunRecord, write_csv
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    model = load_model(args.model, **_placement(args))
    facts = load_builtin_facts()
    result = recalled_facts(model, facts, criterion=args.criterion)
    for relation, (kept, total) in result.per_relation().items():
        print(f"{relation:<20} {kept:>4} / {total}")
    print(f"{'total':<20} {int(result.recalled.sum()):>4} / {len(result.facts)}  (criterion {args.criterion})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
        record = RunRecord(out.parent, "facts", options={k: v for k, v in vars(args).items() if k != "func"})
        record.model(model, spec=args.model)
        record.prompts([f.prompt for f in facts])
        record.output(out)
        rows = [{"relation": r, "recalled": k, "total": n} for r, (k, n) in result.per_relation().items()]
        record.output(write_csv(out.with_suffix(".csv"), rows))
        record.write()
    return 0


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "facts", "count the built-in facts a model recalls", _cmd_facts)
    sp.add_argument("--criterion", default="top1", help="top1 (default), top5, rank<=K or an integer K")
    sp.add_argument("--out", default=None, help="write per-fact results as JSON here (a CSV per relation and "
                    "manifest.json go beside it)")
