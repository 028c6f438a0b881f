"""The graph forward and edge attribution: exact equalities with the model, path patching and AtP, and
EAP-IG's convergence to exact patching as the number of steps grows."""

import pytest
import torch

from recallscope.attribution import EdgeScores, atp, eap, eap_ig
from recallscope.attribution.circuits import CircuitRunner
from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching import path_patching
from recallscope.patching.activation import PatchingConfig, patch_tokens
from recallscope.sites import Site
from recallscope.vocab import Component, Direction
from test_attribution_toys import native_model, random_pairs


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def toy(request):
    if request.param == "gpt2":
        return native_model(norm="LN", seed=2)
    return native_model(norm="RMS", act_fn="silu", n_kv=2, seed=2)


def test_graph_forward_keeps_the_model_and_ablating_everything_gives_the_corrupt_run(toy):
    tp, metric = random_pairs(change=(1, 3))
    runner = CircuitRunner(toy, tp, metric)
    stack = build_stack(toy)
    with torch.no_grad():
        clean = metric(run(stack, tp.clean, read_pos=runner.prep.read)[0])
        corrupt = metric(run(stack, tp.corrupt, read_pos=runner.prep.read)[0])
    g = runner.graph
    torch.testing.assert_close(runner.clean, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.corrupt, corrupt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.metric(g.valid.float()), clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runner.metric(torch.zeros(g.n_senders, g.n_receivers)), corrupt, atol=1e-5, rtol=1e-5)
    few = torch.zeros(g.n_senders, g.n_receivers, tp.n_pos)  # per-position: keep everything at one position
    few[..., 4] = g.valid.float()
    many = g.valid.float()[..., None].repeat(1, 1, tp.n_pos)
    many[..., [0, 1, 2, 3, 5]] = 0
    torch.testing.assert_close(runner.metric(few), runner.metric(many), atol=1e-5, rtol=1e-5)


def test_single_edge_ablation_equals_path_patching(toy):
    """Ablating one edge sender -> receiver is noising path patching with that sender and receiver."""
    tp, metric = random_pairs(change=(1, 3))
    runner = CircuitRunner(toy, tp, metric)
    g = runner.graph
    kv = g.n_kv_heads
    cases = [((Component.HEAD_OUT, 0, 1), (Component.Q, 1, 2), g.q(1, 2)),
             ((Component.HEAD_OUT, 0, 3), (Component.K, 1, 1), g.k(1, 1)),
             ((Component.MLP_OUT, 0, None), (Component.V, 1, kv - 1), g.v(1, kv - 1)),
             ((Component.HEAD_OUT, 0, 2), (Component.MLP_OUT, 0, None), g.mlp_input(0)),
             ((Component.HEAD_OUT, 1, 0), (Component.RESID_POST, 1, None), g.logits),
             ((Component.MLP_OUT, 1, None), (Component.RESID_POST, 1, None), g.logits)]
    for (sc, sl, sh), (rc, rl, rh), v in cases:
        u = g.mlp(sl) if sc == Component.MLP_OUT else g.head(sl, sh)
        keep = g.valid.float().clone()
        keep[u, v] = 0
        ref = path_patching(toy, tp, metric, senders=[Site(sc, sl, head=sh)], receivers=[Site(rc, rl, head=rh)],
                            direction=Direction.NOISING, progress=False)
        torch.testing.assert_close(runner.metric(keep), ref.values[:, 0], atol=1e-5, rtol=1e-4)
        assert (ref.values[:, 0] - ref.clean).abs().max() > 1e-4, g.edge_label(u, v)


def test_node_sums_of_eap_are_attribution_patching(toy):
    """Summing a sender's outgoing edges gives gradient x activation difference of that node (AtP)."""
    tp, metric = random_pairs(change=(1, 3))
    for method, steps in (("eap", 1), ("eap-ig-inputs", 3)):
        scores = eap(toy, tp, metric, method=method, steps=steps, progress=False)
        nodes = scores.edge_matrix().sum(1)
        ref = atp(toy, tp, metric, direction="noising", components=["z", "mlp_out"], ig_steps=steps * (method != "eap"),
                  progress=False)
        g = scores.graph
        heads = torch.stack([nodes[g.head(layer, 0):g.mlp(layer)] for layer in range(g.n_layers)])
        torch.testing.assert_close(heads, ref.mean("z").sum(-1), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(nodes[[g.mlp(layer) for layer in range(g.n_layers)]], ref.mean("mlp_out").sum(-1),
                                   atol=2e-5, rtol=1e-4)


def _exact_group_effects(model, tp, metric) -> torch.Tensor:
    """Exact noising effect of patching each sender group's output at every position at once."""
    out = []
    for comp in (Component.ATTN_OUT, Component.MLP_OUT):
        values, clean, _, _ = patch_tokens(model, tp.clean, tp.corrupt, metric, PatchingConfig(
            component=comp, per_position=False, direction=Direction.NOISING), progress=False)
        out.append((values - clean[:, None]).mean(0))
    return torch.stack(out, dim=1)  # [layer, (attn, mlp)]


def test_eap_ig_converges_to_exact_patching(tiny_gpt2):
    """IG on activations: all edges out of a group sum to that group's exact patching effect as steps grow
    (midpoint rule: the error falls about 4x per doubling). IG on inputs: the input's edges sum to the
    whole clean-corrupt difference."""
    tp, metric = random_pairs(change=(2,))
    exact = _exact_group_effects(tiny_gpt2, tp, metric)
    gap = float((metric(run(build_stack(tiny_gpt2), tp.corrupt)[0][:, -1:]) -
                 metric(run(build_stack(tiny_gpt2), tp.clean)[0][:, -1:])).mean())
    errors, input_errors = [], []
    for steps in (1, 2, 4, 16):
        scores = eap_ig(tiny_gpt2, tp, metric, steps=steps, on="activations", progress=False)
        nodes, g = scores.edge_matrix().sum(1), scores.graph
        got = torch.stack([torch.stack([nodes[g.head(layer, 0):g.mlp(layer)].sum(), nodes[g.mlp(layer)]])
                           for layer in range(g.n_layers)])
        errors.append(float((got - exact).abs().max()))
        inputs = eap_ig(tiny_gpt2, tp, metric, steps=steps, on="inputs", progress=False)
        input_errors.append(abs(float(inputs.edge_matrix()[0].sum()) - gap))
    assert exact.abs().max() > 0.02
    for errs, scale in ((errors, float(exact.abs().max())), (input_errors, abs(gap))):
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 2e-3 * scale, errs


def test_per_position_scores_sum_to_edge_scores(toy):
    tp, metric = random_pairs(change=(1, 3))
    flat = eap(toy, tp, metric, method="eap-ig-inputs", steps=2, progress=False)
    per_pos = eap(toy, tp, metric, method="eap-ig-inputs", steps=2, per_position=True, progress=False)
    assert per_pos.scores.shape == (*flat.scores.shape, tp.n_pos)
    torch.testing.assert_close(per_pos.edge_matrix(), flat.scores, atol=1e-6, rtol=1e-5)
    assert per_pos.scores[..., :1].abs().max() < 1e-7, "nothing before the first changed token can differ"


def test_edge_scores_plumbing(tmp_path, toy):
    tp, metric = random_pairs(change=(1, 3))
    scores = eap(toy, tp, metric, method="eap", progress=False)
    g = scores.graph
    assert (scores.scores[~g.valid] == 0).all()
    label, value = scores.ranked(1)[0]
    assert float(scores.scores[g.edge(label)]) == value and abs(value) == float(scores.scores.abs().max())
    assert scores.top(7).n_edges == 7 and len(scores.plot(top=10).data) >= 1
    loaded = EdgeScores.load(scores.save(tmp_path / "eap"))
    torch.testing.assert_close(loaded.scores, scores.scores)
    assert loaded.graph == g and loaded.config == scores.config
    with pytest.raises(ConfigError, match="no edge"):
        g.edge("m0 -> a0.h0.q")  # wrong direction: not a name of this graph either
    with pytest.raises(ConfigError, match="inputs"):
        eap_ig(toy, tp, metric, on="weights")


def test_graph_names_and_validity():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2)
    assert g.n_senders == 11 and g.n_receivers == 2 * (4 + 4 + 1) + 1
    assert g.receivers[g.k(1, 1)] == "a1.kv1.k" and g.receiver_node(g.q(0, 3)) == "a0.h3"
    assert g.valid[g.head(0, 1), g.mlp_input(0)] and not g.valid[g.head(0, 1), g.q(0, 0)]
    assert not g.valid[g.mlp(0), g.mlp_input(0)] and g.valid[g.mlp(1), g.logits]
    assert Graph(2, 4, 4, parallel=True).valid[Graph(2, 4, 4).head(0, 0), Graph(2, 4, 4).mlp_input(0)] == False  # noqa: E712
