"""Triton kernel of ``mask_classify`` (forward only): bilinear upsampling, sigmoid and the class contraction fused.

    out[b, c, pix] = sum_q P[b, q, c] * sigmoid(bilinear(mask_logits[b, q])[pix]),   c < K,
    P[b, q] = softmax(class_logits[b, q]) over the K+1 columns, last ("no object") column dropped.

``bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)``. One program owns a tile of BLOCK_P output
pixels (flattened Hout*Wout) and BLOCK_C classes of one image; it loops over the queries in blocks of BLOCK_Q,
interpolates the BLOCK_Q x BLOCK_P mask tile in registers from the low-resolution logits (which stay in L1/L2),
and feeds it to ``tl.dot`` with the BLOCK_C x BLOCK_Q probability tile. The (B, Q, Hout, Wout) upsampled masks
never exist. P is a (B, Q, K) tensor computed once by the launcher (softmax in float32).
"""
from __future__ import annotations

import numpy as np
import torch

from segvit.kernels import _common
from segvit.kernels._common import INTERPRET, tl, triton

# Autotune spaces for A100 / H100 (sm_80 / sm_90): the dot is (BLOCK_C x BLOCK_Q) @ (BLOCK_Q x BLOCK_P). BLOCK_C=128
# covers 150 classes in two class tiles (each recomputes the interpolation, cheap next to the output write); the
# pixel dimension is the long one. float32 runs the dot on FMA units with a float32 operand tile, which needs about
# twice the registers: it gets its own smaller configs and num_stages=1 (software pipelining of the four gathers
# spilled in every float32 config tried). Every config here is compiled by the compile report, which fails on spills.
GPU_CONFIGS = {
    "half": [
        {"BLOCK_P": 128, "BLOCK_Q": 32, "BLOCK_C": 128, "num_warps": 8, "num_stages": 2},
        {"BLOCK_P": 64, "BLOCK_Q": 32, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3},
    ],
    "fp32": [
        {"BLOCK_P": 128, "BLOCK_Q": 32, "BLOCK_C": 64, "num_warps": 8, "num_stages": 1},
        {"BLOCK_P": 64, "BLOCK_Q": 16, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1},
    ],
}
# The interpreter has no GPU timer to autotune with; small blocks keep the tests' ragged edges in play.
INTERPRET_CONFIG = {"BLOCK_P": 64, "BLOCK_Q": 16, "BLOCK_C": 16}


def bilinear_scale(in_size: int, out_size: int) -> float:
    """ATen's align_corners=False scale, in/out divided in float32 (as ATen's opmath for float and half inputs)."""
    return float(np.float32(in_size) / np.float32(out_size))


if triton is not None:

    @triton.jit
    def bilinear_taps(dst, in_size, out_size, scale):
        """Source rows (or columns) i0, i1 and weights l0, l1 of destination indices ``dst`` (int32 vector),
        PyTorch's align_corners=False rule (csrc/common/bilinear.h): src = max(scale*(dst+0.5)-0.5, 0),
        i0 = min(floor(src), in-1), i1 = i0 + (i0 < in-1), l1 = clamp(src-i0, 0, 1), l0 = 1-l1; when in == out,
        i0 = i1 = dst and l1 = 0 so a non-finite neighbour never leaks in through a zero weight."""
        src = scale * (dst.to(tl.float32) + 0.5) - 0.5
        src = tl.maximum(src, 0.0)
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
        l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        same = in_size == out_size
        i0 = tl.where(same, dst, i0)
        i1 = tl.where(same, dst, i1)
        l1 = tl.where(same, 0.0, l1)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _mask_classify_kernel(probs_ptr, masks_ptr, out_ptr, Q, K, h, w, Hout, Wout, scale_h, scale_w,
                              BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)  # image offsets can pass 2**31 elements (B * K * 640 * 640)
        HW = Hout * Wout
        pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_ok = pix < HW
        y0, y1, ly0, ly1 = bilinear_taps(pix // Wout, h, Hout, scale_h)
        x0, x1, lx0, lx1 = bilinear_taps(pix % Wout, w, Wout, scale_w)
        off00 = y0 * w + x0
        off01 = y0 * w + x1
        off10 = y1 * w + x0
        off11 = y1 * w + x1
        cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cls_ok = cls < K
        probs_b = probs_ptr + b * Q * K
        masks_b = masks_ptr + b * Q * h * w
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for q_start in range(0, Q, BLOCK_Q):
            q = q_start + tl.arange(0, BLOCK_Q)
            q_ok = q < Q
            # Rows of absent queries load as probability 0, so their (finite) sigmoid(0) columns add nothing.
            p = tl.load(probs_b + q[None, :] * K + cls[:, None], mask=cls_ok[:, None] & q_ok[None, :], other=0.0)
            rows = masks_b + q[:, None] * (h * w)
            ok = q_ok[:, None] & pix_ok[None, :]
            v00 = tl.load(rows + off00[None, :], mask=ok, other=0.0).to(tl.float32)
            v01 = tl.load(rows + off01[None, :], mask=ok, other=0.0).to(tl.float32)
            v10 = tl.load(rows + off10[None, :], mask=ok, other=0.0).to(tl.float32)
            v11 = tl.load(rows + off11[None, :], mask=ok, other=0.0).to(tl.float32)
            # ATen's evaluation order: l0y * (l0x a00 + l1x a01) + l1y * (l0x a10 + l1x a11).
            v = ly0[None, :] * (lx0[None, :] * v00 + lx1[None, :] * v01) \
                + ly1[None, :] * (lx0[None, :] * v10 + lx1[None, :] * v11)
            s = tl.sigmoid(v)
            # float32 inputs: exact fp32 FMA dot (as eager einsum without TF32); half inputs: the tensor cores with
            # the sigmoid rounded to the input dtype, as the eager path materializes it.
            acc = tl.dot(p, s.to(p.dtype), acc, input_precision="ieee")
        out = out_ptr + b * K * HW + cls[:, None] * HW + pix[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=cls_ok[:, None] & pix_ok[None, :])

    # One autotuner per dtype family, so float32 never tries (and never caches) a half config.
    _KEY = ["Q", "K", "h", "w", "Hout", "Wout"]
    _TUNED = {} if INTERPRET else {group: _common.autotune(configs, INTERPRET_CONFIG, _KEY)(_mask_classify_kernel)
                                   for group, configs in GPU_CONFIGS.items()}

    _SIGNATURE = {"probs_ptr": "*{dtype}", "masks_ptr": "*{dtype}", "out_ptr": "*{dtype}", "Q": "i32", "K": "i32",
                  "h": "i32", "w": "i32", "Hout": "i32", "Wout": "i32", "scale_h": "fp32", "scale_w": "fp32"}
    COMPILE_SPECS = [
        {"name": "mask_classify", "fn": _mask_classify_kernel, "signature": _SIGNATURE, "constexprs": {},
         "configs": GPU_CONFIGS["half"], "dtypes": ["fp16", "bf16"], "tensor_cores": True},
        {"name": "mask_classify", "fn": _mask_classify_kernel, "signature": _SIGNATURE, "constexprs": {},
         "configs": GPU_CONFIGS["fp32"], "dtypes": ["fp32"]},
    ]
else:
    COMPILE_SPECS = []


def reasons(class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size) -> list[str]:
    """Why the triton kernel cannot take these inputs (empty list: it can)."""
    found = _common.device_reasons(class_logits) + _common.interpreter_bf16_reasons(class_logits, "tl.dot results")
    if torch.is_grad_enabled() and (class_logits.requires_grad or mask_logits.requires_grad):
        found.append("forward only: inputs require grad")
    return found


def mask_classify(class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size) -> torch.Tensor:
    """Dispatcher entry: the ``segvit::triton_mask_classify`` custom op."""
    return torch.ops.segvit.triton_mask_classify(class_logits, mask_logits, [int(s) for s in out_size])


def _launch(class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size: list[int]) -> torch.Tensor:
    B, Q, K1 = class_logits.shape
    K = K1 - 1
    h, w = mask_logits.shape[-2:]
    Hout, Wout = out_size
    # Softmax once per (b, q) in float32; the kernel consumes probabilities in the input dtype (the dot's operand).
    probs = torch.softmax(class_logits.float(), dim=-1)[..., :K].to(class_logits.dtype).contiguous()
    masks = mask_logits.contiguous()
    out = _common.empty(B, K, Hout, Wout, dtype=class_logits.dtype, device=class_logits.device)
    if B == 0:
        return out
    args = (probs, masks, out, Q, K, h, w, Hout, Wout, bilinear_scale(h, Hout), bilinear_scale(w, Wout))
    if INTERPRET:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(Hout * Wout, cfg["BLOCK_P"]), triton.cdiv(K, cfg["BLOCK_C"]), B)
        _mask_classify_kernel[grid](*args, **cfg)
    else:
        def grid(meta):
            return triton.cdiv(Hout * Wout, meta["BLOCK_P"]), triton.cdiv(K, meta["BLOCK_C"]), B
        _TUNED["fp32" if class_logits.dtype == torch.float32 else "half"][grid](*args)
    return out


if triton is not None:

    @torch.library.custom_op("segvit::triton_mask_classify", mutates_args=())
    @_common.on_inputs_device
    def _triton_mask_classify(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                              out_size: list[int]) -> torch.Tensor:
        return _launch(class_logits, mask_logits, out_size)

    @_triton_mask_classify.register_fake
    def _(class_logits, mask_logits, out_size):
        B, _, K1 = class_logits.shape
        return class_logits.new_empty((B, K1 - 1, out_size[0], out_size[1]))
