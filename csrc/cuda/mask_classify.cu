// CUDA kernel of segvit::mask_classify (CONTRACT.md, op 3), forward only:
//   out[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(bilinear(mask_logits[b, q], (Hout, Wout))), c < K.
//
// Built by setup.py only with a CUDA torch; on the development machine (CPU torch, no GPU) it is compiled for sm_80
// and sm_90 by csrc/compile_check.py but never run. Its per-element math (bilinear taps and sample, sigmoid) is
// csrc/common/bilinear.h and csrc/common/mask_loss_math.h, which the tested CPU kernels use.
//
// The class probabilities (B, Q, K) are computed once by ATen's softmax in float32. The kernel is a tiled GEMM,
// out_b (K x P) = probs_b^T (K x Q) @ S_b (Q x P), whose right operand S = sigmoid(bilinear(masks)) is generated on the
// fly and never stored: a block owns a tile of kTileK classes x kTilePixels flattened output pixels of one image; for
// each chunk of kTileQ queries it loads the probabilities into shared memory, evaluates sigmoid(bilinear) for the
// chunk x tile into shared memory (the taps of its pixels are computed once per block), and every thread accumulates a
// 4 x 4 register tile in float32. The upsampled masks (B, Q, Hout, Wout) are never materialized; the mask logits
// (Q x h x w per image, 1.2 MB at the ViT-L shapes) are read through L2 by all tiles.
//
// At the ViT-L shapes (Q = K = 150, 640 x 640) the contraction is 2 K Q Hout Wout = 18 GFLOP per image against
// 246 MB of float32 output: with fp32 FMAs (19.5 TFLOP/s peak on A100) this kernel is compute-bound (~1-2 ms)
// while writing the output takes ~0.2 ms. A tensor-core version would change the inner product only: keep the
// sigmoid tile and the probabilities in shared memory as bf16/fp16 (TF32 for float32 inputs), pad K, Q and the
// pixel tile to the MMA shape (m16n8k16), load fragments with ldmatrix from a swizzled (bank-conflict-free) layout and
// issue mma.sync (wgmma fed by TMA on sm_90), double-buffering the next query chunk while the current one is
// multiplied; that is 8-16x the FMA throughput and brings the kernel to the output-write floor, at the price of
// rounding probabilities and masks to 8- or 10-bit mantissas before the float32 sum (within the tolerance the
// bf16 eager path already has, but not float32-exact).
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

constexpr int kTileK = 64;       // classes per block
constexpr int kTilePixels = 64;  // output pixels per block (flattened over Hout * Wout)
constexpr int kTileQ = 16;       // queries per shared-memory chunk
constexpr int kThreadsX = 16;    // threads along pixels
constexpr int kThreadsY = 16;    // threads along classes
constexpr int kThreads = kThreadsX * kThreadsY;
constexpr int kPerThread = 4;    // 4 classes x 4 pixels per thread: kTileK = kThreadsY * 4, kTilePixels = kThreadsX * 4
static_assert(kTileK == kThreadsY * kPerThread && kTilePixels == kThreadsX * kPerThread, "tile shape");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_classify_kernel(const float* __restrict__ probs,         // (B, Q, K) float32
                         const scalar_t* __restrict__ masks,      // (B, Q, h, w)
                         scalar_t* __restrict__ out,              // (B, K, Hout, Wout)
                         int64_t Q, int64_t K, int64_t h, int64_t w, int64_t Hout, int64_t Wout, float scale_h,
                         float scale_w) {
  __shared__ float prob_tile[kTileQ][kTileK];
  __shared__ float mask_tile[kTileQ][kTilePixels];
  __shared__ BilinearTap row_taps[kTilePixels];
  __shared__ BilinearTap col_taps[kTilePixels];

  const int64_t plane = Hout * Wout;
  const int64_t p0 = blockIdx.x * static_cast<int64_t>(kTilePixels);
  const int64_t k0 = blockIdx.y * static_cast<int64_t>(kTileK);
  const int64_t b = blockIdx.z;
  const int tid = threadIdx.y * kThreadsX + threadIdx.x;

  for (int p = tid; p < kTilePixels; p += kThreads) {
    // Pixels past the end get the taps of the last pixel: valid reads, results never stored.
    const int64_t pixel = min(p0 + p, plane - 1);
    row_taps[p] = bilinear_tap(pixel / Wout, h, Hout, scale_h);
    col_taps[p] = bilinear_tap(pixel % Wout, w, Wout, scale_w);
  }

  float acc[kPerThread][kPerThread] = {};
  const float* probs_b = probs + b * Q * K;
  const scalar_t* masks_b = masks + b * Q * h * w;
  for (int64_t q0 = 0; q0 < Q; q0 += kTileQ) {
    __syncthreads();  // the previous chunk's tiles are consumed (and, the first time, the taps are written)
    for (int e = tid; e < kTileQ * kTileK; e += kThreads) {
      const int q = e / kTileK, k = e % kTileK;
      prob_tile[q][k] = (q0 + q < Q && k0 + k < K) ? probs_b[(q0 + q) * K + k0 + k] : 0.0f;
    }
    for (int e = tid; e < kTileQ * kTilePixels; e += kThreads) {
      const int q = e / kTilePixels, p = e % kTilePixels;
      mask_tile[q][p] = q0 + q < Q ? sigmoid(bilinear_sample(masks_b + (q0 + q) * h * w, w, row_taps[p], col_taps[p]))
                                   : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kTileQ; ++q) {
      float a[kPerThread], m[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a[i] = prob_tile[q][threadIdx.y + i * kThreadsY];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) m[j] = mask_tile[q][threadIdx.x + j * kThreadsX];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] += a[i] * m[j];
      }
    }
  }

  // Threads adjacent in x write adjacent pixels of the same class row (coalesced).
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t k = k0 + threadIdx.y + i * kThreadsY;
    if (k >= K) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t pixel = p0 + threadIdx.x + j * kThreadsX;
      if (pixel < plane) out[(b * K + k) * plane + pixel] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

void check_inputs(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size) {
  const char* op = "segvit::mask_classify (CUDA kernel)";
  TORCH_CHECK(class_logits.defined() && mask_logits.defined(), op, ": class_logits and mask_logits must be defined");
  TORCH_CHECK(class_logits.is_cuda(), op, ": class_logits must be a CUDA tensor, got ", class_logits.device());
  TORCH_CHECK(mask_logits.device() == class_logits.device(), op, ": mask_logits must be on ", class_logits.device(),
              " (as class_logits), got ", mask_logits.device());
  TORCH_CHECK(class_logits.dim() == 3, op, ": class_logits must be 3-D (B, Q, K+1), got shape ", class_logits.sizes());
  TORCH_CHECK(mask_logits.dim() == 4, op, ": mask_logits must be 4-D (B, Q, h, w), got shape ", mask_logits.sizes());
  const auto dtype = class_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": class_logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(mask_logits.scalar_type() == dtype, op, ": mask_logits must have the dtype of class_logits (", dtype,
              "), got ", mask_logits.scalar_type());
  TORCH_CHECK(class_logits.size(0) == mask_logits.size(0), op,
              ": class_logits and mask_logits must have the same batch size B, got ", class_logits.sizes(), " and ",
              mask_logits.sizes());
  TORCH_CHECK(class_logits.size(1) == mask_logits.size(1), op,
              ": class_logits and mask_logits must have the same number of queries Q, got ", class_logits.sizes(),
              " and ", mask_logits.sizes());
  TORCH_CHECK(class_logits.size(1) >= 1, op, ": the number of queries Q must be >= 1, got ", class_logits.sizes());
  TORCH_CHECK(class_logits.size(2) >= 2, op, ": class_logits must have K+1 >= 2 classes in its last dim, got shape ",
              class_logits.sizes());
  TORCH_CHECK(mask_logits.size(2) >= 1 && mask_logits.size(3) >= 1, op,
              ": mask_logits must have a non-empty (h, w) grid, got shape ", mask_logits.sizes());
  TORCH_CHECK(out_size.size() == 2, op, ": out_size must be two ints (Hout, Wout), got ", out_size);
  TORCH_CHECK(out_size[0] >= 1 && out_size[1] >= 1, op, ": out_size must be two positive ints (Hout, Wout), got ",
              out_size);
  const int64_t K = class_logits.size(2) - 1;
  TORCH_CHECK((K + kTileK - 1) / kTileK < 65536 && class_logits.size(0) < 65536 &&
                  (out_size[0] * out_size[1] + kTilePixels - 1) / kTilePixels < std::numeric_limits<int32_t>::max(),
              op, ": sizes too large for the CUDA grid: class_logits ", class_logits.sizes(), ", out_size ", out_size);
}

}  // namespace

at::Tensor mask_classify(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size) {
  check_inputs(class_logits, mask_logits, out_size);
  const c10::cuda::CUDAGuard guard(class_logits.device());
  const at::Tensor masks = mask_logits.contiguous();
  const int64_t B = masks.size(0), Q = masks.size(1), h = masks.size(2), w = masks.size(3);
  const int64_t K = class_logits.size(2) - 1, Hout = out_size[0], Wout = out_size[1];
  at::Tensor out = at::empty({B, K, Hout, Wout}, masks.options());
  if (out.numel() == 0) return out;
  segvit::cpu::attention::poison_for_tests(out);  // tests: an unwritten score stays NaN
  // (B, Q, K) float32: each chunk of queries loads K contiguous probabilities per query.
  const at::Tensor probs = at::softmax(class_logits.to(at::kFloat), -1).narrow(-1, 0, K).contiguous();
  const dim3 grid(static_cast<unsigned>((Hout * Wout + kTilePixels - 1) / kTilePixels),
                  static_cast<unsigned>((K + kTileK - 1) / kTileK), static_cast<unsigned>(B));
  const dim3 block(kThreadsX, kThreadsY);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale_h = bilinear_scale(h, Hout), scale_w = bilinear_scale(w, Wout);
  auto launch = [&](auto scalar) {
    using scalar_t = decltype(scalar);
    mask_classify_kernel<scalar_t><<<grid, block, 0, stream>>>(probs.const_data_ptr<float>(),
                                                               masks.const_data_ptr<scalar_t>(),
                                                               out.mutable_data_ptr<scalar_t>(), Q, K, h, w, Hout,
                                                               Wout, scale_h, scale_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (masks.scalar_type()) {
    case at::kFloat:
      launch(float{});
      break;
    case at::kHalf:
      launch(at::Half{});
      break;
    default:
      launch(at::BFloat16{});
      break;
  }
  return out;
}

}  // namespace segvit::cuda
