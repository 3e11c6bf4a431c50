"""``query_pool_attention``: the Shrunk structure's query down-sampling (QD) attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segvit.ops import _autocast, _checks
from segvit.ops._dispatch import op

_OP = op("query_pool_attention")


def pooled_grid(grid, stride: int = 2) -> tuple[int, int]:
    """Grid of the sampled queries: rows and columns 0, stride, 2 * stride, ..."""
    return math.ceil(grid[0] / stride), math.ceil(grid[1] / stride)


def query_pool_attention(x: torch.Tensor, grid, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
                         num_heads: int, *, stride: int = 2) -> torch.Tensor:
    """Multi-head attention of strided-sampled queries over all tokens (before the output projection).

    x (B, L, C): layer-normalised tokens of the (gh, gw) = ``grid`` token map, row-major (L = gh * gw).
    in_proj_weight (3C, C), in_proj_bias (3C): the q, k, v projections stacked as in ``nn.MultiheadAttention``.
    With xs = x at grid rows and columns 0, stride, 2*stride, ... (the top-left token of each stride x stride
    cell; L' = ceil(gh / stride) * ceil(gw / stride)), D = C / num_heads and per head h::

        q = xs W_q^T + b_q,  k = x W_k^T + b_k,  v = x W_v^T + b_v
        out_h = softmax(q_h k_h^T / sqrt(D)) v_h

    returns the heads merged, (B, L', C). Differentiable in x and both parameters. Fused backends project only
    the sampled tokens and never materialize the sampled copy of x or the (B, H, L', L) scores.

    Dtypes: x and both parameters share one dtype and the output has it. Inside ``torch.autocast`` of their
    device, float32 / float16 / bfloat16 inputs (float32 LayerNorm output and float32 master weights included) are
    first cast to the autocast dtype, the op runs with autocast off and returns the autocast dtype (the ``LOWER``
    rule of segvit/ops/_autocast.py, as ``linear`` and ``scaled_dot_product_attention``); the gradients of float32
    parameters come back in float32. Every backend accumulates in float32.
    """
    _checks.tensor("x", x, 3, "(B, L, C)")
    _checks.tensor("in_proj_weight", in_proj_weight, 2, "(3C, C)")
    _checks.tensor("in_proj_bias", in_proj_bias, 1, "(3C,)")
    _checks.same_device("x", x, in_proj_weight=in_proj_weight, in_proj_bias=in_proj_bias)
    x, in_proj_weight, in_proj_bias = _autocast.cast_inputs(x.device, x, in_proj_weight, in_proj_bias)
    _checks.same_dtype("x", x, in_proj_weight=in_proj_weight, in_proj_bias=in_proj_bias)
    gh, gw = _checks.size_pair("grid", grid)
    batch, length, channels = x.shape
    if gh * gw != length:
        raise ValueError(f"grid: expected gh * gw == L = {length} (tokens of x), got {(gh, gw)}")
    if tuple(in_proj_weight.shape) != (3 * channels, channels):
        raise ValueError(f"in_proj_weight: expected shape {(3 * channels, channels)}, got {tuple(in_proj_weight.shape)}")
    if tuple(in_proj_bias.shape) != (3 * channels,):
        raise ValueError(f"in_proj_bias: expected shape {(3 * channels,)}, got {tuple(in_proj_bias.shape)}")
    num_heads = _checks.integer("num_heads", num_heads, what=f"a positive int dividing C = {channels}")
    if channels % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing C = {channels}, got {num_heads!r}")
    stride = _checks.integer("stride", stride)
    return _OP(x, (gh, gw), in_proj_weight, in_proj_bias, num_heads, stride=stride)


def eager(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2):
    """The original's math: ``nn.MultiheadAttention`` with the sampled tokens as queries (explicit copy)."""
    batch, length, channels = x.shape
    head_dim = channels // num_heads
    sampled = x.unflatten(1, tuple(grid))[:, ::stride, ::stride].flatten(1, 2)
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3)

    def heads(t):
        return t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)  # (B, H, N, D)

    q = heads(F.linear(sampled, w_q, b_q))
    k = heads(F.linear(x, w_k, b_k))
    v = heads(F.linear(x, w_v, b_v))
    # nn.MultiheadAttention scales q before the product
    attn = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).flatten(2)


def reference(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2):
    """Float64 reference for tests."""
    return eager(x.double(), grid, in_proj_weight.double(), in_proj_bias.double(), num_heads, stride=stride)


_OP.register("eager", eager)

# Triton kernels (GPU; CPU under TRITON_INTERPRET=1): importing them never needs triton itself.
from segvit.kernels import query_pool_attention as _triton  # noqa: E402

_OP.register("triton", _triton.query_pool_attention, _triton.reasons)

# C++ CPU kernel (csrc/cpu/query_pool_attention.cpp). The op returns (out, q, kv, lse): the scaled query projection,
# the key/value projections and the log-sum-exp, saved for its backward op.


def register_cpp_autograd():
    """Registers the autograd formula of torch.ops.segvit.query_pool_attention_fwd; called by segvit._extension right
    after the extension loads, so it is in place before any call, compiled or not."""
    torch.library.register_autograd("segvit::query_pool_attention_fwd", _cpp_backward, setup_context=_cpp_setup_context)


def _cpp_setup_context(ctx, inputs, output):
    x, grid, in_proj_weight, in_proj_bias, num_heads, stride = inputs
    out, q, kv, lse = output
    ctx.mark_non_differentiable(q, kv, lse)
    # Otherwise autograd hands the backward zero tensors for q, kv and lse: 13 MB of zeros at the issue-4 shape.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, in_proj_weight, q, kv, out, lse)
    ctx.grid, ctx.num_heads, ctx.stride = grid, num_heads, stride


def _cpp_backward(ctx, grad_out, grad_q, grad_kv, grad_lse):
    x, in_proj_weight, q, kv, out, lse = ctx.saved_tensors
    if grad_out is None:  # e.g. a create_graph backward, done by the eager formula instead
        return None, None, None, None, None, None
    grad_x, grad_w, grad_b = torch.ops.segvit.query_pool_attention_bwd(
        grad_out, x, ctx.grid, in_proj_weight, q, kv, out, lse, ctx.num_heads, ctx.stride)
    return grad_x, None, grad_w, grad_b, None, None


def _cpp(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2):
    return torch.ops.segvit.query_pool_attention_fwd(x, list(grid), in_proj_weight, in_proj_bias, num_heads, stride)[0]


def _cpp_reasons(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2):
    return _checks.compiled_backend_reasons("cpp", x)


_OP.register("cpp", _cpp, _cpp_reasons)
