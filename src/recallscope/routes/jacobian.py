"""Jacobian-lens route scores: readout and concept swap at the input positions (Gurnee et al. 2026).

Built on TransformerLens 4.3's ``JacobianLens`` (``transformer_lens.tools.analysis.jacobian_lens``): the
lens maps a layer-``l`` residual ``h`` (output of block ``l``) to the final block's output by an averaged
Jacobian ``J_l``, read through the model's own final norm and unembedding; the J-lens vector of token ``t``
is ``v_t = J_l^T W_U[:, t]``. recallscope adds a cached native fit, the route query and the statistics.

1. **Fit, cached.** :func:`jacobian_lens` fits ``JacobianLens.fit`` on a small built-in corpus (the package's
   fact sentences, joined into paragraphs) or the caller's prompts, and caches the lens under the user cache
   directory (``$RECALLSCOPE_CACHE`` or platformdirs), keyed by the model's weight hash
   (:func:`recallscope.manifest.weights_hash`) and the fit configuration. A later call loads it.
2. **Readout.** :func:`jlens_readout`: for each prompt and fitted layer, the rank of the concept's token in
   the J-lens logits at the input's last token (``JacobianLens.readout``); rank 0 = the top token.
3. **Concept swap.** :func:`jlens_swap_score`: at the input's last token and layer ``l``, exchange the
   concept's lens coordinates with a counter-concept's (``JacobianLens.swap_hooks``; pseudoinverse
   coordinates, ``alpha`` = strength) and measure the drop in the output's log-prob at the last position.
   The same swap with each control token in the concept's place gives the controls; per prompt, the
   concept's drop minus the largest control drop is tested with a one-sided sign-flip permutation test
   over prompts, with a bootstrap CI.
"""

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.results import RichReprMixin, bootstrap_ci, load_result_dir, register_result, save_result_dir


@dataclass(frozen=True)
class JLensConfig:
    """How a Jacobian lens is fitted (``JacobianLens.fit``'s arguments)."""

    layers: tuple[int, ...] | None = None
    """Source layers to fit (outputs of these blocks); None = :func:`auto_layers` (4 layers in the upper half).
    The fit's cost grows with the number of blocks between the lowest layer and the last, not with the count."""
    n_prompts: int = 4
    """Corpus paragraphs to average over (the built-in corpus has 40)."""
    max_seq_len: int = 32
    """Prompts are truncated to this many tokens."""
    skip_first_positions: int = 4
    """Leading positions left out of the average (attention sinks); TL's default is 16 for long prompts."""
    dim_batch: int = 32
    """Output dimensions per backward pass: faster, more memory; the result is the same."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.n_prompts < 1 or self.max_seq_len <= self.skip_first_positions + 1 or self.dim_batch < 1:
            raise ConfigError("JLensConfig needs n_prompts >= 1, dim_batch >= 1 and max_seq_len > "
                              "skip_first_positions + 1 (some positions must remain to average over).")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


def auto_layers(n_layers: int) -> tuple[int, ...]:
    """Four evenly spaced source layers from the middle of the model to the last fittable one (SmolLM2's 30
    layers: 14, 19, 23, 28)."""
    lo, hi = max(0, n_layers // 2 - 1), n_layers - 2
    if hi < 0:
        raise ConfigError("a Jacobian lens needs a model with at least 2 layers.")
    return tuple(sorted({round(lo + i * (hi - lo) / 3) for i in range(4)}))


def resolved(config: JLensConfig, model: Any) -> JLensConfig:
    """``config`` with ``layers`` filled in for ``model`` (the cache key uses the resolved layers)."""
    from dataclasses import replace

    return config if config.layers is not None else replace(config, layers=auto_layers(int(model.cfg.n_layers)))


def default_corpus(n: int) -> list[str]:
    """``n`` paragraphs of the package's fact sentences ("The capital of France is Paris. ..."), 6 a
    paragraph, in file order: a fixed, offline corpus for fitting a lens."""
    from recallscope.tasks.facts import load_builtin_facts

    sentences = [f.prompt + f.attribute + "." for f in load_builtin_facts()]
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences) - 5, 6)]
    if n > len(paragraphs):
        raise ConfigError(f"the built-in corpus has {len(paragraphs)} paragraphs; ask for at most that many or "
                          "pass your own prompts.")
    return paragraphs[:n]


def lens_cache_path(model: Any, config: JLensConfig, prompts: Sequence[str],
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the lens for ``model`` (by weight hash), ``config`` and ``prompts`` is cached."""
    from recallscope.manifest import weights_hash
    from recallscope.models.cache import cache_root

    config = resolved(config, model)
    key = json.dumps({"config": config.to_dict(), "prompts": list(prompts)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "jlens" / f"{weights_hash(model)[:16]}-{digest}.pt"


def jacobian_lens(model: Any, config: JLensConfig = JLensConfig(), *, prompts: Sequence[str] | None = None,
                  cache_dir: str | os.PathLike | None = None, refit: bool = False) -> Any:
    """A fitted ``JacobianLens`` for ``model``: loaded from the cache when this model's weights were fitted
    with this config and corpus before, else fitted natively (``JacobianLens.fit``) and cached.

    Args:
        prompts: the corpus; default: ``config.n_prompts`` paragraphs of :func:`default_corpus`.
        cache_dir: cache root (default ``$RECALLSCOPE_CACHE`` or the user cache directory).
        refit: fit again and overwrite the cached lens.
    """
    from transformer_lens.tools.analysis import JacobianLens

    config = resolved(config, model)
    prompts = list(prompts) if prompts is not None else default_corpus(config.n_prompts)
    if not prompts:
        raise ConfigError("jacobian_lens needs at least one prompt to fit on.")
    path = lens_cache_path(model, config, prompts, cache_dir)
    if path.is_file() and not refit:
        return JacobianLens.load(str(path)).validate_model(model)
    lens = JacobianLens.fit(model, prompts, corpus=f"recallscope:{path.stem}", source_layers=config.layers,
                            dim_batch=config.dim_batch, max_seq_len=config.max_seq_len,
                            skip_first_positions=config.skip_first_positions, show_progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        lens.save(str(tmp), dtype=torch.float32)  # fp32: the cached lens equals the fitted one exactly
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return lens


def _prompt_positions(model: Any, prompts: Sequence[str], input_text: str) -> list[tuple[Tensor, int]]:
    from recallscope.routes.das import input_position

    out = []
    for prompt in prompts:
        ids, pos = input_position(model, prompt, input_text)
        out.append((torch.tensor([ids]), pos))
    return out


@torch.no_grad()
def jlens_readout(model: Any, lens: Any, prompts: Sequence[str], input_text: str, concept: str
                  ) -> Float[Tensor, "prompt layer"]:
    """Rank of ``concept``'s token in the J-lens logits at the input's last token, per prompt and fitted
    layer (``lens.source_layers``); 0 = the lens's top token."""
    from recallscope.routes.das import single_token_id

    cid = single_token_id(model, concept)
    ranks = []
    for tokens, pos in _prompt_positions(model, prompts, input_text):
        ro = lens.readout(model, tokens, layers=lens.source_layers, positions=[pos], top_k=1,
                          return_full_logits=True)
        row = [float((ro.lens_logits[layer][0] > ro.lens_logits[layer][0, cid]).sum()) for layer in lens.source_layers]
        ranks.append(row)
    return torch.tensor(ranks)


@torch.no_grad()
def _output_logprob(model: Any, tokens: Tensor, output_id: int, hooks: list) -> float:
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens.to(next(model.parameters()).device))
    return float(logits[0, -1].float().log_softmax(-1)[output_id])


def _swap_run(model: Any, tokens: Tensor, out_id: int, swap: list, pos: int) -> tuple[float, float]:
    """(output log-prob, norm of the edit at ``pos``) with the swap hooks on; the edit is read by hooks
    registered on the same hook point before and after them."""
    seen: dict[str, Tensor] = {}

    def before(act: Tensor, hook: Any) -> None:
        seen["before"] = act[0, pos].detach().float().clone()

    def after(act: Tensor, hook: Any) -> None:
        seen["after"] = act[0, pos].detach().float().clone()

    name = swap[0][0]
    lp = _output_logprob(model, tokens, out_id, [(name, before), *swap, (name, after)])
    return lp, float((seen["after"] - seen["before"]).norm())


def jlens_swap_drops(model: Any, lens: Any, prompts: Sequence[str], input_text: str, output: str,
                     swapped: Sequence[str], counter: str, layer: int, *, alpha: float = 1.0
                     ) -> tuple[Float[Tensor, " prompt"], Float[Tensor, "prompt swapped"], Float[Tensor, "prompt swapped"]]:
    """(clean output log-prob, drop in it, edit norm) per prompt when each token of ``swapped`` exchanges its
    lens coordinates with ``counter`` at the input's last token, layer ``layer`` (``JacobianLens.swap_hooks``)."""
    from recallscope.routes.das import single_token_id

    out_id = single_token_id(model, output)
    clean, drops, norms = [], [], []
    for tokens, pos in _prompt_positions(model, prompts, input_text):
        base = _output_logprob(model, tokens, out_id, [])
        runs = [_swap_run(model, tokens, out_id, lens.swap_hooks(
            model, single_token_id(model, token), single_token_id(model, counter), [layer], alpha=alpha,
            positions=[pos]), pos) for token in swapped]
        clean.append(base)
        drops.append([base - lp for lp, _ in runs])
        norms.append([n for _, n in runs])
    return torch.tensor(clean), torch.tensor(drops), torch.tensor(norms)


@register_result
@dataclass(frozen=True)
class JLensRouteResult(RichReprMixin):
    """Jacobian-lens readout and concept-swap scores of one route query.

    Attributes:
        ranks: ``[prompt, layer]`` the concept's rank in the J-lens readout at the input's last token.
        layers: the lens layers of ``ranks``' columns.
        drops: ``[prompt, token]`` drop of the output's log-prob when ``tokens[j]`` is swapped with the
            counter-concept at ``swap_layer``; column 0 is the concept, the rest are the controls.
        clean: ``[prompt]`` the output's log-prob without a swap.
        norms: ``[prompt, token]`` the norm of each swap's edit of the residual (for effect per unit norm).
        tokens: the concept, then the controls.
        p_value: sign-flip p that the concept's drop exceeds the largest control drop, paired over prompts.
        config: query and settings; manifest: the run's manifest.
    """

    ranks: Float[Tensor, "prompt layer"]
    layers: tuple[int, ...]
    drops: Float[Tensor, "prompt token"]
    clean: Float[Tensor, " prompt"]
    norms: Float[Tensor, "prompt token"]
    tokens: tuple[str, ...]
    p_value: float
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.clean.shape[0]
        if (self.ranks.shape != (n, len(self.layers)) or self.drops.shape != (n, len(self.tokens))
                or self.norms.shape != self.drops.shape):
            raise ConfigError(f"inconsistent JLensRouteResult shapes: ranks {tuple(self.ranks.shape)}, drops "
                              f"{tuple(self.drops.shape)} for {n} prompts, {len(self.layers)} layers, "
                              f"{len(self.tokens)} tokens.")

    @property
    def swap_score(self) -> float:
        """Mean over prompts of the concept's drop minus the largest control drop (nats)."""
        return float(self.margin().mean())

    def margin(self) -> Float[Tensor, " prompt"]:
        if self.drops.shape[1] == 1:
            return self.drops[:, 0]
        return self.drops[:, 0] - self.drops[:, 1:].max(1).values

    def per_norm(self) -> Float[Tensor, " token"]:
        """Mean drop per unit of edit norm, per token (concept first): swaps move the state by different
        amounts, so compare effects per unit of edit as well as raw."""
        return (self.drops / self.norms.clamp_min(1e-8)).mean(0)

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        lo, hi = bootstrap_ci(self.margin().unsqueeze(1), level=level)
        return float(lo[0]), float(hi[0])

    def best_rank(self) -> dict[str, Any]:
        """The layer where the concept's median rank over prompts is lowest, and that rank."""
        med = self.ranks.median(0).values
        i = int(med.argmin())
        return {"layer": self.layers[i], "median_rank": float(med[i])}

    def summary(self) -> dict[str, Any]:
        return {"swap_score": self.swap_score, "ci95": self.ci(), "p_value": self.p_value,
                "mean_drops": dict(zip(self.tokens, self.drops.mean(0).tolist())),
                "mean_edit_norms": dict(zip(self.tokens, self.norms.mean(0).tolist())),
                "drop_per_unit_norm": dict(zip(self.tokens, self.per_norm().tolist())), **self.best_rank()}

    def summary_extra(self) -> list[tuple[str, str]]:
        return [("swap margin", f"{self.swap_score:.3f} nats (p {self.p_value:.4f})"),
                ("best readout rank", str(self.best_rank()))]

    def plot(self, **layout: Any):
        """Two panels: the concept's median J-lens rank by layer (log scale), and the mean swap drop per
        token (concept first, controls after) with 95% bootstrap CIs."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("J-lens rank of the concept", "swap drop (nats)"))
        fig.add_trace(go.Scatter(x=list(self.layers), y=(self.ranks.median(0).values + 1).tolist(),
                                 mode="lines+markers", name="median rank + 1"), row=1, col=1)
        lo, hi = bootstrap_ci(self.drops)
        mean = self.drops.mean(0)
        fig.add_trace(go.Bar(x=list(self.tokens), y=mean.tolist(), name="drop", error_y=dict(
            type="data", symmetric=False, array=(hi - mean).tolist(), arrayminus=(mean - lo).tolist())), row=1, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_layout(title=f"Jacobian lens: swap margin {self.swap_score:.2f} nats, p = {self.p_value:.4f}",
                          **layout)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"layers": list(self.layers), "tokens": list(self.tokens), "p_value": self.p_value,
                "config": self.config}
        return save_result_dir(directory, "JLensRouteResult", {"ranks": self.ranks, "drops": self.drops,
                                                               "clean": self.clean, "norms": self.norms}, meta,
                               self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "JLensRouteResult":
        t, meta, manifest = load_result_dir(directory, "JLensRouteResult")
        return cls(t["ranks"], tuple(meta["layers"]), t["drops"], t["clean"], t["norms"], tuple(meta["tokens"]),
                   meta["p_value"], meta["config"], manifest)


def jlens_route_score(model: Any, lens: Any, prompts: Sequence[str], input_text: str, output: str, concept: str,
                      counter: str, controls: Sequence[str], *, layer: int, alpha: float = 1.0,
                      n_permutations: int = 9999, seed: int = 0) -> JLensRouteResult:
    """Readout ranks of ``concept`` at the input over the lens's layers, and the concept-swap score at
    ``layer``: swapping ``concept`` for ``counter`` must lower the output more than swapping any of
    ``controls`` for ``counter`` (see the module docstring)."""
    from recallscope.manifest import build_manifest
    from recallscope.routes.das import sign_flip_p

    if not controls:
        raise ConfigError("jlens_route_score needs control tokens: a concept swap means nothing without them.")
    if layer not in lens.source_layers:
        raise ConfigError(f"layer {layer} is not fitted in this lens (layers {lens.source_layers}); fit it with "
                          "JLensConfig(layers=...).")
    tokens = (concept, *controls)
    ranks = jlens_readout(model, lens, prompts, input_text, concept)
    clean, drops, norms = jlens_swap_drops(model, lens, prompts, input_text, output, tokens, counter, layer,
                                           alpha=alpha)
    margin = drops[:, 0] - drops[:, 1:].max(1).values
    config = {"input": input_text, "output": output, "concept": concept, "counter": counter,
              "controls": list(controls), "layer": layer, "alpha": alpha, "n_permutations": n_permutations,
              "seed": seed, "lens": dict(lens.metadata)}
    return JLensRouteResult(ranks, tuple(lens.source_layers), drops, clean, norms, tokens,
                            sign_flip_p(margin, n_permutations, seed), config,
                            build_manifest(model, list(prompts), config, seed=seed))
