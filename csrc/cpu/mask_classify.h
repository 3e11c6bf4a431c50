// CPU kernels of segvit, declared for csrc/bindings.cpp (the only file that sees torch/library.h).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace segvit::cpu {

// out[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(bilinear(mask_logits[b, q], out_size)), c < K.
at::Tensor mask_classify(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size);

// Which instruction-set path the CPU kernels run on this machine (for build_info()).
std::string isa_info();

}  // namespace segvit::cpu
