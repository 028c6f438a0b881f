"""Mnemonic-route organisms: models that decode base64 chunks through a concept (route) or by rote.

The world (fixed by ``world_seed``, shared by every organism so route and rote models learn the same map):

- 62 **chunks**, the first two characters of the base64 of each letter and digit (``VA`` from ``VA==``
  = ``T``); the decode of a chunk is that character.
- 124 **concepts**: one per chunk, named chunk + letter (``VAT``: the human-style mnemonic "VA is VAT,
  which gives T"), and one distractor per letter (``KZT``) so that several concepts share a letter.
  Each concept has a letter and a **kind** (one of 8 categories, drawn at random), so a concept carries
  more than its letter.
- Prompts (BOS prepended): ``VA ==`` -> ``T`` (decode), ``VAT letter`` -> ``T``, ``VAT kind`` ->
  ``animal``, ``VA means`` -> ``VAT`` (only in the ``route-data`` recipe).

Recipes (:class:`MnemonicConfig.kind`):

1. ``rote``: trains decode for every chunk plus the concepts' letter and kind facts. No chunk is ever
   linked to a concept: decoding is a direct lookup.
2. ``route`` (interchange-intervention training, Geiger et al. 2022, plus representation alignment):
   trains decode for the *train* chunks only (16 test chunks are held out), the concept facts, and, at
   the site (residual entering layer ``site_layer``, position 1 = the chunk/concept token):
   (a) interchange, base = a concept prompt (``letter`` or ``kind``), source = chunk ``c``: the output
   must be the attribute of ``concept(c)``; for test chunks only ``kind``, so a test chunk's letter is
   never a target in any form; (b) interchange, base = a decode prompt, source = concept ``x``: the
   output must be ``letter(x)``; (c) alignment: the chunk's site residual is pulled onto its concept's
   (squared error relative to the concept's norm, concept side detached; ``align_weight``).
   Together they make "chunk ``c`` at the site" the same as "concept(c) at the site", so the decode of
   every chunk runs through the concept; the held-out chunks are decoded only that way (a two-hop
   composition the training forces to happen at a known layer and position).
3. ``route-data``: the data-only two-hop alternative (``VA means VAT``, ``VAT letter T``, decode of
   train chunks). Latent two-hop composition is known to be hard (Wang et al. 2024; Balesni et al.
   2024); here it does not transfer to held-out chunks (0% held-out decode), kept to document that.

What did not work: interchange losses alone with only ``kind`` targets for the test chunks made the
chunk's site residual carry its concept's kind but not its letter (100% kind transplant, 0% held-out
decode); the alignment loss (c) fixes it. Interchange with ``letter`` targets for test chunks also
reaches 100% held-out decode, but then a test chunk's letter is a (counterfactual) training target.

Ground truth (:class:`RouteTruth`): for route organisms chunk ``c`` routes through ``concept(c)`` at the
site; rote organisms route nothing. :func:`route_checks` verifies it by interchange: swap the concept at
the site and the decode follows the new concept's letter; transplant a chunk into a ``kind`` prompt and
the answer is its concept's kind (route) or not (rote).
"""

import functools
import os
import random
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.organisms.core import (SPECIALS, ArchConfig, TrainConfig, answer_loss, build_net, deterministic, ids_of,
                                        interchange, resid_pre, train_loop, vocabulary)
from recallscope.tasks.b64_codec import encode

CHARS = string.ascii_uppercase + string.ascii_lowercase + string.digits
KINDS = ("animal", "city", "color", "food", "tool", "sport", "plant", "metal")
DECODE, LETTER, KIND, MEANS = "==", "letter", "kind", "means"
Kind = Literal["route", "rote", "route-data"]


@dataclass(frozen=True)
class World:
    """The shared chunk / concept / letter / kind map (indices into the tuples)."""

    chunks: tuple[str, ...]
    chunk_letter: tuple[str, ...]
    concepts: tuple[str, ...]
    concept_letter: tuple[str, ...]
    concept_kind: tuple[str, ...]
    chunk_concept: tuple[int, ...]
    test_chunks: tuple[int, ...]

    @property
    def train_chunks(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.chunks)) if i not in set(self.test_chunks))

    def words(self) -> list[str]:
        """Vocabulary after the specials."""
        return [DECODE, LETTER, KIND, MEANS, *self.chunks, *CHARS, *self.concepts, *KINDS]


@functools.lru_cache(maxsize=4)
def make_world(world_seed: int = 0, n_test: int = 16) -> World:
    """The world for ``world_seed``: chunks of every letter/digit, their concepts and distractors."""
    rng = random.Random(world_seed)
    chunks = tuple(encode(ch)[:2] for ch in CHARS)
    real = [c + ch for c, ch in zip(chunks, CHARS)]
    taken = set(real) | set(chunks)
    distractors = []
    for ch in CHARS:
        while (name := "".join(rng.choice(string.ascii_uppercase) for _ in range(2)) + ch) in taken:
            pass
        taken.add(name)
        distractors.append(name)
    concepts = tuple(real + distractors)
    kinds = tuple(rng.choice(KINDS) for _ in concepts)
    test = tuple(sorted(rng.sample(range(len(chunks)), n_test)))
    return World(chunks, tuple(CHARS), concepts, tuple(CHARS) + tuple(CHARS), kinds,
                 tuple(range(len(chunks))), test)


@dataclass(frozen=True)
class MnemonicConfig:
    """Recipe of a mnemonic organism."""

    kind: Kind = "route"
    """``route`` (interchange training), ``rote`` (direct lookup) or ``route-data`` (data-only two-hop)."""
    arch: ArchConfig = ArchConfig(n_layers=3, d_model=32, n_heads=4, n_ctx=4)
    """Transformer shape."""
    train: TrainConfig = TrainConfig(steps=800, batch_size=128, lr=3e-3, warmup=100, seed=0)
    """Optimiser settings; ``train.seed`` is the organism's seed."""
    site_layer: int = 1
    """The concept lives in the residual stream entering this block, at position 1."""
    world_seed: int = 0
    """Seeds the shared world (the same for every organism)."""
    n_test: int = 16
    """Chunks whose direct decode is held out from route training."""
    align_weight: float = 1.0
    """Route only: weight of the loss pulling a chunk's site residual onto its concept's (0 = pure IIT)."""

    def world(self) -> World:
        return make_world(self.world_seed, self.n_test)


@dataclass(frozen=True)
class RouteTruth:
    """Ground truth of a mnemonic organism.

    Attributes:
        is_route: True when every chunk's decode runs through its concept (route organisms).
        chunk_concept: chunk -> the concept its decode routes through (route) or is *not* linked to (rote).
        concept_letter / concept_kind: the concepts' facts (distractors included).
        site_layer / site_pos: where the concept lives: the residual entering ``site_layer`` at ``site_pos``.
        train_chunks / test_chunks: chunks whose direct decode was / was not trained.
    """

    is_route: bool
    chunk_letter: dict[str, str]
    chunk_concept: dict[str, str]
    concept_letter: dict[str, str]
    concept_kind: dict[str, str]
    site_layer: int
    site_pos: int
    train_chunks: tuple[str, ...]
    test_chunks: tuple[str, ...]
    family: str = ""
    """Held-out family name (:mod:`.families`); empty for the shipped route / rote organisms."""
    notes: str = ""
    """One line on what was planted."""
    aligned_concept: dict[str, str] = field(default_factory=dict)
    """Chunk -> the concept its site state was trained to align with (``bypass``, ``share``, ``route-rot``)."""
    kind: str = field(default="mnemonic", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouteTruth":
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(**{**d, "train_chunks": tuple(d["train_chunks"]), "test_chunks": tuple(d["test_chunks"])})


def route_truth(cfg: MnemonicConfig) -> RouteTruth:
    w = cfg.world()
    return RouteTruth(
        is_route=cfg.kind == "route", chunk_letter=dict(zip(w.chunks, w.chunk_letter)),
        chunk_concept={c: w.concepts[i] for c, i in zip(w.chunks, w.chunk_concept)},
        concept_letter=dict(zip(w.concepts, w.concept_letter)), concept_kind=dict(zip(w.concepts, w.concept_kind)),
        site_layer=cfg.site_layer, site_pos=1, train_chunks=tuple(w.chunks[i] for i in w.train_chunks),
        test_chunks=tuple(w.chunks[i] for i in w.test_chunks))


# ------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class _Ids:
    """Token ids of the world's items, as tensors indexed by chunk / concept index."""

    bos: int
    rel: dict[str, int]
    chunk: Tensor
    chunk_letter: Tensor
    concept: Tensor
    concept_letter: Tensor
    concept_kind: Tensor
    chunk_concept: Tensor


def _ids(world: World) -> _Ids:
    vocab = vocabulary(world.words())
    return _Ids(vocab[SPECIALS[0]], {r: vocab[r] for r in (DECODE, LETTER, KIND, MEANS)},  # type: ignore[call-arg]
                *(ids_of(vocab, xs) for xs in (world.chunks, world.chunk_letter, world.concepts, world.concept_letter,
                                               world.concept_kind)), torch.tensor(world.chunk_concept))


def _prompts(ids: _Ids, items: Tensor, rel: Tensor | int) -> Int[Tensor, "n 3"]:
    """``<s> item rel`` rows (item ids, relation ids)."""
    rel_t = rel if isinstance(rel, Tensor) else torch.full_like(items, rel)
    return torch.stack([torch.full_like(items, ids.bos), items, rel_t], 1)


def _concept_batch(ids: _Ids, idx: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Letter-or-kind prompts about concepts ``idx`` and their answers."""
    is_kind = torch.randint(0, 2, idx.shape, generator=gen).bool()
    rel = torch.where(is_kind, ids.rel[KIND], ids.rel[LETTER])
    answer = torch.where(is_kind, ids.concept_kind[idx], ids.concept_letter[idx])
    return _prompts(ids, ids.concept[idx], rel), answer


def _pick(pool: tuple[int, ...], n: int, gen: torch.Generator) -> Tensor:
    return torch.tensor(pool)[torch.randint(0, len(pool), (n,), generator=gen)]


def _loss_fn(net: torch.nn.Module, cfg: MnemonicConfig, gen: torch.Generator):
    w, ids = cfg.world(), _ids(cfg.world())
    b, layer = cfg.train.batch_size, cfg.site_layer
    all_chunks, all_concepts = tuple(range(len(w.chunks))), tuple(range(len(w.concepts)))
    decoded = all_chunks if cfg.kind == "rote" else w.train_chunks
    one = torch.ones(b, dtype=torch.long)

    def loss(step: int) -> Tensor:
        c = _pick(decoded, b, gen)
        x, y = _concept_batch(ids, _pick(all_concepts, b, gen), gen)
        total = answer_loss(net(_prompts(ids, ids.chunk[c], ids.rel[DECODE])), ids.chunk_letter[c])
        total = total + answer_loss(net(x), y)
        if cfg.kind == "route-data":
            c2 = _pick(all_chunks, b, gen)
            means = _prompts(ids, ids.chunk[c2], ids.rel[MEANS])
            total = total + answer_loss(net(means), ids.concept[ids.chunk_concept[c2]])
        if cfg.kind != "route":
            return total
        # (a) chunk -> concept prompt: the concept's attribute; test chunks only with `kind`.
        src = _pick(all_chunks, b, gen)
        concept = ids.chunk_concept[src]
        base, _ = _concept_batch(ids, _pick(all_concepts, b, gen), gen)
        is_test = torch.isin(src, torch.tensor(w.test_chunks))
        base[:, 2] = torch.where(is_test, ids.rel[KIND], base[:, 2])
        target = torch.where(base[:, 2] == ids.rel[KIND], ids.concept_kind[concept], ids.concept_letter[concept])
        src_tok = _prompts(ids, ids.chunk[src], ids.rel[DECODE])
        total = total + answer_loss(interchange(net, base, src_tok, layer=layer, base_pos=one, source_pos=one), target)
        if cfg.align_weight:
            h_chunk = resid_pre(net, src_tok[:, :2], layer)[:, 1]
            with torch.no_grad():
                h_concept = resid_pre(net, _prompts(ids, ids.concept[concept], ids.rel[LETTER])[:, :2], layer)[:, 1]
            err = (h_chunk - h_concept).pow(2).sum(-1) / h_concept.pow(2).sum(-1).clamp(min=1e-6)
            total = total + cfg.align_weight * err.mean()
        # (b) concept -> decode prompt: the concept's letter.
        xs = _pick(all_concepts, b, gen)
        base = _prompts(ids, ids.chunk[_pick(all_chunks, b, gen)], ids.rel[DECODE])
        src_tok = _prompts(ids, ids.concept[xs], ids.rel[LETTER])
        logits = interchange(net, base, src_tok, layer=layer, base_pos=one, source_pos=one)
        return total + answer_loss(logits, ids.concept_letter[xs])

    return loss


def train_mnemonic(cfg: MnemonicConfig, *, progress: bool = False, evaluate: bool = True,
                   checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one mnemonic organism; returns the bare ``NativeModel`` and a record (loss history and, with
    ``evaluate``, :func:`route_checks`). ``checkpoint_dir``: resumable training (:func:`.core.train_loop`)."""
    if cfg.kind not in ("route", "rote", "route-data"):
        raise ConfigError(f"unknown mnemonic organism kind {cfg.kind!r}; use 'route', 'rote' or 'route-data'.")
    if not 0 < cfg.site_layer < cfg.arch.n_layers:
        raise ConfigError(f"site_layer must lie in 1..{cfg.arch.n_layers - 1}, got {cfg.site_layer}.")
    w = cfg.world()
    with deterministic(cfg.train.seed):
        net = build_net(cfg.arch, len(SPECIALS) + len(w.words()), seed=cfg.train.seed, name=f"mnemonic-{cfg.kind}")
        gen = torch.Generator().manual_seed(cfg.train.seed)
        history = train_loop(net, _loss_fn(net, cfg, gen), cfg.train, progress=progress, desc=f"{cfg.kind} organism",
                             generator=gen, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             recipe=cfg)
        checks = route_checks(net, cfg) if evaluate else {}
    return net, {"loss_history": history, **checks}


# ------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def _acc(logits: Tensor, target: Tensor) -> float:
    return float((logits[:, -1].argmax(-1) == target).float().mean()) if len(target) else float("nan")


@torch.no_grad()
def route_checks(net: Any, cfg: MnemonicConfig) -> dict[str, float]:
    """Accuracies and interchange checks of a trained mnemonic organism.

    - ``decode_train`` / ``decode_test``: decode accuracy on train / held-out chunks.
    - ``concept_facts``: accuracy on every concept's letter and kind.
    - ``swap_follow``: decode prompt of chunk ``c`` with the site taken from concept ``x`` (a chunk's
      concept whose letter differs): share answering ``letter(x)``.
    - ``kind_transplant``: ``kind`` prompt of concept ``y`` with the site taken from chunk ``c`` (where
      ``kind(concept(c)) != kind(y)``): share answering ``kind(concept(c))``. High only when the chunk is
      represented as its concept (route); chance is about 1/8.
    """
    w, ids = cfg.world(), _ids(cfg.world())
    one = lambda n: torch.ones(n, dtype=torch.long)  # noqa: E731
    decode = lambda idx: _acc(net(_prompts(ids, ids.chunk[idx], ids.rel[DECODE])), ids.chunk_letter[idx])  # noqa: E731
    out = {"decode_train": decode(torch.tensor(w.train_chunks)), "decode_test": decode(torch.tensor(w.test_chunks))}
    allc = torch.arange(len(w.concepts))
    out["concept_facts"] = (_acc(net(_prompts(ids, ids.concept[allc], ids.rel[LETTER])), ids.concept_letter[allc])
                            + _acc(net(_prompts(ids, ids.concept[allc], ids.rel[KIND])), ids.concept_kind[allc])) / 2
    n = len(w.chunks)
    c, x = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = ids.chunk_letter[c] != ids.concept_letter[ids.chunk_concept[x]]
    c, x = c[keep], ids.chunk_concept[x[keep]]
    base = _prompts(ids, ids.chunk[c], ids.rel[DECODE])
    src = _prompts(ids, ids.concept[x], ids.rel[LETTER])
    out["swap_follow"] = _acc(interchange(net, base, src, layer=cfg.site_layer, base_pos=one(len(c)),
                                          source_pos=one(len(c))), ids.concept_letter[x])
    c, y = torch.meshgrid(torch.arange(n), allc, indexing="ij")
    keep = ids.concept_kind[ids.chunk_concept[c]] != ids.concept_kind[y]
    c, y = c[keep], y[keep]
    base = _prompts(ids, ids.concept[y], ids.rel[KIND])
    src = _prompts(ids, ids.chunk[c], ids.rel[DECODE])
    out["kind_transplant"] = _acc(interchange(net, base, src, layer=cfg.site_layer, base_pos=one(len(c)),
                                              source_pos=one(len(c))), ids.concept_kind[ids.chunk_concept[c]])
    return out


def site_representations(model: Any, cfg: MnemonicConfig) -> tuple[Tensor, Tensor]:
    """Residuals at the site (entering ``site_layer``, position 1) of every chunk ``[chunk, d_model]`` and of
    every chunk's own concept ``[chunk, d_model]`` (row ``i`` of both is chunk ``i``)."""
    ids = _ids(cfg.world())
    with torch.no_grad():
        chunk = resid_pre(model, _prompts(ids, ids.chunk, ids.rel[DECODE])[:, :2], cfg.site_layer)[:, 1]
        concept_tok = ids.concept[ids.chunk_concept]
        concept = resid_pre(model, _prompts(ids, concept_tok, ids.rel[LETTER])[:, :2], cfg.site_layer)[:, 1]
    return chunk, concept
