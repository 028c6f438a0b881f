"""Shared plumbing of the GPU experiment scripts: config, model loading, memory budget, Ray, summaries.

Every script defines a config dataclass deriving from :class:`RunConfig` and a ``SMALL`` preset (the
CPU smoke-test mode). Values are taken, lowest precedence first, from the dataclass defaults, the
``--small`` preset, a ``--config`` TOML/JSON file (read by :mod:`recallscope.config`) and explicit
command-line options (one ``--field-name`` per dataclass field).
"""

import argparse
import dataclasses
import json
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from recallscope.config import config_from_dict, config_to_dict, read_config_file

C = TypeVar("C")


@dataclass(frozen=True)
class RunConfig:
    """Options every GPU experiment takes."""

    model: str = "gpt2-xl"
    """Model spec: a hub name, a local directory or .gguf file, or "smollm2" (the embedded CPU model)."""
    device: str = "cuda"
    """Torch device ("cuda", "cuda:1", "cpu"); ignored when device_map is set."""
    dtype: str = "fp32"
    """Weights and activations: "bf16", "fp16" or "fp32"."""
    device_map: str | None = None
    """"auto" to spread a model bigger than one GPU over every visible GPU (then CPU RAM)."""
    memory_budget_mb: str = "auto"
    """Sweep-engine chunk budget in MiB, or "auto" (half the device's free memory)."""
    seed: int = 0
    """Seed of every random choice (fact sample, noise, shots)."""
    out: str = "figures/gpu"
    """Output directory (results, figures, summary.json)."""
    checkpoint_dir: str | None = None
    """Checkpoint finished chunks here; rerunning the same command resumes."""
    ray_workers: int = 0
    """Shard sweeps over this many Ray workers (0: this process only)."""
    gpus_per_worker: float = 1.0
    """GPUs per Ray worker (0 for CPU workers)."""
    small: bool = False
    """The CPU smoke-test preset (set by --small)."""
    progress: bool = True
    """Show progress bars."""


@dataclass(frozen=True)
class FactRunConfig(RunConfig):
    """Options of the experiments over known facts."""

    n_facts: int = 1000
    """Known facts used (fewer if the model recalls fewer)."""
    relations: tuple[str, ...] | None = None
    """Built-in relations to draw facts from (default: all)."""
    facts_file: str | None = None
    """A JSONL/CSV fact file (subject, template, attribute) to use instead of the built-in facts."""


def known_facts(model: Any, cfg: FactRunConfig) -> list:
    """Facts the model recalls top-1 (ROME's "known facts"), sampled with ``cfg.seed``, at most ``n_facts``.

    In the small preset only the first 12 candidate facts are screened, to keep the smoke test short.
    """
    import random

    from recallscope.tasks.facts import load_builtin_facts, recalled_facts
    from recallscope.tasks.loaders import load_facts

    facts = load_facts(cfg.facts_file) if cfg.facts_file else load_builtin_facts(cfg.relations)
    if cfg.small:
        facts = facts[:12]
    known = recalled_facts(model, facts).kept
    return random.Random(cfg.seed).sample(known, min(cfg.n_facts, len(known)))


def _arg_type(tp: Any) -> tuple[Any, bool]:
    """(argparse type, is_flag) for a dataclass field type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return None, True
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return (lambda s: [inner(x) for x in s.split(",") if x.strip()]), False
    return tp, False


def parse_config(cls: type[C], argv: list[str] | None, *, small: dict[str, Any], description: str) -> C:
    """Build ``cls`` from defaults, the --small preset, --config and explicit options (in that order)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML or JSON file with config fields")
    ap.add_argument("--small", action="store_true", help="the CPU smoke-test preset (with --model smollm2)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "small":
            continue
        kind, flag = _arg_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        if flag:
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(name, type=kind, default=None)
    args = ap.parse_args(argv)
    data: dict[str, Any] = dict(small, small=True) if args.small else {}
    if args.config:
        data.update(read_config_file(args.config))
    data.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if f.name != "small" and getattr(args, f.name) is not None})
    return config_from_dict(cls, data, where="command line")


def load(cfg: RunConfig) -> Any:
    """The model ``cfg`` names, on its device / device map, in its dtype."""
    from recallscope.models import load_model

    return load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map)


def budget(cfg: RunConfig, model: Any) -> float:
    """The engine chunk budget in MiB (``"auto"``: from the free memory of the model's device)."""
    from recallscope.scale.memory import resolve_memory_budget

    return resolve_memory_budget(cfg.memory_budget_mb, str(getattr(model.cfg, "device", None) or cfg.device))


def sweeps_on(cfg: RunConfig, model: Any) -> Any:
    """A context that runs sweeps on ``cfg.ray_workers`` Ray workers (a no-op context when 0)."""
    if cfg.ray_workers <= 0:
        return nullcontext()
    from recallscope.scale.distributed import ModelRecipe, ray_sweeps

    return ray_sweeps(model, ModelRecipe(cfg.model, cfg.dtype, cfg.device_map), num_workers=cfg.ray_workers,
                      gpus_per_worker=cfg.gpus_per_worker)


def figure(cfg: RunConfig, fig: Any, stem: str | Path) -> Any:
    """Export ``fig`` as HTML, plus PNG outside the small preset (Chromium rendering is the slow part)."""
    from recallscope.plotting import export_all

    return export_all(fig, Path(stem), formats=("html",) if cfg.small else ("html", "png"))


def compare(expected: dict[str, float], measured: dict[str, float]) -> list[dict[str, Any]]:
    """Rows (quantity, published, measured) for every published quantity."""
    return [{"quantity": k, "published": v, "measured": measured.get(k)} for k, v in expected.items()]


def finish(cfg: RunConfig, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    """Add config and time, write ``summary.json`` under ``cfg.out``, print the comparison table."""
    summary = {"config": config_to_dict(cfg), **summary, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    rows = summary.get("comparison", [])
    if rows:
        print(f"{'quantity':<48} {'published':>10} {'measured':>10}")
        for r in rows:
            shown = [f"{v:>10.4f}" if isinstance(v, float) else f"{v!s:>10}" for v in (r["published"], r["measured"])]
            print(f"{r['quantity']:<48} {shown[0]} {shown[1]}")
    print(f"wrote {out / 'summary.json'} ({summary['seconds']} s)")
    return summary
