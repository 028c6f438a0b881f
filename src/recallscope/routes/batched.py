"""Route scores for a batch of prompts of one shape: the fast path of the human comparison.

:class:`BatchRunner` computes the scores of :mod:`.scores` (a :class:`~recallscope.routes.scores.SpanRunner`
per prompt, the reference implementation and the tests' oracle) for ``B`` prepared prompts that share
their token count, input span and output length, so that each forward reads the weights once for all of
them (a CPU forward of a few tokens is bound by reading the weights, not by arithmetic):

1. **Clean run and gradients.** One forward of the ``B`` prompts with a zero perturbation ``delta[l]``
   added to ``resid_pre`` of every layer keeps the hidden states, the keys/values and each prompt's
   clean metric ``M_b`` (teacher-forced output log-prob); one backward of ``sum_b M_b`` gives every
   prompt's own gradient ``dM_b/dh`` (prompts do not interact in a batch).
2. **Attribution** (:meth:`BatchRunner.attribution`): per prompt, concept and layer,
   ``sum_pos (h . u - a)(dM/dh . u)`` over the input positions (AtP-style first-order estimate of the
   ablation effect), exactly :func:`~recallscope.routes.scores.ablation_attribution` per prompt.
3. **Exact ablation** (:meth:`BatchRunner.ablation`): each prompt's own ``K`` directions are
   mean-ablated (``h <- h - (h . u - a) u``) at the input positions of every layer at once; the
   ``B * K`` rows run together from the span's first position, each reusing its prompt's clean
   keys/values. Effect = ``M_clean - M_ablated``.
4. **Readout and similarity** per prompt from its hidden states
   (:func:`~recallscope.routes.scores.readout_ranks`).
5. **Total effect** (:meth:`BatchRunner.total_effect`): ``M_clean - mean_alt M_alt`` over each prompt's
   alternative inputs (``PreparedPrompt.alt_tokens``), as in :func:`~recallscope.routes.scores.score_prompt`.
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import LengthMismatchError
from recallscope.lens.tuned import frozen
from recallscope.metrics import SequenceLogProb
from recallscope.models.forward import forward
from recallscope.models.selfcheck import checked_stack
from recallscope.routes.scores import PreparedPrompt


def shape_key(prep: PreparedPrompt) -> tuple[int, int, int, int]:
    """Prompts with the same key can share a :class:`BatchRunner`: (tokens, span start, span stop, outputs)."""
    return (prep.tokens.shape[1], *prep.span, len(prep.targets))


class BatchRunner:
    """Clean states, gradients and exact ablations for prompts of one :func:`shape_key`.

    Attributes:
        states: ``[layer, batch, pos, d_model]`` hidden states (``n_layers + 1`` layers).
        grad: ``[n_layers, batch, pos, d_model]`` gradient of each prompt's metric w.r.t. ``resid_pre``.
        clean: ``[batch]`` clean metric (summed output log-prob).
    """

    def __init__(self, model: Any, preps: Sequence[PreparedPrompt]) -> None:
        keys = {shape_key(p) for p in preps}
        if len(keys) != 1:
            raise LengthMismatchError(f"a BatchRunner needs prompts of one shape (tokens, span, outputs); got "
                                      f"{sorted(keys)}. Group them by shape_key first.")
        self.stack = checked_stack(model, "the route scores")
        self.span = preps[0].span
        self.read = preps[0].read
        tokens = torch.cat([p.tokens for p in preps])
        self.alt_tokens = [p.alt_tokens for p in preps]
        self.targets = torch.stack([p.targets for p in preps])
        n_layers, (b, n_pos) = self.stack.n_layers, tokens.shape
        deltas = torch.zeros(n_layers, b, n_pos, self.stack.d_model, requires_grad=True)

        def edit(point: str, lyr: int, t: Tensor) -> Tensor:
            return t + deltas[lyr] if point == "resid_pre" else t

        positions = torch.arange(n_pos)
        with frozen(model), torch.enable_grad():
            final, trace = forward(self.stack, self.stack.embed(tokens, positions), edit=edit,
                                   record={"resid_pre"}, unembed=False)
            metric = self.score(final[:, self.read], self.targets)
            metric.sum().backward()
        self.states = torch.stack([trace.acts[("resid_pre", l)].detach() for l in range(n_layers)] + [final.detach()])
        self.grad = deltas.grad
        self.clean = metric.detach()
        s = self.span[0]
        self.past = {l: (k[:, :, :s].detach(), v[:, :, :s].detach()) for l, (k, v) in trace.kv.items()}

    def score(self, final: Tensor, targets: Int[Tensor, "batch out"]) -> Tensor:
        """Metric of final residuals at the read positions ``[batch, read, d]``."""
        return SequenceLogProb(targets)(self.stack.unembed(self.stack.final_norm(final)))

    def attribution(self, unit: Float[Tensor, "*batch slot layer d_model"], absent: Float[Tensor, "*batch slot layer"]
                    ) -> Float[Tensor, "batch slot n_layers"]:
        """First-order ablation effect of slot directions per prompt and layer (step 2): directions shared by
        all prompts (``[slot, layer, d]``) or each prompt's own (``[batch, slot, layer, d]``)."""
        s, e = self.span
        n = self.stack.n_layers
        h, g = self.states[:n, :, s:e], self.grad[:, :, s:e]  # [layer, batch, span, d]
        eq = "lbpd,cld->bclp" if unit.ndim == 3 else "lbpd,bcld->bclp"
        a = absent[..., :n, None] if absent.ndim == 3 else absent[None, :, :n, None]
        coef = torch.einsum(eq, h, unit[..., :n, :]) - a
        return (coef * torch.einsum(eq, g, unit[..., :n, :])).sum(-1)

    def ablation(self, unit: Float[Tensor, "batch slot layer d_model"], absent: Float[Tensor, "batch slot layer"],
                 *, batch_size: int = 64) -> Float[Tensor, "batch slot"]:
        """Exact effect of mean-ablating each prompt's own slot directions at every layer at once (step 3)."""
        s, e = self.span
        b, k = unit.shape[:2]
        owner = torch.arange(b).repeat_interleave(k)  # row -> prompt
        u_rows, a_rows = unit.flatten(0, 1), absent.flatten(0, 1)
        out = torch.zeros(b * k)
        for start in range(0, b * k, batch_size):
            rows = slice(start, min(b * k, start + batch_size))
            who, u, a = owner[rows], u_rows[rows], a_rows[rows]

            def edit(point: str, lyr: int, t: Tensor, u: Tensor = u, a: Tensor = a) -> Tensor:
                if point != "resid_pre":
                    return t
                h = t[:, : e - s]
                coef = torch.einsum("bpd,bd->bp", h, u[:, lyr]) - a[:, lyr, None]
                t = t.clone()
                t[:, : e - s] = h - coef[..., None] * u[:, lyr, None]
                return t

            past = {l: (kk[who], vv[who]) for l, (kk, vv) in self.past.items()}
            with torch.no_grad():
                final, _ = forward(self.stack, self.states[0, who, s:], start_layer=0, pos0=s, past=past, edit=edit,
                                   read_pos=self.read, unembed=False)
                out[rows] = self.clean[who] - self.score(final, self.targets[who])
        return out.view(b, k)

    def total_effect(self, *, batch_size: int = 64) -> Float[Tensor, " batch"]:
        """``M_clean - mean_alt M_alt`` per prompt over its alternative inputs (NaN for a prompt without any)."""
        owner = torch.tensor([b for b, alts in enumerate(self.alt_tokens) for _ in range(alts.shape[0])], dtype=torch.long)
        out = torch.full((len(self.alt_tokens),), float("nan"))
        if not len(owner):
            return out
        tokens = torch.cat(list(self.alt_tokens))
        metric = torch.zeros(len(owner))
        positions = torch.arange(tokens.shape[1])
        with torch.no_grad():
            for start in range(0, len(owner), batch_size):
                rows = slice(start, start + batch_size)
                final, _ = forward(self.stack, self.stack.embed(tokens[rows], positions), read_pos=self.read,
                                   unembed=False)
                metric[rows] = self.score(final, self.targets[owner[rows]])
        for b in owner.unique().tolist():
            out[b] = self.clean[b] - metric[owner == b].mean()
        return out
