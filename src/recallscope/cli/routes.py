"""recallscope routes | compare-human: the mnemonic-route module on the command line."""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from recallscope.cli.common import _placement, _precision_options, _record, _resume_note, _resume_option, _write_figure


SINGLE_QUERY_NOTE = ("detector: single-query interchange mediation against competitor classes (route_report); "
                     "NOT validated on the organism benchmark (held-out AUROC 0.35): for the validated detector give "
                     "a family of analogous queries with `recallscope routes --family FILE.tsv`")


def _cmd_routes_family(args: argparse.Namespace) -> int:
    """``routes --family FILE.tsv``: the family route verdict (held-out concept transplant vs competitor pairings)."""
    from recallscope.manifest import atomic_write_text
    from recallscope.models import load_model
    from recallscope.routes.family import FamilyConfig, family_attribute_template, load_family_tsv, route_family_report
    from recallscope.routes.transplant import TransplantConfig

    pairs = load_family_tsv(args.family)  # bad files fail before the model loads
    template = family_attribute_template(args.family)  # "" without the attribute columns: check not run
    model = load_model(args.model, **_placement(args))
    config = FamilyConfig(transplant=TransplantConfig(min_layer=1, n_folds=args.n_folds, seed=args.seed,
                                                      attribute_template=template),
                          layer_stride=args.stride or 1)
    record = _record(args, "routes", config=config, seed=args.seed)
    record.model(model, args.model)
    record.prompts([p.prompt for p in pairs])
    with record.timed("routes-family"):
        report = route_family_report(model, pairs, config=config, name=Path(args.family).stem, progress=not args.quiet)
    out = Path(args.out)
    record.output(report.save(out / "report"))
    _write_figure(report.plot(), out / "routes_family", record)
    atomic_write_text(out / "summary.json", json.dumps(report.summary(), indent=1, default=str))
    record.output(out / "summary.json")
    print(f"{len(pairs)} pairs, {int(report.receiver.numel())} held-out transplant units, layers {list(report.layers)}")
    for r in report.rows():
        margins = " ".join(f"{k} {v:+.3f}" for k, v in r.margins.items())
        print(f"{r.name[:32]:<32} {r.verdict:<12} transplant {r.transplant_verdict:<12} score {r.score:+.3f} "
              f"[{r.ci[0]:+.3f}, {r.ci[1]:+.3f}] p={r.p_value:.4f} layer {r.layer} held-out {r.heldout:+.3f} "
              f"p_holm={r.p_holm:.4f} margins: {margins}")
        if r.role == "candidate" and r.attr_layer >= 0:
            print(f"{'':<32} answer code {r.answer_code}: reverse (attribute) transplant {r.attr_score:+.3f} "
                  f"[{r.attr_ci[0]:+.3f}, {r.attr_ci[1]:+.3f}] p={r.attr_p:.4f} layer {r.attr_layer} (min of both "
                  f"directions {r.attr_joint:+.3f})")
    check = ("second-attribute check " + template if template else
             "answer code not tested: add attribute_prompt and attribute_answer columns to rule it out")
    print(f"verdict: {report.verdict()} (detector: held-out concept transplant of the family against the input-itself "
          f"and answer-itself pairings; {check}); manifest: {record.write()}")
    return 0


def _cmd_routes(args: argparse.Namespace) -> int:
    from recallscope.errors import ConfigError
    from recallscope.manifest import atomic_write_text
    from recallscope.models import load_model
    from recallscope.routes import RouteConfig, RouteQuery, candidate_concepts, route_report

    if args.family:
        return _cmd_routes_family(args)
    if not args.prompt or args.input is None or args.output is None:
        raise ConfigError("recallscope routes needs --prompt, --input and --output (one query), or --family FILE.tsv "
                          "(a family of analogous queries: columns prompt, input, concept, answer).")
    model = load_model(args.model, **_placement(args))
    base = RouteConfig.from_toml(args.config) if args.config else RouteConfig()
    config = replace(base, n_controls=args.n_controls if args.n_controls is not None else base.n_controls,
                     mediation=base.mediation and not args.no_mediation, seed=args.seed,
                     **{k: v for k, v in (("n_templates", args.templates), ("n_random", args.n_random),
                                          ("n_neighbours", args.n_neighbours), ("stride", args.stride),
                                          ("window", args.window), ("method", args.method)) if v is not None})
    record = _record(args, "routes", config=config, seed=args.seed)
    record.model(model, args.model)
    query = RouteQuery(tuple(args.prompt), args.input, args.output)
    record.prompts(query.prompts)
    concepts = args.concept or candidate_concepts(model, args.input)
    with record.timed("routes"):
        report = route_report(model, query, concepts, config=config, progress=not args.quiet,
                              checkpoint_dir=args.resume_dir)
    _resume_note(report)
    out = Path(args.out)
    record.output(report.save(out / "report"))
    _write_figure(report.plot(), out / "routes", record)
    atomic_write_text(out / "summary.json", json.dumps(report.summary(), indent=1, default=str))
    record.output(out / "summary.json")
    print(f"{len(query.prompts)} prompts -> {len(report.query['prompts'])} templates; total effect "
          f"{float(report.total_effect.nanmean()):.3f} nats")
    for r in report.routes() + [r for r in report.competitor_rows() if r.p_value == r.p_value]:
        margins = " ".join(f"{k} {v:+.3f}" for k, v in r.margins.items())
        print(f"{r.name[:40]:<40} {r.verdict:<12} score {r.score:+.3f} [{r.ci[0]:+.3f}, {r.ci[1]:+.3f}] "
              f"p={r.p_value:.4f} p_holm={r.p_holm:.4f} mediated {r.mediation:+.3f} peak {r.peak_layer} "
              f"margins: {margins}")
    for r in report.competitor_rows():
        if r.p_value != r.p_value:
            print(f"{r.name[:40]:<40} competitor   mediated {r.mediation:+.3f} at layer {r.peak_layer}")
    print(f"verdict: {report.verdict()} ({SINGLE_QUERY_NOTE}); manifest: {record.write()}")
    return 0


def _cmd_compare_human(args: argparse.Namespace) -> int:
    from recallscope.manifest import atomic_write_text
    from recallscope.models import load_model
    from recallscope.routes.human import HumanConfig, card_route_report, compare_human, term_alternatives
    from recallscope.routes.mnemonics import load_cards

    cards = load_cards(args.cards)
    model = load_model(args.model, **_placement(args))
    config = HumanConfig(n_controls=args.n_controls, max_cards=args.max_cards, seed=args.seed,
                         interchange_alternatives=args.interchange_alternatives, n_boot=args.n_boot,
                         drop_definition_overlap=not args.keep_overlap)
    record = _record(args, "compare-human", config=config, seed=args.seed)
    record.model(model, args.model)
    out = Path(args.out)
    with record.timed("compare"):
        result = compare_human(model, cards, config=config, progress=not args.quiet, checkpoint_dir=args.resume_dir)
    _resume_note(result)
    if result.skipped:
        from recallscope.routes.human import skipped_text

        print(f"skipped {len(result.skipped)} of {len(cards)} cards: {skipped_text(result.skipped)}", file=sys.stderr)
    record.output(result.save(out / "result"))
    _write_figure(result.plot(), out / "agreement", record)
    summary = result.summary()
    by_term = {c.term: c for c in cards}
    with record.timed("examples"):
        for row in summary["examples_best"][: args.examples]:
            card = by_term[row["term"]]
            alternatives = row.get("alternatives") or term_alternatives(model, card, cards)
            report = card_route_report(model, card, concepts=[o["concept"] for o in row["own"][:1]],
                                       alternatives=alternatives)
            row["route_report"] = report.summary()["routes"]
            row["route_verdict"] = report.verdict()
            _write_figure(report.plot(), out / "examples" / row["term"], record)
    if "adjusted" in summary:
        from recallscope.routes.human_adjusted import plot_adjusted

        _write_figure(plot_adjusted(summary["adjusted"]), out / "adjusted", record)
    summary["timings_s"] = dict(record.data["timings_s"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    record.output(out / "summary.json")
    for link, stats in summary["agreement"]["causal"].items():
        if stats.get("n_cards"):
            print(f"{link:>7}: {stats['n_cards']} cards, human keyword percentile {stats['mean_percentile']:.3f} "
                  f"(chance 0.5, p={stats['p_value']:.3g}), top-1 {stats['top1']:.3f} (chance {stats['top1_chance']:.3f})")
    recalled = summary["agreement_recalled"]["causal"]["all"]
    if recalled.get("n_cards"):
        print(f"recalled (term effect >= {summary['agreement_recalled']['min_term_effect']} nats): "
              f"{recalled['n_cards']} cards, percentile {recalled['mean_percentile']:.3f} (p={recalled['p_value']:.3g})")
    adj = summary.get("adjusted")
    if adj:
        print(f"adjusted keyword effect (log odds, conditional logit): {adj['keyword_effect']:+.3f} "
              f"[{adj['ci'][0]:+.3f}, {adj['ci'][1]:+.3f}], p={adj['p']:.3g} (Holm {adj['p_holm']:.3g}), "
              f"{adj['n_cards']} cards; {adj['n_cards_dropped_overlap']} dropped for keyword-definition overlap")
        for link, fit in adj["by_link"].items():
            if fit.get("coefficients"):
                print(f"  {link}: {fit['keyword_effect']:+.3f} [{fit['ci'][0]:+.3f}, {fit['ci'][1]:+.3f}], "
                      f"p={fit['p']:.3g} (Holm {fit['p_holm']:.3g}), {fit['n_cards']} cards")
    print(f"summary: {out / 'summary.json'}; manifest: {record.write()}")
    return 0


def register(sub: Any) -> None:
    """``routes`` and ``compare-human`` (the mnemonic-route module)."""
    for name, help_, fn, out in (
            ("routes", "route analysis: do the model's input -> output recalls pass through candidate concepts?",
             _cmd_routes, "out/routes"),
            ("compare-human", "compare the model's routes from terms to definitions with human mnemonic keywords",
             _cmd_compare_human, "out/compare_human")):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        sp.add_argument("--model", default="smollm2", help="model spec (see `recallscope models`)")
        sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
        _precision_options(sp)
        sp.add_argument("--out", default=out, help=f"output directory (default: {out})")
        sp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        _resume_option(sp)
        sp.add_argument("--n-controls", type=int, default=None if name == "routes" else 9,
                        help="control concepts per candidate (default: RouteConfig's 8 for routes, 9 for "
                             "compare-human)")
        if name == "routes":
            sp.add_argument("--prompt", action="append", help="a prompt containing the input; "
                            "repeat for several phrasings (CIs over prompts); required without --family")
            sp.add_argument("--input", help="input text inside the prompts, e.g. ' VAT' (required without --family)")
            sp.add_argument("--output", help="continuation to explain, e.g. ' Value' (required without --family)")
            sp.add_argument("--family", help="TSV of a family of analogous queries (header: prompt, input, concept, "
                            "answer[, attribute_prompt, attribute_answer]): the family route verdict (held-out concept "
                            "transplant against input-itself and answer-itself pairings; the validated detector). "
                            "attribute_prompt (one prompt with {concept}, e.g. '{concept} kind', the same on every "
                            "row) and attribute_answer (the concept's answer to it) run the second-attribute check")
            sp.add_argument("--n-folds", type=int, default=5, help="--family: cross-fitting folds (default 5)")
            sp.add_argument("--concept", action="append", help="candidate concept; repeat (default: candidates "
                            "from the vocabulary, the acronym lexicon and the model itself)")
            sp.add_argument("--stride", type=int, help="layer spacing of the intervention windows, or with --family "
                            "of the transplant layers (default 1)")
            sp.add_argument("--window", type=int, help="layers intervened on together (default 1)")
            sp.add_argument("--method", choices=["exact", "attribution"],
                            help="mean ablation (reported, no verdict) exact (default) or by its gradient estimate")
            sp.add_argument("--no-mediation", action="store_true", help="skip the interchange intervention "
                            "(faster; then every verdict is inconclusive: mean ablation alone carries none)")
            sp.add_argument("--templates", type=int, help="prompts per query: fewer --prompt are expanded by "
                            "neutral context prefixes (default 8; 0 = the prompts as given)")
            sp.add_argument("--n-random", type=int, help="cosine- and norm-matched random directions per concept "
                            "(default 4)")
            sp.add_argument("--n-neighbours", type=int, help="output neighbours in the unembedding (default 3)")
            sp.add_argument("--config", help="TOML file with a [route_config] table of RouteConfig fields "
                            "(the detector's configuration); flags override it")
        else:
            sp.add_argument("--cards", required=True, help="Anki text export: term, mnemonic, definition[, ...]")
            sp.add_argument("--max-cards", type=int, help="score only the first N cards with a keyword")
            sp.add_argument("--examples", type=int, default=1, help="worked examples with route reports under the "
                            "route evidence standard (interchange mediation, competitors) and figures; about 5 "
                            "CPU-minutes each on SmolLM2 (default 1)")
            sp.add_argument("--interchange-alternatives", type=int, default=2, help="other terms whose values the "
                            "interchange swaps in per card, effects averaged (default 2; at most 4)")
            sp.add_argument("--n-boot", type=int, default=1999, help="bootstrap resamples over cards for the "
                            "adjusted keyword effect (default 1999)")
            sp.add_argument("--keep-overlap", action="store_true", help="keep cards whose keyword shares a "
                            "content word with the definition's first clause (dropped by default)")
