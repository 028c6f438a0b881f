"""The fine-tune experiment's pieces on tiny models: cached trunk, LoRA, learning curves, resume, statistics,
the acronym-code item builder and the base64 hook search."""

import importlib.util
from pathlib import Path

import pytest
import torch

from recallscope.errors import CheckpointError, ConfigError, DatasetFormatError
from recallscope.finetune import curves as curves_mod
from recallscope.finetune.curves import TrainConfig, learning_curve
from recallscope.finetune.knowledge import left_pad, position_ids, teacher_forced
from recallscope.finetune.lora import attach_lora, merge_lora, remove_lora
from recallscope.finetune.stats import (bootstrap_ci, curve_auc, pair_differences, power_by_simulation,
                                        sign_flip_test)
from recallscope.finetune.trunk import cache_trunk, top_logits
from recallscope.tasks.acronym_code import (KnownAcronym, code_items, expansion_words, prompt_length,
                                            read_lexicons)
from recallscope.tasks.b64_hooks import first_byte, hook_candidates

ROOT = Path(__file__).resolve().parents[1]


def _llama(vocab: int = 97, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a frozen unembedding of init scale (std 0.02) cannot express confident answers
        model.lm_head.weight.normal_(0, 1.0)
    return model


def _batch(seed: int = 0, n: int = 6, vocab: int = 97):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]
    ids, mask = left_pad(seqs, 0)
    answers = torch.randint(0, vocab, (n,), generator=gen)
    return seqs, ids, mask, answers


# ------------------------------------------------------------------------------------------ trunk, LoRA
@pytest.mark.parametrize("from_layer", [0, 1, 2])
def test_cached_trunk_equals_full_forward(from_layer):
    model = _llama()
    seqs, ids, mask, _ = _batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        top = top_logits(model, cache_trunk(model, ids, mask, from_layer))
        alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs])
    torch.testing.assert_close(top, full.float())
    torch.testing.assert_close(top, alone, atol=1e-5, rtol=1e-4)  # left padding changes nothing


def test_trunk_rejects_bad_layer_and_non_llama():
    model = _llama()
    _, ids, mask, _ = _batch()
    with pytest.raises(ConfigError, match="from_layer must be in 0..2"):
        cache_trunk(model, ids, mask, 3)
    with pytest.raises(ConfigError, match="Llama layout"):
        cache_trunk(torch.nn.Linear(2, 2), ids, mask, 0)


def test_lora_starts_as_identity_merges_and_removes():
    model = _llama()
    _, ids, mask, _ = _batch()
    trunk = cache_trunk(model, ids, mask, 1)
    with torch.no_grad():
        before = top_logits(model, trunk)
    params = attach_lora(model, model.model.layers[1:], ("q_proj", "down_proj"), rank=2, alpha=4.0, seed=0)
    assert len(params) == 2 * 2 * 2 and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        torch.testing.assert_close(top_logits(model, trunk), before)  # B = 0
        for p in params[1::2]:
            p.normal_()
        changed = top_logits(model, trunk)
        assert (changed - before).abs().max() > 1e-3
        merged = merge_lora(_copy_with_lora(model))
        torch.testing.assert_close(top_logits(merged, trunk), changed, atol=1e-5, rtol=1e-4)
    remove_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(top_logits(model, trunk), before)


def _copy_with_lora(model):
    import copy

    return copy.deepcopy(model)


def test_lora_bad_targets_name_what_exists():
    model = _llama()
    with pytest.raises(ConfigError, match="no nn.Linear named \\['qproj'\\].*q_proj"):
        attach_lora(model, model.model.layers, ("qproj",), rank=2, alpha=2.0, seed=0)
    with pytest.raises(ConfigError, match="rank must be at least 1"):
        attach_lora(model, model.model.layers, ("q_proj",), rank=0, alpha=2.0, seed=0)


def test_training_reduces_loss_and_restores_the_model():
    model = _llama()
    _, ids, mask, answers = _batch()
    trunk = cache_trunk(model, ids, mask, 1)
    with torch.no_grad():
        before = top_logits(model, trunk)
    curve = learning_curve(model, trunk, answers, TrainConfig(steps=25, lr=5e-2, rank=4, from_layer=1),
                           seed=0, progress=False)
    assert curve.logp.shape == (26, 6) and curve.top1.shape == (26, 6)
    assert curve.logp[-1].mean() > curve.logp[0].mean() + 1.0
    assert curve.top1[-1].float().mean() > curve.top1[0].float().mean()
    with torch.no_grad():
        torch.testing.assert_close(top_logits(model, trunk), before)  # adapters removed
    torch.testing.assert_close(curve.logp[0], torch.log_softmax(before, -1).gather(1, answers[:, None])[:, 0])
    # the returned adapters, re-attached and merged, reproduce the curve's last point
    from recallscope.finetune.lora import load_lora_state

    attach_lora(model, model.model.layers[1:], TrainConfig().targets, rank=4, alpha=16.0, seed=0)
    load_lora_state(model, curve.adapters)
    merge_lora(model)
    with torch.no_grad():
        trained = torch.log_softmax(top_logits(model, trunk), -1).gather(1, answers[:, None])[:, 0]
    torch.testing.assert_close(trained, curve.logp[-1], atol=1e-4, rtol=1e-4)  # the last point is after all updates
    assert not any(isinstance(m, type(model.model.layers[1].self_attn.q_proj)) and hasattr(m, "lora_a")
                   for m in model.modules())


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    model = _llama()
    _, ids, mask, answers = _batch()
    trunk = cache_trunk(model, ids, mask, 1)
    cfg = TrainConfig(steps=6, lr=1e-2, rank=2, from_layer=1, checkpoint_every=2)
    straight = learning_curve(model, trunk, answers, cfg, seed=3, progress=False)
    real, calls = curves_mod.top_logits, {"n": 0}

    def crash_at_fifth(m, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(m, t)

    monkeypatch.setattr(curves_mod, "top_logits", crash_at_fifth)
    ckpt = tmp_path / "seed3.ckpt"
    with pytest.raises(KeyboardInterrupt):
        learning_curve(model, trunk, answers, cfg, seed=3, checkpoint=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    counted = {"n": 0}

    def count(m, t):
        counted["n"] += 1
        return real(m, t)

    monkeypatch.setattr(curves_mod, "top_logits", count)
    resumed = learning_curve(model, trunk, answers, cfg, seed=3, checkpoint=ckpt, progress=False)
    assert counted["n"] == 3  # steps 4, 5, 6 only
    torch.testing.assert_close(resumed.logp, straight.logp, atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match="another configuration"):
        learning_curve(model, trunk, answers, TrainConfig(steps=6, lr=2e-2, rank=2, from_layer=1,
                                                          checkpoint_every=2), seed=3, checkpoint=ckpt, progress=False)


def test_bad_train_config_is_named():
    with pytest.raises(ConfigError, match="steps must be >= 1.*lr must be > 0"):
        TrainConfig(steps=0, lr=0.0)
    model = _llama()
    _, ids, mask, answers = _batch()
    with pytest.raises(ConfigError, match="cached up to layer 1 but config.from_layer is 2"):
        learning_curve(model, cache_trunk(model, ids, mask, 1), answers, TrainConfig(from_layer=2), seed=0)


# ------------------------------------------------------------------------------------------ statistics
def test_curve_auc_is_the_normalised_trapezoid():
    logp = torch.tensor([[0.0, -4.0], [1.0, -2.0], [2.0, -2.0]])
    torch.testing.assert_close(curve_auc(logp), torch.tensor([1.0, -2.5]))  # (0.5 + 1.5) / 2; (-3 - 2) / 2
    with pytest.raises(ConfigError, match="at least 2 steps"):
        curve_auc(logp[:1])


def test_pair_differences_and_sign_flip():
    auc = torch.tensor([[3.0, 1.0, 5.0, 5.0], [1.0, 1.0, 6.0, 4.0]])  # [seed, item]
    pair = torch.tensor([0, 0, 1, 1])
    hooked = torch.tensor([True, False, False, True])
    torch.testing.assert_close(pair_differences(auc, pair, hooked), torch.tensor([1.0, -1.0]))
    with pytest.raises(ConfigError, match="pair 0 has 2 hooked"):
        pair_differences(auc, pair, torch.tensor([True, True, False, True]))
    assert sign_flip_test(torch.ones(5)) == pytest.approx(2 / 32)  # exact: only all-+ and all-- reach |mean| 1
    assert sign_flip_test(torch.tensor([1.0, -1.0, 2.0, -2.0])) == 1.0
    mc = sign_flip_test(torch.ones(20), n_perm=20_000, seed=1)
    assert mc == pytest.approx(1 / 20_001, abs=2e-4)
    lo, hi = bootstrap_ci(torch.arange(10.0), n_boot=4000)
    assert lo < 4.5 < hi and hi - lo < 5


def test_power_simulation_has_size_and_power():
    pilot = torch.randn(60, generator=torch.Generator().manual_seed(0))
    power = power_by_simulation(pilot, n_pairs=40, effects=[0.0, 1.5], n_sim=200, n_perm=500, seed=0)
    assert power[0.0] < 0.12 and power[1.5] > 0.95


# ------------------------------------------------------------------------------------------ items, hooks
def test_expansion_words():
    assert expansion_words("VAT", " Value Added Tax.\n\nThe VAT") == ("Value", "Added", "Tax")
    assert expansion_words("RFC", ' "Request for Comments". RFC') == ("Request", "for", "Comments")
    assert expansion_words("USA", " United States of America.") == ("United", "States", "America")
    assert expansion_words("NATO", " the North Atlantic Treaty Organization.") == ("North", "Atlantic", "Treaty",
                                                                                   "Organization")
    assert expansion_words("VAT", " Very Important Tax") is None
    assert expansion_words("VAT", " Value Added") is None


def test_read_lexicons_tolerates_spaces_and_names_bad_lines(tmp_path):
    good = tmp_path / "a.tsv"
    good.write_text("$tag\nVAT\tvalue added tax\nGVFS    git virtual file system\nAM\t{ante meridiem,amplitude mod}\n")
    lex = read_lexicons([good])
    assert lex["VAT"] == ("value added tax",) and lex["GVFS"] == ("git virtual file system",)
    assert lex["AM"] == ("ante meridiem", "amplitude mod")
    bad = tmp_path / "b.tsv"
    bad.write_text("VAT value added tax\n")
    with pytest.raises(DatasetFormatError, match="b.tsv:1"):
        read_lexicons([bad])


def test_code_items_match_tokenisation_and_answers(gpt2_tokenizer):
    known = [KnownAcronym(a, tuple(e.split()), "") for a, e in
             [("VAT", "Value Added Tax"), ("VAX", "Virtual Address Extension"), ("NASA", "N A S Admin"),
              ("CEO", "Chief Executive Officer"), ("GPS", "Global Positioning System"), ("FAQ", "F A Q")]]
    lexicon = {k.acronym: (" ".join(k.words).lower(),) for k in known}
    vocab = {"cat", "CAT", "dog"}
    items = code_items(known, gpt2_tokenizer, lexicon, vocab_words=vocab, seed=0, exclude_chunks={"FA"})
    again = code_items(known, gpt2_tokenizer, lexicon, vocab_words=vocab, seed=0, exclude_chunks={"FA"})
    assert items == again
    hooked = [i for i in items if i.group == "hooked"]
    assert [(i.chunk, i.answer) for i in hooked] == [("CE", "O"), ("GP", "S"), ("NAS", "A"), ("VA", "T")]
    letters = set("".join(i.chunk for i in hooked))
    for h in hooked:
        (c,) = [i for i in items if i.group == "control" and i.pair == h.pair]
        assert c.answer == h.answer and len(c.chunk) == len(h.chunk) and set(c.chunk) <= letters
        assert prompt_length(gpt2_tokenizer, c.chunk) == prompt_length(gpt2_tokenizer, h.chunk)
        assert c.chunk + c.answer not in lexicon and (c.chunk + c.answer).lower() not in vocab
        assert c.chunk not in {i.chunk for i in hooked}
    with pytest.raises(ConfigError, match="no known acronym"):
        code_items([], gpt2_tokenizer, lexicon, vocab_words=vocab, seed=0)


def test_b64_hook_candidates():
    assert first_byte("VA") == "T" and first_byte("WA") == "X" and first_byte("TA") == "L"
    cands = {(c.chunk, c.decoded, c.word) for c in hook_candidates(["VAT", "WAX", "TAX", "VA"])}
    assert cands == {("VA", "T", "VAT"), ("WA", "X", "WAX")}
    with pytest.raises(ValueError, match="two base64 alphabet characters"):
        first_byte("V")


def test_teacher_forced_matches_a_plain_forward(gpt2_tokenizer):
    model = _llama(vocab=len(gpt2_tokenizer), layers=2)
    forced = teacher_forced(model, gpt2_tokenizer, ["The word VA", "Hello"], ["T", " world again"])
    for f, (p, c) in zip(forced, [("The word VA", "T"), ("Hello", " world again")]):
        pi, ci = gpt2_tokenizer.encode(p), gpt2_tokenizer.encode(c)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([pi + ci])).logits[0]
        logp = torch.log_softmax(logits[len(pi) - 1:-1], -1).gather(1, torch.tensor(ci)[:, None]).sum()
        assert f.logp == pytest.approx(float(logp), abs=1e-4)
        assert f.greedy == bool((logits[len(pi) - 1:-1].argmax(-1) == torch.tensor(ci)).all())
    with pytest.raises(ConfigError, match="2 prompts but 1 continuations"):
        teacher_forced(model, gpt2_tokenizer, ["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------ the script
def _script():
    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "experiments" / "finetune_smollm2_b64.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prereg_loads_and_bad_prereg_is_named(tmp_path):
    mod = _script()
    prereg, config, seeds = mod.load_prereg(ROOT / "experiments" / "finetune_prereg.toml", "default")
    assert len(seeds) >= 3 and prereg["design"]["min_pairs"] >= 40 and prereg["analysis"]["alpha"] == 0.05
    assert config.from_layer > 0
    _, gpu, gpu_seeds = mod.load_prereg(ROOT / "experiments" / "finetune_prereg.toml", "gpu")
    assert gpu.from_layer == 0 and len(gpu_seeds) > len(seeds) and gpu.steps > config.steps
    text = (ROOT / "experiments" / "finetune_prereg.toml").read_text()
    with pytest.raises(SystemExit, match="no \\[scale.huge\\]"):
        mod.load_prereg(ROOT / "experiments" / "finetune_prereg.toml", "huge")
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("steps = 60", "steps = 0", 1))
    with pytest.raises(SystemExit, match="steps must be >= 1"):
        mod.load_prereg(bad, "default")
    bad.write_text(text.replace("[pilot]", "[pilot_x]"))
    with pytest.raises(SystemExit, match="missing \\[pilot\\]"):
        mod.load_prereg(bad, "default")


def test_greedy_generate_matches_stepwise_argmax(gpt2_tokenizer):
    from recallscope.finetune.knowledge import greedy_generate

    model = _llama(vocab=len(gpt2_tokenizer), layers=2)
    prompts = ["The word VA", "Hello there, my friend"]
    texts = greedy_generate(model, gpt2_tokenizer, prompts, max_new_tokens=3)
    for p, text in zip(prompts, texts):
        ids = gpt2_tokenizer.encode(p)
        for _ in range(3):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == gpt2_tokenizer.decode(ids[-3:])


def test_script_saves_the_finetuned_model(tmp_path, gpt2_tokenizer):
    from transformers import LlamaForCausalLM

    from recallscope.finetune.curves import Curve

    mod = _script()
    model = _llama()
    _, ids, mask, answers = _batch()
    trunk = cache_trunk(model, ids, mask, 1)
    cfg = TrainConfig(steps=5, lr=5e-2, rank=2, from_layer=1)
    curve = learning_curve(model, trunk, answers, cfg, seed=4, progress=False)
    mod.save_finetuned(model, gpt2_tokenizer, cfg, curve, tmp_path / "ft")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ft").eval()
    with torch.no_grad():
        logp = torch.log_softmax(top_logits(loaded, trunk), -1).gather(1, answers[:, None])[:, 0]
    torch.testing.assert_close(logp, curve.logp[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit, match="no adapters"):
        mod.save_finetuned(_llama(), gpt2_tokenizer, cfg, Curve(curve.logp, curve.top1, 4), tmp_path / "x")
