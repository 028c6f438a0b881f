"""Learning curves: full-batch LoRA training that records every item's answer log-prob at every step.

1. Attach LoRA adapters (:mod:`recallscope.finetune.lora`, seeded) to the layers from ``from_layer`` up;
   everything else is frozen, so the lower layers' output is the cached :class:`~recallscope.finetune.trunk.Trunk`.
2. Every step runs the whole batch through the upper layers, records ``log p(answer)`` and whether the
   answer is the argmax *before* the update (step 0 is the pretrained model), then takes one AdamW step on
   the mean cross-entropy. Step ``steps`` only measures. Full batch: every item gets the same updates.
3. Resumable: every ``checkpoint_every`` steps the adapters, the optimiser state and the curve so far are
   written atomically to ``checkpoint``; a rerun with the same configuration continues from there (a
   different configuration raises). The adapters are removed at the end (the model is pretrained again) and
   returned with the curve, so a caller can re-attach them (:func:`~recallscope.finetune.lora.load_lora_state`)
   and merge them into a checkpoint.
"""

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recallscope.errors import CheckpointError, ConfigError
from recallscope.finetune.lora import attach_lora, load_lora_state, lora_state, remove_lora
from recallscope.finetune.trunk import Trunk, decoder, top_logits


@dataclass(frozen=True)
class TrainConfig:
    """How each learning curve is trained."""

    steps: int = 60
    """AdamW steps (the curve has ``steps + 1`` points: step 0 is the pretrained model)."""
    lr: float = 1e-3
    """AdamW learning rate for the adapters."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scale numerator (the update is ``alpha / rank * B A``)."""
    from_layer: int = 15
    """First trained layer; the layers below are frozen and run once (the cached trunk)."""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear sub-modules that get adapters."""
    checkpoint_every: int = 10
    """Steps between checkpoints."""

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.rank < 1:
            problems.append(f"rank must be >= 1 (got {self.rank})")
        if self.from_layer < 0:
            problems.append(f"from_layer must be >= 0 (got {self.from_layer})")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if not self.targets:
            problems.append("targets must name at least one linear module")
        if problems:
            raise ConfigError("bad TrainConfig: " + "; ".join(problems) + ".")

    def key(self, seed: int, n_items: int) -> str:
        """Hash of what determines a curve except the data (the checkpoint is only reused on a match)."""
        blob = json.dumps({**dataclasses.asdict(self), "seed": seed, "n_items": n_items}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Curve:
    """One seed's learning curves: ``logp[step, item]`` and ``top1[step, item]`` (before each update), and the
    trained adapters (:func:`~recallscope.finetune.lora.lora_state`; empty when not kept)."""

    logp: Float[Tensor, "step item"]
    top1: Bool[Tensor, "step item"]
    seed: int
    adapters: dict[str, Tensor] = dataclasses.field(default_factory=dict)


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _resume(path: Path | None, key: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # a torn or foreign file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc}); delete it to start this seed again.") from exc
    if state.get("key") != key:
        raise CheckpointError(f"{path} was written with another configuration or item set; delete it or rerun "
                              "with that configuration.")
    return state


def learning_curve(model: Any, trunk: Trunk, answers: Int[Tensor, " item"], config: TrainConfig, *, seed: int,
                   checkpoint: str | os.PathLike | None = None, progress: bool = True) -> Curve:
    """Train adapters on all items at once and record the curves (module docstring)."""
    if trunk.from_layer != config.from_layer:
        raise ConfigError(f"the trunk was cached up to layer {trunk.from_layer} but config.from_layer is "
                          f"{config.from_layer}; cache the trunk with the config's from_layer.")
    if answers.shape[0] != trunk.hidden.shape[0]:
        raise ConfigError(f"{answers.shape[0]} answers for a batch of {trunk.hidden.shape[0]} prompts.")
    torch.manual_seed(seed)
    path = Path(checkpoint) if checkpoint is not None else None
    key = config.key(seed, int(answers.shape[0]))
    params = attach_lora(model, decoder(model).layers[config.from_layer:], config.targets, rank=config.rank,
                         alpha=config.alpha, seed=seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    logps: list[Tensor] = []
    top1: list[Tensor] = []
    start = 0
    state = _resume(path, key)
    if state is not None:
        load_lora_state(model, state["lora"])
        opt.load_state_dict(state["opt"])
        logps, top1, start = list(state["logp"]), list(state["top1"]), int(state["step"])
    from tqdm.auto import tqdm

    try:
        for step in tqdm(range(start, config.steps + 1), desc=f"seed {seed}", disable=not progress,
                         initial=start, total=config.steps + 1):
            logits = top_logits(model, trunk)
            logp = torch.log_softmax(logits, -1).gather(1, answers[:, None])[:, 0]
            logps.append(logp.detach().cpu().clone())  # curves live on the CPU whatever the device
            top1.append((logits.argmax(-1) == answers).detach().cpu())
            if step < config.steps:
                opt.zero_grad(set_to_none=True)
                (-logp.mean()).backward()
                opt.step()
                if path is not None and (step + 1) % config.checkpoint_every == 0:
                    _save(path, {"key": key, "lora": lora_state(model), "opt": opt.state_dict(), "logp": logps,
                                 "top1": top1, "step": step + 1})
        adapters = {k: v.cpu() for k, v in lora_state(model).items()}
    finally:
        remove_lora(model)
    return Curve(torch.stack(logps), torch.stack(top1), seed, adapters)
