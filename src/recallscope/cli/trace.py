"""recallscope trace facts | base64: causal trace of recalled facts, or patching of base64 decoding."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from recallscope.cli.common import (
    _common, _config, _engine_option, _kwargs, _options, _placement, _positive_int, _record, _resume_note,
    _resume_option, _write_figure,
)
from recallscope.cli.patch import _patch_groups, _patching_config


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
                           engine=args.engine, **_kwargs(config))
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
    chunks = [1 + i for i in range(truth.n_chunks)]  # input chunk i sits at position 1 + i
    layers = list(results[0].config.get("layers") or range(results[0].values.shape[1]))
    positions = list(results[0].config.get("positions") or range(results[0].values.shape[-1]))
    if 0 not in layers or not set(chunks) <= set(positions):
        from recallscope.errors import ConfigError

        raise ConfigError(f"the byte x chunk map needs layer 0 and positions {chunks[0]}-{chunks[-1]} in the sweep "
                          f"(got layers {layers}, positions {positions}); include them in --layers/--positions.")
    cols_at = [positions.index(c) for c in chunks]
    drop = torch.stack([(r.clean[:, None] - r.values[:, layers.index(0)][:, cols_at]).mean(0)
                        for r in results])  # [byte, chunk]
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
    title = (f"{pair.meta['clean_b64']!r} -> {pair.meta['clean_text']!r} (corrupted at {changed!r}):<br>largest "
             f"effect of patching {res.config.get('component')} at each token")
    fig = plot_b64_alignment(alignment, token_values=token_values, title=title,
                             value_title=f"max effect on<br>{res.config.get('metric')}")
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


def register(sub: Any) -> None:
    """Add the ``trace`` parser to ``sub``."""
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
    _engine_option(sp)
    sp.add_argument("--seed", type=int, help="seed for fact sampling and noise, or for base64 stimuli, shots and "
                    "corruptions (default 0)")
    g = sp.add_argument_group("trace facts only")
    g.add_argument("--n-facts", type=_positive_int, help="recalled facts traced (default 20)")
    g.add_argument("--samples", type=_positive_int, help="noise samples per fact (default 10)")
    g.add_argument("--noise-scale", type=float, help="noise std in embedding stds (default 3)")
    g = sp.add_argument_group("trace base64 only")
    _options(g, "metric", "direction", "corruption", "positions", "per_head")
    g.add_argument("--stimuli", choices=["char", "word", "sentence"], help="what is encoded: single characters "
                   "(default), words or sentences")
    g.add_argument("--n", type=int, help="number of stimuli (default: all)")
    g.add_argument("--shots", type=int, help="solved examples per few-shot prompt (default 3)")
    g.add_argument("--max-pairs", type=int, help="pairs patched, from the largest equal-length group (default 16)")
    g.add_argument("--pairs", help="your own base64 pairs (JSONL/CSV/TSV) instead of generated ones")
