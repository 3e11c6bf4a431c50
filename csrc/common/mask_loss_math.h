// Per-pixel math of segvit::mask_losses (CONTRACT.md, op 4), shared by the CPU kernels (csrc/cpu/mask_losses.cpp)
// and the CUDA kernels (csrc/cuda/mask_losses.cu, csrc/cuda/mask_classify.cu), so the arithmetic that runs on a GPU
// is the arithmetic the CPU tests check.
//
// For one upsampled logit x and target t in {0, 1} (alpha >= 0; for alpha < 0 both weights are 1, as the original),
// with the margin m = (t ? -x : x):
//   u = 1 - p_t = sigmoid(m),   p_t = sigmoid(-m),   w = (t ? alpha : 1 - alpha)
//   BCEWithLogits(x, t) = softplus(m)
//   focal = w * softplus(m) * u^gamma
//   d focal / dm = w * u^gamma * (u + gamma * softplus(m) * p_t)      (softplus' = u, u' = u p_t)
//   d focal / dx = (t ? -1 : 1) * d focal / dm,   d sigmoid(x) / dx = u p_t
// u, p_t and softplus(m) = max(m, 0) + log1p(exp(-|m|)) come from one exp(-|x|): no cancellation (1 - u is
// never formed) and no overflow for any x.
//
// exp and log1p are written here as short polynomials of plain float arithmetic (not expf/log1pf) because the CPU
// build targets generic x86-64: libm calls would stop GCC from vectorizing the pixel loops, while this code
// vectorizes in every target_clones variant. The same functions run on the GPU (memory-bound there, so the few
// extra FMAs are free), which keeps the two backends bit-for-bit on the same formulas. Accuracy (checked against
// float64 by tests/test_cpp_mask_losses.py): exp: relative error ~2 ulp; log1p: ~2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/bilinear.h"
#include "common/fast_exp.h"  // fast_exp, float_from_bits, SEGVIT_INLINE

namespace segvit {

// exp(y) for y <= 0 (the only range used: exp(-|x|)): the shared exp (csrc/common/fast_exp.h). Below y = -87
// (exp(-87) = 1.6e-38) it returns 0, so no denormal slow path is hit; e.g. sigmoid(-100) comes out as 0 instead of
// 3.7e-44, which no sum can tell apart, and sigmoid(-inf) = 0 exactly. NaN is returned as NaN.
SEGVIT_HOST_DEVICE SEGVIT_INLINE float exp_nonpositive(float y) { return fast_exp(y); }

// log(1 + e) for e in [0, 1] (e = exp(-|x|)). With z = e / (2 + e), log(1 + e) = 2 atanh(z); for e > sqrt(2) - 1 the
// argument is halved first, log(1 + e) = ln 2 + 2 atanh((e - 1) / (e + 3)). Either way |z| <= 0.1716 and the odd series
// to z^9 is accurate to ~2e-9 relative. No 1 + e is rounded before the log, so tiny e keep full relative precision.
SEGVIT_HOST_DEVICE SEGVIT_INLINE float log1p_unit(float e) {
  const bool halve = e > 0.414213562f;
  const float z = (halve ? e - 1.0f : e) / (halve ? e + 3.0f : e + 2.0f);
  const float z2 = z * z;
  float p = 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  return (halve ? 0.693147180559945309f : 0.0f) + 2.0f * z * p;
}

// sigmoid(x) and sigmoid(-x) from one exp.
struct SigmoidPair {
  float s;   // sigmoid(x)
  float sn;  // sigmoid(-x) = 1 - sigmoid(x), without cancellation
  float e;   // exp(-|x|)
};

SEGVIT_HOST_DEVICE SEGVIT_INLINE SigmoidPair sigmoid_pair(float x) {
  SigmoidPair r;
  const float ax = x < 0.0f ? -x : x;
  r.e = exp_nonpositive(-ax);
  const float big = 1.0f / (1.0f + r.e);  // sigmoid(|x|)
  const float small = r.e * big;          // sigmoid(-|x|)
  const bool positive = x >= 0.0f;
  r.s = positive ? big : small;
  r.sn = positive ? small : big;
  return r;
}

SEGVIT_HOST_DEVICE SEGVIT_INLINE float sigmoid(float x) { return sigmoid_pair(x).s; }

// Class weights of the focal loss: (t ? alpha : 1 - alpha), or 1 for both when alpha < 0 (the original skips the
// weighting then).
struct FocalParams {
  float weight_pos;
  float weight_neg;
  float gamma;
};

SEGVIT_HOST_DEVICE inline FocalParams focal_params(double alpha, double gamma) {
  FocalParams p;
  p.weight_pos = alpha >= 0.0 ? static_cast<float>(alpha) : 1.0f;
  p.weight_neg = alpha >= 0.0 ? static_cast<float>(1.0 - alpha) : 1.0f;
  p.gamma = static_cast<float>(gamma);
  return p;
}

// u^gamma for u in [0, 1]. kSquare: gamma == 2 (SegViT's value), a multiply; otherwise pow (0^0 = 1, as torch.pow).
template <bool kSquare>
SEGVIT_HOST_DEVICE SEGVIT_INLINE float focal_modulator(float u, float gamma) {
  if constexpr (kSquare) {
    (void)gamma;
    return u * u;
  } else {
#if defined(__CUDA_ARCH__)
    return powf(u, gamma);
#else
    return std::pow(u, gamma);
#endif
  }
}

// Both passes work on the margin m = (t ? -x : x): then u = 1 - p_t = sigmoid(m), p_t = sigmoid(-m) and
// BCEWithLogits(x, t) = softplus(m), so the target enters only through m, the class weight and the sign dm/dx
// (few selects on t: GCC if-converts and vectorizes the loops, which it does not when every term selects on t).
struct MarginTerms {
  float u;    // sigmoid(m) = 1 - p_t
  float p_t;  // sigmoid(-m)
  float spv;  // softplus(m)
};

SEGVIT_HOST_DEVICE SEGVIT_INLINE MarginTerms margin_terms(float m) {
  const SigmoidPair sp = sigmoid_pair(m);
  MarginTerms r;
  r.u = sp.s;
  r.p_t = sp.sn;
  r.spv = (m > 0.0f ? m : 0.0f) + log1p_unit(sp.e);
  return r;
}

// What the forward pass sums per (image, class): focal, sigmoid * t, sigmoid (t is summed by the caller).
struct PixelForward {
  float prob;   // sigmoid(x)
  float focal;  // focal term of the pixel (not yet divided by the pixel count)
};

// Infinite logits follow eager's formula, ATen's BCEWithLogits(x, t) = (1 - t) x + log1p(exp(-|x|)) + max(-x, 0):
// NaN for x = -inf (inf - inf or 0 * inf) and for x = +inf with t = 1 (0 * inf); for x = +inf with t = 0 it is
// inf, as the margin formula gives (times the class weight: NaN if that is 0, as in eager). The margin formula
// alone would give a finite 0 or inf there. A NaN x gives NaN through every term.
SEGVIT_HOST_DEVICE SEGVIT_INLINE bool eager_focal_is_nan(float x, bool target) {
  const float inf = float_from_bits(0x7f800000);
  return x == -inf || (target && x == inf);
}

template <bool kSquare>
SEGVIT_HOST_DEVICE SEGVIT_INLINE PixelForward pixel_forward(float x, bool target, const FocalParams& fp) {
  const MarginTerms mt = margin_terms(target ? -x : x);
  PixelForward r;
  r.prob = target ? mt.p_t : mt.u;
  r.focal = (target ? fp.weight_pos : fp.weight_neg) * mt.spv * focal_modulator<kSquare>(mt.u, fp.gamma);
  r.focal = eager_focal_is_nan(x, target) ? float_from_bits(0x7fc00000) : r.focal;  // a select, no branch
  return r;
}

// Gradient of one pixel's logit given the upstream gradients of the per-(image, class) sums:
//   g = g_focal * d focal / dx + (g_prob + g_prob_target * t) * s * sn
// where g_focal, g_prob_target, g_prob are d loss / d (sum focal), d loss / d (sum sigmoid * t), d loss / d (sum sigmoid).
template <bool kSquare>
SEGVIT_HOST_DEVICE SEGVIT_INLINE float pixel_backward(float x, bool target, const FocalParams& fp, float g_focal,
                                                     float g_prob_target, float g_prob) {
  const MarginTerms mt = margin_terms(target ? -x : x);
  // d focal / dm; dm / dx = -1 for t = 1, folded into the signed weight.
  // At an infinite x eager's focal term is NaN or inf (see pixel_forward) and so is its gradient: NaN.
  const float inf = float_from_bits(0x7f800000);
  float d_focal_dm = focal_modulator<kSquare>(mt.u, fp.gamma) * (mt.u + fp.gamma * mt.spv * mt.p_t);
  d_focal_dm = (x == inf || x == -inf) ? float_from_bits(0x7fc00000) : d_focal_dm;
  const float signed_weight = target ? -fp.weight_pos : fp.weight_neg;
  const float g_prob_total = target ? g_prob + g_prob_target : g_prob;
  return g_focal * signed_weight * d_focal_dm + g_prob_total * (mt.u * mt.p_t);
}

// bilinear(plane)[dst] for one destination pixel from its row and column taps, in ATen's order (horizontal lerps
// of the two source rows, then the vertical lerp), as the CPU kernels compute it row by row.
template <typename T>
SEGVIT_HOST_DEVICE SEGVIT_INLINE float bilinear_sample(const T* plane, int64_t w, const BilinearTap& ty,
                                                       const BilinearTap& tx) {
  const T* row0 = plane + ty.i0 * w;
  const T* row1 = plane + ty.i1 * w;
  const float top = static_cast<float>(row0[tx.i0]) * tx.lambda0 + static_cast<float>(row0[tx.i1]) * tx.lambda1;
  const float bottom = static_cast<float>(row1[tx.i0]) * tx.lambda0 + static_cast<float>(row1[tx.i1]) * tx.lambda1;
  return top * ty.lambda0 + bottom * ty.lambda1;
}

// Adjoint of the bilinear taps: the destination indices dst in [lo, hi) whose taps read source index src (i0 == src
// or i1 == src). Taps are non-decreasing in dst (float rounding is monotone) and i1 <= i0 + 1, so that set is one
// range, found by two binary searches. Lets a kernel gather, in a fixed order, the contributions to one source
// element instead of scattering them (deterministic without atomics).
struct IndexRange {
  int64_t lo;
  int64_t hi;
};

SEGVIT_HOST_DEVICE inline IndexRange bilinear_adjoint_range(int64_t src, int64_t in_size, int64_t out_size, float scale) {
  // First dst with i1(dst) >= src.
  int64_t lo = 0, hi = out_size;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (bilinear_tap(mid, in_size, out_size, scale).i1 >= src) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  IndexRange r;
  r.lo = lo;
  // First dst with i0(dst) > src.
  hi = out_size;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (bilinear_tap(mid, in_size, out_size, scale).i0 > src) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  r.hi = lo;
  return r;
}

// The weight with which destination dst reads source src (0 when it does not; both weights when i0 == i1 == src).
SEGVIT_HOST_DEVICE SEGVIT_INLINE float bilinear_weight(const BilinearTap& t, int64_t src) {
  return (t.i0 == src ? t.lambda0 : 0.0f) + (t.i1 == src ? t.lambda1 : 0.0f);
}

}  // namespace segvit
