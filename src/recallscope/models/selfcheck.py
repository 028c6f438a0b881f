"""Which engine runs a model: the fast engine behind a self-check, else the hook engine.

recallscope has two exact engines. The fast one (:mod:`recallscope.patching.engine`) runs its own
forward over a :class:`~recallscope.models.stack.Stack` adapter; the hook one
(:mod:`recallscope.patching.hook_engine`) runs the model's own forward through TransformerLens hooks.
An adapter that misses a detail of an architecture (extra norms, softcapping) would make the fast
engine silently wrong, so before its first use on a model the fast engine has to pass this check:

1. ``build_stack(model)`` must not raise (the family has an adapter).
2. On a short probe input, the Stack forward's logits must equal the model's own logits, within
   ``rtol(dtype) * max(1, max |logit|)`` (fp32: 1e-4; bf16: 2e-2; fp16: 5e-3).
3. A few patch cells (``resid_pre`` at one position, one head's ``z`` at every position) through the
   fast engine must equal the same cells through the hook engine, within the same tolerance.

The outcome is cached on the model object (``model._recallscope_selfcheck``). :func:`resolve_engine`
turns ``engine="auto" | "fast" | "hooks"`` into the engine that runs: ``"auto"`` takes the fast engine
when the check passes and otherwise the hook engine with a one-line warning; ``"fast"`` on a model that
fails raises :class:`EngineSelfCheckError`.
"""

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from recallscope.errors import ConfigError, RecallscopeError

Engine = Literal["auto", "fast", "hooks"]
ENGINES = ("auto", "fast", "hooks")
RTOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROBE_LEN = 7


class EngineSelfCheckError(RecallscopeError):
    """engine='fast' was asked for on a model whose fast adapter fails the self-check."""


class NonFiniteLogits(Exception):
    """The probe's reference logits are not finite: nothing to compare the fast forward with."""


@dataclass(frozen=True)
class SelfCheck:
    """Outcome of the fast engine's self-check on one model."""

    passed: bool
    """True when the fast engine equals the model's own forward and the hook engine on the probe."""
    family: str
    """The model's architecture (e.g. ``Qwen3ForCausalLM``)."""
    reason: str
    """Why it failed (empty when it passed)."""
    logits_max_diff: float | None = None
    """max |Stack logits - model logits| on the probe (None when the Stack could not be built or run)."""
    patch_max_diff: float | None = None
    """max |fast - hook| over the probe's patch cells."""
    tolerance: float | None = None
    """The absolute tolerance both comparisons used."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_family(model: Any) -> str:
    """The architecture name TransformerLens records (``LlamaForCausalLM``, ...), else the class name."""
    from recallscope.models.stack import unwrap

    arch = getattr(getattr(model, "cfg", None), "architecture", None)
    if arch:
        return str(arch)
    return type(unwrap(getattr(model, "original_model", model))).__name__


def _dtype(model: Any) -> torch.dtype:
    try:
        return next(p for p in model.parameters() if p.is_floating_point()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def _probe(model: Any) -> tuple[Tensor, Tensor, Any]:
    """Clean/corrupt probe tokens [2, n] (n = PROBE_LEN or the context length; one position differs)
    and a logit-difference metric."""
    from recallscope import metrics as M

    vocab, n = int(model.cfg.d_vocab), min(PROBE_LEN, int(getattr(model.cfg, "n_ctx", None) or PROBE_LEN))
    gen = torch.Generator().manual_seed(1234)
    low = min(vocab - 1, 10)  # keep clear of the usual special tokens at the start of a vocabulary
    clean = torch.randint(low, vocab, (2, n), generator=gen)
    corrupt = clean.clone()
    corrupt[:, min(2, n - 1)] = torch.randint(low, vocab, (2,), generator=gen)
    answer, wrong = torch.randint(low, vocab, (2, 2), generator=gen)
    device = getattr(model.cfg, "device", None) or "cpu"
    return clean.to(device), corrupt.to(device), M.LogitDiff(answer.to(device), wrong.to(device))


def _compare_logits(model: Any, stack: Any, tokens: Tensor) -> tuple[float, float]:
    from recallscope.models.forward import run

    with torch.no_grad():
        ref = model(tokens).float()
        if not torch.isfinite(ref).all():
            raise NonFiniteLogits("the model's own logits on the probe hold inf/NaN (a float16 overflow?), so "
                                  "the fast forward cannot be compared")
        ours, _ = run(stack, tokens.to(getattr(stack.embed_tokens, "weight", tokens).device))
    tol = RTOL.get(_dtype(model), 1e-4) * max(1.0, float(ref.abs().max()))
    return float((ours.float().to(ref.device) - ref).abs().max()), tol


def _compare_patch(model: Any, stack: Any, clean: Tensor, corrupt: Tensor, metric: Any) -> float:
    from recallscope.patching.engine import Cell, sweep
    from recallscope.patching.hook_engine import hook_sweep, record
    from recallscope.patching.traces import reference_run
    from recallscope.scale.executor import LocalExecutor, use_executor
    from recallscope.sites import Site
    from recallscope.vocab import Component

    n_layers = int(model.cfg.n_layers)
    cells = [Cell((Site(Component.RESID_PRE, n_layers // 2, min(3, clean.shape[1] - 1)),)),
             Cell((Site(Component.HEAD_OUT, n_layers - 1, None, 0),))]
    read = metric.read_positions(clean.shape[1])
    points = ["resid_pre", "z"]
    _, clean_trace = reference_run(stack, clean, points, read)
    corrupt_logits, corrupt_trace = reference_run(stack, corrupt, points, read)
    with use_executor(LocalExecutor()):  # a probe of this process's model, also inside ray_sweeps(...)
        fast = sweep(stack, cells, corrupt_trace, clean_trace, metric, target_logits=corrupt_logits,
                     read_pos=read, progress=False)
        _, acts = record(model, clean, {s.hook_name for c in cells for s in c.sites}, read)
        hooks = hook_sweep(model, cells, corrupt, acts, metric, read_pos=read, progress=False)
    return float((fast - hooks).abs().max())


def _run_check(model: Any) -> SelfCheck:
    from recallscope.models.stack import build_stack

    family = model_family(model)
    try:
        stack = build_stack(model)
    except Exception as exc:  # an adapter that cannot be built is a failed check, whatever it raised
        return SelfCheck(False, family, f"no fast adapter ({type(exc).__name__}: {_first_line(exc)})")
    clean, corrupt, metric = _probe(model)
    try:
        logit_diff, tol = _compare_logits(model, stack, clean)
    except NonFiniteLogits as exc:
        return SelfCheck(False, family, str(exc))
    except Exception as exc:
        return SelfCheck(False, family, f"the fast forward crashed ({type(exc).__name__}: {_first_line(exc)})")
    if not logit_diff <= tol:
        return SelfCheck(False, family, f"fast-forward logits differ from the model's by {logit_diff:.3g} "
                         f"(tolerance {tol:.3g})", logit_diff, None, tol)
    try:
        patch_diff = _compare_patch(model, stack, clean, corrupt, metric)
    except Exception as exc:
        return SelfCheck(False, family, f"the fast patch crashed ({type(exc).__name__}: {_first_line(exc)})",
                         logit_diff, None, tol)
    if not patch_diff <= tol:
        return SelfCheck(False, family, f"a fast patch differs from the hook patch by {patch_diff:.3g} "
                         f"(tolerance {tol:.3g})", logit_diff, patch_diff, tol)
    return SelfCheck(True, family, "", logit_diff, patch_diff, tol)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def self_check(model: Any, *, refresh: bool = False) -> SelfCheck:
    """The fast engine's self-check on ``model`` (run once, then cached on the model object)."""
    cached = getattr(model, "_recallscope_selfcheck", None)
    if cached is not None and not refresh:
        return cached
    result = _run_check(model)
    model._recallscope_selfcheck = result
    return result


def manifest_entry(model: Any) -> dict[str, Any]:
    """A manifest entry: the self-check outcome on ``model`` (None when it was not run)."""
    check = getattr(model, "_recallscope_selfcheck", None)
    return {"engine_self_check": check.to_dict() if check is not None else None}


def require_fast(model: Any, method: str) -> None:
    """Raise :class:`EngineSelfCheckError` when ``method`` (which has no hook path yet) would run on a
    fast forward that fails its self-check on ``model``: an error, never a silently wrong result."""
    check = self_check(model)
    if not check.passed:
        raise EngineSelfCheckError(
            f"{method} runs on recallscope's fast forward, which fails its self-check on {check.family}: "
            f"{check.reason}. {method} has no hook-based path; for this model use plain AtP (atp(..., "
            "engine='hooks')) or activation_patching(..., engine='hooks'), exact on every model TransformerLens "
            "loads, or add an adapter (recallscope.models.adapters).")


def checked_stack(model: Any, method: str) -> Any:
    """``build_stack(model)`` for ``method``, a consumer of the fast forward without a hook path (lenses,
    DLA, back-patching, route scores), after the self-check: :class:`EngineSelfCheckError` on a model where
    the fast forward is wrong, never a silently wrong result."""
    from recallscope.models.stack import build_stack

    require_fast(model, method)
    return build_stack(model)


def fast_only(model: Any, engine: str, method: str) -> Literal["fast"]:
    """The engine of a method that has no hook path: "fast" after the self-check, else a clear error."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; {method} runs on 'fast' (or 'auto').")
    if engine == "hooks":
        raise ConfigError(f"{method} has no hook path; use engine='fast' or 'auto' (it runs on the fast "
                          "forward after the self-check), or plain AtP / activation patching with engine='hooks'.")
    require_fast(model, method)
    return "fast"


def resolve_engine(model: Any, engine: str = "auto") -> Literal["fast", "hooks"]:
    """The engine that runs ``model`` for ``engine`` = "auto" | "fast" | "hooks" (see the module doc)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; use 'auto' (fast when it passes its self-check, else "
                          "hooks), 'fast' or 'hooks'.")
    if engine == "hooks":
        return "hooks"
    check = self_check(model)
    if check.passed:
        return "fast"
    if engine == "fast":
        raise EngineSelfCheckError(
            f"engine='fast' cannot run {check.family}: {check.reason}. Use engine='hooks' (exact on every "
            "model TransformerLens loads, slower) or engine='auto' (picks for you).")
    warnings.warn(f"recallscope: the fast engine fails its self-check on {check.family} ({check.reason}); "
                  "using engine='hooks'.", stacklevel=3)
    return "hooks"
