"""Helpers shared by the subcommands: config files, run manifests, figures, common options."""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,2,5"`` or ``"0-3"`` -> a tuple of ints (for --layers / --positions)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            if hi and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"the range {part.strip()!r} in {text!r} runs backwards (it would be "
                                                 f"empty); write it low-high, e.g. {hi}-{lo}")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers such as 0,2,5 or 0-3") from None
    return tuple(out)


def _positive_float(text: str) -> float:
    """A float > 0 (for --memory-budget-mb)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of megabytes, e.g. 1024")
    return value


def _positive_int(text: str) -> int:
    """An int >= 1 (for counts such as --n-pairs or --samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


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
    """Result directory (raw per-prompt values), figure and per-cell CSV table of a patching result.

    The figure and the table show normalised recovery (``normalized``) or the effect ``patched - corrupt``
    (so that 0 is "no effect" and the diverging scale's centre means something), never raw metric values."""
    from recallscope.outputs import cells_table, write_csv

    record.output(res.save(stem))
    shown = res.normalized() if normalized else res.effect()
    _write_figure(shown.plot(title=title), stem, record)
    record.output(write_csv(stem.with_suffix(".csv"), cells_table(shown)))


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
    "memory_budget_mb": (("--memory-budget-mb",), dict(type=_positive_float, help="activation memory per engine chunk "
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


def _engine_option(sp: Any) -> None:
    sp.add_argument("--engine", default="auto", choices=["auto", "fast", "hooks"],
                    help="auto (default): the fast engine when the model passes its self-check, else the hook "
                    "engine (TransformerLens hooks, exact on every model TransformerLens loads); fast; hooks")


def _resume_note(res: Any) -> None:
    """Say on stderr how much of a result came from checkpointed chunks."""
    done = res.manifest.get("checkpoint")
    if done:
        print(f"  checkpoint {done['dir']}: {done['loaded']} chunks loaded, {done['computed']} computed",
              file=sys.stderr)


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


def add_command(sub: Any, name: str, help_: str, fn: Any, out: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser calling ``fn``, with the common options of a computing command (not for
    ``models`` and ``export``; ``demo`` has no --quiet)."""
    sp = sub.add_parser(name, help=help_, description=help_)
    sp.set_defaults(func=fn)
    if name not in ("models", "export"):
        _common(sp, out=out, quiet=name != "demo")
    return sp
