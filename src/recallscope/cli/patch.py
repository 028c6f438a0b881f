"""recallscope patch: activation patching on your own clean/corrupt pairs."""

import argparse
import json
from pathlib import Path
from typing import Any

from recallscope.cli.common import (
    add_command, _config, _engine_option, _kwargs, _options, OPTIONS, _placement, _record, _resume_note,
    _resume_option, _save_patching,
)


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
                                      checkpoint_dir=args.resume_dir, engine=getattr(args, "engine", "auto"),
                                      **_kwargs(config))
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


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "patch", "activation patching on your own clean/corrupt pairs (JSONL, CSV or TSV)",
                     _cmd_patch, out="out/patch")
    sp.add_argument("--pairs", required=True, help="file with clean, corrupt, answer, wrong fields")
    sp.add_argument("--config", help="TOML or JSON file of PatchingConfig fields; command-line options win")
    _options(sp, *OPTIONS)
    _resume_option(sp)
    _engine_option(sp)
