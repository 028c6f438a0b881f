"""Typed intervention sites: the only place TransformerLens hook names are built.

A :class:`Site` names a component at a layer, optionally at one position and one head. Positions
and heads left as ``None`` mean "all of them". Layer windows (ROME restores ~10 consecutive layers)
are tuples of sites, see :func:`layer_window`.
"""

from dataclasses import dataclass
from typing import Any, Iterable

from recallscope.errors import SiteOutOfRangeError
from recallscope.vocab import Component

_HOOK_NAMES = {
    Component.RESID_PRE: "blocks.{layer}.hook_resid_pre",
    Component.RESID_MID: "blocks.{layer}.hook_resid_mid",
    Component.RESID_POST: "blocks.{layer}.hook_resid_post",
    Component.ATTN_OUT: "blocks.{layer}.hook_attn_out",
    Component.MLP_OUT: "blocks.{layer}.hook_mlp_out",
    Component.HEAD_OUT: "blocks.{layer}.attn.hook_z",
    Component.Q: "blocks.{layer}.attn.hook_q",
    Component.K: "blocks.{layer}.attn.hook_k",
    Component.V: "blocks.{layer}.attn.hook_v",
    Component.PATTERN: "blocks.{layer}.attn.hook_pattern",
}


@dataclass(frozen=True)
class Site:
    """One place in the model: ``component`` at ``layer``, optionally one ``pos`` and one ``head``."""

    component: Component
    layer: int
    pos: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component(self.component))
        if self.head is not None and not self.component.per_head:
            raise SiteOutOfRangeError(
                f"{self.component.value} has no head axis; drop head={self.head} or use a per-head "
                "component (z, q, k, v, pattern)."
            )

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook point this site reads or writes."""
        return _HOOK_NAMES[self.component].format(layer=self.layer)

    @property
    def label(self) -> str:
        """Short human label, e.g. ``mlp_out L5 @3`` or ``z L2.H7`` (see :func:`site_label`)."""
        return site_label(self.component, self.layer, head=self.head, pos=self.pos)

    def validate(self, model_cfg: Any, n_pos: int | None = None) -> "Site":
        """Raise :class:`SiteOutOfRangeError` if this site does not exist in the model / prompt."""
        n_layers = int(model_cfg.n_layers)
        if not 0 <= self.layer < n_layers:
            raise SiteOutOfRangeError(
                f"layer {self.layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})."
            )
        if self.head is not None:
            n = n_heads_for(self.component, model_cfg)
            if not 0 <= self.head < n:
                raise SiteOutOfRangeError(
                    f"head {self.head} is out of range for {self.component.value}: the model has {n} "
                    f"{'key/value ' if self.component in (Component.K, Component.V) else ''}heads (0..{n - 1})."
                )
        if self.pos is not None and n_pos is not None and not -n_pos <= self.pos < n_pos:
            raise SiteOutOfRangeError(
                f"position {self.pos} is out of range for prompts of {n_pos} tokens (0..{n_pos - 1}, "
                "or negative from the end)."
            )
        return self


def site_label(component: Component | str, layer: int, *, head: int | None = None, pos: int | None = None) -> str:
    """The one label of a site in every result, table and figure: ``<component> L<layer>[.H<head>][ @<pos>]``,
    e.g. ``z L23.H4`` (head 4's output at layer 23) or ``mlp_out L5 @3``."""
    head_part = f".H{head}" if head is not None else ""
    pos_part = f" @{pos}" if pos is not None else ""
    return f"{Component(component).value} L{layer}{head_part}{pos_part}"


def n_heads_for(component: Component, model_cfg: Any) -> int:
    """Number of heads on the head axis of ``component`` (key/value heads for k and v)."""
    if component in (Component.K, Component.V):
        return int(getattr(model_cfg, "n_key_value_heads", None) or model_cfg.n_heads)
    return int(model_cfg.n_heads)


def layer_window(component: Component, center: int, width: int, n_layers: int, *,
                 pos: int | None = None) -> tuple[Site, ...]:
    """ROME-style window: ``width`` consecutive layers around ``center``, clipped to the model."""
    if width < 1:
        raise SiteOutOfRangeError(f"window width must be >= 1, got {width}.")
    lo = max(0, min(center - width // 2, n_layers - width))
    hi = min(n_layers, lo + width)
    return tuple(Site(component, layer, pos) for layer in range(lo, hi))


def sites_grid(component: Component, layers: Iterable[int], positions: Iterable[int | None],
               heads: Iterable[int | None] = (None,)) -> list[Site]:
    """The cartesian product of layers x heads x positions as sites (layer-major order)."""
    positions, heads = list(positions), list(heads)
    return [Site(component, layer, pos, head) for layer in layers for head in heads for pos in positions]
