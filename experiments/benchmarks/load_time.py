"""Benchmark: how long ``load_model("smollm2")`` takes once the GGUF conversion is cached.

Each round runs in a fresh Python process with ``HF_HUB_OFFLINE=1`` and reports two numbers:
the import time of torch + transformers + transformer_lens (paid once per process, whatever loads
the model) and the time of the ``load_model`` call itself. The first load of a machine dequantises
the GGUF file (about a minute) and is excluded by a warm-up round. The last line is JSON:
``{"load_s_median": x, "imports_s_median": y, "rounds": n}``.

    python experiments/benchmarks/load_time.py --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, time
t0 = time.perf_counter()
import torch, transformers, transformer_lens.model_bridge  # noqa: F401
t1 = time.perf_counter()
import recallscope
m = recallscope.load_model("smollm2")
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1}))
"""


def one_round() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    one_round()  # warm-up: converts the GGUF once if this machine has no cached copy yet
    rows = [one_round() for _ in range(args.rounds)]
    for i, r in enumerate(rows):
        print(f"round {i + 1}: imports {r['imports_s']:.2f} s, load_model {r['load_s']:.2f} s")
    print(json.dumps({"load_s_median": round(statistics.median(r["load_s"] for r in rows), 2),
                      "imports_s_median": round(statistics.median(r["imports_s"] for r in rows), 2),
                      "rounds": len(rows)}))


if __name__ == "__main__":
    main()
