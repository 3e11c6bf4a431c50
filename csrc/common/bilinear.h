// Per-element bilinear source-index math shared by the CPU kernels and (future) CUDA kernels.
//
// Reproduces PyTorch's upsample_bilinear2d rule for align_corners=False, as computed by
// ATen/native/UpSample.h (area_pixel_compute_scale, area_pixel_compute_source_index,
// guard_index_and_lambda, compute_source_index_and_lambda) with opmath = float:
//   scale   = (float)in / out
//   src     = max(scale * (dst + 0.5f) - 0.5f, 0)
//   i0      = min((int)src, in - 1),  i1 = i0 + (i0 < in - 1)
//   lambda1 = clamp(src - i0, 0, 1),  lambda0 = 1 - lambda1
// and PyTorch's in == out shortcut (i1 = i0, lambda1 = 0), so a non-finite neighbour never leaks in through a
// zero weight. The scale is computed in float, not double, because that is what ATen does for float and
// bfloat16 inputs: computing it in double would move some source positions by one float ulp.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGVIT_HOST_DEVICE __host__ __device__
#else
#define SEGVIT_HOST_DEVICE
#endif

namespace segvit {

struct BilinearTap {
  int64_t i0;
  int64_t i1;
  float lambda0;  // weight of i0
  float lambda1;  // weight of i1
};

SEGVIT_HOST_DEVICE inline float bilinear_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

SEGVIT_HOST_DEVICE inline BilinearTap bilinear_tap(int64_t dst, int64_t in_size, int64_t out_size, float scale) {
  BilinearTap t;
  if (in_size == out_size) {
    t.i0 = dst;
    t.i1 = dst;
    t.lambda0 = 1.0f;
    t.lambda1 = 0.0f;
    return t;
  }
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.0f ? 0.0f : src;
  // src >= 0, so truncation is floor.
  int64_t i0 = static_cast<int64_t>(src);
  i0 = i0 < in_size - 1 ? i0 : in_size - 1;
  float lambda1 = src - static_cast<float>(i0);
  lambda1 = lambda1 < 0.0f ? 0.0f : (lambda1 > 1.0f ? 1.0f : lambda1);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.lambda1 = lambda1;
  t.lambda0 = 1.0f - lambda1;
  return t;
}

SEGVIT_HOST_DEVICE inline BilinearTap bilinear_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  return bilinear_tap(dst, in_size, out_size, bilinear_scale(in_size, out_size));
}

}  // namespace segvit
