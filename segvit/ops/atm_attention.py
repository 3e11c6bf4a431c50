"""``atm_attention``: multi-head cross-attention that also returns SegViT's similarity map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segvit.ops import _checks
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
    """
    _checks.tensor("q", q, 4, "(B, Nq, H, D)")
    _checks.tensor("k", k, 4, "(B, Nk, H, D)")
    _checks.tensor("v", v, 4, "(B, Nk, H, D)")
    _checks.same_device_dtype("q", q, k=k, v=v)
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

# Triton kernels (GPU; CPU under TRITON_INTERPRET=1): importing them never needs triton itself.
from segvit.kernels import atm_attention as _triton  # noqa: E402

_OP.register("triton", _triton.atm_attention, _triton.reasons)
