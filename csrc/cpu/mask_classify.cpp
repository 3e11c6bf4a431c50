// CPU kernel of segvit::mask_classify (CONTRACT.md, op 3):
//   out[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(bilinear(mask_logits[b, q], (Hout, Wout))), c < K.
//
// Never materializes the (B, Q, Hout, Wout) upsampled masks. Three paths, chosen at run time:
//
// * float32 on an x86_64 CPU with AVX-512 (F, DQ, BW, VL) or with AVX2 + FMA (the benchmark's case): a fused,
//   cache-blocked kernel of its own (mask_classify_fused, with the kernel of cpu/mask_classify_fused.h written once
//   over a vector-traits struct and compiled for each of the two instruction sets). Work is split into tasks of (b,
//   band of output rows, chunk of output columns), which the threads take from a shared counter. A task
//   interpolates its few source rows horizontally once, for every query (hrows: Q x chunk per source row), then,
//   per output row and per kNR-pixel panel, makes the GEMM's right operand directly in packed form: Bp[q][0..kNR) =
//   sigmoid(top * l0 + bottom * l1) (a vectorised sigmoid, the formula of csrc/common/fast_exp.h), which stays in
//   L1 while a register-blocked FMA micro-kernel multiplies every class panel of the probabilities (packed once per
//   call, in L2) with it and stores the result straight into the output (streaming stores). AVX-512: 12x32 tiles
//   (16-lane vectors; a last panel of <= 6 classes takes a 6x32 tile); AVX2: 6x16 tiles (8 lanes). Every output
//   element is the same sequence of operations whatever the tiling, the vector width, the thread count or the
//   position in a partial panel (partial panels are padded with zero probabilities / unused columns), so the result
//   is bit-for-bit the same for every thread count, and the AVX-512 and AVX2 kernels agree bit for bit.
//   SEGVIT_MASK_CLASSIFY_CPU_PATH=avx2 (or generic) caps the path a call takes (read on every call; the tests run
//   all three on one machine); build_info()["cpu_isa"] names the one taken.
// * otherwise (bfloat16, or a CPU without AVX2/FMA): per (b, block of R output rows) a float32 scratch S (Q x
//   R*Wout) of sigmoid(bilinear(...)) (horizontal pass on the few source rows involved, then vertical pass: ATen's
//   order of operations), then one GEMM probs_b (K x Q) @ S (Q x R*Wout) gives the output tile (at::mm, at::sigmoid_).
//
// ISA strategy (the built extension must run on any x86_64, so no -march=native): the file is compiled for the
// generic target. The fused kernels are compiled inside `#pragma GCC target` / `#pragma clang attribute` regions
// ("avx2,fma" and "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"; a function template cannot take its target from a
// template parameter) and run only after a __builtin_cpu_supports check; -DSEGVIT_NO_AVX512_KERNEL leaves the
// AVX-512 one out, -DSEGVIT_NO_AVX2_KERNEL both. The generic path leaves the ISA-sensitive parts to code that
// PyTorch already dispatches at runtime: the GEMM to at::mm (MKL/BLAS) and the sigmoid to at::sigmoid_ (ATen's
// AVX2/AVX512 DispatchStub kernels); its bilinear loops get a runtime-selected AVX2 clone via GCC/clang
// `target_clones` (an ifunc; x86_64 Linux only, otherwise they are plain generic code).
//
// Only ATen headers here: torch/extension.h lives in csrc/bindings.cpp alone, which keeps this file quick to build.
#include "cpu/mask_classify.h"
#include "cpu/sequential_blas.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/bilinear.h"
#include "cpu/arch_clones.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SEGVIT_NO_TARGET_CLONES)
#define SEGVIT_HAVE_TARGET_CLONES 1
#define SEGVIT_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SEGVIT_HAVE_TARGET_CLONES 0
#define SEGVIT_ISA_CLONES
#endif

// The fused paths (x86_64 GCC/clang; -DSEGVIT_NO_TARGET_CLONES or -DSEGVIT_NO_AVX2_KERNEL leave both out,
// -DSEGVIT_NO_AVX512_KERNEL the AVX-512 one).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SEGVIT_NO_TARGET_CLONES) && \
    !defined(SEGVIT_NO_AVX2_KERNEL)
#define SEGVIT_HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#else
#define SEGVIT_HAVE_AVX2_KERNEL 0
#endif
#if SEGVIT_HAVE_AVX2_KERNEL && !defined(SEGVIT_NO_AVX512_KERNEL)
#define SEGVIT_HAVE_AVX512_KERNEL 1
#else
#define SEGVIT_HAVE_AVX512_KERNEL 0
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

// Bilinear taps (align_corners=False) of every output column: the two source columns and their weights.
struct ColumnTaps {
  std::vector<int32_t> i0, i1;
  std::vector<float> w0, w1;
};

ColumnTaps column_taps(int64_t w, int64_t Wout) {
  ColumnTaps taps{std::vector<int32_t>(Wout), std::vector<int32_t>(Wout), std::vector<float>(Wout),
                  std::vector<float>(Wout)};
  const float scale_w = segvit::bilinear_scale(w, Wout);
  for (int64_t x = 0; x < Wout; ++x) {
    const auto t = segvit::bilinear_tap(x, w, Wout, scale_w);
    taps.i0[x] = static_cast<int32_t>(t.i0);
    taps.i1[x] = static_cast<int32_t>(t.i1);
    taps.w0[x] = t.lambda0;
    taps.w1[x] = t.lambda1;
  }
  return taps;
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

#if SEGVIT_HAVE_AVX2_KERNEL

// ---- The fused paths (float32): AVX-512 and AVX2 + FMA ----------------------------------------------------------

// Task size: the band's source rows interpolated horizontally (about 3 source rows x Q x 128 floats at a 16x
// upsampling) and the packed probabilities (Q x K floats) stay in L2; one pixel panel (Q x kNR floats) stays in L1.
// Bands of 16, 32 and 64 rows and chunks of 64 and 128 columns measured within 2 % of each other at 640 (AVX2).
constexpr int64_t kChunkCols = 128;  // output columns per task (rounded up to a multiple of the kernel's kNR)
constexpr int64_t kBandRows = 32;    // output rows per task

// The fused kernel each CPU can run, and the one a call runs: the best the CPU has, capped by the environment
// variable SEGVIT_MASK_CLASSIFY_CPU_PATH (read on every call: "avx512", "avx2" or "generic"; unset or "auto": no
// cap), which lets the tests run every path on one machine.
enum class FusedPath { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

FusedPath cpu_best_path() {
  static const FusedPath best = [] {
    __builtin_cpu_init();
#if SEGVIT_HAVE_AVX512_KERNEL
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
      return FusedPath::kAvx512;
    }
#endif
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? FusedPath::kAvx2 : FusedPath::kGeneric;
  }();
  return best;
}

// The cap the environment asks for; false for a value that names no path.
bool requested_path_cap(FusedPath& cap, std::string& value) {
  const char* env = std::getenv("SEGVIT_MASK_CLASSIFY_CPU_PATH");
  value = env == nullptr ? "" : env;
  cap = value == "avx2" ? FusedPath::kAvx2 : value == "generic" ? FusedPath::kGeneric : FusedPath::kAvx512;
  return value.empty() || value == "auto" || value == "avx512" || value == "avx2" || value == "generic";
}

FusedPath fused_path() {
  FusedPath cap;
  std::string value;
  TORCH_CHECK(requested_path_cap(cap, value),
              "segvit::mask_classify: SEGVIT_MASK_CLASSIFY_CPU_PATH must be auto, avx512, avx2 or generic, got '",
              value, "'");
  return std::min(cpu_best_path(), cap);
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// n floats, 64-byte aligned, uninitialized.
FloatBuffer aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "segvit::mask_classify: could not allocate ", bytes, " bytes of scratch");
  return FloatBuffer(static_cast<float*>(p));
}

// A band of output rows [r0, r0 + n_rows), whose distinct source rows are `source_rows`, and whose row rr lerps slots
// slot0[rr] and slot1[rr] of them with weights roww0[rr], roww1[rr].
struct Band {
  int64_t r0, n_rows;
  std::vector<int64_t> source_rows, slot0, slot1;
  std::vector<float> roww0, roww1;
};

struct FusedProblem {
  int64_t Q, K, h, w, Hout, Wout, chunk;
  int64_t k_padded;           // classes in the packed probabilities: K rounded up to whole panels
  int64_t tail_mr;            // width of the last class panel, 0 when K is a multiple of the kernel's kMR
  const float* packed_probs;  // (B, k_padded, Q) in panels: panel at class c0 of width mr is (Q, mr), at c0 * Q
  const float* masks;         // (B, Q, h, w)
  float* out;                 // (B, K, Hout, Wout)
  const int32_t* col0;
  const int32_t* col1;
  const float* colw0;
  const float* colw1;
};

// The kernels, one instantiation of cpu/mask_classify_fused.h per instruction set, each in a region where every
// function is compiled for that set.
#if defined(__clang__)
#define SEGVIT_TARGET_BEGIN(isa) _Pragma(SEGVIT_PRAGMA_STR(clang attribute push(__attribute__((target(isa))), apply_to = function)))
#define SEGVIT_TARGET_END _Pragma("clang attribute pop")
#define SEGVIT_UNROLL _Pragma("unroll")
#else
#define SEGVIT_TARGET_BEGIN(isa) _Pragma("GCC push_options") _Pragma(SEGVIT_PRAGMA_STR(GCC target(isa)))
#define SEGVIT_TARGET_END _Pragma("GCC pop_options")
#define SEGVIT_UNROLL _Pragma("GCC unroll 32")
#endif
#define SEGVIT_PRAGMA_STR(x) #x
#define SEGVIT_FUSED_KERNEL_REGION 1

SEGVIT_TARGET_BEGIN("avx2,fma")
namespace avx2 {
struct V {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec load(const float* p) { return _mm256_load_ps(p); }
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, Vec v) { _mm256_stream_ps(p, v); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static Vec neg(Vec a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  // 2^n as a float, from shifted = 1.5 * 2^23 + n (n in the low mantissa bits).
  static Vec pow2_of_shifted(Vec shifted) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127)), 23));
  }
};
// 6 x 16 tiles: 12 accumulators of 8 floats, 2 pixel and 1 class register of the 16.
constexpr int kNV = 2;
constexpr int kMR = 6, kMRSmall = 6;
#include "cpu/mask_classify_fused.h"
}  // namespace avx2
SEGVIT_TARGET_END

#if SEGVIT_HAVE_AVX512_KERNEL
SEGVIT_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
struct V {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec load(const float* p) { return _mm512_load_ps(p); }
  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, Vec v) { _mm512_stream_ps(p, v); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  // max, min and the shift in their masked forms with an all-ones mask (the same instruction): GCC 12 warns
  // (-Wmaybe-uninitialized) about the undefined pass-through operand of the unmasked ones.
  static Vec max(Vec a, Vec b) { return _mm512_mask_max_ps(a, kAll, a, b); }
  static Vec min(Vec a, Vec b) { return _mm512_mask_min_ps(a, kAll, a, b); }
  static Vec neg(Vec a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
  static Vec pow2_of_shifted(Vec shifted) {
    const __m512i biased = _mm512_add_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(biased, kAll, biased, 23));
  }
  static constexpr __mmask16 kAll = 0xFFFF;
};
// 12 x 32 tiles: 24 accumulators of 16 floats, 2 pixel and 1 class register of the 32 (the shape of BLIS's Skylake-X
// sgemm kernel; per pixel vector 12 broadcast loads for 24 FMAs). A last panel of up to 6 classes takes a 6 x 32
// tile (K = 150: 12 x 12 + 6, no padded class). On the AMD Zen 4 of the development session (AVX-512 on 256-bit
// units, so no more FLOPs than AVX2; a loaded machine), 6x32, 14x32, 14x16, 8x48 and 6x64 measured within the
// noise of 12x32.
constexpr int kNV = 2;
constexpr int kMR = 12, kMRSmall = 6;
#include "cpu/mask_classify_fused.h"
}  // namespace avx512
SEGVIT_TARGET_END
#endif  // SEGVIT_HAVE_AVX512_KERNEL

#undef SEGVIT_FUSED_KERNEL_REGION

// The ISA-independent part of the fused path: packing, taps, bands, and the tasks handed to Kernel::run_task.
template <typename Kernel>
void mask_classify_fused(const at::Tensor& probs,        // (B, K, Q) float32, contiguous
                         const at::Tensor& mask_logits,  // (B, Q, h, w) float32, contiguous
                         at::Tensor& out) {              // (B, K, Hout, Wout) float32, contiguous
  constexpr int64_t kMR = Kernel::kTileRows, kMRSmall = Kernel::kTileRowsSmall, kNR = Kernel::kTileCols;
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t K = out.size(1), Hout = out.size(2), Wout = out.size(3);

  // Class panels: whole ones of kMR classes, then the rest in one of kMRSmall classes where they fit, else of kMR.
  const int64_t rest = K % kMR;
  const int64_t tail_mr = rest == 0 ? 0 : rest <= kMRSmall ? kMRSmall : kMR;
  const int64_t k_padded = K - rest + tail_mr;
  // The probabilities in those panels, q-major: the panel of width mr at class c0 holds probs[b][c0 + m][q] at
  // [q][m], 0 for classes >= K.
  FloatBuffer packed = aligned_floats(B * k_padded * Q);
  const float* probs_ptr = probs.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c0 = 0; c0 < k_padded;) {
      const int64_t mr = c0 + kMR <= K ? kMR : tail_mr;
      float* panel = packed.get() + (b * k_padded + c0) * Q;
      for (int64_t q = 0; q < Q; ++q) {
        for (int64_t m = 0; m < mr; ++m) {
          const int64_t c = c0 + m;
          panel[q * mr + m] = c < K ? probs_ptr[(b * K + c) * Q + q] : 0.0f;
        }
      }
      c0 += mr;
    }
  }

  // Horizontal taps, shared by every row of every mask.
  const ColumnTaps cols = column_taps(w, Wout);

  // Bands of output rows and their vertical taps. Taps are non-decreasing in the output row and i1 <= i0 + 1, so a
  // source row already seen is one of the last two recorded; a band's list stays sorted (at most 2 rows per row).
  const float scale_h = segvit::bilinear_scale(h, Hout);
  const int64_t band_rows = std::min(kBandRows, Hout);
  std::vector<Band> bands(static_cast<size_t>((Hout + band_rows - 1) / band_rows));
  size_t max_slots = 1;
  for (size_t k = 0; k < bands.size(); ++k) {
    Band& band = bands[k];
    band.r0 = static_cast<int64_t>(k) * band_rows;
    band.n_rows = std::min(band_rows, Hout - band.r0);
    auto slot_of = [&](int64_t row) -> int64_t {
      for (int64_t j = static_cast<int64_t>(band.source_rows.size()) - 1; j >= 0 && band.source_rows[j] >= row; --j) {
        if (band.source_rows[j] == row) return j;
      }
      band.source_rows.push_back(row);
      return static_cast<int64_t>(band.source_rows.size()) - 1;
    };
    for (int64_t rr = 0; rr < band.n_rows; ++rr) {
      const auto t = segvit::bilinear_tap(band.r0 + rr, h, Hout, scale_h);
      band.slot0.push_back(slot_of(t.i0));
      band.slot1.push_back(slot_of(t.i1));
      band.roww0.push_back(t.lambda0);
      band.roww1.push_back(t.lambda1);
    }
    max_slots = std::max(max_slots, band.source_rows.size());
  }

  FusedProblem problem;
  problem.Q = Q;
  problem.K = K;
  problem.h = h;
  problem.w = w;
  problem.Hout = Hout;
  problem.Wout = Wout;
  const int64_t chunk_cols = (kChunkCols + kNR - 1) / kNR * kNR;
  problem.chunk = std::min(chunk_cols, (Wout + kNR - 1) / kNR * kNR);
  problem.k_padded = k_padded;
  problem.tail_mr = tail_mr;
  problem.packed_probs = packed.get();
  problem.masks = mask_logits.const_data_ptr<float>();
  problem.out = out.mutable_data_ptr<float>();
  problem.col0 = cols.i0.data();
  problem.col1 = cols.i1.data();
  problem.colw0 = cols.w0.data();
  problem.colw1 = cols.w1.data();

  // Tasks (b, band, column chunk), taken by the threads from a shared counter: a thread slowed down by other work
  // on the machine takes fewer. Which thread computes a task does not change its result.
  const int64_t n_bands = static_cast<int64_t>(bands.size());
  const int64_t n_chunks = (Wout + problem.chunk - 1) / problem.chunk;
  const int64_t n_tasks = B * n_bands * n_chunks;
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    FloatBuffer hrows = aligned_floats(static_cast<int64_t>(max_slots) * Q * problem.chunk);
    FloatBuffer bp = aligned_floats(Q * kNR);
    for (int64_t task = next_task.fetch_add(1); task < n_tasks; task = next_task.fetch_add(1)) {
      const int64_t b = task / (n_bands * n_chunks);
      const int64_t band = (task / n_chunks) % n_bands;
      const int64_t chunk = task % n_chunks;
      Kernel::run_task(problem, bands[static_cast<size_t>(band)], b, chunk * problem.chunk, hrows.get(), bp.get());
    }
    _mm_sfence();  // the streaming stores are visible once parallel_for returns
  });
}

#endif  // SEGVIT_HAVE_AVX2_KERNEL

// ---- The generic path (bfloat16, or no AVX2 / FMA) --------------------------------------------------------------

template <typename scalar_t>
void mask_classify_kernel(const at::Tensor& probs,         // (B, K, Q) float32, contiguous
                          const at::Tensor& mask_logits,   // (B, Q, h, w) scalar_t, contiguous
                          at::Tensor& out) {               // (B, K, Hout, Wout) scalar_t, contiguous
  const int64_t B = mask_logits.size(0), Q = mask_logits.size(1), h = mask_logits.size(2), w = mask_logits.size(3);
  const int64_t K = out.size(1), Hout = out.size(2), Wout = out.size(3);
  const int64_t plane = Hout * Wout;
  constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;

  // Horizontal taps, shared by every row of every mask.
  const ColumnTaps cols = column_taps(w, Wout);
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
          lerp_columns(row, cols.i0.data(), cols.i1.data(), cols.w0.data(), cols.w1.data(), Wout, hrows.data() + j * Wout);
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

// Asks Linux to back a large output with transparent huge pages (where THP is in "madvise" mode): its first touch
// then costs one fault per 2 MiB instead of one per 4 KiB page. A fresh (1, 150, 640, 640) float32 output took
// ~200 ms of CPU time to fault in 4 KiB pages here, ~45 ms in huge pages. Only the 2 MiB-aligned part inside the
// buffer is advised; a refusal changes nothing but the speed.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
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
  advise_huge_pages(out.mutable_data_ptr(), static_cast<size_t>(out.nbytes()));
  // Class probabilities once, in float32, transposed to (B, K, Q): the left GEMM operand of each batch.
  const at::Tensor probs =
      at::softmax(class_logits.to(at::kFloat), -1).narrow(-1, 0, K).transpose(1, 2).contiguous();
#if SEGVIT_HAVE_AVX2_KERNEL
  if (masks.scalar_type() == at::kFloat) {
    switch (fused_path()) {
#if SEGVIT_HAVE_AVX512_KERNEL
      case FusedPath::kAvx512:
        mask_classify_fused<avx512::Kernel>(probs, masks, out);
        return out;
#endif
      case FusedPath::kAvx2:
        mask_classify_fused<avx2::Kernel>(probs, masks, out);
        return out;
      default:
        break;
    }
  }
#endif
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
#if SEGVIT_HAVE_AVX2_KERNEL
  {
    FusedPath cap;
    std::string value;
    const bool valid = requested_path_cap(cap, value);
    const FusedPath best = cpu_best_path(), path = std::min(best, cap);
    auto name = [](FusedPath p) {
      return p == FusedPath::kAvx512 ? "AVX-512" : p == FusedPath::kAvx2 ? "AVX2+FMA" : "generic";
    };
    auto fused = [](const char* isa, int64_t rows, int64_t cols) {
      return std::string("fused ") + isa + " kernel (own " + std::to_string(rows) + "x" + std::to_string(cols) +
             " GEMM micro-kernel, vectorised sigmoid)";
    };
    info += "; mask_classify float32: ";
    switch (path) {
#if SEGVIT_HAVE_AVX512_KERNEL
      case FusedPath::kAvx512:
        info += fused("AVX-512", avx512::Kernel::kTileRows, avx512::Kernel::kTileCols);
        break;
#endif
      case FusedPath::kAvx2:
        info += fused("AVX2+FMA", avx2::Kernel::kTileRows, avx2::Kernel::kTileCols);
        break;
      default:
        info += "generic path";
    }
    if (!valid) {
      info += " (but SEGVIT_MASK_CLASSIFY_CPU_PATH='" + value + "' names no path: a float32 call raises)";
    } else if (path != best) {
      info += std::string(" (capped by SEGVIT_MASK_CLASSIFY_CPU_PATH, this CPU's best: ") + name(best) + ")";
    } else if (best == FusedPath::kGeneric) {
      info += " (this CPU lacks AVX2/FMA)";
    }
  }
#endif
  info += "; otherwise GEMM: at::mm (BLAS), sigmoid: ATen kernels (runtime CPU capability " + at::get_cpu_capability() +
          ")";
  return info;
}

}  // namespace segvit::cpu
