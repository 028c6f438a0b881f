"""Shared machinery of the model organisms: architecture, tokenizer, deterministic training, interchange.

Every organism is a TransformerLens-native transformer (``NativeModel``: LayerNorm, learned positions,
GELU MLP) over a closed word-level vocabulary. Training runs on the bare ``NativeModel`` (no bridge
wrappers, so state-dict keys are clean); loading wraps the trained weights in a ``TransformerBridge`` via
``boot_native`` (see :mod:`recallscope.organisms.store`).

Determinism (bit-for-bit reproduction on CPU):

1. :func:`deterministic` sets ``torch.use_deterministic_algorithms(True)``, one intra-op thread and the
   global seed for the duration of training, and restores the previous settings afterwards.
2. Weights are initialised by TransformerLens's seeded ``initialize_native_model``; batches are drawn from
   a private ``torch.Generator``; the optimiser is AdamW with a fixed schedule.
3. :func:`state_sha256` hashes a state dict (names, shapes, bytes) so two runs can be compared.
4. :func:`train_loop` with ``checkpoint_dir`` checkpoints weights, optimiser, data-generator and RNG state
   every N steps (atomically); a rerun resumes and ends with the same bits as an uninterrupted run.

Interchange interventions (:func:`interchange`) run on recallscope's functional forward
(:mod:`recallscope.models.forward`) over the model's :class:`~recallscope.models.stack.Stack`, so the same
code trains a bare ``NativeModel`` and checks a loaded ``TransformerBridge``.
"""

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.store import ChunkStore, fingerprint, open_store

BOS = "<s>"
PAD = "<pad>"
SPECIALS = (BOS, PAD)


@dataclass(frozen=True)
class ArchConfig:
    """Shape of an organism's transformer (GPT-2 style: LayerNorm, learned positions, GELU MLP)."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per block (``d_head = d_model // n_heads``)."""
    n_ctx: int = 16
    """Context length (learned position embeddings are this long)."""
    d_mlp: int | None = None
    """MLP hidden width (default ``4 * d_model``)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick "
                              "a head count that divides the width.")

    def bridge_config(self, d_vocab: int, *, seed: int, name: str) -> Any:
        """The ``TransformerBridgeConfig`` of this architecture with vocabulary ``d_vocab``."""
        from transformer_lens.config import TransformerBridgeConfig

        return TransformerBridgeConfig(
            d_model=self.d_model, d_head=self.d_model // self.n_heads, n_layers=self.n_layers,
            n_ctx=self.n_ctx, n_heads=self.n_heads, d_vocab=d_vocab, d_mlp=self.d_mlp or 4 * self.d_model,
            act_fn="gelu", normalization_type="LN", seed=seed, model_name=name,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings shared by all organisms."""

    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 128
    """Examples per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW), reached after ``warmup`` steps, then cosine decay to 10%."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the weight initialisation and the data stream."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- tokenizer
def word_tokenizer(words: Sequence[str]) -> Any:
    """A whitespace-split word-level ``PreTrainedTokenizerFast`` over ``SPECIALS + words``.

    ``<s>`` is the BOS token (TransformerBridge prepends it); text is tokenised by splitting on spaces,
    so ``"VA =="`` is the two tokens ``VA`` and ``==``. Unknown words map to ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_list = list(SPECIALS) + list(words)
    if len(set(vocab_list)) != len(vocab_list) or any(not w or any(c.isspace() for c in w) for w in words):
        raise ConfigError("organism vocabulary words must be unique, non-empty and contain no whitespace "
                          f"(and must not be {SPECIALS}).")
    core = Tokenizer(models.WordLevel(vocab=vocabulary(words), unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=PAD)


def vocabulary(words: Sequence[str]) -> dict[str, int]:
    """Word -> id for the vocabulary ``SPECIALS + words`` (the ids of :func:`word_tokenizer`)."""
    return {w: i for i, w in enumerate(list(SPECIALS) + list(words))}


def ids_of(vocab: dict[str, int], words: Sequence[str]) -> Int[Tensor, " n"]:
    """The ids of ``words`` as a tensor."""
    return torch.tensor([vocab[w] for w in words])


# -------------------------------------------------------------------------------------- determinism
@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Deterministic algorithms, one thread and ``torch.manual_seed(seed)`` inside; restored on exit."""
    was_det = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over a state dict's names, shapes and bytes (the reproducibility fingerprint)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_net(arch: ArchConfig, d_vocab: int, *, seed: int, name: str = "organism") -> nn.Module:
    """A freshly initialised bare ``NativeModel`` (seeded, independent of the global RNG)."""
    from transformer_lens.model_bridge.sources.native import NativeModel, initialize_native_model

    cfg = arch.bridge_config(d_vocab, seed=seed, name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NativeModel(cfg)
        initialize_native_model(net, cfg)
    return net


# ------------------------------------------------------------------------------- interchange forward
def resid_pre(model: Any, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` of ``model`` (a bare NativeModel or any bridge that
    :func:`~recallscope.models.stack.build_stack` supports). Differentiable; runs only blocks ``< layer``."""
    from recallscope.models.forward import block
    from recallscope.models.stack import build_stack

    stack = build_stack(model)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    h = stack.embed(tokens, positions)
    for i in range(layer):
        h, _, _ = block(stack, i, h, positions, None, lambda point, lay, t: t, lambda point, t: None)
    return h


def interchange(model: Any, base: Int[Tensor, "batch pos"], source: Int[Tensor, "batch pos"], *, layer: int,
                base_pos: Int[Tensor, " batch"], source_pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch pos vocab"]:
    """Logits of ``base`` with its residual entering ``layer`` at ``base_pos`` replaced by ``source``'s at
    ``source_pos`` (an interchange intervention, Geiger et al. 2022). Differentiable through both runs."""
    from recallscope.models.forward import forward
    from recallscope.models.stack import build_stack

    rows = torch.arange(base.shape[0], device=base.device)
    h_base = resid_pre(model, base, layer)
    h_src = resid_pre(model, source, layer)[rows, source_pos]  # [batch, d_model]
    mask = torch.zeros(h_base.shape[:2], dtype=torch.bool, device=base.device)
    mask[rows, base_pos] = True
    spliced = torch.where(mask.unsqueeze(-1), h_src.unsqueeze(1), h_base)
    logits, _ = forward(build_stack(model), spliced, start_layer=layer)
    return logits


# ----------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to ``0.1 * cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_loop(net: nn.Module, loss_fn: Callable[[int], Tensor], cfg: TrainConfig, *, progress: bool = False,
               desc: str = "training", generator: torch.Generator | None = None,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
               recipe: Any = None) -> list[float]:
    """Minimise ``loss_fn(step)`` for ``cfg.steps`` AdamW steps; returns the loss every 50 steps.

    With ``checkpoint_dir``, every ``checkpoint_every`` steps (and at the end) the weights, the optimiser
    state, the state of ``generator`` (the data stream ``loss_fn`` draws from), the global RNG and the loss
    history are written atomically (:mod:`recallscope.store`; the two latest kept). The store is keyed by
    the initial weights, ``cfg`` and ``recipe`` (the organism's full config: anything ``loss_fn`` depends
    on), so a rerun of the same training resumes from the latest checkpoint and ends with bitwise the
    same weights as an uninterrupted run, and a changed config starts afresh.
    """
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    other = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    manifest = {"model": {"spec": desc, "weights_sha256": state_sha256(net.state_dict())}, "seed": cfg.seed,
                "config": {"method": "organism-training", "train": cfg.to_dict(), "recipe": fingerprint(recipe)}}
    store = open_store(checkpoint_dir, manifest) if checkpoint_dir is not None else ChunkStore.disabled()
    start, history = _resume(store, net, opt, generator)
    net.train()
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc=desc):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append(float(loss.detach()))
        if store.enabled and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            _checkpoint(store, step + 1, net, opt, generator, history)
    net.eval()
    return history


def _checkpoint(store: ChunkStore, done: int, net: nn.Module, opt: torch.optim.Optimizer,
                generator: torch.Generator | None, history: list[float]) -> None:
    """Write the training state after ``done`` steps; drop checkpoints older than the previous one."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    for idx, state in opt.state_dict()["state"].items():
        tensors.update({f"opt.{idx}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in state.items()})
    tensors["rng.global"] = torch.random.get_rng_state()
    if generator is not None:
        tensors["rng.data"] = generator.get_state()
    tensors["history"] = torch.tensor(history, dtype=torch.float64)
    store.put(f"step{done:08d}", tensors)
    store.stats["computed"] += 1
    for name in [n for n in store.names() if n.startswith("step")][:-2]:
        store.delete(name)


def _resume(store: ChunkStore, net: nn.Module, opt: torch.optim.Optimizer, generator: torch.Generator | None
            ) -> tuple[int, list[float]]:
    """(steps done, loss history) of the latest intact checkpoint in ``store``, loaded into ``net``,
    ``opt``, ``generator`` and the global RNG; ``(0, [])`` when there is none."""
    for name in sorted((n for n in store.names() if n.startswith("step")), reverse=True):
        t = store.get(name)
        if t is None:  # corrupt: deleted with a warning; try the one before
            continue
        net.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, field_name = k.split(".", 2)
                state.setdefault(int(idx), {})[field_name] = v
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        torch.random.set_rng_state(t["rng.global"])
        if generator is not None:
            generator.set_state(t["rng.data"])
        return int(name[len("step"):]), t["history"].tolist()
    return 0, []


def answer_loss(logits: Float[Tensor, "batch pos vocab"], targets: Int[Tensor, " batch"]) -> Tensor:
    """Cross-entropy of the last position's logits against ``targets``."""
    return torch.nn.functional.cross_entropy(logits[:, -1], targets)
