"""Base64 task suite tests: codec, dependency map, token alignment, stimuli, prompts, pairs, report."""

import base64
import binascii
import random
import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recallscope.errors import ConfigError, EmptyDatasetError, InvalidBase64Error, RecallscopeError
from recallscope.tasks.b64 import (
    ALPHABET,
    Base64Stimulus,
    FewShotTemplate,
    StimulusKind,
    align_tokens,
    bytes_for_char,
    char_stimuli,
    chars_for_byte,
    continuation_token,
    counterfactual_pairs,
    decode,
    decode_text,
    dependency_map,
    encode,
    encoded_length,
    few_shot_prompt,
    few_shot_prompts,
    make_stimulus,
    sentence_stimuli,
    token_offsets,
    word_stimuli,
)
from recallscope.tasks.pairs import group_by_length, tokenize_pairs
from recallscope.tasks.b64_report import tokenization_report

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stdlib_decode(s: str) -> bytes | None:
    """Python's validated decode, or None where it rejects the input."""
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- codec
@FUZZ
@given(st.binary(max_size=64))
def test_encode_equals_stdlib_and_round_trips(data):
    assert encode(data) == base64.b64encode(data).decode("ascii")
    assert decode(encode(data)) == data
    assert decode(encode(data), canonical=False) == data


@pytest.mark.parametrize(
    "text, b64",
    [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="),
     ("foobar", "Zm9vYmFy"), ("T", "VA=="), ("B", "Qg=="), ("Hi", "SGk="), ("é", "w6k=")],
)
def test_rfc4648_vectors(text, b64):
    assert encode(text) == b64
    assert decode_text(b64) == text


def _mutated(data: bytes, index: int, char: str) -> str:
    s = encode(data)
    if not s:
        return char
    i = index % len(s)
    return s[:i] + char + s[i + 1 :]


BASE64ISH = st.one_of(
    st.text(),
    st.text(alphabet=ALPHABET + "=", max_size=16),
    st.text(alphabet="QAgw=Zz9+/-_ \n!é", max_size=12),
    st.builds(_mutated, st.binary(max_size=12), st.integers(0, 100), st.sampled_from(ALPHABET + "= -")),
    st.builds(lambda d, t: encode(d) + t, st.binary(max_size=9), st.sampled_from(["", "=", "A", "QQ=="])),
    st.builds(lambda d, c, k: encode(d) + c + "=" * k, st.binary(max_size=6), st.sampled_from(ALPHABET),
              st.integers(0, 3)),
)


@FUZZ
@given(BASE64ISH)
@example("A===")
@example("QUJD=")
def test_decode_fuzz_canonical_matches_stdlib_or_raises(s):
    """Canonical decode accepts exactly the strings stdlib accepts that are the encoding of their bytes."""
    expected = stdlib_decode(s)
    if expected is not None and encode(expected) == s:
        assert decode(s) == expected
    else:
        with pytest.raises(InvalidBase64Error):
            decode(s)


@FUZZ
@given(BASE64ISH)
@example("A===")
@example("QR==")
def test_decode_fuzz_lenient_matches_stdlib_or_raises(s):
    """canonical=False also accepts non-zero unused bits, like stdlib, but never stdlib's stray '='s."""
    expected = stdlib_decode(s)
    if expected is not None and len(encode(expected)) == len(s):
        assert decode(s, canonical=False) == expected
    else:
        with pytest.raises(InvalidBase64Error):
            decode(s, canonical=False)


@pytest.mark.parametrize(
    "bad, must_mention",
    [
        ("QQ!=", ["'!'", "index 2", "alphabet"]),
        ("QQ\n==", ["'\\n'", "index 2", "whitespace"]),
        ("ab-_", ["'-'", "index 2", "URL-safe", "'+'"]),
        ("QQ=", ["length 3", "multiple of 4", "'='"]),
        ("QUJDR", ["length 5", "multiple of 4", "missing or extra"]),
        ("QQ==QQ==", ["'='", "index 2", "misplaced"]),
        ("Q===", ["index 1", "misplaced", "at most"]),
        ("QQ=A", ["index 2", "followed by", "'A'", "index 3"]),
        ("QR==", ["non-canonical", "'R'", "index 1", "'QQ=='", "canonical=False"]),
        ("QUJ=", ["non-canonical", "'J'", "index 2", "'QUI='"]),
    ],
)
def test_decode_errors_name_the_problem(bad, must_mention):
    with pytest.raises(InvalidBase64Error) as info:
        decode(bad)
    for phrase in must_mention:
        assert phrase in str(info.value), (phrase, str(info.value))
    assert "To fix" in str(info.value)
    assert isinstance(info.value, RecallscopeError) and isinstance(info.value, ValueError)


def test_lenient_decode_accepts_unused_bits_and_decode_text_rejects_non_utf8():
    assert decode("QR==", canonical=False) == b"A" == base64.b64decode("QR==")
    with pytest.raises(InvalidBase64Error, match="not UTF-8.*decode\\(\\)"):
        decode_text("/w==")


# ------------------------------------------------------------------------------------- dependency map
def test_dependency_formula_by_hand():
    assert [sorted(chars_for_byte(j)) for j in range(6)] == [[0, 1], [1, 2], [2, 3], [4, 5], [5, 6], [6, 7]]
    expected = [[0], [0, 1], [1, 2], [2], [3], [3, 4], [4, 5], [5]]
    assert [sorted(bytes_for_char(i)) for i in range(8)] == expected
    # "QQ==" holds one byte: the second character determines only byte 0, the padding nothing.
    assert [sorted(bytes_for_char(i, n_bytes=1)) for i in range(4)] == [[0], [0], [], []]
    with pytest.raises(ConfigError):
        chars_for_byte(-1)


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=7))
def test_dependency_map_by_brute_force(data):
    """Flipping character i changes only the bytes the map gives, and some flip changes each of them."""
    s, dep = encode(data), dependency_map(len(data))
    for i in range(len(s)):
        if s[i] == "=":
            assert dep.char_to_bytes[i] == frozenset()
            continue
        changed: set[int] = set()
        for c in ALPHABET:
            out = decode(s[:i] + c + s[i + 1 :], canonical=False)
            flipped = {j for j in range(len(data)) if out[j] != data[j]}
            assert flipped <= dep.char_to_bytes[i], (s, i, c)
            changed |= flipped
        assert changed == dep.char_to_bytes[i], (s, i)


@pytest.mark.parametrize("n_bytes", [0, 1, 2, 3, 4, 5, 10])
def test_dependency_matrix_is_the_inverse_map(n_bytes):
    dep = dependency_map(n_bytes)
    m = dep.matrix()
    assert m.shape == (n_bytes, encoded_length(n_bytes)) and m.dtype == torch.bool
    assert torch.equal(m.sum(dim=1), torch.full((n_bytes,), 2))
    for i in range(dep.n_chars):
        assert {int(j) for j in torch.nonzero(m[:, i]).flatten()} == dep.char_to_bytes[i]


# ------------------------------------------------------------------------------------------ alignment
def test_gpt2_tokenises_single_blocks_as_science_md_says(gpt2_tokenizer):
    va, qg = align_tokens(gpt2_tokenizer, "VA=="), align_tokens(gpt2_tokenizer, "Qg==")
    assert [t.text for t in va.tokens] == ["VA", "=="]
    assert [t.text for t in qg.tokens] == ["Q", "g", "=="]
    assert [t.byte_indices for t in va.tokens] == [(0,), ()]
    assert [t.complete_bytes for t in va.tokens] == [(0,), ()]
    assert [t.byte_indices for t in qg.tokens] == [(0,), (0,), ()]
    assert [t.complete_bytes for t in qg.tokens] == [(), (), ()]
    assert qg.tokens_for_byte(0) == (0, 1)


def test_alignment_inside_a_prompt_golden(gpt2_tokenizer):
    """'Hello world' in a prompt: spans, blocks and bytes checked by hand against the dependency rule."""
    prompt = "Decode: SGVsbG8gd29ybGQ= ->"
    a = align_tokens(gpt2_tokenizer, "SGVsbG8gd29ybGQ=", prompt=prompt)
    assert a.offset == 8 and a.method == "offsets" and a.n_bytes == 11
    assert [t.text for t in a.tokens] == [" SG", "Vs", "b", "G", "8", "gd", "29", "y", "b", "G", "Q", "="]
    assert a.tokens[0].prompt_span == (7, 10) and a.tokens[0].char_span == (0, 2)
    assert [t.blocks for t in a.tokens][4:7] == [(1,), (1, 2), (2,)]
    assert [t.byte_indices for t in a.tokens][:7] == [(0, 1), (1, 2), (3,), (3, 4), (4, 5), (5, 6), (6, 7, 8)]
    assert [t.complete_bytes for t in a.tokens][:7] == [(0,), (2,), (), (), (), (), (7,)]
    assert a.boundaries == (2, 4, 5, 6, 7, 9, 11, 12, 13, 14, 15)
    ids = gpt2_tokenizer.encode(prompt)
    assert a.n_prompt_tokens == len(ids)
    assert [t.token_id for t in a.tokens] == ids[a.token_range[0] : a.token_range[1]]


class SlowTokenizer:
    """Wraps a tokenizer but hides offsets (is_fast False), as Python tokenizers do. ``spaces`` makes its
    decode drop leading spaces ("lstrip", like SentencePiece) or add spaces around pieces ("pad")."""

    is_fast = False

    def __init__(self, inner, spaces: str = "exact"):
        self.inner, self.spaces = inner, spaces

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        out = self.inner.decode(ids)
        return {"exact": out, "lstrip": out.lstrip(" "), "pad": f" {out} "}[self.spaces]

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")


@pytest.mark.parametrize(
    "prompt",
    [
        "Decode base64.\nSGk= -> Hi\nVA== ->",
        "é 🙂 ünïcode: Zm9vYmFy, then “quotes” .",
        "  two  spaces\t\ttabs\n\n",
    ],
)
@pytest.mark.parametrize("spaces", ["exact", "lstrip", "pad"])
def test_decoding_fallback_matches_offsets(gpt2_tokenizer, prompt, spaces):
    fast = token_offsets(gpt2_tokenizer, prompt)
    slow = token_offsets(SlowTokenizer(gpt2_tokenizer, spaces), prompt)
    assert (fast.method, slow.method) == ("offsets", "decode")
    assert slow.ids == fast.ids
    for tid, (a, b), (c, d) in zip(fast.ids, fast.spans, slow.spans):
        if "\ufffd" in gpt2_tokenizer.decode([tid]):  # part of a UTF-8 character: the group's span
            assert c <= a <= b <= d
        elif spaces == "exact":
            assert (a, b) == (c, d)
    # base64 characters are found exactly either way
    for b64 in re.findall(r"[A-Za-z0-9+/]{4,}={0,2}", prompt):
        if len(b64) % 4 == 0:
            kept = [(t.char_span, t.index) for t in align_tokens(gpt2_tokenizer, b64, prompt=prompt).tokens]
            slow_alignment = align_tokens(SlowTokenizer(gpt2_tokenizer, spaces), b64, prompt=prompt)
            assert [(t.char_span, t.index) for t in slow_alignment.tokens] == kept


def test_alignment_errors(gpt2_tokenizer):
    with pytest.raises(ConfigError, match="does not occur.*offset="):
        align_tokens(gpt2_tokenizer, "VA==", prompt="no base64 here")
    with pytest.raises(ConfigError, match="occurs 2 times"):
        align_tokens(gpt2_tokenizer, "VA==", prompt="VA== VA==")
    assert align_tokens(gpt2_tokenizer, "VA==", prompt="VA== VA==", offset=5).tokens[0].index == 2
    with pytest.raises(ConfigError, match="Fix offset"):
        align_tokens(gpt2_tokenizer, "VA==", prompt="VA== VA==", offset=1)
    with pytest.raises(InvalidBase64Error, match="length 3"):
        align_tokens(gpt2_tokenizer, "VA=")
    with pytest.raises(ConfigError, match="empty"):
        align_tokens(gpt2_tokenizer, "")


# ------------------------------------------------------------------------------------------- stimuli
def test_char_stimuli_and_mnemonic_hooks():
    chars = char_stimuli()
    assert len(chars) == 62 and all(re.fullmatch(r"[A-Za-z0-9]{2}==", s.b64) for s in chars)
    assert all(decode_text(s.b64) == s.text and s.kind is StimulusKind.CHAR for s in chars)
    hooks = {(s.hook, s.text) for s in chars if s.mnemonic_hook}
    assert hooks == {("VA", "T"), ("TA", "L"), ("SA", "H"), ("RA", "D"), ("MA", "0"), ("NA", "4"),
                     ("WA", "X"), ("UA", "P")}
    assert [s.hook for s in char_stimuli("Qq", hooks={"UQ"})] == ["UQ", None]
    with pytest.raises(ConfigError, match="not ASCII"):
        char_stimuli("é")


def test_word_and_sentence_stimuli_depend_on_seed_not_global_rng():
    random.seed(1234)
    words, sentences = word_stimuli(12, seed=3), sentence_stimuli(12, seed=3)
    random.seed(999)
    assert words == word_stimuli(12, seed=3) and sentences == sentence_stimuli(12, seed=3)
    assert words != word_stimuli(12, seed=4) and sentences != sentence_stimuli(12, seed=4)
    assert len({s.text for s in words}) == 12 and len({s.text for s in sentences}) == 12
    assert all(re.fullmatch(r"[A-Z][a-z ]+\.", s.text) for s in sentences)
    assert all(decode_text(s.b64) == s.text for s in (*words, *sentences))
    with pytest.raises(ConfigError, match="between 1 and"):
        word_stimuli(0, seed=0)


# -------------------------------------------------------------------------------------------- prompts
def test_few_shot_prompt_layout():
    p = few_shot_prompt(make_stimulus("T", StimulusKind.CHAR), [make_stimulus("Hi")], n_shots=1, seed=0)
    assert p.text == "Decode base64.\nSGk= -> Hi\nVA== ->"
    assert p.answer_text == " T" and p.text[p.query_offset : p.query_offset + 4] == "VA=="
    bare = FewShotTemplate(instruction="")
    zero = few_shot_prompt(make_stimulus("T"), [], n_shots=0, seed=0, template=bare)
    assert zero.text == "VA== ->" and zero.query_offset == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), n_shots=st.integers(0, 8), query=st.sampled_from(char_stimuli()))
def test_shots_are_seeded_and_never_the_query(seed, n_shots, query):
    pool = char_stimuli()
    p = few_shot_prompt(query, pool, n_shots=n_shots, seed=seed, exclude=["a"])
    assert len(p.shots) == n_shots == len({s.text for s in p.shots})
    assert query.text not in {s.text for s in p.shots} and "a" not in {s.text for s in p.shots}
    assert p == few_shot_prompt(query, pool, n_shots=n_shots, seed=seed, exclude=["a"])


def test_few_shot_errors_and_batch():
    pool = char_stimuli("ABC")
    with pytest.raises(ConfigError, match="n_shots=3.*2 usable"):
        few_shot_prompt(pool[0], pool, n_shots=3, seed=0)
    with pytest.raises(ConfigError, match="exactly once"):
        FewShotTemplate(query_format="{b64} {b64}")
    prompts = few_shot_prompts(pool, n_shots=2, seed=5)
    assert [p.query.text for p in prompts] == ["A", "B", "C"]
    assert all(p.query.text not in {s.text for s in p.shots} for p in prompts)


# ----------------------------------------------------------------------------------- counterfactuals
def _check_pair(pair, tokenizer):
    m = pair.meta
    assert len(tokenizer.encode(pair.clean)) == len(tokenizer.encode(pair.corrupt))
    clean, corrupt = decode_text(m["clean_b64"]), decode_text(m["corrupt_b64"])
    assert (clean, corrupt) == (m["clean_text"], m["corrupt_text"]) and len(clean) == len(corrupt)
    assert sum(a != b for a, b in zip(clean, corrupt)) == 1
    off = m["query_offset"]
    assert pair.clean[off:] == m["clean_b64"] + " ->" and pair.corrupt[off:] == m["corrupt_b64"] + " ->"
    assert pair.clean[:off] == pair.corrupt[:off] and clean not in m["shots"] and corrupt not in m["shots"]
    assert pair.answer == continuation_token(tokenizer, pair.clean, " " + clean) != pair.wrong
    assert pair.answer.startswith(" ") and (" " + clean).startswith(pair.answer)
    lo, hi = pair.spans["b64"]
    assert tokenizer.decode(tokenizer.encode(pair.clean)[lo:hi]).strip() == m["clean_b64"]


@pytest.mark.parametrize("kind", ["char", "word", "sentence"])
def test_counterfactual_pairs_gpt2(gpt2_tokenizer, kind):
    stimuli = {
        "char": char_stimuli(), "word": word_stimuli(30, seed=0), "sentence": sentence_stimuli(15, seed=0)
    }
    pairs = counterfactual_pairs(stimuli[kind], gpt2_tokenizer, seed=7)
    assert len(pairs) >= 0.8 * len(stimuli[kind])
    for pair in pairs:
        _check_pair(pair, gpt2_tokenizer)
    assert pairs == counterfactual_pairs(stimuli[kind], gpt2_tokenizer, seed=7)
    assert pairs != counterfactual_pairs(stimuli[kind], gpt2_tokenizer, seed=8)


def test_counterfactual_pair_for_va(gpt2_tokenizer):
    (pair,) = counterfactual_pairs([make_stimulus("T", StimulusKind.CHAR)], gpt2_tokenizer, seed=0, n_shots=3,
                                   pool=char_stimuli(), prepend_bos=True)
    assert pair.answer == " T" and pair.meta["hook"] == "VA" and pair.meta["changed_bytes"] == (0,)
    n = len(gpt2_tokenizer.encode(pair.clean))
    assert pair.spans["final"] == (n, n + 1)  # shifted by one for the BOS
    lo, hi = pair.spans["changed"]
    changed = gpt2_tokenizer.decode(gpt2_tokenizer.encode(pair.clean)[lo - 1 : hi - 1])
    assert all(pair.meta["clean_b64"][i] in changed for i in pair.meta["changed_b64_chars"])


def test_counterfactual_pairs_feed_tokenize_pairs(tiny_gpt2):
    pairs = counterfactual_pairs(char_stimuli("TLHD0"), tiny_gpt2.tokenizer, seed=0, pool=char_stimuli())
    groups = group_by_length(tiny_gpt2, pairs)
    assert sum(len(g) for g in groups.values()) == len(pairs) == 5
    batch = tokenize_pairs(tiny_gpt2, max(groups.values(), key=len), need_wrong=True)
    assert batch.clean.shape == batch.corrupt.shape and batch.wrong is not None
    assert not torch.equal(batch.clean, batch.corrupt)


class CharTokenizer:
    """One token per character (a leading space joins the next character); 'w' costs two tokens."""

    is_fast = False

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r" ?[^ ]| ", text, flags=re.S):
            ids.append(ord(piece[-1]) + (100_000 if len(piece) == 2 else 0))
            if piece[-1] == "w":
                ids.append(0)
        return ids

    def decode(self, ids):
        return "".join(("" if i == 0 else " " + chr(i - 100_000) if i >= 100_000 else chr(i)) for i in ids)


def test_counterfactual_pairs_skip_token_count_changes():
    """'3' and '7' encode as Mw== / Nw==, one token longer under CharTokenizer: they must never be chosen."""
    tok, stim = CharTokenizer(), char_stimuli("5")
    corrupt = {counterfactual_pairs(stim, tok, seed=s, n_shots=0)[0].meta["corrupt_text"] for s in range(40)}
    assert corrupt and not corrupt & {"3", "7"}
    assert len(corrupt) >= 4  # the seed really varies the choice
    with pytest.raises(EmptyDatasetError, match="equal token count"):
        counterfactual_pairs([Base64Stimulus("!?", encode("!?"), StimulusKind.WORD)], tok, seed=0, n_shots=0)


def test_require_different_answer(gpt2_tokenizer):
    """In "!ab" only later characters can change and the first answer token stays " !"."""
    stim = [make_stimulus("!ab")]
    with pytest.raises(EmptyDatasetError, match="require_different_answer=False"):
        counterfactual_pairs(stim, gpt2_tokenizer, seed=0, n_shots=0)
    (pair,) = counterfactual_pairs(stim, gpt2_tokenizer, seed=0, n_shots=0, require_different_answer=False)
    assert pair.answer == pair.wrong == " !" and pair.meta["corrupt_text"] != "!ab"


# ---------------------------------------------------------------------------------- tokenisation report
class BlockTokenizer(CharTokenizer):
    """One token per 4 characters (fast path: offsets)."""

    is_fast = True

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        spans = [(i, min(i + 4, len(text))) for i in range(0, len(text), 4)]
        return {"input_ids": [hash(text[a:b]) % 1000 for a, b in spans], "offset_mapping": spans}


def test_tokenization_report_by_hand(gpt2_tokenizer):
    texts = ["T", "B", "Hello world"]
    tokenizers = {"gpt2": gpt2_tokenizer, "char": CharTokenizer(), "block": BlockTokenizer()}
    report = tokenization_report(texts, tokenizers)
    gpt2 = report["gpt2"]  # VA|== , Q|g|== , SG|Vs|b|G|8|gd|29|y|b|G|Q|=
    assert (gpt2.n_chars, gpt2.n_tokens, gpt2.n_boundaries, gpt2.n_block_edge_boundaries) == (24, 17, 14, 2)
    assert gpt2.n_single_block_tokens == 0
    assert gpt2.chance_block_edge == pytest.approx((1 * 0 + 2 * 0 + 11 * 3 / 15) / 14)
    char = report["char"]  # every interior position is a boundary, so the fraction equals chance
    assert char.chars_per_token == 1.0 and char.block_edge_fraction == pytest.approx(char.chance_block_edge)
    block = report["block"]
    assert (block.chars_per_token, block.block_edge_fraction, block.n_single_block_tokens) == (4.0, 1.0, 6)
    rows = report.to_rows()
    assert [r["tokenizer"] for r in rows] == ["gpt2", "char", "block"]
    assert rows[0]["chars_per_token"] == pytest.approx(24 / 17) and rows[2]["single_block_tokens"] == 6
    with pytest.raises(KeyError, match="no tokenizer named"):
        report["cl100k"]
    with pytest.raises(EmptyDatasetError):
        tokenization_report([], {"gpt2": gpt2_tokenizer})


def test_tokenization_report_gpt2_english_near_science_md(gpt2_tokenizer):
    """50 seeded sentences: close to SCIENCE.md's GPT-2 numbers (1.37 chars/token, 23% on block edges)."""
    texts = [s.text for s in sentence_stimuli(50, seed=0)]
    stats = tokenization_report(texts, {"gpt2": gpt2_tokenizer})["gpt2"]
    assert stats.chars_per_token == pytest.approx(1.37, abs=0.05)
    assert stats.block_edge_fraction == pytest.approx(0.23, abs=0.03)
    assert stats.chance_block_edge == pytest.approx(0.25, abs=0.03)
    assert stats.n_single_block_tokens == 0


def test_tasks_package_exports_lazily():
    import subprocess
    import sys
    import types

    import recallscope.tasks as tasks
    import recallscope.tasks.b64 as b64

    assert set(b64.__all__) <= set(tasks.__all__) and tasks.encode is encode
    # no export may be shadowed by a submodule of the same name once that submodule is imported
    assert all(not isinstance(getattr(tasks, name), types.ModuleType) for name in tasks.__all__)
    assert tasks.tokenization_report is tokenization_report
    code = "import sys, recallscope.tasks; assert not {'torch', 'transformers'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
