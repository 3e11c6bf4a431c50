"""FLOP and minimum-byte counts of the op cases: the numerators of the roofline.

Conventions (the same for every op, so the percentages compare):
- FLOPs: a multiply-add of a matrix product or contraction counts 2. Softmax, sigmoid, bias adds and the
  bilinear weights of ``mask_classify`` are not counted: next to the products they are a few percent. The
  exception is ``mask_losses``, which has no product at all: there each label pixel of each present mask costs
  ``LOSS_FLOPS_PER_PIXEL`` forward and ``LOSS_BACKWARD_FLOPS_PER_PIXEL`` backward (counted below by hand).
- Bytes: the least traffic any implementation must make: every input the call needs read once, every output
  written once; with backward, also every incoming gradient read once and every produced gradient written once.
  Intermediates (attention scores, upsampled masks) count zero: keeping them out of memory is what the fused
  kernels are for.
- ``backward=True`` counts a whole forward+backward call. The backward of an attention counts the four products
  of a backward that keeps the probabilities (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q); a kernel that
  recomputes QK^T does 2 more per element than counted here.
"""
from __future__ import annotations

# mask_losses, per label pixel of one present (image, class) pair. Forward: bilinear sample 7 (4 taps: 4 mul +
# 3 add), sigmoid 3 (exp, add, div), BCE with logits 5 (abs, exp, log1p, max, sub), p_t and 1 - p_t 2, the
# gamma = 2 power 1, alpha_t and the two products 3, the three running sums (focal, sigmoid, sigmoid * target) 3:
# 24. Backward: the loss derivative 16 and the transposed bilinear scatter 8 (4 taps: 4 mul + 4 add): 24.
LOSS_FLOPS_PER_PIXEL = 24
LOSS_BACKWARD_FLOPS_PER_PIXEL = 24


def atm_attention(batch, queries, keys, heads, head_dim, *, backward=False, elem=4):
    """q (B, Nq, H, D), k and v (B, Nk, H, D) -> out (B, Nq, H, D), sim (B, Nq, Nk)."""
    product = 2 * batch * heads * queries * keys * head_dim  # one (Nq, D) x (D, Nk) product per (b, h)
    flops = 2 * product  # q k^T (shared by the softmax and the similarity) and P v
    q = out = batch * queries * heads * head_dim
    kv = batch * keys * heads * head_dim
    sim = batch * queries * keys
    moved = q + 2 * kv + out + sim
    if backward:
        flops += 4 * product
        moved += (out + sim) + (q + 2 * kv)  # incoming gradients read, gradients of q, k, v written
    return flops, moved * elem


def query_pool_attention(batch, tokens, pooled, channels, *, backward=False, elem=4):
    """x (B, L, C), in_proj_weight (3C, C), in_proj_bias (3C) -> (B, L', C)."""
    projection = 2 * batch * channels * channels * (pooled + 2 * tokens)  # q of L' sampled tokens, k and v of L
    attention = 4 * batch * pooled * tokens * channels  # q k^T and P v summed over heads (H * D = C)
    flops = projection + attention
    x, weight, bias, out = batch * tokens * channels, 3 * channels * channels, 3 * channels, batch * pooled * channels
    moved = x + weight + bias + out
    if backward:
        flops += 2 * projection + 2 * attention  # projections: d input and d weight; attention: 4 products
        moved += out + (x + weight + bias)
    return flops, moved * elem


def mask_classify(batch, queries, classes, grid, out_size, *, elem=4):
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w) -> (B, K, Hout, Wout). Forward only."""
    (h, w), (out_h, out_w) = grid, out_size
    flops = 2 * batch * queries * classes * out_h * out_w  # sum over q of prob * mask, per class and pixel
    moved = batch * queries * (classes + 1) + batch * queries * h * w + batch * classes * out_h * out_w
    return flops, moved * elem


def mask_losses(batch, classes, grid, label_size, pairs, *, backward=False, elem=4, label_elem=8):
    """mask_logits (B, K, h, w), labels (B, Hl, Wl) with ``pairs`` present (image, class) pairs -> 3 scalars."""
    (h, w), (label_h, label_w) = grid, label_size
    pixels = pairs * label_h * label_w
    flops = LOSS_FLOPS_PER_PIXEL * pixels
    # the labels, and the masks of the present pairs only (the others do not enter the losses); 3 scalars out
    moved = batch * label_h * label_w * label_elem + pairs * h * w * elem + 3 * elem
    if backward:
        flops += LOSS_BACKWARD_FLOPS_PER_PIXEL * pixels
        moved += 3 * elem + batch * classes * h * w * elem  # the whole gradient is written (zero where absent)
    return flops, moved


def roofline_floor(flops, moved, peak_flops, peak_bandwidth):
    """Least time in seconds the device allows: max(FLOPs / peak FLOP/s, bytes / peak bytes/s). A count that is
    None (model cases have no byte count) drops its term."""
    terms = [0.0]
    if flops:
        terms.append(flops / peak_flops)
    if moved:
        terms.append(moved / peak_bandwidth)
    return max(terms)
