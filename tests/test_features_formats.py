"""Transcoder formats: synthetic files written in each format's documented layout load back and compute
what that format's own forward pass computes (written here from the raw tensors, in the format's orientation)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from recallscope.errors import ConfigError, ResultFileError
from recallscope.features.formats import load_circuit_tracer, load_saelens, load_sparsify, load_transcoders

D, F, L = 8, 12, 3
GEN = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=GEN)


X = rnd(5, D)


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))


def test_circuit_tracer_plt_relu_skip(tmp_path):
    raw = {}
    for i in range(L):
        raw[i] = {"W_enc": rnd(F, D), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D), "W_skip": rnd(D, D)}
        save_file(raw[i], str(tmp_path / f"layer_{i}.safetensors"))
    write_yaml(tmp_path / "config.yaml", {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
                                          "feature_output_hook": "mlp.hook_out", "model_name": "toy"})
    tset = load_transcoders(tmp_path, L)
    assert tset.info.source == "circuit-tracer"
    assert tset.input_hook(2) == "blocks.2.hook_resid_mid" and tset.output_hook(0) == "blocks.0.mlp.hook_out"
    for i, t in raw.items():
        want = torch.relu(torch.nn.functional.linear(X, t["W_enc"], t["b_enc"])) @ t["W_dec"] + t["b_dec"] \
            + X @ t["W_skip"].T
        torch.testing.assert_close(tset[i](X), want)


def test_circuit_tracer_plt_topk_and_old_decoder_orientation(tmp_path):
    t = {"W_enc": rnd(F, D), "W_dec": rnd(D, F), "b_enc": rnd(F), "b_dec": rnd(D)}  # older files: W_dec [d_model, d_sae]
    save_file(t, str(tmp_path / "layer_0.safetensors"))
    write_yaml(tmp_path / "config.yaml", {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
                                          "feature_output_hook": "hook_mlp_out", "activation": "topk", "k": 3})
    tset = load_circuit_tracer(tmp_path, n_layers=2)
    pre = X @ t["W_enc"].T + t["b_enc"]
    vals, idx = pre.topk(3, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(tset[0](X), acts @ t["W_dec"].T + t["b_dec"])
    assert tset.layers == [0] and tset.n_layers == 2


def test_circuit_tracer_clt_jumprelu(tmp_path):
    raw = {}
    for i in range(L):
        raw[i] = {"W_enc": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D), "thr": rnd(F).abs(),
                  "W_dec": rnd(F, L - i, D)}
        save_file({f"W_enc_{i}": raw[i]["W_enc"], f"b_enc_{i}": raw[i]["b_enc"], f"b_dec_{i}": raw[i]["b_dec"],
                   f"threshold_{i}": raw[i]["thr"]}, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": raw[i]["W_dec"]}, str(tmp_path / f"W_dec_{i}.safetensors"))
    write_yaml(tmp_path / "config.yaml", {"model_kind": "cross_layer_transcoder",
                                          "feature_input_hook": "hook_resid_mid",
                                          "feature_output_hook": "hook_mlp_out"})
    tset = load_transcoders(tmp_path, L)
    xs = {i: rnd(5, D) for i in range(L)}
    acts_ref = {}
    for i in range(L):
        pre = xs[i] @ raw[i]["W_enc"].T + raw[i]["b_enc"]
        acts_ref[i] = pre * (pre > raw[i]["thr"])
    acts = {i: tset[i].encode(xs[i]) for i in range(L)}
    for layer in range(L):  # output at layer m = b_dec_m + sum_{i <= m} acts_i @ W_dec_i[:, m - i]
        want = raw[layer]["b_dec"] + sum(acts_ref[i] @ raw[i]["W_dec"][:, layer - i] for i in range(layer + 1))
        torch.testing.assert_close(tset.output(layer, xs, acts), want)
    assert tset[0].spec.n_targets == L and tset[2].spec.n_targets == 1


def write_saelens(d, arch, t, layer, extra=None):
    d.mkdir()
    save_file(t, str(d / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "d_out": D, "hook_name": f"blocks.{layer}.ln2.hook_normalized",
           "hook_name_out": f"blocks.{layer}.hook_mlp_out", **(extra or {})}
    (d / "cfg.json").write_text(json.dumps(cfg))


def test_saelens_skip_and_jumprelu_transcoders(tmp_path):
    skip = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D), "W_skip": rnd(D, D)}
    jump = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D), "threshold": rnd(F).abs()}
    write_saelens(tmp_path / "l0", "skip_transcoder", skip, 0)
    write_saelens(tmp_path / "l1", "jumprelu_transcoder", jump, 1)
    tset = load_transcoders(tmp_path, 2)
    assert tset.input_hook(1) == "blocks.1.ln2.hook_normalized"
    torch.testing.assert_close(tset[0](X), torch.relu(X @ skip["W_enc"] + skip["b_enc"]) @ skip["W_dec"]
                               + skip["b_dec"] + X @ skip["W_skip"].T)
    pre = X @ jump["W_enc"] + jump["b_enc"]
    torch.testing.assert_close(tset[1](X), (pre * (pre > jump["threshold"])) @ jump["W_dec"] + jump["b_dec"])


def test_saelens_clt(tmp_path):
    t = {"W_enc": rnd(L, D, F), "W_dec": rnd(L, F, L, D), "b_enc": rnd(L, F), "b_dec": rnd(L, D),
         "b_in": rnd(L, D), "threshold": rnd(L, F).abs()}
    for i in range(L):
        t["W_dec"][i, :, :i] = 0.0
    write_saelens(tmp_path / "clt", "jumprelu_clt", t, 0, {"n_layers": L})
    tset = load_saelens([tmp_path / "clt"], L)
    xs = rnd(L, 5, D)
    pre = torch.einsum("lnd,ldf->lnf", xs - t["b_in"][:, None], t["W_enc"]) + t["b_enc"][:, None]
    acts_ref = pre * (pre > t["threshold"][:, None])
    want = torch.einsum("lnf,lfmd->mnd", acts_ref, t["W_dec"]) + t["b_dec"][:, None]
    inputs = {i: xs[i] for i in range(L)}
    acts = {i: tset[i].encode(xs[i]) for i in range(L)}
    for m in range(L):
        torch.testing.assert_close(tset.output(m, inputs, acts), want[m], rtol=1e-5, atol=1e-5)


def test_sparsify_topk_skip(tmp_path):
    raws = {}
    for i in (0, 2):
        d = tmp_path / f"layers.{i}.mlp"
        d.mkdir()
        raws[i] = {"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "W_dec": rnd(F, D), "b_dec": rnd(D),
                   "W_skip": rnd(D, D)}
        save_file(raws[i], str(d / "sae.safetensors"))
        (d / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                                "num_latents": F, "k": 4, "multi_topk": False,
                                                "skip_connection": True, "transcode": True, "d_in": D}))
    tset = load_sparsify(tmp_path, L)
    assert tset.layers == [0, 2] and tset.input_hook(0) == "blocks.0.ln2.hook_out"
    for i, t in raws.items():  # sparsify: relu(linear) then top-k, decode, + x @ W_skip.mT
        pre = torch.relu(X @ t["encoder.weight"].T + t["encoder.bias"])
        vals, idx = pre.topk(4, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        torch.testing.assert_close(tset[i](X), acts @ t["W_dec"] + t["b_dec"] + X @ t["W_skip"].T)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ResultFileError, match="cannot tell the transcoder format"):
        load_transcoders(tmp_path, 2)
    d = tmp_path / "layers.0.mlp"
    d.mkdir()
    save_file({"encoder.weight": rnd(F, D)}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"transcode": False, "d_in": D, "k": 2}))
    with pytest.raises(ConfigError, match="SAE"):
        load_sparsify(tmp_path, 2)
