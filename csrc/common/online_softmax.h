// Online-softmax update math shared by the CPU attention kernels and (future) CUDA kernels.
//
// A softmax row is consumed in key blocks. The running state of one row is (max, sum): the largest logit seen so
// far and sum_j exp(logit_j - max). A new block with maximum `block_max` moves the maximum to
// max(max, block_max); the old sum and the output accumulator are multiplied by exp(old_max - new_max) before the
// block's exp(logit - new_max) terms are added. After the last block, out = acc / sum and the log-sum-exp
// lse = max + log(sum) is all the backward pass needs to recompute the probabilities exp(logit - lse).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifndef SEGVIT_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGVIT_HOST_DEVICE __host__ __device__
#else
#define SEGVIT_HOST_DEVICE
#endif
#endif

namespace segvit {

// exp(x) to about 2 float ulp for x in [-87, 88], written so that a compiler vectorizes a loop calling it (no
// library call, no table, no branch): the CPU kernels evaluate it on every attention logit, where a scalar libm
// call would cost more than the matrix products. x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2_hi has few
// significant bits, so n * ln2_hi and x - n * ln2_hi are exact without an FMA), exp(r) by its degree-7 Taylor
// polynomial (truncation error < 6e-9 relative) and 2^n assembled in the exponent bits. Inputs below -87 return
// exp(-87) ~ 1.6e-38 instead of a denormal or 0: the probabilities this feeds are then below any float32 use.
// NaN propagates through the polynomial.
SEGVIT_HOST_DEVICE inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (|x log2 e| < 2^22): floorf would keep GCC from vectorizing
  // the loop (it only inlines floor as one instruction under -fno-trapping-math).
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  float two_n;
#if defined(__CUDA_ARCH__)
  two_n = __int_as_float(bits);
#else
  std::memcpy(&two_n, &bits, sizeof(float));
#endif
  return p * two_n;
}

struct OnlineSoftmaxState {
  float max;  // largest logit so far (-inf before the first block)
  float sum;  // sum of exp(logit - max) so far
};

SEGVIT_HOST_DEVICE inline OnlineSoftmaxState online_softmax_init() {
  return {-std::numeric_limits<float>::infinity(), 0.0f};
}

// Factor that rescales the running sum and accumulator when the maximum moves from old_max to new_max
// (new_max >= old_max). 0 before the first block: exp(-inf - new_max) would be NaN when new_max is also -inf.
SEGVIT_HOST_DEVICE inline float online_softmax_rescale(float old_max, float new_max) {
  return old_max == -std::numeric_limits<float>::infinity() ? 0.0f : expf(old_max - new_max);
}

// Log-sum-exp of a finished row: the backward pass recomputes p = exp(logit - lse).
SEGVIT_HOST_DEVICE inline float online_softmax_lse(const OnlineSoftmaxState& s) {
  return s.max + logf(s.sum);
}

}  // namespace segvit
