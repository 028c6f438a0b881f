"""The base64-decoding organism: data against the exact codec, the shipped weights' accuracy, patching AUROC."""

import pytest
import torch

from recallscope.attribution.scoring import roc_auc
from recallscope.errors import ConfigError
from recallscope.organisms import b64_decoder as B
from recallscope.organisms import ground_truth
from recallscope.bench.scoring import b64_cells
from recallscope.tasks.b64_codec import chars_for_byte, decode_text


pytestmark = pytest.mark.usefixtures("organism_determinism")



def test_vectorised_encoding_matches_the_codec_oracle():
    vocab = list(B._ids())
    g = torch.Generator().manual_seed(1)
    letters, lengths = B.sample_plaintexts(300, g)
    seq, target = B.encode_batch(letters, lengths)
    for row in range(300):
        text = "".join(B.LETTERS[i] for i in letters[row, :lengths[row]])
        want = B.example_tokens(text)
        got = [vocab[int(t)] for t in seq[row]]
        assert got[:len(want)] == want and set(got[len(want):]) <= {"<pad>"}
        assert decode_text("".join(want[1:1 + B.N_CHUNKS])) == text
        assert int(target[row].sum()) == lengths[row] + 1  # every letter and <eos>


def test_plaintext_codes_are_injective():
    g = torch.Generator().manual_seed(2)
    letters, lengths = B.sample_plaintexts(5000, g)
    texts = {"".join(B.LETTERS[i] for i in letters[r, :lengths[r]]) for r in range(5000)}
    assert len(set(B.plaintext_codes(letters, lengths).tolist())) == len(texts)


def test_dependency_matches_the_character_map():
    truth = B.B64Truth()
    for n in truth.lengths:
        dep = truth.dependency(n)
        for j in range(n):
            want = [bool({2 * i, 2 * i + 1} & chars_for_byte(j)) for i in range(truth.n_chunks)]
            assert dep[j].tolist() == want
    with pytest.raises(ConfigError, match="decodes plaintexts"):
        truth.dependency(4)
    with pytest.raises(ConfigError, match="lowercase"):
        B.example_tokens("ABCDEFG")


def test_dependency_pairs_share_lengths_and_answers(b64_organism):
    from recallscope.tasks.pairs import tokenize_pairs

    pairs = B.dependency_pairs(8, 2, seed=0)
    assert [p.meta["byte"] for p in pairs] == [j for j in range(8) for _ in range(2)]
    for j in range(8):
        tp = tokenize_pairs(b64_organism, pairs[2 * j:2 * j + 2])
        assert tp.n_pos == B.PREFIX_LEN + j
        assert (tp.clean[:, B.PREFIX_LEN:] == tp.corrupt[:, B.PREFIX_LEN:]).all()
        assert all(p.answer == p.meta["plaintext"][j] for p in tp.pairs)
        for p in tp.pairs:  # every corrupt byte differs from the clean one in both halves
            assert all((ord(a) ^ ord(b)) & 0xF0 and (ord(a) ^ ord(b)) & 0x0F
                       for a, b in zip(p.meta["plaintext"], p.meta["corrupt_plaintext"]))


def test_shipped_decoder_meets_its_accuracy_bar(b64_organism):
    assert isinstance(ground_truth(b64_organism), B.B64Truth)
    letters, lengths = B.heldout_set(B.B64Config())
    acc = B.exact_match(b64_organism, letters[:200], lengths[:200])
    assert acc >= 0.95
    prompt = b64_organism.to_tokens(B.prompt_text("heavens"))  # the string API: BOS prepended
    assert prompt.shape[1] == B.PREFIX_LEN
    out = B.greedy_decode(b64_organism, prompt, 8)
    assert b64_organism.tokenizer.decode(out[0]) == "h e a v e n s <eos>"


def test_shipped_decoder_patching_recovers_the_dependency_map(b64_organism):
    scores, labels = b64_cells(b64_organism, n_per_byte=2)
    assert roc_auc(scores, labels) >= 0.9
