"""Control concepts matched on frequency and token count.

A route score means little on its own: ablating *any* direction of a concept's size may move the output.
Every candidate concept is therefore compared with controls that look like it to the model but have no
reason to lie on the route.

1. Frequency is the model's own prior: ``log p(text | "Word:")`` teacher-forced over the text's tokens
   (:func:`frequency_logprob`); no corpus counts are needed and it works for any tokenizer.
2. A :class:`ControlPool` holds candidate control texts with their token counts and frequencies
   (default: whole-word vocabulary tokens spread over the vocabulary, the acronym lexicon's acronyms
   and expansions, and the built-in fact subjects; :func:`default_control_pool`).
3. :func:`match_controls` takes pool texts with the concept's token count (relaxing to +-1 token only
   when too few), drops any that share a word with the concept or the excluded texts, and returns the
   ``k`` nearest in frequency.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.models.forward import run
from recallscope.models.selfcheck import checked_stack
from recallscope.routes.concepts import Concept, ConceptSource, load_acronym_lexicon, word_vocabulary
from recallscope.routes.directions import pad_batch, context_tokens
from recallscope.routes.text import letters

FREQUENCY_PREFIX = "Word:"
"""The neutral prefix under which a text's log-probability measures its frequency."""


def text_tokens(model: Any, text: str, *, head: list[int] | None = None) -> list[int]:
    """The tokens ``text`` adds after :data:`FREQUENCY_PREFIX` (its in-context tokenisation)."""
    head = context_tokens(model, FREQUENCY_PREFIX, "") if head is None else head
    full = context_tokens(model, FREQUENCY_PREFIX, text)
    return full[len(head):] if full[: len(head)] == head else model.tokenizer.encode(text, add_special_tokens=False)


def frequency_logprob(model: Any, texts: Sequence[str], *, batch_size: int = 64) -> Float[Tensor, " text"]:
    """``log p(text | "Word:")`` for each text, teacher-forced (the model's frequency estimate)."""
    stack = checked_stack(model, "route controls")
    head = context_tokens(model, FREQUENCY_PREFIX, "")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            bodies = [text_tokens(model, t, head=head) for t in texts[i:i + batch_size]]
            tokens, _ = pad_batch([head + b for b in bodies], pad)
            read = torch.arange(len(head) - 1, tokens.shape[1] - 1)  # positions predicting the texts' tokens
            logp = torch.log_softmax(run(stack, tokens, read_pos=read)[0].float(), dim=-1)
            for row, body in enumerate(bodies):
                out.append(logp[row, torch.arange(len(body)), torch.tensor(body)].sum())
    return torch.stack(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class ControlPool:
    """Candidate control texts with their token counts and model log-frequencies."""

    texts: tuple[str, ...]
    n_tokens: Int[Tensor, " text"]
    logfreq: Float[Tensor, " text"]


def control_pool(model: Any, texts: Sequence[str]) -> ControlPool:
    """Measure ``texts`` (de-duplicated, leading space added to bare words) as a :class:`ControlPool`."""
    clean = list(dict.fromkeys(t if t.startswith(" ") else " " + t for t in texts if letters(t)))
    if not clean:
        raise EmptyDatasetError("the control pool is empty; pass texts with letters in them.")
    head = context_tokens(model, FREQUENCY_PREFIX, "")
    n_tokens = torch.tensor([len(text_tokens(model, t, head=head)) for t in clean])
    return ControlPool(tuple(clean), n_tokens, frequency_logprob(model, clean))


def default_control_pool(model: Any, *, n_words: int = 300) -> ControlPool:
    """Whole-word vocabulary tokens (every ``len/n_words``-th), lexicon acronyms and expansions, and the
    built-in fact subjects and attributes; cached on the model."""
    cached = getattr(model, "_recallscope_control_pool", None)
    if cached is not None:
        return cached
    from recallscope.tasks.facts import load_builtin_facts

    words = word_vocabulary(model)
    texts = [w for _, w in words[:: max(1, len(words) // n_words)]]
    lexicon = load_acronym_lexicon()
    texts += [" " + a for a in lexicon] + [" " + e for exp in lexicon.values() for e in exp]
    facts = load_builtin_facts()
    texts += [" " + f.subject for f in facts] + [f.attribute for f in facts if f.attribute.startswith(" ")]
    pool = control_pool(model, texts)
    model._recallscope_control_pool = pool
    return pool


def _shares_word(a: str, b: str) -> bool:
    wa = {letters(w) for w in a.split() if letters(w)}
    wb = {letters(w) for w in b.split() if letters(w)}
    return bool(wa & wb) or letters(a) == letters(b)


def match_controls(model: Any, concept: Concept, pool: ControlPool, *, k: int = 19,
                   exclude: Sequence[str] = (), logfreq: float | None = None) -> list[Concept]:
    """``k`` pool texts with the concept's token count and the nearest frequency (see the module doc)."""
    if concept.text is None:
        raise ConfigError(f"concept {concept.name!r} has no text, so it cannot be frequency-matched; pass its "
                          "controls explicitly (e.g. other directions).")
    n = len(text_tokens(model, concept.text))
    target = float(frequency_logprob(model, [concept.text])[0]) if logfreq is None else logfreq
    banned = [concept.text, *exclude]
    ok = torch.tensor([not any(_shares_word(t, b) for b in banned) for t in pool.texts])
    chosen: list[int] = []
    for slack in (0, 1, 2):
        same = ok & ((pool.n_tokens - n).abs() <= slack)
        if int(same.sum()) >= k or slack == 2:
            dist = (pool.logfreq - target).abs().masked_fill(~same, float("inf"))
            chosen = [int(i) for i in dist.argsort()[: min(k, int(same.sum()))]]
            break
    if len(chosen) < k:
        raise EmptyDatasetError(f"only {len(chosen)} controls within 2 tokens of {concept.name!r} ({n} tokens) "
                                f"are in the pool; need {k}. Pass a larger pool or a smaller n_controls.")
    return [Concept(text=pool.texts[i], source=ConceptSource.CONTROL, label=f"{pool.texts[i].strip()} (control)")
            for i in chosen]
