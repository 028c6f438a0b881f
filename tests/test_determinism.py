"""Determinism: the same config and seed give bitwise-identical results on CPU, in one process and across
processes, whatever the global random state. Also: the memory budget changes chunking, not results.

To cover a new method, add a case to ``CASES``: a function ``(model) -> result`` (any frozen dataclass
holding tensors, like every recallscope result) that runs the method at small scale with a fixed seed.
Both tests below then check it. Covered: activation patching, causal trace, attention knockout, AtP,
EAP-IG, a route report and organism training.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from recallscope.store import fingerprint
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid"),
         PromptPair("The capital of Spain is", "The capital of Italy is", " Madrid", " Rome")]
ITEMS = [PromptPair("The Eiffel Tower is in", "The Eiffel Tower is in", " Paris", spans={"subject": (1, 4)}),
         PromptPair("Rome is the capital of", "Rome is the capital of", " Italy", spans={"subject": (1, 2)})]


def _patching(model: Any) -> Any:
    from recallscope.patching import activation_patching

    return activation_patching(model, PAIRS, "logit_diff", component="z", progress=False)


def _trace(model: Any) -> Any:
    from recallscope.patching import causal_trace

    return causal_trace(model, ITEMS, component="mlp_out", window=2, n_samples=3, seed=11, progress=False)


def _knockout(model: Any) -> Any:
    from recallscope.patching import attention_knockout

    return attention_knockout(model, ITEMS, window=1, progress=False)


def _atp(model: Any) -> Any:
    from recallscope.attribution import atp

    return atp(model, PAIRS, components=("resid_pre", "attn_out", "z"), prompts_per_chunk=1, progress=False)


def _eap_ig(model: Any) -> Any:
    from recallscope.attribution import eap_ig

    return eap_ig(model, PAIRS, steps=3, progress=False)


ROUTE_QUERY_PROMPTS = ("The word VAT", "I saw VAT", "Notes on VAT")


def route_case(model: Any, **kw: Any) -> Any:
    """A small route report (3 prompts, 3 controls) on ``model``."""
    from recallscope.routes import RouteConfig, RouteQuery, control_pool, route_report
    from recallscope.tasks.b64_stimuli import WORDS

    query = RouteQuery(ROUTE_QUERY_PROMPTS, " VAT", " Value")
    config = RouteConfig(n_controls=3, n_boot=50, n_alternatives=2, seed=3)
    return route_report(model, query, [" tax"], pool=control_pool(model, WORDS[:40]), config=config,
                        progress=False, **kw)


def tiny_recipe(steps: int = 4, seed: int = 0) -> Any:
    """The route organism's recipe at toy size (batch 8, ``steps`` steps)."""
    from recallscope.organisms.recipes import get_recipe

    recipe = get_recipe("route-s0")
    train = dataclasses.replace(recipe.config.train, steps=steps, batch_size=8, warmup=2, seed=seed)
    return recipe.with_config(train=train)


@dataclasses.dataclass(frozen=True)
class Trained:
    """What organism training produces: the weights and the loss history."""

    weights: dict[str, torch.Tensor]
    loss_history: list[float]


def _organism_training(model: Any) -> Trained:  # organisms build their own network: ``model`` is unused
    from recallscope.organisms.recipes import train_recipe

    net, record = train_recipe(tiny_recipe(), evaluate=False)
    return Trained(dict(net.state_dict()), record["loss_history"])


CASES: dict[str, Callable[[Any], Any]] = {"patching": _patching, "causal_trace": _trace, "knockout": _knockout,
                                          "atp": _atp, "eap_ig": _eap_ig, "routes": route_case,
                                          "organism_training": _organism_training}
"""name -> a small seeded run of one method on the tiny GPT-2 model."""

VOLATILE = ("timings_s", "checkpoint")
"""Manifest entries that legitimately differ between runs."""


def deterministic_view(result: Any) -> dict[str, Any]:
    """The fields of a result that must not change between identical runs (all but timings)."""
    view = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(view.get("manifest"), dict):
        view["manifest"] = {k: v for k, v in view["manifest"].items() if k not in VOLATILE}
    return view


def digests(result: Any) -> dict[str, str]:
    """A bitwise fingerprint per field (NaN-safe: tensors are hashed as raw bytes)."""
    return {name: fingerprint(value) for name, value in deterministic_view(result).items()}


def assert_bitwise_equal(a: Any, b: Any) -> None:
    da, db = (digests(a), digests(b)) if not isinstance(a, dict) else (a, b)
    differing = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    assert not differing, f"fields {differing} differ between two runs with the same config and seed"


def _scramble_global_rngs(seed: int) -> None:
    """A method must not depend on global random state: change all of it between runs."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_config_and_seed_give_the_same_bits(tiny_gpt2, case):
    _scramble_global_rngs(1)
    first = CASES[case](tiny_gpt2)
    _scramble_global_rngs(2)
    torch.rand(1000)  # and advance it
    second = CASES[case](tiny_gpt2)
    assert_bitwise_equal(first, second)


CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[3]))
from transformers import AutoTokenizer
from recallscope.models import tiny_model
import test_determinism as T
model = tiny_model("gpt2", tokenizer=AutoTokenizer.from_pretrained(sys.argv[2]), seed=0)
print(json.dumps({name: T.digests(case(model)) for name, case in T.CASES.items()}))
"""


def test_same_bits_in_a_fresh_process(tiny_gpt2, gpt2_tokenizer_dir):
    """Another interpreter (other hash seed, other import order) reproduces every case bit for bit."""
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(gpt2_tokenizer_dir),
                          str(torch.get_num_threads())], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for name, case in CASES.items():
        assert_bitwise_equal(digests(case(tiny_gpt2)), theirs[name])


# ------------------------------------------------------------------------------------ memory budget


def _record_chunks(monkeypatch) -> list[tuple[int, int]]:
    """Wrap the engine's chunk runner; record (cells in the chunk, estimated activation bytes)."""
    from recallscope.patching import engine, knockout

    seen: list[tuple[int, int]] = []
    real = engine.run_chunk

    def spy(stack, cells, target, source, *, batch, n_pos, pos0, read_pos, **kw):
        seen.append((len(cells), len(cells) * batch * (n_pos - pos0) * engine._bytes_per_row_position(stack, n_pos)))
        return real(stack, cells, target, source, batch=batch, n_pos=n_pos, pos0=pos0, read_pos=read_pos, **kw)

    monkeypatch.setattr(engine, "run_chunk", spy)
    monkeypatch.setattr(knockout, "run_chunk", spy)
    return seen


@pytest.mark.parametrize("method", ["patching", "trace", "knockout"])
def test_memory_budget_bounds_chunks_and_leaves_results_unchanged(tiny_gpt2, monkeypatch, method):
    from recallscope.patching import activation_patching, attention_knockout, causal_trace

    def run(budget_mb: float) -> Any:
        if method == "patching":
            return activation_patching(tiny_gpt2, PAIRS, component="z", memory_budget_mb=budget_mb, progress=False)
        if method == "knockout":  # cells are layer windows, batched under the budget
            return attention_knockout(tiny_gpt2, ITEMS, window=1, memory_budget_mb=budget_mb, progress=False)
        return causal_trace(tiny_gpt2, ITEMS, component="resid_post", n_samples=3, memory_budget_mb=budget_mb,
                            progress=False)

    unlimited = run(1024.0)
    seen = _record_chunks(monkeypatch)
    run(1024.0)
    big_chunks = list(seen)
    one_cell = min(b // n for n, b in big_chunks)
    room = 1 if method == "knockout" else 2  # the tiny model has 2 layers: 2 knockout windows per edge
    budget_mb = (room + 0.5) * one_cell / 2**20  # room for `room` cells of the cheapest kind
    seen.clear()
    limited = run(budget_mb)
    assert len(seen) > len(big_chunks), "a smaller budget must cut the sweep into more chunks"
    assert all(n == 1 or nbytes <= budget_mb * 2**20 for n, nbytes in seen), seen
    assert max(n for n, _ in seen) == room
    # Chunking changes matrix shapes, so values agree to float32 rounding (bitwise at a fixed budget).
    torch.testing.assert_close(limited.values, unlimited.values, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(limited.clean, unlimited.clean) and torch.equal(limited.corrupt, unlimited.corrupt)
