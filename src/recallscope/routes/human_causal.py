"""The interchange intervention for a batch of mnemonic cards: the human comparison's causal score.

For each card (a :class:`~recallscope.routes.batched.BatchRunner` prompt), its alternative inputs (other
cards' terms of the same token shape) and each candidate's unit directions ``u[l]``:

1. **Alternative runs** (:func:`alternative_runs`): one forward per alternative keeps its states at the
   term's positions at every layer and its metric; the total effect is ``M_clean - mean_alt M_alt``
   (the same number as :meth:`BatchRunner.total_effect`).
2. **Interchange** (:func:`card_interchange`): at the term's positions of every layer at once (the window
   ``0..n_layers-1`` of :func:`recallscope.routes.interchange.interchange`)
   ``h <- h + ((h_alt - h) . u) u``: the component along the candidate's direction takes the value the
   model produces for the alternative term in the same context. Effect ``M_clean - M_edited`` per
   (card, candidate, alternative); rows of all cards run together from the term's first position,
   reusing each card's clean keys/values. :func:`recallscope.routes.interchange.interchange` on a
   :class:`~recallscope.routes.scores.SpanRunner` per card is the tests' oracle.
3. **Edit norm** (:func:`edit_norms`): ``||(h_alt - h) . u||`` over the term's positions with the clean
   states, averaged over layers ``0..n_layers-1``.
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.models.forward import forward


def alternative_runs(runner: Any, n_keep: int, *, batch_size: int = 64
                     ) -> tuple[list[Float[Tensor, "alt layer span d_model"]], Float[Tensor, " batch"]]:
    """Per prompt, the states at the input span (layers ``0..n_layers-1``) of its first ``n_keep``
    alternatives, and the total effect per prompt (NaN for a prompt without alternatives)."""
    s, e = runner.span
    n_layers = runner.stack.n_layers
    owner = [b for b, alts in enumerate(runner.alt_tokens) for _ in range(alts.shape[0])]
    total = torch.full((len(runner.alt_tokens),), float("nan"))
    kept: list[list[Tensor]] = [[] for _ in runner.alt_tokens]
    if not owner:
        return [torch.zeros(0, n_layers, e - s, runner.stack.d_model) for _ in kept], total
    tokens = torch.cat(list(runner.alt_tokens))
    rank = [sum(1 for o in owner[:i] if o == b) for i, b in enumerate(owner)]  # alternative index per row
    metric = torch.zeros(len(owner))
    positions = torch.arange(tokens.shape[1])
    with torch.no_grad():
        for start in range(0, len(owner), batch_size):
            rows = slice(start, min(len(owner), start + batch_size))
            final, trace = forward(runner.stack, runner.stack.embed(tokens[rows], positions), record={"resid_pre"},
                                   read_pos=runner.read, unembed=False)
            metric[rows] = runner.score(final, runner.targets[owner[rows]])
            span = torch.stack([trace.acts[("resid_pre", l)][:, s:e] for l in range(n_layers)], dim=1)
            for j, i in enumerate(range(rows.start, rows.stop)):
                if rank[i] < n_keep:
                    kept[owner[i]].append(span[j])
    own = torch.tensor(owner)
    for b in own.unique().tolist():
        total[b] = runner.clean[b] - metric[own == b].mean()
    d = runner.stack.d_model
    return [torch.stack(k) if k else torch.zeros(0, n_layers, e - s, d) for k in kept], total


def edit_norms(runner: Any, alt_span: Sequence[Tensor], unit: Float[Tensor, "batch slot layer d_model"]
               ) -> Float[Tensor, "batch slot alt"]:
    """``||(h_alt - h) . u||`` over the span, averaged over layers ``0..n_layers-1`` (NaN: no alternative)."""
    s, e = runner.span
    n = runner.stack.n_layers
    n_alt = max([a.shape[0] for a in alt_span] + [0])
    out = torch.full((unit.shape[0], unit.shape[1], n_alt), float("nan"))
    for b, alts in enumerate(alt_span):
        if alts.shape[0]:
            diff = alts - runner.states[:n, b, s:e][None]  # [alt, layer, span, d]
            out[b, :, : alts.shape[0]] = torch.einsum("alpd,cld->calp", diff, unit[b, :, :n]).norm(dim=-1).mean(-1)
    return out


def card_interchange(runner: Any, alt_span: Sequence[Tensor], unit: Float[Tensor, "batch slot layer d_model"], *,
                     batch_size: int = 64) -> Float[Tensor, "batch slot alt"]:
    """Effect of the interchange along each prompt's own slot directions at every layer at once, per
    alternative (step 2 of the module doc; NaN where a prompt has fewer alternatives)."""
    s, e = runner.span
    n_b, n_slot = unit.shape[:2]
    n_alt = max([a.shape[0] for a in alt_span] + [0])
    out = torch.full((n_b, n_slot, n_alt), float("nan"))
    rows_all = [(b, c, a) for b in range(n_b) for c in range(n_slot) for a in range(alt_span[b].shape[0])]
    for start in range(0, len(rows_all), batch_size):
        chunk = rows_all[start:start + batch_size]
        who = torch.tensor([b for b, _, _ in chunk])
        u = torch.stack([unit[b, c] for b, c, _ in chunk])  # [row, layer, d]
        target = torch.stack([alt_span[b][a] for b, _, a in chunk])  # [row, layer, span, d]

        def edit(point: str, lyr: int, t: Tensor, u: Tensor = u, target: Tensor = target) -> Tensor:
            if point != "resid_pre":
                return t
            h = t[:, : e - s]
            coef = torch.einsum("bpd,bd->bp", target[:, lyr] - h, u[:, lyr])
            t = t.clone()
            t[:, : e - s] = h + coef[..., None] * u[:, lyr, None]
            return t

        past = {l: (kk[who], vv[who]) for l, (kk, vv) in runner.past.items()}
        with torch.no_grad():
            final, _ = forward(runner.stack, runner.states[0, who, s:], start_layer=0, pos0=s, past=past, edit=edit,
                               read_pos=runner.read, unembed=False)
            effect = runner.clean[who] - runner.score(final, runner.targets[who])
        for (b, c, a), v in zip(chunk, effect.tolist()):
            out[b, c, a] = v
    return out
