"""Text to train transcoders on, available offline.

1. :func:`sample_with_prefix`: the model's own generations, each started from BOS plus ``prefix_len``
   uniformly random vocabulary tokens (a BOS-only start makes small models repeat one sequence).
2. :func:`organism_task_tokens`: an organism's own task prompts, from its public data helpers:
   fact-store prompts (``subject_swap_pairs``, clean and corrupt), full base64 decodes
   (``dependency_pairs`` with every letter appended), mnemonic organisms' decodes and concept facts
   from their ground truth (``VA == T``, ``VAT letter T``, ``VAT kind animal``).
3. :func:`training_tokens` mixes the two halves for organisms and uses self-generated text otherwise.
"""

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.errors import ConfigError, UnknownModelError


@torch.no_grad()
def sample_with_prefix(model: Any, n_seqs: int, seq_len: int, *, prefix_len: int = 1, seed: int = 0,
                       bos_id: int = 0) -> Int[Tensor, "n_seqs seq_len"]:
    """``n_seqs`` sequences: BOS, ``prefix_len`` random tokens, then the model's own samples."""
    n_ctx, d_vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    if not 1 + prefix_len <= seq_len <= n_ctx:
        raise ConfigError(f"seq_len must be in {1 + prefix_len}..n_ctx={n_ctx}, got {seq_len}.")
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, d_vocab, (n_seqs, prefix_len), generator=gen)
    seqs = torch.cat([torch.full((n_seqs, 1), bos_id, dtype=torch.long), prefix], dim=1)
    while seqs.shape[1] < seq_len:
        probs = model(seqs, return_type="logits")[:, -1].float().softmax(-1)
        seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return seqs


def _to_rows(model: Any, texts: list[str], length: int) -> Tensor:
    rows = [model.to_tokens(t)[0, :length] for t in texts]
    return torch.stack([r for r in rows if r.shape[0] == length])


def organism_task_tokens(model: Any, n: int, *, seed: int = 0) -> Int[Tensor, "n_rows pos"] | None:
    """Up to ``n`` task prompts of a loaded organism as token rows (None when it has no prompt helper)."""
    from recallscope.organisms import ground_truth, organism_info

    info = organism_info(model)
    truth = ground_truth(model)
    n_ctx = int(model.cfg.n_ctx)
    if info.kind == "facts":
        from recallscope.organisms.fact_store import subject_swap_pairs

        pairs = subject_swap_pairs(truth, n=max(1, n // 2), seed=seed)
        return _to_rows(model, [p.clean for p in pairs] + [p.corrupt for p in pairs], n_ctx)
    if info.kind == "b64":
        from recallscope.organisms.b64_decoder import dependency_pairs

        n_bytes = max(truth.lengths)
        pairs = [p for p in dependency_pairs(n_bytes, n, seed=seed) if p.meta["byte"] == n_bytes - 1]
        texts = [p.clean + " " + p.answer for p in pairs]
        return _to_rows(model, texts, min(n_ctx, model.to_tokens(texts[0]).shape[1]))
    if info.kind == "mnemonic":  # every decode and concept fact, in the organism's own prompt format
        facts = [f"{c} == {x}" for c, x in truth.chunk_letter.items()]
        facts += [f"{c} letter {x}" for c, x in truth.concept_letter.items()]
        facts += [f"{c} kind {x}" for c, x in truth.concept_kind.items()]
        order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed)).tolist()
        return _to_rows(model, [facts[order[i % len(facts)]] for i in range(n)], n_ctx)
    return None


def training_tokens(model: Any, n: int, *, seed: int = 0, seq_len: int | None = None) -> list[Tensor]:
    """Token batches to train on: for organisms half task prompts, half self-generated; else self-generated.
    Returned as a list because task prompts and generations may differ in length."""
    seq_len = seq_len or int(model.cfg.n_ctx)
    try:
        task = organism_task_tokens(model, n // 2, seed=seed)
    except UnknownModelError:  # not an organism
        task = None
    n_gen = n - (task.shape[0] if task is not None else 0)
    out = [sample_with_prefix(model, n_gen, seq_len, seed=seed)] if n_gen > 0 else []
    return ([task] if task is not None else []) + out


def python_docs_text(min_chars: int) -> str:
    """English prose available on every machine that runs recallscope: the Python documentation's help
    topics (``pydoc_data``), then the docstrings of the standard library's modules, classes and functions
    (files in sorted order), until ``min_chars`` characters (or all there is)."""
    import ast
    import sysconfig
    from pathlib import Path

    import pydoc_data.topics

    parts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    total = sum(map(len, parts))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    for path in sorted(stdlib.rglob("*.py")):
        if total >= min_chars:
            break
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:  # prose, not one-line summaries
                    parts.append(doc)
                    total += len(doc)
    return "\n\n".join(parts)


def text_windows(model: Any, text: str, n_seqs: int, seq_len: int, *, seed: int = 0,
                 bos_id: int | None = None) -> Int[Tensor, "n_seqs seq_len"]:
    """``n_seqs`` rows of BOS + ``seq_len - 1`` consecutive tokens of ``text``, non-overlapping windows
    taken in a seeded random order."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (BOS + one token), got {seq_len}.")
    if bos_id is None:
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        bos_id = 0 if bos is None else int(bos)
    ids = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_windows = ids.shape[0] // (seq_len - 1)
    if n_windows < n_seqs:
        raise ConfigError(f"the text gives {n_windows} windows of {seq_len - 1} tokens, {n_seqs} were asked for; "
                          "ask for fewer tokens or give more text.")
    windows = ids[: n_windows * (seq_len - 1)].reshape(n_windows, seq_len - 1)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_seqs]
    return torch.cat([torch.full((n_seqs, 1), bos_id, dtype=torch.long), windows[order]], dim=1)
