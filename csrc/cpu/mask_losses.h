// CPU kernels of segvit::mask_loss_stats and its backward, declared for csrc/bindings.cpp.
//
// The op behind segvit.ops.mask_losses (CONTRACT.md, op 4). It returns per-(image, class) sufficient statistics,
// stats (B, K, 4) float64 = [sum focal, sum sigmoid(p) t, sum sigmoid(p), sum t] over the label pixels, with
// p = bilinear(mask_logits[b, c], (Hl, Wl)) and t = (labels[b] == c), for the classes present in labels[b]
// (ignore_index excluded); the rows of absent classes are 0 (and get no gradient). segvit/ops/mask_losses.py turns
// them into the focal and dice losses with a few (B, K)-sized tensor ops, so autograd handles the dice chain rule
// and the backward kernel only needs d loss / d stats.
#pragma once

#include <ATen/ATen.h>

namespace segvit::cpu {

at::Tensor mask_loss_stats(const at::Tensor& mask_logits, const at::Tensor& labels, int64_t ignore_index,
                           double alpha, double gamma);

// d loss / d mask_logits from grad_stats = d loss / d stats (B, K, 4); stats is the forward output (its last column
// says which classes are present).
at::Tensor mask_loss_stats_backward(const at::Tensor& grad_stats, const at::Tensor& mask_logits,
                                    const at::Tensor& labels, const at::Tensor& stats, int64_t ignore_index,
                                    double alpha, double gamma);

}  // namespace segvit::cpu
