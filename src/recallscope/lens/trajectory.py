"""Lens trajectories and the EntRec score: how strongly each layer's hidden state "says" a token.

EntRec (Yang et al. 2024, "Do Large Language Models Latently Perform Multi-Hop Reasoning?"):

1. Run the prompt once and keep the hidden states of every layer (:func:`~recallscope.lens.base.hidden_states`).
2. Decode the hidden state at (position, layer) with a lens (logit lens by default).
3. EntRec = the log-probability of the concept's first token in that distribution.

:func:`lens_trajectory` applies steps 1-3 to several targets (the answer, candidate route concepts) at one
position, keeps their ranks too, and returns a :class:`LensTrajectory` whose ``.plot()`` draws
rank and probability by layer.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from recallscope.errors import ResultFileError, SiteOutOfRangeError
from recallscope.lens.base import Lens, LogitLens, first_token_id, hidden_states, rank_of
from recallscope.manifest import build_manifest
from recallscope.results import load_result_dir, register_result, save_result_dir


def _lens(model: Any, lens: Lens | None) -> Lens:
    return lens if lens is not None else LogitLens(model)


def entrec(model: Any, prompt: str, concept: str, *, lens: Lens | None = None
           ) -> Float[Tensor, "layer pos"]:
    """EntRec score at every (hidden-state layer, position): log p(first token of ``concept``) under ``lens``."""
    lens = _lens(model, lens)
    tokens = model.to_tokens(prompt, truncate=False)
    with torch.no_grad():
        logp = lens.all_layers(hidden_states(lens.stack, tokens)[:, 0])  # [layer, pos, vocab]
    return logp[..., first_token_id(model, concept)]


@register_result
@dataclass(frozen=True)
class LensTrajectory:
    """Log-prob and rank of target tokens read by a lens at one position, layer by layer.

    Attributes:
        logprob: ``[target, layer]`` log p(target's first token) under the lens.
        rank: ``[target, layer]`` its 0-based rank among the vocabulary.
        targets: the target texts (answer and concepts), one per row.
        top: per layer, the lens's top tokens (strings) at that position.
        tokens: the prompt's tokens; position: the position read.
        lens: the lens's name; config and manifest as in every result.
    """

    logprob: Float[Tensor, "target layer"]
    rank: Float[Tensor, "target layer"]
    targets: tuple[str, ...]
    top: tuple[tuple[str, ...], ...]
    tokens: tuple[str, ...]
    position: int
    lens: str
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.logprob.shape != self.rank.shape or self.logprob.shape[0] != len(self.targets):
            raise ResultFileError(f"logprob {tuple(self.logprob.shape)} / rank {tuple(self.rank.shape)} do not "
                                  f"match {len(self.targets)} targets")
        if len(self.top) != self.logprob.shape[1]:
            raise ResultFileError(f"{len(self.top)} top-token rows for {self.logprob.shape[1]} layers")

    def plot(self, *, title: str | None = None) -> go.Figure:
        """Two panels by layer: rank (log scale, 1 = top) and probability of each target."""
        from recallscope.plotting import apply_style, display_token

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            subplot_titles=("rank (1 = top token)", "probability"))
        layers = list(range(self.logprob.shape[1]))
        tops = ["<br>".join(display_token(t) for t in row[:5]) for row in self.top]
        palette = qualitative.D3 + qualitative.Set2
        for i, name in enumerate(self.targets):
            label, color = display_token(name), palette[i % len(palette)]
            fig.add_trace(go.Scatter(x=layers, y=(self.rank[i] + 1).tolist(), name=label, legendgroup=label,
                                     mode="lines+markers", customdata=tops, line=dict(color=color),
                                     hovertemplate="layer %{x}: rank %{y}<br>lens top:<br>%{customdata}"
                                                   "<extra>" + label + "</extra>"), row=1, col=1)
            fig.add_trace(go.Scatter(x=layers, y=self.logprob[i].exp().tolist(), name=label, legendgroup=label,
                                     mode="lines+markers", showlegend=False, line=dict(color=color)), row=2, col=1)
        fig.update_yaxes(type="log", autorange="reversed", row=1, col=1)
        fig.update_xaxes(title_text="layer (0 = embeddings)", row=2, col=1)
        where = display_token(self.tokens[self.position])
        apply_style(fig, title=title or f"{self.lens} at position {self.position} ({where})")
        fig.update_layout(height=560)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"targets": list(self.targets), "top": [list(t) for t in self.top], "tokens": list(self.tokens),
                "position": self.position, "lens": self.lens, "config": self.config}
        return save_result_dir(directory, "LensTrajectory", {"logprob": self.logprob, "rank": self.rank}, meta,
                               self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LensTrajectory":
        t, meta, manifest = load_result_dir(directory, "LensTrajectory")
        return cls(logprob=t["logprob"], rank=t["rank"], targets=tuple(meta["targets"]),
                   top=tuple(tuple(r) for r in meta["top"]), tokens=tuple(meta["tokens"]),
                   position=int(meta["position"]), lens=meta["lens"], config=meta.get("config", {}),
                   manifest=manifest)


def lens_trajectory(model: Any, prompt: str, targets: Sequence[str] | Mapping[str, str], *,
                    lens: Lens | None = None, position: int = -1, top_k: int = 5) -> LensTrajectory:
    """Read ``targets`` (texts; their first tokens) at ``position`` of ``prompt`` at every layer."""
    lens = _lens(model, lens)
    texts = list(targets.values()) if isinstance(targets, Mapping) else list(targets)
    tokens = model.to_tokens(prompt, truncate=False)
    n_pos = tokens.shape[1]
    if not -n_pos <= position < n_pos:
        raise SiteOutOfRangeError(f"position {position} is outside the prompt's {n_pos} tokens.")
    position %= n_pos
    with torch.no_grad():
        logp = lens.all_layers(hidden_states(lens.stack, tokens)[:, 0, position])  # [layer, vocab]
    ids = torch.tensor([first_token_id(model, t) for t in texts])
    lp = logp[:, ids].T.contiguous()  # [target, layer]
    rank = rank_of(logp[None].expand(len(ids), -1, -1), ids[:, None].expand(-1, logp.shape[0]))
    tok = model.tokenizer
    top = tuple(tuple(tok.convert_ids_to_tokens(row.tolist())) for row in logp.topk(top_k, dim=-1).indices)
    config = {"prompt": prompt, "targets": texts, "position": position, "lens": lens.name}
    return LensTrajectory(logprob=lp, rank=rank, targets=tuple(texts), top=top,
                          tokens=tuple(tok.convert_ids_to_tokens(tokens[0].tolist())), position=position,
                          lens=lens.name, config=config, manifest=build_manifest(model, [prompt], config))
