"""Back-patching (Biran et al. 2024, "Hopping Too Late: Exploring the Limitations of Large Language
Models on Multi-Hop Queries"): give an earlier layer the hidden state a later layer computed.

The "hopping too late" hypothesis: a two-hop query fails when the first hop resolves (the bridge entity
appears) in layers too late for the second hop to use it. Back-patching tests it.

Algorithm, for a prompt, a read position ``p`` and an answer token:

1. Run the prompt once; keep the hidden states ``h[l, p]`` of every layer and every layer's keys/values.
2. For each pair ``src > dst``, replace the hidden state of layer ``dst`` at position ``p`` with
   ``h[src, p]`` and run layers ``dst..`` from position ``p`` on (earlier positions are unchanged and
   reuse the stored keys/values; later positions are recomputed).
3. Record log p(answer) at the last position. ``values[src, dst]`` is that log-prob; pairs with
   ``src <= dst`` are NaN. Biran et al. report that the best pair fixes up to 66% of failed queries.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ResultFileError, SiteOutOfRangeError
from recallscope.lens.base import first_token_id, run_hidden
from recallscope.manifest import build_manifest
from recallscope.models.forward import forward
from recallscope.models.selfcheck import checked_stack
from recallscope.results import load_result_dir, register_result, save_result_dir


@register_result
@dataclass(frozen=True)
class BackpatchResult:
    """log p(answer) after back-patching, per (source layer, destination layer).

    Attributes:
        values: ``[src, dst]`` log-probs; ``src`` runs over hidden-state layers ``0..n_layers`` (the last
            is the final residual), ``dst`` over ``0..n_layers - 1``; NaN where src <= dst.
        baseline: log p(answer) of the unpatched run.
        answer: the answer text; position: the patched position; tokens: the prompt's tokens.
    """

    values: Float[Tensor, "src dst"]
    baseline: float
    answer: str
    position: int
    tokens: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != self.values.shape[1] + 1:
            raise ResultFileError(f"values must be a [n_layers + 1, n_layers] grid of (src, dst) layers, got "
                                  f"{tuple(self.values.shape)}")

    def best(self) -> dict[str, Any]:
        """The (src, dst) pair with the highest log-prob, and its gain over the baseline."""
        flat = int(self.values.nan_to_num(nan=float("-inf")).argmax())
        src, dst = divmod(flat, self.values.shape[1])
        value = float(self.values[src, dst])
        return {"src": src, "dst": dst, "logprob": value, "gain": value - self.baseline}

    def plot(self, *, title: str | None = None) -> go.Figure:
        from recallscope.plotting import display_token, heatmap

        gain = (self.values - self.baseline).numpy()
        fig = heatmap(gain, [str(i) for i in range(gain.shape[1])], [str(i) for i in range(gain.shape[0])], colorbar_title="Δ log p", title=title or f"back-patching at "
                      f"position {self.position} ({display_token(self.tokens[self.position])}): gain in "
                      f"log p({self.answer!r})")
        fig.update_xaxes(title_text="destination layer")
        fig.update_yaxes(title_text="source layer")
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"baseline": self.baseline, "answer": self.answer, "position": self.position,
                "tokens": list(self.tokens), "config": self.config}
        return save_result_dir(directory, "BackpatchResult", {"values": self.values}, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BackpatchResult":
        t, meta, manifest = load_result_dir(directory, "BackpatchResult")
        return cls(values=t["values"], baseline=float(meta["baseline"]), answer=meta["answer"],
                   position=int(meta["position"]), tokens=tuple(meta["tokens"]), config=meta.get("config", {}),
                   manifest=manifest)


def backpatch(model: Any, prompt: str, answer: str, *, position: int = -1) -> BackpatchResult:
    """Back-patch every (src > dst) pair of hidden-state layers at ``position``; see the module doc."""
    stack = checked_stack(model, "back-patching")
    tokens = model.to_tokens(prompt, truncate=False)
    n_pos, n_layers = tokens.shape[1], stack.n_layers
    if not -n_pos <= position < n_pos:
        raise SiteOutOfRangeError(f"position {position} is outside the prompt's {n_pos} tokens.")
    p = position % n_pos
    answer_id = first_token_id(model, answer)
    last = torch.tensor([n_pos - 1])
    values = torch.full((n_layers + 1, n_layers), float("nan"))
    with torch.no_grad():
        states, trace = run_hidden(stack, tokens)  # [layer, 1, pos, d]
        baseline = torch.log_softmax(stack.unembed(stack.final_norm(states[-1, 0, -1])).float(), -1)[answer_id]
        past = {l: (k[:, :, :p], v[:, :, :p]) for l, (k, v) in trace.kv.items()}
        for dst in range(n_layers):
            srcs = torch.arange(dst + 1, n_layers + 1)
            x = torch.cat([states[srcs, 0, p][:, None], states[dst, :, p + 1:].expand(len(srcs), -1, -1)], dim=1)
            logits, _ = forward(stack, x, start_layer=dst, pos0=p, past=past, read_pos=last)
            values[srcs, dst] = torch.log_softmax(logits[:, -1].float(), -1)[:, answer_id]
    config = {"prompt": prompt, "answer": answer, "position": p, "method": "backpatch"}
    return BackpatchResult(values=values, baseline=float(baseline), answer=answer, position=p,
                           tokens=tuple(model.tokenizer.convert_ids_to_tokens(tokens[0].tolist())),
                           config=config, manifest=build_manifest(model, [prompt], config))
