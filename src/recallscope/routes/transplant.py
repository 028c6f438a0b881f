"""Held-out concept transplant: does the input's site state *work as* the concept's own representation?

A model routes ``input -> concept -> answer`` when the state at the input's site can be replaced by (a
linear image of) the concept's **own** representation (its state where the concept itself is the text,
the context the route detector builds concept directions in) and the output then follows the
transplanted concept's answer. The user supplies the hypothesis as a family of :class:`TransplantPair`
(input prompt, input, concept, answer), e.g. every chunk of a mnemonic world with its linked concept.

Algorithm (:func:`prepare_transplant` computes steps 1-3 once per model and pair family;
:func:`transplant_score` runs 4-8 for one query pair):

1. States. For every pair ``i`` and every layer ``L`` in ``config.layers`` (default: every block's
   residual input): ``y_i`` = the residual entering ``L`` at the input's last token in the input prompt
   (the *site*), ``x_i`` = the residual entering ``L`` at the concept's last token in
   ``concept_prefix + concept`` (the concept's own state).
2. Cross-fitted folds. The pairs are split into ``n_folds`` folds (seeded permutation). For fold ``k`` a
   map ``W_k: x -> y`` is fitted on the pairs **outside** ``k`` only: centred ridge regression
   ``y ~ m_y + (x - m_x) A`` with ``lambda = ridge * tr(Xc^T Xc) / d`` (scale-free). Because every
   evaluation pair is outside the fit, a map that merely memorises the training pairing (a linear map can
   fit almost any pairing of 50 points in 32 dimensions) earns nothing on the evaluation pairs.
3. Arbitrary-label control. ``n_shuffles`` maps per fold are fitted the same way on the training pairs
   with the concepts permuted (no pair keeps its own concept): the same capacity, no true pairing.
4. Units. For the query pair ``q`` in fold ``k`` and every other pair ``j`` of fold ``k`` whose answer
   differs from ``q``'s: (a) transplant ``W_k x_j`` into ``q``'s site (target: ``answer(j)``); (b)
   transplant ``W_k x_q`` into ``j``'s site (target: ``answer(q)``). Both the receiving site and the
   transplanted concept are held out of the fit.
5. Per unit and layer: ``success`` = 1 when the argmax next token after the transplant is the target; the
   same with every shuffled map (mean over shuffles), with a norm-matched random state ``m_y + r``
   (``||r|| = ||W_k x - m_y||``), with the identity map (``x`` itself, unfitted) and with the receiving
   pair's own state replaced by the *source pair's site state* (the input-itself ceiling: another input's
   state always carries that input's answer, so it bounds what a transplant can reach; it is not a
   competitor to beat). Also the log-probability of the target after the fitted transplant.
   5b. Answer-code diagnostic (reported, not in the verdict): when every pair names a ``decoy`` (another
   concept with the same answer), a map fitted per fold from the decoys' states to the site states, applied
   to the held-out true concept. A site that holds only an answer code shared with the concepts is fitted
   as well from decoys as from the true concepts; the verdict cannot see that (see below).
6. Score per layer: mean over units of ``d_u = success_fitted - success_shuffled`` (the held-out transplant
   rate above the arbitrary-label control). The reported score is the maximum over layers.
7. Test: paired sign-flip test of ``d_u`` over units with the **maximum over layers** as the statistic
   (the same flips at every layer, so choosing the best layer is paid for); exact when ``2^n <= n_perm``,
   else ``n_perm`` random draws; ``p = (1 + #{null >= observed}) / (1 + draws)``. CI: percentile
   bootstrap over units of the mean ``d_u`` at the chosen layer.
8. Verdict: ``route`` iff ``p <= alpha`` and ``score >= min_score``; ``no route`` iff the CI's upper end
   is below ``min_score``; else ``inconclusive``.
9. Answer-code competitor (:mod:`recallscope.routes.transplant_attr`). Steps 4-8 read only the answer.
   With ``config.attribute_template`` and every pair's ``attribute`` (another attribute of the concept,
   e.g. its kind), the reverse transplant maps the *site* state back into the concept's own context,
   where that attribute is read, held out and against shuffled-pairing maps; a route then needs both
   directions at one layer (score = max over layers of min(forward, reverse); p = max of the two
   max-over-layers sign-flip p-values, an intersection-union test). Without an attribute the
   answer-code competitor is not ruled out: ``answer_code`` says so and, with ``require_attribute``
   (default), a forward "route" is reported as ``inconclusive``.

Layers: by default every block's residual input from ``min_layer = 1`` on. At layer 0 (the token
embedding) the concept's "state" is its token embedding, so a transplant there is a token substitution
(the concept's token in the input's place), which a rote model answers from the letter features the
tokens share; on the organisms every false route of the first design was at layer 0.

What this can and cannot tell (measured on the organisms, see the project notes): it needs the site to be
read (bypassed states fail step 5) and the site's state to be a *linear image of the concept's own state
that generalises to concepts outside the fit* (rote chunk states are not). It sees a route held in a
rotated basis (the fitted map learns the rotation). Steps 4-8 read only the answer, so a model whose
input and concept states both carry the *answer* in a shared linear code passes them as well (measured:
the ``answer-at-site`` organisms); step 9 is what separates "the site holds the concept" from "the site
holds the concept's answer", provided the attribute is not predictable from the answer.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError

Verdict = Literal["route", "no route", "inconclusive"]


@dataclass(frozen=True)
class TransplantPair:
    """One hypothesised route: ``prompt`` contains ``input_text``; ``concept`` is its concept; ``answer``
    the expected next token (its first token is the target)."""

    prompt: str
    input_text: str
    concept: str
    answer: str
    decoy: str = ""
    """Optional: another concept with the same answer that is NOT the hypothesised one (answer-code
    diagnostic, step 5b; used only when every pair has one)."""
    attribute: str = ""
    """Optional: the concept's answer to ``TransplantConfig.attribute_template`` (another attribute than
    ``answer``, e.g. its kind; step 9). Needed, for every pair, to rule out the answer-code competitor."""


@dataclass(frozen=True)
class TransplantConfig:
    """Every setting of the transplant score (fixed before it was run on the held-out families)."""

    n_folds: int = 5
    ridge: float = 0.1
    """Ridge strength relative to the mean eigenvalue of the centred concept-state covariance."""
    n_shuffles: int = 3
    layers: tuple[int, ...] | None = None
    """Residual inputs of these blocks; None: every block from ``min_layer`` on."""
    min_layer: int = 1
    """With ``layers`` None: the first block scored. 1 (default) skips the token embedding, where a
    transplant is a token substitution (the concept's token in the input's place), not a computed state."""
    concept_prefix: str = ""
    """The concept's own context (the route detector's neutral prefix; the organisms': none)."""
    n_perm: int = 1999
    n_boot: int = 1000
    alpha: float = 0.05
    min_score: float = 0.5
    seed: int = 0
    batch_size: int = 256
    attribute_template: str = ""
    """Step 9: a prompt with ``{concept}`` once, after which the model gives the concept's ``attribute``
    (organisms: ``"{concept} kind"``). Empty: no attribute check (the answer-code competitor stays open)."""
    require_attribute: bool = True
    """Without the attribute check, report a forward "route" as "inconclusive" (the answer-code competitor
    is not ruled out). False: the forward verdict (steps 4-8) alone, labelled ``answer_code`` "not tested"."""

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ConfigError(f"n_folds must be >= 2 (cross-fitting), not {self.n_folds}.")
        if self.ridge < 0 or self.n_shuffles < 1 or self.n_perm < 199:
            raise ConfigError("need ridge >= 0, n_shuffles >= 1 and n_perm >= 199 (p must reach below alpha).")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransplantConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"[transplant] keys {unknown} are not TransplantConfig fields; known: {sorted(known)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class TransplantPrep:
    """States, folds and fitted maps of one model and pair family (steps 1-3)."""

    pairs: tuple[TransplantPair, ...]
    layers: tuple[int, ...]
    site_tokens: Int[Tensor, "pair pos"]
    site_pos: int
    concept_x: Float[Tensor, "layer pair d_model"]
    site_y: Float[Tensor, "layer pair d_model"]
    answer_ids: Int[Tensor, " pair"]
    fold: Int[Tensor, " pair"]
    maps: Float[Tensor, "layer fold map d_model d_model"]
    """map 0: fitted on the true pairing; maps 1..: shuffled pairings."""
    x_mean: Float[Tensor, "layer fold map d_model"]
    y_mean: Float[Tensor, "layer fold map d_model"]
    decoy: tuple[Tensor, Tensor, Tensor] | None = None
    """``(A, m_x, m_y)`` per layer and fold of the map fitted on the decoy pairing (step 5b), or None."""
    attribute: Any = None
    """Step 9's :class:`~recallscope.routes.transplant_attr.AttributePrep`, or None (no attribute given)."""


@dataclass(frozen=True)
class TransplantResult:
    """Step 6-8 for one query pair (rates are means over units at the chosen layer)."""

    concept: str
    input_text: str
    verdict: Verdict
    score: float
    ci: tuple[float, float]
    p_value: float
    layer: int
    n_units: int
    fitted: float
    shuffled: float
    identity: float
    random: float
    ceiling: float
    logprob: float
    per_layer: dict[int, float]
    decoy: float = float("nan")
    """Step 5b: held-out success through the map fitted on the decoy (same-answer) pairing (NaN: no decoys)."""
    answer_code: str = "not tested"
    """Step 9: "ruled out" (the reverse transplant carries the concept's other attribute at the reported
    layer: p <= alpha and its score >= min_score), "not ruled out", or "not tested" (no attribute given)."""
    forward_score: float = float("nan")
    """Steps 4-8 alone: the forward score (max over layers), its p and its verdict."""
    forward_p: float = float("nan")
    forward_verdict: str = ""
    attr_score: float = float("nan")
    """Step 9 at the reported layer: reverse success fitted - shuffled, and the success rates."""
    attr_p: float = float("nan")
    attr_fitted: float = float("nan")
    attr_shuffled: float = float("nan")
    attr_identity: float = float("nan")
    attr_random: float = float("nan")
    attr_ceiling: float = float("nan")
    attr_units: int = 0
    attr_per_layer: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ steps 1-3
def _first_id(model: Any, text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if ids.numel() == 0:
        raise ConfigError(f"answer {text!r} encodes to no token; give a non-empty answer.")
    return int(ids[0])


def site_position(model: Any, pair: TransplantPair) -> int:
    """The site: the position of the last token of the input's first occurrence in the prompt (BOS counted)."""
    end = pair.prompt.find(pair.input_text)
    if end < 0:
        raise ConfigError(f"input {pair.input_text!r} is not in its prompt {pair.prompt!r}.")
    return int(model.to_tokens(pair.prompt[:end + len(pair.input_text)]).shape[1]) - 1


def _site(model: Any, pair: TransplantPair) -> tuple[list[int], int]:
    return model.to_tokens(pair.prompt)[0].tolist(), site_position(model, pair)


def states_at(model: Any, tokens: Int[Tensor, "b pos"], pos: Int[Tensor, " b"] | int, layers: Sequence[int]
              ) -> Float[Tensor, "layer b d_model"]:
    """Residual entering each of ``layers`` at ``pos`` (per row)."""
    from recallscope.organisms.core import resid_pre

    rows = torch.arange(tokens.shape[0])
    with torch.no_grad():
        return torch.stack([resid_pre(model, tokens, layer)[rows, pos] for layer in layers])


def transplant_logits(model: Any, tokens: Int[Tensor, "b pos"], pos: int, layer: int,
                      state: Float[Tensor, "b d_model"]) -> Float[Tensor, "b vocab"]:
    """Next-token logits of ``tokens`` with the residual entering ``layer`` at ``pos`` set to ``state``."""
    from recallscope.models.forward import forward
    from recallscope.models.selfcheck import checked_stack
    from recallscope.organisms.core import resid_pre

    with torch.no_grad():
        h = resid_pre(model, tokens, layer).clone()
        h[:, pos] = state.to(h.dtype)
        logits, _ = forward(checked_stack(model, "the concept transplant"), h, start_layer=layer)
    return logits[:, -1]


def fit_map(x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"], ridge: float
            ) -> tuple[Float[Tensor, "d_in d_out"], Float[Tensor, " d_in"], Float[Tensor, " d_out"]]:
    """Centred ridge regression ``y ~ m_y + (x - m_x) A``; returns ``(A, m_x, m_y)``."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().sum() / gram.shape[0]
    a = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    return a.float(), mx.float(), my.float()


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    while True:
        perm = torch.randperm(n, generator=gen)
        if n < 2 or not bool((perm == torch.arange(n)).any()):
            return perm


def prepare_transplant(model: Any, pairs: Sequence[TransplantPair], config: TransplantConfig = TransplantConfig()
                       ) -> TransplantPrep:
    """Steps 1-3 of the module doc (all input prompts must tokenise to one length with one site position)."""
    pairs = tuple(pairs)
    if len(pairs) < 2 * config.n_folds:
        raise ConfigError(f"{len(pairs)} pairs are too few for {config.n_folds} folds (need >= 2 per fold).")
    from recallscope.routes.transplant_attr import check_attribute_spec

    check_attribute_spec(pairs, config.attribute_template)  # bad attribute specs fail before any forward pass
    sites = [_site(model, p) for p in pairs]
    if len({(len(t), s) for t, s in sites}) != 1:
        raise ConfigError("every input prompt must have the same token length and input position; "
                          "group the pairs by prompt shape and score each group.")
    layers = tuple(range(config.min_layer, model.cfg.n_layers)) if config.layers is None else tuple(config.layers)
    if not layers:
        raise ConfigError(f"no layer to score (min_layer {config.min_layer}, model has {model.cfg.n_layers}).")
    site_tokens = torch.tensor([t for t, _ in sites])
    site_pos = sites[0][1]
    concept_seqs = [model.to_tokens(config.concept_prefix + p.concept)[0] for p in pairs]
    y = states_at(model, site_tokens, site_pos, layers)
    x = torch.stack([states_at(model, s[None], s.shape[0] - 1, layers)[:, 0] for s in concept_seqs], dim=1)
    gen = torch.Generator().manual_seed(config.seed)
    fold = torch.empty(len(pairs), dtype=torch.long)
    fold[torch.randperm(len(pairs), generator=gen)] = torch.arange(len(pairs)) % config.n_folds
    d = x.shape[-1]
    maps = torch.zeros(len(layers), config.n_folds, 1 + config.n_shuffles, d, d)
    mx = torch.zeros(len(layers), config.n_folds, 1 + config.n_shuffles, d)
    my = torch.zeros_like(mx)
    for k in range(config.n_folds):
        train = (fold != k).nonzero().squeeze(1)
        perms = [torch.arange(len(train))] + [_derangement(len(train), gen) for _ in range(config.n_shuffles)]
        for li in range(len(layers)):
            for m, perm in enumerate(perms):
                maps[li, k, m], mx[li, k, m], my[li, k, m] = fit_map(x[li, train[perm]], y[li, train], config.ridge)
    answers = torch.tensor([_first_id(model, p.answer) for p in pairs])
    decoy = _decoy_maps(model, pairs, layers, y, fold, config) if all(p.decoy for p in pairs) else None
    from recallscope.routes.transplant_attr import prepare_attribute

    attribute = prepare_attribute(model, pairs, layers, y, fold, config)
    return TransplantPrep(pairs, layers, site_tokens, site_pos, x, y, answers, fold, maps, mx, my, decoy, attribute)


def _decoy_maps(model: Any, pairs: Sequence[TransplantPair], layers: Sequence[int],
                y: Float[Tensor, "layer pair d_model"], fold: Tensor, config: TransplantConfig
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Step 5b: per layer and fold, the map fitted from each training pair's decoy state to its site state."""
    seqs = [model.to_tokens(config.concept_prefix + p.decoy)[0] for p in pairs]
    xd = torch.stack([states_at(model, t[None], t.shape[0] - 1, layers)[:, 0] for t in seqs], dim=1)
    d = y.shape[-1]
    a = torch.zeros(len(layers), config.n_folds, d, d)
    mx, my = torch.zeros(len(layers), config.n_folds, d), torch.zeros(len(layers), config.n_folds, d)
    for k in range(config.n_folds):
        train = (fold != k).nonzero().squeeze(1)
        for li in range(len(layers)):
            a[li, k], mx[li, k], my[li, k] = fit_map(xd[li, train], y[li, train], config.ridge)
    return a, mx, my


# ------------------------------------------------------------------------------------------ steps 4-8
def _units(prep: TransplantPrep, q: int) -> tuple[Tensor, Tensor]:
    """``(receiver, source)`` pair indices of the query's units (step 4)."""
    k = prep.fold[q]
    others = [j for j in (prep.fold == k).nonzero().squeeze(1).tolist()
              if j != q and int(prep.answer_ids[j]) != int(prep.answer_ids[q])]
    receiver = torch.tensor([q] * len(others) + others, dtype=torch.long)
    source = torch.tensor(others + [q] * len(others), dtype=torch.long)
    return receiver, source


def _mapped(prep: TransplantPrep, li: int, k: int, m: int, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    return prep.y_mean[li, k, m] + (x - prep.x_mean[li, k, m]) @ prep.maps[li, k, m]


def _layer_rates(model: Any, prep: TransplantPrep, li: int, receiver: Tensor, source: Tensor,
                 config: TransplantConfig) -> dict[str, Tensor]:
    """Per-unit success of every variant at one layer (step 5)."""
    k = int(prep.fold[receiver[0]])
    x, target = prep.concept_x[li, source], prep.answer_ids[source]
    fitted = _mapped(prep, li, k, 0, x)
    gen = torch.Generator().manual_seed(config.seed + 7919 * li + int(receiver[0]))
    r = torch.randn(fitted.shape, generator=gen)
    my = prep.y_mean[li, k, 0]
    rand = my + r / r.norm(dim=-1, keepdim=True) * (fitted - my).norm(dim=-1, keepdim=True)
    states = {"fitted": fitted, "identity": x, "random": rand, "ceiling": prep.site_y[li, source]}
    states.update({f"shuffled{m}": _mapped(prep, li, k, m, x) for m in range(1, prep.maps.shape[2])})
    if prep.decoy is not None:
        a, dmx, dmy = (t[li, k] for t in prep.decoy)
        states["decoy"] = dmy + (x - dmx) @ a
    tokens = prep.site_tokens[receiver]
    out: dict[str, Tensor] = {}
    for name, st in states.items():
        logits = transplant_logits(model, tokens, prep.site_pos, prep.layers[li], st)
        out[name] = (logits.argmax(-1) == target).float()
        if name == "fitted":
            out["logprob"] = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    out["shuffled"] = torch.stack([out.pop(f"shuffled{m}") for m in range(1, prep.maps.shape[2])]).mean(0)
    return out


def max_sign_flip_p(diff: Float[Tensor, "layer unit"], n_perm: int, seed: int) -> float:
    """Sign-flip p of the max over layers of the mean paired difference (the same flips at every layer);
    exact when ``2^units <= n_perm``."""
    n = diff.shape[1]
    obs = diff.mean(1).max()
    if 2 ** n <= n_perm:
        codes = torch.arange(2 ** n)
        signs = ((codes[:, None] >> torch.arange(n)) & 1).float() * 2 - 1
        null = (signs @ diff.T / n).max(1).values
        return float((null >= obs - 1e-12).float().mean())
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_perm, n), generator=gen).float() * 2 - 1
    null = (signs @ diff.T / n).max(1).values
    return (1 + int((null >= obs - 1e-12).sum())) / (1 + n_perm)


def _boot_ci(d: Float[Tensor, " unit"], n_boot: int, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.shape[0], (n_boot, d.shape[0]), generator=gen)
    means = d[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def verdict_of(score: float, p: float, ci_hi: float, config: TransplantConfig) -> Verdict:
    """Step 8 of the module doc."""
    if p <= config.alpha and score >= config.min_score:
        return "route"
    return "no route" if ci_hi < config.min_score else "inconclusive"


def transplant_score(model: Any, prep: TransplantPrep, query: int | str,
                     config: TransplantConfig = TransplantConfig()) -> TransplantResult:
    """Steps 4-9 for the pair ``query`` (index, or its ``input_text``)."""
    if isinstance(query, str):
        names = [p.input_text for p in prep.pairs]
        if query not in names:
            raise ConfigError(f"{query!r} is not an input of the prepared pairs; known: {names[:8]}...")
        query = names.index(query)
    receiver, source = _units(prep, query)
    if receiver.numel() < 2:
        raise ConfigError(f"pair {query} has fewer than 2 units in its fold; use fewer folds or more pairs.")
    rates = [_layer_rates(model, prep, li, receiver, source, config) for li in range(len(prep.layers))]
    diff: Float[Tensor, "layer unit"] = torch.stack([r["fitted"] - r["shuffled"] for r in rates])
    means = diff.mean(1)
    p_fwd = max_sign_flip_p(diff, config.n_perm, config.seed)
    fwd_best = int(means.argmax())
    fwd_verdict = verdict_of(float(means[fwd_best]), p_fwd, _boot_ci(diff[fwd_best], config.n_boot, config.seed)[1],
                             config)
    extra: dict[str, Any] = {"forward_score": float(means[fwd_best]), "forward_p": p_fwd,
                             "forward_verdict": fwd_verdict}
    if prep.attribute is None:
        best, p, score = fwd_best, p_fwd, float(means[fwd_best])
        ci = _boot_ci(diff[best], config.n_boot, config.seed)
        verdict = fwd_verdict
        if config.require_attribute and verdict == "route":
            verdict = "inconclusive"
        extra["answer_code"] = "not tested"
    else:
        best, p, score, ci, verdict = _with_attribute(model, prep, query, config, diff, p_fwd, extra)
    r = rates[best]
    mean = lambda t: float(t.mean())  # noqa: E731
    pair = prep.pairs[query]
    return TransplantResult(pair.concept, pair.input_text, verdict, score, ci, p,
                            prep.layers[best], int(receiver.numel()), mean(r["fitted"]), mean(r["shuffled"]),
                            mean(r["identity"]), mean(r["random"]), mean(r["ceiling"]), mean(r["logprob"]),
                            {prep.layers[i]: float(m) for i, m in enumerate(means)},
                            mean(r["decoy"]) if "decoy" in r else float("nan"), **extra)


def _with_attribute(model: Any, prep: TransplantPrep, query: int, config: TransplantConfig,
                    diff: Float[Tensor, "layer unit"], p_fwd: float, extra: dict[str, Any]
                    ) -> tuple[int, float, float, tuple[float, float], Verdict]:
    """Step 9: reverse transplant of the concept's other attribute, the joint layer, score, p, CI, verdict
    (fills ``extra`` with the attr_* fields and ``answer_code``)."""
    from recallscope.routes.transplant_attr import attribute_rates, attribute_units, joint_ci

    receiver, source = attribute_units(prep, query)
    if receiver.numel() < 2:
        raise ConfigError(f"pair {query} has fewer than 2 pairs with another attribute in its fold; use fewer "
                          "folds, more pairs, or an attribute that varies more.")
    arates = [attribute_rates(model, prep, li, receiver, source, config.seed) for li in range(len(prep.layers))]
    adiff: Float[Tensor, "layer unit"] = torch.stack([r["fitted"] - r["shuffled"] for r in arates])
    joint = torch.minimum(diff.mean(1), adiff.mean(1))
    best = int(joint.argmax())
    p_attr = max_sign_flip_p(adiff, config.n_perm, config.seed + 1)
    attr_score = float(adiff[best].mean())
    a = arates[best]
    extra.update(attr_score=attr_score, attr_p=p_attr, attr_fitted=float(a["fitted"].mean()),
                 attr_shuffled=float(a["shuffled"].mean()), attr_identity=float(a["identity"].mean()),
                 attr_random=float(a["random"].mean()), attr_ceiling=float(a["ceiling"].mean()),
                 attr_units=int(receiver.numel()),
                 attr_per_layer={prep.layers[i]: float(m) for i, m in enumerate(adiff.mean(1))},
                 answer_code="ruled out" if p_attr <= config.alpha and attr_score >= config.min_score
                 else "not ruled out")
    score, p = float(joint[best]), max(p_fwd, p_attr)
    ci = joint_ci(diff[best], adiff[best], config.n_boot, config.seed)
    return best, p, score, ci, verdict_of(score, p, ci[1], config)


def transplant_report(model: Any, pairs: Sequence[TransplantPair], queries: Sequence[int | str] | None = None,
                      config: TransplantConfig = TransplantConfig()) -> list[TransplantResult]:
    """:func:`prepare_transplant` once, then :func:`transplant_score` for each query (default: every pair).
    No correction over queries: each result is one hypothesis; correct over them yourself if you pool."""
    prep = prepare_transplant(model, pairs, config)
    qs = range(len(prep.pairs)) if queries is None else queries
    return [transplant_score(model, prep, q, config) for q in qs]

