"""The route verdict for a family of queries: held-out concept transplant against competitor pairings.

A route hypothesis that covers a *family* of analogous queries (every acronym of a sweep -> its
expansion; every two-hop fact -> its bridge entity) is a pairing ``pair -> concept``. The held-out
concept transplant (:mod:`recallscope.routes.transplant`, the detector validated on the organism benchmark)
scores one pairing; :func:`route_family_report` scores the **candidate** pairing(s) and **competitor**
pairings built from the same family, with the same folds, the same shuffled pairings and the same units:

- ``input``: concept := the input text itself (``" VAT"``). Its states are the site's own content, so its
  transplant is the *ceiling* of any transplant (another input's state carries that input's answer in a
  route and in a rote model alike; measured: 1.00 in route-s0 and rote-s0 at the layers where their sites
  are read). No route can beat it, so it is reported beside the candidates (``margin over input``) but the
  verdict does not require beating it; a candidate that *is* the input is a competitor, never a route.
- ``answer``: concept := the answer text, in every casing and spacing (``" Tax"``, ``"Tax"``, ``" tax"``,
  ``" TAX"``, ...; each variant is one pairing of the class). This is the "site holds only the answer" reading.
- any class the caller adds (``competitors={"distractor": [...]}``).

Algorithm (module doc of :mod:`~recallscope.routes.transplant` for steps 1-5; ``n`` pairs, ``K`` folds):

1. Sites: the residual entering each scored layer at the input's last token of each prompt. Prompts of
   **different token lengths** are allowed: units are run per receiving prompt's shape, so one family may
   mix "VAT" (1 token) and "HTML" (2 tokens) or expansions of any length.
2. Folds and shuffled pairings exactly as :func:`~recallscope.routes.transplant.prepare_transplant` draws them
   (seeded; the same for every pairing, so pairings are compared on identical units and maps of one capacity).
3. Per pairing, layer and fold: the ridge map concept state -> site state fitted outside the fold
   (:func:`~recallscope.routes.transplant.fit_map`), and ``n_shuffles`` maps on deranged pairings.
4. Units: every ordered pair ``(receiver, source)`` in the same fold with different answers; success = the
   argmax next token after putting the source's mapped concept state into the receiver's site is the source's
   answer. ``d = success(fitted) - success(shuffled)`` (mean over shuffles).
5. Units are clustered by **source** (the held-out concept): ``D[pairing, layer, source]`` = mean ``d``.
6. Transplant verdict of each pairing (the transplant's own rule, :func:`~recallscope.routes.transplant.verdict_of`):
   score = ``max_layer mean_source D``; p = sign-flip test over sources with the max over layers as the
   statistic (:func:`~recallscope.routes.transplant.max_sign_flip_p`); CI = bootstrap over sources at that layer.
7. Held-out layer: for the sources of fold ``k`` each pairing is read at the layer that maximises its mean
   ``D`` on the other folds' sources: ``H[pairing, source]``.
8. Against each required competitor class ``C``: margin ``M[s] = H[cand, s] - max_{P in C} H[P, s]``, one-sided
   paired sign-flip t test over sources (:func:`~recallscope.routes.verdict.sign_flip_max_t`); a candidate's
   p is the largest of its own transplant p and the p of every required class (it must pass all: an
   intersection-union test); Holm over the candidates.
9. Verdict: **route** iff the transplant verdict is route, ``p_holm <= alpha`` and every required margin > 0;
   **no route** iff the transplant verdict is no route or some required margin's CI lies below 0;
   else **inconclusive**. Competitor pairings get ``competitor``.
10. Second-attribute check (the benchmark detector's step 9, :mod:`recallscope.routes.transplant_attr` R1-R5),
    only when ``config.transplant.attribute_template`` is set (then every pair needs its ``attribute``), for
    each **candidate** pairing: the reverse transplant site state -> the concept's own state in its attribute
    prompt (``"<concept> kind"`` -> `` animal``), with reverse maps fitted on the same folds against shuffled
    maps (:func:`~recallscope.routes.transplant_attr.prepare_attribute`,
    :func:`~recallscope.routes.transplant_attr.attribute_rates`); units: every ordered ``(receiver, source)`` in
    one fold with different attributes, clustered by source. The check's layer is the one with the largest
    ``min(forward mean D, reverse mean D)``; its p is the sign-flip test of the reverse ``D`` with the max over
    layers as the statistic; it passes ("answer code ruled out") iff that p <= alpha and the min >= min_score.
    The candidate's p (step 8) also takes the max with this p (intersection-union), then Holm; **route** also
    needs the check to pass; **no route** also when the bootstrap CI of the min lies below min_score. Without
    an attribute template the verdict is steps 1-9 and the rows say ``answer_code = "not tested"`` (the
    transplant's ``require_attribute`` downgrade is not applied to families).

Units share receivers and sources; clustering by source (step 5) makes the tests over concepts, not over
the (correlated) ordered pairs. Steps 1-9, like the forward transplant, read only the answer: a site that holds
the answer in a code the concept states share passes them (the ``answer-at-site`` organisms); step 10 separates
the two when the concept has another attribute that is not a function of its answer.
"""

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.routes.competitors import competitor_class
from recallscope.routes.family_report import FamilyConfig, FamilyRow, RouteFamilyReport, with_config
from recallscope.routes.transplant import TransplantConfig, TransplantPair, _first_id, fit_map, site_position
from recallscope.routes.transplant_attr import (PLACEHOLDER, attribute_rates, check_attribute_spec,
                                               prepare_attribute)

__all__ = ["FamilyConfig", "FamilyRow", "RouteFamilyReport", "answer_variants", "family_attribute_template",
           "load_family_tsv",
           "route_family_report", "with_config"]

FAMILY_COLUMNS = ("prompt", "input", "concept", "answer")
"""Required columns of a family TSV (optional: ``attribute_prompt``, ``attribute_answer``)."""


# ------------------------------------------------------------------------------------------ inputs
ATTRIBUTE_COLUMNS = ("attribute_prompt", "attribute_answer")
"""Optional columns: the prompt that reads the concept's other attribute (``{concept}`` once, the same on
every row, e.g. ``{concept} kind``) and the concept's attribute (e.g. `` animal``): the second-attribute check."""


def _read_rows(path: str | os.PathLike) -> tuple[Path, list[dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"family file {path} does not exist; give a TSV with columns {', '.join(FAMILY_COLUMNS)}.")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = set(rows[0]) if rows else set()
    missing = [c for c in FAMILY_COLUMNS if c not in header]
    if missing:
        raise ConfigError(f"family file {path} lacks the column(s) {missing} (header: {sorted(header)}); its first "
                          f"line must name the tab-separated columns {', '.join(FAMILY_COLUMNS)}"
                          "[, attribute_prompt, attribute_answer].")
    half = [c for c in ATTRIBUTE_COLUMNS if c in header]
    if len(half) == 1:
        raise ConfigError(f"family file {path} has the column {half[0]!r} without its partner; the second-attribute "
                          "check needs both attribute_prompt (e.g. '{concept} kind') and attribute_answer.")
    return path, rows


def load_family_tsv(path: str | os.PathLike) -> list[TransplantPair]:
    """Pairs from a TSV with a header row: ``prompt, input, concept, answer[, attribute_prompt,
    attribute_answer]`` (tab-separated; ``\\t`` only, quote nothing). Leading spaces are kept.
    ``attribute_answer`` becomes each pair's ``attribute``; the template is
    :func:`family_attribute_template` (give it as ``TransplantConfig.attribute_template``).

    Raises:
        ConfigError: no such file, a missing column, an empty cell, or an input that is not in its prompt;
            an attribute column without its partner or an attribute cell empty on some rows.
    """
    path, rows = _read_rows(path)
    with_attr = ATTRIBUTE_COLUMNS[1] in rows[0]
    pairs = []
    for i, row in enumerate(rows, start=2):
        values = {c: row.get(c) or "" for c in FAMILY_COLUMNS}
        empty = [c for c, v in values.items() if not v.strip()]
        if empty:
            raise ConfigError(f"{path} line {i}: empty {empty}; every row needs a prompt, input, concept and answer.")
        if values["input"] not in values["prompt"]:
            raise ConfigError(f"{path} line {i}: input {values['input']!r} is not in its prompt {values['prompt']!r}; "
                              "the input must appear verbatim (mind the leading space).")
        attribute = row.get(ATTRIBUTE_COLUMNS[1]) or ""
        if with_attr and not (attribute.strip() and (row.get(ATTRIBUTE_COLUMNS[0]) or "").strip()):
            raise ConfigError(f"{path} line {i}: empty attribute_prompt or attribute_answer; with these columns every "
                              "row needs both (the concept's other attribute, e.g. ' animal' for '{concept} kind'), "
                              "or drop the two columns.")
        pairs.append(TransplantPair(values["prompt"], values["input"], values["concept"], values["answer"],
                                    attribute=attribute))
    return pairs


def family_attribute_template(path: str | os.PathLike) -> str:
    """The family TSV's ``attribute_prompt`` (``""`` without the column).

    Raises:
        ConfigError: rows give different prompts, or the prompt lacks ``{concept}`` (or has it twice).
    """
    path, rows = _read_rows(path)
    if not rows or ATTRIBUTE_COLUMNS[0] not in rows[0]:
        return ""
    templates = {row.get(ATTRIBUTE_COLUMNS[0]) or "" for row in rows}
    if len(templates) != 1:
        raise ConfigError(f"{path}: attribute_prompt differs between rows ({sorted(templates)[:3]}); give one "
                          "prompt for the family, with {concept} where each row's concept goes.")
    template = templates.pop()
    if template.count(PLACEHOLDER) != 1:
        raise ConfigError(f"{path}: attribute_prompt {template!r} must contain {PLACEHOLDER} exactly once (where the "
                          "concept goes), e.g. '{concept} kind'.")
    return template


def answer_variants(answer: str) -> list[tuple[str, str]]:
    """``(kind, text)``: the answer as given, with the other spacing, and in lower, Capitalised and UPPER case
    (with the given spacing); the ``answer`` competitor class has one pairing per kind."""
    word = answer.strip()
    space = answer[: len(answer) - len(answer.lstrip())]
    other = word if space else " " + word
    return [("as given", answer), ("other spacing", other), ("lower", space + word.lower()),
            ("Capitalised", space + word[:1].upper() + word[1:].lower()), ("UPPER", space + word.upper())]


def _check(model: Any, pairs: Sequence[TransplantPair], config: FamilyConfig) -> None:
    k = config.transplant.n_folds
    if len(pairs) < 2 * k:
        raise ConfigError(f"a family of {len(pairs)} pairs is too small for {k} folds: give at least {2 * k} "
                          f"pairs (>= 2 per fold; 10 or more per fold for a useful test), or set fewer n_folds.")
    bad = [p.input_text for p in pairs if p.input_text not in p.prompt]
    if bad:
        raise ConfigError(f"input(s) {bad[:3]} are not in their prompts; each input must appear verbatim.")
    answers = {int(model.to_tokens(p.answer, prepend_bos=False)[0, 0]) for p in pairs if p.answer.strip()}
    if len(answers) < 2:
        raise ConfigError("every pair has the same answer token; a transplant needs pairs with different answers.")
    check_attribute_spec(pairs, config.transplant.attribute_template)  # before any forward pass


def _pairings(pairs: Sequence[TransplantPair], candidates: Mapping[str, Sequence[str]],
              competitors: Mapping[str, Sequence[str]], config: FamilyConfig
              ) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """``(name, role, class, concepts)`` of every pairing: candidates (re-filed as competitors when a concept
    is its pair's input or answer), the input, the answer variants, the caller's competitor classes."""
    n = len(pairs)
    out: list[tuple[str, str, str, tuple[str, ...]]] = []
    for name, concepts in candidates.items():
        if len(concepts) != n:
            raise ConfigError(f"candidate pairing {name!r} has {len(concepts)} concepts for {n} pairs.")
        hits = [competitor_class(c, p.input_text, p.answer) for c, p in zip(concepts, pairs)]
        filed = [h for h in hits if h]
        if filed:
            cls = "input" if filed.count("input") >= filed.count("output") else "answer"
            out.append((name, "competitor", cls, tuple(concepts)))
        else:
            out.append((name, "candidate", "candidate", tuple(concepts)))
    out.append(("input itself", "competitor", "input", tuple(p.input_text for p in pairs)))
    seen: set[tuple[str, ...]] = set()
    for k, kind in enumerate(kind for kind, _ in answer_variants("x")):
        concepts = tuple(answer_variants(p.answer)[k][1] for p in pairs)
        if concepts not in seen and len(seen) < config.max_answer_variants:
            seen.add(concepts)
            out.append((f"answer ({kind})", "competitor", "answer", concepts))
    for name, concepts in competitors.items():
        if len(concepts) != n:
            raise ConfigError(f"competitor pairing {name!r} has {len(concepts)} concepts for {n} pairs.")
        out.append((name, "competitor", name, tuple(concepts)))
    return out


# ------------------------------------------------------------------------------------------ states
def _layers(model: Any, config: FamilyConfig) -> tuple[int, ...]:
    tc = config.transplant
    n = model.cfg.n_layers
    layers = tuple(range(tc.min_layer, n, config.layer_stride)) if tc.layers is None else tuple(tc.layers)
    if not layers or min(layers) < 0 or max(layers) >= n:
        raise ConfigError(f"layers {layers} do not fit the model's {n} blocks (min_layer {tc.min_layer}); pick "
                          f"block inputs in 0..{n - 1}.")
    return layers


def _resid(model: Any, tokens: Int[Tensor, "b pos"], layers: Sequence[int]) -> dict[int, Tensor]:
    """Residual entering each of ``layers`` (one pass through the blocks)."""
    from recallscope.models.forward import block
    from recallscope.models.selfcheck import checked_stack

    stack = checked_stack(model, "the family route verdict")
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        h = stack.embed(tokens, positions)
        for i in range(max(layers) + 1):
            if i in layers:
                out[i] = h
            if i < max(layers):
                h, _, _ = block(stack, i, h, positions, None, lambda point, lay, t: t, lambda point, t: None)
    return out


@dataclass
class _Sites:
    """Receiving prompts grouped by token length; per group its residuals at every scored layer."""

    tokens: list[Tensor]
    pos: list[Tensor]
    group: Tensor
    row: Tensor
    h: list[dict[int, Tensor]]
    y: Float[Tensor, "layer pair d_model"]


def _sites(model: Any, pairs: Sequence[TransplantPair], layers: Sequence[int]) -> _Sites:
    toks, pos = [], []
    for p in pairs:
        toks.append(model.to_tokens(p.prompt)[0])
        pos.append(site_position(model, p))
    lengths = sorted({len(t) for t in toks})
    group = torch.tensor([lengths.index(len(t)) for t in toks])
    row = torch.zeros(len(pairs), dtype=torch.long)
    tokens, positions, hs = [], [], []
    for g in range(len(lengths)):
        members = (group == g).nonzero().squeeze(1)
        row[members] = torch.arange(len(members))
        tokens.append(torch.stack([toks[i] for i in members.tolist()]))
        positions.append(torch.tensor([pos[i] for i in members.tolist()]))
        hs.append(_resid(model, tokens[-1], layers))
    y = torch.stack([torch.stack([hs[int(group[i])][layer][int(row[i]), pos[i]] for i in range(len(pairs))])
                     for layer in layers])
    return _Sites(tokens, positions, group, row, hs, y)


ConceptReader = Callable[[Any, Sequence[str], Sequence[int], str], Tensor]
"""``(model, concept texts, layers, prefix) -> [layer, text, d]``: how a pairing's concepts are read."""


def _concept_states(model: Any, texts: Sequence[str], layers: Sequence[int], prefix: str
                    ) -> Float[Tensor, "layer pair d_model"]:
    """The residual at each concept's last token in ``prefix + concept`` (its own state), every layer."""
    seqs = [model.to_tokens(prefix + t)[0] for t in texts]
    out = torch.zeros(len(layers), len(texts), int(model.cfg.d_model))
    for n in sorted({len(s) for s in seqs}):
        idx = [i for i, s in enumerate(seqs) if len(s) == n]
        h = _resid(model, torch.stack([seqs[i] for i in idx]), layers)
        for li, layer in enumerate(layers):
            out[li, idx] = h[layer][:, -1].float()
    return out


def _folds(n: int, config: TransplantConfig) -> tuple[Tensor, list[list[Tensor]]]:
    """Fold of each pair and, per fold, the training-row permutations (identity + shuffles), drawn exactly as
    :func:`~recallscope.routes.transplant.prepare_transplant` draws them."""
    gen = torch.Generator().manual_seed(config.seed)
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=gen)] = torch.arange(n) % config.n_folds
    perms = []
    for k in range(config.n_folds):
        m = int((fold != k).sum())
        perms.append([torch.arange(m)] + [_derangement(m, gen) for _ in range(config.n_shuffles)])
    return fold, perms


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    while True:
        perm = torch.randperm(n, generator=gen)
        if n < 2 or not bool((perm == torch.arange(n)).any()):
            return perm


def _units(fold: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Every ordered ``(receiver, source)`` in one fold with different answers."""
    rec, src = [], []
    for k in sorted(set(fold.tolist())):
        members = (fold == k).nonzero().squeeze(1).tolist()
        for r in members:
            for s in members:
                if r != s and int(answers[r]) != int(answers[s]):
                    rec.append(r)
                    src.append(s)
    return torch.tensor(rec, dtype=torch.long), torch.tensor(src, dtype=torch.long)


def _success(model: Any, sites: _Sites, layer: int, receiver: Tensor, states: Tensor, targets: Tensor,
             batch: int) -> Float[Tensor, " unit"]:
    """1 where the argmax next token, with ``states`` put into each receiver's site at ``layer``, is the target."""
    from recallscope.models.forward import forward
    from recallscope.models.selfcheck import checked_stack

    stack = checked_stack(model, "the family route verdict")
    out = torch.zeros(len(receiver))
    for g in range(len(sites.tokens)):
        idx = (sites.group[receiver] == g).nonzero().squeeze(1)
        last = torch.tensor([sites.tokens[g].shape[1] - 1])
        for chunk in idx.split(batch):
            rows = sites.row[receiver[chunk]]
            h = sites.h[g][layer][rows].clone()
            h[torch.arange(len(chunk)), sites.pos[g][rows]] = states[chunk].to(h.dtype)
            with torch.no_grad():
                logits, _ = forward(stack, h, start_layer=layer, read_pos=last)
            out[chunk] = (logits[:, -1].argmax(-1) == targets[chunk]).float()
    return out


def _pairing_rates(model: Any, sites: _Sites, x: Tensor, layers: Sequence[int], fold: Tensor,
                   perms: list[list[Tensor]], units: tuple[Tensor, Tensor], targets: Tensor,
                   config: TransplantConfig, controls: bool) -> dict[str, Tensor]:
    """``[layer, unit]`` success of the fitted map, the shuffled maps (mean), and with ``controls`` the
    identity (unfitted) and a norm-matched random state (steps 3-4 of the module doc)."""
    receiver, source = units
    n_maps = len(perms[0])
    names = ["fitted", "shuffled"] + (["identity", "random"] if controls else [])
    out = {k: torch.zeros(len(layers), len(receiver)) for k in names}
    for li, layer in enumerate(layers):
        mapped = torch.zeros(n_maps, len(receiver), sites.y.shape[-1])
        for k, fold_perms in enumerate(perms):
            train = (fold != k).nonzero().squeeze(1)
            here = (fold[receiver] == k).nonzero().squeeze(1)
            for m, perm in enumerate(fold_perms):
                a, mx, my = fit_map(x[li, train[perm]], sites.y[li, train], config.ridge)
                mapped[m, here] = my + (x[li, source[here]] - mx) @ a
        rate = lambda st: _success(model, sites, layer, receiver, st, targets, config.batch_size)  # noqa: E731
        out["fitted"][li] = rate(mapped[0])
        out["shuffled"][li] = torch.stack([rate(mapped[m]) for m in range(1, n_maps)]).mean(0)
        if controls:  # identity: the concept state itself, only where it lives in the site's space
            out["identity"][li] = rate(x[li, source]) if x.shape[-1] == sites.y.shape[-1] else float("nan")
            gen = torch.Generator().manual_seed(config.seed + 7919 * layer)
            r = torch.randn(mapped[0].shape, generator=gen)
            centre = sites.y[li].mean(0)
            out["random"][li] = rate(centre + r / r.norm(dim=-1, keepdim=True)
                                     * (mapped[0] - centre).norm(dim=-1, keepdim=True))
    return out


@dataclass(frozen=True)
class _AttrView:
    """What :func:`~recallscope.routes.transplant_attr.attribute_rates` reads of a prepared transplant."""

    attribute: Any
    fold: Tensor
    site_y: Tensor
    layers: tuple[int, ...]


def _attribute_pairing_rates(model: Any, pairs: Sequence[TransplantPair], concepts: Sequence[str],
                             layers: tuple[int, ...], sites: _Sites, fold: Tensor, units: tuple[Tensor, Tensor],
                             config: TransplantConfig) -> dict[str, Tensor]:
    """Second-attribute check of one candidate pairing (step 10): ``[layer, unit]`` success of the reverse
    transplant (site state -> the concept's attribute prompt) through the fitted map, the shuffled maps (mean)
    and the ceiling (the source concept's own state there), on the forward folds
    (:func:`~recallscope.routes.transplant_attr.prepare_attribute`, R1-R4)."""
    own = [replace(p, concept=c) for p, c in zip(pairs, concepts)]
    prep = prepare_attribute(model, own, layers, sites.y.float(), fold, config)
    view = _AttrView(prep, fold, sites.y.float(), layers)
    receiver, source = units
    out = {k: torch.zeros(len(layers), len(receiver)) for k in ("fitted", "shuffled", "ceiling")}
    for li in range(len(layers)):
        for k in fold.unique().tolist():
            here = (fold[source] == k).nonzero().squeeze(1)
            if here.numel():
                got = attribute_rates(model, view, li, receiver[here], source[here], config.seed)
                for name in out:
                    out[name][li, here] = got[name]
    return out


def route_family_report(model: Any, pairs: Sequence[TransplantPair], *,
                        candidates: Mapping[str, Sequence[str]] | None = None,
                        competitors: Mapping[str, Sequence[str]] | None = None,
                        config: FamilyConfig = FamilyConfig(), name: str = "",
                        progress: bool = False, concept_reader: ConceptReader | None = None) -> "RouteFamilyReport":
    """The route verdict of a family of queries (module doc).

    Args:
        pairs: the family; each pair's ``concept`` is the main candidate pairing (named ``"concept"``).
        candidates: more candidate pairings, name -> one concept per pair (e.g. the expansion's first word).
        competitors: more competitor pairings, class name -> one concept per pair (beaten like ``answer``).
        config: :class:`FamilyConfig`.
        concept_reader: how a pairing's concepts are read, ``(model, texts, layers, prefix) -> [layer, text,
            d]`` (any width ``d``); default: the residual at the concept's last token (``_concept_states``).
            Every pairing (candidates, the input, the answer variants, the caller's competitors) is read the
            same way, so the ridge maps of all pairings have the same inputs (e.g. the activations of a
            transcoder feature set: :func:`recallscope.features.routes.feature_family_report`). With a reader
            of another width than the site the ``identity`` control is NaN.

    Raises:
        ConfigError: too few pairs for the folds, an input not in its prompt, one answer for every pair,
            a pairing of the wrong length, layers outside the model, a reader of the wrong shape, attributes
            without ``attribute_template`` (or the reverse), a template without ``{concept}`` once, an attribute
            equal to the answer, one attribute for every pair.
    """
    from tqdm.auto import tqdm

    pairs = tuple(pairs)
    _check(model, pairs, config)
    tc = config.transplant
    layers = _layers(model, config)
    plan = _pairings(pairs, {"concept": [p.concept for p in pairs], **dict(candidates or {})},
                     dict(competitors or {}), config)
    sites = _sites(model, pairs, layers)
    answers = torch.tensor([int(model.to_tokens(p.answer, prepend_bos=False)[0, 0]) for p in pairs])
    fold, perms = _folds(len(pairs), tc)
    receiver, source = _units(fold, answers)
    targets = answers[source]
    shape = (len(plan), len(layers), len(receiver))
    rates = {k: torch.full(shape, float("nan")) for k in ("fitted", "shuffled", "identity", "random")}
    for i, (_, role, _, concepts) in enumerate(tqdm(plan, desc=f"family {name}", disable=not progress)):
        x = (concept_reader or _concept_states)(model, concepts, layers, tc.concept_prefix)
        if x.ndim != 3 or tuple(x.shape[:2]) != (len(layers), len(concepts)):
            raise ConfigError(f"the concept reader returned shape {tuple(x.shape)}; it must return [layer, concept, "
                              f"d] = [{len(layers)}, {len(concepts)}, d].")
        got = _pairing_rates(model, sites, x, layers, fold, perms, (receiver, source), targets, tc,
                             controls=role == "candidate")
        for k, v in got.items():
            rates[k][i] = v
    attr = _attribute_check(model, pairs, plan, layers, sites, fold, tc, name, progress)
    ceiling = torch.stack([_success(model, sites, layer, receiver, sites.y[li, source], targets, tc.batch_size)
                           for li, layer in enumerate(layers)])
    return RouteFamilyReport(
        name=name, pairs=tuple({"prompt": p.prompt, "input": p.input_text, "concept": p.concept, "answer": p.answer,
                                **({"attribute": p.attribute} if p.attribute else {})} for p in pairs),
        pairings=tuple(n for n, _, _, _ in plan), roles=tuple(r for _, r, _, _ in plan),
        classes=tuple(c for _, _, c, _ in plan), concepts=tuple(c for _, _, _, c in plan), layers=layers,
        receiver=receiver, source=source, fold=fold, fitted=rates["fitted"], shuffled=rates["shuffled"],
        identity=rates["identity"], random=rates["random"], ceiling=ceiling, config=config.to_dict(),
        manifest=_manifest(model, pairs, config), **attr)


def _attribute_check(model: Any, pairs: Sequence[TransplantPair], plan: Sequence[tuple[str, str, str, tuple[str, ...]]],
                     layers: tuple[int, ...], sites: _Sites, fold: Tensor, tc: TransplantConfig, name: str,
                     progress: bool) -> dict[str, Tensor]:
    """Step 10 for every candidate pairing (NaN rows for competitors); ``{}`` without an attribute template."""
    from tqdm.auto import tqdm

    if not tc.attribute_template:
        return {}
    attr_ids = torch.tensor([_first_id(model, p.attribute) for p in pairs])
    receiver, source = _units(fold, attr_ids)
    shape = (len(plan), len(layers), len(receiver))
    out = {f"attr_{k}": torch.full(shape, float("nan")) for k in ("fitted", "shuffled", "ceiling")}
    for i, (_, role, _, concepts) in enumerate(tqdm(plan, desc=f"attribute {name}", disable=not progress)):
        if role == "candidate":
            got = _attribute_pairing_rates(model, pairs, concepts, layers, sites, fold, (receiver, source), tc)
            for k, v in got.items():
                out[f"attr_{k}"][i] = v
    return {"attr_receiver": receiver, "attr_source": source, **out}


def _manifest(model: Any, pairs: Sequence[TransplantPair], config: FamilyConfig) -> dict[str, Any]:
    from recallscope.manifest import build_manifest

    return build_manifest(model, [p.prompt for p in pairs], config.to_dict(), seed=config.transplant.seed)


