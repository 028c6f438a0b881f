"""Convert a GGUF checkpoint once to a plain safetensors HF directory and find it again later.

A GGUF-loaded transformers model refuses ``save_pretrained``, so the conversion writes the config
(minus ``quantization_config``), the weights (safetensors) and the tokenizer itself. The directory
name carries a hash of the GGUF file, so a changed file never reuses a stale conversion. The write
goes to a temporary directory renamed into place, so an interrupted conversion leaves nothing behind.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CACHE_ENV = "RECALLSCOPE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$RECALLSCOPE_CACHE``, else the user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("recallscope"))


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _quick_key(path: Path) -> str:
    """A cheap key (name, size, mtime) used to find the full hash without re-reading the file."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"


def _dir_for(path: Path, digest: str, root: Path) -> Path:
    return root / "models" / f"{path.stem}-{digest[:16]}"


def cached_hf_dir(gguf: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The converted directory for ``gguf`` when it exists and is complete, else None."""
    gguf = Path(gguf)
    root = cache_root(cache_dir)
    index = root / "models" / "index.json"
    if not index.is_file():
        return None
    try:
        digest = json.loads(index.read_text()).get(_quick_key(gguf))
    except (json.JSONDecodeError, OSError):
        return None
    if digest is None:
        return None
    out = _dir_for(gguf, digest, root)
    return out if (out / "COMPLETE").is_file() else None


def convert_gguf_to_dir(gguf: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise ``gguf`` through transformers and save it as a safetensors HF directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    root = cache_root(cache_dir)
    digest = file_sha256(gguf)
    out = _dir_for(gguf, digest, root)
    if not (out / "COMPLETE").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
            tied = getattr(model.config, "tie_word_embeddings", False)
            state = {
                k: v.detach().contiguous()
                for k, v in model.state_dict().items()
                if not (tied and k == "lm_head.weight")
            }
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
            (tmp / "COMPLETE").write_text(digest)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _update_index(root, gguf, digest)
    return out


def _update_index(root: Path, gguf: Path, digest: str) -> None:
    index = root / "models" / "index.json"
    try:
        data = json.loads(index.read_text()) if index.is_file() else {}
    except json.JSONDecodeError:
        data = {}
    data[_quick_key(gguf)] = digest
    tmp = index.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, index)
