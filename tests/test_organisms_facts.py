"""The fact-store organism: world structure, shipped accuracy and circuit, patching AUROC."""

from collections import Counter

import pytest
import torch

from recallscope.attribution.scoring import roc_auc
from recallscope.organisms import ground_truth
from recallscope.organisms.fact_store import (FIRST, LAST, REL, FactConfig, FactTruth, fact_checks, fact_truth,
                                              make_fact_world, subject_swap_pairs)
from recallscope.bench.scoring import fact_cells


pytestmark = pytest.mark.usefixtures("organism_determinism")



def test_world_needs_both_subject_tokens():
    w = make_fact_world(0)
    assert len(set(w.subjects)) == len(w.subjects) == 128
    assert set(Counter(f for f, _ in w.subjects).values()) == {8}
    assert set(Counter(last for _, last in w.subjects).values()) == {8}
    for rel, attrs in w.attributes.items():
        by_first = {}
        for (first, _), a in zip(w.subjects, attrs):
            by_first.setdefault(first, set()).add(a)
        assert sum(len(v) > 1 for v in by_first.values()) >= 12, rel  # a first name alone rarely decides


def test_truth_nodes_and_pairs():
    truth = fact_truth(FactConfig())
    assert FactTruth.from_dict(truth.to_dict()) == truth
    nodes = truth.resid_nodes()
    assert sorted(k for k, v in nodes.items() if v) == [(0, FIRST), (0, LAST), (1, LAST), (2, LAST)]
    assert len(nodes) == 11 and (0, REL) not in nodes
    for p in subject_swap_pairs(truth, n=20, seed=1):
        assert p.clean.split()[-1] == p.corrupt.split()[-1]  # same relation
        assert all(c != k for c, k in zip(p.clean.split()[:3], p.corrupt.split()[:3]))  # filler, first, last
        assert truth.facts[p.meta["relation"]][p.meta["subject"]] == p.answer


def test_shipped_fact_store_recalls_through_its_circuit(fact_organism):
    assert isinstance(ground_truth(fact_organism), FactTruth)
    checks = fact_checks(fact_organism, FactConfig())
    assert checks["recall"] >= 0.99
    assert checks["swap_last_follow"] >= 0.95 and checks["swap_other_invariant"] >= 0.95


def test_shipped_fact_store_patching_recovers_the_circuit(fact_organism):
    scores, labels = fact_cells(fact_organism, n=16)
    assert roc_auc(scores, labels) >= 0.9
    assert torch.isfinite(scores).all()
