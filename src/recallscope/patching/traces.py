"""Reference runs for the sweep engine: the target run (patched into) and the source run (patched from)."""

from typing import Callable, Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.errors import DeviceError, NonFiniteActivationError
from recallscope.models.forward import Trace, run
from recallscope.models.stack import Stack


def reference_run(stack: Stack, tokens: Int[Tensor, "batch pos"], points: Iterable[str], read_pos: list[int],
                  *, embed_edit: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Trace]:
    """Run ``tokens`` once, keeping ``points`` (and always ``resid_pre`` and keys/values) of every layer.

    Returns the logits at ``read_pos`` and the trace. Raises :class:`DeviceError` when ``tokens`` are
    not on the model's device and :class:`NonFiniteActivationError` when the run overflows.
    """
    weight = getattr(stack.embed_tokens, "weight", None)
    if weight is not None and tokens.device != weight.device:
        raise DeviceError(f"the tokens are on {tokens.device} but the model is on {weight.device}; move them "
                          f"with tokens.to({str(weight.device)!r}) (or load the model on {tokens.device}).")
    record = set(points) | {"resid_pre"}
    with torch.no_grad():
        logits, trace = run(stack, tokens, record=record, read_pos=torch.tensor(read_pos),
                            embed_edit=embed_edit)
    check_finite_run(logits, trace, weight.dtype if weight is not None else logits.dtype)
    return logits, trace


def check_finite_run(logits: Tensor, trace: Trace, dtype: torch.dtype) -> None:
    """Raise :class:`NonFiniteActivationError` naming the first layer whose input holds inf or NaN."""
    layers = sorted(layer for (point, layer) in trace.acts if point == "resid_pre")
    bad_layers = [layer for layer in layers if not torch.isfinite(trace.acts[("resid_pre", layer)]).all()]
    if torch.isfinite(logits).all() and not bad_layers:
        return
    if bad_layers:
        first = bad_layers[0]
        rows = (~torch.isfinite(trace.acts[("resid_pre", first)])).flatten(1).any(1).nonzero().flatten()
        where = (f"the residual stream entering layer {first} (the output of "
                 f"{'the embedding' if first == 0 else f'layer {first - 1}'})")
    else:
        rows = (~torch.isfinite(logits)).flatten(1).any(1).nonzero().flatten()
        where = "the last layer or the unembedding"
    fix = ("float16 overflows above 65504: load the model with dtype='bf16' (float32's range) or 'fp32'."
           if dtype == torch.float16 else "check the model's weights for NaN/inf and, for a causal trace, "
           "the noise scale.")
    raise NonFiniteActivationError(f"the forward pass produced inf/NaN in {where} for prompts "
                                   f"{rows.tolist()[:8]} (model dtype {dtype}). {fix}")


def constant_trace(like: Trace, points: Iterable[str], how: str) -> Trace:
    """A trace whose ``points`` are zeros (``how="zero"``) or the batch mean (``how="mean"``)."""
    out = Trace()
    for (point, layer), t in like.acts.items():
        if point not in points:
            continue
        if how == "zero":
            out.acts[(point, layer)] = torch.zeros_like(t)
        elif how == "mean":
            out.acts[(point, layer)] = t.mean(0, keepdim=True).expand_as(t).clone()
        else:
            raise ValueError(f"unknown constant trace {how!r}")
    return out
