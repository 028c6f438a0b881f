"""DAS route score: equal to TransformerLens's own interchange/DAS functions, and its controls behave.

The planted case is the mnemonic route organism (``organism:route-s0``): by training, the chunk's state
entering layer 1 at position 1 carries its concept, so transplanting a chunk into a "<concept> kind" prompt
answers the chunk's concept's kind. The rote organism (``rote-s0``) decodes chunks by lookup, no concept.
"""

import random

import pytest
import torch

from recallscope.errors import ConfigError, LengthMismatchError, MultiTokenAnswerError
from recallscope.routes.das import (
    ConceptVariable,
    DASConfig,
    DASRouteResult,
    das_pairs,
    das_route_score,
    sign_flip_p,
)
from recallscope.sites import Site
from recallscope.vocab import Component

WORDS = (" cat", " dog", " red", " blue", " one", " two", " sun", " sea")
VALUES = ("a", "a", "b", "b", "c", "c", "d", "d")
OUTPUTS = {"a": " animal", "b": " colour", "c": " number", "d": " nature"}
TEMPLATE = "The word{input} is a"


def _tl_reference(model, seed: int, cfg: DASConfig):
    """The same DAS run written directly against TransformerLens, with tokens and positions found by hand."""
    from transformer_lens.tools.analysis import (NormMatchedPlacebo, SubspaceInterchange, arbitrary_targets,
                                                 collect_activations, fit_das, intervened_logits, random_basis)

    tok = model.tokenizer

    def one(text):
        (i,) = tok.encode(text, add_special_tokens=False)
        return i

    order = [(b, s) for b in range(len(WORDS)) for s in range(len(WORDS)) if b != s]
    rows = [model.to_tokens(TEMPLATE.format(input=w))[0] for w in WORDS]
    pos = [int((r == one(w)).nonzero()[-1]) for r, w in zip(rows, WORDS)]
    classes = [one(OUTPUTS[v]) for v in dict.fromkeys(VALUES)]
    class_of = {v: i for i, v in enumerate(dict.fromkeys(VALUES))}
    base = torch.stack([rows[b] for b, _ in order])
    source = torch.stack([rows[s] for _, s in order])
    bpos = torch.tensor([pos[b] for b, _ in order])
    spos = torch.tensor([pos[s] for _, s in order])
    targets = torch.tensor([class_of[VALUES[s]] for _, s in order])
    n = len(order)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[: round(n * cfg.test_fraction)].sort().values, perm[round(n * cfg.test_fraction):].sort().values

    def task(t):
        return model(t)[:, -1, classes]

    hook = "blocks.1.hook_resid_pre"
    kw = dict(rank=cfg.rank, base_positions=bpos[train], source_positions=spos[train], epochs=cfg.epochs,
              batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
    das = fit_das(model, hook, base[train], source[train], targets[train], task, **kw)
    src = collect_activations(model, hook, source[test], task, positions=spos[test])
    logits = intervened_logits(model, hook, SubspaceInterchange(das.basis), base[test], src, task, positions=bpos[test])
    arb = arbitrary_targets([WORDS[s] for _, s in order], len(classes), seed)
    das_arb = fit_das(model, hook, base[train], source[train], arb[train], task, **kw)
    arb_logits = intervened_logits(model, hook, SubspaceInterchange(das_arb.basis), base[test], src, task,
                                   positions=bpos[test])
    placebo = NormMatchedPlacebo(SubspaceInterchange(das.basis), random_basis(model.cfg.d_model, cfg.rank, seed + 1))
    pl_logits = intervened_logits(model, hook, placebo, base[test], src, task, positions=bpos[test])
    return {"basis": das.basis, "correct": (logits.argmax(-1) == targets[test]).float(),
            "arbitrary_labels": (arb_logits.argmax(-1) == arb[test]).float(),
            "placebo": (pl_logits.argmax(-1) == targets[test]).float(),
            "target_logprob": logits.log_softmax(-1).gather(1, targets[test][:, None])[:, 0]}


def test_das_score_equals_transformerlens(tiny_gpt2):
    cfg = DASConfig(rank=2, epochs=3, batch_size=16, seed=3, controls=("arbitrary_labels", "placebo"))
    variable = ConceptVariable(TEMPLATE, WORDS, VALUES, OUTPUTS)
    result = das_route_score(tiny_gpt2, variable.pairs(tiny_gpt2), Site(Component.RESID_PRE, 1), cfg)
    ref = _tl_reference(tiny_gpt2, 3, cfg)
    torch.testing.assert_close(result.basis, ref["basis"])
    torch.testing.assert_close(result.correct, ref["correct"])
    torch.testing.assert_close(result.target_logprob, ref["target_logprob"])
    torch.testing.assert_close(result.controls["arbitrary_labels"], ref["arbitrary_labels"])
    torch.testing.assert_close(result.controls["placebo"], ref["placebo"])
    assert result.score == pytest.approx(float(ref["correct"].mean()))
    assert result.config["n_test"] == 28 and result.config["n_train"] == 28


def _organism_pairs(model, n: int = 256, seed: int = 0):
    """Base "<concept> kind", source "<chunk> ==": the predicted output is the kind of the chunk's concept."""
    from recallscope.organisms.mnemonic import KINDS, make_world

    w, rng = make_world(0, 16), random.Random(seed)
    bp, bi, sp, si, tg = [], [], [], [], []
    for _ in range(n):
        b, c = rng.randrange(len(w.concepts)), rng.randrange(len(w.chunks))
        bp.append(f"{w.concepts[b]} kind")
        bi.append(w.concepts[b])
        sp.append(f"{w.chunks[c]} ==")
        si.append(w.chunks[c])
        tg.append(w.concept_kind[w.chunk_concept[c]])
    return das_pairs(model, bp, bi, sp, si, tg, KINDS)


@pytest.fixture(scope="module")
def route_result(organism_determinism):
    from recallscope import load_model

    model = load_model("organism:route-s0")
    return das_route_score(model, _organism_pairs(model), 1, DASConfig(rank=8, epochs=20, batch_size=32))


def test_planted_route_beats_every_control(route_result):
    r = route_result
    assert r.score > 0.6, r.summary()
    scores = r.control_scores()
    assert scores["arbitrary_labels"] < r.score - 0.3
    assert scores["placebo"] < r.score - 0.2
    assert scores["random_init"] < 0.3  # chance is 1/8; the most frequent kind is ~0.19 of the test pairs
    assert r.p_value < 0.001 and r.carries()


def test_rote_organism_does_not_carry(organism_determinism):
    from recallscope import load_model

    model = load_model("organism:rote-s0")
    r = das_route_score(model, _organism_pairs(model), 1, DASConfig(rank=8, epochs=20, batch_size=32,
                                                                   controls=("placebo", "no_intervention")))
    assert r.score < 0.3 and not r.carries(), r.summary()


def test_full_rank_subspace_is_no_better_than_its_placebo(organism_determinism):
    """At full rank the norm-matched placebo is the same move, so the control must catch it (p = 1)."""
    from recallscope import load_model

    model = load_model("organism:route-s0")
    r = das_route_score(model, _organism_pairs(model, 64), 1, DASConfig(rank=32, epochs=1, controls=("placebo",)))
    torch.testing.assert_close(r.correct, r.controls["placebo"])
    assert r.p_value == 1.0 and not r.carries()


def test_save_load_plot(route_result, tmp_path):
    import plotly.graph_objects as go

    r = route_result
    back = DASRouteResult.load(r.save(tmp_path / "das"))
    torch.testing.assert_close(back.correct, r.correct)
    torch.testing.assert_close(back.basis, r.basis)
    assert back.p_values == r.p_values and back.classes == r.classes and back.losses == r.losses
    fig = r.plot()
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].x) == ["DAS subspace", *r.controls]
    assert fig.data[0].y[0] == pytest.approx(r.score)


def test_sign_flip_p():
    assert sign_flip_p(torch.zeros(20), 999, 0) == 1.0
    assert sign_flip_p(torch.ones(20), 9999, 0) < 1e-3
    assert sign_flip_p(-torch.ones(20), 999, 0) == 1.0


def test_bad_inputs(tiny_gpt2):
    with pytest.raises(ConfigError, match="does not occur"):
        das_pairs(tiny_gpt2, ["The cat"] * 4, [" dog"] * 4, ["The cat"] * 4, [" cat"] * 4, [" a"] * 4, [" a"])
    with pytest.raises(MultiTokenAnswerError):
        ConceptVariable(TEMPLATE, WORDS, VALUES, {**OUTPUTS, "a": " antidisestablishment"}).pairs(tiny_gpt2)
    with pytest.raises(LengthMismatchError, match="same token count"):
        ConceptVariable(TEMPLATE, (" cat", " dog", " antidisestablishment"), ("a", "b", "a"), OUTPUTS).pairs(tiny_gpt2)
    with pytest.raises(ConfigError, match="unknown DAS controls"):
        DASConfig(controls=("shuffle",))
    pairs = ConceptVariable(TEMPLATE, WORDS, VALUES, OUTPUTS).pairs(tiny_gpt2)
    with pytest.raises(ConfigError, match="no pos or head"):
        das_route_score(tiny_gpt2, pairs, Site(Component.RESID_PRE, 1, pos=2))
    with pytest.raises(ConfigError, match="at least 4 pairs"):
        das_route_score(tiny_gpt2, pairs.subset(torch.tensor([0, 1, 2])), 1)
    with pytest.raises(ConfigError, match="placeholder"):
        ConceptVariable("The word", WORDS, VALUES, OUTPUTS)
