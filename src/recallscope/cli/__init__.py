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

One module per subcommand (``models``, ``facts``, ``patch``, ``trace``, ``export``, ``attribute``, ``demo``,
``routes`` and ``compare-human``), each with ``register(sub)``; shared helpers live in :mod:`.common`.
"""

import argparse
import sys

from recallscope.cli import attribute, demo, export, facts, graph, models, patch, routes, trace
from recallscope.cli.common import _int_list, _placement

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


def build_parser() -> argparse.ArgumentParser:
    """The ``recallscope`` parser with every subcommand."""
    from recallscope import __version__

    p = argparse.ArgumentParser(prog="recallscope", description="Trace where and how a language model recalls a "
                                "fact: patching, attribution, lenses and mnemonic routes.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"recallscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (models, facts, patch, trace, export, attribute, demo, routes, graph):
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recallscope.errors import RecallscopeError

    try:
        return int(args.func(args) or 0)
    except RecallscopeError as exc:
        print(f"recallscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; finished chunks stay checkpointed
        print("recallscope: interrupted (Ctrl-C). Runs with a checkpoint directory resume where they stopped "
              "when you run the same command again.", file=sys.stderr)
        return 130


__all__ = ["EXAMPLES", "_int_list", "_placement", "build_parser", "main"]
