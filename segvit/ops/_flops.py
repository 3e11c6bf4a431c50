"""FLOP formulas of the fused kernels' custom ops, for ``torch.utils.flop_counter.FlopCounterMode``.

``FlopCounterMode`` counts the matrix products it sees (``aten.mm``, ``bmm``, ``addmm``, convolutions, ...) and
nothing for an op it has no formula for, so without these a fused backend would report fewer FLOPs than ``eager``
for the same model. Each formula counts what ``FlopCounterMode`` counts for the op's ``eager`` decomposition (the
original's math: 2 FLOPs per multiply-add of its matrix products; softmax, sigmoid, interpolation and sums count
nothing, as for ATen), not what the kernel executes (a fused backward recomputes the probabilities, for instance):
the totals of the ``cpp``, ``cuda`` and ``triton`` backends equal ``eager``'s, forward and backward.

Backward formulas count the eager backward with every input requiring grad (the fused backward kernels always
compute all of them), as in training. ``mask_losses`` needs none: its eager form has no matrix product.

``FlopCounterMode`` copies torch's registry when it is constructed, so ``register()`` runs when ``segvit.ops`` is
imported (after the extension has loaded; ops of a backend that is not there are skipped).
"""
from __future__ import annotations

import math


def _attention(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    # (B, H, Nq, D) @ (B, H, D, Nk), then (B, H, Nq, Nk) @ (B, H, Nk, D)
    return 2 * (2 * batch * heads * queries * keys * head_dim)


def atm_attention_forward(q_shape, k_shape) -> int:
    """``atm_attention``'s eager math: the logits and the weighted sum of the values."""
    batch, queries, heads, head_dim = q_shape
    return _attention(batch, heads, queries, k_shape[1], head_dim)


def atm_attention_backward(q_shape, k_shape) -> int:
    """Two products per forward product (the gradients of both factors)."""
    return 2 * atm_attention_forward(q_shape, k_shape)


def query_pool_attention_forward(x_shape, grid, stride: int) -> int:
    """``query_pool_attention``'s eager math: the q projection of the L' sampled tokens, the k and v projections
    of all L tokens (``F.linear``: one ``addmm`` each, the bias not counted) and the attention (H * D = C)."""
    batch, length, channels = x_shape
    pooled = math.ceil(grid[0] / stride) * math.ceil(grid[1] / stride)
    projections = 2 * batch * channels * channels * (pooled + 2 * length)
    return projections + _attention(batch, 1, pooled, length, channels)


def query_pool_attention_backward(x_shape, grid, stride: int) -> int:
    """Gradients of the inputs and of the weights of every projection and of both attention products."""
    return 2 * query_pool_attention_forward(x_shape, grid, stride)


def mask_classify_forward(class_logits_shape, mask_logits_shape, out_size) -> int:
    """``mask_classify``'s eager math: the ``einsum("bqc,bqhw->bchw")`` contraction, one (B, K, Q) @ (B, Q, Hout *
    Wout) ``bmm`` (the softmax, the upsampling and the sigmoid count nothing)."""
    batch, queries, classes_plus_one = class_logits_shape
    return 2 * batch * (classes_plus_one - 1) * queries * out_size[0] * out_size[1]


# Each op's formula, called as FlopCounterMode calls it: the op's arguments with tensors replaced by their shapes.
_FORMULAS = {
    # csrc/ ops (cpp and cuda backends)
    "atm_attention_fwd": lambda q, k, v, *args, **kw: atm_attention_forward(q, k),
    "atm_attention_bwd": lambda grad_out, grad_sim, q, k, *args, **kw: atm_attention_backward(q, k),
    "query_pool_attention_fwd": lambda x, grid, w, b, num_heads, stride, **kw: query_pool_attention_forward(
        x, grid, stride),
    "query_pool_attention_bwd": lambda grad_out, x, grid, w, q, kv, out, lse, num_heads, stride, **kw:
        query_pool_attention_backward(x, grid, stride),
    "mask_classify": lambda cls, masks, out_size, **kw: mask_classify_forward(cls, masks, out_size),
    # kernels/ ops (triton backend)
    "triton_atm_attention": lambda q, k, v, *args, **kw: atm_attention_forward(q, k),
    "triton_atm_attention_backward": lambda dout, dsim, q, k, *args, **kw: atm_attention_backward(q, k),
    "triton_query_pool_attention": lambda x, grid, w, b, num_heads, stride, **kw: query_pool_attention_forward(
        x, grid, stride),
    "triton_query_pool_attention_backward": lambda dout, x, w, q, kv, out, lse, grid, num_heads, stride, **kw:
        query_pool_attention_backward(x, grid, stride),
    "triton_mask_classify": lambda cls, masks, out_size, **kw: mask_classify_forward(cls, masks, out_size),
}


def register() -> list[str]:
    """Registers the formula of every op in ``_FORMULAS`` that exists (once; a second call registers only ops
    defined since). Returns the names registered now."""
    import importlib

    import torch
    from torch.utils import flop_counter

    try:  # defines segvit::triton_mask_classify where Triton is installed (segvit.ops imports it lazily)
        importlib.import_module("segvit.kernels.mask_classify")
    except ImportError:
        pass
    done = []
    for name, formula in _FORMULAS.items():
        if not hasattr(torch.ops.segvit, name):  # that backend is not built / not installed
            continue
        packet = getattr(torch.ops.segvit, name)
        if packet in flop_counter.flop_registry:
            continue
        flop_counter.register_flop_formula(packet)(_wrap(formula))
        done.append(name)
    return done


def _wrap(formula):
    def count(*args, out_shape=None, **kwargs):
        return formula(*args, **kwargs)

    return count
