"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), in torch.

1. :class:`LoRALinear` wraps a frozen ``nn.Linear`` ``W``: ``y = W x + (alpha / r) * B (A x)`` with
   ``A`` (``r x in``) drawn from a seeded Gaussian scaled by ``1/sqrt(in)`` and ``B`` (``out x r``) zero, so
   the wrapped model computes exactly what the original does until ``B`` is trained.
2. :func:`attach_lora` replaces the named linear sub-modules (``targets``, matched on the last name part,
   e.g. ``q_proj``) inside the given modules, freezes every other parameter of the model, and returns
   the adapter parameters. :func:`lora_state` / :func:`load_lora_state` save and restore them by name.
3. :func:`merge_lora` folds the adapters back into plain ``nn.Linear`` weights (for saving a checkpoint
   that any loader reads); :func:`remove_lora` puts the original layers back (the next seed starts from the
   pretrained weights).
"""

from typing import Any, Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from recallscope.errors import ConfigError


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``(alpha / rank) * B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {rank}.")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        a = torch.randn(rank, base.in_features, generator=generator) / base.in_features ** 0.5
        self.lora_a = nn.Parameter(a.to(dev, dt))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        self.scale = alpha / rank

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        return self.base(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)

    def merged(self) -> nn.Linear:
        """A plain linear layer with the update folded into its weight."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device, self.base.weight.dtype)


def attach_lora(model: nn.Module, modules: Iterable[nn.Module], targets: Iterable[str], *, rank: int, alpha: float,
                seed: int) -> list[nn.Parameter]:
    """Wrap every ``nn.Linear`` named in ``targets`` inside ``modules``; freeze the rest of ``model``.

    Raises:
        ConfigError: no linear layer matched (names the targets and what exists).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wanted, params, seen = set(targets), [], set()
    for module in modules:
        for name, child in list(module.named_modules()):
            seen.add(name.rsplit(".", 1)[-1])
            if name.rsplit(".", 1)[-1] in wanted and isinstance(child, nn.Linear):
                parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                wrapped = LoRALinear(child, rank, alpha, gen)
                setattr(parent, name.rsplit(".", 1)[-1], wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ConfigError(f"no nn.Linear named {sorted(wanted)} in the given modules; they contain "
                          f"{sorted(n for n in seen if n)[:20]}. Pass existing names as LoRA targets.")
    return params


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors by parameter name (what a checkpoint needs)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b"))}


def load_lora_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore adapters saved by :func:`lora_state`; raises ConfigError on a name mismatch."""
    own = {n: p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b"))}
    if set(own) != set(state):
        raise ConfigError(f"the checkpoint's adapters ({len(state)}) do not match the model's ({len(own)}); "
                          "it was written with another LoRA configuration. Delete it or use that configuration.")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


def merge_lora(model: nn.Module) -> Any:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear``; returns the model."""
    for name, child in list(model.named_modules()):
        if isinstance(child, LoRALinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], child.merged())
    return model


def remove_lora(model: nn.Module) -> Any:
    """Undo :func:`attach_lora`: put every wrapped layer's original ``nn.Linear`` back; returns the model."""
    for name, child in list(model.named_modules()):
        if isinstance(child, LoRALinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], child.base)
    return model
