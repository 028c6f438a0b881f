"""Route scores for (input, concept, output) triples: readout, representation similarity, causal effect
and mediation, each by layer, for the concepts and their controls.

For one prompt containing the input (e.g. "The acronym VAT stands for", input " VAT") and an output
continuation (" Value"), with concept directions ``u_c[l]`` (unit) and "absent" values ``a_c[l]``
(:mod:`.directions`):

1. **Clean run.** Hidden states of every layer and keys/values; the metric ``M`` is the teacher-forced
   log-prob of the output's first tokens (``metrics.SequenceLogProb``).
2. **(a) Readout.** Decode the input's hidden states with a lens (logit lens, tuned lens or Patchscope)
   and take the best rank of the concept's first token over the input positions, per layer.
   (Before scoring, the direct output-logit directions at the read positions are projected out of every
   concept direction: otherwise a concept that itself predicts the output would "mediate" merely by
   carrying the output's unembedding direction, which matters when the input is the read position.)
3. **(b) Similarity.** Cosine between the input's last-token hidden state minus the baseline and the
   concept direction ``d_c[l]``, per layer.
4. **(c) Mean ablation** (reported; no verdict rests on it): ablate the concept direction at the input
   positions at layer ``l`` (window of ``w`` layers): ``h <- h - (h . u - a) u``; effect =
   ``M_clean - M_ablated`` (positive: the concept helps the output). Runs start at layer ``l`` and the
   input's first position, reusing the clean keys/values (exact, like the patching engine).
   ``method="attribution"`` instead uses the first-order estimate ``sum_pos (h . u - a)(dM/dh . u)`` from
   one backward pass (AtP-style; fast, approximate). :func:`swap_effect` replaces the direction by another
   concept's (``h + (h . u_c)(u_o - u_c)``).
5. **(d) Interchange** (the primary score; :mod:`~recallscope.routes.interchange`): replace the input by
   alternatives (same token count) to get the total effect ``TE = M_clean - M_alt``; then, in the clean
   run, set only the component along ``u_c`` at the input positions to its value in the alternative run:
   ``h <- h + k ((h_alt - h) . u) u`` (``k = 1``, or the factor matching a competitor's edit norm to a
   concept's). Effect ``M_clean - M_edited`` per alternative; :func:`mediation` is its share of ``TE``.
"""

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, LengthMismatchError, RecallscopeError
from recallscope.lens.base import Lens, run_hidden
from recallscope.lens.tuned import frozen
from recallscope.metrics import SequenceLogProb
from recallscope.models.forward import forward
from recallscope.models.selfcheck import checked_stack
from recallscope.models.stack import Stack, norm_gain
from recallscope.routes.concepts import word_vocabulary
from recallscope.tasks.facts import token_char_bounds


@dataclass(frozen=True)
class RouteQuery:
    """An (input, output) pair to look for routes in, over one or more prompts.

    Attributes:
        prompts: prompts that each contain ``input`` (its last occurrence is the input span) and that the
            model continues with ``output``; several phrasings give confidence intervals over prompts.
        input: the input text, e.g. ``" VAT"`` or ``"VA"``.
        output: the continuation whose log-prob is the output metric, e.g. ``" Value"``.
        alternatives: replacement inputs with the same token count, for the total effect and mediation;
            empty = random vocabulary tokens of the same shape.
        name: a label for reports.
    """

    prompts: tuple[str, ...]
    input: str
    output: str
    alternatives: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        if not self.prompts or not self.input or not self.output:
            raise ConfigError("a RouteQuery needs prompts, a non-empty input and a non-empty output.")
        missing = [p for p in self.prompts if self.input not in p]
        if missing:
            raise ConfigError(f"the input {self.input!r} does not occur in prompt {missing[0]!r}; every prompt must "
                              "contain it.")
        object.__setattr__(self, "alternatives", tuple(self.alternatives))
        if not self.name:
            object.__setattr__(self, "name", f"{self.input.strip()} -> {self.output.strip()}")


@dataclass(frozen=True)
class PreparedPrompt:
    """Token-level view of one prompt of a query."""

    tokens: Int[Tensor, "1 pos"]
    """prompt + output[:-1] (teacher forcing)."""
    span: tuple[int, int]
    """input token positions ``[start, stop)``."""
    targets: Int[Tensor, " out"]
    """output token ids."""
    alt_tokens: Int[Tensor, "alt pos"]
    """tokens with the input span replaced by each alternative."""

    @property
    def read(self) -> Tensor:
        n = self.tokens.shape[1]
        return torch.arange(n - len(self.targets), n)


def input_span(model: Any, prompt: str, text: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` and the token range ``[start, stop)`` covering the last occurrence of ``text``."""
    ids, bounds = token_char_bounds(model, prompt)
    start = prompt.rindex(text)
    stop = start + len(text)
    inside = [i for i, (a, b) in enumerate(bounds) if b > a and a < stop and b > start]
    if not inside:
        raise RecallscopeError(f"no token of {prompt!r} covers the input {text!r}; check the input text.")
    return ids, (inside[0], inside[-1] + 1)


def _random_alternatives(model: Any, ids: list[int], span: tuple[int, int], n: int, seed: int) -> list[list[int]]:
    """Replace each input token by a random whole-word token (leading space kept) ``n`` times."""
    words = [i for i, _ in word_vocabulary(model)][:20000]
    bare = model.tokenizer.convert_ids_to_tokens(ids)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        alt = list(ids)
        for pos in range(*span):
            pick = words[int(torch.randint(len(words), (1,), generator=gen))]
            alt[pos] = pick if bare[pos][:1] in ("Ġ", "▁", " ") or pos == span[0] else ids[pos]
        out.append(alt)
    return out


def prepare_prompt(model: Any, prompt: str, query: RouteQuery, *, max_output_tokens: int, n_alternatives: int,
                   seed: int) -> PreparedPrompt:
    """Tokenise one prompt of ``query``: input span, output targets and alternative inputs."""
    ids, span = input_span(model, prompt, query.input)
    full, _ = token_char_bounds(model, prompt + query.output)
    targets = full[len(ids):][:max_output_tokens] if full[: len(ids)] == ids else []
    if not targets:
        targets = model.tokenizer.encode(query.output, add_special_tokens=False)[:max_output_tokens]
    alts = []
    for alt in query.alternatives:
        start = prompt.rindex(query.input)
        alt_ids, alt_span = input_span(model, prompt[:start] + alt + prompt[start + len(query.input):], alt)
        if len(alt_ids) != len(ids) or alt_span != span:
            raise LengthMismatchError(f"alternative {alt!r} changes the token count of {prompt!r} (input "
                                      f"{query.input!r}); give alternatives with the input's token count.")
        alts.append(alt_ids)
    if not alts and n_alternatives:
        alts = _random_alternatives(model, ids, span, n_alternatives, seed)
    tail = torch.tensor(targets[:-1], dtype=torch.long)
    tokens = torch.cat([torch.tensor(ids), tail])[None]
    alt_tokens = torch.stack([torch.cat([torch.tensor(a), tail]) for a in alts]) if alts else tokens[:0]
    return PreparedPrompt(tokens=tokens, span=span, targets=torch.tensor(targets), alt_tokens=alt_tokens)


@dataclass(frozen=True)
class PromptScores:
    """Scores of every slot (concepts, competitors, controls, then matched random directions) on one prompt;
    layers are hidden-state layers. NaN where a score was not computed."""

    readout_rank: Float[Tensor, "slot layer"]
    similarity: Float[Tensor, "slot layer"]
    ablation: Float[Tensor, "slot window"]
    """Mean-ablation effect (nats)."""
    interchange: Float[Tensor, "slot alt window"]
    """Interchange effect (nats) per alternative input (:mod:`~recallscope.routes.interchange`)."""
    edit_norm: Float[Tensor, "slot alt window"]
    """Norm of the interchange edit at the window's first layer, per alternative."""
    alt_effect: Float[Tensor, " alt"]
    """``M_clean - M_alt`` per alternative input."""
    clean: float
    total_effect: float


def output_directions(stack: Stack, targets: Int[Tensor, " out"], dtype: torch.dtype = torch.float32
                      ) -> Float[Tensor, "out d_model"]:
    """Orthonormal basis of the output tokens' direct logit directions ``W_U[t] * g`` (unembedding row
    times the final norm's gain, the norm's input-dependent scaling left out)."""
    gain = norm_gain(stack.final_norm, stack.d_model).to(dtype)
    z = torch.zeros(stack.d_model, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        logits = stack.unembed(z * gain)
        rows = [torch.autograd.grad(logits[int(t)], z, retain_graph=True)[0] for t in targets]
    q, _ = torch.linalg.qr(torch.stack(rows).T.double())
    return q.T.to(dtype)


class SpanRunner:
    """Exact interventions on the input span of one prepared prompt."""

    def __init__(self, stack: Stack, prep: PreparedPrompt) -> None:
        self.stack, self.prep = stack, prep
        self.metric = SequenceLogProb(prep.targets[None])
        with torch.no_grad():
            self.states, trace = run_hidden(stack, prep.tokens)  # [layer, 1, pos, d]
            self.clean = float(self.score(self.states[-1][:, prep.read]))
        s = prep.span[0]
        self.past = {l: (k[:, :, :s], v[:, :, :s]) for l, (k, v) in trace.kv.items()}

    def output_directions(self) -> Float[Tensor, "out d_model"]:
        """:func:`output_directions` of this prompt's output tokens."""
        return output_directions(self.stack, self.prep.targets, self.states.dtype)

    def score(self, final: Tensor) -> Tensor:
        """Metric of final residuals at the read positions ``[batch, read, d]``."""
        return self.metric(self.stack.unembed(self.stack.final_norm(final)))

    def run(self, layer: int, window: int, batch: int, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
        """Metric after ``fn(h_span, layer)`` edits the input span at layers ``layer..layer+window-1``."""
        s, e = self.prep.span
        x = self.states[layer, :, s:].expand(batch, -1, -1)

        def edit(point: str, lyr: int, t: Tensor) -> Tensor:
            if point == "resid_pre" and layer <= lyr < layer + window:
                t = t.clone()
                t[:, : e - s] = fn(t[:, : e - s], lyr)
            return t

        with torch.no_grad():
            final, _ = forward(self.stack, x, start_layer=layer, pos0=s, past=self.past, edit=edit,
                               read_pos=self.prep.read, unembed=False)
        return self.score(final)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def ablation_exact(runner: SpanRunner, unit: Tensor, absent: Tensor, windows: Sequence[int], window: int,
                   batch_size: int) -> Float[Tensor, "slot window"]:
    """(c) exact: ``M_clean - M`` after mean-ablating each slot's direction (see the module doc)."""
    out = torch.zeros(unit.shape[0], len(windows))
    for j, layer in enumerate(windows):
        for chunk in _chunks(unit.shape[0], batch_size):
            u, a = unit[chunk], absent[chunk]

            def fn(h: Tensor, lyr: int, u: Tensor = u, a: Tensor = a) -> Tensor:
                coef = torch.einsum("bpd,bd->bp", h, u[:, lyr]) - a[:, lyr, None]
                return h - coef[..., None] * u[:, lyr, None]

            out[chunk, j] = runner.clean - runner.run(layer, window, chunk.stop - chunk.start, fn)
    return out


def ablation_attribution(model: Any, runner: SpanRunner, unit: Tensor, absent: Tensor, windows: Sequence[int],
                         window: int) -> Float[Tensor, "slot window"]:
    """(c) first-order estimate from one backward pass: ``sum_pos (h . u - a)(dM/dh . u)``, summed over
    the window's layers."""
    stack, prep = runner.stack, runner.prep
    s, e = prep.span
    n_layers = stack.n_layers
    deltas = torch.zeros(n_layers, 1, prep.tokens.shape[1], stack.d_model, requires_grad=True)

    def edit(point: str, lyr: int, t: Tensor) -> Tensor:
        return t + deltas[lyr] if point == "resid_pre" else t

    positions = torch.arange(prep.tokens.shape[1])
    with frozen(model), torch.enable_grad():
        final, _ = forward(stack, stack.embed(prep.tokens, positions), edit=edit, read_pos=prep.read, unembed=False)
        runner.score(final).sum().backward()
    grad = deltas.grad[:, 0, s:e]  # [layer, span, d]
    h = runner.states[:n_layers, 0, s:e]
    coef = torch.einsum("lpd,cld->clp", h, unit[:, :n_layers]) - absent[:, :n_layers, None]
    per_layer = (coef * torch.einsum("lpd,cld->clp", grad, unit[:, :n_layers])).sum(-1)  # [slot, layer]
    return torch.stack([per_layer[:, l:l + window].sum(-1) for l in windows], dim=1)


def alternative_runs(runner: SpanRunner) -> tuple[Tensor, Tensor]:
    """Hidden states ``[layer, alt, pos, d]`` and metric ``[alt]`` of the alternative-input runs."""
    with torch.no_grad():
        alt_states, _ = run_hidden(runner.stack, runner.prep.alt_tokens)
    return alt_states, runner.score(alt_states[-1][:, runner.prep.read])


def mediation(runner: SpanRunner, alt_states: Tensor, alt_metric: Tensor, unit: Tensor, windows: Sequence[int],
              window: int, batch_size: int) -> Float[Tensor, "slot window"]:
    """(d): the share of the total effect reproduced by swapping in only the slot's direction component."""
    s, e = runner.prep.span
    drops = torch.zeros(unit.shape[0], len(windows))
    for a in range(alt_states.shape[1]):
        for j, layer in enumerate(windows):
            for chunk in _chunks(unit.shape[0], batch_size):
                u = unit[chunk]

                def fn(h: Tensor, lyr: int, u: Tensor = u, a: int = a) -> Tensor:
                    diff = alt_states[lyr, a, s:e] - h  # [batch, span, d]
                    return h + torch.einsum("bpd,bd->bp", diff, u[:, lyr])[..., None] * u[:, lyr, None]

                drops[chunk, j] += runner.clean - runner.run(layer, window, chunk.stop - chunk.start, fn)
    return drops / float((runner.clean - alt_metric).sum())


def readout_ranks(lens: Lens, states: Float[Tensor, "layer pos d_model"], first_ids: Int[Tensor, " slot"]
                  ) -> Float[Tensor, "slot layer"]:
    """(a) best rank (over ``pos``) of each slot's first token under ``lens``, per layer (NaN for id -1)."""
    with torch.no_grad():
        logp = lens.all_layers(states)  # [layer, pos, vocab]
    have = first_ids >= 0
    own = logp[..., first_ids.clamp_min(0)]  # [layer, pos, slot]
    if own.shape[-1] <= 32:  # rank = number of tokens with a higher log-prob
        ranks = (logp[..., None, :] > own[..., None]).sum(-1).float().amin(1).T  # [slot, layer]
    else:
        ascending = (-logp).sort(dim=-1).values
        ranks = torch.searchsorted(ascending.contiguous(), (-own).contiguous()).float().amin(1).T
    return ranks.masked_fill(~have[:, None], float("nan"))


def readout_and_similarity(runner: SpanRunner, lens: Lens, first_ids: Tensor, vectors: Tensor, baseline: Tensor,
                           *, last_only: bool = False) -> tuple[Float[Tensor, "slot layer"], Float[Tensor, "slot layer"]]:
    """(a) best rank of each slot's first token over the input span (or its last token) per layer (NaN for
    id -1); (b) cosine of the input's last hidden state (minus baseline) with each slot's direction."""
    s, e = runner.prep.span
    first = e - 1 if last_only else s
    ranks = readout_ranks(lens, runner.states[:, 0, first:e], first_ids)
    h = runner.states[:, 0, e - 1] - baseline  # [layer, d]
    sim = torch.nn.functional.cosine_similarity(h[None], vectors, dim=-1)
    return ranks, sim


def _random_slots(runner: SpanRunner, vectors: Tensor, baseline: Tensor, random_of: Sequence[int],
                  seed: int) -> Tensor:
    """Per owner slot in ``random_of``, a random direction matched to it on cos(h - b, u) at the input's
    last token, every layer (:func:`~recallscope.routes.competitors.matched_random`)."""
    from recallscope.routes.competitors import matched_random

    state = runner.states[:, 0, runner.prep.span[1] - 1] - baseline  # [layer, d]
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([matched_random(vectors[c], state, 1, gen)[0] for c in random_of])


def score_prompt(model: Any, prep: PreparedPrompt, *, lens: Lens, first_ids: Tensor, vectors: Tensor,
                 baseline: Tensor, windows: Sequence[int], window: int, method: str, with_mediation: bool,
                 batch_size: int, remove_output_direction: bool = True, random_of: Sequence[int] = (),
                 matched: Sequence[tuple[int, int]] = (), no_interchange: Sequence[int] = (), seed: int = 0,
                 with_ablation: bool = True) -> PromptScores:
    """All scores for every slot on one prepared prompt.

    Slots: the rows of ``vectors``; then one random direction per entry of ``random_of`` (the slot it is
    matched to: cosine with this prompt's state at every layer, and edit norm in the interchange); then one
    copy of slot ``source`` per ``(source, owner)`` in ``matched``, its interchange edit scaled to the edit
    norm of slot ``owner``. Slots in ``no_interchange`` (controls) skip the interchange (NaN); ``first_ids``
    covers every slot. With ``remove_output_direction`` the directions that write the output tokens'
    logits directly (:meth:`SpanRunner.output_directions`) are projected out of every given direction
    first, so that a concept whose own representation already predicts the output is not credited with
    writing it.
    """
    from recallscope.routes.interchange import edit_norms, interchange

    if method not in ("exact", "attribution"):
        raise ConfigError(f"unknown method {method!r}; use 'exact' or 'attribution'.")
    stack = checked_stack(model, "the route scores")
    runner = SpanRunner(stack, prep)
    if remove_output_direction:
        q = runner.output_directions()  # [out, d]
        vectors = vectors - torch.einsum("cld,od,oe->cle", vectors, q, q)
    n_fixed, n_rand = vectors.shape[0], len(random_of)
    parts = [vectors]
    if n_rand:
        parts.append(_random_slots(runner, vectors, baseline, random_of, seed))
    if matched:
        parts.append(vectors[torch.tensor([src for src, _ in matched])])
    vectors = torch.cat(parts)
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    absent = torch.einsum("cld,ld->cl", unit, baseline)
    ranks, sim = readout_and_similarity(runner, lens, first_ids, vectors, baseline)
    n_all = unit.shape[0]
    n_alt = prep.alt_tokens.shape[0]
    nan = torch.full((n_all, len(windows)), float("nan"))
    inter, norm = torch.full((n_all, n_alt, len(windows)), float("nan")), torch.full((n_all, n_alt, len(windows)), float("nan"))
    ablation, total, alt_effect = nan, float("nan"), torch.full((n_alt,), float("nan"))
    if with_ablation:  # not for the matched copies: same directions as their sources
        own = slice(0, n_fixed + n_rand)
        ablation = nan.clone()
        ablation[own] = (ablation_exact(runner, unit[own], absent[own], windows, window, batch_size)
                         if method == "exact" else ablation_attribution(model, runner, unit[own], absent[own],
                                                                       windows, window))
    if prep.alt_tokens.shape[0]:
        alt_states, alt_metric = alternative_runs(runner)
        alt_effect = (runner.clean - alt_metric).float()
        total = float(alt_effect.mean())
        if with_mediation:
            norms = edit_norms(runner, alt_states, unit, windows)  # [slot, alt, window]
            scale = torch.ones_like(norms)
            owners = list(random_of) + [o for _, o in matched]
            for r, owner in enumerate(owners):
                scale[n_fixed + r] = norms[owner] / norms[n_fixed + r].clamp_min(1e-8)
            keep = torch.tensor([i for i in range(n_all) if i not in set(no_interchange)], dtype=torch.long)
            inter[keep] = interchange(runner, alt_states, unit[keep], windows, window, batch_size, scale[keep])
            norm[keep] = (norms * scale)[keep]
    return PromptScores(readout_rank=ranks, similarity=sim, ablation=ablation, interchange=inter, edit_norm=norm,
                        alt_effect=alt_effect, clean=runner.clean, total_effect=total)
