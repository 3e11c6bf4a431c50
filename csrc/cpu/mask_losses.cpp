// CPU kernels of segvit::mask_loss_stats (forward) and segvit::mask_loss_stats_backward: the statistics behind
// segvit.ops.mask_losses (CONTRACT.md, op 4; the op's math is in csrc/cpu/mask_losses.h and
// csrc/common/mask_loss_math.h).
//
// Neither the upsampled logits nor the one-hot targets are ever materialized. Work is split into tasks
// (image b, block of label rows); a task converts its label rows to int32 once (kept in L1/L2) and then, for each
// class present in image b, interpolates the few low-resolution rows its label rows read (horizontal pass) and runs
// one fused loop per label row: vertical lerp, target compare, focal / sigmoid terms, sums. The backward task does
// the same loop for the per-pixel gradient, applies the vertical adjoint into per-source-row buffers and the
// horizontal adjoint once per block, producing a partial low-resolution gradient per (class, block).
//
// Determinism: the block size depends only on the label width (never on the thread count), every partial is stored
// per (class, block) and partials are reduced in block order, so results are bitwise identical for any number of
// threads and across runs. Scratch memory: per thread a few label rows and interpolated rows; globally the partials
// (4 doubles per (class, block) forward; a few low-resolution rows per (class, block) backward).
//
// ISA: the extension is built for generic x86-64 (see csrc/cpu/mask_classify.cpp); the pixel loops carry
// target_clones for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA) selected at load time, and their math
// (csrc/common/mask_loss_math.h) is plain float arithmetic that GCC vectorizes under `omp simd` in every clone.
#include "cpu/mask_losses.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

// The pixel loops select between terms on the target (see csrc/common/mask_loss_math.h). Under the default
// -ftrapping-math GCC will not evaluate both sides of such a select for a whole vector (a side might raise a
// floating-point exception the scalar code would not), so the loops stay scalar; nothing here reads the
// floating-point exception flags, so the kernels' own code (not ATen's, included above) is compiled without it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "common/bilinear.h"
#include "common/mask_loss_math.h"

#include "cpu/arch_clones.h"

namespace segvit::cpu {
namespace {

// Label pixels per task: the task's int32 labels (64 KB) and interpolated rows stay in L2, and a 640-wide label
// image gives 26 blocks, enough tasks to balance any thread count here.
constexpr int64_t kBlockPixels = 16384;

// The interpolation geometry of one call, shared by all images and classes (it depends on sizes only).
struct Geometry {
  int64_t h = 0, w = 0, Hl = 0, Wl = 0;
  int64_t rows_per_block = 0, n_blocks = 0;
  // Horizontal taps of every label column.
  std::vector<int32_t> col0, col1;
  std::vector<float> colw0, colw1;
  // Horizontal adjoint as a gather: for low-res column i, the label columns reading it are
  // adj_x[adj_begin[i] .. adj_begin[i + 1]) with weights adj_wt (bilinear_adjoint_range + bilinear_weight).
  std::vector<int64_t> adj_begin;
  std::vector<int32_t> adj_x;
  std::vector<float> adj_wt;
  // Per block, the distinct low-res rows its label rows read: src_rows[src_begin[blk] .. src_begin[blk + 1]).
  std::vector<int64_t> src_begin;
  std::vector<int64_t> src_rows;
  // Per label row: slots (indices into its block's source-row list) and vertical weights.
  std::vector<int32_t> slot0, slot1;
  std::vector<float> roww0, roww1;
  int64_t max_src_per_block = 0;

  Geometry(int64_t h_, int64_t w_, int64_t Hl_, int64_t Wl_) : h(h_), w(w_), Hl(Hl_), Wl(Wl_) {
    rows_per_block = std::clamp<int64_t>(kBlockPixels / Wl, 1, Hl);
    n_blocks = (Hl + rows_per_block - 1) / rows_per_block;
    const float scale_w = bilinear_scale(w, Wl);
    col0.resize(Wl);
    col1.resize(Wl);
    colw0.resize(Wl);
    colw1.resize(Wl);
    for (int64_t x = 0; x < Wl; ++x) {
      const BilinearTap t = bilinear_tap(x, w, Wl, scale_w);
      col0[x] = static_cast<int32_t>(t.i0);
      col1[x] = static_cast<int32_t>(t.i1);
      colw0[x] = t.lambda0;
      colw1[x] = t.lambda1;
    }
    adj_begin.resize(w + 1);
    for (int64_t i = 0; i < w; ++i) {
      adj_begin[i] = static_cast<int64_t>(adj_x.size());
      const IndexRange r = bilinear_adjoint_range(i, w, Wl, scale_w);
      for (int64_t x = r.lo; x < r.hi; ++x) {
        adj_x.push_back(static_cast<int32_t>(x));
        adj_wt.push_back(bilinear_weight(bilinear_tap(x, w, Wl, scale_w), i));
      }
    }
    adj_begin[w] = static_cast<int64_t>(adj_x.size());

    const float scale_h = bilinear_scale(h, Hl);
    slot0.resize(Hl);
    slot1.resize(Hl);
    roww0.resize(Hl);
    roww1.resize(Hl);
    src_begin.resize(n_blocks + 1);
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t begin = static_cast<int64_t>(src_rows.size());
      src_begin[blk] = begin;
      // Taps are non-decreasing in the label row and i1 <= i0 + 1, so a row already listed is one of the last two.
      auto slot_of = [&](int64_t row) -> int32_t {
        for (int64_t j = static_cast<int64_t>(src_rows.size()) - 1; j >= begin && src_rows[j] >= row; --j) {
          if (src_rows[j] == row) return static_cast<int32_t>(j - begin);
        }
        src_rows.push_back(row);
        return static_cast<int32_t>(src_rows.size() - 1 - begin);
      };
      const int64_t r0 = blk * rows_per_block, r1 = std::min(Hl, r0 + rows_per_block);
      for (int64_t y = r0; y < r1; ++y) {
        const BilinearTap t = bilinear_tap(y, h, Hl, scale_h);
        slot0[y] = slot_of(t.i0);
        slot1[y] = slot_of(t.i1);
        roww0[y] = t.lambda0;
        roww1[y] = t.lambda1;
      }
      max_src_per_block = std::max(max_src_per_block, static_cast<int64_t>(src_rows.size()) - begin);
    }
    src_begin[n_blocks] = static_cast<int64_t>(src_rows.size());
  }

  int64_t n_src(int64_t blk) const { return src_begin[blk + 1] - src_begin[blk]; }
};

// dst[x] = src[col0[x]] * colw0[x] + src[col1[x]] * colw1[x]: one low-res row, horizontally interpolated.
SEGVIT_ARCH_CLONES
void lerp_columns(const float* __restrict src, const int32_t* __restrict x0, const int32_t* __restrict x1,
                  const float* __restrict l0, const float* __restrict l1, int64_t n, float* __restrict dst) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = src[x0[x]] * l0[x] + src[x1[x]] * l1[x];
  }
}

// Sums over one label row of [focal, sigmoid * t, sigmoid, t]; x = top * l0 + bottom * l1 (vertical lerp of the
// horizontally interpolated low-res rows), t = (label == cls).
template <bool kSquare>
SEGVIT_INLINE void row_forward_body(const float* __restrict top, const float* __restrict bottom, float l0, float l1,
                                    const int32_t* __restrict labels, int32_t cls, int64_t n, FocalParams fp,
                                    float* __restrict sums) {
  float focal = 0.0f, prob_target = 0.0f, prob = 0.0f, target = 0.0f;
#pragma omp simd reduction(+ : focal, prob_target, prob, target)
  for (int64_t i = 0; i < n; ++i) {
    const float x = top[i] * l0 + bottom[i] * l1;
    const bool t = labels[i] == cls;
    const PixelForward r = pixel_forward<kSquare>(x, t, fp);
    focal += r.focal;
    prob_target += t ? r.prob : 0.0f;
    prob += r.prob;
    target += t ? 1.0f : 0.0f;
  }
  sums[0] = focal;
  sums[1] = prob_target;
  sums[2] = prob;
  sums[3] = target;
}

SEGVIT_ARCH_CLONES
void row_forward_square(const float* top, const float* bottom, float l0, float l1, const int32_t* labels, int32_t cls,
                        int64_t n, FocalParams fp, float* sums) {
  row_forward_body<true>(top, bottom, l0, l1, labels, cls, n, fp, sums);
}

SEGVIT_ARCH_CLONES
void row_forward_pow(const float* top, const float* bottom, float l0, float l1, const int32_t* labels, int32_t cls,
                     int64_t n, FocalParams fp, float* sums) {
  row_forward_body<false>(top, bottom, l0, l1, labels, cls, n, fp, sums);
}

// Per-pixel gradient of one label row, then its vertical adjoint: acc_top += l0 * g, acc_bottom += l1 * g
// (acc_top == acc_bottom when both taps read the same low-res row).
template <bool kSquare>
SEGVIT_INLINE void row_backward_body(const float* __restrict top, const float* __restrict bottom, float l0, float l1,
                                     const int32_t* __restrict labels, int32_t cls, int64_t n, FocalParams fp,
                                     float g_focal, float g_prob_target, float g_prob, float* __restrict grad,
                                     float* acc_top, float* acc_bottom) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = top[i] * l0 + bottom[i] * l1;
    grad[i] = pixel_backward<kSquare>(x, labels[i] == cls, fp, g_focal, g_prob_target, g_prob);
  }
  if (acc_top == acc_bottom) {
    const float l = l0 + l1;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc_top[i] += l * grad[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc_top[i] += l0 * grad[i];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc_bottom[i] += l1 * grad[i];
  }
}

SEGVIT_ARCH_CLONES
void row_backward_square(const float* top, const float* bottom, float l0, float l1, const int32_t* labels, int32_t cls,
                         int64_t n, FocalParams fp, float g_focal, float g_prob_target, float g_prob, float* grad,
                         float* acc_top, float* acc_bottom) {
  row_backward_body<true>(top, bottom, l0, l1, labels, cls, n, fp, g_focal, g_prob_target, g_prob, grad, acc_top,
                          acc_bottom);
}

SEGVIT_ARCH_CLONES
void row_backward_pow(const float* top, const float* bottom, float l0, float l1, const int32_t* labels, int32_t cls,
                      int64_t n, FocalParams fp, float g_focal, float g_prob_target, float g_prob, float* grad,
                      float* acc_top, float* acc_bottom) {
  row_backward_body<false>(top, bottom, l0, l1, labels, cls, n, fp, g_focal, g_prob_target, g_prob, grad, acc_top,
                           acc_bottom);
}

const char* kOp = "segvit::mask_loss_stats";

void check_inputs(const char* op, const at::Tensor& mask_logits, const at::Tensor& labels) {
  TORCH_CHECK(mask_logits.defined() && labels.defined(), op, ": mask_logits and labels must be defined tensors");
  TORCH_CHECK(mask_logits.device().is_cpu(), op, " (CPU kernel): mask_logits must be a CPU tensor, got ",
              mask_logits.device());
  TORCH_CHECK(labels.device().is_cpu(), op, " (CPU kernel): labels must be a CPU tensor, got ", labels.device());
  TORCH_CHECK(mask_logits.dim() == 4, op, ": mask_logits must be 4-D (B, K, h, w), got shape ", mask_logits.sizes());
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be 3-D (B, Hl, Wl), got shape ", labels.sizes());
  const auto dtype = mask_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op,
              " (CPU kernel): mask_logits must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(mask_logits.size(0) == labels.size(0), op,
              ": mask_logits and labels must have the same batch size B, got ", mask_logits.size(0), " (mask_logits ",
              mask_logits.sizes(), ") and ", labels.size(0), " (labels ", labels.sizes(), ")");
  TORCH_CHECK(mask_logits.size(2) >= 1 && mask_logits.size(3) >= 1, op,
              ": mask_logits must have a non-empty (h, w) grid, got shape ", mask_logits.sizes());
  TORCH_CHECK(labels.size(1) >= 1 && labels.size(2) >= 1, op,
              ": labels must have a non-empty (Hl, Wl) size, got shape ", labels.sizes());
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(mask_logits.size(1) < kMax && mask_logits.size(2) < kMax && mask_logits.size(3) < kMax &&
                  labels.size(2) < kMax,
              op, ": sizes too large for the kernel's 32-bit indices: mask_logits ", mask_logits.sizes(), ", labels ",
              labels.sizes());
}

// The classes present in each image (ascending), validating every label value on the way.
std::vector<std::vector<int32_t>> present_classes(const at::Tensor& labels, int64_t K, int64_t ignore_index,
                                                  const Geometry& g) {
  const int64_t B = labels.size(0);
  const int64_t n_tasks = B * g.n_blocks;
  std::vector<uint8_t> seen(static_cast<size_t>(n_tasks * K), 0);
  std::vector<int64_t> bad(static_cast<size_t>(n_tasks), 0);
  std::vector<uint8_t> has_bad(static_cast<size_t>(n_tasks), 0);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.n_blocks, blk = task % g.n_blocks;
      const int64_t r0 = blk * g.rows_per_block, r1 = std::min(g.Hl, r0 + g.rows_per_block);
      const int64_t* p = lab + (b * g.Hl + r0) * g.Wl;
      uint8_t* flags = seen.data() + task * K;
      for (int64_t i = 0, n = (r1 - r0) * g.Wl; i < n; ++i) {
        const int64_t v = p[i];
        if (v == ignore_index) continue;
        if (v < 0 || v >= K) {
          if (!has_bad[task]) {
            has_bad[task] = 1;
            bad[task] = v;
          }
          continue;
        }
        flags[v] = 1;
      }
    }
  });
  for (int64_t task = 0; task < n_tasks; ++task) {
    TORCH_CHECK(!has_bad[task], kOp, ": labels must hold values in [0, ", K, ") or ignore_index=", ignore_index,
                ", found ", bad[task], " in image ", task / g.n_blocks);
  }
  std::vector<std::vector<int32_t>> classes(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < K; ++c) {
      bool any = false;
      for (int64_t blk = 0; blk < g.n_blocks && !any; ++blk) any = seen[(b * g.n_blocks + blk) * K + c] != 0;
      if (any) classes[b].push_back(static_cast<int32_t>(c));
    }
  }
  return classes;
}

// Per-thread buffers of a task: its labels as int32 (ignore_index -> -1, so a 64-bit ignore_index cannot alias a
// class after narrowing) and the horizontally interpolated low-res rows of one class.
struct TaskScratch {
  std::vector<int32_t> labels;
  std::vector<float> hrows;
  std::vector<float> src_row;  // one bfloat16 low-res row as float

  explicit TaskScratch(const Geometry& g)
      : labels(static_cast<size_t>(g.rows_per_block * g.Wl)),
        hrows(static_cast<size_t>(g.max_src_per_block * g.Wl)),
        src_row(static_cast<size_t>(g.w)) {}

  void load_labels(const int64_t* lab, int64_t ignore_index, int64_t n) {
    for (int64_t i = 0; i < n; ++i) labels[i] = lab[i] == ignore_index ? -1 : static_cast<int32_t>(lab[i]);
  }

  template <typename scalar_t>
  void interpolate_rows(const scalar_t* mask, const Geometry& g, int64_t blk) {
    for (int64_t j = 0; j < g.n_src(blk); ++j) {
      const scalar_t* in = mask + g.src_rows[g.src_begin[blk] + j] * g.w;
      const float* row;
      if constexpr (std::is_same_v<scalar_t, float>) {
        row = in;
      } else {
        for (int64_t x = 0; x < g.w; ++x) src_row[x] = static_cast<float>(in[x]);
        row = src_row.data();
      }
      lerp_columns(row, g.col0.data(), g.col1.data(), g.colw0.data(), g.colw1.data(), g.Wl,
                   hrows.data() + j * g.Wl);
    }
  }
};

std::vector<int64_t> pair_offsets(const std::vector<std::vector<int32_t>>& classes) {
  std::vector<int64_t> offsets(classes.size() + 1, 0);
  for (size_t b = 0; b < classes.size(); ++b) offsets[b + 1] = offsets[b] + static_cast<int64_t>(classes[b].size());
  return offsets;
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& mask_logits, const at::Tensor& labels, int64_t ignore_index,
                    const FocalParams& fp, bool square, const Geometry& g,
                    const std::vector<std::vector<int32_t>>& classes, at::Tensor& stats) {
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1);
  const std::vector<int64_t> offsets = pair_offsets(classes);
  // Sums per (pair, block), reduced below in block order.
  std::vector<double> partial(static_cast<size_t>(offsets[B] * g.n_blocks * 4), 0.0);
  const scalar_t* logits = mask_logits.const_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const auto row_forward = square ? row_forward_square : row_forward_pow;

  at::parallel_for(0, B * g.n_blocks, 1, [&](int64_t begin, int64_t end) {
    TaskScratch scratch(g);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.n_blocks, blk = task % g.n_blocks;
      if (classes[b].empty()) continue;
      const int64_t r0 = blk * g.rows_per_block, r1 = std::min(g.Hl, r0 + g.rows_per_block);
      scratch.load_labels(lab + (b * g.Hl + r0) * g.Wl, ignore_index, (r1 - r0) * g.Wl);
      for (size_t k = 0; k < classes[b].size(); ++k) {
        const int32_t c = classes[b][k];
        scratch.interpolate_rows(logits + (b * K + c) * g.h * g.w, g, blk);
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t y = r0; y < r1; ++y) {
          float sums[4];
          row_forward(scratch.hrows.data() + g.slot0[y] * g.Wl, scratch.hrows.data() + g.slot1[y] * g.Wl,
                      g.roww0[y], g.roww1[y], scratch.labels.data() + (y - r0) * g.Wl, c, g.Wl, fp, sums);
          for (int i = 0; i < 4; ++i) acc[i] += sums[i];
        }
        double* out = partial.data() + ((offsets[b] + static_cast<int64_t>(k)) * g.n_blocks + blk) * 4;
        for (int i = 0; i < 4; ++i) out[i] = acc[i];
      }
    }
  });

  double* st = stats.mutable_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    for (size_t k = 0; k < classes[b].size(); ++k) {
      const double* p = partial.data() + (offsets[b] + static_cast<int64_t>(k)) * g.n_blocks * 4;
      double* out = st + (b * K + classes[b][k]) * 4;
      for (int64_t blk = 0; blk < g.n_blocks; ++blk) {
        for (int i = 0; i < 4; ++i) out[i] += p[blk * 4 + i];
      }
    }
  }
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_stats, const at::Tensor& mask_logits, const at::Tensor& labels,
                     int64_t ignore_index, const FocalParams& fp, bool square, const Geometry& g,
                     const std::vector<std::vector<int32_t>>& classes, at::Tensor& grad) {
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1);
  const std::vector<int64_t> offsets = pair_offsets(classes);
  // Partial low-res gradients per (pair, block): n_src(blk) rows of w, at partial_begin[pair * n_blocks + blk].
  std::vector<int64_t> partial_begin(static_cast<size_t>(offsets[B] * g.n_blocks + 1), 0);
  for (int64_t pair = 0; pair < offsets[B]; ++pair) {
    for (int64_t blk = 0; blk < g.n_blocks; ++blk) {
      const int64_t idx = pair * g.n_blocks + blk;
      partial_begin[idx + 1] = partial_begin[idx] + g.n_src(blk) * g.w;
    }
  }
  std::vector<float> partial(static_cast<size_t>(partial_begin.back()));
  const scalar_t* logits = mask_logits.const_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const double* gs = grad_stats.const_data_ptr<double>();
  const auto row_backward = square ? row_backward_square : row_backward_pow;

  at::parallel_for(0, B * g.n_blocks, 1, [&](int64_t begin, int64_t end) {
    TaskScratch scratch(g);
    std::vector<float> grad_row(static_cast<size_t>(g.Wl));
    std::vector<float> acc(static_cast<size_t>(g.max_src_per_block * g.Wl));  // vertical adjoint per low-res row
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.n_blocks, blk = task % g.n_blocks;
      if (classes[b].empty()) continue;
      const int64_t r0 = blk * g.rows_per_block, r1 = std::min(g.Hl, r0 + g.rows_per_block);
      const int64_t n_src = g.n_src(blk);
      scratch.load_labels(lab + (b * g.Hl + r0) * g.Wl, ignore_index, (r1 - r0) * g.Wl);
      for (size_t k = 0; k < classes[b].size(); ++k) {
        const int32_t c = classes[b][k];
        const double* gc = gs + (b * K + c) * 4;
        scratch.interpolate_rows(logits + (b * K + c) * g.h * g.w, g, blk);
        std::fill(acc.begin(), acc.begin() + n_src * g.Wl, 0.0f);
        for (int64_t y = r0; y < r1; ++y) {
          row_backward(scratch.hrows.data() + g.slot0[y] * g.Wl, scratch.hrows.data() + g.slot1[y] * g.Wl,
                       g.roww0[y], g.roww1[y], scratch.labels.data() + (y - r0) * g.Wl, c, g.Wl, fp,
                       static_cast<float>(gc[0]), static_cast<float>(gc[1]), static_cast<float>(gc[2]),
                       grad_row.data(), acc.data() + g.slot0[y] * g.Wl, acc.data() + g.slot1[y] * g.Wl);
        }
        // Horizontal adjoint, gathered per low-res column in a fixed order.
        float* out = partial.data() + partial_begin[(offsets[b] + static_cast<int64_t>(k)) * g.n_blocks + blk];
        for (int64_t j = 0; j < n_src; ++j) {
          const float* row = acc.data() + j * g.Wl;
          for (int64_t i = 0; i < g.w; ++i) {
            float sum = 0.0f;
            for (int64_t e = g.adj_begin[i]; e < g.adj_begin[i + 1]; ++e) sum += g.adj_wt[e] * row[g.adj_x[e]];
            out[j * g.w + i] = sum;
          }
        }
      }
    }
  });

  // Sum the partials of each pair in block order into its low-res gradient.
  scalar_t* grad_ptr = grad.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, offsets[B], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> plane(static_cast<size_t>(g.h * g.w));
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = std::upper_bound(offsets.begin(), offsets.end(), pair) - offsets.begin() - 1;
      const int32_t c = classes[b][pair - offsets[b]];
      std::fill(plane.begin(), plane.end(), 0.0f);
      for (int64_t blk = 0; blk < g.n_blocks; ++blk) {
        const float* p = partial.data() + partial_begin[pair * g.n_blocks + blk];
        for (int64_t j = 0; j < g.n_src(blk); ++j) {
          float* dst = plane.data() + g.src_rows[g.src_begin[blk] + j] * g.w;
          for (int64_t i = 0; i < g.w; ++i) dst[i] += p[j * g.w + i];
        }
      }
      scalar_t* out = grad_ptr + (b * K + c) * g.h * g.w;
      for (int64_t i = 0; i < g.h * g.w; ++i) out[i] = static_cast<scalar_t>(plane[i]);
    }
  });
}

void check_stats(const char* name, const at::Tensor& t, const at::Tensor& mask_logits) {
  TORCH_CHECK(t.defined(), "segvit::mask_loss_stats_backward: ", name, " must be a defined tensor");
  TORCH_CHECK(t.device().is_cpu(), "segvit::mask_loss_stats_backward (CPU kernel): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == mask_logits.size(0) && t.size(1) == mask_logits.size(1) && t.size(2) == 4,
              "segvit::mask_loss_stats_backward: ", name, " must have shape (B, K, 4) = (", mask_logits.size(0), ", ",
              mask_logits.size(1), ", 4), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kDouble, "segvit::mask_loss_stats_backward: ", name, " must be float64, got ",
              t.scalar_type());
}

}  // namespace

at::Tensor mask_loss_stats(const at::Tensor& mask_logits, const at::Tensor& labels, int64_t ignore_index,
                           double alpha, double gamma) {
  check_inputs(kOp, mask_logits, labels);
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1);
  at::Tensor stats = at::zeros({B, K, 4}, mask_logits.options().dtype(at::kDouble));
  if (B == 0) return stats;
  const at::Tensor logits = mask_logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  const Geometry g(logits.size(2), logits.size(3), lab.size(1), lab.size(2));
  const auto classes = present_classes(lab, K, ignore_index, g);
  const FocalParams fp = focal_params(alpha, gamma);
  const bool square = gamma == 2.0;
  if (logits.scalar_type() == at::kFloat) {
    forward_kernel<float>(logits, lab, ignore_index, fp, square, g, classes, stats);
  } else {
    forward_kernel<at::BFloat16>(logits, lab, ignore_index, fp, square, g, classes, stats);
  }
  return stats;
}

at::Tensor mask_loss_stats_backward(const at::Tensor& grad_stats, const at::Tensor& mask_logits,
                                    const at::Tensor& labels, const at::Tensor& stats, int64_t ignore_index,
                                    double alpha, double gamma) {
  check_inputs("segvit::mask_loss_stats_backward", mask_logits, labels);
  TORCH_CHECK(grad_stats.defined(), "segvit::mask_loss_stats_backward: grad_stats must be a defined tensor");
  TORCH_CHECK(grad_stats.device().is_cpu(), "segvit::mask_loss_stats_backward (CPU kernel): grad_stats must be a CPU "
              "tensor, got ", grad_stats.device());
  TORCH_CHECK(grad_stats.dim() == 3 && grad_stats.size(0) == mask_logits.size(0) &&
                  grad_stats.size(1) == mask_logits.size(1) && grad_stats.size(2) == 4,
              "segvit::mask_loss_stats_backward: grad_stats must have shape (B, K, 4) = (", mask_logits.size(0), ", ",
              mask_logits.size(1), ", 4), got ", grad_stats.sizes());
  check_stats("stats", stats, mask_logits);
  const int64_t B = mask_logits.size(0), K = mask_logits.size(1);
  at::Tensor grad = at::zeros(mask_logits.sizes(), mask_logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return grad;
  const at::Tensor logits = mask_logits.contiguous();
  const at::Tensor lab = labels.contiguous();
  // Upstream gradients are often expanded (the gradient of a sum); any floating dtype is accepted.
  const at::Tensor gs = grad_stats.to(at::kDouble).contiguous();
  const Geometry g(logits.size(2), logits.size(3), lab.size(1), lab.size(2));
  // The present classes are the ones with a positive pixel count in the forward statistics.
  const at::Tensor counts = stats.select(2, 3).contiguous();
  const double* cnt = counts.const_data_ptr<double>();
  std::vector<std::vector<int32_t>> classes(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < K; ++c) {
      if (cnt[b * K + c] > 0.0) classes[b].push_back(static_cast<int32_t>(c));
    }
  }
  const FocalParams fp = focal_params(alpha, gamma);
  const bool square = gamma == 2.0;
  if (logits.scalar_type() == at::kFloat) {
    backward_kernel<float>(gs, logits, lab, ignore_index, fp, square, g, classes, grad);
  } else {
    backward_kernel<at::BFloat16>(gs, logits, lab, ignore_index, fp, square, g, classes, grad);
  }
  return grad;
}

}  // namespace segvit::cpu
