"""Organism directories on disk, and loading them as ``TransformerBridge`` models with their ground truth.

An organism directory holds::

    model.safetensors     the bare NativeModel's state dict (float32)
    config.json           name, kind, architecture, vocabulary size, recipe, metrics, weights SHA-256
    tokenizer/            a word-level tokenizer (tokenizer.json) that transformers reloads
    ground_truth.json     the organism's known mechanism (see recallscope.organisms.ground_truth)
    README.md             the model card: data recipe, training command, accuracy

Loading (:func:`load_organism_dir`): boot a native bridge of the stored architecture with the stored
tokenizer (``TransformerBridge.boot_native``), copy the weights into its ``NativeModel`` (key names
mapped through the bridge's wrappers, strictly), and attach an :class:`OrganismInfo`.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recallscope.errors import ConfigError, UnknownModelError, WeightsUnavailableError
from recallscope.manifest import atomic_write_text
from recallscope.organisms.core import ArchConfig, state_sha256

FILES = ("model.safetensors", "config.json", "tokenizer/tokenizer.json", "ground_truth.json", "README.md")
_WRAP = "_original_component"


@dataclass(frozen=True)
class OrganismInfo:
    """What a loaded organism carries besides its weights (``model.recallscope_organism``).

    Attributes:
        name: the organism's name (``load_model("organism:<name>")``).
        kind: ``b64``, ``mnemonic`` or ``facts``.
        truth: the ground truth as stored (a dict; :func:`recallscope.organisms.ground_truth` types it).
        config: the stored ``config.json`` (recipe, metrics, weights hash).
        directory: where it was loaded from.
    """

    name: str
    kind: str
    truth: dict[str, Any]
    config: dict[str, Any]
    directory: str


def save_organism(directory: str | os.PathLike, *, name: str, kind: str, arch: ArchConfig, net: nn.Module,
                  tokenizer: Any, truth: dict[str, Any], recipe: dict[str, Any], metrics: dict[str, Any],
                  card: str) -> Path:
    """Write an organism directory (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "tokenizer").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    if any(_WRAP in k for k in state):
        raise ConfigError("save_organism needs the bare NativeModel (as trained), not a bridge-wrapped one.")
    save_file(state, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    config = {"name": name, "kind": kind, "arch": arch.to_dict(), "d_vocab": len(tokenizer),
              "recipe": recipe, "metrics": metrics, "weights_sha256": state_sha256(state)}
    atomic_write_text(directory / "config.json", json.dumps(config, indent=1, sort_keys=True) + "\n")
    atomic_write_text(directory / "ground_truth.json", json.dumps(truth, indent=1, sort_keys=True) + "\n")
    atomic_write_text(directory / "README.md", card)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an organism directory, checking that every file is present."""
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise WeightsUnavailableError(
            f"{directory} is not a complete organism directory: missing {missing}. Re-create it with "
            "experiments/organisms/train.py, or reinstall recallscope (the shipped organisms live in "
            "recallscope/organisms/weights/).")
    return json.loads((directory / "config.json").read_text())


def load_organism_dir(directory: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load an organism directory as a ``TransformerBridge`` in eval mode with ``recallscope_organism`` set."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    from recallscope.models.tokenizers import check_vocab

    directory = Path(directory)
    config = read_config(directory)
    tokenizer = check_vocab(AutoTokenizer.from_pretrained(str(directory / "tokenizer")), expected=config["d_vocab"],
                            source=f"organism tokenizer in {directory}")
    arch = ArchConfig(**config["arch"])
    cfg = arch.bridge_config(config["d_vocab"], seed=int(config["recipe"].get("seed", 0)), name=config["name"])
    bridge = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype)
    _copy_weights(bridge.original_model, load_file(str(directory / "model.safetensors")), directory)
    bridge.eval()
    bridge.recallscope_spec = f"organism:{config['name']}"
    bridge.recallscope_weights_dir = str(directory)
    truth = json.loads((directory / "ground_truth.json").read_text())
    bridge.recallscope_organism = OrganismInfo(config["name"], config["kind"], truth, config, str(directory))
    return bridge


def _copy_weights(net: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy a bare NativeModel state dict into a bridge-wrapped NativeModel (walking through wrappers)."""
    from recallscope.models.stack import unwrap

    net = unwrap(net)
    with torch.no_grad():
        for key, value in state.items():
            try:
                target = net
                for part in key.split("."):
                    target = unwrap(getattr(unwrap(target), part))
            except AttributeError:
                target = None
            if not isinstance(target, torch.Tensor) or target.shape != value.shape:
                raise WeightsUnavailableError(
                    f"weight {key!r} in {directory} does not fit the stored architecture; the directory is "
                    "corrupt or from another recallscope version. Re-create it with experiments/organisms/train.py.")
            target.copy_(value)
        head = unwrap(net.head)
        if getattr(head, "bias", None) is not None and "head.bias" not in state:
            head.bias.zero_()  # the bridge's unembedding has a bias the native model does not


def organism_info(model: Any) -> OrganismInfo:
    """The :class:`OrganismInfo` of a loaded organism, or a clear error for any other model."""
    info = getattr(model, "recallscope_organism", None)
    if info is None:
        raise UnknownModelError(
            f"{getattr(model, 'recallscope_spec', type(model).__name__)!r} is not a model organism, so it has no "
            "ground truth. Load one with recallscope.load_model('organism:<name>') "
            "(recallscope.models.organisms_registry.available_organisms() lists them).")
    return info
