"""Triton kernels of ``mask_losses``: sigmoid focal and dice losses of the present classes, forward and backward.

For every (b, c) with class c present in labels[b] (ignore_index excluded), over the Hl x Wl label pixels::

    p = bilinear(mask_logits[b, c], (Hl, Wl), align_corners=False),  t = (labels[b] == c),  s = sigmoid(p)
    ce = softplus(p) - p t,  q = 1 - p_t = (s if t = 0 else 1 - s),  a_t = (alpha if t else 1 - alpha) (1 if alpha < 0)
    focal(b, c) = mean(a_t ce q^gamma),   dice(b, c) = 1 - (2 I + 1) / (S + T + 1),  I = sum s t, S = sum s, T = sum t
    loss_focal = sum focal / num_masks,   loss_dice = sum dice / num_masks,   num_masks = max(#pairs, 1)

Forward: grid (pixel tiles, B). A program loads its tile of labels once and loops over the present classes of its
image: interpolates the class's logits on the fly, and writes the tile's partial sums (focal, I, S, T) to a
(pairs, tiles, 4) buffer, which torch reduces in a fixed order. The (pairs, Hl, Wl) upsampled logits and one-hot
targets never exist.

Backward, per pixel (sigma = -1 if t else +1)::

    d focal_pixel / dp = sigma a_t q^gamma (q + gamma (1 - q) ce)
    d dice / dp        = (-2 t / D + (2 I + 1) / D^2) s (1 - s),   D = S + T + 1

scaled by the incoming gradients / num_masks (and 1 / (Hl Wl) for the focal mean), then moved to the low-resolution
grid through the transposed bilinear weights: grad[b, c] = Wy^T G Wx with G the (Hl, Wl) pixel gradient and Wy
(Hl, h), Wx (Wl, w) the interpolation matrices (two non-zeros per row). Deterministic by ownership, no atomics: a
program owns a BLOCK_I x BLOCK_J block of low-resolution cells of one pair, visits exactly the high-resolution
rows and columns whose taps reach that block (a contiguous range, as taps are monotone in the destination index;
the host computes it, widened by one as a guard), recomputes G there, and accumulates
Wy_tile^T (G_tile Wx_tile) with two ``tl.dot`` in a fixed loop order. Pixels on a block border are recomputed by the
two or four programs that share them (a few percent at 16x upsampling), the price of needing no second pass.
"""
from __future__ import annotations

import torch

from segvit.kernels import _common
from segvit.kernels._common import INTERPRET, tl, triton
from segvit.kernels.mask_classify import bilinear_scale

# A100 / H100. Forward: one pixel tile per program, labels read once per image; 640x640 labels give 400-800 tiles
# per image. Backward: BLOCK_I x BLOCK_J = 16 x 16 low-resolution cells per program (40x40 logits: 9 programs per
# pair, 360 for 40 pairs), high-resolution tiles of BLOCK_Y x BLOCK_X.
# One BLOCK_P for every forward config: the partial-sum buffer is (pairs, tiles, 4), so the tile count must not
# depend on the config the autotuner picks (a benchmark run of a smaller tile would leave stale trailing tiles).
FWD_CONFIGS = [
    {"BLOCK_P": 1024, "num_warps": 8, "num_stages": 1},
    {"BLOCK_P": 1024, "num_warps": 4, "num_stages": 1},
]
# (64 x 64 high-resolution tiles spilled with 4 and 8 warps on sm_80: the recomputed forward keeps ~10 float32
# values per pixel live.)
BWD_CONFIGS = [
    {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_Y": 32, "BLOCK_X": 64, "num_warps": 8, "num_stages": 1},
    {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_Y": 32, "BLOCK_X": 32, "num_warps": 4, "num_stages": 1},
]
INTERPRET_FWD = {"BLOCK_P": 128}
INTERPRET_BWD = {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_Y": 16, "BLOCK_X": 32}


if triton is not None:
    from segvit.kernels.mask_classify import bilinear_taps

    @triton.jit
    def _pow(base, gamma):
        # base ** gamma for base >= 0, with 0 ** 0 = 1 (exp(0 * log 0) would be NaN).
        safe = tl.where(base > 0, base, 1.0)
        return tl.where(base > 0, tl.exp(gamma * tl.log(safe)), tl.where(gamma == 0, 1.0, 0.0))

    @triton.jit
    def _pixel_terms(p, t, alpha, gamma):
        """s, 1 - s, ce, q = 1 - p_t, a_t, a_t q^gamma of logits p and float targets t (0/1)."""
        # One exp and one reciprocal give s, 1 - s (without cancellation for large p) and softplus: the kernel is
        # bound by the special-function units, not memory.
        e = tl.exp(-tl.abs(p))
        r = 1.0 / (1.0 + e)
        s = tl.where(p >= 0, r, e * r)
        s_neg = tl.where(p >= 0, e * r, r)
        ce = tl.maximum(p, 0.0) - p * t + tl.log(1.0 + e)
        q = tl.where(t > 0, s_neg, s)
        a_t = tl.where(alpha >= 0, tl.where(t > 0, alpha, 1.0 - alpha), 1.0)
        return s, s_neg, ce, q, a_t, a_t * _pow(q, gamma)

    @triton.jit
    def _mask_losses_fwd_kernel(logits_ptr, labels_ptr, pair_class_ptr, pair_start_ptr, partial_ptr,
                                K, h, w, Hl, Wl, scale_h, scale_w, alpha, gamma, num_tiles,
                                BLOCK_P: tl.constexpr):
        tile = tl.program_id(0)
        b = tl.program_id(1)
        HW = Hl * Wl
        pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = pix < HW
        y0, y1, ly0, ly1 = bilinear_taps(pix // Wl, h, Hl, scale_h)
        x0, x1, lx0, lx1 = bilinear_taps(pix % Wl, w, Wl, scale_w)
        labels = tl.load(labels_ptr + b.to(tl.int64) * HW + pix, mask=ok, other=0)
        first = tl.load(pair_start_ptr + b)
        last = tl.load(pair_start_ptr + b + 1)
        for pair in range(first, last):
            c = tl.load(pair_class_ptr + pair)
            base = logits_ptr + (b.to(tl.int64) * K + c) * (h * w)
            v00 = tl.load(base + y0 * w + x0, mask=ok, other=0.0).to(tl.float32)
            v01 = tl.load(base + y0 * w + x1, mask=ok, other=0.0).to(tl.float32)
            v10 = tl.load(base + y1 * w + x0, mask=ok, other=0.0).to(tl.float32)
            v11 = tl.load(base + y1 * w + x1, mask=ok, other=0.0).to(tl.float32)
            p = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
            t = tl.where(ok & (labels == c), 1.0, 0.0)
            s, s_neg, ce, q, a_t, weight = _pixel_terms(p, t, alpha, gamma)
            out = partial_ptr + (pair * num_tiles + tile) * 4  # int32: pairs * tiles * 4 << 2**31
            tl.store(out + 0, tl.sum(tl.where(ok, weight * ce, 0.0), axis=0))
            tl.store(out + 1, tl.sum(s * t, axis=0))
            tl.store(out + 2, tl.sum(tl.where(ok, s, 0.0), axis=0))
            tl.store(out + 3, tl.sum(t, axis=0))

    @triton.jit
    def _mask_losses_bwd_kernel(logits_ptr, labels_ptr, pair_image_ptr, pair_class_ptr, coef_ptr,
                                row_lo_ptr, row_hi_ptr, col_lo_ptr, col_hi_ptr, grad_ptr,
                                K, h, w, Hl, Wl, scale_h, scale_w, alpha, gamma,
                                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                                BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
        pair = tl.program_id(0)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        b = tl.load(pair_image_ptr + pair).to(tl.int64)
        c = tl.load(pair_class_ptr + pair)
        coef_focal = tl.load(coef_ptr + pair * 3 + 0)
        coef_dice_t = tl.load(coef_ptr + pair * 3 + 1)
        coef_dice_1 = tl.load(coef_ptr + pair * 3 + 2)
        base = logits_ptr + (b * K + c) * (h * w)
        labels_b = labels_ptr + b * Hl * Wl
        ii = bi * BLOCK_I + tl.arange(0, BLOCK_I)
        jj = bj * BLOCK_J + tl.arange(0, BLOCK_J)
        # High-resolution rows / columns whose taps can reach this block (host-computed, inclusive).
        y_lo = tl.load(row_lo_ptr + bi)
        y_hi = tl.load(row_hi_ptr + bi)
        x_lo = tl.load(col_lo_ptr + bj)
        x_hi = tl.load(col_hi_ptr + bj)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for y_start in range(y_lo, y_hi + 1, BLOCK_Y):
            y = y_start + tl.arange(0, BLOCK_Y)
            y_ok = y <= y_hi
            y0, y1, ly0, ly1 = bilinear_taps(y, h, Hl, scale_h)
            # Row weights onto this block's low-resolution rows; y0 == y1 at the last row gets both weights,
            # as ATen's backward does.
            wy = tl.where(y0[:, None] == ii[None, :], ly0[:, None], 0.0) \
                + tl.where(y1[:, None] == ii[None, :], ly1[:, None], 0.0)
            wy = tl.where(y_ok[:, None], wy, 0.0)
            for x_start in range(x_lo, x_hi + 1, BLOCK_X):
                x = x_start + tl.arange(0, BLOCK_X)
                x_ok = x <= x_hi
                x0, x1, lx0, lx1 = bilinear_taps(x, w, Wl, scale_w)
                ok = y_ok[:, None] & x_ok[None, :]
                v00 = tl.load(base + y0[:, None] * w + x0[None, :], mask=ok, other=0.0).to(tl.float32)
                v01 = tl.load(base + y0[:, None] * w + x1[None, :], mask=ok, other=0.0).to(tl.float32)
                v10 = tl.load(base + y1[:, None] * w + x0[None, :], mask=ok, other=0.0).to(tl.float32)
                v11 = tl.load(base + y1[:, None] * w + x1[None, :], mask=ok, other=0.0).to(tl.float32)
                p = ly0[:, None] * (lx0[None, :] * v00 + lx1[None, :] * v01) \
                    + ly1[:, None] * (lx0[None, :] * v10 + lx1[None, :] * v11)
                labels = tl.load(labels_b + y[:, None] * Wl + x[None, :], mask=ok, other=0)
                t = tl.where(ok & (labels == c), 1.0, 0.0)
                s, s_neg, ce, q, a_t, weight = _pixel_terms(p, t, alpha, gamma)
                sign = tl.where(t > 0, -1.0, 1.0)
                d_focal = sign * weight * (q + gamma * (1.0 - q) * ce)
                d_dice = (coef_dice_t * t + coef_dice_1) * s * s_neg
                g = tl.where(ok, coef_focal * d_focal + d_dice, 0.0)
                wx = tl.where(x0[:, None] == jj[None, :], lx0[:, None], 0.0) \
                    + tl.where(x1[:, None] == jj[None, :], lx1[:, None], 0.0)
                wx = tl.where(x_ok[:, None], wx, 0.0)
                g_cols = tl.dot(g, wx, input_precision="ieee")  # (BLOCK_Y, BLOCK_J)
                acc = tl.dot(tl.trans(wy), g_cols, acc, input_precision="ieee")
        out = grad_ptr + (b * K + c) * (h * w) + ii[:, None] * w + jj[None, :]
        tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=(ii[:, None] < h) & (jj[None, :] < w))

    _KEY = ["K", "h", "w", "Hl", "Wl"]
    _fwd = _common.autotune(FWD_CONFIGS, INTERPRET_FWD, _KEY)(_mask_losses_fwd_kernel)
    _bwd = _common.autotune(BWD_CONFIGS, INTERPRET_BWD, _KEY)(_mask_losses_bwd_kernel)

    _COMMON = {"K": "i32", "h": "i32", "w": "i32", "Hl": "i32", "Wl": "i32", "scale_h": "fp32", "scale_w": "fp32",
               "alpha": "fp32", "gamma": "fp32"}
    COMPILE_SPECS = [
        {"name": "mask_losses.fwd", "fn": _mask_losses_fwd_kernel,
         "signature": {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "pair_class_ptr": "*i32",
                       "pair_start_ptr": "*i32", "partial_ptr": "*fp32", **_COMMON, "num_tiles": "i32"},
         "constexprs": {}, "configs": FWD_CONFIGS, "dtypes": ["fp32", "fp16", "bf16"]},
        {"name": "mask_losses.bwd", "fn": _mask_losses_bwd_kernel,
         "signature": {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "pair_image_ptr": "*i32",
                       "pair_class_ptr": "*i32", "coef_ptr": "*fp32", "row_lo_ptr": "*i32", "row_hi_ptr": "*i32",
                       "col_lo_ptr": "*i32", "col_hi_ptr": "*i32", "grad_ptr": "*fp32", **_COMMON},
         "constexprs": {}, "configs": BWD_CONFIGS, "dtypes": ["fp32", "fp16", "bf16"]},
    ]
else:
    COMPILE_SPECS = []


def reasons(mask_logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> list[str]:
    """Why the triton kernels cannot take these inputs (empty list: they can)."""
    return _common.device_reasons(mask_logits) + _common.interpreter_bf16_reasons(mask_logits, "reductions")


def mask_losses(mask_logits, labels, *, ignore_index=255, alpha=0.25, gamma=2.0):
    """Dispatcher entry: the ``segvit::triton_mask_losses`` custom op (its autograd runs the backward kernel)."""
    loss_focal, loss_dice, num_masks, _ = torch.ops.segvit.triton_mask_losses(
        mask_logits, labels, int(ignore_index), float(alpha), float(gamma))
    return loss_focal, loss_dice, num_masks


def _labels(labels: torch.Tensor) -> torch.Tensor:
    # The kernels compare labels with a class id in their own integer type; narrow types are widened once here.
    return labels.contiguous() if labels.dtype in (torch.int64, torch.int32) else labels.to(torch.int32).contiguous()


def _pairs_from_present(present: torch.Tensor):
    """(image, class) int32 of every True in a (B, K) mask, in (b, c) order, and per-image start offsets (B+1)."""
    images, classes = present.nonzero(as_tuple=True)
    starts = torch.zeros(present.shape[0] + 1, dtype=torch.int32, device=present.device)
    starts[1:] = present.sum(1).cumsum(0)
    return images.to(torch.int32), classes.to(torch.int32), starts


def _forward(mask_logits, labels, ignore_index: int, alpha: float, gamma: float):
    B, K, h, w = mask_logits.shape
    Hl, Wl = labels.shape[-2:]
    device = mask_logits.device
    logits = mask_logits.contiguous()
    labels = _labels(labels)
    # Present classes per image; ignore_index (and anything outside [0, K), rejected by the public function) lands
    # in an extra column that is dropped.
    flat = labels.reshape(B, -1).long()
    flat = torch.where((flat == ignore_index) | (flat < 0) | (flat >= K), K, flat)
    present = torch.zeros(B, K + 1, dtype=torch.bool, device=device).scatter_(1, flat, True)[:, :K]
    images, classes, starts = _pairs_from_present(present)
    num_pairs = images.numel()
    stats = torch.zeros(B, K, 3, dtype=torch.float32, device=device)
    num_masks = torch.tensor(max(num_pairs, 1), dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    if num_pairs == 0:
        return zero, zero.clone(), num_masks, stats
    cfg = INTERPRET_FWD if INTERPRET else FWD_CONFIGS[0]
    block = cfg["BLOCK_P"]
    num_tiles = triton.cdiv(Hl * Wl, block)
    partial = _common.empty(num_pairs, num_tiles, 4, dtype=torch.float32, device=device)
    args = (logits, labels, classes, starts, partial, K, h, w, Hl, Wl, bilinear_scale(h, Hl), bilinear_scale(w, Wl),
            alpha, gamma, num_tiles)
    if INTERPRET:
        _fwd[(num_tiles, B)](*args, **cfg)
    else:
        _fwd[(num_tiles, B)](*args)
    sums = partial.sum(1)  # fixed-order reduction over tiles: deterministic
    focal = sums[:, 0] / (Hl * Wl)
    inter, sig, tgt = sums[:, 1], sums[:, 2], sums[:, 3]
    dice = 1 - (2 * inter + 1) / (sig + tgt + 1)
    stats[images.long(), classes.long()] = sums[:, 1:]
    return focal.sum() / num_pairs, dice.sum() / num_pairs, num_masks, stats


def _tap_ranges(in_size: int, out_size: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive destination ranges [lo, hi] whose bilinear taps reach each block of ``block`` source indices,
    widened by one index on each side (the kernel's weights are exact; the widening only guards against the host
    and device rounding a source position differently)."""
    dst = torch.arange(out_size, dtype=torch.float32)
    if in_size == out_size:
        i0 = i1 = torch.arange(out_size)
    else:
        src = (torch.tensor(bilinear_scale(in_size, out_size), dtype=torch.float32) * (dst + 0.5) - 0.5).clamp_min(0)
        i0 = src.long().clamp_max(in_size - 1)
        i1 = i0 + (i0 < in_size - 1).long()
    starts = torch.arange(0, in_size, block)
    ends = (starts + block - 1).clamp_max(in_size - 1)
    lo = torch.searchsorted(i1, starts, right=False)  # first dst with i1 >= block start
    hi = torch.searchsorted(i0, ends, right=True) - 1  # last dst with i0 <= block end
    lo = (lo - 1).clamp_min(0)
    hi = (hi + 1).clamp_max(out_size - 1)
    empty = lo > hi
    hi = torch.where(empty, lo - 1, hi)
    return lo.to(torch.int32).to(device), hi.to(torch.int32).to(device)


def _backward(grad_focal, grad_dice, mask_logits, labels, stats, num_masks, alpha: float, gamma: float):
    B, K, h, w = mask_logits.shape
    Hl, Wl = labels.shape[-2:]
    device = mask_logits.device
    grad = torch.zeros(B, K, h, w, dtype=torch.float32, device=device)
    present = stats[..., 2] > 0  # a present class has T >= 1 pixel
    images, classes, _ = _pairs_from_present(present)
    if images.numel() == 0:
        return grad.to(mask_logits.dtype)
    pair_stats = stats[images.long(), classes.long()]
    inter, sig, tgt = pair_stats.unbind(-1)
    n = num_masks.to(torch.float32)
    denom = sig + tgt + 1
    gd = grad_dice.to(torch.float32) / n
    coef = torch.stack([(grad_focal.to(torch.float32) / (n * Hl * Wl)).expand_as(inter),
                        -2 * gd / denom, gd * (2 * inter + 1) / denom ** 2], dim=1).contiguous()
    cfg = INTERPRET_BWD if INTERPRET else BWD_CONFIGS[0]
    # Every config shares BLOCK_I / BLOCK_J, so the host ranges serve whichever the autotuner picks.
    row_lo, row_hi = _tap_ranges(h, Hl, cfg["BLOCK_I"], device)
    col_lo, col_hi = _tap_ranges(w, Wl, cfg["BLOCK_J"], device)
    if _common.POISON:  # the kernel must write every cell of every present pair
        grad[images.long(), classes.long()] = float("nan")
    grid = (images.numel(), triton.cdiv(h, cfg["BLOCK_I"]), triton.cdiv(w, cfg["BLOCK_J"]))
    args = (mask_logits.contiguous(), _labels(labels), images, classes, coef, row_lo, row_hi, col_lo, col_hi, grad,
            K, h, w, Hl, Wl, bilinear_scale(h, Hl), bilinear_scale(w, Wl), alpha, gamma)
    if INTERPRET:
        _bwd[grid](*args, **cfg)
    else:
        _bwd[grid](*args)
    return grad.to(mask_logits.dtype)


if triton is not None:
    assert len({c["BLOCK_P"] for c in FWD_CONFIGS}) == 1, "the partial buffer assumes one tile size"
    assert len({(c["BLOCK_I"], c["BLOCK_J"]) for c in BWD_CONFIGS}) == 1, "host tap ranges assume one block shape"

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
                mask_logits.new_empty((), dtype=torch.int64), mask_logits.new_empty((B, K, 3), **f32))

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
