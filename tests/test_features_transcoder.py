"""Transcoders: exact MLP transcoders, the replacement model, training and resume, save/load."""

import pytest
import torch

from recallscope.features.replacement import fidelity, replaced
from recallscope.features.train import (TranscoderTrainConfig, collect_activations, explained_variance,
                                        sample_tokens, train_set, train_transcoder)
from recallscope.features.transcoder import (Transcoder, TranscoderSet, TranscoderSpec, exact_mlp_transcoders,
                                             mlp_as_transcoder)


def relu_model(seed: int = 0, n_layers: int = 2, d_model: int = 16, d_vocab: int = 24):
    """A tiny GPT-2-style model with a ReLU MLP and random (non-zero) biases and LayerNorm parameters."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, d_head=4, n_layers=n_layers, n_ctx=16, n_heads=d_model // 4,
                                  d_vocab=d_vocab, d_mlp=2 * d_model, seed=seed, act_fn="relu",
                                  normalization_type="LN", model_name=f"relu-{seed}")
    model = TransformerBridge.boot_native(cfg, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("b_in") or name.endswith("b_out") or "ln" in name or name.endswith("b_O"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


@pytest.fixture(scope="module")
def rmodel():
    return relu_model()


def test_exact_transcoder_replacement_equals_model(rmodel):
    tokens = torch.randint(0, 24, (3, 7), generator=torch.Generator().manual_seed(0))
    tset = exact_mlp_transcoders(rmodel)
    real = rmodel(tokens, return_type="logits")
    with replaced(rmodel, tset):
        repl = rmodel(tokens, return_type="logits")
    torch.testing.assert_close(repl, real, rtol=1e-5, atol=1e-5)
    fid = fidelity(rmodel, tset, tokens)
    assert fid.top1_agreement == 1.0 and abs(fid.kl) < 1e-6


def test_broken_transcoder_changes_the_output(rmodel):
    tokens = torch.randint(0, 24, (3, 7), generator=torch.Generator().manual_seed(0))
    tset = exact_mlp_transcoders(rmodel)
    with torch.no_grad():
        tset[1].W_dec.mul_(-3.0)
    assert fidelity(rmodel, tset, tokens).kl > 1e-3


def test_mlp_as_transcoder_refuses_gelu():
    from recallscope.errors import ConfigError
    from recallscope.models.tiny import tiny_model

    with pytest.raises(ConfigError, match="ReLU"):
        mlp_as_transcoder(tiny_model("gpt2", n_layers=1), 0)


def test_topk_keeps_k_features():
    tc = Transcoder(TranscoderSpec(4, 10, 4, activation="topk", k=3))
    with torch.no_grad():
        tc.W_enc.normal_()
        tc.b_enc.fill_(5.0)  # all pre-activations positive
    acts = tc.encode(torch.randn(6, 4))
    assert ((acts > 0).sum(-1) == 3).all()


def test_training_reduces_error_and_resume_is_bitwise(rmodel, tmp_path):
    tokens = sample_tokens(rmodel, 24, 8, seed=0)
    x, y = collect_activations(rmodel, tokens, [0])[0]
    cfg = TranscoderTrainConfig(d_sae=64, k=8, steps=60, batch_size=64, lr=3e-3, checkpoint_every=10)
    full, hist = train_transcoder(x, y, cfg, progress=False)
    assert hist[-1] < 0.5 * hist[0]
    untrained, _ = train_transcoder(x, y, TranscoderTrainConfig(**{**cfg.__dict__, "steps": 1}), progress=False)
    assert explained_variance(full, x, y) > explained_variance(untrained, x, y) + 0.2
    ckpt = tmp_path / "l0.pt"
    part, _ = train_transcoder(x, y, cfg, checkpoint=ckpt, stop_after=30, progress=False)
    assert not torch.equal(part.W_enc, full.W_enc)
    resumed, hist2 = train_transcoder(x, y, cfg, checkpoint=ckpt, progress=False)
    assert hist2 == hist
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


def test_train_set_save_load_roundtrip(rmodel, tmp_path):
    tokens = sample_tokens(rmodel, 150, 8, seed=1)
    cfg = TranscoderTrainConfig(d_sae=48, k=6, steps=150, batch_size=128, lr=3e-3)
    tset, report = train_set(rmodel, tokens, cfg, tmp_path, eval_fraction=0.2, progress=False)
    assert set(report.explained_variance) == {0, 1}
    assert all(ev > 0.8 for ev in report.explained_variance.values()), report
    loaded = TranscoderSet.load(tmp_path)
    tok = tokens[:3]
    with replaced(rmodel, tset):
        a = rmodel(tok, return_type="logits")
    with replaced(rmodel, loaded):
        b = rmodel(tok, return_type="logits")
    assert torch.equal(a, b)
    assert loaded.info.extra["train"]["d_sae"] == 48


def test_partial_set_replaces_only_its_layers(rmodel):
    tokens = torch.randint(0, 24, (2, 6), generator=torch.Generator().manual_seed(3))
    full = exact_mlp_transcoders(rmodel)
    partial = TranscoderSet({1: full[1]}, 2)
    with torch.no_grad():
        partial[1].W_dec.mul_(0.0)
    rec: dict = {}
    with replaced(rmodel, partial, record=rec):
        _, cache = rmodel.run_with_cache(tokens)
    _, real = rmodel.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], real["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"],
                               partial[1].b_dec.expand_as(real["blocks.1.hook_mlp_out"]))
    assert set(rec["acts"]) == {1}


def test_default_hooks_match_the_site_vocabulary(rmodel):
    from recallscope.features.transcoder import INPUT_HOOK, OUTPUT_HOOK
    from recallscope.sites import Site
    from recallscope.vocab import Component

    for layer in range(2):
        assert OUTPUT_HOOK.format(layer=layer) == Site(Component.MLP_OUT, layer).hook_name
        assert INPUT_HOOK.format(layer=layer) in rmodel.hook_dict
    _, cache = rmodel.run_with_cache(torch.tensor([[0, 3, 5]]))
    # the transcoder input is the MLP's own input: LayerNorm 2 applied to resid_mid
    torch.testing.assert_close(cache[INPUT_HOOK.format(layer=1)], cache["blocks.1.mlp.hook_in"])


def test_first_pos_leaves_out_bos(rmodel):
    tokens = torch.randint(0, 24, (3, 7), generator=torch.Generator().manual_seed(0))
    full = collect_activations(rmodel, tokens, [0])[0]
    nobos = collect_activations(rmodel, tokens, [0], first_pos=1)[0]
    assert full[0].shape[0] == 21 and nobos[0].shape[0] == 18
    torch.testing.assert_close(nobos[1], full[1].reshape(3, 7, -1)[:, 1:].reshape(18, -1))


def test_mismatched_transcoders_get_clear_errors(rmodel):
    from recallscope.errors import ConfigError
    from recallscope.features.transcoder import TranscoderSetInfo

    tokens = torch.tensor([[0, 1, 2]])
    wrong_width = TranscoderSet({0: Transcoder(TranscoderSpec(8, 4, 8, activation="relu"))}, 2)
    with pytest.raises(ConfigError, match="another model"):
        fidelity(rmodel, wrong_width, tokens)
    with pytest.raises(ConfigError, match="3-layer"):
        fidelity(rmodel, TranscoderSet({}, 3), tokens)
    bad_hook = TranscoderSet({0: Transcoder(TranscoderSpec(16, 4, 16, activation="relu"))}, 2,
                             TranscoderSetInfo(input_hook="blocks.{layer}.nope"))
    with pytest.raises(ConfigError, match="no hook"):
        fidelity(rmodel, bad_hook, tokens)
