"""Competitors of a route candidate: the directions a concept must beat before it counts as a route.

A concept direction that merely resembles the input or the answer "mediates" a recall because the input or
the answer does; so every report scores, beside the candidates:

1. **input**: the input itself (" VAT"), and any candidate with the input's letters.
2. **output**: the output in every casing, with and without its leading space (" Value", "Value",
   " value", " VALUE", ...; :func:`output_variants`), also for its first word, its first token alone when
   it has several (" Deoxyribonucleic" -> " De"; :func:`variant_concepts`), and any candidate with the
   output's (or its first word's) letters. A user's concept in these two classes is reported as a
   competitor, never as a route (:func:`competitor_class`).
3. **neighbour**: the output's nearest neighbours in the model's own unembedding (cosine of the
   unembedding columns, whole-word tokens only) that are not the output, the input or a candidate
   (:func:`output_neighbours`).
4. **random**: random directions matched to a candidate on ``cos(h - b, u)`` at the site (the input's
   last token, every layer; :func:`matched_random`) and, in the interchange, on edit norm
   (:mod:`~recallscope.routes.interchange`).
"""

import re
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.models.selfcheck import checked_stack
from recallscope.models.stack import norm_gain
from recallscope.routes.concepts import Concept, ConceptSource, word_vocabulary
from recallscope.routes.text import letters

COMPETITOR_CLASSES: tuple[str, ...] = ("input", "output", "neighbour", "random", "control")
"""Built-in competitor classes (a caller may add named ones)."""


def _casings(word: str) -> list[str]:
    return list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:].lower(), word.upper()]))


def output_variants(output: str) -> list[str]:
    """The output (and its first word) in every casing, with and without a leading space, output first."""
    stripped = output.strip()
    words = [stripped] + ([stripped.split()[0]] if len(stripped.split()) > 1 else [])
    out = [output]
    for w in words:
        for c in _casings(w):
            out += [" " + c, c]
    return [t for t in dict.fromkeys(out) if t.strip()]


def _spelling(text: str) -> str:
    """Lowercase ASCII letters and digits: what stays of ``text`` across casing and spacing ("MA0" is not "MA")."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def competitor_class(text: str | None, input_text: str, output: str) -> str | None:
    """``"input"`` / ``"output"`` when ``text`` is the input or the output (any casing or spacing; for the
    output also its first word), else None. Digits count: the concept "MA0" is not the input "MA"."""
    if text is None or not _spelling(text):
        return None
    key = _spelling(text)
    if key == _spelling(input_text):
        return "input"
    first = output.strip().split()[0] if output.strip() else output
    if key in (_spelling(output), _spelling(first)):
        return "output"
    return None


def _encodable(model: Any, text: str) -> bool:
    tok = model.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    unk = getattr(tok, "unk_token_id", None)
    return bool(ids) and (unk is None or unk not in ids)


def variant_concepts(model: Any, output: str, *, skip: Sequence[str] = ()) -> list[Concept]:
    """:func:`output_variants` the tokenizer encodes, as competitor concepts (texts in ``skip`` left out),
    and, for an output of several tokens, its first token alone (" Deoxyribonucleic" -> " De")."""
    out = [Concept(text=t, source=ConceptSource.OUTPUT, label=f"{t!r} (output)")
           for t in output_variants(output) if t not in skip and _encodable(model, t)]
    ids = model.tokenizer.encode(output, add_special_tokens=False)
    first = model.tokenizer.decode(ids[:1]) if len(ids) > 1 else ""
    if first.strip() and letters(first) and first not in skip and all(c.text != first for c in out):
        out.append(Concept(text=first, source=ConceptSource.OUTPUT, label=f"{first!r} (output's first token)"))
    return out


def unembedding(model: Any) -> Float[Tensor, "vocab d_model"]:
    """Unembedding vectors (logit directions; the final norm's gain folded in), cached on the model."""
    cached = getattr(model, "_recallscope_unembedding", None)
    if cached is not None:
        return cached
    stack = checked_stack(model, "route competitors")
    gain = norm_gain(stack.final_norm, stack.d_model)
    eye = torch.eye(stack.d_model)
    with torch.no_grad():
        w = stack.unembed(eye * gain) - stack.unembed(torch.zeros(1, stack.d_model))
    model._recallscope_unembedding = w.T.float().contiguous()
    return model._recallscope_unembedding


def output_neighbours(model: Any, output: str, k: int, *, exclude: Sequence[str] = ()) -> list[Concept]:
    """The ``k`` whole-word tokens whose unembedding is closest (cosine) to the output's first token's,
    skipping tokens with the letters of the output, its first word or any ``exclude`` text."""
    if k <= 0:
        return []
    ids = model.tokenizer.encode(output, add_special_tokens=False)
    words = word_vocabulary(model)
    if not ids or not words:
        return []
    w = unembedding(model)
    ids_t = torch.tensor([i for i, _ in words])
    cos = torch.nn.functional.cosine_similarity(w[ids_t], w[ids[0]][None], dim=-1)
    banned = {letters(t) for t in [output, output.strip().split()[0] if output.strip() else output, *exclude]}
    out: list[Concept] = []
    for j in cos.argsort(descending=True).tolist():
        if int(ids_t[j]) == ids[0]:
            continue  # the output's own first token is an output variant, not a neighbour
        text = words[j][1]
        key = letters(text)
        if key in banned or any(key.startswith(b) and len(key) - len(b) <= 1 for b in banned if b):
            continue  # the output's own plural or inflection counts as the output, not a neighbour
        banned.add(key)
        out.append(Concept(text=text, source=ConceptSource.NEIGHBOUR,
                           label=f"{text.strip()} (neighbour, cos {float(cos[j]):.2f})"))
        if len(out) >= k:
            break
    return out


def matched_random(unit: Float[Tensor, "layer d_model"], state: Float[Tensor, "layer d_model"], n: int,
                   generator: torch.Generator) -> Float[Tensor, "n layer d_model"]:
    """``n`` random unit directions with the same cosine to ``state`` as ``unit``, at every layer:
    ``r = cos * s_hat + sqrt(1 - cos^2) * z_hat`` with ``z`` Gaussian, orthogonalised to ``s_hat``."""
    s_hat = state / state.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    u_hat = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = (u_hat * s_hat).sum(-1, keepdim=True)  # [layer, 1]
    z = torch.randn(n, *unit.shape, generator=generator, dtype=torch.float64).to(unit.dtype)
    z = z - (z * s_hat).sum(-1, keepdim=True) * s_hat
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return cos * s_hat + (1 - cos ** 2).clamp_min(0).sqrt() * z
