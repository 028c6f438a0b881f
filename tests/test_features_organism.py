"""Transcoders on a real organism (fact-store): training from its task data, the graph of a fact recall,
and an intervention on a feature the graph points at (the CLI end to end)."""

import copy
import json

import pytest
import torch

from recallscope.features.data import organism_task_tokens, training_tokens
from recallscope.features.graph import attribution_graph
from recallscope.features.interventions import FeatureEdit, run_intervention
from recallscope.features.replacement import fidelity


@pytest.fixture(scope="module")
def trained(fact_organism):
    """The shipped fact-store set (trained by `recallscope transcoders` at its defaults; that retraining
    reproduces it is checked in test_shipped_transcoders.py), and fresh tokens it was not trained on."""
    from recallscope.features.shipped import load_shipped_transcoders

    tset = load_shipped_transcoders(fact_organism)  # checks the loaded weights' hash
    return fact_organism, tset, training_tokens(fact_organism, 200, seed=7)


def test_task_tokens_are_fact_prompts(fact_organism):
    rows = organism_task_tokens(fact_organism, 20)
    assert rows.shape == (20, int(fact_organism.cfg.n_ctx)) and (rows[:, 0] == 0).all()


def test_trained_transcoders_reproduce_the_organism(trained):
    from recallscope.features.shipped import layer_explained_variance

    model, tset, held = trained
    ev = layer_explained_variance(model, tset, held)
    assert min(ev.values()) > 0.9, ev
    fid = fidelity(model, tset, held)
    no_features = copy.deepcopy(tset)  # the same transcoders without their features: skip + bias only
    with torch.no_grad():
        for layer in no_features.layers:
            no_features[layer].W_dec.zero_()
    base = fidelity(model, no_features, held)
    assert fid.top1_agreement > 0.9 and fid.kl < 0.25 * base.kl, (fid, base)


def test_last_layer_feature_moves_the_answer_as_the_graph_predicts(trained):
    """With attention and norms frozen, steering a last-layer feature changes the answer logit by exactly
    its graph edge times the steering factor; ablating the feature with the largest edge lowers the logit."""
    model, tset, _ = trained
    prompt = organism_task_tokens(model, 2, seed=3)[0]
    answer = int(model(prompt[None], return_type="logits")[0, -1].argmax())
    graph = attribution_graph(model, tset, prompt, targets=[answer])
    last = int(model.cfg.n_layers) - 1
    cand = ((graph.features[:, 0] == last) & (graph.features[:, 1] == len(prompt) - 1)).nonzero().squeeze(-1)
    edges = graph.adjacency[graph.logit_slice.start, cand]
    n = int(cand[edges.argmax()])
    layer, pos, f = graph.features[n].tolist()
    assert float(edges.max()) > 0.1
    res = run_intervention(model, tset, prompt, [FeatureEdit(layer, f, pos, scale=1.5)], freeze=("attention", "norms"))
    assert res.logit_change(answer) == pytest.approx(0.5 * float(graph.adjacency[graph.logit_slice.start, n]),
                                                     rel=1e-4, abs=1e-5)
    free = run_intervention(model, tset, prompt, [FeatureEdit(layer, f, pos, value=0.0)])
    assert free.logit_change(answer) < 0


def test_cli_trains_and_draws_a_graph(tmp_path):
    from recallscope.cli import main

    tc = tmp_path / "tc"
    assert main(["transcoders", "--model", "organism:fact-store", "--n-seqs", "120", "--steps", "40",
                 "--d-sae", "64", "--k", "4", "--out", str(tc), "--quiet"]) == 0
    report = json.loads((tc / "report.json").read_text())
    assert set(report["explained_variance"]) == {"0", "1", "2"}
    assert json.loads((tc / "fidelity.json").read_text())["all"]["n_positions"] > 0
    out = tmp_path / "graph"
    from recallscope import load_model

    model = load_model("organism:fact-store")
    prompt = model.tokenizer.decode(organism_task_tokens(model, 2)[0][1:])
    assert main(["graph", "--model", "organism:fact-store", "--transcoders", str(tc), "--prompt", prompt,
                 "--out", str(out)]) == 0
    data = json.loads((out / "graph.json").read_text())
    assert any(nd["feature_type"] == "logit" for nd in data["nodes"]) and data["links"]
    assert (out / "graph.html").stat().st_size > 1000


def test_b64_graph_finds_the_chunks_each_byte_depends_on(b64_organism):
    """The embedding nodes with influence on output byte j are the input chunks byte j is computed from
    (the organism's ground-truth dependency map): AUROC of embedding influence vs truth. This checks the
    graph's paths (positions, frozen attention, features); it does not grade the transcoders: with every
    feature removed (all error nodes) the AUROC stays 0.999, because the routing is done by attention."""
    from recallscope.features.graph import influence
    from recallscope.organisms import ground_truth
    from recallscope.organisms.b64_decoder import dependency_pairs

    from recallscope.features.shipped import load_shipped_transcoders

    model, truth = b64_organism, ground_truth(b64_organism)
    tset = load_shipped_transcoders(model)
    n_bytes = max(truth.lengths)
    dep = truth.dependency(n_bytes)
    scores, labels = [], []
    for pair in dependency_pairs(n_bytes, 1, seed=1):
        prompt = model.to_tokens(pair.clean)[0]
        answer = int(model.to_tokens(pair.answer, prepend_bos=False)[0, 0])
        graph = attribution_graph(model, tset, prompt, targets=[answer])
        scores.append(influence(graph)[graph.embed_slice][1:1 + truth.n_chunks])
        labels.append(dep[pair.meta["byte"]])
    s, y = torch.cat(scores), torch.cat(labels)
    auroc = float((s[y][:, None] > s[~y][None, :]).float().mean())
    assert auroc > 0.9, auroc
