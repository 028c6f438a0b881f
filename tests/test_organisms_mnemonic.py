"""Mnemonic-route organisms: the world against the codec, and the shipped route/rote ground truth."""

import pytest
import torch

from recallscope.organisms import ground_truth
from recallscope.organisms.mnemonic import (CHARS, KINDS, RouteTruth, make_world, route_checks, route_truth,
                                            site_representations)
from recallscope.organisms.recipes import N_SEEDS, get_recipe
from recallscope.tasks.b64_codec import decode_text


pytestmark = pytest.mark.usefixtures("organism_determinism")


def test_world_is_real_base64_with_concepts_and_distractors():
    w = make_world(0, 16)
    assert len(w.chunks) == len(CHARS) == 62
    for chunk, letter in zip(w.chunks, w.chunk_letter):
        assert decode_text(chunk + "==") == letter
    assert len(set(w.concepts)) == len(w.concepts) == 124
    assert w.concepts[w.chunks.index("VA")] == "VAT"
    by_letter = {}
    for concept, letter in zip(w.concepts, w.concept_letter):
        by_letter.setdefault(letter, []).append(concept)
    assert all(len(v) == 2 for v in by_letter.values())  # every letter: the chunk's concept + a distractor
    assert set(w.concept_kind) <= set(KINDS) and len(w.test_chunks) == 16
    words = w.words()
    assert len(set(words)) == len(words)


def test_route_truth_round_trips():
    truth = route_truth(get_recipe("route-s0").config)
    assert RouteTruth.from_dict(truth.to_dict()) == truth
    assert truth.is_route and truth.chunk_concept["VA"] == "VAT" and truth.concept_letter["VAT"] == "T"
    assert not route_truth(get_recipe("rote-s0").config).is_route


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_shipped_route_and_rote_pairs(seed):
    from recallscope import load_model

    route, rote = (f"route-s{seed}", f"rote-s{seed}")
    r_model, o_model = load_model(f"organism:{route}"), load_model(f"organism:{rote}")
    assert ground_truth(r_model).is_route and not ground_truth(o_model).is_route
    r = route_checks(r_model, get_recipe(route).config)
    o = route_checks(o_model, get_recipe(rote).config)
    # Both decode the same map; the route model decodes held-out chunks only through the concept.
    assert min(r["decode_train"], r["decode_test"], o["decode_train"], o["decode_test"]) >= 0.95
    assert min(r["concept_facts"], o["concept_facts"]) >= 0.95
    # Swap the concept at the site: the route model's decode follows it, the rote model's does not.
    assert r["swap_follow"] >= 0.95 and o["swap_follow"] <= 0.3
    # A chunk transplanted into a concept prompt carries its concept's kind only in the route model.
    assert r["kind_transplant"] >= 0.95 and o["kind_transplant"] <= 0.3
    # The route model represents each chunk at the site as its concept; the rote model does not.
    for model, name, is_route in ((r_model, route, True), (o_model, rote, False)):
        chunk, concept = site_representations(model, get_recipe(name).config)
        cos = torch.nn.functional.cosine_similarity(chunk, concept).mean()
        assert (cos > 0.99) if is_route else (cos < 0.8), (name, float(cos))
