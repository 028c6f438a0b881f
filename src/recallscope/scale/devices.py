"""Where a model's parts live, for models spread over several devices (``device_map="auto"``).

A model loaded with a device map keeps each decoder layer on one device, but different layers (and
the embedding, final norm and unembedding) may sit on different GPUs, on the CPU, or be offloaded.
The functional forward calls the layers' modules directly, so it moves activations itself:

1. :func:`module_device` is the device a module computes on: the execution device of its accelerate
   hook when it has one (offloaded weights are materialised there), else the device of its first
   parameter or buffer; None for a plain function.
2. :func:`layer_device` is that device for one block (read from its first norm, whose weights sit with
   the rest of the block).
3. :func:`place_trace` moves a recorded :class:`~recallscope.models.forward.Trace` so that every
   layer's activations and keys/values sit on that layer's device (a trace shipped to a worker
   arrives on the CPU).

None of this costs anything on a single device: ``tensor.to(device)`` returns the tensor itself when
it is already there.
"""

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor


def module_device(fn: Any) -> torch.device | None:
    """The device ``fn`` computes on (see the module docstring), or None when it is not a module."""
    hook = getattr(fn, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    if isinstance(fn, torch.nn.Module):
        for tensor in fn.parameters():
            return tensor.device
        for tensor in fn.buffers():
            return tensor.device
    return None


def layer_device(stack: Any, layer: int) -> torch.device | None:
    """The device block ``layer`` of ``stack`` computes on (None when it cannot be told)."""
    parts = stack.layers[layer]
    for fn in (parts.ln1, parts.ln2, parts.mlp):
        dev = module_device(fn)
        if dev is not None:
            return dev
    return None


def output_device(stack: Any) -> torch.device | None:
    """The device of the unembedding's output (where logits appear)."""
    return module_device(stack.unembed)


def place_trace(trace: Any, stack: Any) -> Any:
    """A copy of ``trace`` with each layer's activations and keys/values on that layer's device.

    ``trace`` is a :class:`recallscope.models.forward.Trace`; the copy is made with ``dataclasses.replace`` so
    this module never imports ``models.forward`` (which imports this one).
    """
    devices = [layer_device(stack, layer) for layer in range(stack.n_layers)]

    def put(t: Tensor, layer: int) -> Tensor:
        dev = devices[layer] if 0 <= layer < len(devices) else None
        return t.to(dev) if dev is not None else t

    return replace(trace, acts={key: put(t, key[1]) for key, t in trace.acts.items()},
                   kv={layer: (put(k, layer), put(v, layer)) for layer, (k, v) in trace.kv.items()})
