"""The route detector's configuration: every default of :func:`~recallscope.routes.route_report` in one place.

:class:`RouteConfig` is what a benchmark commits beside itself ("the detector's configuration"): it reads
and writes plain dicts and the ``[route_config]`` table of a TOML file (:meth:`RouteConfig.from_toml`).
The evidence standard these defaults encode is described in :mod:`recallscope.routes.report`.
"""

import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from recallscope.errors import ConfigError

TEMPLATE_PREFIXES: tuple[str, ...] = ("Question: ", "Note: ", "Quick quiz. ", "Here is a fact. ", "Remember: ",
                                      "From the glossary: ", "In short, ", "Fact check: ", "Recall this. ",
                                      "One more: ", "Trivia: ", "For the record, ")
"""Contexts prepended to a user's prompt to make the extra templates (English)."""


@dataclass(frozen=True)
class RouteConfig:
    """How :func:`~recallscope.routes.route_report` scores routes and gives verdicts (see the
    :mod:`~recallscope.routes.report` module doc for the evidence standard)."""

    # ---------------------------------------------------------------- prompts
    n_templates: int = 8
    """Prompts per query: fewer given -> more made by prepending ``template_prefixes`` (0 = as given)."""
    template_prefixes: tuple[str, ...] | None = None
    """Contexts for extra templates (None: :data:`TEMPLATE_PREFIXES`, English)."""
    n_alternatives: int = 4
    """Random alternative inputs when the query gives none (total effect and interchange values)."""
    max_output_tokens: int = 3
    """Output tokens in the teacher-forced log-prob metric."""
    # ---------------------------------------------------------------- competitors and controls
    n_controls: int = 8
    """Frequency- and token-count-matched control words per candidate (a reference class, median)."""
    n_random: int = 4
    """Random directions per candidate matched on |cos(h - b, u)| at the site and on edit norm."""
    n_neighbours: int = 3
    """The output's nearest neighbours in the unembedding (cosine), excluding its own variants."""
    output_variants: bool = True
    """Score the output in every casing and with/without its leading space as competitors."""
    input_competitor: bool = True
    """Score the input itself as a competitor."""
    test_competitors: bool = False
    """Give a caller's concept that is the input or the output the full statistics too (its own matched
    random directions, norm-matched competitors and controls; slower); it stays a competitor either way."""
    match_norm: bool = True
    """Compare each concept with every competitor at the concept's own edit norm (the competitor's
    interchange edit rescaled per prompt, alternative and window); False: at the competitor's own norm."""
    # ---------------------------------------------------------------- interventions
    layers: tuple[int, ...] | None = None
    """First layers of the intervention windows (hidden-state layers); None = every ``stride``-th."""
    window: int = 1
    """Layers intervened on together."""
    stride: int = 1
    """Spacing of the default windows."""
    mediation: bool = True
    """Run the interchange (resample) intervention, the primary score; without it no verdict is given."""
    ablation: bool = True
    """Also run mean ablation (reported, never a verdict on its own)."""
    method: Literal["exact", "attribution"] = "exact"
    """Mean ablation by exact intervention or by its first-order (gradient) estimate."""
    remove_output_direction: bool = True
    """Project the output tokens' direct logit directions out of every concept direction."""
    prefixes: tuple[str, ...] | None = None
    """Neutral contexts of concept representations (None: ``directions.NEUTRAL_PREFIXES``, English)."""
    baseline_words: tuple[str, ...] | None = None
    """Words whose mean representation is the baseline (None: ``directions.BASELINE_WORDS``, English)."""
    # ---------------------------------------------------------------- statistics and verdict
    alpha: float = 0.05
    """Family-wise significance level (Holm over the report's candidates)."""
    min_mediated: float = 0.3
    """Smallest mediated share (interchange effect / total effect) for a route."""
    min_share: float = 0.1
    """Smallest margin over the strongest competitor class, as a share of the total effect, for a route."""
    min_total_effect: float = 0.5
    """Smallest input -> output total effect (nats, ``M_clean - M_alt``) for a conclusive verdict."""
    test_unit: Literal["prompt", "alternative"] = "prompt"
    """Units of the paired test, CIs and held-out peaks: prompts (alternatives averaged) or every
    (prompt, alternative input) pair (for models that admit no other templates, e.g. 4-token organisms)."""
    n_perm: int = 1999
    """Sign-flip draws of the paired test (exact enumeration when ``2**n_prompts <= n_perm``)."""
    n_boot: int = 1000
    """Bootstrap resamples (over prompts) for the CIs."""
    seed: int = 0
    """Seed for alternatives, random directions, sign flips and the bootstrap."""
    batch_size: int = 64
    """Interventions per forward batch."""

    def __post_init__(self) -> None:
        if self.n_controls < 0 or self.n_random < 0 or self.n_neighbours < 0 or self.n_templates < 0:
            raise ConfigError(f"invalid RouteConfig: n_controls, n_random, n_neighbours and n_templates must be "
                              f">= 0 (got {self.n_controls}, {self.n_random}, {self.n_neighbours}, {self.n_templates}).")
        if self.window < 1 or self.stride < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"invalid RouteConfig: window, stride >= 1 and 0 < alpha < 1 (got {self.window}, "
                              f"{self.stride}, {self.alpha}).")
        if self.n_perm < 1 or self.n_boot < 1:
            raise ConfigError("invalid RouteConfig: n_perm and n_boot must be >= 1 (use >= 199 sign flips).")
        if self.test_unit not in ("prompt", "alternative"):
            raise ConfigError(f"test_unit must be 'prompt' or 'alternative', not {self.test_unit!r}.")
        if self.method not in ("exact", "attribution"):
            raise ConfigError(f"method must be 'exact' or 'attribution', not {self.method!r}.")
        for name in ("layers", "template_prefixes", "prefixes", "baseline_words"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready fields (tuples as lists, None left out)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RouteConfig":
        """A config from ``values`` (unknown keys are an error naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown RouteConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_toml(cls, path: str | os.PathLike, table: str = "route_config") -> "RouteConfig":
        """The ``[table]`` of a TOML file as a config (a missing file or table is an error naming it)."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the route configuration {path}: {exc}.") from exc
        if table not in data:
            raise ConfigError(f"{path} has no [{table}] table; put the RouteConfig fields there.")
        return cls.from_dict(dict(data[table]))

    def to_toml(self, table: str = "route_config") -> str:
        """The config as a ``[table]`` TOML snippet (every field, defaults included)."""
        import json

        lines = [f"[{table}]"]
        for k, v in self.to_dict().items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
        return "\n".join(lines) + "\n"
