"""Reference runs for the sweep engine: the target run (patched into) and the source run (patched from)."""

from typing import Callable, Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.models.forward import Trace, run
from recallscope.models.stack import Stack


def reference_run(stack: Stack, tokens: Int[Tensor, "batch pos"], points: Iterable[str], read_pos: list[int],
                  *, embed_edit: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Trace]:
    """Run ``tokens`` once, keeping ``points`` (and always ``resid_pre`` and keys/values) of every layer.

    Returns the logits at ``read_pos`` and the trace.
    """
    record = set(points) | {"resid_pre"}
    with torch.no_grad():
        logits, trace = run(stack, tokens, record=record, read_pos=torch.tensor(read_pos),
                            embed_edit=embed_edit)
    return logits, trace


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
