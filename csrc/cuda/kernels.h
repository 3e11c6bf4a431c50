// CUDA kernels of segvit, declared for csrc/bindings.cpp (registered there under #ifdef SEGVIT_WITH_CUDA).
// Plain ATen signatures, so bindings.cpp (compiled by the host compiler) needs no CUDA header.
//
// They take the same arguments and return the same results as the CPU kernels (csrc/cpu/mask_classify.h,
// csrc/cpu/mask_losses.h) and share their per-element math through csrc/common/*.h. Input dtypes: float32, float16,
// bfloat16; accumulation in float32 (float64 for the final cross-block sums of mask_loss_stats).
#pragma once

#include <ATen/ATen.h>

namespace segvit::cuda {

at::Tensor mask_classify(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size);

at::Tensor mask_loss_stats(const at::Tensor& mask_logits, const at::Tensor& labels, int64_t ignore_index,
                           double alpha, double gamma);

at::Tensor mask_loss_stats_backward(const at::Tensor& grad_stats, const at::Tensor& mask_logits,
                                    const at::Tensor& labels, const at::Tensor& stats, int64_t ignore_index,
                                    double alpha, double gamma);

}  // namespace segvit::cuda
