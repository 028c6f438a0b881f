"""recallscope demo: the main job, every analysis in one HTML report."""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from recallscope.cli.common import _config, _placement, _record, add_command

DEMO_OPTIONS = {"n_pairs": "n_pairs", "n_facts": "n_trace", "samples": "samples",
                "cards": "cards", "n_cards": "n_cards", "seed": "seed"}
"""argparse destination -> DemoConfig field."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from recallscope.demo import DemoConfig, run_demo
    from recallscope.models import load_model

    import dataclasses

    config = _config(args, DemoConfig, DEMO_OPTIONS)
    if not args.config or args.model != "smollm2":  # --model's default must not override the file's model
        config = dataclasses.replace(config, model=args.model)
    if args.no_png:
        config = dataclasses.replace(config, png=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    demo_log = logging.getLogger("recallscope.demo")
    demo_log.addHandler(handler)
    demo_log.setLevel(logging.INFO)
    record = _record(args, "demo", config=config, seed=config.seed)
    try:
        with record.timed("load_model"):
            model = load_model(config.model, **_placement(args))
        record.model(model, spec=config.model)
        with record.timed("demo"):
            summary = run_demo(args.out, config, model=model)
    finally:
        demo_log.removeHandler(handler)
    out = Path(args.out)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p != out / "manifest.json"):
        record.output(path)
    record.data["timings_s"].update({f"demo/{k}": v for k, v in summary["timings_s"].items()})
    record.prompts([p[0] for p in summary.get("pairs", [])])
    record.write(summary={k: v for k, v in summary.items() if k not in ("config", "timings_s")})
    print(f"report: {out / 'report.html'}  ({summary['seconds']:.0f} s)")
    return 0


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "demo", "the main job: trace fact recall in the embedded model, find its circuit, run "
                     "the route analysis (acronyms, mnemonic cards) and analyse the base64 and mnemonic organisms; "
                     "writes one self-contained report.html with PNGs (about 3-6 min on 2 CPU cores)", _cmd_demo,
                     out="out/demo")
    sp.add_argument("--config", help="TOML/JSON file with DemoConfig fields (options given here override it)")
    sp.add_argument("--n-pairs", type=int, default=None, help="capital pairs for patching, attribution and the "
                    "circuit (default 12)")
    sp.add_argument("--n-facts", type=int, default=None, help="facts in the causal traces and the knockout (default 8)")
    sp.add_argument("--samples", type=int, default=None, help="noise samples per fact (default 2)")
    sp.add_argument("--cards", default=None, metavar="FILE", help="mnemonic cards (Anki text export: term, mnemonic, "
                    "definition, ...) for the human comparison (default: the sample cards shipped with recallscope)")
    sp.add_argument("--n-cards", type=int, default=None, help="cards scored in the human comparison (default 14)")
    sp.add_argument("--no-png", action="store_true", help="write no PNGs (the report still has every figure)")
    sp.add_argument("--seed", type=int, default=None, help="seed (default 0)")
