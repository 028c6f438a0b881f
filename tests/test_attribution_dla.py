"""Direct logit attribution: the parts add up to the read-out, each part is its exact direct effect where
that is defined (no final norm), and source positions split each head exactly."""

import pytest
import torch

from recallscope import metrics as M
from recallscope.attribution import DLAResult, direct_logit_attribution
from recallscope.errors import ConfigError
from recallscope.models.forward import forward
from recallscope.models.stack import build_stack
from recallscope.tasks.pairs import PromptPair
from test_attribution_toys import linear_model, random_pairs

PAIRS = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid",
                    spans={"bos": (0, 1), "subject": (4, 5)}),
         PromptPair("The capital of Italy is", "The capital of Japan is", " Rome", " Tokyo",
                    spans={"bos": (0, 1), "subject": (4, 5)})]


@pytest.mark.parametrize("target", ["logit_diff", "logit"])
def test_parts_sum_to_the_read_out(tiny, target):
    result = direct_logit_attribution(tiny, PAIRS, target)
    tokens = tiny.to_tokens([p.clean for p in PAIRS])
    with torch.no_grad():
        logits = tiny(tokens)[:, -1]
    ids = [[tiny.tokenizer.encode(a, add_special_tokens=False)[0] for a in (p.answer, p.wrong)] for p in PAIRS]
    want = torch.tensor([logits[i, a] - (logits[i, w] if target == "logit_diff" else 0) for i, (a, w) in enumerate(ids)])
    torch.testing.assert_close(result.total, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.sum(), result.total, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.by_source.sum(-1), result.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.by_layer().sum((1, 2)) + result.embed + result.constant, result.total,
                               atol=1e-4, rtol=0)
    assert result.heads.abs().max() > 1e-3


def test_each_part_is_its_direct_effect_without_a_final_norm():
    """With identity norms the read-out is linear in the final residual: removing one part from it
    changes the read-out by exactly that part's DLA."""
    model = linear_model(frozen=set(), qk_gain=1.0)
    tp, metric = random_pairs(change=(1,))
    result = direct_logit_attribution(model, tp, metric)
    stack = build_stack(model)
    n = tp.n_pos
    with torch.no_grad():
        x0 = stack.embed(tp.clean, torch.arange(n))
        final, trace = forward(stack, x0, record={"z", "mlp_out"}, unembed=False)
        read = lambda x: metric(stack.unembed(stack.final_norm(x))[:, None])  # noqa: E731
        full = read(final[:, -1])
        w_o = stack.layers[1].o
        z = trace.acts[("z", 1)][:, -1]
        for h in range(stack.n_heads):
            only = torch.zeros_like(z)
            only[:, h] = z[:, h]
            head_out = w_o(only.reshape(len(z), -1)) - w_o(torch.zeros_like(only).reshape(len(z), -1))
            torch.testing.assert_close(full - read(final[:, -1] - head_out), result.heads[:, 1, h], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(full - read(final[:, -1] - trace.acts[("mlp_out", 0)][:, -1]), result.mlp[:, 0],
                                   atol=1e-5, rtol=1e-4)


def test_by_span_splits_heads_between_subject_and_relation(tiny_gpt2, tmp_path):
    result = direct_logit_attribution(tiny_gpt2, PAIRS)
    split, names = result.by_span()
    assert names == ["bos", "subject", "relation"]
    torch.testing.assert_close(split.sum(-1), result.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(split[..., 1], result.by_source[..., 4], atol=1e-6, rtol=0)
    assert len(result.plot(top=10).data) >= 1 and len(result.plot_sources(top=5).data) == 3
    loaded = DLAResult.load(result.save(tmp_path / "dla"))
    torch.testing.assert_close(loaded.by_source, result.by_source)
    assert loaded.spans == result.spans


def test_dla_rejects_nonlinear_targets_and_missing_spans(tiny_gpt2):
    with pytest.raises(ConfigError, match="linear function"):
        direct_logit_attribution(tiny_gpt2, PAIRS, "prob")
    tp, metric = random_pairs()
    result = direct_logit_attribution(tiny_gpt2, tp, M.LogitDiff(tp.answer, tp.wrong))
    with pytest.raises(ConfigError, match="spans"):
        result.by_span()


@pytest.mark.smollm2
def test_dla_and_graph_forward_on_smollm2(smollm2):
    """RMSNorm from Hugging Face, grouped-query attention, no biases: parts still add up to the logit
    difference, and the graph forward reproduces the model's logits."""
    from recallscope.attribution.circuits import CircuitRunner

    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid")]
    result = direct_logit_attribution(smollm2, pairs)
    torch.testing.assert_close(result.sum(), result.total, atol=1e-3, rtol=1e-4)
    runner = CircuitRunner(smollm2, pairs, "logit_diff")
    torch.testing.assert_close(runner.clean, result.total, atol=1e-3, rtol=1e-4)
    assert float(result.total[0]) > 1.0, "SmolLM2 prefers Paris to Madrid here"
