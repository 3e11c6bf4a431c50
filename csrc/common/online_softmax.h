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
#include <limits>

#ifndef SEGVIT_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGVIT_HOST_DEVICE __host__ __device__
#else
#define SEGVIT_HOST_DEVICE
#endif
#endif

namespace segvit {

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
