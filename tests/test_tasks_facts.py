"""Tests for the fact suite: built-in set, spans, counterfactual pairs and the recall filter."""

import json
from dataclasses import replace

import pytest
import torch

from recallscope.errors import ConfigError, DatasetFormatError, EmptyDatasetError, LengthMismatchError
from recallscope.tasks.facts import (
    Fact,
    RecallResult,
    Relation,
    _bounds_from_decoding,
    _bounds_from_offsets,
    attribute_token_ids,
    counterfactual_pairs,
    fact_spans,
    load_builtin_facts,
    parse_criterion,
    recalled_facts,
)
from recallscope.tasks.pairs import group_by_length, tokenize_pairs


@pytest.fixture(scope="module")
def facts() -> list[Fact]:
    return load_builtin_facts()


def _decode(model, ids, span) -> str:
    return model.tokenizer.decode(ids[span[0]:span[1]], clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------- built-in set


def test_builtin_set_is_large_varied_and_unique(facts):
    assert len(facts) >= 150
    relations = {f.relation for f in facts}
    assert len(relations) >= 8
    assert relations <= {r.value for r in Relation}
    prompts = [f.prompt for f in facts]
    assert len(set(prompts)) == len(prompts)
    assert all(f.template == Relation(f.relation).template for f in facts)


def test_builtin_set_spot_checks(facts):
    by_prompt = {f.prompt: f.attribute for f in facts}
    assert by_prompt["The capital of France is"] == " Paris"
    assert by_prompt["The acronym VAT stands for"].split()[0] == "Value"
    assert by_prompt['The chemical symbol for gold is "'] == "Au"
    assert by_prompt['The opposite of "hot" is "'] == "cold"
    assert by_prompt["The Eiffel Tower is located in the city of"] == " Paris"


def test_builtin_attributes_start_with_a_real_first_token(facts, gpt2_tokenizer):
    for f in facts:
        ids = gpt2_tokenizer.encode(f.prompt + f.attribute)
        first = gpt2_tokenizer.decode(ids[len(gpt2_tokenizer.encode(f.prompt))])
        assert first.strip(), f"{f.prompt!r} -> first token {first!r} is whitespace only"
        assert f.attribute.startswith(first), (f.prompt, first)


def test_load_builtin_facts_filters_relations(facts):
    capitals = load_builtin_facts([Relation.CAPITAL, "acronym"])
    assert {f.relation for f in capitals} == {"capital", "acronym"}
    assert len(capitals) == sum(f.relation in ("capital", "acronym") for f in facts)
    with pytest.raises(ConfigError, match="unknown relation"):
        load_builtin_facts(["capitals"])


def test_fact_validates_and_builds_prompt():
    fact = Fact("France", Relation.CAPITAL, "The capital of {} is", " Paris")
    assert fact.relation == "capital" and type(fact.relation) is str
    assert fact.prompt == "The capital of France is"
    assert fact.prompt[slice(*fact.subject_chars)] == "France"
    with pytest.raises(DatasetFormatError, match="placeholder"):
        Fact("France", "capital", "The capital of France is", " Paris")
    with pytest.raises(DatasetFormatError, match="leading space"):
        Fact("France", "capital", "The capital of {} is", "Paris")
    with pytest.raises(DatasetFormatError, match="ends with whitespace"):
        Fact("France", "capital", "The capital of {} is ", "Paris")


# ---------------------------------------------------------------------------------------------- spans


def test_spans_decode_to_the_subject_on_tiny_gpt2(tiny_gpt2, facts):
    bos = tiny_gpt2.tokenizer.bos_token_id
    for fact in facts:
        ids = tiny_gpt2.to_tokens(fact.prompt)[0].tolist()
        spans = fact_spans(tiny_gpt2, fact)
        assert spans["bos"] == (0, 1) and ids[0] == bos
        assert _decode(tiny_gpt2, ids, spans["subject"]).strip() == fact.subject
        assert spans["subject_last"] == (spans["subject"][1] - 1, spans["subject"][1])
        assert spans["last"] == (len(ids) - 1, len(ids))
        pieces = [_decode(tiny_gpt2, ids, spans[k]) for k in ("relation_before", "subject", "relation_after")]
        assert "".join(pieces) == fact.prompt
        n_attr = len(attribute_token_ids(tiny_gpt2, fact))
        assert spans["attribute"] == (len(ids), len(ids) + n_attr)


def test_relation_span_is_the_longer_template_block(tiny_gpt2):
    before = fact_spans(tiny_gpt2, Fact("France", "capital", "The capital of {} is", " Paris"))
    assert before["relation"] == before["relation_before"] == (1, 4)
    after = fact_spans(tiny_gpt2, Fact("Hamlet", "author", "{} was written by", " William"))
    assert after["relation"] == after["relation_after"]
    assert after["relation_before"] == (1, 1)


def test_subject_inside_a_word_covers_the_straddling_token(tiny_gpt2):
    fact = Fact("Paris", "demonym", "I met a {}ian in the street and", " we")
    ids = tiny_gpt2.to_tokens(fact.prompt)[0].tolist()
    text = _decode(tiny_gpt2, ids, fact_spans(tiny_gpt2, fact)["subject"])
    assert "Paris" in text


def test_decoding_fallback_matches_offsets(tiny_gpt2, facts):
    tok = tiny_gpt2.tokenizer
    for text in [f.prompt for f in facts] + ["Zürich is in Switzerland"]:
        ids = tiny_gpt2.to_tokens(text)[0].tolist()
        offsets = _bounds_from_offsets(tok, text, ids)
        assert offsets is not None and offsets[0] == (0, 0)  # BOS: an empty range
        assert _bounds_from_decoding(tok, text, ids) == offsets, text
    # " 東" is split into byte pieces: decoding gives the pieces the whole " 東", offsets only "東"
    text = "naïve café 東京 is"
    ids = tiny_gpt2.to_tokens(text)[0].tolist()
    offsets, decoded = _bounds_from_offsets(tok, text, ids), _bounds_from_decoding(tok, text, ids)
    assert offsets is not None and len(decoded) == len(offsets)
    assert all(c <= a and b == d for (a, b), (c, d) in zip(offsets, decoded))
    assert decoded[4:7] == [(10, 12)] * 3


@pytest.mark.smollm2
def test_spans_on_smollm2_tokenisation(smollm2):
    fact = Fact("France", "capital", "The capital of {} is", " Paris")
    spans = fact_spans(smollm2, fact)
    ids = smollm2.to_tokens(fact.prompt)[0].tolist()
    assert spans["bos"] == (0, 1)
    assert _decode(smollm2, ids, spans["subject"]) == " France"


# ------------------------------------------------------------------------------------ counterfactuals


def test_counterfactual_pairs_equal_length_and_differing_answers(tiny_gpt2, facts):
    result = counterfactual_pairs(tiny_gpt2, facts, seed=0)
    assert len(result) + len(result.skipped) == len(facts)
    assert len(result) >= 0.9 * len(facts)
    by_prompt = {f.prompt: f for f in facts}
    for pair in result:
        clean, corrupt = by_prompt[pair.clean], by_prompt[pair.corrupt]
        assert clean.relation == corrupt.relation and clean.template == corrupt.template
        assert tiny_gpt2.to_tokens(pair.clean).shape == tiny_gpt2.to_tokens(pair.corrupt).shape
        assert fact_spans(tiny_gpt2, corrupt)["subject"] == pair.spans["subject"]
        assert pair.answer != pair.wrong
        assert clean.attribute.startswith(pair.answer) and corrupt.attribute.startswith(pair.wrong)
    for _, group in group_by_length(tiny_gpt2, list(result.pairs)).items():
        batch = tokenize_pairs(tiny_gpt2, group, need_wrong=True)
        assert bool((batch.answer != batch.wrong).all())


def test_counterfactual_pairs_deterministic_given_seed(tiny_gpt2, facts):
    a = counterfactual_pairs(tiny_gpt2, facts, seed=0)
    b = counterfactual_pairs(tiny_gpt2, facts, seed=0)
    c = counterfactual_pairs(tiny_gpt2, facts, seed=1)
    assert [p.corrupt for p in a] == [p.corrupt for p in b]
    assert [p.corrupt for p in a] != [p.corrupt for p in c]


def test_counterfactual_pairs_report_facts_without_partner(tiny_gpt2):
    lonely = Fact("France", "capital", "The capital of {} is", " Paris")
    same_answer = Fact("Spain", "capital", "The capital of {} is", " Paris")  # same first token
    other_relation = Fact("Germany", "language", "The language of {} is", " German")
    result = counterfactual_pairs(tiny_gpt2, [lonely, same_answer, other_relation], seed=0)
    assert len(result) == 0
    assert [f for f, _ in result.skipped] == [lonely, same_answer, other_relation]
    assert all("no other fact" in reason for _, reason in result.skipped)
    with pytest.raises(EmptyDatasetError):
        counterfactual_pairs(tiny_gpt2, [], seed=0)


def test_unequal_pairs_are_rejected_downstream(tiny_gpt2):
    # the guard counterfactual_pairs exists for: a naive swap with a longer subject breaks patching
    long = Fact("the Democratic Republic of the Congo", "capital", "The capital of {} is", " Kinshasa")
    pair = replace(counterfactual_pairs(tiny_gpt2, load_builtin_facts(["capital"]), seed=0).pairs[0],
                   corrupt=long.prompt)
    with pytest.raises(LengthMismatchError):
        tokenize_pairs(tiny_gpt2, [pair])


# -------------------------------------------------------------------------------------- recall filter


def _direct_rank(model, fact: Fact) -> tuple[int, float, int]:
    """Obviously-correct oracle: one unbatched forward, rank by sorting the full vocabulary."""
    with torch.no_grad():
        logits = model(model.to_tokens(fact.prompt))[0, -1].float()
    answer = attribute_token_ids(model, fact)[0]
    order = torch.argsort(logits, descending=True).tolist()
    return order.index(answer) + 1, float(torch.softmax(logits, -1)[answer]), int(logits.argmax())


def test_recall_filter_matches_unbatched_oracle(tiny_gpt2, facts):
    subset = facts[::15]  # mixed prompt lengths, several batches per length with batch_size=3
    assert len({len(tiny_gpt2.to_tokens(f.prompt)[0]) for f in subset}) >= 3
    result = recalled_facts(tiny_gpt2, subset, criterion="rank<=25000", batch_size=3)
    oracle = [_direct_rank(tiny_gpt2, f) for f in subset]
    for fact, got in zip(subset, result.ranks.tolist()):
        # batched and unbatched matmuls differ by float rounding: the rank may move only across near-ties
        with torch.no_grad():
            logits = tiny_gpt2(tiny_gpt2.to_tokens(fact.prompt))[0, -1].float()
        own = logits[attribute_token_ids(tiny_gpt2, fact)[0]]
        assert 1 + int((logits > own + 1e-5).sum()) <= got <= 1 + int((logits > own - 1e-5).sum())
    torch.testing.assert_close(result.probs, torch.tensor([p for _, p, _ in oracle]), rtol=1e-4, atol=1e-7)
    for fact, got, (_, _, want) in zip(subset, result.top_ids.tolist(), oracle):
        if got != want:  # batched and unbatched matmuls may order a near-tie differently: allow only ties
            with torch.no_grad():
                logits = tiny_gpt2(tiny_gpt2.to_tokens(fact.prompt))[0, -1].float()
            torch.testing.assert_close(logits[got], logits[want], atol=1e-5, rtol=0)
    assert result.kept == [f for f, (r, _, _) in zip(subset, oracle) if r <= 25000]
    assert 0 < len(result.kept) < len(subset)


def test_recall_filter_keeps_the_models_own_argmax(tiny_gpt2):
    base = [Fact(s, "capital", "The capital of {} is", " Paris") for s in ("France", "the Czech Republic")]
    own = []
    for fact in base:
        top = tiny_gpt2.tokenizer.decode([_direct_rank(tiny_gpt2, fact)[2]])
        own.append(replace(fact, attribute=top if top[:1].isspace() or not top[:1].isalnum() else " " + top))
    result = recalled_facts(tiny_gpt2, own + base, criterion="top1")
    oracle_top1 = [_direct_rank(tiny_gpt2, f)[0] == 1 for f in own + base]
    assert result.recalled.tolist() == oracle_top1
    assert result.ranks[:2].tolist() == [1, 1]


def test_recall_aliases_take_the_best_rank(tiny_gpt2):
    fact = Fact("France", "capital", "The capital of {} is", " Paris")
    top = tiny_gpt2.tokenizer.decode([_direct_rank(tiny_gpt2, fact)[2]])
    with_alias = replace(fact, aliases=(top,))
    assert recalled_facts(tiny_gpt2, [with_alias]).ranks.item() > 1
    assert recalled_facts(tiny_gpt2, [with_alias], accept_aliases=True).ranks.item() == 1


def test_parse_criterion():
    assert parse_criterion("top1") == 1
    assert parse_criterion("top5") == parse_criterion("rank<=5") == parse_criterion(5) == 5
    for bad in ("top0", "best", 0, True, "rank<5"):
        with pytest.raises(ConfigError):
            parse_criterion(bad)


def test_recall_result_summaries(tiny_gpt2, facts):
    subset = facts[:4] + facts[-4:]
    result = recalled_facts(tiny_gpt2, subset, criterion=30000)
    per = result.per_relation()
    assert sum(t for _, t in per.values()) == len(subset)
    assert sum(k for k, _ in per.values()) == int(result.recalled.sum())
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["n_recalled"] == len(result.kept)
    assert [r["rank"] for r in summary["facts"]] == result.ranks.tolist()
    fig = result.plot()
    assert list(fig.data[0].y) == [k / t for k, t in per.values()]
    with pytest.raises(EmptyDatasetError):
        recalled_facts(tiny_gpt2, [])
    with pytest.raises(Exception):
        RecallResult(facts=tuple(subset), ranks=result.ranks[:2], probs=result.probs,
                     answer_ids=result.answer_ids,
                     top_ids=result.top_ids, top_tokens=result.top_tokens, max_rank=1, config={})


@pytest.mark.smollm2
def test_smollm2_recalls_paris_not_london(smollm2):
    paris = Fact("France", "capital", "The capital of {} is", " Paris")
    london = replace(paris, attribute=" London")
    result = recalled_facts(smollm2, [paris, london])
    assert result.recalled.tolist() == [True, False]
    assert result.top_tokens[0] == " Paris"
    assert result.probs[0] > 0.3 and result.ranks[1] > 1


# ------------------------------------------------------------------ entity facts (ROME, like for like)


def test_entity_fact_set_is_well_formed_and_has_no_lexical_relations(gpt2_tokenizer):
    from recallscope.tasks.entity_facts import ENTITY_TEMPLATES, LEXICAL_RELATIONS, load_entity_facts

    own = load_entity_facts(include_builtin=False)
    assert len(own) >= 300
    assert {f.relation for f in own} == set(ENTITY_TEMPLATES)
    assert all(f.template == ENTITY_TEMPLATES[f.relation] for f in own)
    assert not any(f.attribute.strip().lower() in f.subject.lower() for f in own)  # answer not in the subject
    every = load_entity_facts()
    assert not {f.relation for f in every} & LEXICAL_RELATIONS
    assert {"capital", "landmark_city"} <= {f.relation for f in every}
    assert len({f.prompt for f in every}) == len(every)
    multi = [f for f in own if len(gpt2_tokenizer.encode(" " + f.subject, add_special_tokens=False)) > 1]
    assert len(multi) >= 200, "the entity set exists for its multi-token subjects"


def test_split_by_subject_length_counts_subject_tokens(tiny_gpt2):
    from recallscope.tasks.entity_facts import split_by_subject_length, subject_token_count

    tower = Fact("Eiffel Tower", "landmark_country", "The {} is located in the country of", " France")
    france = Fact("France", "capital", "The capital of {} is", " Paris")
    n = len(tiny_gpt2.tokenizer.encode(" Eiffel Tower", add_special_tokens=False))
    assert n > 1 and subject_token_count(tiny_gpt2, tower) == n
    assert subject_token_count(tiny_gpt2, france) == 1
    assert split_by_subject_length(tiny_gpt2, [france, tower]) == ([tower], [france])


def test_rome_noise_is_three_subject_embedding_stds(tiny_gpt2):
    from recallscope.models.stack import build_stack
    from recallscope.patching import causal_trace
    from recallscope.tasks.entity_facts import rome_noise
    from recallscope.tasks.facts import trace_items

    tok = tiny_gpt2.tokenizer
    facts = [Fact("Eiffel Tower", "landmark_country", "The {} is located in the country of", " France"),
             Fact("Eiffel Tower", "landmark_city", "The {} is located in the city of", " Paris"),
             Fact("Kuala Lumpur", "city_country", "{} is a city in the country of", " Malaysia")]
    # oracle: each distinct subject's tokens, as they appear in its first prompt, counted once
    ids = tok.encode(" Eiffel Tower", add_special_tokens=False) + tok.encode("Kuala Lumpur", add_special_tokens=False)
    emb = build_stack(tiny_gpt2).embed_tokens.weight.detach().float()
    assert tok.decode(ids) == " Eiffel TowerKuala Lumpur"
    expected = 3 * float(emb[torch.tensor(ids)].std())
    noise = rome_noise(tiny_gpt2, facts)
    torch.testing.assert_close(noise["sigma"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(noise["noise_scale"] * noise["embedding_std"], expected, rtol=1e-5, atol=0)
    assert noise["sigma"] != pytest.approx(3 * noise["embedding_std"], rel=1e-3)
    res = causal_trace(tiny_gpt2, trace_items(tiny_gpt2, facts[:1]), n_samples=2, layers=[0],
                       noise_scale=noise["noise_scale"], progress=False)
    torch.testing.assert_close(res.config["noise_scale"] * res.config["noise_std_unit"], expected, rtol=1e-5, atol=0)


def test_normalized_indirect_effect_is_ratio_of_means_with_ci():
    from recallscope.results import PatchingResult
    from recallscope.tasks.entity_facts import normalized_indirect_effect

    values = torch.tensor([[[0.5, float("nan")]], [[0.3, 0.2]], [[0.1, 0.1]]])  # [prompt, layer, token]
    clean, corrupt = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.1, 0.0])
    res = PatchingResult(values=values, axes=("layer", "token"), clean=clean, corrupt=corrupt,
                         labels={"layer": ["0"], "token": ["a", "b"]})
    ratio, lo, hi = normalized_indirect_effect(res, n_boot=500)
    te = (clean - corrupt).mean()
    expected = torch.tensor([[(0.4 + 0.2 + 0.1) / 3 / te, (0.1 + 0.1) / 2 / te]])
    torch.testing.assert_close(ratio, expected.float())
    assert bool((lo <= ratio).all() and (ratio <= hi).all()) and bool((hi > lo).all())
    flat = PatchingResult(values=values, axes=("layer", "token"), clean=corrupt, corrupt=corrupt,
                          labels={"layer": ["0"], "token": ["a", "b"]})
    with pytest.raises(ConfigError, match="total effect"):
        normalized_indirect_effect(flat)


@pytest.mark.smollm2
def test_smollm2_recalls_at_least_40_multi_token_entity_facts(smollm2):
    from recallscope.tasks.entity_facts import LEXICAL_RELATIONS, load_entity_facts, split_by_subject_length

    kept = recalled_facts(smollm2, load_entity_facts()).kept
    multi, single = split_by_subject_length(smollm2, kept)
    assert len(multi) >= 40 and not {f.relation for f in multi} & LEXICAL_RELATIONS
    assert all(fact_spans(smollm2, f)["subject"][1] - fact_spans(smollm2, f)["subject"][0] > 1 for f in multi)
