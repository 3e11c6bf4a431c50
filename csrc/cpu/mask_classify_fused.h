// The fused float32 kernel of segvit::mask_classify (csrc/cpu/mask_classify.cpp), written once for any vector width.
//
// Deliberately without an include guard: csrc/cpu/mask_classify.cpp includes it once per instruction set, each time
// inside its own namespace and a region where every function is compiled for that set (SEGVIT_TARGET_BEGIN: a
// `#pragma GCC target` / `#pragma clang attribute` region; a template cannot take its target attribute from a
// template parameter, and GCC and clang refuse to inline target-specific intrinsics or to pass vectors across a
// target boundary). Before the include the namespace defines
//   V                       the vector traits: Vec, kLanes and the operations used below (thin wrappers of intrinsics)
//   kNV                     vectors per pixel panel: kNR = kNV * kLanes pixels
//   kMR, kMRSmall           classes per micro-tile: the full tile, and the narrower one the last panel may use
// and the enclosing namespace segvit::cpu::(anon) defines FusedProblem and Band. This file defines Kernel, what the
// ISA-independent driver (mask_classify_fused in mask_classify.cpp) calls.
#ifndef SEGVIT_FUSED_KERNEL_REGION
#error "cpu/mask_classify_fused.h is included by csrc/cpu/mask_classify.cpp only, inside a target region"
#endif

using Vec = typename V::Vec;
constexpr int64_t kNR = kNV * V::kLanes;  // pixels per micro-tile
static_assert(kMRSmall <= kMR, "the narrow tile is the narrower one");

// sigmoid(v) = 1 / (1 + exp(-v)), exp by the formula of segvit::fast_exp (common/fast_exp.h): Cody-Waite reduction,
// degree-7 polynomial and 2^n from the bits of the rounding shift (here with FMAs, which only make the reduction
// more exact), on -v clamped to [-87, 88] (without fast_exp's IEEE-end selects after the polynomial: for v > 87 the
// result is 1 either way; for v < -88, -inf included, it is 1 / (1 + exp(88)) ~ 6e-39 rather than sigmoid's
// denormal or 0). Every lane is the same sequence of IEEE operations whatever the vector width, so the AVX2 and
// AVX-512 kernels agree bit for bit. A NaN propagates: max/min return their second operand when either is NaN, and
// the NaN is the second one.
inline Vec sigmoid(Vec v) {
  const Vec x = V::neg(v);
  Vec xc = V::max(V::set1(-87.0f), x);
  xc = V::min(V::set1(88.0f), xc);
  const Vec round = V::set1(12582912.0f);  // 1.5 * 2^23
  const Vec shifted = V::fmadd(xc, V::set1(1.44269504088896341f), round);
  const Vec n = V::sub(shifted, round);
  Vec r = V::fnmadd(n, V::set1(0.693145751953125f), xc);
  r = V::fnmadd(n, V::set1(1.42860682030941723e-6f), r);
  Vec p = V::set1(1.0f / 5040.0f);
  p = V::fmadd(p, r, V::set1(1.0f / 720.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 120.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 24.0f));
  p = V::fmadd(p, r, V::set1(1.0f / 6.0f));
  p = V::fmadd(p, r, V::set1(0.5f));
  p = V::fmadd(p, r, V::set1(1.0f));
  p = V::fmadd(p, r, V::set1(1.0f));
  // 1 + p 2^n in one FMA (what GCC contracted the separate multiply and add of the first AVX2 kernel to; written
  // out, so that every compiler computes the same), then a true division (an rcp + Newton step measured no faster
  // with AVX2, and is less exact).
  const Vec one = V::set1(1.0f);
  return V::div(one, V::fmadd(p, V::pow2_of_shifted(shifted), one));
}

// One packed pixel panel of the GEMM's right operand: bp[q][0..kNR) = sigmoid(top[q] * l0 + bottom[q] * l1), where
// top[q] / bottom[q] (q * stride apart) are kNR horizontally interpolated values of the two source rows of one
// output row (the vertical pass of ATen's order of operations).
inline void make_panel(const float* __restrict top, const float* __restrict bottom, int64_t stride, float l0,
                       float l1, int64_t Q, float* __restrict bp) {
  const Vec w0 = V::set1(l0), w1 = V::set1(l1);
  for (int64_t q = 0; q < Q; ++q) {
    const float* t = top + q * stride;
    const float* u = bottom + q * stride;
    SEGVIT_UNROLL
    for (int64_t v = 0; v < kNV; ++v) {
      const Vec lerp = V::fmadd(V::loadu(t + v * V::kLanes), w0, V::mul(V::loadu(u + v * V::kLanes), w1));
      V::store(bp + q * kNR + v * V::kLanes, sigmoid(lerp));
    }
  }
}

// c[m][0..kNR) = sum_q a[q][m] * b[q][0..kNR) for m < MR, one FMA per term in increasing q: a is an MR-class panel of
// the probabilities (Q x MR), b a packed pixel panel (Q x kNR). Only rows m < rows and columns < cols are stored (a
// partial tile computes exactly what a full one would, its padding is simply not written). Tiles narrower than kNR
// (the last of a row, when Wout is not a multiple of kNR) go through a buffer.
template <int MR>
inline void micro_kernel(const float* __restrict a, const float* __restrict b, int64_t Q, float* __restrict c,
                         int64_t ldc, int64_t rows, int64_t cols) {
  Vec acc[MR][kNV];
  SEGVIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    SEGVIT_UNROLL
    for (int v = 0; v < kNV; ++v) acc[m][v] = V::zero();
  }
  for (int64_t q = 0; q < Q; ++q) {
    Vec bq[kNV];
    SEGVIT_UNROLL
    for (int v = 0; v < kNV; ++v) bq[v] = V::load(b + q * kNR + v * V::kLanes);
    const float* aq = a + q * MR;
    SEGVIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      const Vec s = V::broadcast(aq + m);
      SEGVIT_UNROLL
      for (int v = 0; v < kNV; ++v) acc[m][v] = V::fmadd(s, bq[v], acc[m][v]);
    }
  }
  if (cols == kNR) {
    // Whole rows of aligned tiles bypass the caches (the output is written once, never read here): no
    // read-for-ownership of the output lines, which measured ~1.6x faster overall at 512 and 640 than plain stores
    // (AVX2). The worker fences them. Rows m >= rows (classes >= K of the last panel) are not stored.
    if ((reinterpret_cast<uintptr_t>(c) % (V::kLanes * sizeof(float))) == 0 && (ldc % V::kLanes) == 0) {
      SEGVIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        if (m >= rows) break;
        SEGVIT_UNROLL
        for (int v = 0; v < kNV; ++v) V::stream(c + m * ldc + v * V::kLanes, acc[m][v]);
      }
    } else {
      SEGVIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        if (m >= rows) break;
        SEGVIT_UNROLL
        for (int v = 0; v < kNV; ++v) V::storeu(c + m * ldc + v * V::kLanes, acc[m][v]);
      }
    }
    return;
  }
  alignas(64) float tile[MR * kNR];
  SEGVIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    SEGVIT_UNROLL
    for (int v = 0; v < kNV; ++v) V::store(tile + m * kNR + v * V::kLanes, acc[m][v]);
  }
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t x = 0; x < cols; ++x) c[m * ldc + x] = tile[m * kNR + x];
  }
}

struct Kernel {
  static constexpr int64_t kTileCols = kNR, kTileRows = kMR, kTileRowsSmall = kMRSmall;

  // One task: output rows [band.r0, band.r0 + band.n_rows) and columns [x0, x0 + min(chunk, Wout - x0)) of batch
  // element b. hrows: scratch of band.source_rows.size() * Q * chunk floats, bp: Q * kNR floats (64-byte aligned).
  static void run_task(const FusedProblem& p, const Band& band, int64_t b, int64_t x0, float* __restrict hrows,
                       float* __restrict bp) {
    const int64_t Q = p.Q, chunk = p.chunk, plane = p.Hout * p.Wout;
    const int64_t n_cols = std::min(chunk, p.Wout - x0);
    const int64_t n_panels = (n_cols + kNR - 1) / kNR;
    // Horizontal pass over the band's source rows, for every query; the padding up to a whole panel is zero.
    for (size_t s = 0; s < band.source_rows.size(); ++s) {
      for (int64_t q = 0; q < Q; ++q) {
        const float* src = p.masks + ((b * Q + q) * p.h + band.source_rows[s]) * p.w;
        float* dst = hrows + (static_cast<int64_t>(s) * Q + q) * chunk;
        lerp_columns(src, p.col0 + x0, p.col1 + x0, p.colw0 + x0, p.colw1 + x0, n_cols, dst);
        for (int64_t x = n_cols; x < n_panels * kNR; ++x) dst[x] = 0.0f;
      }
    }
    // Class panels (packed by the driver): n_full of kMR classes, then, when K is not a multiple of kMR, one of
    // p.tail_mr (kMR or kMRSmall) classes.
    const int64_t n_full = p.K / kMR;
    const float* probs = p.packed_probs + b * p.k_padded * Q;
    for (int64_t rr = 0; rr < band.n_rows; ++rr) {
      const float* top = hrows + band.slot0[rr] * Q * chunk;
      const float* bottom = hrows + band.slot1[rr] * Q * chunk;
      float* out_row = p.out + b * p.K * plane + (band.r0 + rr) * p.Wout + x0;
      for (int64_t j = 0; j < n_panels; ++j) {
        make_panel(top + j * kNR, bottom + j * kNR, chunk, band.roww0[rr], band.roww1[rr], Q, bp);
        const int64_t cols = std::min(kNR, n_cols - j * kNR);
        float* out_tile = out_row + j * kNR;
        for (int64_t i = 0; i < n_full; ++i) {
          micro_kernel<kMR>(probs + i * kMR * Q, bp, Q, out_tile + i * kMR * plane, plane, kMR, cols);
        }
        const int64_t c0 = n_full * kMR;
        if (p.tail_mr == kMR) {
          micro_kernel<kMR>(probs + c0 * Q, bp, Q, out_tile + c0 * plane, plane, p.K - c0, cols);
        } else if (p.tail_mr == kMRSmall) {
          micro_kernel<kMRSmall>(probs + c0 * Q, bp, Q, out_tile + c0 * plane, plane, p.K - c0, cols);
        }
      }
    }
  }
};
