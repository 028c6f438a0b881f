"""recallscope export: a saved result's figure to HTML, PNG, SVG or PDF."""

import argparse
from typing import Any

from recallscope.cli.common import add_command


def _cmd_export(args: argparse.Namespace) -> int:
    from recallscope.outputs import load_result
    from recallscope.plotting import export

    result = load_result(args.result)
    fig = result.plot()
    for target in args.to:
        print(export(fig, target, width=args.width, height=args.height, scale=args.scale))
    return 0


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    sp = add_command(sub, "export", "export a saved result's figure to HTML, PNG, SVG or PDF", _cmd_export)
    sp.add_argument("result", help="a result directory written by .save() (any recallscope result type)")
    sp.add_argument("--to", required=True, action="append", help="output file; the suffix (.html, .png, .svg, "
                    ".pdf) picks the format; repeat for several")
    sp.add_argument("--width", type=int, help="layout width in pixels (default: the figure's own)")
    sp.add_argument("--height", type=int, help="layout height in pixels (default: the figure's own)")
    sp.add_argument("--scale", type=float, default=2, help="PNG pixel multiplier (default 2)")
