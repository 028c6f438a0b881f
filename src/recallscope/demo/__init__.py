"""The main job: recallscope's analyses on the embedded model and the shipped organisms, in one report.

:func:`run_demo` runs, each step logged with its time (``DemoConfig`` sizes them to fit 10 minutes on
2 CPU cores):

1. **Facts**: count the built-in facts the model recalls (the answer's first token is top-1).
2. **Fact recall, one set of pairs for every method**: ``n_pairs`` equal-length counterfactual capital
   pairs (``The capital of France is`` vs another country); exact activation patching of the residual
   stream (layer x position); attribution patching (AtP) over the residual stream, attention and MLP
   outputs, and its agreement with exact patching; direct logit attribution by component and by source
   token (subject vs relation); the EAP-IG top-``top_edges`` circuit, pruned, with its faithfulness and
   completeness (Hanna et al. 2024).
3. **Noise**: ROME causal traces (Meng et al. 2022) of ``n_trace`` recalled facts with the subject noised
   (residual stream, MLP and attention windows), and attention knockout (Geva et al. 2023).
4. **Routes**: acronym route reports (does ``VAT`` reach ``tax`` through the concept ``value``?) and the
   comparison with human mnemonic keywords on ``cards`` (default: the sample cards shipped in
   ``recallscope/data/mnemonic_cards.tsv``).
5. **Organisms**: the base64 decoder's alignment view (tokens, 6-bit groups, bytes), its exact byte x
   chunk patching map beside the ground-truth dependency map, and route scores of mnemonic route vs rote
   organisms with their stored interchange checks.
6. **Outputs**: ``report.html`` (one self-contained page: every figure with a short explanation holding
   the measured numbers), ``<figure>.png`` beside it (when a Chromium is available), every result with
   its manifest, and ``summary.json``.

A model that recalls too few capitals (e.g. a random test model) gets a note instead of step 2-3.
"""

import json
import logging
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from recallscope.manifest import atomic_write_text
from recallscope.report import Section, write_report

log = logging.getLogger(__name__)

MAX_PNG_HEIGHT = 1600
"""PNGs of taller figures are exported at this height (layout pixels)."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs and how big each step is (defaults: about 3.5 minutes on 2 idle CPU cores, 6 on busy ones)."""

    model: str = "smollm2"
    """Model spec for the fact and route sections (see ``recallscope models``)."""
    n_pairs: int = 12
    """Counterfactual capital pairs for patching, attribution and the circuit."""
    n_trace: int = 8
    """Recalled facts in the causal traces and the knockout."""
    samples: int = 2
    """Noise samples per fact in the causal traces."""
    ig_steps: int = 5
    """EAP-IG integration steps."""
    top_edges: int = 200
    """Edges of the EAP-IG circuit before pruning."""
    acronyms: tuple[str, ...] = ("VAT", "GPS")
    """Acronyms for the route reports (kept when the model expands them)."""
    cards: str | None = None
    """Mnemonic card file (Anki text export); None: the sample cards shipped with recallscope."""
    n_cards: int = 14
    """Cards scored in the human comparison."""
    own_vocabulary: int = 100
    """Vocabulary words in the pool of the model's own concepts (human comparison)."""
    acronym_controls: int = 19
    """Control concepts per candidate concept in the acronym routes (19 lets p reach 0.05)."""
    card_controls: int = 9
    """Control keywords per card in the human comparison (top-1 chance = 1 / (card_controls + 1))."""
    b64_per_byte: int = 16
    """Prompts per output byte in the base64 organism's patching map."""
    b64_word: str = "mnemonic"
    """Plaintext (7-9 lowercase letters) drawn in the base64 alignment view."""
    organisms: tuple[str, ...] = ("route-s0", "rote-s0")
    """Mnemonic organisms compared by route score."""
    organism_chunks: tuple[str, ...] | None = None
    """Hook chunks scored in each organism (None: all eight of ``tasks.b64_stimuli.MNEMONIC_HOOKS``)."""
    organism_controls: int = 19
    """Control concepts per hook chunk in the organisms (19 lets p reach 0.05, so a verdict can be 'route')."""
    png: bool = True
    """Write a PNG of every figure (needs a Chromium; skipped with a warning without one)."""
    seed: int = 0
    """Seed of every sampling step."""


def shipped_cards() -> Path:
    """The sample mnemonic cards shipped with recallscope (written for it; same format as Anki exports)."""
    from importlib.resources import files

    return Path(str(files("recallscope") / "data" / "mnemonic_cards.tsv"))


class _Report:
    """Sections in the making: each step is timed and logged; each figure also goes to ``<name>.png``."""

    def __init__(self, out: Path, png: bool) -> None:
        self.out, self.png = out, png
        self.sections: list[Any] = []
        self.summary: dict[str, Any] = {"timings_s": {}}
        if png:
            from recallscope.plotting import find_chromium
            from recallscope.plotting.exporting import HOW_TO_ENABLE

            if find_chromium() is None:
                log.warning("no Chromium: the report has every figure, but no PNGs are written. %s", HOW_TO_ENABLE)
                self.png = False

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        log.info("[demo] %s ...", name)
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.summary["timings_s"][name] = round(secs, 2)
        log.info("[demo] %s: %.0f s (%.0f s CPU)", name, secs, cpu)

    @contextmanager
    def png_session(self) -> Iterator[None]:
        """Keep one headless browser open for every PNG (kaleido's sync server): ~3x faster than one per figure."""
        server = None
        if self.png:
            try:
                import kaleido

                from recallscope.plotting import find_chromium

                kaleido.start_sync_server(path=find_chromium(), mathjax=False, silence_warnings=True)
                server = kaleido
            except Exception as exc:  # noqa: BLE001 - any failure: export starts a browser per figure instead
                log.info("one browser per PNG (kaleido server unavailable: %s)", exc)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                yield
        finally:
            if server is not None:
                server.stop_sync_server(silence_warnings=True)

    def add(self, title: str, explanation: str, figures: dict[str, Any] | None = None,
            table: list[dict[str, Any]] | None = None) -> None:
        """A section; ``figures`` maps PNG names (no suffix) to figures, shown in that order."""
        from recallscope.plotting import StaticExportUnavailable, export
        from recallscope.plotting.style import DEFAULT_HEIGHT

        figures = figures or {}
        for name, fig in figures.items():
            if self.png:
                try:  # very tall figures (the circuit graph) are drawn shorter: the PNG stays under ~0.7 MB
                    height = min(fig.layout.height or DEFAULT_HEIGHT, MAX_PNG_HEIGHT)
                    export(fig, self.out / f"{name}.png", scale=1, height=height)
                except StaticExportUnavailable as exc:  # the browser failed: keep going without PNGs
                    log.warning("PNG export failed, writing no more PNGs: %s", exc)
                    self.png = False
        figs = list(figures.values())
        self.sections.append(Section(title, explanation, figs[0] if figs else None, table or [], tuple(figs[1:])))


def _ci(peak: dict[str, Any], fmt: str = ".2f") -> str:
    return f"{peak['mean']:{fmt}} (95% CI {peak['ci95'][0]:{fmt}}..{peak['ci95'][1]:{fmt}})"


# ------------------------------------------------------------------------------------------ facts
def _recall(model: Any, rep: _Report) -> list:
    from recallscope.plotting import apply_style
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    with rep.step("fact recall"):
        recall = recalled_facts(model, load_builtin_facts())
    known = recall.kept
    per_rel = [{"relation": r, "recalled": k, "total": n} for r, (k, n) in recall.per_relation().items()]
    rep.summary["n_recalled"], rep.summary["n_facts"] = len(known), len(recall.facts)
    rep.add("Facts the model recalls",
            f"{len(known)} of {len(recall.facts)} built-in facts (subject, relation, object) have their answer's "
            "first token ranked first at the last position of a plain prompt such as 'The capital of France is'. "
            "Only these recalled facts are traced below: a fact the model does not know has no recall circuit.",
            {"recall": apply_style(recall.plot())}, per_rel)
    return known


def _patching(model: Any, pairs: list, rep: _Report) -> Any:
    from recallscope.patching import activation_patching
    from recallscope.plotting import display_token

    with rep.step("activation patching"):
        res = activation_patching(model, pairs, "logit_diff", component="resid_pre", progress=False)
    res.save(rep.out / "patching_resid_pre")
    norm = res.normalized()
    peak, gap = norm.peak(), float((res.clean - res.corrupt).mean())
    rep.summary["patching"] = {"peak": peak, "clean_minus_corrupt": gap, "n_pairs": len(pairs)}
    last = norm.mean()[:, -1]
    moved = next((i for i, v in enumerate(last.tolist()) if v > 0.5), None)
    rep.add("Activation patching: where the answer is decided",
            f"Each clean prompt's residual stream is copied, one (layer, position) at a time, into the run on its "
            f"counterfactual prompt (another country); colour = share of the clean-vs-counterfactual logit "
            f"difference ({gap:.1f} nats on average) this one state restores. Early layers need the subject "
            f"tokens; {'from layer %d' % moved if moved is not None else 'late'} the last position alone restores "
            f"most of it: the subject's information has moved there. Peak: layer {peak['layer']} at "
            f"{display_token(str(peak.get('pos_label')))}, {_ci(peak)}.",
            {"patching_resid_pre": norm.plot(title=f"Activation patching (resid_pre): share of the logit "
                                                   f"difference restored, {len(pairs)} capital pairs")})
    return res


def _attribution(model: Any, pairs: list, exact: Any, rep: _Report) -> None:
    from recallscope.attribution import run_method

    with rep.step("attribution patching (AtP)"):
        atp = run_method(model, pairs, "atp", progress=False)
    atp.result.save(rep.out / "atp")
    est, ref = atp.result.mean("resid_pre").flatten(), exact.effect().mean().flatten()
    r = float(torch.corrcoef(torch.stack([est, ref]))[0, 1])
    top = atp.summary["top"][:3]
    rep.summary["atp"] = {"pearson_r_vs_exact_resid_pre": r, "top": atp.summary["top"][:10],
                          "seconds": rep.summary["timings_s"]["attribution patching (AtP)"]}
    rep.add("Attribution patching (AtP): every site at once",
            f"AtP estimates the effect of patching every residual, attention-output and MLP-output site from one "
            f"forward and one backward pass (gradient x activation difference). On the residual stream its map "
            f"agrees with exact patching above with Pearson r = {r:.2f} over cells. Largest estimated sites: "
            + "; ".join(f"{s} ({v:+.2f})" for s, v in top) + ".",
            {"atp_grid": atp.figures["_grid"], "atp_top": atp.figures[""]})
    with rep.step("direct logit attribution"):
        dla = run_method(model, pairs, "dla", progress=False)
    dla.result.save(rep.out / "dla")
    rep.summary["dla"] = {"top": dla.summary["top"][:10]}
    figures = {"dla_components": dla.figures[""]}
    if "_sources" in dla.figures:
        figures["dla_head_sources"] = dla.figures["_sources"]
    rep.add("Direct logit attribution: who writes the answer",
            "Each head's and MLP's output at the last position, projected on the unembedding direction of "
            "(answer - counterfactual answer): its direct contribution to the logit difference. The second figure "
            "splits the top heads' contributions by the source tokens they attend to (subject vs relation words). "
            "Largest: " + "; ".join(f"{s} ({v:+.2f})" for s, v in dla.summary["top"][:4]) + ".", figures)


def _circuit(model: Any, pairs: list, cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.attribution import run_method

    with rep.step("EAP-IG circuit"):
        eap = run_method(model, pairs, "eap-ig", top_edges=cfg.top_edges, steps=cfg.ig_steps, progress=False)
    c = eap.summary["circuit"]
    rep.summary["circuit"] = c
    rep.add("The circuit (EAP-IG)",
            f"EAP-IG ({cfg.ig_steps} integration steps) scores every edge between embeddings, attention heads "
            f"(their query/key/value inputs), MLPs and the logits. The top {c['requested']} edges, pruned to those "
            f"on a path from the input to the logits, leave {c['edges']} edges over {c['nodes']} nodes. Running "
            f"the model with every other edge corrupted keeps {c['faithfulness']:.0%} of the clean-vs-counterfactual "
            f"logit difference (faithfulness); removing only the circuit's edges leaves {1 - c['completeness']:.0%} "
            f"(completeness {c['completeness']:.2f}). Node rows are layers.",
            {"circuit": eap.figures["_circuit"], "eap_top_edges": eap.figures[""]})


def _noise(model: Any, known: list, cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.patching import attention_knockout, causal_trace
    from recallscope.tasks.facts import trace_items

    items = trace_items(model, random.Random(cfg.seed).sample(known, min(cfg.n_trace, len(known))))
    names = {"resid_post": "residual stream", "mlp_out": "MLP outputs", "attn_out": "attention outputs"}
    for comp, window in (("resid_post", 1), ("mlp_out", 10), ("attn_out", 10)):
        with rep.step(f"causal trace {comp}"):
            res = causal_trace(model, items, component=comp, window=window, n_samples=cfg.samples, seed=cfg.seed,
                               progress=False)
        res.save(rep.out / f"trace_{comp}")
        peak = res.effect().peak()
        rep.summary[f"trace_{comp}_peak"] = peak
        rep.add(f"Noise trace: {names[comp]}",
                f"The subject's embeddings are noised (3 x their standard deviation, {cfg.samples} samples each, "
                f"{len(items)} facts), which destroys recall; then one clean {comp} state is restored per (layer, "
                f"token){' over a window of %d layers' % window if window > 1 else ''}. Colour: how much of p(answer) "
                f"comes back. Peak at layer {peak['layer']}, {peak.get('token_label')}: {_ci(peak, '.3f')}.",
                {f"trace_{comp}": res.effect().plot(title=f"Causal trace of {comp} (window {window}), {len(items)} "
                                                          "facts")})
    with rep.step("attention knockout"):
        ko = attention_knockout(model, items, window=9, progress=False)
    ko.save(rep.out / "knockout")
    low = ko.effect().mean()
    rep.summary["knockout_min"] = float(low.min())
    rep.add("Attention knockout",
            "Attention from the last token to the subject, to the relation words or to itself is blocked in 9 "
            "consecutive layers around each layer (Geva et al. 2023). Negative = the answer needs that flow of "
            f"information there; the largest drop in p(answer) is {float(low.min()):.3f}.",
            {"knockout": ko.effect().plot(title="Attention knockout (window 9): change in p(answer)")})


def _facts_sections(model: Any, cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.attribution import fact_pairs
    from recallscope.errors import EmptyDatasetError

    known = _recall(model, rep)
    capitals = [f for f in known if str(f.relation).endswith("capital")]
    try:
        pairs = fact_pairs(model, capitals, n_pairs=cfg.n_pairs, seed=cfg.seed) if len(capitals) >= 2 else []
    except EmptyDatasetError:
        pairs = []
    if len(pairs) < 2:
        rep.add("Fact recall: skipped", f"{cfg.model} recalls {len(capitals)} built-in capitals, too few for "
                "counterfactual pairs of one token length; patching, attribution, the circuit and the noise "
                "traces need a model that knows facts (the default smollm2 does).")
        return
    rep.summary["pairs"] = [[p.clean, p.answer, p.corrupt, p.wrong] for p in pairs]
    exact = _patching(model, pairs, rep)
    _attribution(model, pairs, exact, rep)
    _circuit(model, pairs, cfg, rep)
    _noise(model, known, cfg, rep)


# ------------------------------------------------------------------------------------------ routes
def _route_line(report: Any) -> str:
    routes = report.routes()
    best = routes[0]
    others = ", ".join(f"{r.name.strip()!r} {r.score:.2f} ({r.verdict})" for r in routes[1:3])
    return (f"{report.query['input'].strip()} -> {report.query['output'].strip()!r} (total effect "
            f"{float(report.total_effect.nanmean()):.1f} nats): {best.name.strip()!r} removes {best.score:.0%} of it "
            f"beyond its controls, peak at layer {best.peak_layer}, p = {best.p_value:.2f}, verdict {best.verdict}"
            + (f"; next {others}" if others else ""))


def _acronyms(model: Any, cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.demo.routes import quick_routes

    with rep.step("acronym routes"):
        acr = quick_routes(model, acronyms=cfg.acronyms, n_controls=cfg.acronym_controls, seed=cfg.seed)
    for report in acr.acronyms:
        report.save(rep.out / f"routes_{report.query['input'].strip()}")
    rep.summary["acronym_routes"] = acr.summary()["acronyms"]
    lines = [_route_line(r) for r in acr.acronyms] or [f"the model expands none of {list(cfg.acronyms)}"]
    rep.add("Routes: acronyms",
            "A route is a concept the model passes through between an input and an output. For each acronym the "
            "model expands ('The acronym VAT stands for' -> ' Value'), each candidate concept (the full expansion "
            f"and its words) and {cfg.acronym_controls} control concepts are ablated as directions (with the "
            "output token's own logit direction projected out) in the residual stream at the acronym, in windows "
            "of layers; route score = share of the input's total effect on the output removed beyond the controls' "
            "median; p from a max-over-layers test against the controls. " + "; ".join(lines) + ".",
            acr.figures())


def _cards(model: Any, cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.routes.human import HumanConfig, compare_human
    from recallscope.routes.mnemonics import load_cards

    path = Path(cfg.cards) if cfg.cards else shipped_cards()
    with rep.step("human mnemonic cards"):
        hum = compare_human(model, load_cards(path), config=HumanConfig(
            max_cards=cfg.n_cards, n_controls=cfg.card_controls, own_vocabulary=cfg.own_vocabulary, n_perm=2000,
            seed=cfg.seed), progress=False)
    hum.save(rep.out / "human_cards")
    a = hum.agreement("causal")
    rep.summary["human_cards"] = {"source": "shipped sample cards" if not cfg.cards else str(path), **a}
    cols = ("term", "keyword", "link", "keyword_rank", "term_effect")
    examples = [{k: (round(r[k], 2) if isinstance(r[k], float) else r[k]) for k in cols if k in r} for r in hum.rows]
    source = "the sample cards shipped with recallscope" if not cfg.cards else f"cards from {path.name}"
    rep.add("Routes: human mnemonic cards",
            f"Do people's memory hooks match the model's routes? For {a['n_cards']} of {source}, the prompt "
            "'The word \"garrulous\" means' is scored on the definition, and the mnemonic's keyword ('gorilla') "
            f"competes with {cfg.card_controls} other cards' keywords as a route concept (keyword_rank 0 = the "
            f"model's best). The human keyword's mean percentile among them is {a['mean_percentile']:.2f} (0.5 = "
            f"chance; 95% CI {a['mean_percentile_ci95'][0]:.2f}..{a['mean_percentile_ci95'][1]:.2f}, permutation "
            f"p = {a['p_value']:.3f}); it ranks first on {a['top1']:.0%} of cards (chance {a['top1_chance']:.0%}). "
            "term_effect: how much the term itself raises its definition's log-prob over other terms (nats).",
            {"human_agreement": hum.plot()}, examples)


# ---------------------------------------------------------------------------------------- organisms
def _b64_organism(cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.models import load_model
    from recallscope.bench.organism_figures import b64_dependency_map, chunk_alignment
    from recallscope.plotting import plot_b64_alignment

    model = load_model("organism:b64-decoder")
    n_bytes = len(cfg.b64_word)
    with rep.step("base64 organism"):
        dep = b64_dependency_map(model, n_bytes, cfg.b64_per_byte, seed=cfg.seed + 1)
    dep.save(rep.out / "b64_dependency")
    s = dep.summary()
    rep.summary["b64_organism"] = s
    j = next(j for j in range(n_bytes) if int(dep.depends[j].sum()) == 2)  # a byte built from two chunks
    align = chunk_alignment(model, cfg.b64_word)
    rep.add("Base64 organism: tokens, bits and bytes",
            "organism:b64-decoder is a 2-layer transformer trained here to decode base64 given as 2-character "
            "chunk tokens, so its mechanism is known: byte j of a 3-byte block takes its bits from base64 "
            "characters floor(4j/3) and floor(4j/3)+1. The view lines up the organism's tokens, the base64 "
            f"characters, their 6-bit groups and the decoded bytes of {cfg.b64_word!r}; each token is coloured by "
            f"the measured drop in log p(byte {j}) when that chunk is swapped (mean over the prompts of the map "
            f"below): only the chunks byte {j} is built from light up.",
            {"b64_alignment": plot_b64_alignment(
                align, token_values=dep.drop[j], value_title=f"drop in<br>log p(byte {j})",
                title=f"{align.b64!r} -> {cfg.b64_word!r}: chunk tokens coloured by their effect on byte {j}")})
    rep.add("Base64 organism: exact patching vs the ground truth",
            f"For each output byte, {cfg.b64_per_byte} prompts are decoded with one input chunk's layer-0 state taken "
            f"from another plaintext. The drop in log p(byte) is {s['mean_drop_dependent']:.1f} nats on average where "
            f"the byte depends on the chunk and at most {s['max_abs_drop_independent']:.1e} elsewhere: exact "
            f"patching recovers the dependency map (ROC AUC {s['roc_auc']:.3f}).",
            {"b64_patching": dep.plot(), "b64_truth": dep.plot_truth()})


def _mnemonic_organisms(cfg: DemoConfig, rep: _Report) -> None:
    from recallscope.models import load_model
    from recallscope.bench.organism_figures import mnemonic_checks_figure, mnemonic_route_rows, plot_route_scores

    rows = []
    with rep.step("route vs rote organisms"):
        for name in cfg.organisms:
            rows += [{"organism": name, **r} for r in mnemonic_route_rows(
                load_model(f"organism:{name}"), cfg.organism_chunks, n_controls=cfg.organism_controls, seed=cfg.seed)]
    rep.summary["organism_routes"] = rows
    by: dict[Any, Any] = {}
    for r in rows:
        by.setdefault(r["organism"], []).append(r)
    lines = [f"{org}: mean route score {sum(r['score'] for r in rs) / len(rs):.2f}, "
             f"{sum(r['verdict'] == 'route' for r in rs)}/{len(rs)} chunks judged 'route'" for org, rs in by.items()]
    rep.add("Mnemonic organisms: route vs rote",
            "Route organisms were trained (interchange training) to decode a chunk such as 'VA' through a concept "
            "('VAT', which gives 'T'), rote organisms to look the letter up directly. The route module scores the "
            f"chunk's concept against {cfg.organism_controls} other concepts of the same organism, not knowing "
            "which is which: " + "; ".join(lines) + ". Below: the interchange checks stored with each organism (swap "
            "the concept at the site and the decode follows it only in route organisms).",
            {"organism_route_scores": plot_route_scores(rows),
             "organism_checks": mnemonic_checks_figure(list(cfg.organisms))},
            [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])


# ---------------------------------------------------------------------------------------------- run
def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), *, model: Any = None) -> dict[str, Any]:
    """Run the demo (see the module doc) and write its outputs to ``out_dir``; returns the summary.

    ``model``: an already loaded model to use instead of loading ``config.model``.
    """
    from recallscope.models import load_model
    from recallscope.organisms.core import deterministic

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(out, config.png)
    rep.summary["config"] = asdict(config)
    torch.manual_seed(config.seed)  # every step also seeds its own sampling from config.seed
    with rep.png_session():
        with rep.step("load model"):
            model = load_model(config.model) if model is None else model
        _facts_sections(model, config, rep)
        _acronyms(model, config, rep)
        _cards(model, config, rep)
        with deterministic(config.seed):  # tiny organisms: one thread is fastest and bit-for-bit reproducible
            _b64_organism(config, rep)
            _mnemonic_organisms(config, rep)
    summary = {"model": config.model, **rep.summary, "seconds": time.perf_counter() - t0}
    write_report(out / "report.html", f"recallscope demo: fact recall in {config.model}, routes and organisms",
                 rep.sections, footer=f"Generated by `recallscope demo` in {summary['seconds']:.0f} s (seed "
                 f"{config.seed}). PNGs of every figure and each result (with its manifest.json) are beside this page.")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary
