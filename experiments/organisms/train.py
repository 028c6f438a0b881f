"""Train the shipped model organisms on CPU, deterministically, into src/recallscope/organisms/weights/.

    python experiments/organisms/train.py b64-decoder            # one organism
    python experiments/organisms/train.py all                    # every shipped organism
    python experiments/organisms/train.py route-s0 --verify      # retrain, compare with the shipped hash
    python experiments/organisms/train.py --document-route-data  # the data-only two-hop recipe (not shipped)
    python experiments/organisms/train.py all --cards            # regenerate the model cards only
    python experiments/organisms/train.py all --resume-dir ckpt  # checkpoint every 100 steps; rerun resumes
    python experiments/organisms/train.py share-s3 --out DIR     # a held-out family seed that does not ship

Held-out families (recallscope.organisms.families: route-iit, route-l2, route-rot, bypass, share,
rote-early) have recipes for seeds 0-4; seed 0 ships, the others are trained (and cached) by
experiments/benchmarks/route_detection.py, or here with --out.

Training is bit-for-bit reproducible (deterministic algorithms, one thread, seeded init and data); the
weights' SHA-256 is stored in each organism's config.json. Run it under `nice -n 10` on shared machines.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from recallscope.organisms import mnemonic
from recallscope.organisms.core import state_sha256
from recallscope.organisms.recipes import WEIGHTS_DIR, get_recipe, recipes, rewrite_card, save_recipe, train_recipe
from recallscope.organisms.store import read_config


def _summary(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "loss_history"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="organism names, or 'all'")
    ap.add_argument("--verify", action="store_true", help="retrain and compare hashes; write nothing")
    ap.add_argument("--document-route-data", action="store_true",
                    help="train the data-only two-hop recipe for seeds 0-4 and print its checks")
    ap.add_argument("--cards", action="store_true", help="only regenerate the model cards from config.json")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", help="write organism directories under this folder instead of the shipped weights")
    ap.add_argument("--resume-dir", help="checkpoint the training state in this directory; rerunning the same "
                    "command resumes and gives the same weights bit for bit (a changed recipe starts afresh)")
    ap.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="steps between checkpoints")
    args = ap.parse_args(argv)
    if args.document_route_data:
        for seed in range(5):
            cfg = mnemonic.MnemonicConfig(kind="route-data")
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            _, record = mnemonic.train_mnemonic(cfg, progress=args.progress)
            print(f"route-data-s{seed}: {_summary(record)}", flush=True)
    names = sorted(recipes()) if args.names == ["all"] else args.names
    if args.cards:
        for name in names:
            print(f"{name}: card -> {rewrite_card(name) / 'README.md'}")
        return 0
    failed = 0
    for name in names:
        recipe = get_recipe(name)
        net, record = train_recipe(recipe, progress=args.progress, checkpoint_dir=args.resume_dir,
                                   checkpoint_every=args.checkpoint_every)
        sha = state_sha256(net.state_dict())
        if args.verify:
            shipped = read_config(WEIGHTS_DIR / name)["weights_sha256"]
            ok = sha == shipped
            failed += not ok
            print(f"{name}: {'REPRODUCED' if ok else 'DIFFERENT'} sha256 {sha[:16]} (shipped {shipped[:16]})", flush=True)
        else:
            path = save_recipe(recipe, net, record, None if args.out is None else Path(args.out) / name)
            print(f"{name}: sha256 {sha[:16]} -> {path}\n  {_summary(record)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
