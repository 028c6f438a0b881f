"""Count the built-in facts a model recalls (first answer token top-1 at the last position).

Usage::

    python experiments/count_recalled_facts.py [--model smollm2] [--criterion top1] \
        [--out figures/smollm2_recall.json]

Prints recalled / total per relation and overall, and writes the full RecallResult summary (one record
per fact: rank, probability, the model's top token) as JSON.
"""

import argparse
import json
import time
from pathlib import Path

from recallscope import load_model
from recallscope.manifest import atomic_write_text, build_manifest
from recallscope.tasks.facts import load_builtin_facts, recalled_facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model spec for recallscope.load_model")
    parser.add_argument("--criterion", default="top1", help="'top1', 'top5', 'rank<=5' or an integer k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="figures/smollm2_recall.json", help="where to write the JSON")
    args = parser.parse_args()

    model = load_model(args.model, device=args.device)
    facts = load_builtin_facts()
    start = time.perf_counter()
    result = recalled_facts(model, facts, criterion=args.criterion, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    print(f"{'relation':<20} recalled / total")
    for relation, (kept, total) in result.per_relation().items():
        print(f"{relation:<20} {kept:>8} / {total}")
    summary = result.to_dict()
    print(f"{'total':<20} {summary['n_recalled']:>8} / {summary['n_facts']}  "
          f"(criterion {args.criterion}, {seconds:.1f} s)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({**summary, "seconds": seconds}, indent=1, ensure_ascii=False))
    manifest = build_manifest(model, [f.prompt for f in facts], summary["config"], timings={"recall": seconds})
    atomic_write_text(out.with_suffix(".manifest.json"), json.dumps(manifest, indent=1, default=str))
    print(f"wrote {out} and its manifest")


if __name__ == "__main__":
    main()
