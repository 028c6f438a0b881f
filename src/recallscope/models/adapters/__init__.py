"""Fast-engine adapters: one builder per Hugging Face architecture, from the model to a
:class:`~recallscope.models.stack.Stack`.

:data:`ADAPTERS` maps the class name of the Hugging Face model (``type(bridge.original_model).__name__``)
to its builder. :func:`recallscope.models.stack.build_stack` refuses every other class, so a family the
fast engine was not written and tested for runs on the hook engine instead of being guessed at.
Each builder also refuses settings of its family that it does not reproduce.
"""

from typing import Any, Callable

from recallscope.models.adapters.decoder import DECODER_ADAPTERS
from recallscope.models.adapters.gpt import GPT_ADAPTERS
from recallscope.models.stack import Stack

ADAPTERS: dict[str, Callable[[Any], Stack]] = {**DECODER_ADAPTERS, **GPT_ADAPTERS}
"""Hugging Face model class name -> Stack builder."""

__all__ = ["ADAPTERS"]
