"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): one affine translator per layer, trained so that decoding a layer's hidden state through
its translator matches the model's final next-token distribution.

Algorithm:

1. Translator of layer ``l < n_layers``: ``T_l(h) = h + A_l h + b_l`` (a residual affine map). ``A`` and
   ``b`` start at zero, so an untrained tuned lens *is* the logit lens. The final layer has no translator.
2. Collect hidden states of every layer on training text with the model frozen (one forward per batch,
   no gradients through the model).
3. Minimise, summed over layers and averaged over positions, ``KL(p_final || softmax(unembed(
   final_norm(T_l(h_l)))))`` with Adam; the model's weights never change.
4. Save ``A`` and ``b`` with the model's identity; loading checks the shapes match the model.
"""

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError, EmptyDatasetError, ResultFileError
from recallscope.lens.base import Lens, hidden_states
from recallscope.manifest import build_manifest
from recallscope.results import load_result_dir, save_result_dir


@dataclass(frozen=True)
class TunedLensConfig:
    """How to train a tuned lens."""

    steps: int = 200
    """Optimiser steps."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_positions: int = 256
    """Token positions per step (sampled from the cached hidden states)."""
    max_seq_len: int = 64
    """Training texts are truncated to this many tokens."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the translators (pulls them back toward the logit lens)."""
    seed: int = 0
    """Seed for position sampling."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_positions < 1 or self.max_seq_len < 2 or self.lr <= 0:
            raise ConfigError(f"invalid TunedLensConfig {self}: steps >= 0, batch_positions >= 1, "
                              "max_seq_len >= 2 and lr > 0 are required.")


class TunedLens(Lens):
    """Per-layer affine translators ``T_l(h) = h + A_l h + b_l``; zero translators = the logit lens.

    Attributes:
        weight: ``[n_layers, d_model, d_model]`` the ``A_l`` (row-vector convention: ``h @ A_l``).
        bias: ``[n_layers, d_model]`` the ``b_l``.
    """

    name = "tuned_lens"

    def __init__(self, model: Any, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__(model)
        n, d = self.stack.n_layers, self.stack.d_model
        dtype = next(iter(model.parameters())).dtype
        self.weight = torch.zeros(n, d, d, dtype=dtype) if weight is None else weight.detach().clone()
        self.bias = torch.zeros(n, d, dtype=dtype) if bias is None else bias.detach().clone()
        if self.weight.shape != (n, d, d) or self.bias.shape != (n, d):
            raise ConfigError(f"tuned-lens translators have shapes {tuple(self.weight.shape)} / "
                              f"{tuple(self.bias.shape)} but this model needs ({n}, {d}, {d}) / ({n}, {d}); "
                              "train a lens for this model (train_tuned_lens).")
        self.manifest: dict[str, Any] = {}

    def transform_hidden(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        if layer >= self.stack.n_layers:
            return h
        w, b = self.weight[layer].to(h), self.bias[layer].to(h)
        return h + h @ w + b

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the translators (safetensors) with the manifest of their training run."""
        meta = {"n_layers": self.stack.n_layers, "d_model": self.stack.d_model}
        return save_result_dir(directory, "TunedLens", {"weight": self.weight, "bias": self.bias}, meta,
                               self.manifest)

    @classmethod
    def load(cls, model: Any, directory: str | os.PathLike) -> "TunedLens":
        """Read translators written by :meth:`save` for ``model``; shapes must match the model."""
        tensors, meta, manifest = load_result_dir(directory, "TunedLens")
        if "weight" not in tensors or "bias" not in tensors:
            raise ResultFileError(f"{directory} holds no tuned-lens translators; re-train and save the lens.")
        lens = cls(model, tensors["weight"], tensors["bias"])
        lens.manifest = manifest
        return lens


def _collect(model: Any, lens: TunedLens, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Hidden states ``[layer, n, d]`` and final log-probs ``[n, vocab]`` at every non-BOS position."""
    states, finals = [], []
    bos = getattr(model.tokenizer, "bos_token_id", None)
    with torch.no_grad():
        for text in texts:
            toks = model.to_tokens(text, truncate=False)[:, :max_len]
            hs = hidden_states(lens.stack, toks)[:, 0]  # [layer, pos, d]
            keep = toks[0] != bos if bos is not None else torch.ones(toks.shape[1], dtype=torch.bool)
            states.append(hs[:, keep])
            finals.append(torch.log_softmax(lens.logits(hs[-1, keep], lens.stack.n_layers).float(), -1))
    return torch.cat(states, dim=1), torch.cat(finals)


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Turn off gradients for ``model``'s parameters inside the block, restoring them in ``finally``."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _step(lens: TunedLens, states: Tensor, target: Tensor, weight: Tensor, bias: Tensor,
          opt: torch.optim.Optimizer, gen: torch.Generator, batch: int) -> float:
    """One optimiser step on a random batch of positions; returns the summed-over-layers mean KL."""
    idx = torch.randint(0, states.shape[1], (min(batch, states.shape[1]),), generator=gen)
    h, p = states[:-1, idx].float(), target[idx]  # the final layer has no translator
    moved = h + torch.einsum("lnd,lde->lne", h, weight) + bias[:, None]  # [layer, n, d]
    logq = torch.log_softmax(lens.stack.unembed(lens.stack.final_norm(moved)).float(), dim=-1)
    loss = (p.exp() * (p - logq)).sum(-1).mean(-1).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


def train_tuned_lens(model: Any, texts: Sequence[str], config: TunedLensConfig = TunedLensConfig(), *,
                     progress: bool = True) -> TunedLens:
    """Train a :class:`TunedLens` for ``model`` on ``texts`` (the model's weights stay frozen).

    The per-step losses are kept in ``lens.manifest["losses"]``.
    """
    if len(texts) == 0:
        raise EmptyDatasetError("train_tuned_lens needs training texts; pass a list of strings.")
    lens = TunedLens(model)
    states, target = _collect(model, lens, texts, config.max_seq_len)
    weight = lens.weight.clone().float().requires_grad_(True)
    bias = lens.bias.clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    with frozen(model):
        losses = [_step(lens, states, target, weight, bias, opt, gen, config.batch_positions)
                  for _ in tqdm(range(config.steps), desc="tuned lens", disable=not progress)]
    trained = TunedLens(model, weight.detach().to(lens.weight.dtype), bias.detach().to(lens.bias.dtype))
    trained.manifest = build_manifest(model, list(texts), {"method": "tuned_lens", **asdict(config)},
                                      seed=config.seed)
    trained.manifest["losses"] = losses
    return trained
