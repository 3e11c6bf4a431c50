"""The autocast policy of the fused ops: one rule per op, the same for every backend and device.

PyTorch's autocast casts an op's inputs by the op's kind: matmul-like ops run in the low-precision dtype, losses and
reductions in float32. The four fused ops follow it, with an explicit cast at the op boundary (the
``torch.library.register_autocast`` alternative casts to one fixed dtype per device, so it cannot serve both float16
and bfloat16 autocast):

* ``LOWER`` (``atm_attention``, ``query_pool_attention``, ``mask_classify``: attention and contractions, like
  ``matmul`` / ``scaled_dot_product_attention``): inside ``torch.autocast(device_type)`` of the inputs' device, every
  float32 / float16 / bfloat16 tensor input is cast to the autocast dtype (float64 is left alone, as autocast does);
  the op then runs with autocast off, so each backend computes on uniform low-precision inputs (tensor-core / bf16
  kernels, float32 accumulation and float32 softmax / sigmoid statistics inside) and returns its floating outputs in
  the autocast dtype. Mixed float32 / low-precision inputs are therefore fine inside autocast.
* ``FLOAT32`` (``mask_losses``: a loss, like ``binary_cross_entropy_with_logits``): no cast, the op runs with
  autocast off; every backend reads the logits in their own dtype, computes per element in float32 (the same values
  a cast to float32 would give: widening is exact) and returns float32 losses (float64 for float64 logits).

Outside autocast nothing is cast: the floating inputs of an op must share one dtype, and the outputs have it.
Casting copies the inputs that are not yet in the autocast dtype (as autocast's own cast does; in the model layer
only the LayerNorm outputs and the weights of ``query_pool_attention`` are float32 inside autocast). The cast is
differentiable: the gradients of float32 inputs (master weights) come back in float32.
"""
from __future__ import annotations

import contextlib

import torch

LOWER = "lower"
FLOAT32 = "float32"
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def active_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for tensors on ``device``, or None when autocast is off for its device type."""
    device_type = device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_inputs(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype of ``device`` (the ``LOWER`` rule); unchanged outside autocast."""
    dtype = active_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.dtype in _CASTABLE and t.dtype != dtype else t for t in tensors)


def disabled(device: torch.device):
    """A context in which autocast is off for ``device``'s type (a no-op context when it is off already): the
    backends run on the inputs as the policy left them, so no ATen call inside a backend is re-cast by autocast
    (which would, e.g., hand a float32 kernel a low-precision projection)."""
    if active_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
