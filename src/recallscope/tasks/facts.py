"""Fact-recall task suite: facts, relations, token spans, counterfactual pairs and a recall filter.

A :class:`Fact` is a (subject, relation, attribute) triple rendered through a template: ``"The capital
of {} is"`` with subject ``"France"`` gives the prompt ``"The capital of France is"``, whose answer is
the attribute ``" Paris"`` (leading space included: it is what the model continues with). This is the
setting of causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") and
attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations").

The suite works in four steps:

1. **Facts**: :func:`load_builtin_facts` reads the built-in set (``recallscope/data/facts.jsonl``,
   one :class:`Relation` template per relation) through the same loader users' files go through.
2. **Spans**: :func:`fact_spans` names the token ranges of the subject, the template words around it
   (the relation), the last position and the attribute, in the model's own tokenisation (BOS included
   when the model prepends one), from the tokenizer's offset mapping or, failing that, by decoding.
3. **Counterfactuals**: :func:`counterfactual_pairs` pairs each fact with another fact of the same
   relation and template whose prompt has identical spans (so position-wise patching lines up) and
   whose answer starts with a different token; facts without such a partner are reported as skipped.
4. **Recall filter**: :func:`recalled_facts` runs the prompts in batches of equal token length (no
   padding) and keeps the facts whose first answer token ranks within ``criterion`` at the last
   position, reporting every fact's rank and probability in a :class:`RecallResult`.
"""

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, DatasetFormatError, EmptyDatasetError, RecallscopeError
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.tasks.pairs import PromptPair, to_tokens


class Relation(str, Enum):
    """Relations of the built-in fact set; :attr:`template` is the prompt each one uses."""

    CAPITAL = "capital"
    """Country -> its capital city: "The capital of France is" -> " Paris"."""
    LANDMARK_CITY = "landmark_city"
    """Landmark -> the city it stands in: "The Eiffel Tower is located in the city of" -> " Paris"."""
    OFFICIAL_LANGUAGE = "official_language"
    """Country -> its single official language: "The official language of Brazil is" -> " Portuguese"."""
    CONTINENT = "continent"
    """Country -> the continent it lies on: "Kenya is located on the continent of" -> " Africa"."""
    ELEMENT_SYMBOL = "element_symbol"
    """Chemical element -> its symbol, quoted: 'The chemical symbol for gold is "' -> 'Au'."""
    CURRENCY = "currency"
    """Country -> its currency's unit name: "The currency of Japan is the" -> " yen"."""
    AUTHOR = "author"
    """Written work -> its author: "War and Peace was written by" -> " Leo Tolstoy"."""
    INVENTOR = "inventor"
    """Invention -> its conventionally credited inventor: "The telephone was invented by" -> " Alexander"."""
    ACRONYM = "acronym"
    """Acronym -> its expansion, answered by its first word: "The acronym VAT stands for" -> " Value"."""
    OPPOSITE = "opposite"
    """Word -> its antonym, quoted: 'The opposite of "hot" is "' -> 'cold'."""

    @property
    def template(self) -> str:
        """The prompt template of this relation, ``{}`` marking the subject."""
        return _TEMPLATES[self]


_TEMPLATES: dict[Relation, str] = {
    Relation.CAPITAL: "The capital of {} is",
    Relation.LANDMARK_CITY: "The {} is located in the city of",
    Relation.OFFICIAL_LANGUAGE: "The official language of {} is",
    Relation.CONTINENT: "{} is located on the continent of",
    Relation.ELEMENT_SYMBOL: 'The chemical symbol for {} is "',
    Relation.CURRENCY: "The currency of {} is the",
    Relation.AUTHOR: "{} was written by",
    Relation.INVENTOR: "The {} was invented by",
    Relation.ACRONYM: "The acronym {} stands for",
    Relation.OPPOSITE: 'The opposite of "{}" is "',
}

SPAN_NAMES = ("bos", "subject", "subject_first", "subject_last", "relation", "relation_before",
              "relation_after", "last", "attribute")
"""Keys :func:`fact_spans` may return (``bos`` only when the model prepends one)."""


def _is_ascii_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def answer_problem(prompt: str, answer: str) -> tuple[str, str] | None:
    """The first problem with a prompt and its answer as ``("prompt" | "answer", message)``, or None.

    A prompt must not end with whitespace (the space belongs at the start of the answer, where the
    tokenizer puts it) and an answer must not be glued to the prompt's last word.
    """
    for name, text in (("prompt", prompt), ("answer", answer)):
        if not text.strip():
            return name, "is empty or blank; give the text"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return name, f"{text!r} contains an unpaired surrogate character; fix the text's encoding"
    if prompt != prompt.rstrip():
        return "prompt", (f"{prompt[-30:]!r} ends with whitespace, which tokenises badly; remove it and "
                          "start the answer with the space instead (' Paris')")
    if _is_ascii_word_char(prompt[-1]) and _is_ascii_word_char(answer[0]):
        return "answer", (f"{answer!r} has no leading space, so it would be glued to the prompt's last word "
                          f"({prompt[-12:] + answer!r}); write {' ' + answer!r}")
    return None


def fact_problem(subject: str, template: str, attribute: str) -> tuple[str, str] | None:
    """The first problem with these fact fields as ``(field, message with the fix)``, or None.

    Shared by :class:`Fact` and the file loaders so both reject exactly the same facts.
    """
    if not subject.strip():
        return "subject", "is empty; give the entity the fact is about, e.g. 'France'"
    if subject != subject.strip():
        return "subject", (f"{subject!r} has leading or trailing whitespace; remove it (the template "
                           "supplies the spaces)")
    n_slots = template.count("{}")
    if n_slots != 1:
        return "template", (f"{template!r} has {n_slots} '{{}}' placeholders but needs exactly one, "
                            "where the subject goes, e.g. 'The capital of {} is'")
    problem = answer_problem(template.replace("{}", subject, 1), attribute)
    if problem is not None:
        return {"prompt": "template", "answer": "attribute"}[problem[0]], problem[1]
    return None


@dataclass(frozen=True)
class Fact:
    """One fact: ``template.replace("{}", subject)`` should be continued with ``attribute``.

    Attributes:
        subject: the entity, e.g. ``"France"`` (no surrounding whitespace).
        relation: the relation's name (a :class:`Relation` value for built-in facts, any name for users').
        template: the prompt with exactly one ``{}`` for the subject, e.g. ``"The capital of {} is"``.
        attribute: the answer as the model would continue the prompt: with its leading space after a
            word (``" Paris"``), without one after an opening quote (``'The opposite of "hot" is "'`` ->
            ``"cold"``). Its first token is the answer patching and the recall filter use.
        aliases: other acceptable answers (``" Kiev"`` for ``" Kyiv"``), written the same way.
    """

    subject: str
    relation: str
    template: str
    attribute: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.relation, Enum):
            object.__setattr__(self, "relation", str(self.relation.value))
        problem = fact_problem(self.subject, self.template, self.attribute)
        if problem is not None:
            raise DatasetFormatError(f"invalid Fact field {problem[0]!r}: {problem[1]}.")
        if not self.relation.strip():
            raise DatasetFormatError("invalid Fact field 'relation': it is empty; name the relation.")

    @property
    def prompt(self) -> str:
        """The template with the subject filled in."""
        return self.template.replace("{}", self.subject, 1)

    @property
    def subject_chars(self) -> tuple[int, int]:
        """Character range ``(start, stop)`` of the subject inside :attr:`prompt`."""
        start = self.template.index("{}")
        return start, start + len(self.subject)


def load_builtin_facts(relations: Iterable[Relation | str] | None = None) -> list[Fact]:
    """The built-in fact set (written for recallscope), optionally only some relations, in file order."""
    from importlib.resources import as_file, files

    from recallscope.tasks.loaders import load_facts

    with as_file(files("recallscope") / "data" / "facts.jsonl") as path:
        facts = load_facts(path)
    if relations is None:
        return facts
    names = [r.value if isinstance(r, Relation) else r for r in relations]
    known = {r.value for r in Relation}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown relation(s) {unknown}; the built-in set has {sorted(known)}.")
    return [f for f in facts if f.relation in names]


# ---------------------------------------------------------------------------------------------- spans


def _bounds_from_offsets(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character range of each model token from the tokenizer's offset mapping, or None if unavailable."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    own = list(enc["input_ids"])
    n_prefix = len(ids) - len(own)
    if n_prefix < 0 or ids[n_prefix:] != own:
        return None
    return [(0, 0)] * n_prefix + [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def _bounds_from_decoding(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character range of each token by decoding growing prefixes (for tokenizers without offsets).

    A token that decodes to an incomplete character (a byte-level piece) shares the range of the token
    that completes it. Special tokens (BOS) decode to nothing and get an empty range.
    """
    bounds: list[tuple[int, int]] = []
    pending = 0
    prev = 0
    for i in range(len(ids)):
        decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.startswith(decoded):
            pending += 1
            continue
        end = len(decoded)
        bounds.extend([(prev, end)] * (pending + 1))
        pending, prev = 0, end
    if pending or prev != len(text):
        raise RecallscopeError(
            f"could not align the tokens of {text!r} with its characters (decoding does not reproduce the "
            "text). Use a fast tokenizer, which reports offsets, or simplify the prompt's characters."
        )
    return bounds


def token_char_bounds(model: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The model's token ids for ``text`` (BOS included if prepended) and each token's character range."""
    ids = [int(t) for t in to_tokens(model, [text])[0].tolist()]
    bounds = _bounds_from_offsets(model.tokenizer, text, ids)
    if bounds is None:
        bounds = _bounds_from_decoding(model.tokenizer, text, ids)
    return ids, bounds


def attribute_token_ids(model: Any, fact: Fact, *, text: str | None = None) -> list[int]:
    """Token ids of the attribute (or ``text``) as they follow the prompt (tokenised in context)."""
    tok = model.tokenizer
    answer = fact.attribute if text is None else text
    prompt_ids = tok.encode(fact.prompt, add_special_tokens=False)
    full_ids = tok.encode(fact.prompt + answer, add_special_tokens=False)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return [int(i) for i in full_ids[len(prompt_ids):]]
    return [int(i) for i in tok.encode(answer, add_special_tokens=False)]


def fact_spans(model: Any, fact: Fact) -> dict[str, tuple[int, int]]:
    """Named half-open token ranges ``(start, stop)`` of the fact's prompt in the model's tokenisation.

    Keys: ``bos`` (only if the model prepends one), ``subject``, ``subject_first``, ``subject_last``,
    ``relation_before`` / ``relation_after`` (template tokens before / after the subject; either may be
    empty; ``relation_after`` includes the last token), ``relation`` (the longer of those two, ties to
    ``relation_before``: the block that carries the relation's words), ``last`` (the final position)
    and ``attribute`` (where the attribute's tokens sit when appended to the prompt: past its end).
    A token that straddles the subject's edge counts as a subject token.
    """
    ids, bounds = token_char_bounds(model, fact.prompt)
    c_start, c_stop = fact.subject_chars
    special = set(model.tokenizer.all_special_ids)
    n_special = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    inside = [i for i, (a, b) in enumerate(bounds) if b > a and a < c_stop and b > c_start]
    if not inside:
        raise RecallscopeError(f"no token of {fact.prompt!r} covers the subject {fact.subject!r}.")
    start, stop, n = inside[0], inside[-1] + 1, len(ids)
    before, after = (n_special, start), (stop, n)
    spans = {
        "subject": (start, stop),
        "subject_first": (start, start + 1),
        "subject_last": (stop - 1, stop),
        "relation_before": before,
        "relation_after": after,
        "relation": before if before[1] - before[0] >= after[1] - after[0] else after,
        "last": (n - 1, n),
        "attribute": (n, n + len(attribute_token_ids(model, fact))),
    }
    if n_special:
        spans = {"bos": (0, n_special), **spans}
    return spans


# ------------------------------------------------------------------------------------ counterfactuals


@dataclass(frozen=True)
class CounterfactualPairs:
    """Counterfactual subject swaps and the facts that found no partner.

    Attributes:
        pairs: one :class:`PromptPair` per paired fact, in the input order; ``answer`` / ``wrong`` are
            the first tokens (as text) of the clean and corrupt facts' attributes.
        skipped: ``(fact, reason)`` for each fact that could not be paired.
        seed: the seed that chose the partners.
    """

    pairs: tuple[PromptPair, ...]
    skipped: tuple[tuple[Fact, str], ...]
    seed: int

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)


@dataclass(frozen=True)
class _Prepared:
    fact: Fact
    spans: dict[str, tuple[int, int]]
    first_id: int
    first_text: str


def _prepare(model: Any, fact: Fact) -> _Prepared | str:
    """Spans and first answer token of a fact, or the reason it cannot take part in a pair."""
    spans = fact_spans(model, fact)
    ids = attribute_token_ids(model, fact)
    text = model.tokenizer.decode(ids[:1], clean_up_tokenization_spaces=False)
    if model.tokenizer.encode(text, add_special_tokens=False) != ids[:1]:
        return (f"the attribute's first token ({text!r}) does not re-encode to itself, so it cannot serve "
                "as a single-token answer")
    return _Prepared(fact, spans, ids[0], text)


def _pair_key(p: _Prepared) -> tuple[Any, ...]:
    """Facts with equal keys can be swapped position for position."""
    return (p.fact.relation, p.fact.template, p.spans["subject"], p.spans["last"])


def counterfactual_pairs(model: Any, facts: Sequence[Fact], *, seed: int = 0) -> CounterfactualPairs:
    """Pair each fact with a same-relation, same-template fact whose prompt tokenises to the same spans.

    The partner's prompt (the corrupt prompt) has the same token length and the subject in the same
    positions, and its attribute starts with a different token, so ``answer`` and ``wrong`` differ.
    Partners are drawn uniformly with ``random.Random(seed)``: the same facts and seed give the same
    pairs. Facts with no such partner are returned in ``skipped`` with the reason.
    """
    if len(facts) == 0:
        raise EmptyDatasetError("no facts were given; pass at least two facts of one relation.")
    rng = random.Random(seed)
    prepared: list[_Prepared | str] = [_prepare(model, f) for f in facts]
    groups: dict[tuple[Any, ...], list[_Prepared]] = {}
    for p in prepared:
        if isinstance(p, _Prepared):
            groups.setdefault(_pair_key(p), []).append(p)
    pairs, skipped = [], []
    for fact, p in zip(facts, prepared):
        if isinstance(p, str):
            skipped.append((fact, p))
            continue
        candidates = [q for q in groups[_pair_key(p)] if q.first_id != p.first_id]
        if not candidates:
            skipped.append((fact, "no other fact of this relation and template has the same token spans "
                                  "and a different first answer token"))
            continue
        other = rng.choice(candidates)
        meta = {"relation": fact.relation, "template": fact.template, "subject": fact.subject,
                "attribute": fact.attribute, "corrupt_subject": other.fact.subject,
                "corrupt_attribute": other.fact.attribute}
        pairs.append(PromptPair(clean=fact.prompt, corrupt=other.fact.prompt, answer=p.first_text,
                                wrong=other.first_text, spans=dict(p.spans), meta=meta))
    return CounterfactualPairs(pairs=tuple(pairs), skipped=tuple(skipped), seed=seed)


# ------------------------------------------------------------------------------------- recall filter


def parse_criterion(criterion: str | int) -> int:
    """The largest rank that counts as recalled: ``"top1"`` -> 1, ``"top5"`` / ``"rank<=5"`` / ``5`` -> 5."""
    if isinstance(criterion, bool):
        raise ConfigError(f"criterion {criterion!r} is not a rank; use 'top1', 'top5', 'rank<=5' or 5.")
    if isinstance(criterion, int):
        k = criterion
    else:
        text = criterion.strip().lower().replace(" ", "")
        digits = text.removeprefix("top").removeprefix("rank<=")
        k = int(digits) if digits.isdigit() and digits != text else 0
    if k < 1:
        raise ConfigError(f"criterion {criterion!r} is not understood; use 'top1', 'top5', 'rank<=5' or a "
                          "positive integer k (the answer's rank must be <= k).")
    return k


@register_result
@dataclass(frozen=True)
class RecallResult:
    """Which facts a model recalls: the rank and probability of each fact's first answer token.

    Attributes:
        facts: every fact tested, in the input order.
        ranks: ``[prompt]`` 1-based rank of the answer token at the last position (1 = top-1); with
            aliases accepted, the best rank among the attribute's and aliases' first tokens.
        probs: ``[prompt]`` softmax probability of that answer token.
        answer_ids: ``[prompt]`` the answer token ranked (the attribute's first token, or an alias's).
        top_ids: ``[prompt]`` the model's top-1 token at the last position.
        top_tokens: the top-1 tokens as text.
        max_rank: a fact counts as recalled when its rank is <= this.
        config: how the result was made (criterion, batch size, aliases, model spec).
    """

    facts: tuple[Fact, ...]
    ranks: Int[Tensor, " prompt"]
    probs: Float[Tensor, " prompt"]
    answer_ids: Int[Tensor, " prompt"]
    top_ids: Int[Tensor, " prompt"]
    top_tokens: tuple[str, ...]
    max_rank: int
    config: dict[str, Any]

    def __post_init__(self) -> None:
        n = len(self.facts)
        sizes = {len(x) for x in (self.ranks, self.probs, self.answer_ids, self.top_ids, self.top_tokens)}
        if sizes != {n}:
            raise RecallscopeError(f"RecallResult fields disagree on the number of facts: {sizes} vs {n}.")
        if self.max_rank < 1 or bool((self.ranks < 1).any()):
            raise RecallscopeError("ranks and max_rank are 1-based and must be >= 1.")

    @property
    def recalled(self) -> Bool[Tensor, " prompt"]:
        """``[prompt]`` whether each fact is recalled (rank <= max_rank)."""
        return self.ranks <= self.max_rank

    @property
    def kept(self) -> list[Fact]:
        """The recalled facts, in the input order."""
        return [f for f, ok in zip(self.facts, self.recalled.tolist()) if ok]

    def per_relation(self) -> dict[str, tuple[int, int]]:
        """``relation -> (recalled, total)`` in order of first appearance."""
        out: dict[str, tuple[int, int]] = {}
        for fact, ok in zip(self.facts, self.recalled.tolist()):
            kept, total = out.get(fact.relation, (0, 0))
            out[fact.relation] = (kept + int(ok), total + 1)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: totals, per-relation counts and one record per fact."""
        records = [
            {"relation": f.relation, "subject": f.subject, "prompt": f.prompt, "attribute": f.attribute,
             "rank": int(r), "prob": float(p), "top_token": t, "recalled": bool(ok)}
            for f, r, p, t, ok in zip(self.facts, self.ranks.tolist(), self.probs.tolist(), self.top_tokens,
                                      self.recalled.tolist())
        ]
        return {
            "config": self.config, "max_rank": self.max_rank, "n_facts": len(self.facts),
            "n_recalled": int(self.recalled.sum()),
            "per_relation": {k: {"recalled": a, "total": b} for k, (a, b) in self.per_relation().items()},
            "facts": records,
        }

    def plot(self):
        """A plotly bar chart of the share of facts recalled per relation."""
        import plotly.graph_objects as go

        rel = self.per_relation()
        fig = go.Figure(go.Bar(x=list(rel), y=[a / b for a, b in rel.values()],
                               text=[f"{a}/{b}" for a, b in rel.values()]))
        fig.update_layout(title=f"Facts recalled (rank <= {self.max_rank})", yaxis_title="share recalled",
                          yaxis_range=[0, 1])
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ranks/probabilities (safetensors) and the facts, tokens and config (JSON), with checksums."""
        tensors = {"ranks": self.ranks, "probs": self.probs, "answer_ids": self.answer_ids, "top_ids": self.top_ids}
        facts = [{"subject": f.subject, "relation": getattr(f.relation, "value", f.relation), "template": f.template,
                  "attribute": f.attribute, "aliases": list(f.aliases)} for f in self.facts]
        meta = {"facts": facts, "top_tokens": list(self.top_tokens), "max_rank": self.max_rank,
                "config": self.config}
        return save_result_dir(directory, "RecallResult", tensors, meta, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RecallResult":
        t, meta, _ = load_result_dir(directory, "RecallResult")
        facts = tuple(Fact(**{**f, "aliases": tuple(f.get("aliases", ()))}) for f in meta["facts"])
        return cls(facts, t["ranks"], t["probs"], t["answer_ids"], t["top_ids"], tuple(meta["top_tokens"]),
                   int(meta["max_rank"]), meta.get("config", {}))


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length (ascending), each group cut into chunks of ``batch_size``."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [idx[j:j + batch_size] for _, idx in sorted(groups.items())
            for j in range(0, len(idx), batch_size)]


def _last_logits(model: Any, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
    with torch.no_grad():
        return model(tokens)[:, -1, :].float().cpu()


def _answer_candidates(model: Any, fact: Fact, accept_aliases: bool) -> list[int]:
    texts = [fact.attribute, *(fact.aliases if accept_aliases else ())]
    return list(dict.fromkeys(attribute_token_ids(model, fact, text=t)[0] for t in texts))


def recalled_facts(model: Any, facts: Sequence[Fact], *, criterion: str | int = "top1", batch_size: int = 32,
                   accept_aliases: bool = False) -> RecallResult:
    """Rank each fact's first answer token at the prompt's last position; keep those within ``criterion``.

    Prompts are batched by token length, so no batch is padded. ``criterion`` is ``"top1"`` (default),
    ``"topK"``, ``"rank<=K"`` or an integer K. With ``accept_aliases`` an alias's first token counts
    too (the best-ranked candidate is reported).
    """
    if len(facts) == 0:
        raise EmptyDatasetError("no facts were given to the recall filter; pass at least one Fact.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    max_rank = parse_criterion(criterion)
    tokens = to_tokens(model, [f.prompt for f in facts])
    candidates = [_answer_candidates(model, f, accept_aliases) for f in facts]
    n = len(facts)
    ranks, answer_ids, top_ids = (torch.zeros(n, dtype=torch.long) for _ in range(3))
    probs = torch.zeros(n)
    for idx in _length_batches([len(t) for t in tokens], batch_size):
        last = _last_logits(model, torch.stack([tokens[i] for i in idx]))
        logprobs = torch.log_softmax(last, dim=-1)
        for row, i in enumerate(idx):
            cand = torch.tensor(candidates[i])
            cand_ranks = 1 + (last[row].unsqueeze(0) > last[row, cand].unsqueeze(1)).sum(1)
            best = int(cand_ranks.argmin())
            ranks[i], answer_ids[i] = cand_ranks[best], cand[best]
            probs[i] = logprobs[row, cand[best]].exp()
            top_ids[i] = last[row].argmax()
    decode = model.tokenizer.decode
    top_tokens = tuple(decode([t], clean_up_tokenization_spaces=False) for t in top_ids.tolist())
    config = {"criterion": criterion, "max_rank": max_rank, "batch_size": batch_size,
              "accept_aliases": accept_aliases,
              "model": getattr(model, "recallscope_spec", getattr(model.cfg, "model_name", "unknown"))}
    return RecallResult(facts=tuple(facts), ranks=ranks, probs=probs, answer_ids=answer_ids, top_ids=top_ids,
                        top_tokens=top_tokens, max_rank=max_rank, config=config)


def trace_items(model: Any, facts: Sequence[Fact]) -> list[PromptPair]:
    """One :class:`PromptPair` per fact for corruption-free methods (causal trace, knockout): the
    prompt is both clean and corrupt, the answer is the attribute's first token, spans are attached."""
    items = []
    for fact in facts:
        first = model.tokenizer.decode(attribute_token_ids(model, fact)[:1])
        items.append(PromptPair(clean=fact.prompt, corrupt=fact.prompt, answer=first,
                                spans=fact_spans(model, fact),
                                meta={"subject": fact.subject, "relation": str(fact.relation),
                                      "attribute": fact.attribute}))
    return items
