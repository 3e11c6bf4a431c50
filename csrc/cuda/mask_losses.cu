// CUDA kernels of segvit::mask_loss_stats and segvit::mask_loss_stats_backward (the statistics behind
// segvit.ops.mask_losses, CONTRACT.md op 4; what they compute is documented in csrc/cpu/mask_losses.h).
//
// Built by setup.py only with a CUDA torch; on the development machine (CPU torch, no GPU) they are compiled for
// sm_80 and sm_90 by csrc/compile_check.py but never run. Their per-pixel math (bilinear taps, focal and sigmoid
// terms and derivatives, adjoint ranges) is csrc/common/mask_loss_math.h, which the tested CPU kernels use.
//
// Forward: the present (image, class) pairs come from a presence kernel over the labels and at::nonzero (one host
// sync, which also reports invalid label values). One block per (pair, band of label rows); each thread owns a fixed
// strided set of the band's pixels, computes the upsampled logit on the fly and sums the four statistics; the block
// reduces them with a fixed shuffle tree into per-(pair, band) partials, and a second kernel adds the partials of
// each pair in band order in float64. No atomics, so results are bitwise reproducible.
//
// Backward: separable adjoint of the upsampling, as gathers (deterministic, no atomics):
//   kernel 1, per (pair, band of label rows): H[y, i] = sum over the label columns x that read low-res column i of
//     weight(x, i) * g(y, x), with g the per-pixel gradient recomputed on the fly (each label pixel feeds at most two
//     columns, so g is evaluated at most twice); H is (pairs, Hl, w) float32, 1/16 of the upsampled size at the
//     SegViT shapes.
//   kernel 2, per low-res pixel (j, i): grad[j, i] = sum over the label rows y that read row j of weight(y, j) H[y, i].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "common/bilinear.h"
#include "common/mask_loss_math.h"
#include "cpu/attention.h"  // attention::poison_for_tests
#include "cuda/kernels.h"

namespace segvit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Label pixels per forward block: ~15 per thread, enough blocks (thousands at the SegViT shapes) for any GPU.
constexpr int64_t kBandPixels = 4096;
// (label row, low-res column) items per backward block of kernel 1.
constexpr int64_t kBandItems = 1024;

__global__ void presence_kernel(const int64_t* __restrict__ labels, int64_t n_pixels_per_image, int64_t n_total,
                                int64_t K, int64_t ignore_index, int32_t* __restrict__ flags,
                                int32_t* __restrict__ invalid) {
  // flags[b * K + c] = 1 when class c occurs in image b; *invalid = 1 when some label is out of range. Every writer
  // of a flag stores the same value, so the unordered stores are benign.
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = labels[i];
    if (v == ignore_index) continue;
    if (v < 0 || v >= K) {
      *invalid = 1;
    } else {
      flags[(i / n_pixels_per_image) * K + v] = 1;
    }
  }
}

// Sums v[0..3] over the block with a fixed tree (the same order every run). Result valid in thread 0.
__device__ void block_sum4(float v[4]) {
  __shared__ float warp_sums[kWarps][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) warp_sums[warp][k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += warp_sums[w][k];
      v[k] = s;
    }
  }
}

template <typename scalar_t, bool kSquare>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                 const int64_t* __restrict__ pairs, float* __restrict__ partial, int64_t K, int64_t h, int64_t w,
                 int64_t Hl, int64_t Wl, int64_t rows_per_band, int64_t n_bands, float scale_h, float scale_w,
                 FocalParams fp) {
  const int64_t pair = blockIdx.x, band = blockIdx.y;
  const int64_t b = pairs[2 * pair], c = pairs[2 * pair + 1];
  const scalar_t* plane = logits + (b * K + c) * h * w;
  const int64_t y0 = band * rows_per_band;
  const int64_t n_rows = min(rows_per_band, Hl - y0);
  const int64_t* lab = labels + (b * Hl + y0) * Wl;
  // The band holds at most kBandPixels + Wl pixels (checked on the host), so 32-bit indices suffice here.
  const int32_t n = static_cast<int32_t>(n_rows * Wl), width = static_cast<int32_t>(Wl);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int32_t idx = threadIdx.x; idx < n; idx += kThreads) {
    const int32_t row = idx / width, x = idx - row * width;
    const BilinearTap ty = bilinear_tap(y0 + row, h, Hl, scale_h);
    const BilinearTap tx = bilinear_tap(x, w, Wl, scale_w);
    const bool t = lab[idx] == c;
    const PixelForward r = pixel_forward<kSquare>(bilinear_sample(plane, w, ty, tx), t, fp);
    acc[0] += r.focal;
    acc[1] += t ? r.prob : 0.0f;
    acc[2] += r.prob;
    acc[3] += t ? 1.0f : 0.0f;
  }
  block_sum4(acc);
  if (threadIdx.x == 0) {
    float* out = partial + (pair * n_bands + band) * 4;
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = acc[k];
  }
}

// stats[b, c, k] = sum over bands (in order, float64) of the partials of pair (b, c).
__global__ void finish_stats_kernel(const float* __restrict__ partial, const int64_t* __restrict__ pairs,
                                    int64_t n_pairs, int64_t n_bands, int64_t K, double* __restrict__ stats) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (item >= n_pairs * 4) return;
  const int64_t pair = item / 4, k = item % 4;
  double s = 0.0;
  for (int64_t band = 0; band < n_bands; ++band) s += partial[(pair * n_bands + band) * 4 + k];
  stats[(pairs[2 * pair] * K + pairs[2 * pair + 1]) * 4 + k] = s;
}

// Kernel 1 of the backward: H[pair, y, i] for the label rows of one band.
template <typename scalar_t, bool kSquare>
__global__ void __launch_bounds__(kThreads)
    columns_adjoint_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                           const int64_t* __restrict__ pairs, const double* __restrict__ grad_stats,
                           float* __restrict__ hgrad, int64_t K, int64_t h, int64_t w, int64_t Hl, int64_t Wl,
                           int64_t rows_per_band, float scale_h, float scale_w, FocalParams fp) {
  const int64_t pair = blockIdx.x, band = blockIdx.y;
  const int64_t b = pairs[2 * pair], c = pairs[2 * pair + 1];
  const scalar_t* plane = logits + (b * K + c) * h * w;
  const double* gc = grad_stats + (b * K + c) * 4;
  const float g_focal = static_cast<float>(gc[0]), g_prob_target = static_cast<float>(gc[1]),
              g_prob = static_cast<float>(gc[2]);
  const int64_t y0 = band * rows_per_band;
  const int64_t n = min(rows_per_band, Hl - y0) * w;
  for (int64_t item = threadIdx.x; item < n; item += kThreads) {
    const int64_t y = y0 + item / w, i = item % w;
    const BilinearTap ty = bilinear_tap(y, h, Hl, scale_h);
    const int64_t* lab = labels + (b * Hl + y) * Wl;
    const IndexRange cols = bilinear_adjoint_range(i, w, Wl, scale_w);
    float sum = 0.0f;
    for (int64_t x = cols.lo; x < cols.hi; ++x) {
      const BilinearTap tx = bilinear_tap(x, w, Wl, scale_w);
      const float g = pixel_backward<kSquare>(bilinear_sample(plane, w, ty, tx), lab[x] == c, fp, g_focal,
                                              g_prob_target, g_prob);
      sum += bilinear_weight(tx, i) * g;
    }
    hgrad[(pair * Hl + y) * w + i] = sum;
  }
}

// Kernel 2 of the backward: grad[b, c, j, i] = sum over label rows y reading row j of weight(y, j) H[pair, y, i].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rows_adjoint_kernel(const float* __restrict__ hgrad, const int64_t* __restrict__ pairs,
                        scalar_t* __restrict__ grad, int64_t K, int64_t h, int64_t w, int64_t Hl, float scale_h) {
  const int64_t pair = blockIdx.x;
  const int64_t item = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= h * w) return;
  const int64_t j = item / w, i = item % w;
  const IndexRange rows = bilinear_adjoint_range(j, h, Hl, scale_h);
  float sum = 0.0f;
  for (int64_t y = rows.lo; y < rows.hi; ++y) {
    sum += bilinear_weight(bilinear_tap(y, h, Hl, scale_h), j) * hgrad[(pair * Hl + y) * w + i];
  }
  grad[(pairs[2 * pair] * K + pairs[2 * pair + 1]) * h * w + item] = static_cast<scalar_t>(sum);
}

const char* kOp = "segvit::mask_loss_stats";

void check_inputs(const char* op, const at::Tensor& mask_logits, const at::Tensor& labels) {
  TORCH_CHECK(mask_logits.defined() && labels.defined(), op, ": mask_logits and labels must be defined tensors");
  TORCH_CHECK(mask_logits.is_cuda(), op, " (CUDA kernel): mask_logits must be a CUDA tensor, got ",
              mask_logits.device());
  TORCH_CHECK(labels.device() == mask_logits.device(), op, " (CUDA kernel): labels must be on ", mask_logits.device(),
              " (as mask_logits), got ", labels.device());
  TORCH_CHECK(mask_logits.dim() == 4, op, ": mask_logits must be 4-D (B, K, h, w), got shape ", mask_logits.sizes());
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be 3-D (B, Hl, Wl), got shape ", labels.sizes());
  const auto dtype = mask_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              " (CUDA kernel): mask_logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(mask_logits.size(0) == labels.size(0), op,
              ": mask_logits and labels must have the same batch size B, got ", mask_logits.size(0), " (mask_logits ",
              mask_logits.sizes(), ") and ", labels.size(0), " (labels ", labels.sizes(), ")");
  TORCH_CHECK(mask_logits.size(2) >= 1 && mask_logits.size(3) >= 1, op,
              ": mask_logits must have a non-empty (h, w) grid, got shape ", mask_logits.sizes());
  TORCH_CHECK(labels.size(1) >= 1 && labels.size(2) >= 1, op,
              ": labels must have a non-empty (Hl, Wl) size, got shape ", labels.sizes());
  // 32-bit pixel indices inside a forward band (at most kBandPixels + Wl pixels).
  TORCH_CHECK(labels.size(2) < std::numeric_limits<int32_t>::max() / 2, op,
              ": labels too wide for the CUDA kernel's 32-bit band indices: ", labels.sizes());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dispatches on the logits dtype (float32, float16, bfloat16) and on gamma == 2.
template <typename Fn>
void dispatch(at::ScalarType dtype, bool square, Fn&& fn) {
  auto with_dtype = [&](auto square_tag) {
    switch (dtype) {
      case at::kFloat:
        fn(float{}, square_tag);
        break;
      case at::kHalf:
        fn(at::Half{}, square_tag);
        break;
      case at::kBFloat16:
        fn(at::BFloat16{}, square_tag);
        break;
      default:
        TORCH_CHECK(false, "segvit::mask_loss_stats (CUDA kernel): unsupported dtype ", dtype);
    }
  };
  if (square) {
    with_dtype(std::true_type{});
  } else {
    with_dtype(std::false_type{});
  }
}

}  // namespace

at::Tensor mask_loss_stats(const at::Tensor& mask_logits, const at::Tensor& labels, int64_t ignore_index,
                           double alpha, double gamma) {
  check_inputs(kOp, mask_logits, labels);
  const c10::cuda::CUDAGuard guard(mask_logits.device());
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t Hl = labels.size(1), Wl = labels.size(2);
  at::Tensor stats = at::zeros({B, K, 4}, mask_logits.options().dtype(at::kDouble));
  if (B == 0) return stats;
  const at::Tensor logits = mask_logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor flags = at::zeros({B * K + 1}, lab.options().dtype(at::kInt));
  const int64_t n_total = B * Hl * Wl;
  const int64_t presence_blocks = std::min<int64_t>(ceil_div(n_total, kThreads), 4096);
  presence_kernel<<<presence_blocks, kThreads, 0, stream>>>(lab.const_data_ptr<int64_t>(), Hl * Wl, n_total, K,
                                                            ignore_index, flags.mutable_data_ptr<int32_t>(),
                                                            flags.mutable_data_ptr<int32_t>() + B * K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Synchronizes: the pair count sizes the grid (and the invalid-label flag is read with it).
  const at::Tensor pairs = at::nonzero(flags.narrow(0, 0, B * K).view({B, K})).contiguous();
  TORCH_CHECK(flags.narrow(0, B * K, 1).item<int32_t>() == 0, kOp, ": labels must hold values in [0, ", K,
              ") or ignore_index=", ignore_index, ", found another value");
  const int64_t n_pairs = pairs.size(0);
  if (n_pairs == 0) return stats;

  const int64_t rows_per_band = std::max<int64_t>(1, kBandPixels / Wl);
  const int64_t n_bands = ceil_div(Hl, rows_per_band);
  TORCH_CHECK(n_bands < 65536, kOp, ": labels too tall for the CUDA kernel's grid (", n_bands, " bands): ",
              labels.sizes());
  at::Tensor partial = at::empty({n_pairs, n_bands, 4}, logits.options().dtype(at::kFloat));
  segvit::cpu::attention::poison_for_tests(partial);  // tests: an unwritten band sum turns the stats NaN
  const FocalParams fp = focal_params(alpha, gamma);
  const float scale_h = bilinear_scale(h, Hl), scale_w = bilinear_scale(w, Wl);
  const dim3 grid(static_cast<unsigned>(n_pairs), static_cast<unsigned>(n_bands));
  dispatch(logits.scalar_type(), gamma == 2.0, [&](auto scalar, auto square) {
    using scalar_t = decltype(scalar);
    stats_kernel<scalar_t, decltype(square)::value><<<grid, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), pairs.const_data_ptr<int64_t>(),
        partial.mutable_data_ptr<float>(), K, h, w, Hl, Wl, rows_per_band, n_bands, scale_h, scale_w, fp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_stats_kernel<<<static_cast<unsigned>(ceil_div(n_pairs * 4, kThreads)), kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), pairs.const_data_ptr<int64_t>(), n_pairs, n_bands, K,
      stats.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

at::Tensor mask_loss_stats_backward(const at::Tensor& grad_stats, const at::Tensor& mask_logits,
                                    const at::Tensor& labels, const at::Tensor& stats, int64_t ignore_index,
                                    double alpha, double gamma) {
  const char* op = "segvit::mask_loss_stats_backward";
  check_inputs(op, mask_logits, labels);
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t Hl = labels.size(1), Wl = labels.size(2);
  for (const auto* named : {&grad_stats, &stats}) {
    const char* name = named == &stats ? "stats" : "grad_stats";
    TORCH_CHECK(named->defined() && named->device() == mask_logits.device(), op, ": ", name,
                " must be a tensor on ", mask_logits.device());
    TORCH_CHECK(named->dim() == 3 && named->size(0) == B && named->size(1) == K && named->size(2) == 4, op, ": ",
                name, " must have shape (B, K, 4) = (", B, ", ", K, ", 4), got ", named->sizes());
  }
  TORCH_CHECK(stats.scalar_type() == at::kDouble, op, ": stats must be float64, got ", stats.scalar_type());
  (void)ignore_index;  // the present pairs come from stats; labels equal to ignore_index never match a present class
  const c10::cuda::CUDAGuard guard(mask_logits.device());
  at::Tensor grad = at::zeros(mask_logits.sizes(), mask_logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return grad;
  const at::Tensor logits = mask_logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor gs = grad_stats.to(at::kDouble).contiguous();
  const at::Tensor pairs = at::nonzero(stats.select(2, 3) > 0).contiguous();  // synchronizes
  const int64_t n_pairs = pairs.size(0);
  if (n_pairs == 0) return grad;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const FocalParams fp = focal_params(alpha, gamma);
  const float scale_h = bilinear_scale(h, Hl), scale_w = bilinear_scale(w, Wl);

  const int64_t rows_per_band = std::max<int64_t>(1, kBandItems / w);
  const int64_t n_bands = ceil_div(Hl, rows_per_band);
  const int64_t plane_blocks = ceil_div(h * w, kThreads);
  TORCH_CHECK(n_bands < 65536 && plane_blocks < 65536, op, ": sizes too large for the CUDA kernel's grid: labels ",
              labels.sizes(), ", mask_logits ", mask_logits.sizes());
  at::Tensor hgrad = at::empty({n_pairs, Hl, w}, logits.options().dtype(at::kFloat));
  segvit::cpu::attention::poison_for_tests(hgrad);  // tests: an unwritten column adjoint turns the gradient NaN
  dispatch(logits.scalar_type(), gamma == 2.0, [&](auto scalar, auto square) {
    using scalar_t = decltype(scalar);
    columns_adjoint_kernel<scalar_t, decltype(square)::value>
        <<<dim3(static_cast<unsigned>(n_pairs), static_cast<unsigned>(n_bands)), kThreads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), pairs.const_data_ptr<int64_t>(),
            gs.const_data_ptr<double>(), hgrad.mutable_data_ptr<float>(), K, h, w, Hl, Wl, rows_per_band, scale_h,
            scale_w, fp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rows_adjoint_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(n_pairs), static_cast<unsigned>(plane_blocks)), kThreads, 0, stream>>>(
            hgrad.const_data_ptr<float>(), pairs.const_data_ptr<int64_t>(), grad.mutable_data_ptr<scalar_t>(), K, h,
            w, Hl, scale_h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace segvit::cuda
