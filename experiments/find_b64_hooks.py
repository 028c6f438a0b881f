"""Which base64 chunks have a real mnemonic hook in SmolLM2? A programmatic search, 2- and 4-character chunks.

A hook links a chunk to its decoded text: a word that (a) starts with the chunk's characters, (b) contains
the decoded text after them, and (c) SmolLM2 demonstrably knows. VA -> "VAT" -> T is one: "VA" decodes
to the byte "T" (the first byte of any 4-character group starting "VA"), and "VAT" is VA + T.

1. Chunks: every 2-character prefix (its first byte is fixed by the two characters: 4,096 prefixes,
   of which the 256 with a zero low nibble are also complete ``XY==`` encodings), and every 4-character
   group (3 bytes), met through the words that start with it.
2. Words: SmolLM2's vocabulary (tokens that are ASCII letters/digits once the space marker is dropped)
   plus the acronyms in ``recallscope/data/acronyms.tsv``. A candidate is (chunk, word) with the word
   starting with the chunk (case-sensitive) and the decoded text, all printable ASCII, inside the rest
   of the word (case-sensitive, so the hook carries the exact decoded character).
3. Knowledge: the word is known when, in at least one neutral prompt ending in the chunk
   (``TEMPLATES``), SmolLM2's greedy continuation is the rest of the word (tokenised in context) followed
   by a non-alphanumeric token. The log-probability of the rest of the word is reported too.

Writes ``OUT/hooks.json`` (every candidate, the known ones flagged) and its manifest.

    python experiments/find_b64_hooks.py --out figures/b64_hooks
"""

import argparse
import json
import string
import time
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.manifest import atomic_write_text, build_manifest
from recallscope.tasks.b64_codec import ALPHABET, decode

TEMPLATES = ("The word {}", "The abbreviation {}", "{}")
"""Prompts whose continuation should complete a known word from its first characters."""
PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation + " ")


def first_byte(chunk: str) -> str:
    """The byte fixed by a 2-character prefix: 6 bits of the first character, 2 of the second."""
    v1, v2 = ALPHABET.index(chunk[0]), ALPHABET.index(chunk[1])
    return chr((v1 << 2) | (v2 >> 4))


def candidate_words(tokenizer) -> list[str]:
    """ASCII alphanumeric words from the vocabulary (space marker dropped) and the acronym lexicon."""
    from importlib.resources import files

    words = set()
    for tok in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([tok]).strip()
        if len(text) >= 3 and text.isascii() and text.isalnum():
            words.add(text)
    lexicon = (files("recallscope") / "data" / "acronyms.tsv").read_text().splitlines()
    words |= {line.split("\t")[0] for line in lexicon if line and not line.startswith("#")}
    return sorted(words)


def candidates(words: list[str]) -> list[dict]:
    """(chunk, word, decoded) for 2- and 4-character chunks whose decoded text follows in the word."""
    out = []
    alphabet = set(ALPHABET)
    for word in words:
        for size in (2, 4):
            chunk = word[:size]
            if len(word) <= size or not set(chunk) <= alphabet:
                continue
            text = first_byte(chunk) if size == 2 else decode(chunk).decode("latin-1")
            if set(text) <= PRINTABLE and text in word[size:]:
                out.append({"chunk": chunk, "size": size, "decoded": text, "word": word,
                            "canonical_2": size == 2 and ALPHABET.index(chunk[1]) % 16 == 0})
    return out


@torch.no_grad()
def knows(model, chunk: str, word: str) -> dict:
    """Per template: log p(rest of word | prompt ending in the chunk) and whether greedy decoding writes it.

    The prompt is tokenised as written (the chunk as the model reads it) and the rest on its own, as a
    continuation. One forward over both: greedy decoding produces the rest (in this tokenisation) exactly when
    every teacher-forced token is the argmax; the word is complete when the next argmax is not
    alphanumeric (VAT, not VATICAN).
    """
    rest = word[len(chunk):]
    per = {}
    for tpl in TEMPLATES:
        prompt = tpl.format(chunk)
        ids = model.to_tokens(prompt)[0]
        rest_ids = torch.tensor(model.tokenizer.encode(rest, add_special_tokens=False), dtype=ids.dtype)
        full, n = torch.cat([ids, rest_ids.to(ids.device)]), len(ids)
        logits = model(full[None])[0, n - 1:].float()  # predictions for rest tokens, then the one after
        logp = torch.log_softmax(logits[:-1], -1).gather(1, full[n:, None]).sum()
        greedy = bool((logits[:-1].argmax(-1) == full[n:]).all())
        after = model.tokenizer.decode([int(logits[-1].argmax())])
        per[tpl] = {"completes": greedy and not after[:1].isalnum(), "logp_rest": float(logp), "next": after}
    return {"known": any(v["completes"] for v in per.values()), "templates": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="figures/b64_hooks")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_model(args.model)
    words = candidate_words(model.tokenizer)
    cands = candidates(words)
    print(f"{len(words)} words; {len(cands)} (chunk, word) candidates", flush=True)
    for c in cands:
        c.update(knows(model, c["chunk"], c["word"]))
    known = [c for c in cands if c["known"]]
    by_size = {s: sorted({c["chunk"] for c in known if c["size"] == s}) for s in (2, 4)}
    summary = {"model": args.model, "n_words": len(words), "n_candidates": len(cands),
               "n_candidate_chunks": {s: len({c["chunk"] for c in cands if c["size"] == s}) for s in (2, 4)},
               "n_known_chunks": {s: len(v) for s, v in by_size.items()}, "known_chunks": by_size,
               "known": [{k: c[k] for k in ("chunk", "decoded", "word", "canonical_2")} for c in known],
               "templates": list(TEMPLATES), "candidates": cands, "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "hooks.json", json.dumps(summary, indent=1))
    manifest = build_manifest(model, [c["chunk"] for c in cands], {"templates": list(TEMPLATES)},
                              timings={"total": summary["seconds"]})
    atomic_write_text(out / "hooks.manifest.json", json.dumps(manifest, indent=1, default=str))
    print(json.dumps({k: summary[k] for k in ("n_candidate_chunks", "n_known_chunks", "known")}, indent=1))


if __name__ == "__main__":
    main()
