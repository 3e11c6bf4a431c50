// One vectorizable float exp shared by the CPU kernels (attention softmax: csrc/common/online_softmax.h, mask
// losses: csrc/common/mask_loss_math.h) and the CUDA kernels that include those headers.
//
// Why not expf: the CPU build targets generic x86-64 (target_clones pick AVX2/AVX-512 at run time), and a libm call
// keeps GCC from vectorizing the loops that evaluate exp on every attention logit or mask pixel; there the scalar
// call would cost more than the matrix products. This is plain float arithmetic (no table, no branch, no library
// call), so every loop calling it vectorizes, and the GPU runs the very same formula.
//
// exp(x) = 2^n exp(r): n = round(x / ln 2), r = x - n ln 2 with |r| <= ln 2 / 2 (Cody-Waite: ln2_hi has 16
// significant bits, so n * ln2_hi and x - n * ln2_hi are exact for |n| <= 127 without an FMA), exp(r) by its
// degree-7 Taylor polynomial (truncation error < 6e-9 relative) and 2^n assembled in the exponent bits. Relative
// error ~1-2 float ulp over [-87, 88] (tests/test_cpp_mask_losses.py and the attention tests check it against
// float64). The polynomial runs on x clamped to [-87, 88] (so 2^n stays a normal float); two selects on the
// unclamped x then give the IEEE ends, as expf and torch.exp: 0 for x < -87 (exp(-inf) = 0, so a softmax row whose
// logits are all -inf sums to 0 and gives NaN as eager does; the denormal range, below 1.6e-38, is flushed to 0:
// no denormal slow path, and no float32 use of a probability can tell it apart) and inf for x > 88.7228 (ln of the
// largest float: exp(inf) = inf); in (88, 88.7228] exp(88) is returned. NaN propagates: every comparison is false
// for NaN, the polynomial of a NaN is NaN, and 2^n is assembled from float bits with no float-to-int conversion.
// The selects are branch-free blends after the polynomial (they vectorize; a branch per element would not).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef SEGVIT_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGVIT_HOST_DEVICE __host__ __device__
#else
#define SEGVIT_HOST_DEVICE
#endif
#endif

#ifndef SEGVIT_INLINE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGVIT_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define SEGVIT_INLINE inline __attribute__((always_inline))
#else
#define SEGVIT_INLINE inline
#endif
#endif

namespace segvit {

SEGVIT_HOST_DEVICE SEGVIT_INLINE float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

SEGVIT_HOST_DEVICE SEGVIT_INLINE int32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

SEGVIT_HOST_DEVICE SEGVIT_INLINE float fast_exp(float x) {
  // Only the top is clamped: below -87 (-inf included) the polynomial's result, whatever it is, is replaced by 0.
  const float xc = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (|x / ln 2| < 2^22): floorf/rintf would keep GCC from
  // vectorizing (it inlines them as one instruction only under -fno-trapping-math). An FMA contraction of the
  // first step (nvcc -fmad) still yields an integer.
  constexpr float kRound = 12582912.0f;
  const float shifted = xc * 1.44269504088896341f + kRound;  // 1.5 * 2^23 + n: n sits in the low mantissa bits
  const float n = shifted - kRound;                          // in [-126, 127], or NaN
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n from the bits of `shifted`: shifting left by 23 drops its exponent and keeps n (two's complement) as the
  // new exponent field, + 127 its bias. No float-to-int conversion and no clamp of n: either made GCC if-convert
  // the whole function into compare-and-blend chains (3-4x slower under AVX2). For a NaN x, p is NaN already.
  const uint32_t pow2_bits = (static_cast<uint32_t>(float_bits(shifted)) + 127u) << 23;
  float y = p * float_from_bits(static_cast<int32_t>(pow2_bits));  // 2^n, a normal float
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.72283935546875f ? float_from_bits(0x7f800000) : y;  // +inf
  return y;
}

}  // namespace segvit
