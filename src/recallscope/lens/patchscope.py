"""Patchscopes (Ghandeharioun et al. 2024, "Patchscopes: A Unifying Framework for Inspecting Hidden
Representations of Language Models"): decode a hidden state by patching it into an inspection prompt.

Algorithm, for a source hidden state ``h`` of layer ``l`` (any prompt, any position):

1. Tokenise the inspection prompt, e.g. ``"cat -> cat; 135 -> 135; hello -> hello; ? ->"``; the placeholder
   (``?``) marks the patch position ``q``. Its few-shot identity pattern makes the model repeat
   whatever token the placeholder's hidden state stands for.
2. Run the inspection prompt once and keep its hidden states and keys/values (the reference run).
3. Map ``h`` with ``mapping`` (identity by default) and write it into the residual stream of the target
   layer ``l*`` (default ``l``) at position ``q``. Positions before ``q`` and layers below ``l*`` are
   unchanged, so the patched run starts at layer ``l*``, position ``q``, reusing the reference keys/values.
4. Read the next-token distribution at the last position (:meth:`Patchscope.logits`), or generate a
   continuation greedily with the patch held in place (:meth:`Patchscope.generate`).

As a :class:`~recallscope.lens.base.Lens`, :meth:`Patchscope.transform_hidden` returns the final
residual at the read position of the patched run, so ``logits`` decodes it like any lens.
"""

from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.lens.base import Lens, check_layer, run_hidden
from recallscope.models.forward import forward, run

IDENTITY_PROMPT = "cat -> cat; 135 -> 135; hello -> hello; ? ->"
"""The token-identity inspection prompt: the next token after ``? ->`` repeats what ``?`` stands for.

The ASCII arrow with spaces keeps the copied words space-prefixed, as they are inside sentences; with
SmolLM2 it decodes ~40% of tokens of an ordinary sentence at layers 0-2, where "cat→cat; ...; ?→"
(unspaced, non-ASCII arrow) decodes none because the copies come out without their leading space."""


class Patchscope(Lens):
    """Decode hidden states through an inspection prompt.

    Args:
        model: the TransformerBridge (source and target model are the same).
        prompt: the inspection prompt; it must contain ``placeholder`` once.
        placeholder: the text whose (last) token is overwritten with the source hidden state.
        target_layer: hidden-state layer ``l*`` to patch into; None = the source layer.
        mapping: ``f(h, source_layer) -> h`` applied before patching; None = identity.
    """

    name = "patchscope"

    def __init__(self, model: Any, prompt: str = IDENTITY_PROMPT, *, placeholder: str = "?",
                 target_layer: int | None = None,
                 mapping: Callable[[Tensor, int], Tensor] | None = None) -> None:
        super().__init__(model)
        if prompt.count(placeholder) != 1:
            raise ConfigError(f"the inspection prompt {prompt!r} must contain the placeholder {placeholder!r} "
                              "exactly once; it marks where the hidden state is patched.")
        self.prompt, self.placeholder = prompt, placeholder
        self.target_layer = None if target_layer is None else check_layer(self.stack, target_layer)
        self.mapping = mapping
        self.tokens = model.to_tokens(prompt, truncate=False)
        head = prompt[: prompt.index(placeholder) + len(placeholder)]
        self.patch_pos = int(model.to_tokens(head, truncate=False).shape[1]) - 1
        if not torch.equal(self.tokens[0, : self.patch_pos + 1], model.to_tokens(head, truncate=False)[0]):
            raise ConfigError(f"the placeholder {placeholder!r} merges with the text after it when tokenised "
                              f"in {prompt!r}; put a separator after it so its token stands alone.")
        with torch.no_grad():
            self._states, self._trace = run_hidden(self.stack, self.tokens)  # states: [layer, 1, pos, d]

    def _target(self, layer: int) -> int:
        return layer if self.target_layer is None else self.target_layer

    def transform_hidden(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        target, q = self._target(layer), self.patch_pos
        if self.mapping is not None:
            h = self.mapping(h, layer)
        lead = h.shape[:-1]
        flat = h.reshape(-1, 1, h.shape[-1])
        tail = self._states[target, :, q + 1:].expand(flat.shape[0], -1, -1).to(flat)
        x = torch.cat([flat, tail], dim=1)
        if target == self.stack.n_layers:  # patching the final residual: it is read directly
            return x[:, -1].reshape(*lead, -1)
        past = {l: (k[:, :, :q], v[:, :, :q]) for l, (k, v) in self._trace.kv.items()}
        final, _ = forward(self.stack, x, start_layer=target, pos0=q, past=past,
                           read_pos=torch.tensor([self.tokens.shape[1] - 1]), unembed=False)
        return final[:, -1].reshape(*lead, -1)

    def generate(self, h: Float[Tensor, " d_model"], layer: int, *, max_new_tokens: int = 5) -> str:
        """Greedy continuation of the inspection prompt with ``h`` patched in (held at every step)."""
        target, q = self._target(layer), self.patch_pos
        patched = self.mapping(h, layer) if self.mapping is not None else h
        tokens = self.tokens
        point = "resid_pre" if target < self.stack.n_layers else "resid_post"
        where = target if target < self.stack.n_layers else self.stack.n_layers - 1

        def edit(name: str, lyr: int, t: Tensor) -> Tensor:
            if name == point and lyr == where:
                t = t.clone()
                t[:, q] = patched.to(t)
            return t

        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits, _ = run(self.stack, tokens, edit=edit, read_pos=torch.tensor([tokens.shape[1] - 1]))
                nxt = int(logits[0, -1].argmax())
                new.append(nxt)
                tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
        return self.model.tokenizer.decode(new)
