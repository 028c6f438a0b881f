"""Transcoder sets shipped with recallscope: one default set per shipped organism, no training needed.

Each shipped organism ``<name>`` has a directory ``features/shipped/<name>/`` (package data) holding the
set as written by :meth:`~.transcoder.TranscoderSet.save` (``transcoders.safetensors``, float16 when that
keeps every layer's explained variance within :data:`FP16_EV_TOLERANCE` of float32, and
``transcoders.json``) and ``shipped.json``: the organism's weight hash, the training settings (those of
``recallscope transcoders --model organism:<name>`` at its defaults), explained variance and dead
fraction per layer, the replacement model's KL / top-1 agreement, token counts, the command that made it
and the library versions.

1. :func:`package_set` turns a set trained by the CLI into a shipped directory: it casts the weights to
   float16, re-measures explained variance and fidelity on the CLI's own held-out tokens with the cast
   weights, and keeps float16 only if no layer's explained variance moves by more than the tolerance.
2. :func:`load_shipped_transcoders` loads a shipped set by organism name or loaded organism, after
   checking that the organism's weights are the ones the set was trained on (same SHA-256); a mismatch is
   an error naming both hashes and the command that retrains the set.
3. :func:`matching_shipped` is what ``recallscope transcoders`` asks before training: a shipped set whose
   recorded settings equal the requested ones and whose organism hash matches, or None.

The sets are rebuilt with ``python experiments/ship_organism_transcoders.py`` (resumable, one progress bar
over organisms).
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from recallscope.errors import ConfigError, ResultFileError, UnknownModelError
from recallscope.features.transcoder import TranscoderSet

SHIPPED_DIR = Path(__file__).with_name("shipped")
"""Where the shipped sets live (inside the installed package)."""
FORMAT = "recallscope-shipped-transcoders/1"
FP16_EV_TOLERANCE = 1e-3
"""Largest change of any layer's explained variance that float16 storage may cause."""
SHIP_COMMAND = "python experiments/ship_organism_transcoders.py"
"""The command that (re)builds every shipped set; ``--only NAME`` rebuilds one."""
_SET_FILES = ("transcoders.safetensors", "transcoders.json")


def shipped_transcoder_names() -> list[str]:
    """Names of the organisms that have a shipped transcoder set."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "shipped.json").is_file())


def _organism_name(name_or_model: Any) -> str:
    if isinstance(name_or_model, str):
        text = name_or_model.strip()
        return text[len("organism:"):] if text.startswith("organism:") else text
    info = getattr(name_or_model, "recallscope_organism", None)
    if info is None:
        raise UnknownModelError(f"{type(name_or_model).__name__} is not a loaded organism; pass an organism name "
                                f"(shipped: {', '.join(shipped_transcoder_names())}).")
    return str(info.name)


def shipped_dir(name_or_model: Any) -> Path:
    """The shipped directory of an organism; an unknown name is an error listing the shipped names."""
    name = _organism_name(name_or_model)
    path = SHIPPED_DIR / name
    if not (path / "shipped.json").is_file():
        raise UnknownModelError(f"no shipped transcoders for {name!r}; shipped sets: "
                                f"{', '.join(shipped_transcoder_names()) or 'none'}. Other models: train a set with "
                                f"`recallscope transcoders --model <spec>`.")
    return path


def shipped_record(name_or_model: Any) -> dict[str, Any]:
    """The ``shipped.json`` of an organism's shipped set."""
    return json.loads((shipped_dir(name_or_model) / "shipped.json").read_text())


def organism_file_sha256(name: str) -> str:
    """SHA-256 of the installed organism's weights file (:func:`~recallscope.organisms.core.state_sha256`,
    the hash its ``config.json`` records), computed from the file itself."""
    from safetensors.torch import load_file

    from recallscope.organisms.core import state_sha256
    from recallscope.organisms.recipes import WEIGHTS_DIR

    path = WEIGHTS_DIR / name / "model.safetensors"
    if not path.is_file():
        from recallscope.organisms import shipped

        raise UnknownModelError(f"organism {name!r} is not installed (no {path}); installed: {', '.join(shipped())}.")
    return state_sha256(load_file(str(path)))


def _check_hash(name: str, record: dict[str, Any], model: Any | None) -> None:
    """Raise if the organism's weights are not those the shipped set was trained on."""
    if model is not None:
        from recallscope.manifest import weights_hash

        have, want, what = weights_hash(model), record["model_weights_sha256"], "the loaded model's weights"
    else:
        have, want, what = organism_file_sha256(name), record["organism_weights_sha256"], "the installed weights"
    if have != want:
        raise ResultFileError(
            f"the shipped transcoders for {name!r} were trained on organism weights with SHA-256 {want[:16]}..., but "
            f"{what} hash to {have[:16]}...; the set does not fit this organism. Retrain it with "
            f"`{SHIP_COMMAND} --only {name}` (or train a private set with `recallscope transcoders --model "
            f"organism:{name} --no-shipped`).")


def load_shipped_transcoders(name_or_model: Any, *, verify: bool = True) -> TranscoderSet:
    """The shipped transcoder set of an organism (a name, ``organism:<name>``, or a loaded organism).

    With ``verify`` (default) the organism's weights must hash to the recorded SHA-256: for a name the
    installed weights file, for a model the loaded parameters (:func:`recallscope.manifest.weights_hash`).
    """
    name = _organism_name(name_or_model)
    path = shipped_dir(name)
    record = json.loads((path / "shipped.json").read_text())
    if verify:
        _check_hash(name, record, None if isinstance(name_or_model, str) else name_or_model)
    return TranscoderSet.load(path)


def matching_shipped(spec: str, config: dict[str, Any]) -> Path | None:
    """The shipped directory for ``spec`` if it was trained with exactly ``config`` (the CLI's settings)
    and the installed organism still has the recorded weights; else None (then the CLI trains)."""
    name = _organism_name(spec)
    if name not in shipped_transcoder_names():
        return None
    record = shipped_record(name)
    if json.loads(json.dumps(config, default=str)) != record["config"]:
        return None
    try:
        _check_hash(name, record, None)
    except ResultFileError:
        return None
    return SHIPPED_DIR / name


def copy_shipped(src: Path, out: Path) -> None:
    """Copy a shipped set into a cache directory laid out as ``recallscope transcoders`` writes it
    (the set, ``config.json``, ``report.json``, ``fidelity.json``)."""
    record = json.loads((src / "shipped.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for fname in _SET_FILES + ("shipped.json",):
        shutil.copyfile(src / fname, out / fname)
    report = {"explained_variance": record["explained_variance"], "dead_fraction": record["dead_fraction"],
              "n_train_tokens": record["n_train_tokens"], "n_eval_tokens": record["n_eval_tokens"]}
    for fname, data in (("config.json", record["config"]), ("report.json", report), ("fidelity.json", record["fidelity"])):
        (out / fname).write_text(json.dumps(data, indent=1) + "\n")


def cli_heldout_tokens(model: Any, config: dict[str, Any]) -> list[torch.Tensor]:
    """The held-out tokens ``recallscope transcoders`` evaluates an organism set on (same seed and split)."""
    from recallscope.features.data import training_tokens
    from recallscope.features.train import split_heldout

    tokens = training_tokens(model, int(config["n_seqs"]), seed=int(config["seed"]), seq_len=config["seq_len"])
    return split_heldout(tokens, 0.1)[1]


def layer_explained_variance(model: Any, tset: TranscoderSet, tokens: Any) -> dict[int, float]:
    """Explained variance of each transcoded layer's MLP output on ``tokens`` (positions from the set's
    ``first_pos``)."""
    from recallscope.features.train import collect_activations, explained_variance

    acts = collect_activations(model, tokens, tset.layers, first_pos=tset.info.first_pos)
    return {layer: explained_variance(tset[layer], *acts[layer]) for layer in tset.layers}


def _as_dtype(tset: TranscoderSet, dtype: torch.dtype) -> TranscoderSet:
    """A copy of ``tset`` whose weights are rounded to ``dtype`` (and held as float32)."""
    import copy

    out = copy.deepcopy(tset)
    with torch.no_grad():
        for layer in out.layers:
            for p in out[layer].parameters():
                p.copy_(p.to(dtype).float())
    return out


def package_set(model: Any, trained: str | os.PathLike, out: str | os.PathLike, *, command: str) -> dict[str, Any]:
    """Write the shipped directory ``out`` from a set the CLI trained in ``trained``; returns the record.

    Float16 storage is kept when every layer's explained variance on the CLI's held-out tokens moves by
    at most :data:`FP16_EV_TOLERANCE`; the record holds both measurements and the fidelity of the stored
    weights.
    """
    from recallscope.features.replacement import fidelity
    from recallscope.manifest import versions, weights_hash

    trained, out = Path(trained), Path(out)
    config = json.loads((trained / "config.json").read_text())
    report = json.loads((trained / "report.json").read_text())
    tset = TranscoderSet.load(trained)
    info = getattr(model, "recallscope_organism", None)
    if info is None:
        raise ConfigError("package_set ships organism sets only; load the organism with load_model('organism:...').")
    held = cli_heldout_tokens(model, config)
    ev32 = layer_explained_variance(model, tset, held)
    half = _as_dtype(tset, torch.float16)
    ev16 = layer_explained_variance(model, half, held)
    drift = max(abs(ev16[layer] - ev32[layer]) for layer in tset.layers)
    dtype = "float16" if drift <= FP16_EV_TOLERANCE else "float32"
    stored = half if dtype == "float16" else tset
    fid = {"all": fidelity(model, stored, held).__dict__}
    fid.update({f"layer{layer}": fidelity(model, stored, held, layers=[layer]).__dict__ for layer in stored.layers})
    if out.exists():
        shutil.rmtree(out)
    final = _as_dtype(tset, torch.float16) if dtype == "float16" else tset
    if dtype == "float16":
        for layer in final.layers:
            final[layer].half()
    final.save(out)
    record = {"format": FORMAT, "organism": info.name, "kind": info.kind, "n_layers": int(model.cfg.n_layers),
              "organism_weights_sha256": organism_file_sha256(info.name),
              "model_weights_sha256": weights_hash(model), "config": config, "dtype": dtype,
              "explained_variance": {str(k): ev16[k] if dtype == "float16" else ev32[k] for k in tset.layers},
              "explained_variance_float32": {str(k): v for k, v in ev32.items()},
              "explained_variance_trained": report["explained_variance"], "fp16_max_ev_change": drift,
              "dead_fraction": report["dead_fraction"], "fidelity": fid,
              "n_train_tokens": report["n_train_tokens"], "n_eval_tokens": report["n_eval_tokens"],
              "command": command, "versions": versions()}
    (out / "shipped.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
