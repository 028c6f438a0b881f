"""Second-attribute check of the concept transplant: does the site hold the concept, or only its answer?

The forward transplant (:mod:`recallscope.routes.transplant`, steps 1-8) reads only the answer: a site
that holds the concept's *answer* in a code the concept states share (an "answer code": a rote model
whose read site carries the letter) passes it as well as a site that holds the concept. The concept has
attributes other than the answer (in the mnemonic organisms its *kind*: ``<s> VAT kind`` -> ``animal``).
A site that holds the concept can stand in for the concept where that other attribute is read; a site
that holds only the answer cannot, because the attribute is not a function of the answer.

Reverse transplant (``A`` = the attribute; :func:`prepare_attribute` does R1-R2 once per model and pair
family, :func:`attribute_rates` R3-R4 per query and layer; the verdict, R5, is in
:func:`recallscope.routes.transplant.transplant_score`):

R1. Attribute prompts. ``TransplantConfig.attribute_template`` holds ``{concept}`` once (organisms:
    ``"{concept} kind"``); pair ``i``'s prompt is the template with its concept, its target the first
    token of ``TransplantPair.attribute`` (`` animal``). ``z_i`` = the residual entering each layer at the
    concept's last token in that prompt (the concept's own state where its attribute is read).
R2. Reverse maps. The same folds as the forward maps: per layer and fold ``k`` a centred ridge map
    ``V_k: y -> z`` (the input's *site* state to the concept's state) fitted only on pairs outside ``k``,
    and ``n_shuffles`` maps fitted on deranged pairings of the same pairs (the arbitrary-label control).
R3. Units for query ``q`` in fold ``k``, over the other pairs ``j`` of fold ``k`` whose attribute differs
    from ``q``'s: (a) ``V_k y_q`` into ``j``'s attribute prompt at the concept position (target
    ``A(q)``); (b) ``V_k y_j`` into ``q``'s attribute prompt (target ``A(j)``). Held out as in the forward.
R4. Per unit: argmax success with the fitted map, the shuffled maps (mean), the identity (``y`` itself,
    unmapped), a norm-matched random state around the fit's mean, and the ceiling (the source concept's
    own state ``z``: tells whether the attribute prompt reads the concept position at this layer).
R5. A route needs both directions at one site: per layer ``s_L = min(forward mean d, reverse mean d)``
    (``d`` = fitted - shuffled); the layer with the largest ``s_L`` is reported; each direction has its
    own sign-flip test with the maximum over layers as the statistic and the verdict needs both
    (intersection-union test: ``p = max(p_forward, p_reverse)``, valid without correction).

An answer-code site fails R4 because a held-out concept's attribute cannot be read off its answer (the
attribute must not be predictable from the answer: choose one that varies independently, as the
organisms' kinds do). A bypassed site (the concept is readable but not read) passes R4 and fails the
forward transplant; only a site that carries the concept *and* is read passes both.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError

PLACEHOLDER = "{concept}"


@dataclass(frozen=True)
class AttributePrep:
    """Attribute prompts, concept states in them and the reverse maps (R1-R2)."""

    tokens: tuple[tuple[int, ...], ...]
    """Each pair's attribute prompt (BOS prepended)."""
    pos: tuple[int, ...]
    """Position of the concept's last token in each attribute prompt."""
    concept_z: Float[Tensor, "layer pair d_model"]
    attr_ids: Int[Tensor, " pair"]
    maps: Float[Tensor, "layer fold map d_model d_model"]
    """map 0: fitted on the true pairing (site -> concept); maps 1..: shuffled pairings."""
    y_mean: Float[Tensor, "layer fold map d_model"]
    z_mean: Float[Tensor, "layer fold map d_model"]


def check_attribute_spec(pairs: Sequence[Any], template: str) -> bool:
    """Validate the attribute specification; True when the attribute check can run (a template is given).
    Raises :class:`ConfigError` naming the problem and the fix."""
    given = [p for p in pairs if p.attribute]
    if not template:
        if given:
            raise ConfigError(f"{len(given)} pairs carry an attribute but TransplantConfig.attribute_template is "
                              "empty; give the prompt that reads it, e.g. attribute_template='{concept} kind', or "
                              "drop the attributes.")
        return False
    if template.count(PLACEHOLDER) != 1:
        raise ConfigError(f"attribute_template {template!r} must contain {PLACEHOLDER} exactly once (where the "
                          "concept goes), e.g. '{concept} kind' or 'The {concept} is a kind of'.")
    missing = [p.input_text for p in pairs if not p.attribute]
    if missing:
        raise ConfigError(f"attribute_template is set but {len(missing)} pairs have no attribute (e.g. "
                          f"{missing[:3]}); give every TransplantPair its concept's answer to the template.")
    same = [p.input_text for p in pairs if p.attribute.strip() == p.answer.strip()]
    if same:
        raise ConfigError(f"the attribute equals the answer for {same[:3]}: the check needs another attribute of "
                          "the concept than the answer (one not predictable from the answer).")
    if len({p.attribute.strip() for p in pairs}) < 2:
        raise ConfigError("every pair has the same attribute; the check needs concepts whose attributes differ.")
    return True


def _attribute_prompt(model: Any, template: str, concept: str) -> tuple[list[int], int]:
    head = template[:template.index(PLACEHOLDER)] + concept
    tokens = model.to_tokens(template.replace(PLACEHOLDER, concept))[0].tolist()
    pos = model.to_tokens(head).shape[1] - 1
    if tokens[:pos + 1] != model.to_tokens(head)[0].tolist():
        raise ConfigError(f"the concept {concept!r} does not tokenise the same inside the attribute prompt "
                          f"{template!r}; put a space or punctuation after {PLACEHOLDER}.")
    return tokens, pos


def _groups(tokens: Sequence[Sequence[int]], pos: Sequence[int], idx: Tensor) -> dict[tuple[int, int], Tensor]:
    """Indices into ``idx`` grouped by (prompt length, concept position), so each group is one batch."""
    out: dict[tuple[int, int], list[int]] = {}
    for u, i in enumerate(idx.tolist()):
        out.setdefault((len(tokens[i]), pos[i]), []).append(u)
    return {k: torch.tensor(v) for k, v in out.items()}


def prepare_attribute(model: Any, pairs: Sequence[Any], layers: Sequence[int], site_y: Float[Tensor, "layer pair d"],
                      fold: Tensor, config: Any) -> AttributePrep | None:
    """R1-R2 (None when ``config.attribute_template`` is empty)."""
    from recallscope.routes.transplant import _derangement, _first_id, fit_map, states_at

    if not check_attribute_spec(pairs, config.attribute_template):
        return None
    prompts = [_attribute_prompt(model, config.attribute_template, p.concept) for p in pairs]
    tokens = tuple(tuple(t) for t, _ in prompts)
    pos = tuple(s for _, s in prompts)
    z = torch.zeros(site_y.shape)
    for (_, at), members in _groups(tokens, pos, torch.arange(len(pairs))).items():
        z[:, members] = states_at(model, torch.tensor([tokens[i] for i in members.tolist()]), at, layers)
    gen = torch.Generator().manual_seed(config.seed + 1)
    n_maps, d = 1 + config.n_shuffles, site_y.shape[-1]
    maps = torch.zeros(len(layers), config.n_folds, n_maps, d, d)
    ym = torch.zeros(len(layers), config.n_folds, n_maps, d)
    zm = torch.zeros_like(ym)
    for k in range(config.n_folds):
        train = (fold != k).nonzero().squeeze(1)
        perms = [torch.arange(len(train))] + [_derangement(len(train), gen) for _ in range(config.n_shuffles)]
        for li in range(len(layers)):
            for m, perm in enumerate(perms):
                maps[li, k, m], ym[li, k, m], zm[li, k, m] = fit_map(site_y[li, train], z[li, train[perm]],
                                                                     config.ridge)
    attr_ids = torch.tensor([_first_id(model, p.attribute) for p in pairs])
    return AttributePrep(tokens, pos, z, attr_ids, maps, ym, zm)


def attribute_units(prep: Any, q: int) -> tuple[Tensor, Tensor]:
    """``(receiver, source)`` pair indices of the query's reverse units (R3)."""
    attr = prep.attribute
    k = prep.fold[q]
    others = [j for j in (prep.fold == k).nonzero().squeeze(1).tolist()
              if j != q and int(attr.attr_ids[j]) != int(attr.attr_ids[q])]
    receiver = torch.tensor(others + [q] * len(others), dtype=torch.long)
    source = torch.tensor([q] * len(others) + others, dtype=torch.long)
    return receiver, source


def attribute_rates(model: Any, prep: Any, li: int, receiver: Tensor, source: Tensor, seed: int
                    ) -> dict[str, Tensor]:
    """Per-unit success of every variant of the reverse transplant at one layer (R4)."""
    from recallscope.routes.transplant import transplant_logits

    attr: AttributePrep = prep.attribute
    k = int(prep.fold[source[0]])
    y, target = prep.site_y[li, source], attr.attr_ids[source]
    mapped = [attr.z_mean[li, k, m] + (y - attr.y_mean[li, k, m]) @ attr.maps[li, k, m]
              for m in range(attr.maps.shape[2])]
    gen = torch.Generator().manual_seed(seed + 7919 * li + 17 * int(source[0]) + 1)
    r = torch.randn(mapped[0].shape, generator=gen)
    zm = attr.z_mean[li, k, 0]
    rand = zm + r / r.norm(dim=-1, keepdim=True) * (mapped[0] - zm).norm(dim=-1, keepdim=True)
    states = {"fitted": mapped[0], "identity": y, "random": rand, "ceiling": attr.concept_z[li, source]}
    states.update({f"shuffled{m}": mapped[m] for m in range(1, len(mapped))})
    out = {name: torch.zeros(len(receiver)) for name in states}
    for (_, at), members in _groups(attr.tokens, attr.pos, receiver).items():
        tokens = torch.tensor([attr.tokens[i] for i in receiver[members].tolist()])
        for name, st in states.items():
            logits = transplant_logits(model, tokens, at, prep.layers[li], st[members])
            out[name][members] = (logits.argmax(-1) == target[members]).float()
    out["shuffled"] = torch.stack([out.pop(f"shuffled{m}") for m in range(1, len(mapped))]).mean(0)
    return out


def joint_ci(forward: Float[Tensor, " unit"], reverse: Float[Tensor, " unit2"], n_boot: int, seed: int
             ) -> tuple[float, float]:
    """Percentile bootstrap CI of ``min(mean forward, mean reverse)`` (units resampled within each direction)."""
    gen = torch.Generator().manual_seed(seed)
    f = forward[torch.randint(0, forward.shape[0], (n_boot, forward.shape[0]), generator=gen)].mean(1)
    r = reverse[torch.randint(0, reverse.shape[0], (n_boot, reverse.shape[0]), generator=gen)].mean(1)
    m = torch.minimum(f, r)
    return float(m.quantile(0.025)), float(m.quantile(0.975))
