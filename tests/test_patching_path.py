"""Path patching: the direct path to the logits against a hand computation, and invariants."""

import pytest
import torch

from recallscope import metrics as M
from recallscope.errors import ConfigError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching.activation import PatchingConfig, patch_tokens
from recallscope.patching.path import path_patching
from recallscope.sites import Site
from recallscope.tasks.pairs import PromptPair
from recallscope.vocab import Component

PAIRS = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid"),
         PromptPair("The capital of Spain is", "The capital of France is", " Madrid", " Paris")]


def test_direct_path_to_logits_equals_hand_computation(tiny):
    last = tiny.cfg.n_layers - 1
    senders = [Site(Component.HEAD_OUT, 0, head=h) for h in range(tiny.cfg.n_heads)]
    res = path_patching(tiny, PAIRS, senders=senders, receivers=[Site(Component.RESID_POST, last)], progress=False)
    stack = build_stack(tiny)
    clean = torch.cat([tiny.to_tokens(p.clean) for p in PAIRS])
    corrupt = torch.cat([tiny.to_tokens(p.corrupt) for p in PAIRS])
    ids = [tiny.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Madrid")]
    metric = M.LogitDiff(torch.tensor(ids), torch.tensor(ids[::-1]))
    with torch.no_grad():
        _, ct = run(stack, clean, record={"z"})
        _, rt = run(stack, corrupt, record={"z", "resid_post"})
        o = stack.layers[0].o
        for h in range(tiny.cfg.n_heads):
            dz_src, dz_tgt = torch.zeros_like(ct.acts[("z", 0)]), torch.zeros_like(ct.acts[("z", 0)])
            dz_src[:, :, h], dz_tgt[:, :, h] = ct.acts[("z", 0)][:, :, h], rt.acts[("z", 0)][:, :, h]
            final = rt.acts[("resid_post", last)] + o(dz_src.flatten(2)) - o(dz_tgt.flatten(2))
            want = metric(stack.unembed(stack.final_norm(final))[:, -1:])
            torch.testing.assert_close(res.values[:, h], want, atol=1e-4, rtol=1e-4)


def test_invariants(tiny):
    # a sender after every receiver has no path: the metric stays at the corrupted value
    res = path_patching(tiny, PAIRS, senders=[Site(Component.HEAD_OUT, 1, head=0)],
                        receivers=[Site(Component.Q, 0, head=h) for h in range(tiny.cfg.n_heads)], progress=False)
    torch.testing.assert_close(res.values[:, 0], res.corrupt, atol=1e-5, rtol=0)
    # an MLP sender in the last layer whose only receiver is the logits: same as activation patching it
    last = tiny.cfg.n_layers - 1
    res = path_patching(tiny, PAIRS, senders=[Site(Component.MLP_OUT, last)],
                        receivers=[Site(Component.RESID_POST, last)], progress=False)
    clean = torch.cat([tiny.to_tokens(p.clean) for p in PAIRS])
    corrupt = torch.cat([tiny.to_tokens(p.corrupt) for p in PAIRS])
    ids = [tiny.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Madrid")]
    metric = M.LogitDiff(torch.tensor(ids), torch.tensor(ids[::-1]))
    act, *_ = patch_tokens(tiny, clean, corrupt, metric,
                           PatchingConfig(component=Component.MLP_OUT, per_position=False, layers=(last,)),
                           progress=False)
    torch.testing.assert_close(res.values[:, 0], act[:, 0], atol=1e-4, rtol=0)


def test_bad_sites(tiny):
    with pytest.raises(ConfigError, match="senders must be"):
        path_patching(tiny, PAIRS, senders=[Site(Component.RESID_PRE, 0)], receivers=[Site(Component.Q, 1, head=0)],
                      progress=False)
    with pytest.raises(ConfigError, match="receivers must be"):
        path_patching(tiny, PAIRS, senders=[Site(Component.HEAD_OUT, 0, head=0)],
                      receivers=[Site(Component.RESID_POST, 0)], progress=False)
