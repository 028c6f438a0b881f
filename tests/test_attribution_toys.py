"""Toy models with known answers for the attribution tests, and checks that they have the properties claimed.

- :func:`linear_model`: no LayerNorm (identity norms), identity MLP activation, and W_Q = b_Q = 0 in the
  layers listed as ``frozen`` (every score is 0, so the pattern is the uniform causal one whatever the
  input). With every layer frozen the logits are an affine function of every activation, and the logit
  difference is linear in each, so attribution patching (first order) must equal exact patching. With
  layer 0 unfrozen, the only nonlinearity is layer 0's softmax: the metric is then linear in layer 0's
  attention pattern, which makes AtP*'s exact-softmax estimates for layer-0 queries and keys exact.
- :func:`planted_model`: a 2-layer LayerNorm/GELU model in which only head 0.1 can move the change of the
  token at position 2 to the last position, where MLPs 0 and 1 process it (see :data:`PLANTED_EDGES`).
  The input also feeds MLP 0 and every head directly, but those edges cannot matter: MLP 0 at
  position 2 is read by nothing, and no other head writes.
"""

import pytest
import torch

from recallscope import metrics as M
from recallscope.models.stack import unwrap
from recallscope.tasks.pairs import TokenizedPairs

VOCAB = 50
PLANTED_EDGES = ("input -> a0.h1.v", "a0.h1 -> m0", "a0.h1 -> m1", "a0.h1 -> logits", "m0 -> m1", "m0 -> logits",
                 "m1 -> logits")
"""The edges of :func:`planted_model` through which the corruption at position 2 reaches the logits."""


def native_model(*, norm: str | None = "LN", act_fn: str = "gelu", n_kv: int | None = None, seed: int = 0,
                 n_layers: int = 2, d_model: int = 32, n_heads: int = 4):
    """A TransformerLens-native model without tokenizer (tests feed tokens directly)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    extra = {}
    if n_kv is not None:
        extra = dict(n_key_value_heads=n_kv, positional_embedding_type="rotary", rotary_dim=d_model // n_heads,
                     gated_mlp=True)
    cfg = TransformerBridgeConfig(d_model=d_model, d_head=d_model // n_heads, n_layers=n_layers, n_ctx=32,
                                  n_heads=n_heads, d_vocab=VOCAB, d_mlp=4 * d_model, act_fn=act_fn,
                                  normalization_type=norm, seed=seed, model_name=f"toy-{norm}-{act_fn}-{seed}", **extra)
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    return model


def _layers(model):
    return [unwrap(b) for b in unwrap(model.original_model).layers]


def linear_model(frozen: set[int], *, qk_gain: float = 8.0, seed: int = 0):
    """See the module docstring; ``qk_gain`` sharpens the unfrozen layers' attention (saturation)."""
    model = native_model(norm=None, seed=seed)
    with torch.no_grad():
        for i, block in enumerate(_layers(model)):
            unwrap(block.mlp).act = lambda x: x
            attn = unwrap(block.attn)
            q, k = unwrap(attn.q), unwrap(attn.k)
            if i in frozen:
                q.weight.zero_()
                q.bias.zero_()
            else:
                q.weight.mul_(qk_gain)
                k.weight.mul_(qk_gain)
    return model


def planted_model():
    """Layer 0: uniform attention (W_Q = 0); only head 1 writes (W_O of heads 0, 2, 3 zeroed). Layer 1: no
    head writes. The corruption changes the token at position 2 only; the logits read the last one."""
    model = native_model(norm="LN", seed=3)
    d_head = 8
    with torch.no_grad():
        blocks = _layers(model)
        for layer, block in enumerate(blocks):
            attn = unwrap(block.attn)
            o = unwrap(attn.o)
            for h in range(4):
                if layer == 1 or h != 1:
                    o.weight[:, h * d_head:(h + 1) * d_head] = 0.0
            if layer == 0:
                unwrap(attn.q).weight.zero_()
                unwrap(attn.q).bias.zero_()
                o.weight.mul_(6.0)
        unwrap(blocks[1].mlp).fc_out.weight.mul_(6.0)
    return model


def random_pairs(*, batch: int = 3, n_pos: int = 6, change: tuple[int, ...] = (2,), seed: int = 0
                 ) -> tuple[TokenizedPairs, M.LogitDiff]:
    """Random clean tokens, corrupt = clean with the ``change`` positions resampled, random answers."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (batch, n_pos), generator=g)
    corrupt = clean.clone()
    for p in change:
        corrupt[:, p] = (clean[:, p] + torch.randint(1, VOCAB, (batch,), generator=g)) % VOCAB
    answer = torch.randint(0, VOCAB, (batch,), generator=g)
    wrong = (answer + torch.randint(1, VOCAB, (batch,), generator=g)) % VOCAB
    return TokenizedPairs(clean, corrupt, answer, wrong, ()), M.LogitDiff(answer, wrong)


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_linear_model_is_affine_in_the_embeddings():
    from recallscope.models.forward import forward
    from recallscope.models.stack import build_stack

    stack = build_stack(linear_model({0, 1}))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        f = lambda x: forward(stack, x)[0]  # noqa: E731
        torch.testing.assert_close(f(a + b) + f(torch.zeros_like(a)), f(a) + f(b), atol=1e-4, rtol=1e-4)


def test_planted_circuit_is_exactly_the_planted_edges(planted):
    """Ablating any single edge changes the metric iff it is one of PLANTED_EDGES (exact, no gradients)."""
    from recallscope.attribution.circuits import CircuitRunner

    tp, metric = random_pairs()
    runner = CircuitRunner(planted, tp, metric)
    g = runner.graph
    truth = {g.edge(e) for e in PLANTED_EDGES}
    base = runner.metric(g.valid.float())
    for u, v in g.valid.nonzero().tolist():
        keep = g.valid.float().clone()
        keep[u, v] = 0
        change = float((runner.metric(keep) - base).abs().max())
        if (u, v) in truth:
            assert change > 0.05, f"{g.edge_label(u, v)} should matter"
        else:
            assert change < 1e-5, f"{g.edge_label(u, v)} should not matter ({change})"
