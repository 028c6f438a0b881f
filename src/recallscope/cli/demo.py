"""recallscope demo: the main job, every analysis in one HTML report."""

import argparse
import json
from pathlib import Path
from typing import Any

from recallscope.cli.common import add_command, _record


def _cmd_demo(args: argparse.Namespace) -> int:
    from recallscope.demo import run_demo

    record = _record(args, "demo", seed=args.seed)
    with record.timed("demo"):
        summary = run_demo(args.out, model_spec=args.model, n_trace=args.n_facts, samples=args.samples, seed=args.seed)
    out = Path(args.out)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p != out / "manifest.json"):
        record.output(path)
    # the model's weight hash and tokenizer, as recorded by the first result the demo saved
    record.data["model"] = next((json.loads(m.read_text()).get("model") for m in sorted(out.glob("*/manifest.json"))),
                                {"spec": args.model})
    record.write(summary=summary)
    print(f"report: {out / 'report.html'}  ({summary['seconds']:.0f} s)")
    return 0


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "demo", "the main job: trace fact recall in the embedded model and write a report", _cmd_demo,
                     out="out/demo")
    sp.add_argument("--n-facts", type=int, default=12, help="facts in the causal trace (default 12)")
    sp.add_argument("--samples", type=int, default=3, help="noise samples per fact (default 3)")
    sp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
