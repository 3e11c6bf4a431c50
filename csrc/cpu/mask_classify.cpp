// CPU kernel of segvit::mask_classify (CONTRACT.md, op 3):
//   out[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(bilinear(mask_logits[b, q], (Hout, Wout))), c < K.
//
// Never materializes the (B, Q, Hout, Wout) upsampled masks. Work is split over (b, block of R output rows); each
// thread fills a float32 scratch S (Q x R*Wout) with sigmoid(bilinear(...)) for its rows (horizontal pass on the
// few source rows involved, then vertical pass: ATen's order of operations), then one GEMM
// probs_b (K x Q) @ S (Q x R*Wout) gives the output tile. R is chosen so that S stays in L2.
//
// ISA strategy (the built extension must run on any x86_64, so no -march=native): the file is compiled for the
// generic target. The two ISA-sensitive parts go to code that PyTorch already dispatches at runtime: the GEMM to
// at::mm (MKL/BLAS) and the sigmoid to at::sigmoid_ (ATen's AVX2/AVX512 DispatchStub kernels). The bilinear loops
// written here additionally get a runtime-selected AVX2 clone via GCC/clang `target_clones` (an ifunc; x86_64
// Linux only, otherwise they are plain generic code).
//
// Only ATen headers here: torch/extension.h lives in csrc/bindings.cpp alone, which keeps this file quick to build.
#include "cpu/mask_classify.h"
#include "cpu/sequential_blas.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/bilinear.h"
#include "cpu/arch_clones.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SEGVIT_NO_TARGET_CLONES)
#define SEGVIT_HAVE_TARGET_CLONES 1
#define SEGVIT_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SEGVIT_HAVE_TARGET_CLONES 0
#define SEGVIT_ISA_CLONES
#endif


namespace segvit::cpu {
namespace {


// Output pixels per row block: Q * kTargetPixels floats of scratch (150 queries -> 2.4 MB) sit in L2.
constexpr int64_t kTargetPixels = 4096;

// dst[x] = src[x0[x]] * l0[x] + src[x1[x]] * l1[x]: one source row, horizontally (same order of operations as ATen).
SEGVIT_ISA_CLONES
void lerp_columns(const float* __restrict src, const int32_t* __restrict x0, const int32_t* __restrict x1,
                  const float* __restrict l0, const float* __restrict l1, int64_t n, float* __restrict dst) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = src[x0[x]] * l0[x] + src[x1[x]] * l1[x];
  }
}

// dst[x] = top[x] * l0 + bottom[x] * l1: two horizontally interpolated rows, vertically (top may equal bottom).
SEGVIT_ISA_CLONES
void lerp_rows(const float* __restrict top, const float* __restrict bottom, float l0, float l1, int64_t n,
               float* __restrict dst) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = top[x] * l0 + bottom[x] * l1;
  }
}

void check_inputs(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size) {
  TORCH_CHECK(class_logits.defined() && mask_logits.defined(),
              "segvit::mask_classify: class_logits and mask_logits must be defined tensors");
  TORCH_CHECK(class_logits.device().is_cpu(), "segvit::mask_classify (CPU kernel): class_logits must be a CPU tensor, got ",
              class_logits.device());
  TORCH_CHECK(mask_logits.device().is_cpu(), "segvit::mask_classify (CPU kernel): mask_logits must be a CPU tensor, got ",
              mask_logits.device());
  TORCH_CHECK(class_logits.dim() == 3, "segvit::mask_classify: class_logits must be 3-D (B, Q, K+1), got shape ",
              class_logits.sizes());
  TORCH_CHECK(mask_logits.dim() == 4, "segvit::mask_classify: mask_logits must be 4-D (B, Q, h, w), got shape ",
              mask_logits.sizes());
  const auto dtype = class_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "segvit::mask_classify (CPU kernel): class_logits must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(mask_logits.scalar_type() == dtype,
              "segvit::mask_classify: mask_logits must have the dtype of class_logits (", dtype, "), got ",
              mask_logits.scalar_type());
  TORCH_CHECK(class_logits.size(0) == mask_logits.size(0),
              "segvit::mask_classify: class_logits and mask_logits must have the same batch size B, got ",
              class_logits.size(0), " (class_logits ", class_logits.sizes(), ") and ", mask_logits.size(0),
              " (mask_logits ", mask_logits.sizes(), ")");
  TORCH_CHECK(class_logits.size(1) == mask_logits.size(1),
              "segvit::mask_classify: class_logits and mask_logits must have the same number of queries Q, got ",
              class_logits.size(1), " (class_logits ", class_logits.sizes(), ") and ", mask_logits.size(1),
              " (mask_logits ", mask_logits.sizes(), ")");
  TORCH_CHECK(class_logits.size(1) >= 1, "segvit::mask_classify: the number of queries Q must be >= 1, got class_logits ",
              class_logits.sizes(), " and mask_logits ", mask_logits.sizes());
  TORCH_CHECK(class_logits.size(2) >= 2,
              "segvit::mask_classify: class_logits must have K+1 >= 2 classes in its last dim (K classes plus "
              "\"no object\"), got shape ",
              class_logits.sizes());
  TORCH_CHECK(mask_logits.size(2) >= 1 && mask_logits.size(3) >= 1,
              "segvit::mask_classify: mask_logits must have a non-empty (h, w) grid, got shape ", mask_logits.sizes());
  TORCH_CHECK(mask_logits.size(2) <= std::numeric_limits<int32_t>::max() &&
                  mask_logits.size(3) <= std::numeric_limits<int32_t>::max(),
              "segvit::mask_classify: mask_logits grid too large: ", mask_logits.sizes());
  TORCH_CHECK(out_size.size() == 2, "segvit::mask_classify: out_size must be two ints (Hout, Wout), got ", out_size);
  TORCH_CHECK(out_size[0] >= 1 && out_size[1] >= 1,
              "segvit::mask_classify: out_size must be two positive ints (Hout, Wout), got ", out_size);
}

template <typename scalar_t>
void mask_classify_kernel(const at::Tensor& probs,         // (B, K, Q) float32, contiguous
                          const at::Tensor& mask_logits,   // (B, Q, h, w) scalar_t, contiguous
                          at::Tensor& out) {               // (B, K, Hout, Wout) scalar_t, contiguous
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t K = out.size(1), Hout = out.size(2), Wout = out.size(3);
  const int64_t plane = Hout * Wout;
  constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;

  // Horizontal taps, shared by every row of every mask.
  std::vector<int32_t> col0(Wout), col1(Wout);
  std::vector<float> colw0(Wout), colw1(Wout);
  const float scale_w = segvit::bilinear_scale(w, Wout);
  for (int64_t x = 0; x < Wout; ++x) {
    const auto t = segvit::bilinear_tap(x, w, Wout, scale_w);
    col0[x] = static_cast<int32_t>(t.i0);
    col1[x] = static_cast<int32_t>(t.i1);
    colw0[x] = t.lambda0;
    colw1[x] = t.lambda1;
  }
  const float scale_h = segvit::bilinear_scale(h, Hout);

  // Rows per block: enough pixels for an efficient GEMM, small enough for L2, and enough blocks to feed every thread.
  int64_t rows_per_block = std::clamp<int64_t>(kTargetPixels / Wout, 1, Hout);
  const int64_t min_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  while (rows_per_block > 1 && B * ((Hout + rows_per_block - 1) / rows_per_block) < min_tasks) {
    rows_per_block = (rows_per_block + 1) / 2;
  }
  const int64_t n_blocks = (Hout + rows_per_block - 1) / rows_per_block;

  const float* probs_ptr = probs.const_data_ptr<float>();
  const scalar_t* mask_ptr = mask_logits.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto out_opts = at::TensorOptions().dtype(out.scalar_type());

  at::parallel_for(0, B * n_blocks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's InferenceMode; every tensor below wraps raw memory (from_blob),
    // so the at:: calls never touch a caller's (possibly inference) tensor, and this guard skips autograd work.
    c10::InferenceMode inference_guard;
    SequentialBlasGuard sequential_blas;
    const int64_t max_pixels = rows_per_block * Wout;
    std::vector<float> scratch(static_cast<size_t>(Q * max_pixels));           // S: sigmoid(bilinear) for Q masks
    std::vector<float> hrows(static_cast<size_t>(2 * rows_per_block * Wout));  // horizontally interpolated source rows
    std::vector<float> src_row(kIsFloat ? 0 : static_cast<size_t>(w));        // one bfloat16 source row as float
    // GEMM result. Writing it to `out` afterwards (rather than letting BLAS write the strided, never-touched output
    // directly, which it reads and zeroes first) measured ~10% faster for float32; for bfloat16 it is the rounding.
    std::vector<float> tile(static_cast<size_t>(K * max_pixels));
    std::vector<int64_t> source_rows;                                          // distinct source rows of a block
    std::vector<int64_t> slot0(rows_per_block), slot1(rows_per_block);
    std::vector<float> roww0(rows_per_block), roww1(rows_per_block);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_blocks;
      const int64_t r0 = (task % n_blocks) * rows_per_block;
      const int64_t n_rows = std::min(rows_per_block, Hout - r0);
      const int64_t pixels = n_rows * Wout;

      // Vertical taps of this block. Taps are non-decreasing in the output row and i1 <= i0 + 1, so a source
      // row already seen is one of the last two recorded; the list stays sorted and holds at most 2 * n_rows rows.
      source_rows.clear();
      auto slot_of = [&](int64_t row) -> int64_t {
        for (int64_t j = static_cast<int64_t>(source_rows.size()) - 1; j >= 0 && source_rows[j] >= row; --j) {
          if (source_rows[j] == row) return j;
        }
        source_rows.push_back(row);
        return static_cast<int64_t>(source_rows.size()) - 1;
      };
      for (int64_t rr = 0; rr < n_rows; ++rr) {
        const auto t = segvit::bilinear_tap(r0 + rr, h, Hout, scale_h);
        slot0[rr] = slot_of(t.i0);
        slot1[rr] = slot_of(t.i1);
        roww0[rr] = t.lambda0;
        roww1[rr] = t.lambda1;
      }
      TORCH_INTERNAL_ASSERT(static_cast<int64_t>(source_rows.size()) <= 2 * rows_per_block);

      for (int64_t q = 0; q < Q; ++q) {
        const scalar_t* mask = mask_ptr + (b * Q + q) * h * w;
        for (size_t j = 0; j < source_rows.size(); ++j) {
          const float* row;
          if constexpr (kIsFloat) {
            row = mask + source_rows[j] * w;
          } else {
            const scalar_t* in = mask + source_rows[j] * w;
            for (int64_t x = 0; x < w; ++x) src_row[x] = static_cast<float>(in[x]);
            row = src_row.data();
          }
          lerp_columns(row, col0.data(), col1.data(), colw0.data(), colw1.data(), Wout, hrows.data() + j * Wout);
        }
        float* upsampled = scratch.data() + q * pixels;
        for (int64_t rr = 0; rr < n_rows; ++rr) {
          lerp_rows(hrows.data() + slot0[rr] * Wout, hrows.data() + slot1[rr] * Wout, roww0[rr], roww1[rr], Wout,
                    upsampled + rr * Wout);
        }
      }

      const at::Tensor masks_block = at::from_blob(scratch.data(), {Q, pixels}, f32);
      masks_block.sigmoid_();
      const at::Tensor probs_b = at::from_blob(const_cast<float*>(probs_ptr) + b * K * Q, {K, Q}, f32);
      at::Tensor acc = at::from_blob(tile.data(), {K, pixels}, f32);
      at::mm_out(acc, probs_b, masks_block);
      // The output tile out[b, :, r0:r0+n_rows, :] is K rows of `pixels` contiguous values, `plane` apart.
      at::Tensor out_tile = at::from_blob(out_ptr + b * K * plane + r0 * Wout, {K, pixels}, {plane, 1}, out_opts);
      out_tile.copy_(acc);
    }
  });
}

}  // namespace

at::Tensor mask_classify(const at::Tensor& class_logits, const at::Tensor& mask_logits, at::IntArrayRef out_size) {
  check_inputs(class_logits, mask_logits, out_size);
  // Non-contiguous inputs are accepted and copied to contiguous ones (.contiguous() is free when they already are).
  const at::Tensor masks = mask_logits.contiguous();
  const int64_t B = masks.size(0);
  const int64_t K = class_logits.size(2) - 1;
  at::Tensor out = at::empty({B, K, out_size[0], out_size[1]}, masks.options());
  if (out.numel() == 0) return out;
  // Class probabilities once, in float32, transposed to (B, K, Q): the left GEMM operand of each batch.
  const at::Tensor probs =
      at::softmax(class_logits.to(at::kFloat), -1).narrow(-1, 0, K).transpose(1, 2).contiguous();
  if (masks.scalar_type() == at::kFloat) {
    mask_classify_kernel<float>(probs, masks, out);
  } else {
    mask_classify_kernel<at::BFloat16>(probs, masks, out);
  }
  return out;
}

std::string isa_info() {
  std::string info = "generic target (-O3 -fno-trapping-math, no -march)";
#if SEGVIT_HAVE_TARGET_CLONES
  __builtin_cpu_init();
  info += std::string("; bilinear loops: target_clones(avx2, default), this CPU runs the ") +
          (__builtin_cpu_supports("avx2") ? "avx2" : "default") + " clone";
#if SEGVIT_HAVE_ARCH_CLONES
  // The attention and mask-loss loops (csrc/cpu/atm_attention.cpp, mask_losses.cpp): csrc/cpu/arch_clones.h.
  const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
  info += std::string("; attention and loss loops: target_clones(x86-64-v4, x86-64-v3, default), this CPU runs ") +
          (v4 ? "x86-64-v4" : v3 ? "x86-64-v3" : "default");
#endif
#else
  info += "; bilinear loops: generic only (no target_clones on this platform/compiler)";
#endif
  info += "; GEMM: at::mm (BLAS), sigmoid: ATen kernels (runtime CPU capability " + at::get_cpu_capability() + ")";
  return info;
}

}  // namespace segvit::cpu
