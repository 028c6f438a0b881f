"""The route verdict on a tiny model whose route is planted by construction.

The model (GPT-2 family, 2 layers, d_model 32, attention switched off) reads the input token " VAT" at
the last position; every embedding shares one large common direction so that LayerNorm does not blow a
weak feature up into a strong one. Route model: the embedding of " VAT" carries the direction of the concept " tax"
(which " tax"'s own embedding also carries) plus an equally strong identity direction that nothing reads,
and one layer-0 MLP neuron reads the concept direction and writes the output " Value". No-route model: " VAT" carries a private direction instead, read by another neuron
that writes the same output; the concept neuron still exists (so " tax" -> " Value" still works) but the
input no longer passes through it.
"""

from contextlib import contextmanager, nullcontext

import pytest
import torch

from recallscope.routes import (
    Concept,
    RouteConfig,
    RouteQuery,
    RouteReport,
    control_pool,
    route_report,
    swap_effect,
)
from recallscope.tasks.b64_stimuli import WORDS

PROMPTS = ("The word VAT", "I saw VAT", "Notes on VAT")
QUERY = RouteQuery(PROMPTS, " VAT", " Value")
SCALE = 6.0


def _tid(tok, text):
    (i,) = tok.encode(text, add_special_tokens=False)
    return i


class Planted:
    """The tiny model with the route planted, and :meth:`removed` to take the route out (in place)."""

    def __init__(self, tokenizer) -> None:
        from recallscope.models import tiny_model

        self.model = tiny_model("gpt2", tokenizer=tokenizer, seed=0, n_layers=2, d_model=32)
        sd = self.model.state_dict()
        gen = torch.Generator().manual_seed(1)
        basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
        self.basis = basis
        self.u_c, w_o, self.v_a, common = basis[:, 0], basis[:, 1], basis[:, 2], basis[:, 3]
        self.v_id = basis[:, 5]  # the input's own identity: read by nothing
        self.a, c, o = (_tid(tokenizer, t) for t in (" VAT", " tax", " Value"))
        new = {k: torch.zeros_like(v) for k, v in sd.items()}
        # every token shares a large common direction, so after LayerNorm a feature matters only when strong
        new["embed.weight"] = torch.randn(sd["embed.weight"].shape, generator=gen) * 0.3 + 10.0 * common
        new["pos_embed.weight"] = torch.randn(sd["pos_embed.weight"].shape, generator=gen) * 0.05
        new["unembed.weight"] = torch.randn(sd["unembed.weight"].shape, generator=gen) * 0.3
        for name in [k for k in sd if k.endswith(("ln1.weight", "ln2.weight", "ln_final.weight"))]:
            new[name] = torch.ones_like(sd[name])
        new["embed.weight"][c] += SCALE * self.u_c
        new["embed.weight"][self.a] += SCALE * self.u_c + SCALE * self.v_id
        new["unembed.weight"][o] = 4.0 * w_o
        # layer-0 MLP: neuron 0 reads the concept, neuron 1 the private direction; both write the output
        new["blocks.0.mlp.in.weight"][0] = 3.0 * self.u_c
        new["blocks.0.mlp.in.weight"][1] = 3.0 * self.v_a
        new["blocks.0.mlp.in.bias"][:2] = -1.5
        new["blocks.0.mlp.out.weight"][:, 0] = 8.0 * w_o
        new["blocks.0.mlp.out.weight"][:, 1] = 8.0 * w_o
        self.model.load_state_dict(new)

    @contextmanager
    def removed(self):
        """The input carries the private direction instead of the concept's; restored on exit."""
        weight = self.model.embed.weight
        with torch.no_grad():
            weight[self.a] += SCALE * (self.v_a - self.u_c)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                weight[self.a] -= SCALE * (self.v_a - self.u_c)


@pytest.fixture(scope="module")
def planted(gpt2_tokenizer):
    return Planted(gpt2_tokenizer)


@pytest.fixture(scope="module")
def pool(planted):
    return control_pool(planted.model, WORDS[:80])


CONFIG = RouteConfig(n_controls=8, n_boot=300)


def _top(model, prompt):
    with torch.no_grad():
        return model.tokenizer.decode([int(model(model.to_tokens(prompt))[0, -1].argmax())])


def test_planted_models_say_the_output(planted):
    for route in (True, False):
        with nullcontext(planted.model) if route else planted.removed() as model:
            assert all(_top(model, p) == " Value" for p in PROMPTS)
            assert _top(model, "I saw tax") == " Value"  # the concept itself leads to the output in both


def test_planted_route_is_found_and_removed_route_is_not(planted, pool, tmp_path):
    """New standard (issue 13): interchange along the concept beats every competitor class (the input itself,
    the output's casings, its neighbours, cosine- and norm-matched random directions) on 8 templates."""
    found = route_report(planted.model, QUERY, [" tax"], pool=pool, config=CONFIG, progress=False)
    row = found.routes()[0]
    assert found.verdict() == "route" and row.verdict == "route"
    assert len(found.query["prompts"]) == 8  # 3 prompts expanded to the default 8 templates
    assert row.peak_layer == 0 and 0 in row.layers
    assert row.score > 0.5 and row.p_value == pytest.approx(1 / 256) and row.p_holm == row.p_value
    assert row.mediation > 0.5 and set(row.margins) == {"input", "output", "neighbour", "random"}
    assert min(row.margins.values()) > 0.5
    assert row.similarity_z > 3
    with planted.removed() as model:
        gone = route_report(model, QUERY, [" tax"], pool=pool, config=CONFIG, progress=False)
    assert gone.verdict() == "no route"
    assert abs(gone.routes()[0].score) < 0.05
    back = RouteReport.load(found.save(tmp_path / "report"))
    assert back.routes() == found.routes()
    fig = found.plot()
    assert fig.data[0].type == "sankey"
    labels = fig.data[0].node.label
    assert any("(input)" in str(lab) for lab in labels) and any("(output)" in str(lab) for lab in labels)


def test_planted_route_given_as_a_direction(planted, pool):
    """The concept given as a vector (as organisms do) finds the same route."""
    by_vector = route_report(planted.model, QUERY, [Concept(direction=planted.u_c, label="planted")], pool=pool,
                             config=CONFIG, progress=False)
    assert by_vector.routes()[0].verdict == "route"


def test_swap_for_a_concept_with_the_same_output_keeps_it(planted):
    """Swapping the concept for the private direction (whose neuron writes the same output) keeps the output;
    swapping it for an unrelated direction removes it, at layer 0 where the neurons read."""
    same = Concept(direction=planted.v_a, label="private")
    other = Concept(direction=planted.basis[:, 4], label="unrelated")
    keep = swap_effect(planted.model, QUERY, " tax", same, layers=[0])
    lose = swap_effect(planted.model, QUERY, " tax", other, layers=[0])
    assert keep.shape == (3, 1)
    assert (keep.abs() < 0.5).all() and (lose < -3.0).all()
    torch.testing.assert_close(swap_effect(planted.model, QUERY, " tax", " tax", layers=[0, 1]), torch.zeros(3, 2))
