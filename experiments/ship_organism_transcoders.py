"""Train the default transcoder set of every shipped organism and write it into the package.

    OMP_NUM_THREADS=1 python experiments/ship_organism_transcoders.py            # all organisms
    OMP_NUM_THREADS=1 python experiments/ship_organism_transcoders.py --only route-s0 --out /tmp/x

For each organism: ``recallscope transcoders --model organism:<name> --no-shipped`` (the CLI's default
organism settings, every layer; training resumes from its checkpoints in the work directory after an
interruption), then :func:`recallscope.features.shipped.package_set` writes
``src/recallscope/features/shipped/<name>/`` (weights in float16 when that moves no layer's explained
variance by more than 1e-3, and ``shipped.json`` with the organism hash, settings, explained variance,
dead fraction, KL / top-1, token counts, this command and the library versions). An organism whose
shipped set already matches the installed weights and the default settings is skipped (``--force``
rebuilds it). Deterministic: the CLI seeds the text, the initialisation and the mini-batches.
"""

import argparse
import contextlib
import io
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def _up_to_date(name: str, out_root: Path) -> bool:
    import json

    from recallscope.features.shipped import organism_file_sha256

    path = out_root / name / "shipped.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    return record.get("organism_weights_sha256") == organism_file_sha256(name)


def ship_one(name: str, out_root: Path, work_root: Path, command: str) -> dict:
    from recallscope import load_model
    from recallscope.cli import main as cli
    from recallscope.features.shipped import package_set

    work = work_root / name
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli(["transcoders", "--model", f"organism:{name}", "--no-shipped", "--out", str(work), "--quiet"])
    if code != 0:
        raise SystemExit(f"training {name} failed (exit {code}); rerun to resume.")
    record = package_set(load_model(f"organism:{name}"), work, out_root / name, command=command)
    shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    from recallscope.features.shipped import SHIPPED_DIR
    from recallscope.models.cache import cache_root
    from recallscope.organisms import shipped

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=None, help="ship only this organism (repeatable)")
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="where the shipped directories go (default: the package)")
    parser.add_argument("--work", default=None, help="training directory (default: the recallscope cache, "
                        "ship-organism-transcoders/); checkpoints there make a rerun resume")
    parser.add_argument("--force", action="store_true", help="rebuild sets that are already up to date")
    args = parser.parse_args(argv)
    names = args.only or shipped()
    unknown = sorted(set(names) - set(shipped()))
    if unknown:
        parser.error(f"unknown organisms {unknown}; shipped organisms: {', '.join(shipped())}")
    out_root = Path(args.out)
    work_root = Path(args.work) if args.work else cache_root() / "ship-organism-transcoders"
    command = "python experiments/ship_organism_transcoders.py" + (" --only " + " --only ".join(names)
                                                                   if args.only else "")
    bar = tqdm(names, desc="organisms", unit="organism")
    for name in bar:
        bar.set_postfix_str(name)
        if not args.force and _up_to_date(name, out_root):
            continue
        t0 = time.perf_counter()
        rec = ship_one(name, out_root, work_root, command)
        ev = ", ".join(f"{v:.3f}" for v in rec["explained_variance"].values())
        tqdm.write(f"{name}: EV [{ev}], KL {rec['fidelity']['all']['kl']:.4f}, top-1 "
                   f"{rec['fidelity']['all']['top1_agreement']:.3f}, {rec['dtype']} (fp16 EV change "
                   f"{rec['fp16_max_ev_change']:.1e}), {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    total = sum(f.stat().st_size for f in out_root.rglob("*") if f.is_file())
    print(f"shipped sets in {out_root}: {total / 1e6:.2f} MB in total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
