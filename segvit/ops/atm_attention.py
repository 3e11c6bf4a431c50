"""``atm_attention``: multi-head cross-attention that also returns SegViT's similarity map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segvit.ops import _autocast, _checks
from segvit.ops._dispatch import op

_OP = op("atm_attention")
MAX_HEAD_DIM = 128


def atm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  dropout_p: float = 0.0):
    """Attention output and head-mean similarity map of the ATM cross-attention.

    q (B, Nq, H, D), k and v (B, Nk, H, D); ``scale`` defaults to D ** -0.5. Per head h::

        s_h = scale * q_h k_h^T                           (Nq, Nk)
        out[:, :, h] = dropout(softmax(s_h, dim=-1)) v_h  -> out (B, Nq, H, D)
        sim = mean_h s_h                                  -> sim (B, Nq, Nk), pre-softmax and pre-dropout

    ``sim`` is SegViT's mask logits. ``dropout_p`` drops attention probabilities (training only: pass 0 in
    eval). Differentiable in q, k, v through both outputs. Fused backends never materialize (B, H, Nq, Nk).

    Dtypes: q, k, v share one dtype and ``out`` and ``sim`` have it. Inside ``torch.autocast`` of their device,
    float32 / float16 / bfloat16 inputs (mixed ones included) are first cast to the autocast dtype, the op runs with
    autocast off and ``out`` and ``sim`` are in the autocast dtype (the ``LOWER`` rule of segvit/ops/_autocast.py,
    as for ``scaled_dot_product_attention``). Every backend accumulates the products and the softmax statistics in
    float32.
    """
    _checks.tensor("q", q, 4, "(B, Nq, H, D)")
    _checks.tensor("k", k, 4, "(B, Nk, H, D)")
    _checks.tensor("v", v, 4, "(B, Nk, H, D)")
    _checks.same_device("q", q, k=k, v=v)
    q, k, v = _autocast.cast_inputs(q.device, q, k, v)
    _checks.same_dtype("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (as k), got {tuple(v.shape)}")
    _checks.same("q", q.shape[0], "k", k.shape[0], "batch size")
    _checks.same("q", q.shape[2], "k", k.shape[2], "head count H")
    _checks.same("q", q.shape[3], "k", k.shape[3], "head dim D")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim D <= {MAX_HEAD_DIM}, got {q.shape[3]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return _OP(q, k, v, scale=scale, dropout_p=float(dropout_p))


def eager(q, k, v, *, scale, dropout_p):
    """The original ``Attention`` module's math: full (B, H, Nq, Nk) logits, a saved copy, softmax, dropout."""
    num_heads = q.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    logits = (q @ k.transpose(-2, -1)) * scale
    sim = logits.sum(dim=1) / num_heads
    attn = logits.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return (attn @ v).transpose(1, 2), sim


def reference(q, k, v, *, scale=None, dropout_p=0.0):
    """Float64 reference for tests (no dropout)."""
    assert dropout_p == 0.0
    scale = q.shape[3] ** -0.5 if scale is None else scale
    return eager(q.double(), k.double(), v.double(), scale=scale, dropout_p=0.0)


_OP.register("eager", eager)


def _second_order_refusal(q, k, v, *, scale, dropout_p):
    if dropout_p > 0:
        return (f"with dropout_p={dropout_p} (the eager formula cannot replay the fused kernel's dropout keep "
                f"mask; dropout_p=0 works on every backend)")
    return None


# Second-order gradients on the fused backends differentiate the eager formula (segvit/ops/_second_order.py).
_OP.second_order_refusal = _second_order_refusal

# Triton kernels (GPU; CPU under TRITON_INTERPRET=1): importing them never needs triton itself.
from segvit.kernels import atm_attention as _triton  # noqa: E402

_OP.register("triton", _triton.atm_attention, _triton.reasons)

# C++ CPU kernel (csrc/cpu/atm_attention.cpp). The op returns (out, sim, lse); the log-sum-exp (B, H, Nq) is what
# its backward op needs to recompute the probabilities tile by tile.


def register_cpp_autograd():
    """Registers the autograd formula of torch.ops.segvit.atm_attention_fwd; called by segvit._extension right
    after the extension loads, so it is in place before any call, compiled or not."""
    torch.library.register_autograd("segvit::atm_attention_fwd", _cpp_backward, setup_context=_cpp_setup_context)


def _cpp_setup_context(ctx, inputs, output):
    q, k, v, scale, *dropout = inputs  # dropout_p, seed when given (the schema defaults them to 0.0, 0)
    out, sim, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.dropout = tuple(dropout)


def _cpp_backward(ctx, grad_out, grad_sim, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None and grad_sim is None:  # e.g. a create_graph backward, done by the eager formula instead
        return (None,) * (4 + len(ctx.dropout))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_sim is None:
        grad_sim = q.new_zeros((q.shape[0], q.shape[1], k.shape[1]))
    grad_q, grad_k, grad_v = torch.ops.segvit.atm_attention_bwd(grad_out, grad_sim, q, k, v, out, lse, ctx.scale,
                                                                *ctx.dropout)
    return (grad_q, grad_k, grad_v, None) + (None,) * len(ctx.dropout)


def _cpp(q, k, v, *, scale, dropout_p):
    if dropout_p > 0:
        # The kernel hashes its keep mask from this seed; drawing it from torch's default CPU generator makes
        # torch.manual_seed reproduce a run, as it does for the eager F.dropout.
        seed = int(torch.randint(2**62, (), dtype=torch.int64).item())
        out, sim, _ = torch.ops.segvit.atm_attention_fwd(q, k, v, scale, float(dropout_p), seed)
    else:
        out, sim, _ = torch.ops.segvit.atm_attention_fwd(q, k, v, scale)
    return out, sim


def _cpp_reasons(q, k, v, *, scale, dropout_p):
    return _checks.compiled_backend_reasons("cpp", q)


_OP.register("cpp", _cpp, _cpp_reasons)
