"""The interchange (resample) intervention along a concept direction: the route's primary causal score.

For a prompt, its alternative inputs (same context, another input; :class:`~recallscope.routes.scores.
PreparedPrompt`) and a unit direction ``u`` per layer, at the input positions of the window's layers:

    h <- h + k * ((h_alt - h) . u) u

(``runner``: a :class:`~recallscope.routes.scores.SpanRunner`) sets the component along ``u`` to the value the model itself produces for the alternative input in the
same context (``k = 1``): an in-distribution edit, unlike mean ablation to a neutral-context value. The
effect is ``M_clean - M_edited`` (nats), per alternative. The edit norm is ``||((h_alt - h) . u)||`` over
the input positions at the window's first layer (:func:`edit_norms`). Random competitor directions are
matched to their candidate's edit norm by the factor ``k = norm_candidate / norm_random`` (per alternative
and window), so they move the state exactly as far as the candidate does.
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def edit_norms(runner: Any, alt_states: Tensor, unit: Float[Tensor, "slot layer d_model"],
               windows: Sequence[int]) -> Float[Tensor, "slot alt window"]:
    """``||(h_alt - h) . u||`` over the input positions at each window's first layer (clean states)."""
    s, e = runner.prep.span
    out = []
    for layer in windows:
        diff = alt_states[layer, :, s:e] - runner.states[layer, :, s:e]  # [alt, span, d]
        out.append(torch.einsum("apd,cd->cap", diff, unit[:, layer]).norm(dim=-1))
    return torch.stack(out, dim=-1)


def interchange(runner: Any, alt_states: Tensor, unit: Float[Tensor, "slot layer d_model"],
                windows: Sequence[int], window: int, batch_size: int,
                scale: Float[Tensor, "slot alt window"] | None = None) -> Float[Tensor, "slot alt window"]:
    """Effect ``M_clean - M`` of the interchange along each slot's direction, per alternative and window
    (``scale``: the factor ``k`` per slot, alternative and window; default 1)."""
    s, e = runner.prep.span
    n_slot, n_alt = unit.shape[0], alt_states.shape[1]
    slot_of = torch.arange(n_slot).repeat_interleave(n_alt)
    alt_of = torch.arange(n_alt).repeat(n_slot)
    out = torch.zeros(n_slot * n_alt, len(windows))
    for j, layer in enumerate(windows):
        k_all = torch.ones(n_slot * n_alt) if scale is None else scale[:, :, j].reshape(-1)
        for start in range(0, n_slot * n_alt, batch_size):
            rows = slice(start, min(n_slot * n_alt, start + batch_size))
            u, a, k = unit[slot_of[rows]], alt_of[rows], k_all[rows]

            def fn(h: Tensor, lyr: int, u: Tensor = u, a: Tensor = a, k: Tensor = k) -> Tensor:
                diff = alt_states[lyr, a, s:e] - h  # [batch, span, d]
                coef = torch.einsum("bpd,bd->bp", diff, u[:, lyr]) * k[:, None].to(h.dtype)
                return h + coef[..., None] * u[:, lyr, None]

            out[rows, j] = runner.clean - runner.run(layer, window, rows.stop - rows.start, fn)
    return out.view(n_slot, n_alt, len(windows))
