"""Feature interventions: oracle checks against neuron-level hooks (exact transcoders), and the graph's
prediction of an intervention's effect on a logit."""

import pytest
import torch
from test_features_transcoder import relu_model

from recallscope.errors import ConfigError
from recallscope.features.graph import attribution_graph
from recallscope.features.interventions import FeatureEdit, Supernode, run_intervention, swap_edits
from recallscope.features.transcoder import exact_mlp_transcoders

TOKENS = torch.tensor([0, 5, 9, 3, 17, 2])
OTHER = torch.tensor([0, 8, 1, 3, 12, 6])


@pytest.fixture(scope="module")
def setup():
    model = relu_model(seed=4, n_layers=3)
    return model, exact_mlp_transcoders(model)


def neuron_hook_logits(model, tokens, layer, fn):
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", fn)]):
        return model(tokens[None], return_type="logits")[0]


def test_ablating_a_feature_equals_zeroing_its_neuron(setup):
    model, tset = setup
    clean = run_intervention(model, tset, TOKENS, [])
    layer, pos = 1, 4
    feature = int(clean.clean_acts[layer][pos].argmax())
    res = run_intervention(model, tset, TOKENS, [FeatureEdit(layer, feature, pos, value=0.0)])

    def zero(t, hook):
        t = t.clone()
        t[0, pos, feature] = 0.0
        return t

    torch.testing.assert_close(res.logits, neuron_hook_logits(model, TOKENS, layer, zero), rtol=1e-5, atol=1e-5)
    assert res.acts[layer][pos, feature] == 0 and clean.clean_acts[layer][pos, feature] > 0
    assert (res.logits - res.clean_logits).abs().max() > 1e-4
    torch.testing.assert_close(res.acts[0], res.clean_acts[0])  # upstream untouched


def test_swap_equals_patching_neurons_from_another_prompt(setup):
    model, tset = setup
    layer, pos = 2, 5
    feats = [(layer, pos, f) for f in range(tset[layer].spec.d_sae)]
    res = run_intervention(model, tset, TOKENS, swap_edits(model, tset, OTHER, feats))
    _, cache = model.run_with_cache(OTHER[None])
    src = cache[f"blocks.{layer}.mlp.hook_post"][0, pos]

    def patch(t, hook):
        t = t.clone()
        t[0, pos] = src
        return t

    torch.testing.assert_close(res.logits, neuron_hook_logits(model, TOKENS, layer, patch), rtol=1e-5, atol=1e-5)


def test_graph_predicts_the_effect_of_steering_a_feature(setup):
    """Planted check: the graph's path sum d logit / d a_f predicts the logit change when feature f is
    steered a little, with attention and norms frozen (then the model is exactly the graph's linear map)."""
    model, tset = setup
    target = (4, 11)
    graph = attribution_graph(model, tset, TOKENS, targets=target)
    A, a, nf = graph.adjacency, graph.activations, graph.n_feat
    w_ff = A[:nf, :nf] / a[None, :]
    d_logit_d_act = torch.linalg.solve((torch.eye(nf) - w_ff).T, (A[graph.logit_slice, :nf] / a[None, :])[0])
    early = (graph.features[:, 0] == 0).nonzero().squeeze(-1)
    n = int(early[(d_logit_d_act[early] * a[early]).abs().argmax()])  # the layer-0 feature with the largest effect
    layer, pos, f = graph.features[n].tolist()
    eps = 1e-3
    res = run_intervention(model, tset, TOKENS, [FeatureEdit(layer, f, pos, scale=1 + eps)],
                           freeze=("attention", "norms"))
    observed = res.logit_change(target[0]) - res.logit_change(target[1])
    predicted = float(eps * a[n] * d_logit_d_act[n])
    assert abs(predicted) > 1e-5
    assert observed == pytest.approx(predicted, rel=1e-3, abs=1e-6)
    # ablating it moves the logit difference the predicted way when the model is frozen-linear
    abl = run_intervention(model, tset, TOKENS, [FeatureEdit(layer, f, pos, value=0.0)], freeze=("attention", "norms"))
    drop = abl.logit_change(target[0]) - abl.logit_change(target[1])
    assert drop * predicted < 0


def test_supernode_and_bad_edits(setup):
    model, tset = setup
    clean = run_intervention(model, tset, TOKENS, [])
    top = clean.clean_acts[1][3].topk(2).indices.tolist()
    node = Supernode("pair", tuple((1, 3, f) for f in top))
    res = run_intervention(model, tset, TOKENS, node.ablate())
    assert all(res.acts[1][3, f] == 0 for f in top)
    with pytest.raises(ConfigError, match="exactly one"):
        FeatureEdit(0, 1)
    with pytest.raises(ConfigError, match="freeze"):
        run_intervention(model, tset, TOKENS, [], freeze=("mlp",))
