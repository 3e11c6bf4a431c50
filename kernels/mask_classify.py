"""Triton kernel of ``mask_classify`` (forward only): bilinear upsampling, sigmoid and the class contraction fused.

    out[b, c, pix] = sum_q P[b, q, c] * sigmoid(bilinear(mask_logits[b, q])[pix]),   c < K,
    P[b, q] = softmax(class_logits[b, q]) over the K+1 columns, last ("no object") column dropped.

``bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)``. One program owns BLOCK_W output pixels of one
output row and all classes (two float32 accumulators BLOCK_C1 + BLOCK_C2 >= K, e.g. 128 + 32 for 150; K > 256 takes
class super-tiles), so the interpolation and sigmoid of each (query, pixel) are computed exactly once. It loops over
the queries in blocks of BLOCK_Q:

* half logits: the row's y taps are two scalars, so the tile is ``ly0 * (Wx @ M[y0]) + ly1 * (Wx @ M[y1])`` with
  M[y] the (FOOT x BLOCK_Q) low-resolution footprint of the chunk (loaded as small 2-D tiles) and Wx the chunk's
  (BLOCK_W x FOOT) x-weight matrix (2 non-zeros per row, built once per program, split as hi + lo in the logits'
  dtype so the products are exact): four small tensor-core products per block, whose float32 results stay in
  registers as the A operand of the class product. FOOT = 16 at 16x upsampling; downsampling or wide in == out rows
  (FOOT > FOOT_MAX) use the float32 path's gathers instead. A non-finite logit poisons its row of the chunk
  (0 * inf), where ATen only poisons its 2x2 neighbourhood.
* float32 logits: four gathers per (query, pixel) with int32 offsets (from L1), ATen's interpolation formula.

Then ``sigmoid = 1 / (1 + 2**(-v log2 e))`` (approximate ex2 / rcp) and ``acc += s @ P`` (tensor cores for half
inputs with s rounded to the input dtype, exact IEEE float32 FMA for float32). The (B, Q, Hout, Wout) upsampled masks
never exist. P is a zero-padded (B, QP, KP) tensor computed once by the launcher (softmax in float32), so its tiles
load unmasked as 16-byte vectors. The output is stored along the pixel axis in 16-byte vectors.
"""
from __future__ import annotations

import numpy as np
import torch

from segvit.kernels import _common
from segvit.kernels._common import INTERPRET, tl, triton

# Autotune spaces for A100 / H100 (sm_80 / sm_90). A program owns BLOCK_W pixels of one output row and all classes
# (up to 256, as two accumulators BLOCK_C1 + BLOCK_C2 chosen by the launcher from K: 150 -> 128 + 32, 171 -> 128 + 64,
# 60 -> 64), so the interpolation and sigmoid are computed once per (query, pixel). The class dot is
# (BLOCK_W x BLOCK_Q) @ (BLOCK_Q x BLOCK_C): pixels are its M dimension, split over the warps (BLOCK_W >= 16 per warp).
# float32 gathers its interpolation taps and runs the class dot on FMA units (exact IEEE), whose operand fragments
# hold all of BLOCK_Q in registers: BLOCK_Q = 8 (an FMA dot's minimum K) and num_stages=1 (BLOCK_Q = 16 spilled).
# Every config here is compiled by the compile report, which fails on spills.
GPU_CONFIGS = {
    "half": [
        {"BLOCK_W": 128, "BLOCK_Q": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_W": 64, "BLOCK_Q": 32, "num_warps": 4, "num_stages": 2},
    ],
    "fp32": [
        {"BLOCK_W": 64, "BLOCK_Q": 8, "num_warps": 8, "num_stages": 1},  # 4 warps spill at K = 150 on sm_90
        {"BLOCK_W": 128, "BLOCK_Q": 8, "num_warps": 8, "num_stages": 1},
    ],
}
# The interpreter has no GPU timer to autotune with; small blocks keep the tests' ragged edges in play (BLOCK_C is
# the interpreter's cap on each class accumulator: K > 32 takes several class super-tiles there).
INTERPRET_CONFIG = {"BLOCK_W": 16, "BLOCK_Q": 16}
INTERPRET_BLOCK_C = 16
GPU_BLOCK_C = 128  # largest class accumulator on a GPU
# The widest BLOCK_W of any config: the footprint FOOT is sized for it, which covers every narrower (aligned) chunk.
MAX_BLOCK_W = max(c["BLOCK_W"] for cs in GPU_CONFIGS.values() for c in cs)
MAX_BLOCK_Q = max(c["BLOCK_Q"] for cs in GPU_CONFIGS.values() for c in cs + [INTERPRET_CONFIG])  # probs' Q padding
# Half logits use the weight-matrix interpolation up to this footprint (at most 2 + BLOCK_W in / out columns:
# every upsampling), else (downsampling, large in == out rows) the four gathers of the float32 path.
FOOT_MAX = 32
# Published shape (ViT-L 640: 150 classes, 40x40 -> 640x640) for the compile report.
PUBLISHED_CONSTEXPRS = {"BLOCK_C1": 128, "BLOCK_C2": 32, "FOOT": 16, "SPLIT_W": False, "HW_BUCKET": 1 << 19}


def class_tiles(K: int, cap: int) -> tuple[int, int]:
    """The two class accumulators (BLOCK_C1, BLOCK_C2) of a program: powers of 2 >= 16 (BLOCK_C2 may be 0) covering
    min(K, 2 cap) classes with little padding; larger K takes ceil(K / (BLOCK_C1 + BLOCK_C2)) class super-tiles."""
    c1 = min(cap, _common.next_pow2(K))
    rest = K - c1
    c2 = 0 if rest <= 0 else min(cap, _common.next_pow2(rest))
    return c1, c2


def exact_weights(in_size: int, out_size: int) -> bool:
    """True when every x weight is exact in bfloat16 and float16: out = r * in with r a power of 2 <= 128 (src =
    (dst + 0.5) / r - 0.5 is then computed exactly in float32 and its fraction is a multiple of 1 / (2 r))."""
    r, rem = divmod(out_size, in_size)
    return rem == 0 and 1 <= r <= 128 and r & (r - 1) == 0


def footprint(in_size: int, out_size: int, block: int) -> int:
    """FOOT: a power of 2 >= 16 that holds every block-aligned chunk's source columns x0(first) .. x1(last), from
    the same float32 tap rule as the kernel plus one column of margin (the device may round src differently)."""
    if in_size == out_size:
        return _common.next_pow2(min(block, out_size))
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(np.float32(bilinear_scale(in_size, out_size)) * (dst + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = i0 + (i0 < in_size - 1)
    first = np.arange(0, out_size, block)
    last = np.minimum(first + block, out_size) - 1
    need = int((i1[last] - i0[first]).max()) + 2
    return _common.next_pow2(min(need, in_size))


def bilinear_scale(in_size: int, out_size: int) -> float:
    """ATen's align_corners=False scale, in/out divided in float32 (as ATen's opmath for float and half inputs)."""
    return float(np.float32(in_size) / np.float32(out_size))


if triton is not None:
    INTERPRET_JIT = tl.constexpr(INTERPRET)
    PAD_Q = tl.constexpr(MAX_BLOCK_Q)

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
    def _sigmoid_of_scaled(t):
        """1 / (1 + 2**t): sigmoid(v) for t = -v log2(e). On a GPU the approximate ex2 and rcp with flush-to-zero
        (2 MUFU ops, ~2 ulp in float32; the half path rounds the result to 8-11 bits); the interpreter computes it
        exactly."""
        if INTERPRET_JIT:
            return 1.0 / (1.0 + tl.exp2(t))
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
                "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _mask_classify_kernel(probs_ptr, masks_ptr, out_ptr, Q, K, h, w, Hout, Wout, scale_h, scale_w,
                              BLOCK_W: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C1: tl.constexpr,
                              BLOCK_C2: tl.constexpr, FOOT: tl.constexpr, SPLIT_W: tl.constexpr,
                              HW_BUCKET: tl.constexpr):
        # Program: BLOCK_W output pixels of one output row y (column chunk pid_x), BLOCK_C1 + BLOCK_C2 classes
        # (class super-tile pid_c; one covers K <= 256), image b. HW_BUCKET only keys the autotuner.
        n_x = tl.cdiv(Wout, BLOCK_W)
        pid_x = tl.program_id(0) % n_x
        pid_c = tl.program_id(0) // n_x
        y = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)  # image offsets can pass 2**31 elements (B * K * 640 * 640)
        HW = Hout * Wout
        hw = h * w
        # y taps: scalars of the program's row; x taps: one vector of the chunk's columns.
        y0, y1, ly0, ly1 = bilinear_taps(y, h, Hout, scale_h)
        ny0 = ly0 * -1.4426950408889634
        ny1 = ly1 * -1.4426950408889634
        col = pid_x * BLOCK_W + tl.arange(0, BLOCK_W)
        x0, x1, lx0, lx1 = bilinear_taps(col, w, Wout, scale_w)
        # Horizontal interpolation as a product with the chunk's (BLOCK_W x FOOT) weight matrix over the low-res
        # footprint columns xb .. xb+FOOT-1 (the launcher sizes FOOT so every tap of the chunk falls inside):
        # row c holds lx0 at column x0-xb and lx1 at x1-xb (their sum where x0 == x1).
        xb = tl.min(x0, axis=0)
        j = tl.arange(0, max(FOOT, 1))
        pix_ok = col < Wout
        off00 = y0 * w + x0  # float32 gathers: int32 offsets within an image's (Q, h, w) logits
        off01 = y0 * w + x1
        off10 = y1 * w + x0
        off11 = y1 * w + x1
        GATHER: tl.constexpr = FOOT == 0 or masks_ptr.dtype.element_ty == tl.float32
        if not GATHER:
            # Half logits: the product runs on the tensor cores with exact half x half products and float32 sums;
            # with SPLIT_W the weights are split as hi + lo in the logits' dtype so the result equals the
            # float32-weight interpolation to ~2**-17 relative; without (the launcher found every weight exact in
            # the dtype: power-of-2 upsampling, e.g. the k/32 weights of 16x) the lo products are skipped.
            wx = tl.where((x0 - xb)[:, None] == j[None, :], lx0[:, None], 0.0) \
                + tl.where((x1 - xb)[:, None] == j[None, :], lx1[:, None], 0.0)
            wx_hi = wx.to(masks_ptr.dtype.element_ty)
            wx_lo = (wx - wx_hi.to(tl.float32)).to(masks_ptr.dtype.element_ty)
        foot_ok = (xb + j) < w
        row0 = y0 * w + xb + j  # int32 offsets within an image's (Q, h, w) logits
        row1 = y1 * w + xb + j
        # probs: (B, QP, KP), zero-padded by the launcher to QP = Q rounded up to MAX_BLOCK_Q and KP = the class
        # super-tiles' total, so its tiles load unmasked.
        KP = tl.cdiv(K, BLOCK_C1 + BLOCK_C2) * (BLOCK_C1 + BLOCK_C2)
        QP = tl.cdiv(Q, PAD_Q) * PAD_Q
        probs_b = probs_ptr + b * QP * KP
        masks_b = masks_ptr + b * Q * hw
        c1 = pid_c * (BLOCK_C1 + BLOCK_C2) + tl.arange(0, BLOCK_C1)
        if BLOCK_C2 > 0:
            c2 = pid_c * (BLOCK_C1 + BLOCK_C2) + BLOCK_C1 + tl.arange(0, BLOCK_C2)
        acc1 = tl.zeros((BLOCK_W, BLOCK_C1), dtype=tl.float32)
        if BLOCK_C2 > 0:
            acc2 = tl.zeros((BLOCK_W, BLOCK_C2), dtype=tl.float32)
        for q_start in range(0, Q, BLOCK_Q):
            q = q_start + tl.arange(0, BLOCK_Q)
            q_ok = q < Q
            # (FOOT x BLOCK_Q) footprint tiles of the rows y0 and y1; absent queries and columns past w load 0.
            if GATHER:
                # float32 (and half logits with a footprint over FOOT_MAX, FOOT = 0): four gathers per (pixel,
                # query) from L1 (the weight matrix as an FMA-dot operand would not fit the registers next to the
                # FMA class dot).
                qo = q[None, :] * hw
                g_ok = q_ok[None, :] & pix_ok[:, None]
                h0 = lx0[:, None] * tl.load(masks_b + qo + off00[:, None], mask=g_ok, other=0.0) \
                    + lx1[:, None] * tl.load(masks_b + qo + off01[:, None], mask=g_ok, other=0.0)
                h1 = lx0[:, None] * tl.load(masks_b + qo + off10[:, None], mask=g_ok, other=0.0) \
                    + lx1[:, None] * tl.load(masks_b + qo + off11[:, None], mask=g_ok, other=0.0)
            else:
                m_ok = foot_ok[:, None] & q_ok[None, :]
                m0 = tl.load(masks_b + q[None, :] * hw + row0[:, None], mask=m_ok, other=0.0)
                m1 = tl.load(masks_b + q[None, :] * hw + row1[:, None], mask=m_ok, other=0.0)
                h0 = tl.dot(wx_hi, m0)
                h1 = tl.dot(wx_hi, m1)
                if SPLIT_W:
                    h0 = tl.dot(wx_lo, m0, h0)
                    h1 = tl.dot(wx_lo, m1, h1)
            # ATen's evaluation order: l0y * (l0x a00 + l1x a01) + l1y * (l0x a10 + l1x a11).
            # sigmoid(v) = 1 / (1 + 2**(-v log2 e)); the factor -log2 e is folded into the row weights.
            s = _sigmoid_of_scaled(ny0 * h0 + ny1 * h1)  # (BLOCK_W x BLOCK_Q)
            s = s.to(probs_ptr.dtype.element_ty)
            # Probabilities of absent queries and classes are the padding's zeros: their (finite) sigmoid columns
            # add nothing, and the tile loads need no mask (16-byte vectors: KP is a multiple of 16).
            p1 = tl.load(probs_b + q[:, None] * KP + c1[None, :])
            # float32 inputs: exact fp32 FMA dot (as eager einsum without TF32); half inputs: the tensor cores with
            # the sigmoid rounded to the input dtype, as the eager path materializes it.
            acc1 = tl.dot(s, p1, acc1, input_precision="ieee")
            if BLOCK_C2 > 0:
                p2 = tl.load(probs_b + q[:, None] * KP + c2[None, :])
                acc2 = tl.dot(s, p2, acc2, input_precision="ieee")
        pix = y * Wout + col
        out_b = out_ptr + b * K * HW
        tl.store(out_b + c1[None, :] * HW + pix[:, None], acc1.to(out_ptr.dtype.element_ty),
                 mask=pix_ok[:, None] & (c1 < K)[None, :])
        if BLOCK_C2 > 0:
            tl.store(out_b + c2[None, :] * HW + pix[:, None], acc2.to(out_ptr.dtype.element_ty),
                     mask=pix_ok[:, None] & (c2 < K)[None, :])

    # One autotuner per dtype family, so float32 never tries (and never caches) a half config.
    # Bucketed key: a new image size with the same next power of 2 of Hout * Wout reuses the tuned config.
    _KEY = ["Q", "K", "HW_BUCKET"]
    _TUNED = {} if INTERPRET else {group: _common.autotune(configs, INTERPRET_CONFIG, _KEY)(_mask_classify_kernel)
                                   for group, configs in GPU_CONFIGS.items()}

    _SIGNATURE = {"probs_ptr": "*{dtype}", "masks_ptr": "*{dtype}", "out_ptr": "*{dtype}", "Q": "i32", "K": "i32",
                  "h": "i32", "w": "i32", "Hout": "i32", "Wout": "i32", "scale_h": "fp32", "scale_w": "fp32"}
    COMPILE_SPECS = [
        {"name": "mask_classify", "fn": _mask_classify_kernel, "signature": _SIGNATURE,
         "constexprs": PUBLISHED_CONSTEXPRS,
         "configs": GPU_CONFIGS["half"], "dtypes": ["fp16", "bf16"], "tensor_cores": True},
        {"name": "mask_classify", "fn": _mask_classify_kernel, "signature": _SIGNATURE,
         "constexprs": PUBLISHED_CONSTEXPRS,
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
    probs = torch.softmax(class_logits.float(), dim=-1)[..., :K].to(class_logits.dtype)
    c1, c2 = class_tiles(K, INTERPRET_BLOCK_C if INTERPRET else GPU_BLOCK_C)
    n_c = triton.cdiv(K, c1 + c2)
    # Zero-padded to (B, QP, KP), the layout the kernel indexes (see there): unmasked, aligned tile loads.
    probs = torch.nn.functional.pad(probs, (0, n_c * (c1 + c2) - K, 0, triton.cdiv(Q, MAX_BLOCK_Q) * MAX_BLOCK_Q - Q))
    masks = mask_logits.contiguous()
    out = _common.empty(B, K, Hout, Wout, dtype=class_logits.dtype, device=class_logits.device)
    if B == 0:
        return out
    args = (probs, masks, out, Q, K, h, w, Hout, Wout, bilinear_scale(h, Hout), bilinear_scale(w, Wout))
    block_w = INTERPRET_CONFIG["BLOCK_W"] if INTERPRET else MAX_BLOCK_W
    foot = footprint(w, Wout, block_w)
    meta = {"BLOCK_C1": c1, "BLOCK_C2": c2, "FOOT": foot if foot <= FOOT_MAX else 0,
            "SPLIT_W": not exact_weights(w, Wout),
            "HW_BUCKET": _common.next_pow2(Hout * Wout)}
    if INTERPRET:
        grid = (triton.cdiv(Wout, INTERPRET_CONFIG["BLOCK_W"]) * n_c, Hout, B)
        _mask_classify_kernel[grid](*args, **meta, **INTERPRET_CONFIG)
    else:
        def grid(cfg):
            return triton.cdiv(Wout, cfg["BLOCK_W"]) * n_c, Hout, B
        _TUNED["fp32" if class_logits.dtype == torch.float32 else "half"][grid](*args, **meta)
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


# Loop trip counts per program for the static cost model (benchmarks/estimate.py): one loop over query blocks.
LOOP_TRIPS = {"_mask_classify_kernel": lambda a: [-(-a["Q"] // a["BLOCK_Q"])]}
