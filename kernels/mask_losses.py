"""Triton kernels of ``mask_losses``: sigmoid focal and dice losses of the present classes, forward and backward.

For every (b, c) with class c present in labels[b] (ignore_index excluded), over the Hl x Wl label pixels::

    p = bilinear(mask_logits[b, c], (Hl, Wl), align_corners=False),  t = (labels[b] == c),  s = sigmoid(p)
    ce = softplus(p) - p t,  q = 1 - p_t = (s if t = 0 else 1 - s),  a_t = (alpha if t else 1 - alpha) (1 if alpha < 0)
    focal(b, c) = mean(a_t ce q^gamma),   dice(b, c) = 1 - (2 I + 1) / (S + T + 1),  I = sum s t, S = sum s, T = sum t
    loss_focal = sum focal / num_masks,   loss_dice = sum dice / num_masks,   num_masks = max(#pairs, 1)

Per pixel everything is a function of z = (1 - 2 t) p (z = p for a negative, -p for a target): q = sigmoid(z),
ce = softplus(z) = max(z, 0) + log(1 + e), e = exp(-|p|). The kernels compute in base 2 with the fast
special-function forms: e = exp2(-|p| log2 e) (ex2.approx), r = 1 / (1 + e) (div.approx), lg = log2(1 + e)
(lg2.approx), then s = r or e r by the sign of p, q = r or e r by the sign of z, ce / ln 2 = max(z, 0) log2 e + lg,
and q^gamma is q q for gamma = 2 (a ``tl.constexpr``; other gammas use exp2(-gamma (lg + max(-z, 0) log2 e)), which
needs no second logarithm). The ln 2 of the focal sum is applied once per pair. The interpreter uses the exact
``tl.math.log2`` and ``/`` instead (no libdevice there).

No host synchronisation, and no torch op beyond allocations and one zero fill per pass. A histogram kernel counts
the labels of each (image, class) (T, and presence = T > 0; integer atomics, so exact in any order), and a
single-program kernel compacts the present pairs with block prefix sums into a permutation ``order`` of the B K
(image, class) indices b K + c, present pairs first in (b, c) order, plus per-image start offsets; the kernels read
the number of pairs from that device buffer, so the grids are fixed by the shapes alone.

Forward: grid (pixel tiles, B). A program loads its tile of labels once (narrowed to int32, -1 for anything that is
not a class), computes the interpolation taps and weights once (taps shifted at the last row / column so the second
tap is always the first + 1: the neighbours sit at constant offsets from one base offset), and loops over the
present classes of its image: four gathers of the class's logits (they stay in L1/L2), the pixel terms, and one
three-value reduction (focal, I, S) per class, written to a (B K, tiles, 3) buffer by pair index. Pixels past the
end of the image get a -1e30 bias on their logit, which makes every one of their terms exactly zero. A second small
kernel sums each pair's tiles in a fixed order and writes the (B, K, 4) stats [focal sum, I, S, T] of every (b, c)
(zeros for absent pairs); a single-program kernel reduces them to the two losses and num_masks. The (pairs, Hl, Wl) upsampled logits
and one-hot targets never exist.

Backward, per pixel (sigma = -1 if t else +1)::

    d focal_pixel / dp = sigma a_t q^gamma (q + gamma (1 - q) ce)
    d dice / dp        = (-2 t / D + (2 I + 1) / D^2) s (1 - s),   D = S + T + 1,   s (1 - s) = q (1 - q)

scaled by the incoming gradients / num_masks (and 1 / (Hl Wl) for the focal mean) into four per-pair coefficients
(computed in the kernel from the saved stats and the device scalars), then moved to the low-resolution grid through the transposed
bilinear weights: grad[b, c] = Wy^T G Wx with G the (Hl, Wl) pixel gradient and Wy (Hl, h), Wx (Wl, w) the
interpolation matrices (two non-zeros per row). Deterministic by ownership, no atomics: a work item is one
own_i x own_j block of low-resolution cells of one present pair (own <= BLOCK_I, BLOCK_J, chosen by the host from
the sizes so the block's high-resolution footprint fills whole tiles: at 16x, 14-15 cells map to 240-256 rows);
a persistent grid walks the (pairs x blocks) items, the number of pairs read on the device. An item visits exactly
the high-resolution rows and columns whose taps reach its block, computed in the kernel from the closed-form tap
rule (an estimate refined on 8 candidates with the kernel's own rule, widened by one as a guard), recomputes G
there and accumulates Wy_tile^T (G_tile Wx_tile) with two ``tl.dot`` in a fixed loop order. Pixels on a block
border are recomputed by the two or four items that share them, the price of needing no second pass.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from segvit.kernels import _common
from segvit.kernels._common import INTERPRET, tl, triton
from segvit.kernels.mask_classify import bilinear_scale


# A100 / H100. Forward: one pixel tile per program, labels and taps computed once per image tile, 8 pixels per
# thread so the per-class three-value reduction is amortized; 640x640 labels give 200 tiles per image.
# One BLOCK_P for every forward config: the partial-sum buffer is (pairs, tiles, 3), so the tile count must not
# depend on the config the autotuner picks.
# (4 warps, 16 pixels per thread, spills on sm_80 since the forward follows eager at infinite logits: 255
# registers, 144 B of spill stores, hence 8 warps only.)
FWD_CONFIGS = [
    {"BLOCK_P": 2048, "num_warps": 8, "num_stages": 1},
]
# Backward: a 16 x 16 low-resolution accumulator per work item, BLOCK_Y x BLOCK_X high-resolution tiles (every
# config must share the block and tile shapes: the host picks the owned block size (own_i, own_j) for them).
# 64 x 32 with 8 warps: ~72 SASS instructions per pixel-pair; with 4 warps it is ~68 but spills on sm_90 (255
# registers), and 32 x 32 tiles cost ~79.
BWD_CONFIGS = [
    {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_Y": 64, "BLOCK_X": 32, "num_warps": 8, "num_stages": 1},
]
SUM_CONFIGS = [{"BLOCK_R": 16, "BLOCK_T": 64, "num_warps": 4, "num_stages": 1}]
# The backward's two contractions: float32 operands on tensor cores, each split into two tf32 halves (3 MMAs,
# about float32 accuracy: relative error ~1e-6 against ~1e-4 for plain tf32).
DOT_PRECISION = "ieee"
INTERPRET_FWD = {"BLOCK_P": 128}
INTERPRET_BWD = {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_Y": 16, "BLOCK_X": 32}
INTERPRET_SUM = {"BLOCK_R": 16, "BLOCK_T": 16}
# Label histogram: pixels per program; the single-program kernels (compaction, final losses): elements per step.
COUNT_BLOCK = 4096
ONE_PROGRAM_BLOCK = 1024
INTERPRET_COUNT_BLOCK = 64
INTERPRET_ONE_PROGRAM_BLOCK = 16
# Persistent backward grid: programs per SM (the grid is capped by the number of work items the shapes allow).
BWD_PROGRAMS_PER_SM = 4
DEFAULT_SMS = 108  # A100, for launches without a CUDA device (compile-only runs, the interpreter)


if triton is not None:
    from segvit.kernels.mask_classify import bilinear_taps

    if INTERPRET:
        @triton.jit
        def _log2(x):
            return tl.math.log2(x)

        @triton.jit
        def _rcp(x):
            return 1.0 / x
    else:
        from triton.language.extra import libdevice

        @triton.jit
        def _log2(x):
            return libdevice.fast_log2f(x)  # lg2.approx.ftz.f32: one MUFU.LG2

        @triton.jit
        def _rcp(x):
            return libdevice.fast_dividef(1.0, x)  # div.approx.ftz.f32: one MUFU.RCP (x in [1, 2] here)

    @triton.jit
    def _lerp_taps(dst, in_size, out_size, scale):
        """First source index i0 and weights (l0, l1) of i0 and i0 + 1 (PyTorch's align_corners=False rule, see
        ``bilinear_taps``), with the last source index (where both taps are in - 1) taken as (in - 2, in - 1) with
        weights (0, 1), so the second tap is always i0 + 1 when in_size > 1 (i0 alone when in_size == 1)."""
        i0, i1, l0, l1 = bilinear_taps(dst, in_size, out_size, scale)
        last = (i0 == in_size - 1) & (in_size > 1)
        return tl.where(last, in_size - 2, i0), tl.where(last, 0.0, l0), tl.where(last, 1.0, l1)

    @triton.jit
    def _dst_range(i_s, i_e, in_size, out_size, scale, inv):
        """Inclusive destination range [lo, hi] whose taps reach source indices [i_s, i_e]: the taps are (i0, i0 + 1)
        with i0 monotone in the destination, so the range is {dst: i_s - 1 <= i0(dst) <= i_e}. The closed form
        dst = (m + 0.5) / scale - 0.5 gives an estimate, refined exactly on 8 candidates with the kernel's own tap
        rule, then widened by one on each side as a guard."""
        k = tl.arange(0, 8) - 3
        lo_c = tl.minimum(tl.maximum(((i_s - 0.5) * inv - 0.5).to(tl.int32) + k, 0), out_size - 1)
        hi_c = tl.minimum(tl.maximum(((i_e + 1.5) * inv - 0.5).to(tl.int32) - 1 + k, 0), out_size - 1)
        lo_i0, _, _, _ = bilinear_taps(lo_c, in_size, out_size, scale)
        hi_i0, _, _, _ = bilinear_taps(hi_c, in_size, out_size, scale)
        lo = tl.min(tl.where(lo_i0 >= i_s - 1, lo_c, out_size), axis=0)
        hi = tl.max(tl.where(hi_i0 <= i_e, hi_c, -1), axis=0)
        same = in_size == out_size  # i0 = dst: exactly [i_s, i_e]
        return tl.where(same, i_s, tl.maximum(lo - 1, 0)), tl.where(same, i_e, tl.minimum(hi + 1, out_size - 1))

    @triton.jit
    def _pixel_terms(p, t, GAMMA: tl.constexpr):
        """s = sigmoid(p), q = sigmoid(z), 1 - q, ce / ln 2 = softplus(z) / ln 2 and q^GAMMA, z = -p if t else p."""
        n = tl.abs(p) * 1.4426950408889634  # |p| log2 e = |z| log2 e
        e = tl.math.exp2(-n)
        d = 1.0 + e
        r = _rcp(d)
        er = e * r
        lg = _log2(d)
        pos = p >= 0
        zpos = pos != t
        s = tl.where(pos, r, er)
        q = tl.where(zpos, r, er)
        omq = tl.where(zpos, er, r)
        ce2 = tl.where(zpos, n, 0.0) + lg
        if GAMMA == 2.0:
            qg = q * q
        elif GAMMA == 1.0:
            qg = q
        elif GAMMA == 0.0:
            qg = tl.full(q.shape, 1.0, tl.float32)
        else:
            # log2 q = -(lg + max(-z, 0) log2 e): q^gamma without a second logarithm
            qg = tl.math.exp2(-GAMMA * (lg + tl.where(zpos, 0.0, n)))
        return s, q, omq, ce2, qg

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _mask_losses_count_kernel(labels_ptr, counts_ptr, HW, K, ignore_index, BLOCK: tl.constexpr,
                                  BINS: tl.constexpr):
        """counts[b, c] += pixels of class c in this tile of labels[b] (c = K: ignore_index and anything outside
        [0, K)). Integer atomics: the sums do not depend on the order."""
        b = tl.program_id(1)
        pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = pix < HW
        v = tl.load(labels_ptr + b.to(tl.int64) * HW + pix, mask=ok, other=0)
        v = tl.where((v == ignore_index) | (v < 0) | (v >= K), K, v).to(tl.int32)
        hist = tl.histogram(v, BINS, mask=ok)
        bins = tl.arange(0, BINS)
        tl.atomic_add(counts_ptr + b * (K + 1) + bins, hist, mask=(bins <= K) & (hist > 0))

    @triton.jit
    def _mask_losses_compact_kernel(present_ptr, order_ptr, starts_ptr, B, K, stride_b, stride_c,
                                    BLOCK: tl.constexpr):
        """One program: (b, c) is present iff present[b, c] > 0 (class counts, or T of the stats). Writes ``order``,
        the B K flat indices b K + c with the present ones first, both groups in (b, c) order, and ``starts``
        (B + 1): starts[b] = present pairs of the images before b (starts[B] = all of them)."""
        n = B * K
        total = 0
        for start in range(0, n, BLOCK):
            flat = start + tl.arange(0, BLOCK)
            ok = flat < n
            bb = flat // K
            hit = tl.load(present_ptr + bb * stride_b + (flat - bb * K) * stride_c, mask=ok, other=0) > 0
            total += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(starts_ptr, 0)
        seen_hit = 0
        seen_miss = 0
        for start in range(0, n, BLOCK):
            flat = start + tl.arange(0, BLOCK)
            ok = flat < n
            bb = flat // K
            cc = flat - bb * K
            hit = tl.load(present_ptr + bb * stride_b + cc * stride_c, mask=ok, other=0) > 0
            hits = tl.cumsum(hit.to(tl.int32), axis=0) + seen_hit
            misses = tl.cumsum((ok & ~hit).to(tl.int32), axis=0) + seen_miss
            tl.store(order_ptr + tl.where(hit, hits - 1, total + misses - 1), flat, mask=ok)
            tl.store(starts_ptr + bb + 1, hits, mask=ok & (cc == K - 1))
            seen_hit += tl.sum(hit.to(tl.int32), axis=0)
            seen_miss += tl.sum((ok & ~hit).to(tl.int32), axis=0)

    @triton.jit
    def _mask_losses_finish_kernel(stats_ptr, focal_ptr, dice_ptr, num_ptr, n, inv_pixels, BLOCK: tl.constexpr):
        """One program: loss_focal = sum focal / (Hl Wl) / num_masks, loss_dice = sum over present pairs of
        1 - (2 I + 1) / (S + T + 1), over num_masks = max(#present, 1), from the (B K, 4) stats."""
        focal = tl.zeros((BLOCK,), tl.float32)
        dice = tl.zeros((BLOCK,), tl.float32)
        count = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, n, BLOCK):
            row = start + tl.arange(0, BLOCK)
            ok = row < n
            f = tl.load(stats_ptr + row * 4 + 0, mask=ok, other=0.0)
            inter = tl.load(stats_ptr + row * 4 + 1, mask=ok, other=0.0)
            sig = tl.load(stats_ptr + row * 4 + 2, mask=ok, other=0.0)
            tgt = tl.load(stats_ptr + row * 4 + 3, mask=ok, other=0.0)
            present = tgt > 0
            focal += f
            dice += tl.where(present, 1.0 - (2.0 * inter + 1.0) / (sig + tgt + 1.0), 0.0)
            count += present.to(tl.int32)
        num = tl.maximum(tl.sum(count, axis=0), 1)
        tl.store(num_ptr, num.to(tl.int64))
        tl.store(focal_ptr, tl.sum(focal, axis=0) * inv_pixels / num.to(tl.float32))
        tl.store(dice_ptr, tl.sum(dice, axis=0) / num.to(tl.float32))

    # ``tune_key`` (unused by the code) is the autotune key: bucketed sizes, not specialized on.
    @triton.jit(do_not_specialize=["tune_key"])
    def _mask_losses_fwd_kernel(logits_ptr, labels_ptr, order_ptr, starts_ptr, partial_ptr,
                                K, h, w, Hl, Wl, scale_h, scale_w, a_pos, a_neg, num_tiles, tune_key,
                                GAMMA: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr):
        tile = tl.program_id(0)
        b = tl.program_id(1)
        HW = Hl * Wl
        pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = pix < HW
        pix = tl.minimum(pix, HW - 1)
        yy = pix // Wl
        xx = pix - yy * Wl
        # Loads at (y0, y0 + 1) x (x0, x0 + 1) (``_lerp_taps``: immediate offsets), weighted as ATen's taps (i0, i1,
        # l0, l1) of ``bilinear_taps``: where ATen's two taps are the same element (the last index, or in == out) both
        # weights go to it, so a non-finite neighbour never enters through a zero weight ATen does not have (0 * inf
        # would make the pixel NaN where eager's is finite).
        y0, _, _ = _lerp_taps(yy, h, Hl, scale_h)
        x0, _, _ = _lerp_taps(xx, w, Wl, scale_w)
        ty0, ty1, ly0, ly1 = bilinear_taps(yy, h, Hl, scale_h)
        tx0, tx1, lx0, lx1 = bilinear_taps(xx, w, Wl, scale_w)
        a_x0 = tx0 == x0  # ATen's first x tap is the first load, else the second (x0 + 1)
        a_x1 = tx1 == x0
        a_y0 = ty0 == y0
        a_y1 = ty1 == y0
        o00 = y0 * w + x0
        labels = tl.load(labels_ptr + b.to(tl.int64) * HW + pix)
        labels = tl.where(ok & (labels >= 0) & (labels < K), labels, -1).to(tl.int32)
        dy = tl.minimum(h - 1, 1) * w
        first = tl.load(starts_ptr + b)
        last = tl.load(starts_ptr + b + 1)
        for pair in range(first, last):
            flat = tl.load(order_ptr + pair)  # b * K + c
            c = flat - b * K
            ptr0 = logits_ptr + flat.to(tl.int64) * (h * w) + o00
            ptr1 = ptr0 + dy
            v00 = tl.load(ptr0).to(tl.float32)
            v01 = tl.load(ptr0 + WIDE).to(tl.float32)  # WIDE = (w > 1): an immediate offset
            v10 = tl.load(ptr1).to(tl.float32)
            v11 = tl.load(ptr1 + WIDE).to(tl.float32)
            top = lx0 * tl.where(a_x0, v00, v01) + lx1 * tl.where(a_x1, v00, v01)  # row y0
            bottom = lx0 * tl.where(a_x0, v10, v11) + lx1 * tl.where(a_x1, v10, v11)  # row y0 + 1
            p = ly0 * tl.where(a_y0, top, bottom) + ly1 * tl.where(a_y1, top, bottom)
            p = tl.where(ok, p, -1e30)  # pixels past the end: every term exactly 0 (whatever the clamped loads)
            t = labels == c
            s, q, omq, ce2, qg = _pixel_terms(p, t, GAMMA)
            focal = tl.where(t, a_pos, a_neg) * qg * ce2
            # Eager's BCEWithLogits at an infinite logit: NaN, except +inf on a negative (inf; see
            # csrc/common/mask_loss_math.h, eager_focal_is_nan).
            focal = tl.where((p == float("-inf")) | (t & (p == float("inf"))), float("nan"), focal)
            f, i, s_sum = tl.reduce((focal, tl.where(t, s, 0.0), s), 0, _add3)
            out = partial_ptr + (pair * num_tiles + tile) * 3  # int32: B K tiles 3 << 2**31
            tl.store(out + 0, f)
            tl.store(out + 1, i)
            tl.store(out + 2, s_sum)

    @triton.jit
    def _mask_losses_sum_kernel(partial_ptr, order_ptr, starts_ptr, counts_ptr, stats_ptr, B, K, num_tiles,
                                BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        """stats[b, c] = [ln 2 sum focal, I, S, T] for every (b, c): pair rows summed over tiles in a fixed order;
        rows past the number of pairs (absent (b, c)) read nothing and write zeros (T = 0 there)."""
        num_pairs = tl.load(starts_ptr + B)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = rows < B * K
        valid = rows < num_pairs
        acc_f = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        for t0 in range(0, num_tiles, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            m = valid[:, None] & (tt[None, :] < num_tiles)
            ptr = partial_ptr + (rows[:, None] * num_tiles + tt[None, :]) * 3
            acc_f += tl.load(ptr + 0, mask=m, other=0.0)
            acc_i += tl.load(ptr + 1, mask=m, other=0.0)
            acc_s += tl.load(ptr + 2, mask=m, other=0.0)
        flat = tl.load(order_ptr + rows, mask=in_range, other=0)
        bb = flat // K
        cnt = tl.load(counts_ptr + flat + bb, mask=in_range, other=0).to(tl.float32)  # counts is (B, K + 1)
        out = stats_ptr + flat * 4
        tl.store(out + 0, tl.sum(acc_f, axis=1) * 0.6931471805599453, mask=in_range)
        tl.store(out + 1, tl.sum(acc_i, axis=1), mask=in_range)
        tl.store(out + 2, tl.sum(acc_s, axis=1), mask=in_range)
        tl.store(out + 3, cnt, mask=in_range)

    @triton.jit(do_not_specialize=["tune_key"])
    def _mask_losses_bwd_kernel(logits_ptr, labels_ptr, order_ptr, starts_ptr, stats_ptr, grad_focal_ptr,
                                grad_dice_ptr, num_masks_ptr, grad_ptr, a_pos, a_neg, n_pixels,
                                B, K, h, w, Hl, Wl, scale_h, scale_w, inv_h, inv_w, own_i, own_j, nbi, nbj, tune_key,
                                GAMMA: tl.constexpr, WIDE: tl.constexpr, DOT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                                BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
        num_pairs = tl.load(starts_ptr + B)
        nblk = nbi * nbj
        dy = tl.minimum(h - 1, 1) * w
        gamma_ln2 = GAMMA * 0.6931471805599453
        # The incoming gradients, scaled: d/dp of focal_mean / num_masks and of dice / num_masks.
        num = tl.load(num_masks_ptr).to(tl.float32)
        g_focal = tl.load(grad_focal_ptr).to(tl.float32) / (num * n_pixels)
        g_dice = tl.load(grad_dice_ptr).to(tl.float32) / num
        for item in range(tl.program_id(0), num_pairs * nblk, tl.num_programs(0)):
            pair = item // nblk
            blk = item - pair * nblk
            bi = blk // nbj
            bj = blk - bi * nbj
            flat = tl.load(order_ptr + pair)
            b = flat // K
            c = flat - b * K
            # (signed, scaled) focal weight of a target / a negative, dice coefficient of a target / a negative
            inter = tl.load(stats_ptr + flat * 4 + 1)
            denom = tl.load(stats_ptr + flat * 4 + 2) + tl.load(stats_ptr + flat * 4 + 3) + 1.0
            f_t = -a_pos * g_focal
            f_n = a_neg * g_focal
            d_n = g_dice * (2.0 * inter + 1.0) / (denom * denom)
            d_t = d_n - 2.0 * g_dice / denom
            i_s = bi * own_i
            i_e = tl.minimum(i_s + own_i, h) - 1
            j_s = bj * own_j
            j_e = tl.minimum(j_s + own_j, w) - 1
            y_lo, y_hi = _dst_range(i_s, i_e, h, Hl, scale_h, inv_h)
            x_lo, x_hi = _dst_range(j_s, j_e, w, Wl, scale_w, inv_w)
            ii = i_s + tl.arange(0, BLOCK_I)
            jj = j_s + tl.arange(0, BLOCK_J)
            i_ok = ii <= i_e
            j_ok = jj <= j_e
            base = logits_ptr + flat.to(tl.int64) * (h * w)
            labels_b = labels_ptr + b.to(tl.int64) * (Hl * Wl)
            acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            for y_start in range(y_lo, y_hi + 1, BLOCK_Y):
                y = y_start + tl.arange(0, BLOCK_Y)
                y_ok = y <= y_hi
                y = tl.minimum(y, y_hi)  # clamped rows: valid loads, zero weight below
                y0, ly0, ly1 = _lerp_taps(y, h, Hl, scale_h)
                row0 = base + y0 * w
                labels_y = labels_b + y * Wl
                # G Wx of this row tile, over the whole column range; Wy^T once per row tile after it.
                cols = tl.zeros((BLOCK_Y, BLOCK_J), dtype=tl.float32)
                for x_start in range(x_lo, x_hi + 1, BLOCK_X):
                    x = x_start + tl.arange(0, BLOCK_X)
                    x_ok = x <= x_hi
                    x = tl.minimum(x, x_hi)
                    # Column weights onto this block's low-resolution columns (ATen's rule: i0 == i1 at the last
                    # column gets both weights).
                    c0, c1, cl0, cl1 = bilinear_taps(x, w, Wl, scale_w)
                    wx = tl.where(c0[:, None] == jj[None, :], cl0[:, None], 0.0) \
                        + tl.where(c1[:, None] == jj[None, :], cl1[:, None], 0.0)
                    wx = tl.where(x_ok[:, None] & j_ok[None, :], wx, 0.0)
                    x0, lx0, lx1 = _lerp_taps(x, w, Wl, scale_w)
                    ptr0 = row0[:, None] + x0[None, :]
                    ptr1 = ptr0 + dy
                    v00 = tl.load(ptr0).to(tl.float32)
                    v01 = tl.load(ptr0 + WIDE).to(tl.float32)
                    v10 = tl.load(ptr1).to(tl.float32)
                    v11 = tl.load(ptr1 + WIDE).to(tl.float32)
                    p = ly0[:, None] * (lx0[None, :] * v00 + lx1[None, :] * v01) \
                        + ly1[:, None] * (lx0[None, :] * v10 + lx1[None, :] * v11)
                    t = tl.load(labels_y[:, None] + x[None, :]) == c
                    s, q, omq, ce2, qg = _pixel_terms(p, t, GAMMA)
                    g = tl.where(t, f_t, f_n) * qg * (q + gamma_ln2 * (omq * ce2)) + tl.where(t, d_t, d_n) * (q * omq)
                    cols = tl.dot(g, wx, cols, input_precision=DOT)  # (BLOCK_Y, BLOCK_J)
                # Row weights (ATen's rule at the last row as for the columns).
                r0, r1, rl0, rl1 = bilinear_taps(y, h, Hl, scale_h)
                wy = tl.where(r0[:, None] == ii[None, :], rl0[:, None], 0.0) \
                    + tl.where(r1[:, None] == ii[None, :], rl1[:, None], 0.0)
                wy = tl.where(y_ok[:, None] & i_ok[None, :], wy, 0.0)
                acc = tl.dot(tl.trans(wy), cols, acc, input_precision=DOT)
            out = grad_ptr + flat.to(tl.int64) * (h * w) + ii[:, None] * w + jj[None, :]
            tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])

    # Autotune key: ``tune_key`` = the label and logit pixel counts bucketed to powers of two (a new image size in a
    # bucket reuses the choice), with the logits' dtype (the autotuner adds the argument dtypes).
    _fwd = _common.autotune(FWD_CONFIGS, INTERPRET_FWD, ["tune_key"])(_mask_losses_fwd_kernel)
    _bwd = _common.autotune(BWD_CONFIGS, INTERPRET_BWD, ["tune_key"])(_mask_losses_bwd_kernel)

    _SIZES = {"K": "i32", "h": "i32", "w": "i32", "Hl": "i32", "Wl": "i32", "scale_h": "fp32", "scale_w": "fp32"}
    COMPILE_SPECS = [
        {"name": "mask_losses.fwd", "fn": _mask_losses_fwd_kernel,
         "signature": {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "order_ptr": "*i32", "starts_ptr": "*i32",
                       "partial_ptr": "*fp32", **_SIZES, "a_pos": "fp32", "a_neg": "fp32", "num_tiles": "i32",
                       "tune_key": "i32"},
         "constexprs": {"GAMMA": 2.0, "WIDE": 1}, "configs": FWD_CONFIGS, "dtypes": ["fp32", "fp16", "bf16"]},
        {"name": "mask_losses.sum", "fn": _mask_losses_sum_kernel,
         "signature": {"partial_ptr": "*fp32", "order_ptr": "*i32", "starts_ptr": "*i32", "counts_ptr": "*i32",
                       "stats_ptr": "*fp32", "B": "i32", "K": "i32", "num_tiles": "i32"},
         "constexprs": {}, "configs": SUM_CONFIGS, "dtypes": ["fp32"]},
        {"name": "mask_losses.count", "fn": _mask_losses_count_kernel,
         "signature": {"labels_ptr": "*i64", "counts_ptr": "*i32", "HW": "i32", "K": "i32", "ignore_index": "i32"},
         "constexprs": {"BINS": 256}, "configs": [{"BLOCK": COUNT_BLOCK, "num_warps": 4, "num_stages": 1}],
         "dtypes": ["fp32"]},
        {"name": "mask_losses.compact", "fn": _mask_losses_compact_kernel,
         "signature": {"present_ptr": "*i32", "order_ptr": "*i32", "starts_ptr": "*i32", "B": "i32", "K": "i32",
                       "stride_b": "i32", "stride_c": "i32"},
         "constexprs": {}, "configs": [{"BLOCK": ONE_PROGRAM_BLOCK, "num_warps": 4, "num_stages": 1}],
         "dtypes": ["fp32"]},
        {"name": "mask_losses.finish", "fn": _mask_losses_finish_kernel,
         "signature": {"stats_ptr": "*fp32", "focal_ptr": "*fp32", "dice_ptr": "*fp32", "num_ptr": "*i64", "n": "i32",
                       "inv_pixels": "fp32"},
         "constexprs": {}, "configs": [{"BLOCK": ONE_PROGRAM_BLOCK, "num_warps": 4, "num_stages": 1}],
         "dtypes": ["fp32"]},
        {"name": "mask_losses.bwd", "fn": _mask_losses_bwd_kernel,
         "signature": {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "order_ptr": "*i32", "starts_ptr": "*i32",
                       "stats_ptr": "*fp32", "grad_focal_ptr": "*fp32", "grad_dice_ptr": "*fp32",
                       "num_masks_ptr": "*i64", "grad_ptr": "*{dtype}", "a_pos": "fp32", "a_neg": "fp32",
                       "n_pixels": "fp32", "B": "i32", **_SIZES, "inv_h": "fp32",
                       "inv_w": "fp32", "own_i": "i32", "own_j": "i32", "nbi": "i32", "nbj": "i32",
                       "tune_key": "i32"},
         "constexprs": {"GAMMA": 2.0, "WIDE": 1, "DOT": DOT_PRECISION}, "configs": BWD_CONFIGS, "dtypes": ["fp32", "fp16", "bf16"]},
    ]
else:
    COMPILE_SPECS = []


def reasons(mask_logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> list[str]:
    """Why the triton kernels cannot take these inputs (empty list: they can)."""
    return _common.device_reasons(mask_logits) + _common.interpreter_bf16_reasons(mask_logits, "reductions")


def mask_losses(mask_logits, labels, *, ignore_index=255, alpha=0.25, gamma=2.0):
    """Dispatcher entry: the ``segvit::triton_mask_losses`` custom op (its autograd runs the backward kernel).
    No host synchronisation: ``num_masks`` is a device tensor, every grid depends on the shapes only."""
    loss_focal, loss_dice, num_masks, _ = torch.ops.segvit.triton_mask_losses(
        mask_logits, labels, int(ignore_index), float(alpha), float(gamma))
    return loss_focal, loss_dice, num_masks


def _labels(labels: torch.Tensor) -> torch.Tensor:
    # The kernels compare labels with a class id in their own integer type; narrow types are widened once here.
    return labels.contiguous() if labels.dtype in (torch.int64, torch.int32) else labels.to(torch.int32).contiguous()


def _tune_key(n_labels: int, n_logits: int) -> int:
    """Autotune bucket of the sizes: log2 of the pixel counts rounded up to powers of two."""
    return (max(n_labels - 1, 0).bit_length() << 8) | max(n_logits - 1, 0).bit_length()


def _alphas(alpha: float) -> tuple[float, float]:
    """(a_t of a target, a_t of a negative)."""
    return (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)


def _class_counts(labels: torch.Tensor, K: int, ignore_index: int) -> torch.Tensor:
    """(B, K + 1) int32 pixel count of every class in every image, on the device (ignore_index and anything outside
    [0, K) counted in the extra last column): one pass over the labels."""
    B = labels.shape[0]
    HW = labels[0].numel()
    counts = torch.zeros(B, K + 1, dtype=torch.int32, device=labels.device)
    block = INTERPRET_COUNT_BLOCK if INTERPRET else COUNT_BLOCK
    _mask_losses_count_kernel[(triton.cdiv(HW, block), B)](labels, counts, HW, K, int(ignore_index), BLOCK=block,
                                                            BINS=_common.next_pow2(K + 1), num_warps=4)
    return counts


def _compact(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``order``: int32 permutation of the B K flat indices b K + c with the present ones (``present[b, c] > 0``,
    any strides) first in (b, c) order; ``starts``: (B + 1) int32 offsets of each image's pairs in it (starts[B] =
    the number of pairs). One single-program kernel, no host synchronisation."""
    B, K = present.shape
    order = _common.empty(B * K, dtype=torch.int32, device=present.device)
    starts = _common.empty(B + 1, dtype=torch.int32, device=present.device)
    block = INTERPRET_ONE_PROGRAM_BLOCK if INTERPRET else ONE_PROGRAM_BLOCK
    _mask_losses_compact_kernel[(1,)](present, order, starts, B, K, present.stride(0), present.stride(1),
                                      BLOCK=block, num_warps=4)
    return order, starts


def _forward(mask_logits, labels, ignore_index: int, alpha: float, gamma: float):
    B, K, h, w = mask_logits.shape
    Hl, Wl = labels.shape[-2:]
    device = mask_logits.device
    f32 = dict(dtype=torch.float32, device=device)
    if B * K * Hl * Wl == 0:  # no pixel or no class: every loss is 0 over num_masks = 1
        return (torch.zeros((), **f32), torch.zeros((), **f32), torch.ones((), dtype=torch.int64, device=device),
                torch.zeros(B, K, 4, **f32))
    logits = mask_logits.contiguous()
    labels = _labels(labels)
    counts = _class_counts(labels, K, ignore_index)
    order, starts = _compact(counts[:, :K])
    stats = _common.empty(B, K, 4, **f32)
    cfg = INTERPRET_FWD if INTERPRET else FWD_CONFIGS[0]
    num_tiles = triton.cdiv(Hl * Wl, cfg["BLOCK_P"])
    # Rows past the number of pairs are never written nor read.
    partial = torch.empty(B * K, num_tiles, 3, **f32)
    a_pos, a_neg = _alphas(alpha)
    args = (logits, labels, order, starts, partial, K, h, w, Hl, Wl, bilinear_scale(h, Hl), bilinear_scale(w, Wl),
            a_pos, a_neg, num_tiles, _tune_key(Hl * Wl, h * w))
    _fwd[(num_tiles, B)](*args, GAMMA=float(gamma), WIDE=int(w > 1), **(cfg if INTERPRET else {}))
    sum_cfg = INTERPRET_SUM if INTERPRET else SUM_CONFIGS[0]
    _mask_losses_sum_kernel[(triton.cdiv(B * K, sum_cfg["BLOCK_R"]),)](
        partial, order, starts, counts, stats, B, K, num_tiles, **sum_cfg)
    loss_focal, loss_dice = _common.empty(**f32), _common.empty(**f32)
    num_masks = _common.empty(dtype=torch.int64, device=device)
    _mask_losses_finish_kernel[(1,)](stats, loss_focal, loss_dice, num_masks, B * K, 1.0 / (Hl * Wl),
                                     BLOCK=INTERPRET_ONE_PROGRAM_BLOCK if INTERPRET else ONE_PROGRAM_BLOCK,
                                     num_warps=4)
    return loss_focal, loss_dice, num_masks, stats


def _visited_tiles(in_size: int, out_size: int, own: int, tile: int) -> tuple[int, ...]:
    """High-resolution tiles of ``tile`` rows the backward visits per block of ``own`` low-resolution cells along one
    axis (host arithmetic of the kernel's range rule, including its one-row guard on each side)."""
    if in_size == out_size:
        return tuple(-(-(min(start + own, in_size) - start) // tile) for start in range(0, in_size, own))
    scale = np.float32(bilinear_scale(in_size, out_size))
    dst = np.arange(out_size, dtype=np.float32)
    i0 = np.minimum(np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), 0).astype(np.int64), in_size - 1)
    tiles = []
    for start in range(0, in_size, own):
        end = min(start + own, in_size) - 1
        rows = np.nonzero((i0 >= start - 1) & (i0 <= end))[0]
        if rows.size:
            lo, hi = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 1, out_size - 1)
            tiles.append(-(-(hi - lo + 1) // tile))
        else:
            tiles.append(0)
    return tuple(tiles)


@functools.lru_cache(maxsize=256)
def _owned_block(in_size: int, out_size: int, block: int, tile: int) -> int:
    """Owned low-resolution cells per backward work item (<= block) that minimizes the high-resolution tiles the
    items visit: at 16x upsampling a 16-cell block reaches 16 * 16 + 16 (+2 guard) rows, 9 tiles of 32, where 14
    cells reach 242 rows, 8 tiles. Host arithmetic on the sizes only (the kernel computes the exact ranges)."""
    if in_size == out_size or in_size <= block:
        return min(block, in_size) if in_size == out_size else block
    best, best_cost = block, None
    for own in range(block, max(block // 2, 1) - 1, -1):
        cost = sum(_visited_tiles(in_size, out_size, own, tile)) * tile + 8 * -(-in_size // own)  # + per-item cost
        if best_cost is None or cost < best_cost:
            best, best_cost = own, cost
    return best


def _backward(grad_focal, grad_dice, mask_logits, labels, stats, num_masks, alpha: float, gamma: float):
    B, K, h, w = mask_logits.shape
    Hl, Wl = labels.shape[-2:]
    device = mask_logits.device
    grad = torch.zeros(B, K, h, w, dtype=mask_logits.dtype, device=device)
    if B * K * Hl * Wl == 0:
        return grad
    order, starts = _compact(stats[..., 3])  # present: T > 0
    a_pos, a_neg = _alphas(alpha)
    cfg = INTERPRET_BWD if INTERPRET else BWD_CONFIGS[0]
    # Every config shares the block and tile shapes, so the owned block sizes serve whichever the autotuner picks.
    own_i = _owned_block(h, Hl, cfg["BLOCK_I"], cfg["BLOCK_Y"])
    own_j = _owned_block(w, Wl, cfg["BLOCK_J"], cfg["BLOCK_X"])
    nbi, nbj = triton.cdiv(h, own_i), triton.cdiv(w, own_j)
    if _common.POISON:  # the kernel must write every cell of every present pair
        grad = torch.where((stats[..., 3] > 0)[:, :, None, None], float("nan"), grad).to(grad.dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS
    # Persistent grid, capped by the work items the shapes allow (the kernel reads the number of pairs itself);
    # the interpreter runs programs one after another, 3 of them still stride over several items.
    programs = max(1, min(B * K * nbi * nbj, 3 if INTERPRET else BWD_PROGRAMS_PER_SM * sms))
    args = (mask_logits.contiguous(), _labels(labels), order, starts, stats, grad_focal, grad_dice, num_masks, grad,
            a_pos, a_neg, float(Hl * Wl), B, K, h, w, Hl, Wl,
            bilinear_scale(h, Hl), bilinear_scale(w, Wl), float(np.float32(Hl) / np.float32(h)),
            float(np.float32(Wl) / np.float32(w)), own_i, own_j, nbi, nbj, _tune_key(Hl * Wl, h * w))
    _bwd[(programs,)](*args, GAMMA=float(gamma), WIDE=int(w > 1), DOT=DOT_PRECISION, **(cfg if INTERPRET else {}))
    return grad


if triton is not None:
    assert len({c["BLOCK_P"] for c in FWD_CONFIGS}) == 1, "the partial buffer assumes one tile size"
    assert len({(c["BLOCK_I"], c["BLOCK_J"], c["BLOCK_Y"], c["BLOCK_X"]) for c in BWD_CONFIGS}) == 1, \
        "the owned block sizes assume one block and tile shape"

    @torch.library.custom_op("segvit::triton_mask_losses", mutates_args=())
    @_common.on_inputs_device
    def _triton_mask_losses(mask_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, alpha: float,
                            gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(mask_logits, labels, ignore_index, alpha, gamma)

    @_triton_mask_losses.register_fake
    def _(mask_logits, labels, ignore_index, alpha, gamma):
        B, K = mask_logits.shape[:2]
        f32 = dict(dtype=torch.float32)
        return (mask_logits.new_empty((), **f32), mask_logits.new_empty((), **f32),
                mask_logits.new_empty((), dtype=torch.int64), mask_logits.new_empty((B, K, 4), **f32))

    @torch.library.custom_op("segvit::triton_mask_losses_backward", mutates_args=())
    @_common.on_inputs_device
    def _triton_mask_losses_backward(grad_focal: torch.Tensor, grad_dice: torch.Tensor, mask_logits: torch.Tensor,
                                     labels: torch.Tensor, stats: torch.Tensor, num_masks: torch.Tensor,
                                     alpha: float, gamma: float) -> torch.Tensor:
        return _backward(grad_focal, grad_dice, mask_logits, labels, stats, num_masks, alpha, gamma)

    @_triton_mask_losses_backward.register_fake
    def _(grad_focal, grad_dice, mask_logits, labels, stats, num_masks, alpha, gamma):
        return torch.empty_like(mask_logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        mask_logits, labels, _, alpha, gamma = inputs
        ctx.save_for_backward(mask_logits, labels, output[3], output[2])
        ctx.alpha, ctx.gamma = alpha, gamma

    def _autograd_backward(ctx, grad_focal, grad_dice, _grad_num_masks, _grad_stats):
        mask_logits, labels, stats, num_masks = ctx.saved_tensors
        zero = torch.zeros((), dtype=torch.float32, device=mask_logits.device)
        grad_focal = zero if grad_focal is None else grad_focal
        grad_dice = zero if grad_dice is None else grad_dice
        grad = torch.ops.segvit.triton_mask_losses_backward(grad_focal, grad_dice, mask_logits, labels, stats,
                                                            num_masks, ctx.alpha, ctx.gamma)
        return grad, None, None, None, None

    _triton_mask_losses.register_autograd(_autograd_backward, setup_context=_setup_context)


def _bwd_trips(a: dict) -> list[float]:
    """Backward: work items per program (the busiest), then the row-tile and column-tile loops nested in them, with
    the tiles an average item visits (``present`` pairs per image, from the launch case)."""
    items = -(-a["batch"] * a["present"] * a["nbi"] * a["nbj"] // a["programs"])
    rows = _visited_tiles(a["h"], a["Hl"], a["own_i"], a["BLOCK_Y"])
    cols = _visited_tiles(a["w"], a["Wl"], a["own_j"], a["BLOCK_X"])
    per_row, per_col = sum(rows) / len(rows), sum(cols) / len(cols)
    return [items, items * per_row, items * per_row * per_col]


# Trip counts of each kernel's loops, in SASS order, for the static cost model (benchmarks/estimate.py).
LOOP_TRIPS = {
    "_mask_losses_count_kernel": lambda a: [],
    "_mask_losses_compact_kernel": lambda a: [-(-a["B"] * a["K"] // a["BLOCK"])] * 2,
    "_mask_losses_finish_kernel": lambda a: [-(-a["n"] // a["BLOCK"])],
    "_mask_losses_fwd_kernel": lambda a: [a["present"]],
    "_mask_losses_sum_kernel": lambda a: [-(-a["num_tiles"] // a["BLOCK_T"])],
    "_mask_losses_bwd_kernel": _bwd_trips,
}
