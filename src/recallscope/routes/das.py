"""DAS route score: does a learned subspace at the input position carry the concept variable?

Built on TransformerLens 4.3's ``transformer_lens.tools.analysis.interchange`` (distributed alignment
search, Geiger et al. 2024; its controls follow Arora et al. 2024). recallscope adds the pair building
from prompts, the held-out evaluation, the paired statistics and a saved, plottable result.

1. **Pairs.** Each pair is a *base* prompt and a *source* prompt, each with an input span; the site is the
   input's last token. The high-level model predicts, for each pair, the output the base produces when
   its concept variable takes the source's value (:class:`ConceptVariable` builds the pairs from a template
   and a concept value per input; :func:`das_pairs` takes them explicitly). Task logits are the model's
   last-position logits over the one-token outputs (the classes).
2. **Split.** Pairs are split once (seeded) into train and held-out test pairs.
3. **DAS.** ``fit_das`` learns a rank-``r`` orthonormal subspace on the train pairs; the score is the
   interchange intervention accuracy (IIA) on the test pairs: the share whose argmax class, after setting
   the subspace to the source's value, is the predicted output.
4. **Controls**, all scored on the same test pairs:
   ``arbitrary_labels``: DAS retrained, same pairs and budget, on TL's ``arbitrary_targets`` (a fixed random
   class per source input); its IIA against those labels is what the method's expressivity alone buys.
   ``random_init``: DAS retrained with the true targets on a randomly initialised copy of the model
   (``reinitialized``, or ``random_init_bridge`` for Hugging Face weights).
   ``placebo``: the learned intervention's displacement moved into a random subspace of the same rank
   (``NormMatchedPlacebo``). ``no_intervention``: the base's own prediction.
5. **Statistics.** Per test pair, the indicator "correct" for the true subspace minus the control's; a
   one-sided sign-flip permutation test over pairs (``n_permutations`` draws, so p can go far below 0.05)
   per control; the result's p-value is the largest (the concept must beat every control). 95% bootstrap
   CI of the IIA over test pairs.
"""

import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, LengthMismatchError, MultiTokenAnswerError
from recallscope.results import RichReprMixin, bootstrap_ci, load_result_dir, register_result, save_result_dir
from recallscope.sites import Site
from recallscope.vocab import Component

CONTROLS = ("arbitrary_labels", "random_init", "placebo", "no_intervention")
"""Control names, in the order they are reported."""


@dataclass(frozen=True)
class DASConfig:
    """How the subspace is learned and tested."""

    rank: int = 1
    """Dimension of the learned subspace."""
    epochs: int = 20
    """Passes over the train pairs (``fit_das``)."""
    batch_size: int = 64
    """Pairs per optimisation step."""
    lr: float = 1e-2
    """Adam learning rate."""
    test_fraction: float = 0.5
    """Share of the pairs held out to score the subspace."""
    seed: int = 0
    """Seeds the split, DAS's initialisation, the arbitrary labels, the random-init model and the placebo."""
    n_permutations: int = 9999
    """Sign-flip draws per control in the paired test (p floor 1 / (n + 1))."""
    controls: tuple[str, ...] = CONTROLS
    """Controls to run; ``random_init`` costs a second model and a second fit."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "controls", tuple(self.controls))
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ConfigError(f"unknown DAS controls {unknown}; choose from {list(CONTROLS)}.")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}.")
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or self.n_permutations < 1:
            raise ConfigError("rank, epochs, batch_size and n_permutations must be positive integers.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "controls": list(self.controls)}


@dataclass(frozen=True)
class DASPairs:
    """Tokenised (base, source) pairs with their input positions and the high-level model's targets.

    Attributes:
        base_tokens / source_tokens: ``[pair, pos]`` token ids (every base, every source, one length).
        base_pos / source_pos: ``[pair]`` the input's last token in each prompt.
        targets: ``[pair]`` the predicted class (an index into ``classes``) under the interchange.
        class_ids: ``[class]`` the token id of each class's output.
        classes: the outputs' texts.
        source_keys: one key per pair naming its source input (for the arbitrary-label control).
    """

    base_tokens: Int[Tensor, "pair base_pos"]
    source_tokens: Int[Tensor, "pair source_pos"]
    base_pos: Int[Tensor, " pair"]
    source_pos: Int[Tensor, " pair"]
    targets: Int[Tensor, " pair"]
    class_ids: Int[Tensor, " n_class"]
    classes: tuple[str, ...]
    source_keys: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.base_tokens.shape[0]
        for name in ("source_tokens", "base_pos", "source_pos", "targets"):
            if getattr(self, name).shape[0] != n:
                raise LengthMismatchError(f"{name} has {getattr(self, name).shape[0]} rows for {n} pairs.")
        if len(self.source_keys) != n:
            raise LengthMismatchError(f"{len(self.source_keys)} source keys for {n} pairs.")
        if len(self.classes) != self.class_ids.shape[0] or len(set(self.class_ids.tolist())) != len(self.classes):
            raise ConfigError("classes must be distinct one-token outputs, one id per class.")

    def __len__(self) -> int:
        return int(self.base_tokens.shape[0])

    def subset(self, idx: Int[Tensor, " k"]) -> "DASPairs":
        keys = tuple(self.source_keys[i] for i in idx.tolist())
        return DASPairs(self.base_tokens[idx], self.source_tokens[idx], self.base_pos[idx], self.source_pos[idx],
                        self.targets[idx], self.class_ids, self.classes, keys)


def single_token_id(model: Any, text: str) -> int:
    """The id of ``text`` as one token of the model's tokenizer, or :class:`MultiTokenAnswerError`."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise MultiTokenAnswerError(f"output {text!r} is {len(ids)} tokens for this tokenizer; DAS classes must be "
                                    "single tokens (try it with or without a leading space).")
    return int(ids[0])


def input_position(model: Any, prompt: str, input_text: str) -> tuple[list[int], int]:
    """(token ids, index of the token that holds the last character of the input's last occurrence)."""
    from recallscope.tasks.facts import token_char_bounds

    at = prompt.rfind(input_text)
    if not input_text or at < 0:
        raise ConfigError(f"the input {input_text!r} does not occur in prompt {prompt!r}.")
    ids, bounds = token_char_bounds(model, prompt)
    last_char = at + len(input_text) - 1
    for i, (start, stop) in enumerate(bounds):
        if start <= last_char < stop:
            return ids, i
    raise ConfigError(f"could not place the input {input_text!r} on the tokens of {prompt!r}.")


def _tokenize(model: Any, prompts: Sequence[str], inputs: Sequence[str], what: str
              ) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    rows, positions = [], []
    for prompt, text in zip(prompts, inputs):
        ids, pos = input_position(model, prompt, text)
        rows.append(ids)
        positions.append(pos)
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1:
        raise LengthMismatchError(f"every {what} prompt must have the same token count (got lengths {lengths}); "
                                  "use inputs of one token shape or pad the template.")
    return torch.tensor(rows), torch.tensor(positions)


def das_pairs(model: Any, base_prompts: Sequence[str], base_inputs: Sequence[str], source_prompts: Sequence[str],
              source_inputs: Sequence[str], targets: Sequence[str], classes: Sequence[str]) -> DASPairs:
    """Pairs given explicitly: pair ``i`` is base ``base_prompts[i]`` (input ``base_inputs[i]``), source
    ``source_prompts[i]``; ``targets[i]`` (one of ``classes``) is the output the concept predicts."""
    n = len(base_prompts)
    if not n == len(base_inputs) == len(source_prompts) == len(source_inputs) == len(targets):
        raise LengthMismatchError("base_prompts, base_inputs, source_prompts, source_inputs and targets must have "
                                  "one entry per pair.")
    classes = tuple(classes)
    missing = sorted({t for t in targets} - set(classes))
    if missing:
        raise ConfigError(f"targets {missing} are not among the classes {list(classes)}.")
    base, base_pos = _tokenize(model, base_prompts, base_inputs, "base")
    source, source_pos = _tokenize(model, source_prompts, source_inputs, "source")
    class_ids = torch.tensor([single_token_id(model, c) for c in classes])
    target_idx = torch.tensor([classes.index(t) for t in targets])
    return DASPairs(base, source, base_pos, source_pos, target_idx, class_ids, classes, tuple(source_inputs))


@dataclass(frozen=True)
class ConceptVariable:
    """A concept variable over inputs, in one prompt template.

    Attributes:
        template: a prompt with ``{input}``, e.g. ``"The acronym{input} stands for"``.
        inputs: the inputs, e.g. ``(" VAT", " GDP", ...)``; all of one token count in the template.
        values: the concept value of each input (several inputs may share one).
        outputs: ``{value: output}``, the one-token output the template continues with for that value.
    """

    template: str
    inputs: tuple[str, ...]
    values: tuple[str, ...]
    outputs: dict[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "values", tuple(self.values))
        if "{input}" not in self.template:
            raise ConfigError(f"the template {self.template!r} has no '{{input}}' placeholder.")
        if len(self.inputs) != len(self.values) or len(self.inputs) < 3:
            raise ConfigError("a ConceptVariable needs at least 3 inputs and one concept value per input.")
        missing = sorted(set(self.values) - set(self.outputs))
        if missing:
            raise ConfigError(f"concept values {missing} have no output; add them to `outputs`.")
        if len(set(self.values)) < 2:
            raise ConfigError("the concept variable must take at least two values.")

    def pairs(self, model: Any, *, n_pairs: int | None = None, seed: int = 0) -> DASPairs:
        """Ordered pairs (base, source) of distinct inputs (all of them, or ``n_pairs`` drawn with ``seed``);
        the target is the output of the source's concept value."""
        order = [(b, s) for b in range(len(self.inputs)) for s in range(len(self.inputs)) if b != s]
        if n_pairs is not None and n_pairs < len(order):
            order = random.Random(seed).sample(order, n_pairs)
        prompts = [self.template.format(input=x) for x in self.inputs]
        classes = tuple(dict.fromkeys(self.outputs[v] for v in self.values))
        return das_pairs(model, [prompts[b] for b, _ in order], [self.inputs[b] for b, _ in order],
                         [prompts[s] for _, s in order], [self.inputs[s] for _, s in order],
                         [self.outputs[self.values[s]] for _, s in order], classes)


def random_init_model(model: Any, seed: int) -> Any:
    """The random-init control model: TL's ``reinitialized`` copy, or, for a model booted from Hugging Face
    weights that ``reinitialized`` cannot reset, TL's ``random_init_bridge`` of the same weights directory."""
    from transformer_lens.tools.analysis import random_init_bridge, reinitialized

    try:
        return reinitialized(model, seed)
    except ValueError:
        where = getattr(model, "recallscope_weights_dir", None) or getattr(model, "recallscope_spec", None)
        if where is None:
            raise ConfigError("cannot build a random-init copy of this model: it is not resettable module by "
                              "module and was not loaded by recallscope.load_model. Drop 'random_init' from "
                              "DASConfig.controls or load the model with load_model.") from None
        device = next(model.parameters()).device
        fresh = random_init_bridge(str(where), seed=seed, dtype=model.cfg.dtype, device=device)
        fresh.tokenizer = model.tokenizer
        return fresh


def task_logits_fn(model: Any, class_ids: Int[Tensor, " n_class"]):
    """``tokens -> logits[:, -1, classes]``: the task logits DAS trains and scores on."""
    def fn(tokens: Tensor) -> Tensor:
        return model(tokens.to(next(model.parameters()).device))[:, -1, class_ids.to(tokens.device)]
    return fn


def split_pairs(n: int, test_fraction: float, seed: int) -> tuple[Int[Tensor, " train"], Int[Tensor, " test"]]:
    """A seeded permutation of ``range(n)`` cut into (train, test) index tensors, both non-empty."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def fit_and_score(model: Any, hook_name: str, train: DASPairs, test: DASPairs, train_targets: Int[Tensor, " train"],
                  cfg: DASConfig) -> tuple[Any, Float[Tensor, "test n_class"]]:
    """TL's ``fit_das`` on the train pairs, then TL's ``intervened_logits`` on the test pairs: (DASResult,
    test task logits)."""
    from transformer_lens.tools.analysis import SubspaceInterchange, collect_activations, fit_das, intervened_logits

    task = task_logits_fn(model, train.class_ids)
    das = fit_das(model, hook_name, train.base_tokens, train.source_tokens, train_targets, task, rank=cfg.rank,
                  base_positions=train.base_pos, source_positions=train.source_pos, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    src = collect_activations(model, hook_name, test.source_tokens, task, positions=test.source_pos)
    logits = intervened_logits(model, hook_name, SubspaceInterchange(das.basis), test.base_tokens, src, task,
                               positions=test.base_pos)
    return das, logits


def _placebo_logits(model: Any, hook_name: str, basis: Tensor, test: DASPairs, seed: int
                    ) -> Float[Tensor, "test n_class"]:
    from transformer_lens.tools.analysis import (NormMatchedPlacebo, SubspaceInterchange, collect_activations,
                                                 intervened_logits, random_basis)

    task = task_logits_fn(model, test.class_ids)
    src = collect_activations(model, hook_name, test.source_tokens, task, positions=test.source_pos)
    placebo = NormMatchedPlacebo(SubspaceInterchange(basis), random_basis(basis.shape[0], basis.shape[1], seed))
    return intervened_logits(model, hook_name, placebo, test.base_tokens, src, task, positions=test.base_pos)


def sign_flip_p(diff: Float[Tensor, " n"], n_permutations: int, seed: int) -> float:
    """One-sided paired sign-flip permutation p-value that ``mean(diff) > 0``: (1 + #{null >= observed}) /
    (n_permutations + 1), the null flipping the sign of each difference at random."""
    d = diff.double()
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_permutations, d.shape[0]), generator=gen, dtype=torch.float64) * 2 - 1
    null = (signs * d).mean(1)
    return float((1 + (null >= d.mean() - 1e-12).sum()) / (n_permutations + 1))


@register_result
@dataclass(frozen=True)
class DASRouteResult(RichReprMixin):
    """A DAS route score with its controls, on held-out pairs.

    Attributes:
        correct: ``[test]`` 1.0 where the interchange along the learned subspace gives the predicted output.
        controls: control name -> ``[test]`` the same indicator for the control (see :data:`CONTROLS`).
        target_logprob: ``[test]`` log-softmax (over the classes) of the predicted output under the interchange.
        basis: ``[d_model, rank]`` the learned subspace.
        p_values: control name -> paired sign-flip p-value that the subspace beats the control.
        losses: fit name -> training loss per epoch.
        hook_name: where the subspace lives (at the input's last token).
        classes: the outputs (task classes).
        config / manifest: the :class:`DASConfig` and the run's manifest.
    """

    correct: Float[Tensor, " test"]
    controls: dict[str, Tensor]
    target_logprob: Float[Tensor, " test"]
    basis: Float[Tensor, "d_model rank"]
    p_values: dict[str, float]
    losses: dict[str, list[float]]
    hook_name: str
    classes: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.correct.shape[0]
        bad = [k for k, v in self.controls.items() if v.shape != (n,)]
        if bad or set(self.p_values) != set(self.controls):
            raise ConfigError(f"every control needs [{n}] indicators and a p-value; bad: {bad}.")

    @property
    def score(self) -> float:
        """Held-out interchange intervention accuracy of the learned subspace."""
        return float(self.correct.mean())

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @property
    def p_value(self) -> float:
        """The largest control p-value: the subspace must beat every control (1.0 without controls)."""
        return max(self.p_values.values(), default=1.0)

    def control_scores(self) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in self.controls.items()}

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Bootstrap CI of the score over the held-out pairs."""
        lo, hi = bootstrap_ci(self.correct.unsqueeze(1), level=level)
        return float(lo[0]), float(hi[0])

    def carries(self, alpha: float = 0.05) -> bool:
        """True when the subspace beats every control at level ``alpha`` (paired test over pairs)."""
        return bool(self.controls) and self.p_value < alpha

    def summary(self) -> dict[str, Any]:
        return {"score": self.score, "ci95": self.ci(), "chance": self.chance, "controls": self.control_scores(),
                "p_values": dict(self.p_values), "p_value": self.p_value, "n_test": int(self.correct.shape[0]),
                "hook_name": self.hook_name}

    def summary_extra(self) -> list[tuple[str, str]]:
        rows = [("IIA", f"{self.score:.3f} (CI {self.ci()[0]:.2f}-{self.ci()[1]:.2f})"), ("p", f"{self.p_value:.4f}")]
        return rows + [(k, f"{v:.3f}") for k, v in self.control_scores().items()]

    def plot(self, **layout: Any):
        """A plotly bar chart: held-out IIA of the subspace and of each control (95% CIs), chance dashed."""
        import plotly.graph_objects as go

        names = ["DAS subspace", *self.controls]
        series = [self.correct, *self.controls.values()]
        means = [float(s.mean()) for s in series]
        cis = [bootstrap_ci(s.unsqueeze(1)) for s in series]
        fig = go.Figure(go.Bar(x=names, y=means, error_y=dict(
            type="data", symmetric=False, array=[float(hi[0]) - m for (_, hi), m in zip(cis, means)],
            arrayminus=[m - float(lo[0]) for (lo, _), m in zip(cis, means)])))
        fig.add_hline(y=self.chance, line_dash="dash", annotation_text="chance")
        fig.update_layout(title=f"DAS at {self.hook_name}: IIA {self.score:.2f}, p = {self.p_value:.4f}",
                          yaxis_title="held-out interchange accuracy", yaxis_range=[0, 1.05], **layout)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"correct": self.correct, "target_logprob": self.target_logprob, "basis": self.basis,
                   **{f"control.{k}": v for k, v in self.controls.items()}}
        meta = {"controls": list(self.controls), "p_values": self.p_values, "losses": self.losses,
                "hook_name": self.hook_name, "classes": list(self.classes), "config": self.config}
        return save_result_dir(directory, "DASRouteResult", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DASRouteResult":
        t, meta, manifest = load_result_dir(directory, "DASRouteResult")
        return cls(t["correct"], {k: t[f"control.{k}"] for k in meta["controls"]}, t["target_logprob"], t["basis"],
                   meta["p_values"], meta["losses"], meta["hook_name"], tuple(meta["classes"]), meta["config"],
                   manifest)


def _as_site(site: Site | int) -> Site:
    site = Site(Component.RESID_PRE, site) if isinstance(site, int) else site
    if site.pos is not None or site.head is not None:
        raise ConfigError(f"the DAS site {site.label} must have no pos or head: the input positions come from the "
                          "pairs and the subspace spans the whole d_model.")
    return site


def das_route_score(model: Any, pairs: DASPairs, site: Site | int, config: DASConfig = DASConfig()
                    ) -> DASRouteResult:
    """Learn a subspace at ``site`` (an int = the residual entering that layer) at the inputs' last tokens and
    score it, with its controls, on held-out pairs (see the module docstring)."""
    from recallscope.manifest import build_manifest

    site = _as_site(site).validate(model.cfg)
    hook, cfg = site.hook_name, config
    if len(pairs) < 4:
        raise ConfigError(f"DAS needs at least 4 pairs (to train and to test), got {len(pairs)}; add inputs.")
    train_idx, test_idx = split_pairs(len(pairs), cfg.test_fraction, cfg.seed)
    train, test = pairs.subset(train_idx), pairs.subset(test_idx)
    das, logits = fit_and_score(model, hook, train, test, train.targets, cfg)
    correct = (logits.argmax(-1) == test.targets).float()
    target_lp = logits.log_softmax(-1).gather(1, test.targets[:, None])[:, 0]
    controls: dict[str, Tensor] = {}
    losses = {"das": list(das.losses)}
    if "arbitrary_labels" in cfg.controls:
        from transformer_lens.tools.analysis import arbitrary_targets

        arb = arbitrary_targets(pairs.source_keys, len(pairs.classes), cfg.seed)
        fit, arb_logits = fit_and_score(model, hook, train, test, arb[train_idx], cfg)
        controls["arbitrary_labels"] = (arb_logits.argmax(-1) == arb[test_idx]).float()
        losses["arbitrary_labels"] = list(fit.losses)
    if "random_init" in cfg.controls:
        fresh = random_init_model(model, cfg.seed)
        fit, rand_logits = fit_and_score(fresh, hook, train, test, train.targets, cfg)
        controls["random_init"] = (rand_logits.argmax(-1) == test.targets).float()
        losses["random_init"] = list(fit.losses)
        del fresh
    if "placebo" in cfg.controls:
        controls["placebo"] = (_placebo_logits(model, hook, das.basis, test, cfg.seed + 1).argmax(-1)
                               == test.targets).float()
    if "no_intervention" in cfg.controls:
        with torch.no_grad():
            base = task_logits_fn(model, pairs.class_ids)(test.base_tokens).cpu()
        controls["no_intervention"] = (base.argmax(-1) == test.targets).float()
    p_values = {k: sign_flip_p(correct - v, cfg.n_permutations, cfg.seed) for k, v in controls.items()}
    config_dict = {**cfg.to_dict(), "hook_name": hook, "n_train": len(train), "n_test": len(test)}
    manifest = build_manifest(model, [], config_dict, seed=cfg.seed)
    return DASRouteResult(correct, controls, target_lp, das.basis.detach().cpu(), p_values, losses, hook,
                          pairs.classes, config_dict, manifest)
