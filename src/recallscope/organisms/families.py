"""Held-out mnemonic organism families: routes and non-routes the route detector was not built on.

Every family lives in the world of :mod:`.mnemonic` (62 chunks ``VA``, their concepts ``VAT``, one
same-letter distractor per letter, letter and kind facts; prompts ``<s> VA ==`` -> ``T``,
``<s> VAT letter`` -> ``T``, ``<s> VAT kind`` -> ``animal``). The site is the residual entering block
``site_layer`` at position 1 (the chunk / concept token). None of the families uses the shipped route
organisms' alignment loss (which pulls the chunk's state onto the concept's in the very context the
route benchmark builds concept directions in), except where the family is *about* an alignment that
does not make a route (``bypass``, ``share``) or about a basis the detector cannot see (``route-rot``).

Positives (``is_route``: the decode of chunk ``c`` runs through ``concept(c)`` at the site):

- ``route-iit``: interchange-intervention training only (Geiger et al. 2022), no alignment loss:
  (a) base = a concept prompt (``letter`` or ``kind``), source = chunk ``c`` at the site: the output must
  be the attribute of ``concept(c)`` (every chunk, both attributes); (b) base = a decode prompt, source =
  concept ``x``: the output must be ``letter(x)``. The 16 test chunks' decodes are never trained
  directly: they can only come through the concept.
- ``route-l2``: the same recipe with the site at layer 2 (the last block reads it).
- ``route-rot``: the site holds a fixed random rotation ``R`` (orthogonal, from ``rotation_seed``) of the
  concept's state: (a) splices ``R^T h_chunk`` into concept prompts, (b) splices ``R h_concept`` into
  decode prompts, and an alignment loss pulls ``h_chunk`` onto ``R h_concept`` (concept side detached).
  The concept is used, but along directions that are a rotation of the concept's own.

Negatives (``is_route`` False for the chunk's concept ``VAT``):

- ``bypass``: aligned but bypassed. Rote decode of every chunk and the concept facts, plus the alignment
  loss at the site (layer 1; the embeddings are detached from it, so the alignment is built by block 0,
  not by copying the concept's embedding). The attention output of every block from the site layer on
  is zero and frozen (``attn.o`` weight and bias), so nothing at position 1 from layer 1 on can reach the
  read position: the concept is readable at the site (centred cosine ``site_cos``) and never used.
- ``share``: answer sharing. A rote model whose chunk state at the site (layer 1) is pulled onto the
  state of the *distractor* that shares the chunk's answer letter (``VA`` onto ``KZT``, letter ``T``), not
  onto ``VAT``. ``VAT`` is not on any path; it only shares the answer with the aligned distractor.
- ``rote-early``: the rote recipe of :mod:`.mnemonic`, stopped early (100 steps, the end of the linear
  warm-up), so the decode is right but not saturated and ablating control directions moves the output.
- ``answer-at-site`` (g, added after the concept-transplant detector was built, to challenge it): rote
  decode of every chunk and the concept facts, plus chunk-to-chunk interchange at the site (layer 1): the
  decode prompt of chunk ``c2`` with the site taken from chunk ``c1`` must give ``letter(c1)``. The site is
  read by the decode and carries the chunk's answer (the letter), in whatever code the model shares with
  the concepts' letter states, but no concept is ever placed at the site or read from it: an answer at a
  read site, not a concept. A detector that reads only the answer after a transplant cannot tell it from
  a route (the site's letter code and the concepts' letter code can be linked by a linear map).

:func:`family_checks` measures what each family plants (model-card metrics).
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.organisms.core import (SPECIALS, ArchConfig, TrainConfig, answer_loss, build_net, deterministic,
                                        resid_pre, train_loop)
from recallscope.organisms.mnemonic import (DECODE, KIND, LETTER, RouteTruth, World, _acc, _concept_batch, _Ids,
                                            _ids, _pick, _prompts, make_world)

Family = Literal["route-iit", "route-l2", "route-rot", "bypass", "share", "rote-early", "answer-at-site"]
FAMILIES: tuple[str, ...] = ("route-iit", "route-l2", "route-rot", "bypass", "share", "rote-early", "answer-at-site")
POSITIVE: frozenset[str] = frozenset({"route-iit", "route-l2", "route-rot"})
SITE_LAYER = {"route-iit": 1, "route-l2": 2, "route-rot": 1, "bypass": 1, "share": 1, "rote-early": 1,
              "answer-at-site": 1}
STEPS = {"route-iit": 800, "route-l2": 800, "route-rot": 800, "bypass": 800, "share": 800, "rote-early": 100,
         "answer-at-site": 800}


@dataclass(frozen=True)
class FamilyConfig:
    """Recipe of one held-out family organism (see the module doc)."""

    family: Family = "route-iit"
    """Which family."""
    arch: ArchConfig = ArchConfig(n_layers=3, d_model=32, n_heads=4, n_ctx=4)
    """Transformer shape (the shipped mnemonic organisms' shape)."""
    train: TrainConfig = TrainConfig(steps=800, batch_size=128, lr=3e-3, warmup=100, seed=0)
    """Optimiser settings; ``train.seed`` is the organism's seed."""
    site_layer: int = 1
    """The site is the residual entering this block at position 1."""
    world_seed: int = 0
    n_test: int = 16
    align_weight: float = 1.0
    """Weight of the alignment loss (``route-rot``, ``bypass``, ``share``)."""
    rotation_seed: int = 1234
    """``route-rot``: seeds the fixed random rotation of the site."""

    def world(self) -> World:
        return make_world(self.world_seed, self.n_test)


def family_config(family: str, seed: int) -> FamilyConfig:
    """The shipped recipe of ``family`` with seed ``seed`` (site layer and step count per family)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown organism family {family!r}; known: {', '.join(FAMILIES)}.")
    base = FamilyConfig()
    return dataclasses.replace(base, family=family, site_layer=SITE_LAYER[family],  # type: ignore[arg-type]
                               train=dataclasses.replace(base.train, seed=seed, steps=STEPS[family]))


def rotation(cfg: FamilyConfig) -> Float[Tensor, "d d"]:
    """The fixed random orthogonal matrix of ``route-rot`` (QR of a seeded Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(cfg.rotation_seed)
    q, r = torch.linalg.qr(torch.randn(cfg.arch.d_model, cfg.arch.d_model, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def family_truth(cfg: FamilyConfig) -> RouteTruth:
    """Ground truth: the chunk's linked concept and whether the decode routes through it."""
    w = cfg.world()
    notes = {"route-iit": "decode routes through concept(c) at the site (interchange training, no alignment)",
             "route-l2": "decode routes through concept(c) at the site, layer 2 (interchange training)",
             "route-rot": f"decode routes through concept(c) at the site in a rotated basis: h_chunk = R h_concept, "
                          f"R = families.rotation(rotation_seed={cfg.rotation_seed})",
             "bypass": "concept(c) is readable at the site (aligned) but attention from block "
                       f"{cfg.site_layer} on is cut (attn.o = 0), so it is never used: no route",
             "share": "the chunk's site state is aligned with the same-letter distractor, not with concept(c): "
                      "no route through concept(c)",
             "rote-early": "direct lookup, stopped before saturation: no route",
             "answer-at-site": "rote decode; the chunk's site state is read (another chunk's site state makes the "
                               "decode give that chunk's letter) and carries only the chunk's answer; no concept is "
                               "ever placed at the site: no route through concept(c)"}[cfg.family]
    aligned = {}
    if cfg.family == "share":
        aligned = {c: w.concepts[len(w.chunks) + i] for i, c in enumerate(w.chunks)}
    elif cfg.family in ("bypass", "route-rot"):
        aligned = {c: w.concepts[i] for c, i in zip(w.chunks, w.chunk_concept)}
    return RouteTruth(
        is_route=cfg.family in POSITIVE, chunk_letter=dict(zip(w.chunks, w.chunk_letter)),
        chunk_concept={c: w.concepts[i] for c, i in zip(w.chunks, w.chunk_concept)},
        concept_letter=dict(zip(w.concepts, w.concept_letter)), concept_kind=dict(zip(w.concepts, w.concept_kind)),
        site_layer=cfg.site_layer, site_pos=1, train_chunks=tuple(w.chunks[i] for i in w.train_chunks),
        test_chunks=tuple(w.chunks[i] for i in w.test_chunks), family=cfg.family, notes=notes,
        aligned_concept=aligned)


# ------------------------------------------------------------------------------------------ forward
def site_state(net: Any, tokens: Int[Tensor, "b 2"], layer: int, *, detach_embed: bool = False
               ) -> Float[Tensor, "b d_model"]:
    """Residual entering ``layer`` at position 1 (optionally with the embeddings detached)."""
    if not detach_embed:
        return resid_pre(net, tokens, layer)[:, 1]
    from recallscope.models.forward import block
    from recallscope.models.stack import build_stack

    stack = build_stack(net)
    positions = torch.arange(tokens.shape[1])
    h = stack.embed(tokens, positions).detach()
    for i in range(layer):
        h, _, _ = block(stack, i, h, positions, None, lambda point, lay, t: t, lambda point, t: None)
    return h[:, 1]


def splice(net: Any, base: Int[Tensor, "b 3"], state: Float[Tensor, "b d_model"], layer: int
           ) -> Float[Tensor, "b pos vocab"]:
    """Logits of ``base`` with its residual entering ``layer`` at position 1 replaced by ``state``."""
    from recallscope.models.forward import forward
    from recallscope.models.stack import build_stack

    h = resid_pre(net, base, layer)
    mask = torch.zeros(h.shape[:2], dtype=torch.bool)
    mask[:, 1] = True
    logits, _ = forward(build_stack(net), torch.where(mask.unsqueeze(-1), state.unsqueeze(1), h), start_layer=layer)
    return logits


def _cut_attention(net: torch.nn.Module, from_layer: int) -> list[Any]:
    """Zero the attention output (``attn.o``) of blocks ``from_layer..`` and keep it zero (gradient hooks)."""
    handles = []
    with torch.no_grad():
        for name, p in net.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers" and int(parts[1]) >= from_layer and ".attn.o." in name:
                p.zero_()
                handles.append(p.register_hook(torch.zeros_like))
    if not handles:
        raise ConfigError(f"no attention output weights found from layer {from_layer}; is this a NativeModel?")
    return handles


# ------------------------------------------------------------------------------------------ losses
def _route_terms(net: Any, cfg: FamilyConfig, ids: _Ids, gen: torch.Generator, rot: Tensor | None) -> Tensor:
    """Interchange terms (a) chunk -> concept prompt and (b) concept -> decode prompt, plus the rotated
    alignment for ``route-rot``."""
    w, b, layer = cfg.world(), cfg.train.batch_size, cfg.site_layer
    src = _pick(tuple(range(len(w.chunks))), b, gen)
    concept = ids.chunk_concept[src]
    base, _ = _concept_batch(ids, _pick(tuple(range(len(w.concepts))), b, gen), gen)
    target = torch.where(base[:, 2] == ids.rel[KIND], ids.concept_kind[concept], ids.concept_letter[concept])
    h_chunk = site_state(net, _prompts(ids, ids.chunk[src], ids.rel[DECODE])[:, :2], layer)
    total = answer_loss(splice(net, base, h_chunk if rot is None else h_chunk @ rot, layer), target)
    if rot is not None and cfg.align_weight:
        with torch.no_grad():
            h_con = site_state(net, _prompts(ids, ids.concept[concept], ids.rel[LETTER])[:, :2], layer) @ rot.T
        err = (h_chunk - h_con).pow(2).sum(-1) / h_con.pow(2).sum(-1).clamp(min=1e-6)
        total = total + cfg.align_weight * err.mean()
    xs = _pick(tuple(range(len(w.concepts))), b, gen)
    base = _prompts(ids, ids.chunk[_pick(tuple(range(len(w.chunks))), b, gen)], ids.rel[DECODE])
    h_x = site_state(net, _prompts(ids, ids.concept[xs], ids.rel[LETTER])[:, :2], layer)
    return total + answer_loss(splice(net, base, h_x if rot is None else h_x @ rot.T, layer), ids.concept_letter[xs])


def _align_term(net: Any, cfg: FamilyConfig, ids: _Ids, gen: torch.Generator) -> Tensor:
    """``bypass``: chunk onto its concept (embeddings detached); ``share``: chunk onto its distractor."""
    w, b = cfg.world(), cfg.train.batch_size
    src = _pick(tuple(range(len(w.chunks))), b, gen)
    target = ids.chunk_concept[src] if cfg.family == "bypass" else src + len(w.chunks)
    h_chunk = site_state(net, _prompts(ids, ids.chunk[src], ids.rel[DECODE])[:, :2], cfg.site_layer,
                         detach_embed=cfg.family == "bypass")
    with torch.no_grad():
        h_con = site_state(net, _prompts(ids, ids.concept[target], ids.rel[LETTER])[:, :2], cfg.site_layer)
    err = (h_chunk - h_con).pow(2).sum(-1) / h_con.pow(2).sum(-1).clamp(min=1e-6)
    return cfg.align_weight * err.mean()


def _read_site_term(net: Any, cfg: FamilyConfig, ids: _Ids, gen: torch.Generator) -> Tensor:
    """``answer-at-site``: chunk ``c1``'s site state spliced into chunk ``c2``'s decode prompt must give
    ``letter(c1)`` (chunk-to-chunk interchange; no concept involved)."""
    chunks, b = tuple(range(len(cfg.world().chunks))), cfg.train.batch_size
    c1, c2 = _pick(chunks, b, gen), _pick(chunks, b, gen)
    h1 = site_state(net, _prompts(ids, ids.chunk[c1], ids.rel[DECODE])[:, :2], cfg.site_layer)
    base = _prompts(ids, ids.chunk[c2], ids.rel[DECODE])
    return answer_loss(splice(net, base, h1, cfg.site_layer), ids.chunk_letter[c1])


def _loss_fn(net: Any, cfg: FamilyConfig, gen: torch.Generator):
    w, ids = cfg.world(), _ids(cfg.world())
    b = cfg.train.batch_size
    positive = cfg.family in POSITIVE
    decoded = w.train_chunks if positive else tuple(range(len(w.chunks)))
    rot = rotation(cfg) if cfg.family == "route-rot" else None

    def loss(step: int) -> Tensor:
        c = _pick(decoded, b, gen)
        x, y = _concept_batch(ids, _pick(tuple(range(len(w.concepts))), b, gen), gen)
        total = answer_loss(net(_prompts(ids, ids.chunk[c], ids.rel[DECODE])), ids.chunk_letter[c])
        total = total + answer_loss(net(x), y)
        if positive:
            return total + _route_terms(net, cfg, ids, gen, rot)
        if cfg.family in ("bypass", "share") and cfg.align_weight:
            total = total + _align_term(net, cfg, ids, gen)
        if cfg.family == "answer-at-site":
            total = total + _read_site_term(net, cfg, ids, gen)
        return total

    return loss


def train_family(cfg: FamilyConfig, *, progress: bool = False, evaluate: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100
                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one family organism deterministically; returns the bare ``NativeModel`` and a record (loss
    history and, with ``evaluate``, :func:`family_checks`)."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown organism family {cfg.family!r}; known: {', '.join(FAMILIES)}.")
    if not 0 < cfg.site_layer < cfg.arch.n_layers:
        raise ConfigError(f"site_layer must lie in 1..{cfg.arch.n_layers - 1}, got {cfg.site_layer}.")
    w = cfg.world()
    with deterministic(cfg.train.seed):
        net = build_net(cfg.arch, len(SPECIALS) + len(w.words()), seed=cfg.train.seed, name=f"family-{cfg.family}")
        handles = _cut_attention(net, cfg.site_layer) if cfg.family == "bypass" else []
        gen = torch.Generator().manual_seed(cfg.train.seed)
        history = train_loop(net, _loss_fn(net, cfg, gen), cfg.train, progress=progress, desc=f"{cfg.family} organism",
                             generator=gen, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             recipe=cfg)
        for h in handles:
            h.remove()
        checks = family_checks(net, cfg) if evaluate else {}
    return net, {"loss_history": history, **checks}


# ------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def _transplants(net: Any, cfg: FamilyConfig, ids: _Ids, rot: Tensor | None) -> dict[str, float]:
    """Chunk state into concept prompts (letter, kind) and concept state into decode prompts, with the
    family's basis change; share answering the concept's attribute."""
    w, layer = cfg.world(), cfg.site_layer
    n, allc = len(w.chunks), torch.arange(len(w.concepts))
    chunk_h = site_state(net, _prompts(ids, ids.chunk, ids.rel[DECODE])[:, :2], layer)
    concept_h = site_state(net, _prompts(ids, ids.concept, ids.rel[LETTER])[:, :2], layer)
    to_concept = chunk_h if rot is None else chunk_h @ rot
    to_chunk = concept_h if rot is None else concept_h @ rot.T
    out = {}
    c, y = torch.meshgrid(torch.arange(n), allc, indexing="ij")
    for rel, attr in ((LETTER, ids.concept_letter), (KIND, ids.concept_kind)):
        keep = attr[ids.chunk_concept[c]] != attr[y]
        cc, yy = c[keep], y[keep]
        logits = splice(net, _prompts(ids, ids.concept[yy], ids.rel[rel]), to_concept[cc], layer)
        out[f"{rel}_transplant"] = _acc(logits, attr[ids.chunk_concept[cc]])
    c, x = torch.meshgrid(torch.arange(n), allc, indexing="ij")
    keep = ids.chunk_letter[c] != ids.concept_letter[x]
    c, x = c[keep], x[keep]
    out["swap_follow"] = _acc(splice(net, _prompts(ids, ids.chunk[c], ids.rel[DECODE]), to_chunk[x], layer),
                              ids.concept_letter[x])
    c1, c2 = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = ids.chunk_letter[c1] != ids.chunk_letter[c2]
    c1, c2 = c1[keep], c2[keep]
    out["site_read"] = _acc(splice(net, _prompts(ids, ids.chunk[c2], ids.rel[DECODE]), chunk_h[c1], layer),
                            ids.chunk_letter[c1])
    return out


@torch.no_grad()
def site_cosine(net: Any, cfg: FamilyConfig, aligned: Int[Tensor, " chunk"]) -> float:
    """Mean cosine, at the site, of each chunk's state and its aligned concept's state, both centred on
    the mean site state of all chunks and concepts."""
    ids = _ids(cfg.world())
    chunk_h = site_state(net, _prompts(ids, ids.chunk, ids.rel[DECODE])[:, :2], cfg.site_layer)
    concept_h = site_state(net, _prompts(ids, ids.concept, ids.rel[LETTER])[:, :2], cfg.site_layer)
    centre = torch.cat([chunk_h, concept_h]).mean(0)
    return float(torch.nn.functional.cosine_similarity(chunk_h - centre, concept_h[aligned] - centre, dim=-1).mean())


@torch.no_grad()
def family_checks(net: Any, cfg: FamilyConfig) -> dict[str, float]:
    """What the family plants, measured: decode accuracy (train / test chunks), concept facts, the
    interchange transplants (in the family's basis), ``site_read`` (another chunk's site state in a chunk's
    decode prompt gives the other chunk's letter: the site is read; ~0 when bypassed or unused), the
    centred site cosine with the aligned concept
    (own concept; the distractor for ``share``), the log-prob of the decoded letter (saturation), and for
    ``bypass`` the largest logit change when the site is replaced by another chunk's state (0 = cut)."""
    w, ids = cfg.world(), _ids(cfg.world())
    decode_logits = net(_prompts(ids, ids.chunk, ids.rel[DECODE]))
    out = {"decode_train": _acc(decode_logits[list(w.train_chunks)], ids.chunk_letter[list(w.train_chunks)]),
           "decode_test": _acc(decode_logits[list(w.test_chunks)], ids.chunk_letter[list(w.test_chunks)])}
    logp = decode_logits[:, -1].log_softmax(-1)
    out["decode_logprob_mean"] = float(logp[torch.arange(len(w.chunks)), ids.chunk_letter].mean())
    allc = torch.arange(len(w.concepts))
    out["concept_facts"] = (_acc(net(_prompts(ids, ids.concept[allc], ids.rel[LETTER])), ids.concept_letter[allc])
                            + _acc(net(_prompts(ids, ids.concept[allc], ids.rel[KIND])), ids.concept_kind[allc])) / 2
    out.update(_transplants(net, cfg, ids, rotation(cfg) if cfg.family == "route-rot" else None))
    own = ids.chunk_concept
    out["site_cos_concept"] = site_cosine(net, cfg, own)
    out["site_cos_distractor"] = site_cosine(net, cfg, torch.arange(len(w.chunks)) + len(w.chunks))
    if cfg.family == "route-rot":
        ids_ = _ids(w)
        chunk_h = site_state(net, _prompts(ids_, ids_.chunk, ids_.rel[DECODE])[:, :2], cfg.site_layer)
        concept_h = site_state(net, _prompts(ids_, ids_.concept[own], ids_.rel[LETTER])[:, :2], cfg.site_layer)
        out["site_cos_rotated"] = float(torch.nn.functional.cosine_similarity(chunk_h, concept_h @ rotation(cfg).T,
                                                                              dim=-1).mean())
    if cfg.family == "bypass":
        base = _prompts(ids, ids.chunk, ids.rel[DECODE])
        state = site_state(net, base[:, :2], cfg.site_layer)
        other = state[torch.roll(torch.arange(len(w.chunks)), 1)]
        out["site_swap_max_logit_change"] = float((splice(net, base, other, cfg.site_layer)[:, -1]
                                                   - splice(net, base, state, cfg.site_layer)[:, -1]).abs().max())
    return out
