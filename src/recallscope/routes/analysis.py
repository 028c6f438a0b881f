"""Entry points of the route module: :func:`route_report` (concepts -> verdicts) and :func:`swap_effect`.

:func:`route_report` steps:

1. Turn the candidates into :class:`~recallscope.routes.concepts.Concept` objects (text or direction).
2. Give each concept ``n_controls`` controls: text concepts get frequency- and token-count-matched
   controls from a pool (:func:`~recallscope.routes.controls.match_controls`), never sharing a word with
   the input, the output or any candidate; direction-only concepts get the directions of pool texts
   (or the controls the caller passes).
3. Compute every slot's direction (:func:`~recallscope.routes.directions.concept_directions`).
4. Score every prompt of the query (:func:`~recallscope.routes.scores.score_prompt`) and collect a
   :class:`~recallscope.routes.report.RouteReport`, whose ``routes()`` gives verdicts. With
   ``checkpoint_dir`` each prompt's scores are one checkpointed chunk (:mod:`recallscope.store`).
"""

import os
import random
import time
from dataclasses import asdict, fields
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.lens.base import Lens, LogitLens
from recallscope.manifest import build_manifest
from recallscope.models.stack import build_stack
from recallscope.routes.concepts import Concept, ConceptSource, as_concept
from recallscope.routes.controls import ControlPool, default_control_pool, match_controls, text_tokens
from recallscope.routes.directions import concept_directions
from recallscope.routes.report import RouteConfig, RouteReport
from recallscope.routes.scores import PromptScores, RouteQuery, SpanRunner, prepare_prompt, score_prompt
from recallscope.store import ChunkStore, open_store


def _controls_for(model: Any, concepts: list[Concept], query: RouteQuery, pool: ControlPool | None,
                  given: Mapping[str, Sequence[Concept | str]] | None, k: int, seed: int) -> list[list[Concept]]:
    exclude = [query.input, query.output, *(c.text for c in concepts if c.text)]
    out = []
    for c in concepts:
        if given is not None and c.name in given:
            ctrl = [as_concept(x, ConceptSource.CONTROL) for x in given[c.name]]
            if len(ctrl) < 1:
                raise ConfigError(f"concept {c.name!r} was given no controls; give at least one.")
            out.append(ctrl)
            continue
        pool = pool or default_control_pool(model)
        if c.text is not None:
            out.append(match_controls(model, c, pool, k=k, exclude=exclude))
        else:
            texts = [t for t in pool.texts if not any(e and e.strip().lower() in t.lower() for e in exclude)]
            picks = random.Random(seed).sample(texts, min(k, len(texts)))
            out.append([Concept(text=t, source=ConceptSource.CONTROL, label=f"{t.strip()} (control)") for t in picks])
    return out


def _slots(concepts: list[Concept], controls: list[list[Concept]]) -> tuple[list[Concept], Tensor]:
    """Concept slots first, then each distinct control once; ``[concept, K]`` control slot indices."""
    slots = list(concepts)
    index: dict[str, int] = {}
    rows = []
    width = max(len(c) for c in controls)
    for ctrl in controls:
        row = []
        for c in ctrl:
            if c.key() not in index:
                index[c.key()] = len(slots)
                slots.append(c)
            row.append(index[c.key()])
        rows.append(row + [row[i % len(row)] for i in range(width - len(row))])
    return slots, torch.tensor(rows, dtype=torch.long)


def _direction_context(config: RouteConfig) -> dict[str, Any]:
    """The neutral prefixes and baseline words the config sets (None = the directions module's defaults)."""
    return {k: v for k, v in (("prefixes", config.prefixes), ("baseline_words", config.baseline_words)) if v is not None}


def _first_ids(model: Any, slots: list[Concept]) -> Tensor:
    return torch.tensor([text_tokens(model, c.text)[0] if c.text else -1 for c in slots])


def _score_all(model: Any, query: RouteQuery, lens: Lens, first_ids: Tensor, dirs: Any, windows: tuple[int, ...],
               config: RouteConfig, progress: bool, store: ChunkStore) -> list[PromptScores]:
    """Scores per prompt; each prompt is one chunk of ``store`` (a rerun loads the finished ones)."""
    out = []
    for i, prompt in enumerate(tqdm(query.prompts, desc=f"routes {query.name}", disable=not progress)):
        def score(i: int = i, prompt: str = prompt) -> dict[str, Tensor]:
            prep = prepare_prompt(model, prompt, query, max_output_tokens=config.max_output_tokens,
                                  n_alternatives=config.n_alternatives, seed=config.seed + i)
            s = score_prompt(model, prep, lens=lens, first_ids=first_ids, vectors=dirs.vectors,
                             baseline=dirs.baseline, windows=windows, window=config.window, method=config.method,
                             with_mediation=config.mediation, batch_size=config.batch_size,
                             remove_output_direction=config.remove_output_direction)
            return {f.name: torch.tensor([v], dtype=torch.float64) if isinstance(v := getattr(s, f.name), float)
                    else v for f in fields(s)}

        t = store.get_or_compute(f"prompt{i:05d}", score)
        out.append(PromptScores(**{f.name: float(t[f.name][0]) if f.type is float else t[f.name]
                                   for f in fields(PromptScores)}))
    return out


def route_report(model: Any, query: RouteQuery, concepts: Sequence[Concept | str], *,
                 controls: Mapping[str, Sequence[Concept | str]] | None = None, pool: ControlPool | None = None,
                 lens: Lens | None = None, config: RouteConfig = RouteConfig(), progress: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None) -> RouteReport:
    """Score ``concepts`` as routes from ``query.input`` to ``query.output``; see the module doc.

    Args:
        model: any model from ``load_model`` (or a TransformerBridge).
        query: prompts, input, output (and optional alternative inputs).
        concepts: candidate concepts: texts (" value added tax") or :class:`Concept` (text and/or direction).
        controls: optional explicit controls per concept name (overrides matching).
        pool: control pool for matching (default: :func:`~recallscope.routes.controls.default_control_pool`).
        lens: lens for the readout score (default: the logit lens).
        config: :class:`RouteConfig`.
        progress: show a progress bar over prompts.
        checkpoint_dir: checkpoint each finished prompt's scores there; the same call resumes from them
            (keyed by the model, prompts, config, query, directions and lens name; :mod:`recallscope.store`).
    """
    t0 = time.perf_counter()
    stack = build_stack(model)
    cands = [as_concept(c) for c in concepts]
    if not cands:
        raise ConfigError("route_report needs at least one candidate concept.")
    ctrl = _controls_for(model, cands, query, pool, controls, config.n_controls, config.seed)
    slots, control_idx = _slots(cands, ctrl)
    dirs = concept_directions(model, slots, batch_size=config.batch_size, **_direction_context(config))
    windows = config.layers or tuple(range(0, stack.n_layers - config.window + 1, config.stride))
    if any(not 0 <= w <= stack.n_layers - config.window for w in windows):
        raise ConfigError(f"intervention windows {windows} (width {config.window}) must lie in 0..{stack.n_layers - 1}.")
    lens = lens or LogitLens(model)
    first_ids = _first_ids(model, slots)
    cfg = {**asdict(config), "layers": list(windows), "lens": lens.name}
    manifest = build_manifest(model, list(query.prompts), cfg, seed=config.seed)
    store = open_store(checkpoint_dir, manifest, inputs={"query": query, "vectors": dirs.vectors,
                                                         "baseline": dirs.baseline, "first_ids": first_ids})
    with torch.no_grad():
        per_prompt = _score_all(model, query, lens, first_ids, dirs, windows, config, progress, store)
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry())
    return RouteReport(
        query={"prompts": list(query.prompts), "input": query.input, "output": query.output,
               "alternatives": list(query.alternatives), "name": query.name},
        names=tuple(c.name for c in slots), sources=tuple(ConceptSource(c.source).value for c in slots),
        controls=control_idx, windows=tuple(windows),
        readout_rank=torch.stack([s.readout_rank for s in per_prompt]),
        similarity=torch.stack([s.similarity for s in per_prompt]),
        ablation=torch.stack([s.ablation for s in per_prompt]),
        mediation=torch.stack([s.mediation for s in per_prompt]),
        clean=torch.tensor([s.clean for s in per_prompt]),
        total_effect=torch.tensor([s.total_effect for s in per_prompt]), config=cfg, manifest=manifest)


def swap_effect(model: Any, query: RouteQuery, concept: Concept | str, other: Concept | str, *,
                layers: Sequence[int] | None = None, window: int = 1, output: str | None = None,
                max_output_tokens: int = 3, config: RouteConfig = RouteConfig()) -> Float[Tensor, "prompt window"]:
    """Change of the output log-prob (``output``, default the query's) when the concept's direction at the
    input is swapped for ``other``'s: ``h <- h + (h . u_c - a_c)(u_o - u_c)`` (VAT -> TAX).

    Positive values: the swap raises the output's log-prob. ``config`` supplies the neutral prefixes and
    baseline of the concept directions.
    """
    stack = build_stack(model)
    pair = [as_concept(concept), as_concept(other)]
    dirs = concept_directions(model, pair, **_direction_context(config))
    unit = dirs.unit()
    absent = dirs.absent()
    windows = tuple(layers) if layers is not None else tuple(range(stack.n_layers - window + 1))
    target = RouteQuery(query.prompts, query.input, output or query.output, query.alternatives, query.name)
    rows = []
    for prompt in target.prompts:
        runner = SpanRunner(stack, prepare_prompt(model, prompt, target, max_output_tokens=max_output_tokens,
                                               n_alternatives=0, seed=0))

        def fn(h: Tensor, lyr: int) -> Tensor:
            coef = h @ unit[0, lyr] - absent[0, lyr]
            return h + coef[..., None] * (unit[1, lyr] - unit[0, lyr])

        rows.append(torch.stack([runner.run(l, window, 1, fn)[0] - runner.clean for l in windows]))
    return torch.stack(rows).detach()
