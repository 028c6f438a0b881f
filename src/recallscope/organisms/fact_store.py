"""The fact-store organism: subject -> attribute lookups with two-token subjects and a known circuit.

World (fixed by ``world_seed``): 16 first names x 16 last names; 128 of the 256 pairs are subjects,
chosen so that every first and every last name belongs to 8 subjects (neither token alone determines
the subject: the lookup needs the pair). Each subject has a random attribute for each of 3 relations
(8 values each). Prompt: ``<s> FILLER FIRST LAST RELATION`` -> attribute, e.g. ``f3 Ana Lee sport`` ->
``tennis``; the filler token is random and irrelevant by construction.

Training (next-token cross-entropy on the attribute) adds interchange-intervention losses (Geiger et
al. 2022; strict IIT as in InterpBench, Gupta et al. 2024) that fix the circuit:

1. **Subject at the last subject token.** Residual entering layer 1 at position 3 (``LAST``) taken from
   another subject: the answer must become that subject's attribute (for the base relation).
2. **Nothing else carries the subject.** Residuals entering layer 1 at positions 1 (filler), 2 (first
   name) and 4 (relation), and entering layer 2 at position 4, taken from another prompt with the same
   relation: the answer must not change.

So layer 0's attention moves the first name into the last-name position, the model looks the pair up in
its MLPs, and the relation position reads the subject from the last-name position in layer 2. The
ground truth (:class:`FactTruth`) is the set of residual nodes ``(layer, pos)`` that carry the subject
(:meth:`FactTruth.resid_nodes`): ``(0, FIRST)``, ``(0, LAST)``, ``(1, LAST)``, ``(2, LAST)``.
"""

import functools
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.organisms.core import (SPECIALS, ArchConfig, TrainConfig, answer_loss, build_net, deterministic, ids_of,
                                        interchange, train_loop, vocabulary)
from recallscope.tasks.pairs import PromptPair

FIRST_NAMES = ("Ana", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Ola", "Pia")
LAST_NAMES = ("Lee", "Moss", "Nash", "Orr", "Park", "Quinn", "Ross", "Shaw", "Tate", "Underwood", "Vance", "Webb",
              "Young", "Zane", "Abbot", "Brook")
RELATIONS = {
    "city": ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito"),
    "sport": ("tennis", "golf", "rugby", "chess", "judo", "polo", "rowing", "skiing"),
    "color": ("red", "blue", "green", "amber", "violet", "black", "white", "teal"),
}
FILLERS = tuple(f"f{i}" for i in range(8))
FILLER, FIRST, LAST, REL = 1, 2, 3, 4
"""Token positions (BOS is position 0)."""


@dataclass(frozen=True)
class FactWorld:
    """Subjects (first, last) and their attributes per relation."""

    subjects: tuple[tuple[str, str], ...]
    attributes: dict[str, tuple[str, ...]]
    """relation -> attribute of each subject (aligned with ``subjects``)."""

    def words(self) -> list[str]:
        attrs = [a for vals in RELATIONS.values() for a in vals]
        return [*FILLERS, *FIRST_NAMES, *LAST_NAMES, *RELATIONS, *attrs]


@functools.lru_cache(maxsize=4)
def make_fact_world(world_seed: int = 0) -> FactWorld:
    """128 subjects: first name ``i`` pairs with last names ``(i + 2k + shift) % 16`` for 8 values of ``k``."""
    rng = random.Random(world_seed)
    shift = rng.randrange(16)
    pairs = [(FIRST_NAMES[i], LAST_NAMES[(i + 2 * k + shift) % 16]) for i in range(16) for k in range(8)]
    attrs = {rel: tuple(rng.choice(vals) for _ in pairs) for rel, vals in RELATIONS.items()}
    return FactWorld(tuple(pairs), attrs)


@dataclass(frozen=True)
class FactConfig:
    """Recipe of the fact-store organism."""

    arch: ArchConfig = ArchConfig(n_layers=3, d_model=48, n_heads=4, n_ctx=5)
    """Transformer shape."""
    train: TrainConfig = TrainConfig(steps=800, batch_size=128, lr=3e-3, warmup=100, seed=0)
    """Optimiser settings (seed included)."""
    world_seed: int = 0
    """Seeds the subjects and attributes."""
    iit_weight: float = 1.0
    """Weight of the interchange losses."""


@dataclass(frozen=True)
class FactTruth:
    """Ground truth of the fact-store organism.

    Attributes:
        subjects: ``"First Last"`` strings.
        facts: relation -> subject string -> attribute.
        positions: role -> token position (``filler``, ``first``, ``last``, ``relation``; BOS is 0).
        n_layers: blocks of the model.
    """

    subjects: tuple[str, ...]
    facts: dict[str, dict[str, str]]
    positions: dict[str, int]
    n_layers: int
    kind: str = field(default="facts", init=False)

    def resid_nodes(self) -> dict[tuple[int, int], bool]:
        """``(layer, pos) -> carries the subject`` for residual nodes entering each block, over the cells a
        subject-swap patch can change (BOS never differs; the relation token does not differ in layer 0)."""
        out = {}
        for layer in range(self.n_layers):
            for pos in (FILLER, FIRST, LAST, REL):
                if layer == 0 and pos == REL:
                    continue
                out[(layer, pos)] = pos == LAST or (layer == 0 and pos == FIRST)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FactTruth":
        return cls(tuple(d["subjects"]), d["facts"], d["positions"], d["n_layers"])


def fact_truth(cfg: FactConfig) -> FactTruth:
    w = make_fact_world(cfg.world_seed)
    names = tuple(" ".join(s) for s in w.subjects)
    return FactTruth(names, {r: dict(zip(names, a)) for r, a in w.attributes.items()},
                     {"filler": FILLER, "first": FIRST, "last": LAST, "relation": REL}, cfg.arch.n_layers)


# ------------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class _FactIds:
    bos: int
    filler: Tensor
    first: Tensor
    last: Tensor
    relation: Tensor
    answer: Tensor
    """``[relation, subject]`` attribute ids."""


def _fact_ids(world: FactWorld) -> _FactIds:
    vocab = vocabulary(world.words())
    return _FactIds(vocab[SPECIALS[0]], ids_of(vocab, FILLERS), ids_of(vocab, [s[0] for s in world.subjects]),
                    ids_of(vocab, [s[1] for s in world.subjects]), ids_of(vocab, list(RELATIONS)),
                    torch.stack([ids_of(vocab, world.attributes[r]) for r in RELATIONS]))


def _rows(ids: _FactIds, filler: Tensor, subj: Tensor, rel: Tensor) -> Int[Tensor, "n 5"]:
    return torch.stack([torch.full_like(subj, ids.bos), ids.filler[filler], ids.first[subj], ids.last[subj],
                        ids.relation[rel]], 1)


def _sample(ids: _FactIds, n: int, gen: torch.Generator, rel: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    subj = torch.randint(0, ids.first.shape[0], (n,), generator=gen)
    filler = torch.randint(0, len(FILLERS), (n,), generator=gen)
    rel = torch.randint(0, len(RELATIONS), (n,), generator=gen) if rel is None else rel
    return _rows(ids, filler, subj, rel), subj, rel


def _fact_loss(net: torch.nn.Module, cfg: FactConfig, gen: torch.Generator):
    ids = _fact_ids(make_fact_world(cfg.world_seed))
    b = cfg.train.batch_size

    def loss(step: int) -> Tensor:
        tok, subj, rel = _sample(ids, b, gen)
        total = answer_loss(net(tok), ids.answer[rel, subj])
        if not cfg.iit_weight:
            return total
        base, _, rel = _sample(ids, b, gen)
        src, s_subj, _ = _sample(ids, b, gen)
        pos = torch.full((b,), LAST)
        iit = answer_loss(interchange(net, base, src, layer=1, base_pos=pos, source_pos=pos), ids.answer[rel, s_subj])
        for layer, choices in ((1, (FILLER, FIRST, REL)), (2, (REL,))):
            base, b_subj, rel = _sample(ids, b, gen)
            src, _, _ = _sample(ids, b, gen, rel=rel)
            pos = torch.tensor(choices)[torch.randint(0, len(choices), (b,), generator=gen)]
            logits = interchange(net, base, src, layer=layer, base_pos=pos, source_pos=pos)
            iit = iit + answer_loss(logits, ids.answer[rel, b_subj])
        return total + cfg.iit_weight * iit

    return loss


def train_facts(cfg: FactConfig = FactConfig(), *, progress: bool = False, evaluate: bool = True,
                checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the fact-store organism; returns the bare ``NativeModel`` and a record (loss history and, with
    ``evaluate``, :func:`fact_checks`). ``checkpoint_dir``: resumable training (:func:`.core.train_loop`)."""
    world = make_fact_world(cfg.world_seed)
    with deterministic(cfg.train.seed):
        net = build_net(cfg.arch, len(SPECIALS) + len(world.words()), seed=cfg.train.seed, name="fact-store")
        gen = torch.Generator().manual_seed(cfg.train.seed)
        history = train_loop(net, _fact_loss(net, cfg, gen), cfg.train, progress=progress, desc="fact organism",
                             generator=gen, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             recipe=cfg)
        checks = fact_checks(net, cfg) if evaluate else {}
    return net, {"loss_history": history, **checks}


@torch.no_grad()
def fact_checks(net: Any, cfg: FactConfig) -> dict[str, float]:
    """Recall accuracy over every (subject, relation, filler) and the interchange checks of the circuit:
    ``swap_last_follow`` (site 1 of the module docstring) and ``swap_other_invariant`` (site 2)."""
    ids = _fact_ids(make_fact_world(cfg.world_seed))
    n_subj, n_rel = ids.first.shape[0], len(RELATIONS)
    s, r, f = (t.flatten() for t in torch.meshgrid(torch.arange(n_subj), torch.arange(n_rel),
                                                    torch.arange(len(FILLERS)), indexing="ij"))
    tok = _rows(ids, f, s, r)
    acc = lambda logits, y: float((logits[:, -1].argmax(-1) == y).float().mean())  # noqa: E731
    out = {"recall": acc(net(tok), ids.answer[r, s])}
    other = (s + 1 + torch.arange(len(s)) % (n_subj - 1)) % n_subj  # a different subject per row
    src = _rows(ids, (f + 1) % len(FILLERS), other, r)
    pos = torch.full((len(s),), LAST)
    out["swap_last_follow"] = acc(interchange(net, tok, src, layer=1, base_pos=pos, source_pos=pos), ids.answer[r, other])
    inv = []
    for layer, p in ((1, FILLER), (1, FIRST), (1, REL), (2, REL)):
        pos = torch.full((len(s),), p)
        inv.append(acc(interchange(net, tok, src, layer=layer, base_pos=pos, source_pos=pos), ids.answer[r, s]))
    out["swap_other_invariant"] = min(inv)
    return out


def subject_swap_pairs(truth: FactTruth, *, n: int = 64, seed: int = 0) -> list[PromptPair]:
    """Clean/corrupt pairs for scoring patching against :meth:`FactTruth.resid_nodes`: the corrupt prompt
    has another subject with a different first *and* last name (so every subject node differs), another
    filler, and the same relation. The answer is the clean subject's attribute."""
    rng = random.Random(seed)
    relations = sorted(truth.facts)
    out = []
    for _ in range(n):
        a = rng.choice(truth.subjects)
        b = rng.choice([s for s in truth.subjects if all(x != y for x, y in zip(s.split(), a.split()))])
        rel = rng.choice(relations)
        fa, fb = rng.sample(FILLERS, 2)
        out.append(PromptPair(f"{fa} {a} {rel}", f"{fb} {b} {rel}", truth.facts[rel][a], truth.facts[rel][b],
                              meta={"relation": rel, "subject": a}))
    return out
