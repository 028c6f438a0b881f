"""Attribution graphs: exact decomposition of every node's input, and equality with the model's own
Jacobian (attention patterns and norm denominators frozen) when the transcoders are exact."""

import warnings

import pytest
import torch
from test_features_transcoder import relu_model

from recallscope.features.graph import RESID0, attribution_graph, prune
from recallscope.features.transcoder import Transcoder, TranscoderSet, TranscoderSpec, exact_mlp_transcoders

TOKENS = torch.tensor([0, 5, 9, 3, 17, 2])


@pytest.fixture(scope="module")
def rmodel():
    return relu_model(seed=2, n_layers=3)


def check_exact_decomposition(model, tset, graph):
    targets = torch.cat([torch.arange(graph.n_feat), torch.arange(graph.logit_slice.start, graph.adjacency.shape[0])])
    sums = graph.adjacency[targets].sum(1) + graph.bias[targets]
    torch.testing.assert_close(sums, graph.node_input[targets], rtol=1e-4, atol=1e-4)
    # node inputs are the real model's values: feature pre-activations and the target logit
    _, cache = model.run_with_cache(TOKENS[None])
    for n, (layer, pos, idx) in enumerate(graph.features.tolist()):
        pre = tset[layer].pre_acts(cache[tset.input_hook(layer)][0, pos])[idx]
        torch.testing.assert_close(graph.node_input[n], pre, rtol=1e-4, atol=1e-4)
    logits = model(TOKENS[None], return_type="logits")[0, -1]
    torch.testing.assert_close(graph.node_input[graph.logit_slice], graph.logit_vectors @ logits, rtol=1e-4, atol=1e-4)


def test_edges_sum_to_inputs_exact_transcoders(rmodel):
    tset = exact_mlp_transcoders(rmodel)
    graph = attribution_graph(rmodel, tset, TOKENS, targets=[3, 7], batch_size=16)
    assert graph.n_feat > 10
    check_exact_decomposition(rmodel, tset, graph)
    assert graph.adjacency[:, graph.error_slice].abs().max() < 1e-4  # exact transcoders leave no error


def random_partial_set(gen: torch.Generator) -> TranscoderSet:
    """Random TopK skip transcoders (drawn from ``gen``) for layers 0 and 2 of the 3-layer relu_model; layer 1 has
    none (all error)."""
    tcs = {}
    for layer in (0, 2):
        tc = Transcoder(TranscoderSpec(16, 40, 16, activation="topk", k=5, skip=True))
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        tcs[layer] = tc
    return TranscoderSet(tcs, 3)


def test_edges_sum_to_inputs_with_errors_and_partial_set(rmodel):
    tset = random_partial_set(torch.Generator().manual_seed(5))
    graph = attribution_graph(rmodel, tset, TOKENS, targets=(4, 11), batch_size=7)
    check_exact_decomposition(rmodel, tset, graph)
    assert graph.adjacency[:, graph.error_index(1, 3)].abs().max() > 1e-3
    # causality: no edge from a later position or from a feature's own / later layer
    feats = graph.features
    sub = graph.adjacency[: graph.n_feat, : graph.n_feat]
    later = (feats[None, :, 1] > feats[:, None, 1]) | (feats[None, :, 0] >= feats[:, None, 0])
    assert sub[later].abs().max() == 0


def frozen_jacobian_x_input(model, vec):
    """Oracle: d(logit . vec)/d(resid_pre 0) * resid_pre 0 per position in the real model (real ReLU MLPs),
    with attention patterns and norm denominators frozen by hooks."""
    names = lambda n: n == RESID0 or n.endswith("hook_scale") or n.endswith("hook_pattern")  # noqa: E731
    _, cache = model.run_with_cache(TOKENS[None], names_filter=names)
    leaf = cache[RESID0].clone().requires_grad_(True)
    hooks = [(n, (lambda t, hook, v=v: v)) for n, v in cache.items() if n != RESID0]
    hooks.append((RESID0, lambda t, hook: leaf))
    with warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
        warnings.simplefilter("ignore")
        logits = model(TOKENS[None], return_type="logits")
    (logits[0, -1] @ vec).backward()
    return (leaf.grad[0] * leaf[0].detach()).sum(-1)


def test_graph_equals_model_jacobian_with_exact_transcoders(rmodel):
    tset = exact_mlp_transcoders(rmodel)
    graph = attribution_graph(rmodel, tset, TOKENS, targets=(4, 11))
    A, a, nf = graph.adjacency, graph.activations, graph.n_feat
    emb, logit = graph.embed_slice, graph.logit_slice
    w_ff = A[:nf, :nf] / a[None, :]  # d pre_t / d a_s; d a / d pre = 1 for active ReLU features
    total_f = torch.linalg.solve(torch.eye(nf) - w_ff, A[:nf, emb])  # feature inputs from each embedding
    total = A[logit, emb] + (A[logit, :nf] / a[None, :]) @ total_f
    want = frozen_jacobian_x_input(rmodel, graph.logit_vectors[0])
    torch.testing.assert_close(total[0], want, rtol=1e-4, atol=1e-4)
    # the direct embedding -> logit edge alone is not the total effect (features matter here)
    assert (A[logit, emb][0] - want).abs().max() > 1e-3


def test_llama_family_decomposition():
    from recallscope.models.tiny import tiny_model

    model = tiny_model("llama", n_layers=2, d_model=16, n_heads=4, d_vocab=32, seed=3)
    gen = torch.Generator().manual_seed(9)
    tcs = {}
    for layer in range(2):
        tc = Transcoder(TranscoderSpec(16, 24, 16, activation="relu", skip=True))
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        tcs[layer] = tc
    tset = TranscoderSet(tcs, 2)
    graph = attribution_graph(model, tset, TOKENS, targets=[1])
    check_exact_decomposition(model, tset, graph)


def test_prune_keeps_influential_nodes(rmodel):
    tset = exact_mlp_transcoders(rmodel)
    graph = attribution_graph(rmodel, tset, TOKENS, targets=[3])
    loose = prune(graph, node_threshold=0.99, edge_threshold=0.999)
    tight = prune(graph, node_threshold=0.5, edge_threshold=0.8)
    assert tight.node_mask.sum() < loose.node_mask.sum() <= graph.adjacency.shape[0]
    assert tight.edge_mask.sum() < loose.edge_mask.sum()
    assert loose.node_mask[graph.logit_slice].all() and tight.node_mask[graph.embed_slice].all()
    # the most influential feature survives the tight threshold
    best = int(tight.influence[: graph.n_feat].argmax())
    assert tight.node_mask[best]
    # edges only between kept nodes
    kept = tight.node_mask
    assert not (tight.edge_mask & ~(kept[:, None] & kept[None, :])).any()


def test_max_feature_nodes_computes_the_most_influential_rows_only(rmodel):
    tset = exact_mlp_transcoders(rmodel)
    full = attribution_graph(rmodel, tset, TOKENS, targets=[3])
    part = attribution_graph(rmodel, tset, TOKENS, targets=[3], max_feature_nodes=10, batch_size=4)
    done = part.rows_computed
    assert int(done[: part.n_feat].sum()) == 10 and done[part.logit_slice].all()
    torch.testing.assert_close(part.adjacency[done], full.adjacency[done])
    torch.testing.assert_close(part.node_input, full.node_input)
    torch.testing.assert_close(part.bias, full.bias)
    assert part.adjacency[: part.n_feat][~done[: part.n_feat]].abs().max() == 0
    # the first batch: the features with the largest direct influence on the logit
    direct = full.adjacency[full.logit_slice.start, : full.n_feat].abs()
    assert set(direct.topk(4).indices.tolist()) <= set(done[: part.n_feat].nonzero().squeeze(-1).tolist())


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_decomposition_with_random_transcoders(smollm2):
    """The linearisation holds on the real architecture (RMSNorm, rotary, GQA, gated SiLU): a partial set of
    random TopK skip-transcoders, rows for 16 features and the logit."""
    d = int(smollm2.cfg.d_model)
    gen = torch.Generator().manual_seed(0)
    tcs = {}
    for layer in (3, 20):
        tc = Transcoder(TranscoderSpec(d, 64, d, activation="topk", k=4, skip=True))
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        tcs[layer] = tc
    tset = TranscoderSet(tcs, int(smollm2.cfg.n_layers))
    tokens = smollm2.to_tokens("The capital of France is")[0]
    graph = attribution_graph(smollm2, tset, tokens, max_feature_nodes=16, batch_size=16)
    rows = graph.rows_computed.nonzero().squeeze(-1)
    assert rows.numel() == 17
    sums = graph.adjacency[rows].sum(1) + graph.bias[rows]
    torch.testing.assert_close(sums, graph.node_input[rows], rtol=1e-4, atol=2e-3)
    logits = smollm2(tokens[None], return_type="logits")[0, -1]
    torch.testing.assert_close(graph.node_input[graph.logit_slice], graph.logit_vectors @ logits, rtol=1e-4, atol=1e-3)
