"""Entry points of the route module: :func:`route_report` (concepts -> verdicts) and :func:`swap_effect`.

:func:`route_report` steps:

1. Expand the prompts to ``config.n_templates`` (:func:`~recallscope.routes.templates.expand_prompts`).
2. Build the slots (:func:`build_slots`): the caller's concepts (one that is the input or the output, any
   casing or spacing, becomes a competitor), the generated competitors (input, output variants, output
   neighbours; :mod:`~recallscope.routes.competitors`), the caller's competitor classes, each tested
   concept's frequency- and token-count-matched controls (:func:`~recallscope.routes.controls.match_controls`)
   and ``n_random`` random directions per tested concept, matched per prompt on the cosine with the state
   and in the interchange on edit norm.
3. Compute every fixed slot's direction (:func:`~recallscope.routes.directions.concept_directions`).
4. Score every prompt (:func:`~recallscope.routes.scores.score_prompt`: interchange, edit norm, mean
   ablation, readout, similarity) and collect a :class:`~recallscope.routes.report.RouteReport`, whose
   ``routes()`` gives the verdicts. With ``checkpoint_dir`` each prompt's scores are one checkpointed chunk
   (:mod:`recallscope.store`).
"""

import os
import random
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.lens.base import Lens, LogitLens
from recallscope.manifest import build_manifest
from recallscope.models.selfcheck import checked_stack
from recallscope.routes.competitors import competitor_class, output_neighbours, variant_concepts
from recallscope.routes.concepts import Concept, ConceptSource, as_concept
from recallscope.routes.controls import ControlPool, default_control_pool, match_controls, text_tokens
from recallscope.routes.directions import concept_directions
from recallscope.routes.config import RouteConfig
from recallscope.routes.report import RouteReport
from recallscope.routes.templates import expand_prompts
from recallscope.routes.text import letters
from recallscope.routes.scores import PromptScores, RouteQuery, SpanRunner, prepare_prompt, score_prompt
from recallscope.store import ChunkStore, open_store


def _controls_for(model: Any, concepts: list[Concept], query: RouteQuery, pool: ControlPool | None,
                  given: Mapping[str, Sequence[Concept | str]] | None, k: int, seed: int) -> list[list[Concept]]:
    exclude = [query.input, query.output, *(c.text for c in concepts if c.text)]
    out: list[list[Concept]] = []
    for c in concepts:
        if given is not None and c.name in given:
            ctrl = [as_concept(x, ConceptSource.CONTROL) for x in given[c.name]]
            if len(ctrl) < 1:
                raise ConfigError(f"concept {c.name!r} was given no controls; give at least one.")
            out.append(ctrl)
            continue
        if k == 0:
            out.append([])
            continue
        pool = pool or default_control_pool(model)
        if c.text is not None:
            out.append(match_controls(model, c, pool, k=k, exclude=exclude))
        else:
            texts = [t for t in pool.texts if not any(e and e.strip().lower() in t.lower() for e in exclude)]
            picks = random.Random(seed).sample(texts, min(k, len(texts)))
            out.append([Concept(text=t, source=ConceptSource.CONTROL, label=f"{t.strip()} (control)") for t in picks])
    return out


@dataclass
class Slots:
    """The slots of a report: fixed directions (``concepts``) then one random direction per ``random_of``."""

    concepts: list[Concept] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    random_of: list[int] = field(default_factory=list)
    matched: list[tuple[int, int]] = field(default_factory=list)
    """``(source, owner)``: a copy of competitor ``source`` with the edit norm of tested slot ``owner``."""

    def add(self, concept: Concept, role: str, cls: str, owner: int = -1) -> None:
        self.concepts.append(concept)
        self.roles.append(role)
        self.classes.append(cls)
        self.owner.append(owner)

    def names(self) -> list[str]:
        return ([c.name for c in self.concepts] + [f"random ~ {self.concepts[o].name} #{i}"
                                                   for i, o in enumerate(self.random_of)]
                + [f"{self.concepts[j].name} @ norm of {self.concepts[o].name}" for j, o in self.matched])

    def all_roles(self) -> list[str]:
        return self.roles + ["random"] * len(self.random_of) + ["matched"] * len(self.matched)

    def all_classes(self) -> list[str]:
        return self.classes + ["random"] * len(self.random_of) + [self.classes[j] for j, _ in self.matched]

    def all_owners(self) -> list[int]:
        return self.owner + list(self.random_of) + [o for _, o in self.matched]

    def all_sources(self) -> list[str]:
        return ([ConceptSource(c.source).value for c in self.concepts] + [ConceptSource.RANDOM.value]
                * len(self.random_of) + [ConceptSource(self.concepts[j].source).value for j, _ in self.matched])


def build_slots(model: Any, query: RouteQuery, concepts: Sequence[Concept | str], config: RouteConfig, *,
                controls: Mapping[str, Sequence[Concept | str]] | None = None, pool: ControlPool | None = None,
                competitors: Mapping[str, Sequence[Concept | str]] | None = None) -> Slots:
    """Candidates (a caller's concept that is the input or the output becomes a competitor), the generated
    competitors (:mod:`~recallscope.routes.competitors`), the caller's competitor classes, each tested
    concept's controls, then its matched random directions."""
    slots = Slots()
    for c in (as_concept(c) for c in concepts):
        cls = competitor_class(c.text, query.input, query.output)
        slots.add(c, "candidate" if cls is None else "competitor", cls or "candidate")
    if not slots.concepts:
        raise ConfigError("route_report needs at least one candidate concept.")
    tested = [i for i, r in enumerate(slots.roles) if r == "candidate" or config.test_competitors]
    given = [c.text for c in slots.concepts if c.text]
    if config.input_competitor and query.input not in given and letters(query.input):
        slots.add(Concept(text=query.input, source=ConceptSource.INPUT, label=f"{query.input.strip()} (input)"),
                  "auto", "input")
    if config.output_variants:
        for c in variant_concepts(model, query.output, skip=given):
            slots.add(c, "auto", "output")
    for c in output_neighbours(model, query.output, config.n_neighbours, exclude=[query.input, *given]):
        slots.add(c, "auto", "neighbour")
    for name, items in (competitors or {}).items():
        if name in ("candidate", "random", "control"):
            raise ConfigError(f"competitor class name {name!r} is reserved; choose another name.")
        for x in items:
            slots.add(as_concept(x, ConceptSource.USER), "auto", name)
    tested_concepts = [slots.concepts[i] for i in tested]
    for i, ctrl in zip(tested, _controls_for(model, tested_concepts, query, pool, controls, config.n_controls,
                                             config.seed)):
        for c in ctrl:
            slots.add(c, "control", "control", i)
    slots.random_of = [i for i in tested for _ in range(config.n_random)]
    if config.match_norm:
        shared = [j for j, r in enumerate(slots.roles) if r in ("auto", "competitor")]
        slots.matched = [(j, i) for i in tested for j in shared if j != i]
    return slots


def _direction_context(config: RouteConfig) -> dict[str, Any]:
    """The neutral prefixes and baseline words the config sets (None = the directions module's defaults)."""
    return {k: v for k, v in (("prefixes", config.prefixes), ("baseline_words", config.baseline_words)) if v is not None}


def _first_ids(model: Any, slots: list[Concept]) -> Tensor:
    """First token of each slot's text in context (-1: no text, or a text the tokenizer drops)."""
    ids = [text_tokens(model, c.text) if c.text else [] for c in slots]
    return torch.tensor([t[0] if t else -1 for t in ids], dtype=torch.long)


def _score_all(model: Any, query: RouteQuery, lens: Lens, first_ids: Tensor, dirs: Any, slots: Slots,
               windows: tuple[int, ...], config: RouteConfig, progress: bool, store: ChunkStore) -> list[PromptScores]:
    """Scores per prompt; each prompt is one chunk of ``store`` (a rerun loads the finished ones)."""
    out = []
    for i, prompt in enumerate(tqdm(query.prompts, desc=f"routes {query.name}", disable=not progress)):
        def score(i: int = i, prompt: str = prompt) -> dict[str, Tensor]:
            prep = prepare_prompt(model, prompt, query, max_output_tokens=config.max_output_tokens,
                                  n_alternatives=config.n_alternatives, seed=config.seed + i)
            s = score_prompt(model, prep, lens=lens, first_ids=first_ids, vectors=dirs.vectors,
                             baseline=dirs.baseline, windows=windows, window=config.window, method=config.method,
                             with_mediation=config.mediation, batch_size=config.batch_size,
                             remove_output_direction=config.remove_output_direction,
                             random_of=slots.random_of, matched=slots.matched,
                             no_interchange=[j for j, r in enumerate(slots.roles) if r == "control"],
                             seed=config.seed * 100003 + i, with_ablation=config.ablation)
            return {f.name: torch.tensor([v], dtype=torch.float64) if isinstance(v := getattr(s, f.name), float)
                    else v for f in fields(s)}

        t = store.get_or_compute(f"prompt{i:05d}", score)
        out.append(PromptScores(**{f.name: float(t[f.name][0]) if f.type is float else t[f.name]
                                   for f in fields(PromptScores)}))
    return out


def route_report(model: Any, query: RouteQuery, concepts: Sequence[Concept | str], *,
                 controls: Mapping[str, Sequence[Concept | str]] | None = None, pool: ControlPool | None = None,
                 lens: Lens | None = None, config: RouteConfig = RouteConfig(),
                 competitors: Mapping[str, Sequence[Concept | str]] | None = None, progress: bool = True,
                 checkpoint_dir: str | os.PathLike | None = None) -> RouteReport:
    """Score ``concepts`` as routes from ``query.input`` to ``query.output`` against their competitors;
    see the module doc and :mod:`~recallscope.routes.report` for the evidence standard.

    Args:
        model: any model from ``load_model`` (or a TransformerBridge).
        query: prompts, input, output (and optional alternative inputs); fewer than ``config.n_templates``
            prompts are expanded with :func:`~recallscope.routes.templates.expand_prompts`.
        concepts: candidate concepts: texts (" value added tax") or :class:`Concept` (text and/or direction);
            one that is the input or the output (any casing or spacing) is scored as a competitor.
        controls: optional explicit controls per concept name (overrides matching).
        pool: control pool for matching (default: :func:`~recallscope.routes.controls.default_control_pool`).
        lens: lens for the readout score (default: the logit lens).
        config: :class:`RouteConfig` (every default of the detector).
        competitors: extra competitor classes, name -> concepts; every candidate must beat each class.
        progress: show a progress bar over prompts.
        checkpoint_dir: checkpoint each finished prompt's scores there; the same call resumes from them
            (keyed by the model, prompts, config, query, directions and lens name; :mod:`recallscope.store`).
    """
    t0 = time.perf_counter()
    stack = checked_stack(model, "route_report")
    prompts = expand_prompts(query.prompts, config.n_templates, prefixes=config.template_prefixes, model=model)
    query = replace(query, prompts=prompts)
    slots = build_slots(model, query, concepts, config, controls=controls, pool=pool, competitors=competitors)
    dirs = concept_directions(model, slots.concepts, batch_size=config.batch_size, **_direction_context(config))
    windows = config.layers or tuple(range(0, stack.n_layers - config.window + 1, config.stride))
    if any(not 0 <= w <= stack.n_layers - config.window for w in windows):
        raise ConfigError(f"intervention windows {windows} (width {config.window}) must lie in 0..{stack.n_layers - 1}.")
    lens = lens or LogitLens(model)
    fixed_ids = _first_ids(model, slots.concepts)
    first_ids = torch.cat([fixed_ids, torch.full((len(slots.random_of),), -1),
                           fixed_ids[[j for j, _ in slots.matched]]]).long()
    cfg = {**config.to_dict(), "layers": list(windows), "lens": lens.name}
    manifest = build_manifest(model, list(query.prompts), cfg, seed=config.seed)
    store = open_store(checkpoint_dir, manifest, inputs={"query": query, "vectors": dirs.vectors,
                                                         "baseline": dirs.baseline, "first_ids": first_ids,
                                                         "random_of": torch.tensor(slots.random_of, dtype=torch.long),
                                                         "matched": torch.tensor(slots.matched, dtype=torch.long)})
    with torch.no_grad():
        per_prompt = _score_all(model, query, lens, first_ids, dirs, slots, windows, config, progress, store)
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry())
    return RouteReport(
        query={"prompts": list(query.prompts), "input": query.input, "output": query.output,
               "alternatives": list(query.alternatives), "name": query.name},
        names=tuple(slots.names()), sources=tuple(slots.all_sources()), roles=tuple(slots.all_roles()),
        classes=tuple(slots.all_classes()), owner=torch.tensor(slots.all_owners(), dtype=torch.long),
        windows=tuple(windows),
        **_units(per_prompt, config.test_unit), config=cfg, manifest=manifest)


def _units(per_prompt: list[PromptScores], unit: str) -> dict[str, Tensor]:
    """The report's per-unit tensors: one unit per prompt (alternatives averaged) or per (prompt, alternative)."""
    stack = {k: torch.stack([getattr(s, k) for s in per_prompt]) for k in ("readout_rank", "similarity", "ablation")}
    inter = torch.stack([s.interchange for s in per_prompt])  # [prompt, slot, alt, window]
    norm = torch.stack([s.edit_norm for s in per_prompt])
    clean = torch.tensor([s.clean for s in per_prompt])
    if unit == "prompt":
        return {**stack, "interchange": inter.mean(2), "edit_norm": norm.mean(2), "clean": clean,
                "total_effect": torch.tensor([s.total_effect for s in per_prompt])}
    n_alt = inter.shape[2]
    if n_alt == 0:
        raise ConfigError("test_unit='alternative' needs alternative inputs (query.alternatives or n_alternatives).")
    return {**{k: v.repeat_interleave(n_alt, 0) for k, v in stack.items()},
            "interchange": inter.permute(0, 2, 1, 3).flatten(0, 1), "edit_norm": norm.permute(0, 2, 1, 3).flatten(0, 1),
            "clean": clean.repeat_interleave(n_alt), "total_effect": torch.cat([s.alt_effect for s in per_prompt])}


def swap_effect(model: Any, query: RouteQuery, concept: Concept | str, other: Concept | str, *,
                layers: Sequence[int] | None = None, window: int = 1, output: str | None = None,
                max_output_tokens: int = 3, config: RouteConfig = RouteConfig()) -> Float[Tensor, "prompt window"]:
    """Change of the output log-prob (``output``, default the query's) when the concept's direction at the
    input is swapped for ``other``'s: ``h <- h + (h . u_c - a_c)(u_o - u_c)`` (VAT -> TAX).

    Positive values: the swap raises the output's log-prob. ``config`` supplies the neutral prefixes and
    baseline of the concept directions.
    """
    stack = checked_stack(model, "swap_effect")
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
