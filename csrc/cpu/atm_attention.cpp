// CPU kernel of segvit::atm_attention (CONTRACT.md, op 1) and the flash-style attention core it shares with
// segvit::query_pool_attention (csrc/cpu/query_pool_attention.cpp).
//
// Forward: at::parallel_for over (batch, query block); the query blocks are large (GEMM efficiency) but at least two
// per call (a B 1, Nq 60 problem would otherwise run on one thread). A task walks the keys once, block by block, and
// for each key block all heads: S_h = Q_h K_h^T (a GEMM on a (query block x key block) tile in per-thread scratch),
// adds S_h into the similarity tile (so one pass over the keys yields both outputs and sim needs no second matmul),
// and folds exp(scale S_h - max) into the running online-softmax state of head h (csrc/common/online_softmax.h) and
// its output accumulator with a second GEMM P_h V_h. Nothing of size (B, H, Nq, Nk) exists, only (query block x key
// block) tiles per thread.
//
// Dropout (dropout_p > 0): after the row sum of a tile is taken (so lse is that of the un-dropped softmax), the
// probabilities are multiplied by a keep mask hashed from (seed, b, h, query, key) (a counter-based hash, see
// Dropout below) and the output by 1 / (1 - p). The backward hashes the same mask again: nothing is stored, and the
// mask does not depend on tiles or threads.
//
// Backward: with P = exp(scale S - lse) recomputed per tile, M the keep mask and c = 1 / (1 - p) (M c = 1 without
// dropout), dV = (c M P)^T dO, dP = c M (dO V^T), dR = scale P (dP - rowsum(dO * O)) + sim_scale dsim (R = Q K^T, the
// raw products both outputs depend on), dQ = dR K, dK = dR^T Q. One pass, parallel over (batch, key chunk): dK and
// dV of a chunk's keys are owned by its task; dQ gets one float32 partial per key chunk, summed in chunk order at
// the end. The chunk count depends only on Nk, so results do not depend on the thread count and no atomics are
// needed (5 tile GEMMs per tile instead of the 7 of a two-pass scheme that recomputes S and dP for dQ).
//
// Where the time goes (fp32, D 32): the tile GEMMs (K = D = 32 for S and dP, so at best ~60-70% of the FMA peak)
// dominate (two thirds of the forward, MKL packing included); exp (csrc/common/fast_exp.h, vectorized, ~1 ulp) is
// about a fifth on an AVX2 Zen 3 (0.6 ns per element per thread), the row passes the rest. (While GCC left that
// loop scalar for AVX2, before -fno-trapping-math and the bit-built 2^n, it was 40% and the kernel ~2x slower.)
// fwd+bwd does 7 GEMMs of the (Nq, Nk) size per head against eager autograd's 6 (the backward recomputes S instead
// of reading a saved (B, H, Nq, Nk) tensor), so its speed-up over eager comes only from the memory traffic eager
// spends on its (B, H, Nq, Nk) logits, probabilities and their gradients.
//
// ISA strategy (the extension must run on any x86_64, so no -march=native): the GEMMs go to BLAS (MKL's sgemm_ when
// libtorch_cpu exports it, else at::mm_out), which dispatches on the CPU at run time; the element-wise tile loops
// (max, exp, rescale) carry target_clones for x86-64-v4 / v3 / baseline and vectorize with `omp simd`.
#include "cpu/attention.h"
#include "cpu/sequential_blas.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/fast_exp.h"
#include "common/online_softmax.h"

#include "cpu/arch_clones.h"

// MKL as exported by libtorch_cpu on x86_64 (weak: other BLAS builds still load and use the at::mm_out path).
// Calling sgemm_ directly skips ATen's per-call tensor and dispatch overhead (several microseconds), which matters
// for the hundreds of small tile GEMMs of one attention call.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace segvit::cpu {
namespace attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C (M x N, ldc) = op(A) op(B) + beta C with op(A) M x K and op(B) K x N; beta is 0 or 1.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && std::max({M, N, K, lda, ldb, ldc}) <= std::numeric_limits<int>::max()) {
    // Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int ia = static_cast<int>(ldb), ib = static_cast<int>(lda), ic = static_cast<int>(ldc);
    const float alpha = 1.0f;
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &ia, A, &ib, &beta, C, &ic);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = trans_a ? at::from_blob(const_cast<float*>(A), {M, K}, {1, lda}, f32)
                               : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, f32);
  const at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {K, N}, {1, ldb}, f32)
                               : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, f32);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, f32);
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b);
  }
}

// A (rows x D) float32 tile of one head of a (B, N, H, D) operand: the operand itself (row stride) when it is
// float32, else converted into `scratch` (row stride D).
template <typename scalar_t>
const float* load_tile(const void* base, int64_t offset, int64_t rows, int64_t row_stride, int64_t D, float* scratch,
                       int64_t* ld) {
  const scalar_t* src = static_cast<const scalar_t*>(base) + offset;
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld = row_stride;
    return src;
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t d = 0; d < D; ++d) scratch[i * D + d] = static_cast<float>(src[i * row_stride + d]);
    }
    *ld = D;
    return scratch;
  }
}

// sim_acc[j] += s[j]; returns max_j scale * s[j].
SEGVIT_ARCH_CLONES
float accumulate_and_max(const float* __restrict s, float* __restrict sim_acc, int64_t n, float scale) {
  float mx = kNegInf;
  if (sim_acc != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      sim_acc[j] += s[j];
      mx = std::max(mx, scale * s[j]);
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, scale * s[j]);
  }
  return mx;
}

// s[j] = exp(scale * s[j] - shift); returns the sum.
SEGVIT_ARCH_CLONES
float exp_shifted(float* __restrict s, int64_t n, float scale, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = segvit::fast_exp(scale * s[j] - shift);
    s[j] = p;
    sum += p;
  }
  return sum;
}

// ds[j] = scale * p[j] * (ds[j] - delta) + sim_scale * dsim[j] (dsim may be null); p[j] = exp(scale * s[j] - lse)
// is computed into s first.
SEGVIT_ARCH_CLONES
void probs_and_grad(float* __restrict s, float* __restrict ds, const float* __restrict dsim, int64_t n, float scale,
                    float lse, float delta, float sim_scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = segvit::fast_exp(scale * s[j] - lse);
    s[j] = p;
    ds[j] = scale * p * (ds[j] - delta);
  }
  if (dsim != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ds[j] += sim_scale * dsim[j];
  }
}

SEGVIT_ARCH_CLONES
void scale_row(float* __restrict x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

// Attention dropout keep mask. Counter-based: keep(b, h, i, j) is a pure function of (seed, b, h, query i, key j),
// so the backward regenerates the forward's mask instead of storing (B, H, Nq, Nk) bits, and neither the tiling nor
// the thread count changes it. Per row, a 64-bit mix of (seed, row) gives a 32-bit row key (once per row and key
// block); per key, a 32-bit integer hash of row_key + j * golden ratio (multiplies, shifts, xors: vectorizes), whose
// top 24 bits are compared with p * 2^24 (keep rate 1 - p to within 2^-25).
inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  int32_t threshold = 0;   // drop when hash >> 8 < threshold
  float keep_scale = 1.0f;  // 1 / (1 - p)

  explicit Dropout(const Problem& p) {
    if (p.dropout_p <= 0.0f) return;
    active = true;
    seed = mix64(p.seed);
    threshold = static_cast<int32_t>(std::llround(static_cast<double>(p.dropout_p) * 16777216.0));
    keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(p.dropout_p)));
  }
  // Row key of query i of head h of batch b (row = (b * H + h) * Nq + i).
  uint32_t row_key(int64_t row) const { return static_cast<uint32_t>(mix64(seed ^ static_cast<uint64_t>(row)) >> 32); }
};

// 1.0f when key j of a row with key `row_key` is kept, else 0.0f.
inline float keep(uint32_t row_key, uint32_t j, int32_t threshold) {
  uint32_t x = row_key + j * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return static_cast<int32_t>(x >> 8) >= threshold ? 1.0f : 0.0f;
}

// p[j] *= keep(row_key, j0 + j): the forward folds the dropped probabilities into the output accumulator (the row
// sum, taken before, stays that of the un-dropped softmax).
SEGVIT_ARCH_CLONES
void drop_row(float* __restrict p, int64_t n, uint32_t row_key, uint32_t j0, int32_t threshold) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] *= keep(row_key, j0 + static_cast<uint32_t>(j), threshold);
}

// probs_and_grad with dropout mask m and c = 1 / (1 - p_drop): with P = exp(scale s - lse) and dO V^T in ds,
// s[j] = c m P (the dropped probabilities, for dV), ds[j] = scale P (c m ds[j] - delta) + sim_scale dsim[j].
SEGVIT_ARCH_CLONES
void probs_and_grad_dropout(float* __restrict s, float* __restrict ds, const float* __restrict dsim, int64_t n,
                            float scale, float lse, float delta, float sim_scale, uint32_t row_key, uint32_t j0,
                            int32_t threshold, float keep_scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = segvit::fast_exp(scale * s[j] - lse);
    const float cm = keep_scale * keep(row_key, j0 + static_cast<uint32_t>(j), threshold);
    s[j] = cm * p;
    ds[j] = scale * p * (cm * ds[j] - delta);
  }
  if (dsim != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ds[j] += sim_scale * dsim[j];
  }
}

// Splits n into ceil(n / target) blocks of near-equal size (so the last block is not a sliver); returns the size.
int64_t even_block(int64_t n, int64_t target) {
  const int64_t blocks = (n + target - 1) / target;
  return (n + blocks - 1) / blocks;
}

// Forward tiles: large (at most 160 x 512, near-equal blocks) because each tile GEMM has only K = D (32) and the
// per-call cost of sgemm_ is then a visible share; at least kForwardMinTasks query blocks (of >= 16 rows) per call
// so that B 1 with few queries (PASCAL-Context: Nq 60) still gives every thread of a 2-core machine a task.
constexpr int64_t kForwardQueryBlock = 160;
constexpr int64_t kForwardKeyBlock = 512;
constexpr int64_t kForwardMinTasks = 2;
constexpr int64_t kForwardMinQueryBlock = 16;
constexpr int64_t kBackwardQueryBlock = 64;
constexpr int64_t kBackwardKeyBlock = 512;
// Key chunks of the backward (each with its own float32 dQ partial): enough tasks for a few threads even at
// batch 1, few enough that the partials stay small. Independent of the thread count, hence deterministic.
constexpr int64_t kBackwardMaxChunks = 4;

template <typename scalar_t>
void forward_impl(const Problem& p) {
  const int64_t B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk, D = p.D;
  // At least kForwardMinTasks tasks (query blocks of >= kForwardMinQueryBlock rows) so that a small batch with few
  // queries (PASCAL-Context: B 1, Nq 60) still keeps several threads busy. Depends on the shape only, and a row's
  // result does not depend on its block anyway.
  const int64_t min_blocks =
      std::min((kForwardMinTasks + B - 1) / B, (Nq + kForwardMinQueryBlock - 1) / kForwardMinQueryBlock);
  const int64_t bq = std::min(even_block(Nq, kForwardQueryBlock), (Nq + min_blocks - 1) / min_blocks);
  const int64_t bk = even_block(Nk, kForwardKeyBlock);
  const int64_t q_blocks = (Nq + bq - 1) / bq;
  const float scale = p.scale;
  const Dropout dropout(p);

  at::parallel_for(0, B * q_blocks, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode inference_guard;
    SequentialBlasGuard sequential_blas;
    std::vector<float> qs(static_cast<size_t>(H * bq * D));      // queries of the block, per head, float32
    std::vector<float> acc(static_cast<size_t>(H * bq * D));     // output accumulators per head
    std::vector<float> row_max(static_cast<size_t>(H * bq)), row_sum(static_cast<size_t>(H * bq));
    std::vector<float> scores(static_cast<size_t>(bq * bk));     // S_h tile, then P_h in place
    std::vector<float> sim_acc(p.sim != nullptr ? static_cast<size_t>(bq * bk) : 0);
    std::vector<float> k_tile(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(bk * D));
    std::vector<float> v_tile(k_tile.size());

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / q_blocks;
      const int64_t i0 = (task % q_blocks) * bq;
      const int64_t mq = std::min(bq, Nq - i0);
      const scalar_t* q_src = static_cast<const scalar_t*>(p.q.ptr) + b * p.q.batch + i0 * p.q.row;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < mq; ++i) {
          for (int64_t d = 0; d < D; ++d) {
            qs[(h * bq + i) * D + d] = static_cast<float>(q_src[i * p.q.row + h * p.q.head + d]);
          }
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);

      for (int64_t j0 = 0; j0 < Nk; j0 += bk) {
        const int64_t nk = std::min(bk, Nk - j0);
        float* sim_tile = p.sim != nullptr ? sim_acc.data() : nullptr;
        if (sim_tile != nullptr) std::fill(sim_tile, sim_tile + mq * nk, 0.0f);
        for (int64_t h = 0; h < H; ++h) {
          int64_t ldk = 0, ldv = 0;
          const float* kt = load_tile<scalar_t>(p.k.ptr, b * p.k.batch + j0 * p.k.row + h * p.k.head, nk, p.k.row, D,
                                                k_tile.data(), &ldk);
          const float* vt = load_tile<scalar_t>(p.v.ptr, b * p.v.batch + j0 * p.v.row + h * p.v.head, nk, p.v.row, D,
                                                v_tile.data(), &ldv);
          const float* qh = qs.data() + h * bq * D;
          float* acc_h = acc.data() + h * bq * D;
          gemm(false, true, mq, nk, D, qh, D, kt, ldk, 0.0f, scores.data(), nk);
          for (int64_t i = 0; i < mq; ++i) {
            float* s = scores.data() + i * nk;
            const float block_max =
                accumulate_and_max(s, sim_tile != nullptr ? sim_tile + i * nk : nullptr, nk, scale);
            float& m = row_max[h * bq + i];
            const float new_max = std::max(m, block_max);
            // A row whose logits are all -inf (scale * s overflowed) keeps max -inf; shifting by 0 then gives
            // exp(-inf) = 0 terms and a NaN output, as the eager softmax does.
            const float shift = new_max == kNegInf ? 0.0f : new_max;
            const float alpha = segvit::online_softmax_rescale(m, new_max);
            const float block_sum = exp_shifted(s, nk, scale, shift);
            if (dropout.active) {
              drop_row(s, nk, dropout.row_key((b * H + h) * Nq + i0 + i), static_cast<uint32_t>(j0),
                       dropout.threshold);
            }
            row_sum[h * bq + i] = row_sum[h * bq + i] * alpha + block_sum;
            if (alpha != 1.0f) scale_row(acc_h + i * D, D, alpha);
            m = new_max;
          }
          gemm(false, false, mq, D, nk, scores.data(), nk, vt, ldv, 1.0f, acc_h, D);
        }
        if (sim_tile != nullptr) {
          scalar_t* sim_dst = static_cast<scalar_t*>(p.sim) + (b * Nq + i0) * Nk + j0;
          for (int64_t i = 0; i < mq; ++i) {
            for (int64_t j = 0; j < nk; ++j) {
              sim_dst[i * Nk + j] = static_cast<scalar_t>(sim_tile[i * nk + j] * p.sim_scale);
            }
          }
        }
      }

      scalar_t* out_dst = static_cast<scalar_t*>(p.out.ptr) + b * p.out.batch + i0 * p.out.row;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < mq; ++i) {
          const segvit::OnlineSoftmaxState state{row_max[h * bq + i], row_sum[h * bq + i]};
          const float inv = dropout.keep_scale / state.sum;
          const float* a = acc.data() + (h * bq + i) * D;
          scalar_t* o = out_dst + i * p.out.row + h * p.out.head;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
          p.lse[(b * H + h) * Nq + i0 + i] = segvit::online_softmax_lse(state);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Problem& p) {
  const int64_t B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk, D = p.D;
  const int64_t bq = std::min(Nq, kBackwardQueryBlock);
  const int64_t bk = even_block(Nk, kBackwardKeyBlock);
  const int64_t k_blocks = (Nk + bk - 1) / bk;
  const int64_t chunks = std::min(k_blocks, kBackwardMaxChunks);
  const int64_t blocks_per_chunk = (k_blocks + chunks - 1) / chunks;
  const float scale = p.scale;
  const Dropout dropout(p);

  // delta[b, h, i] = sum_d dout * out: the softmax backward's row term.
  std::vector<float> delta(static_cast<size_t>(B * H * Nq));
  at::parallel_for(0, B * Nq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Nq, i = t % Nq;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* o = static_cast<const scalar_t*>(p.out.ptr) + b * p.out.batch + i * p.out.row + h * p.out.head;
        const scalar_t* g =
            static_cast<const scalar_t*>(p.dout.ptr) + b * p.dout.batch + i * p.dout.row + h * p.dout.head;
        float sum = 0.0f;
        for (int64_t d = 0; d < D; ++d) sum += static_cast<float>(o[d]) * static_cast<float>(g[d]);
        delta[(b * H + h) * Nq + i] = sum;
      }
    }
  });

  // dQ partials: (chunk, B, Nq, H, D) float32, zero-initialised, summed in chunk order below. When dq itself has
  // that layout (it does for both ops), it holds chunk 0's partial, so only chunks - 1 extra buffers are needed.
  const int64_t part_batch = Nq * H * D, part_row = H * D;
  const bool dq_holds_chunk0 = p.dq.batch == part_batch && p.dq.row == part_row && p.dq.head == D;
  const int64_t extra_parts = dq_holds_chunk0 ? chunks - 1 : chunks;
  std::vector<float> dq_part(static_cast<size_t>(extra_parts * B * part_batch), 0.0f);
  if (dq_holds_chunk0) std::fill_n(static_cast<float*>(p.dq.ptr), B * part_batch, 0.0f);
  auto dq_partial = [&](int64_t c, int64_t b) -> float* {
    if (dq_holds_chunk0) {
      return c == 0 ? static_cast<float*>(p.dq.ptr) + b * part_batch : dq_part.data() + ((c - 1) * B + b) * part_batch;
    }
    return dq_part.data() + (c * B + b) * part_batch;
  };

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode inference_guard;
    SequentialBlasGuard sequential_blas;
    constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;
    std::vector<float> scores(static_cast<size_t>(bq * bk)), dscores(static_cast<size_t>(bq * bk));
    std::vector<float> dk_acc(static_cast<size_t>(bk * D)), dv_acc(static_cast<size_t>(bk * D));
    std::vector<float> k_tile(kIsFloat ? 0 : static_cast<size_t>(bk * D)), v_tile(k_tile.size());
    std::vector<float> q_tile(kIsFloat ? 0 : static_cast<size_t>(bq * D)), do_tile(q_tile.size());
    std::vector<float> dsim_tile(p.dsim != nullptr && !kIsFloat ? static_cast<size_t>(bq * bk) : 0);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      float* dq_c = dq_partial(c, b);
      const int64_t kb_end = std::min(k_blocks, (c + 1) * blocks_per_chunk);
      for (int64_t kb = c * blocks_per_chunk; kb < kb_end; ++kb) {
        const int64_t j0 = kb * bk, nk = std::min(bk, Nk - j0);
        for (int64_t h = 0; h < H; ++h) {
          int64_t ldk = 0, ldv = 0;
          const float* kt = load_tile<scalar_t>(p.k.ptr, b * p.k.batch + j0 * p.k.row + h * p.k.head, nk, p.k.row, D,
                                                k_tile.data(), &ldk);
          const float* vt = load_tile<scalar_t>(p.v.ptr, b * p.v.batch + j0 * p.v.row + h * p.v.head, nk, p.v.row, D,
                                                v_tile.data(), &ldv);
          for (int64_t i0 = 0; i0 < Nq; i0 += bq) {
            const int64_t mq = std::min(bq, Nq - i0);
            int64_t ldq = 0, ldo = 0;
            const float* qt = load_tile<scalar_t>(p.q.ptr, b * p.q.batch + i0 * p.q.row + h * p.q.head, mq, p.q.row,
                                                  D, q_tile.data(), &ldq);
            const float* dot = load_tile<scalar_t>(p.dout.ptr, b * p.dout.batch + i0 * p.dout.row + h * p.dout.head,
                                                   mq, p.dout.row, D, do_tile.data(), &ldo);
            // dsim rows (row stride ld_dsim): read in place when float32 (no per-head copy), else converted.
            const float* dsim_rows = nullptr;
            int64_t ld_dsim = nk;
            if (p.dsim != nullptr) {
              const scalar_t* src = static_cast<const scalar_t*>(p.dsim) + (b * Nq + i0) * Nk + j0;
              if constexpr (kIsFloat) {
                dsim_rows = src;
                ld_dsim = Nk;
              } else {
                for (int64_t i = 0; i < mq; ++i) {
                  for (int64_t j = 0; j < nk; ++j) dsim_tile[i * nk + j] = static_cast<float>(src[i * Nk + j]);
                }
                dsim_rows = dsim_tile.data();
              }
            }
            gemm(false, true, mq, nk, D, qt, ldq, kt, ldk, 0.0f, scores.data(), nk);     // S = Q K^T
            gemm(false, true, mq, nk, D, dot, ldo, vt, ldv, 0.0f, dscores.data(), nk);  // dP = dO V^T
            const float* lse_row = p.lse + (b * H + h) * Nq + i0;
            const float* delta_row = delta.data() + (b * H + h) * Nq + i0;
            for (int64_t i = 0; i < mq; ++i) {
              const float* dsim_i = dsim_rows != nullptr ? dsim_rows + i * ld_dsim : nullptr;
              if (dropout.active) {
                probs_and_grad_dropout(scores.data() + i * nk, dscores.data() + i * nk, dsim_i, nk, scale, lse_row[i],
                                       delta_row[i], p.sim_scale, dropout.row_key((b * H + h) * Nq + i0 + i),
                                       static_cast<uint32_t>(j0), dropout.threshold, dropout.keep_scale);
              } else {
                probs_and_grad(scores.data() + i * nk, dscores.data() + i * nk, dsim_i, nk, scale, lse_row[i],
                               delta_row[i], p.sim_scale);
              }
            }
            const float first = i0 == 0 ? 0.0f : 1.0f;
            gemm(true, false, nk, D, mq, scores.data(), nk, dot, ldo, first, dv_acc.data(), D);   // dV += P^T dO
            gemm(true, false, nk, D, mq, dscores.data(), nk, qt, ldq, first, dk_acc.data(), D);   // dK += dR^T Q
            gemm(false, false, mq, D, nk, dscores.data(), nk, kt, ldk, 1.0f,                       // dQ += dR K
                 dq_c + i0 * part_row + h * D, part_row);
          }
          float* dk_dst = static_cast<float*>(p.dk.ptr) + b * p.dk.batch + j0 * p.dk.row + h * p.dk.head;
          float* dv_dst = static_cast<float*>(p.dv.ptr) + b * p.dv.batch + j0 * p.dv.row + h * p.dv.head;
          for (int64_t j = 0; j < nk; ++j) {
            for (int64_t d = 0; d < D; ++d) {
              dk_dst[j * p.dk.row + d] = dk_acc[j * D + d];
              dv_dst[j * p.dv.row + d] = dv_acc[j * D + d];
            }
          }
        }
      }
    }
  });

  if (dq_holds_chunk0 && chunks == 1) return;
  at::parallel_for(0, B * Nq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Nq, i = t % Nq;
      for (int64_t h = 0; h < H; ++h) {
        float* dst = static_cast<float*>(p.dq.ptr) + b * p.dq.batch + i * p.dq.row + h * p.dq.head;
        const int64_t offset = i * part_row + h * D;
        for (int64_t d = 0; d < D; ++d) {
          float sum = 0.0f;
          for (int64_t c = 0; c < chunks; ++c) sum += dq_partial(c, b)[offset + d];
          dst[d] = sum;
        }
      }
    }
  });
}

}  // namespace

void poison_for_tests(at::Tensor& t) {
  if (std::getenv("SEGVIT_POISON_OUTPUTS") != nullptr && t.is_floating_point()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

void forward(const Problem& p) {
  if (p.B == 0 || p.Nq == 0 || p.H == 0) return;
  TORCH_INTERNAL_ASSERT(p.Nk > 0 && p.D > 0);
  if (p.dtype == at::kFloat) {
    forward_impl<float>(p);
  } else {
    TORCH_INTERNAL_ASSERT(p.dtype == at::kBFloat16);
    forward_impl<c10::BFloat16>(p);
  }
}

void backward(const Problem& p) {
  if (p.B == 0 || p.Nq == 0 || p.H == 0) return;
  TORCH_INTERNAL_ASSERT(p.Nk > 0 && p.D > 0);
  if (p.dtype == at::kFloat) {
    backward_impl<float>(p);
  } else {
    TORCH_INTERNAL_ASSERT(p.dtype == at::kBFloat16);
    backward_impl<c10::BFloat16>(p);
  }
}

}  // namespace attention

namespace {

constexpr int64_t kMaxHeadDim = 128;

attention::HeadsView heads_view(const at::Tensor& t) {  // t (B, N, H, D) contiguous
  return {const_cast<void*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const std::pair<const char*, const at::Tensor*> args[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->defined(), op, ": ", name, " must be a defined tensor");
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, N, H, D), got shape ", t->sizes());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, " (CPU kernel): q must be float32 or bfloat16, got ",
              dtype);
  TORCH_CHECK(k.scalar_type() == dtype, op, ": k must have the dtype of q (", dtype, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": v must have the dtype of q (", dtype, "), got ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), op, ": q and k must have the same batch size B, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k must have the same head count H, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.size(3) == k.size(3), op, ": q and k must have the same head dim D, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": q must have a head dim D in [1, ", kMaxHeadDim,
              "], got shape ", q.sizes());
  TORCH_CHECK(q.size(2) >= 1, op, ": q must have at least one head, got shape ", q.sizes());
  TORCH_CHECK(q.size(1) >= 1, op, ": q must have Nq >= 1 queries, got shape ", q.sizes());
  TORCH_CHECK(k.size(1) >= 1, op, ": k must have Nk >= 1 keys, got shape ", k.sizes());
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> atm_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                     const at::Tensor& v_in, double scale,
                                                                     double dropout_p, int64_t seed) {
  check_qkv("segvit::atm_attention_fwd", q_in, k_in, v_in);
  TORCH_CHECK(std::isfinite(scale), "segvit::atm_attention_fwd: scale must be finite, got ", scale);
  check_dropout("segvit::atm_attention_fwd", dropout_p);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), Nq = q.size(1), H = q.size(2), D = q.size(3), Nk = k.size(1);
  at::Tensor out = at::empty_like(q);
  at::Tensor sim = at::empty({B, Nq, Nk}, q.options());
  at::Tensor lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  for (at::Tensor* t : {&out, &sim, &lse}) attention::poison_for_tests(*t);
  attention::Problem p;
  p.dtype = q.scalar_type();
  p.B = B, p.H = H, p.Nq = Nq, p.Nk = Nk, p.D = D;
  p.scale = static_cast<float>(scale);
  p.q = heads_view(q), p.k = heads_view(k), p.v = heads_view(v), p.out = heads_view(out);
  p.lse = lse.data_ptr<float>();
  p.sim = sim.data_ptr();
  p.sim_scale = static_cast<float>(scale / static_cast<double>(H));
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  attention::forward(p);
  return {out, sim, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atm_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_sim, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale, double dropout_p,
    int64_t seed) {
  constexpr const char* op = "segvit::atm_attention_bwd";
  check_qkv(op, q_in, k_in, v_in);
  const auto dtype = q_in.scalar_type();
  const int64_t B = q_in.size(0), Nq = q_in.size(1), H = q_in.size(2), D = q_in.size(3), Nk = k_in.size(1);
  const std::pair<const char*, const at::Tensor*> same_as_q[] = {{"grad_out", &grad_out}, {"out", &out_in}};
  for (const auto& [name, t] : same_as_q) {
    TORCH_CHECK(t->defined() && t->device().is_cpu(), op, ": ", name, " must be a defined CPU tensor");
    TORCH_CHECK(t->sizes() == q_in.sizes(), op, ": ", name, " must have the shape of q ", q_in.sizes(), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " must have the dtype of q (", dtype, "), got ",
                t->scalar_type());
  }
  TORCH_CHECK(grad_sim.defined() && grad_sim.device().is_cpu(), op, ": grad_sim must be a defined CPU tensor");
  TORCH_CHECK(grad_sim.sizes() == at::IntArrayRef({B, Nq, Nk}), op, ": grad_sim must have shape (B, Nq, Nk) = (", B,
              ", ", Nq, ", ", Nk, "), got ", grad_sim.sizes());
  TORCH_CHECK(grad_sim.scalar_type() == dtype, op, ": grad_sim must have the dtype of q (", dtype, "), got ",
              grad_sim.scalar_type());
  TORCH_CHECK(lse_in.defined() && lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat, op,
              ": lse must be a float32 CPU tensor");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Nq}), op, ": lse must have shape (B, H, Nq) = (", B, ", ", H,
              ", ", Nq, "), got ", lse_in.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_dropout(op, dropout_p);

  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous(), dout = grad_out.contiguous(), dsim = grad_sim.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const bool is_float = dtype == at::kFloat;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({B, Nq, H, D}, f32), dk = at::empty({B, Nk, H, D}, f32), dv = at::empty({B, Nk, H, D}, f32);
  for (at::Tensor* t : {&dq, &dk, &dv}) attention::poison_for_tests(*t);
  attention::Problem p;
  p.dtype = dtype;
  p.B = B, p.H = H, p.Nq = Nq, p.Nk = Nk, p.D = D;
  p.scale = static_cast<float>(scale);
  p.q = heads_view(q), p.k = heads_view(k), p.v = heads_view(v), p.out = heads_view(out), p.dout = heads_view(dout);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dsim = dsim.data_ptr();
  p.sim_scale = static_cast<float>(scale / static_cast<double>(H));
  p.dq = heads_view(dq), p.dk = heads_view(dk), p.dv = heads_view(dv);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  attention::backward(p);
  if (is_float) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace segvit::cpu
