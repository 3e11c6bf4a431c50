// CPU kernel of segvit::query_pool_attention (CONTRACT.md, op 2): the Shrunk query-downsampling attention.
//
// Forward: the sampled tokens are gathered once (B L' x C, the size of the output) and projected by ONE GEMM whose
// alpha and bias carry the D^-0.5 scale (so q is written once, already scaled, as nn.MultiheadAttention scales it
// before the product). Keys and values of all tokens come from one GEMM (B L x 2C). The attention itself is the
// flash-style core of csrc/cpu/atm_attention.cpp (per-thread tiles, online softmax; no (B, H, L', L) scores),
// called once per (batch, head) from our own parallel_for (the core's then runs inline): B H equal tasks balance
// over the threads whatever the core's query blocking (its (batch, query block) split gave 5 or 3 tasks at L' 400,
// i.e. 3 + 2 or 2 + 1 on two threads; the per-head split measured ~10% faster forward).
//
// Backward, key-chunked: the core's backward runs on chunks of at most kKeyChunk keys (P = exp(S - lse) is exact on
// any key subset given the full-row lse), again per head in parallel, giving the chunk's dk, dv and its share of
// dq; the chunk's dkv then goes straight into dW_kv += dkv^T x_chunk and dx_chunk = dkv W_kv, so only a
// (chunk, 2C) float32 dkv exists, never the (B, L, 2C) one nor its dtype copy. dq is summed over the chunks in a
// fixed order, then the query side's GEMMs run on the gathered sampled tokens; each sampled token is one row of dq,
// so its dx term is added through a strided view without overlap. bfloat16 with several chunks sums dW_kv in
// float32. The saved K/V (B, L, 2C) is kept rather than recomputed: recomputing it costs the forward's largest GEMM
// again (~35 ms, about a fifth of fwd+bwd) to save 13 MB at the issue-4 shape.
//
// Scratch (fwd+bwd, beyond the output and the input gradients; peak RSS of a fresh process with glibc's mmap
// threshold pinned): eager ~114 MB (the (H, L', L) scores, softmax and their gradients), ours ~25 MB (saved
// q + kv + lse 14.7 MB, dq, one chunk's dq, a 6.5 MB dkv chunk; autograd no longer materializes zero gradients
// for the non-differentiable q, kv, lse: see segvit/ops/query_pool_attention.py).
//
// Roofline (issue 4 shape: B 1, 40x40 grid -> L' 400, C 1024, 16 heads, float32, 2 threads of an AVX-512 EPYC of
// this workplace). MKL sgemm reaches ~185 GFLOP/s (175-200) both at the K/V shape (1600x1024 @ 1024x2048, ~35 ms)
// and at 4096^3. Forward: 10.2 GFLOP = projections 7.5 (K/V 6.7, q 0.84) + attention products 2.6; eager runs the same
// projections through the same BLAS (~40 ms of its ~84 ms). Even with every FLOP at GEMM peak the forward takes
// 55 ms, a 1.52x bound over eager before any softmax work, so 1.5x is not reachable in practice. fwd+bwd: the
// backward adds 15.1 GFLOP of projection GEMMs (dW, dx) and 6.6 of attention products (S recomputed); at GEMM peak
// our 32 GFLOP take ~173 ms against eager's ~221 ms: a 1.28x bound. 1.5x (147 ms) would leave 25 ms for 9.2 GFLOP
// of attention products after the 122 ms of shared projection GEMMs: twice BLAS peak, i.e. impossible.
// Measured at this shape (benchmarks/results/cpu, an AVX2 Zen 3 EPYC at ~131 GFLOP/s, interleaved medians): forward
// 1.58x eager and 1.03x linear + SDPA; fwd+bwd 1.22x eager and 1.01x linear + SDPA (on the AVX-512 machine above:
// 1.36x / 0.99x and 1.20x / 1.05x). On the Zen 3 eager's fwd+bwd runs at only 57% of the GEMM peak (30.5 GFLOP in
// 410 ms), so the bound above loosens to 1.76x, but 1.5x would still take 85% of peak on every FLOP, the attention's
// thin (K = D = 64) tile products included; ours and linear + SDPA both sustain ~70%.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/attention.h"

namespace segvit::cpu {
namespace {

struct Geometry {
  int64_t B, L, C, H, D, gh, gw, stride, ph, pw, Lp;
};

Geometry check_inputs(const char* op, const at::Tensor& x, at::IntArrayRef grid, const at::Tensor& in_proj_weight,
                      int64_t num_heads, int64_t stride) {
  TORCH_CHECK(x.defined() && in_proj_weight.defined(), op, ": x and in_proj_weight must be defined tensors");
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(in_proj_weight.device().is_cpu(), op, " (CPU kernel): in_proj_weight must be a CPU tensor, got ",
              in_proj_weight.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, L, C), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, " (CPU kernel): x must be float32 or bfloat16, got ",
              dtype);
  TORCH_CHECK(in_proj_weight.scalar_type() == dtype, op, ": in_proj_weight must have the dtype of x (", dtype,
              "), got ", in_proj_weight.scalar_type());
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  TORCH_CHECK(C >= 1, op, ": x must have C >= 1 channels, got shape ", x.sizes());
  TORCH_CHECK(in_proj_weight.sizes() == at::IntArrayRef({3 * C, C}), op, ": in_proj_weight must have shape (3C, C) = (",
              3 * C, ", ", C, "), got ", in_proj_weight.sizes());
  TORCH_CHECK(grid.size() == 2, op, ": grid must be two ints (gh, gw), got ", grid);
  TORCH_CHECK(grid[0] >= 1 && grid[1] >= 1, op, ": grid must be two positive ints (gh, gw), got ", grid);
  TORCH_CHECK(grid[0] * grid[1] == L, op, ": grid must satisfy gh * gw == L = ", L, " (tokens of x), got ", grid);
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, op, ": num_heads must be a positive divisor of C = ", C, ", got ",
              num_heads);
  TORCH_CHECK(stride >= 1, op, ": stride must be a positive int, got ", stride);
  const int64_t ph = (grid[0] + stride - 1) / stride, pw = (grid[1] + stride - 1) / stride;
  return {B, L, C, num_heads, C / num_heads, grid[0], grid[1], stride, ph, pw, ph * pw};
}

// The sampled tokens xs (B L' x C), gathered into one contiguous copy (the size of the output): the query projection
// is then ONE GEMM. (Projecting straight from x, one GEMM per sampled grid row with leading dimension stride * C,
// avoids the copy but costs ph calls of only pw rows each: about twice the time of the gather plus one GEMM.)
at::Tensor gather_sampled(const at::Tensor& x, const Geometry& g) {
  return x.view({g.B, g.gh, g.gw, g.C})
      .slice(1, 0, g.gh, g.stride)
      .slice(2, 0, g.gw, g.stride)
      .reshape({g.B * g.Lp, g.C});
}

// One (B, N, H, D) operand for the core, from t (B, N, width) starting at batch b, row n0, channel channel_offset.
attention::HeadsView view(const at::Tensor& t, int64_t b, int64_t n0, int64_t channel_offset, int64_t head_dim) {
  const int64_t offset = b * t.stride(0) + n0 * t.stride(1) + channel_offset;
  return {static_cast<char*>(t.data_ptr()) + offset * t.element_size(), t.stride(0), t.stride(1), head_dim};
}

// Keys per step of the backward (see the header). Chunks are equal splits of L of at most this size, fixed by L
// alone (so the result does not depend on the thread count). Smaller chunks shrink the (chunk, 2C) float32 dkv but
// cost time: at the issue-4 shape, 512 (chunks of 400 keys: 3.3 MB instead of 6.5) made the backward ~5% slower,
// 256 ~15% (smaller tiles in the core, more and thinner projection GEMMs).
constexpr int64_t kKeyChunk = 1024;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> query_pool_attention_forward(
    const at::Tensor& x_in, at::IntArrayRef grid, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    int64_t num_heads, int64_t stride) {
  constexpr const char* op = "segvit::query_pool_attention_fwd";
  const Geometry g = check_inputs(op, x_in, grid, in_proj_weight, num_heads, stride);
  TORCH_CHECK(in_proj_bias.defined() && in_proj_bias.device().is_cpu(), op,
              ": in_proj_bias must be a defined CPU tensor");
  TORCH_CHECK(in_proj_bias.scalar_type() == x_in.scalar_type(), op, ": in_proj_bias must have the dtype of x (",
              x_in.scalar_type(), "), got ", in_proj_bias.scalar_type());
  TORCH_CHECK(in_proj_bias.sizes() == at::IntArrayRef({3 * g.C}), op, ": in_proj_bias must have shape (3C,) = (",
              3 * g.C, ",), got ", in_proj_bias.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = in_proj_weight.contiguous(), bias = in_proj_bias.contiguous();
  const double scale = std::pow(static_cast<double>(g.D), -0.5);

  at::Tensor q = at::empty({g.B, g.Lp, g.C}, x.options());
  at::Tensor kv = at::linear(x, w.narrow(0, g.C, 2 * g.C), bias.narrow(0, g.C, 2 * g.C));  // (B, L, 2C)
  at::Tensor out = at::empty({g.B, g.Lp, g.C}, x.options());
  at::Tensor lse = at::empty({g.B, g.H, g.Lp}, x.options().dtype(at::kFloat));
  for (at::Tensor* t : {&q, &out, &lse}) attention::poison_for_tests(*t);
  if (g.B == 0) return {out, q, kv, lse};
  // q = (xs W_q^T + b_q) D^-0.5 in one GEMM: the scale rides on alpha and on the bias (exact for D a power of 4;
  // otherwise one rounding fewer than scaling the product afterwards), so q is written once.
  at::Tensor q_2d = q.view({g.B * g.Lp, g.C});
  at::addmm_out(q_2d, bias.narrow(0, 0, g.C) * scale, gather_sampled(x, g), w.narrow(0, 0, g.C).t(), 1.0, scale);

  // One core call per (batch, head), run in parallel here (the core's own parallel_for then runs inline): B H
  // equal tasks balance over the threads, where the core's (batch, query block) split gives B ceil(L' / block)
  // (5 at L' 400: 3 + 2 on two threads). Each head's result does not depend on the thread that computes it.
  float* lse_ptr = lse.data_ptr<float>();
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.H, h = t % g.H;
      attention::Problem p;
      p.dtype = x.scalar_type();
      p.B = 1, p.H = 1, p.Nq = g.Lp, p.Nk = g.L, p.D = g.D;
      p.scale = 1.0f;
      p.q = view(q, b, 0, h * g.D, g.D), p.k = view(kv, b, 0, h * g.D, g.D), p.v = view(kv, b, 0, g.C + h * g.D, g.D);
      p.out = view(out, b, 0, h * g.D, g.D);
      p.lse = lse_ptr + t * g.Lp;
      attention::forward(p);
    }
  });
  return {out, q, kv, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_pool_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, at::IntArrayRef grid, const at::Tensor& in_proj_weight,
    const at::Tensor& q_in, const at::Tensor& kv_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    int64_t num_heads, int64_t stride) {
  constexpr const char* op = "segvit::query_pool_attention_bwd";
  const Geometry g = check_inputs(op, x_in, grid, in_proj_weight, num_heads, stride);
  const auto dtype = x_in.scalar_type();
  const std::tuple<const char*, const at::Tensor*, int64_t, int64_t> same_dtype[] = {
      {"grad_out", &grad_out, g.Lp, g.C},
      {"q", &q_in, g.Lp, g.C},
      {"out", &out_in, g.Lp, g.C},
      {"kv", &kv_in, g.L, 2 * g.C}};
  for (const auto& [name, t, rows, width] : same_dtype) {
    TORCH_CHECK(t->defined() && t->device().is_cpu(), op, ": ", name, " must be a defined CPU tensor");
    TORCH_CHECK(t->sizes() == at::IntArrayRef({g.B, rows, width}), op, ": ", name, " must have shape (", g.B, ", ",
                rows, ", ", width, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " must have the dtype of x (", dtype, "), got ",
                t->scalar_type());
  }
  TORCH_CHECK(lse_in.defined() && lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat, op,
              ": lse must be a float32 CPU tensor");
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({g.B, g.H, g.Lp}), op, ": lse must have shape (B, H, L') = (", g.B,
              ", ", g.H, ", ", g.Lp, "), got ", lse_in.sizes());

  const bool is_float = dtype == at::kFloat;
  const auto f32 = x_in.options().dtype(at::kFloat);
  const at::Tensor dout = grad_out.contiguous(), q = q_in.contiguous(), kv = kv_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor x = x_in.contiguous(), w = in_proj_weight.contiguous();
  const at::Tensor w_kv = w.narrow(0, g.C, 2 * g.C);
  at::Tensor grad_x = at::empty({g.B, g.L, g.C}, x.options());
  at::Tensor grad_w = at::empty({3 * g.C, g.C}, x.options());
  at::Tensor grad_w_q = grad_w.narrow(0, 0, g.C), grad_w_kv = grad_w.narrow(0, g.C, 2 * g.C);
  at::Tensor grad_b = at::zeros({3 * g.C}, f32);
  if (g.B == 0) {
    grad_w.zero_();
    return {grad_x, grad_w, grad_b.to(dtype)};
  }

  // Key-chunked: the core's backward on one chunk of keys gives that chunk's dk, dv exactly (P = exp(S - lse) needs
  // only the full-row lse) and the chunk's share of dq; the chunk's dkv then goes straight through its two GEMMs
  // (dW_kv += dkv^T x_chunk, dx_chunk = dkv W_kv) and its buffer is reused. Only a (chunk, 2C) float32 dkv exists,
  // never the (B, L, 2C) one. dq is summed over the chunks in order.
  const int64_t n_chunks = (g.L + kKeyChunk - 1) / kKeyChunk;
  const int64_t chunk = (g.L + n_chunks - 1) / n_chunks;
  const bool single_step = g.B == 1 && n_chunks == 1;
  at::Tensor dq = at::empty({g.B, g.Lp, g.C}, f32);
  at::Tensor dq_part = n_chunks > 1 ? at::empty({1, g.Lp, g.C}, f32) : at::Tensor();
  at::Tensor dkv = at::empty({chunk, 2 * g.C}, f32);
  at::Tensor dkv_low = is_float ? at::Tensor() : at::empty({chunk, 2 * g.C}, x.options());
  // bfloat16 with several steps: dW_kv is summed over the steps in float32 (one bfloat16 rounding per step's
  // product, as eager has one for the whole product), then rounded once.
  at::Tensor grad_w_kv_acc = (!is_float && !single_step) ? at::zeros({2 * g.C, g.C}, f32) : at::Tensor();
  for (at::Tensor* t : {&dq, &dq_part, &dkv}) {
    if (t->defined()) attention::poison_for_tests(*t);
  }
  at::Tensor grad_b_kv = grad_b.narrow(0, g.C, 2 * g.C);
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t j0 = 0; j0 < g.L; j0 += chunk) {
      const int64_t n = std::min(chunk, g.L - j0);
      const bool first_chunk = j0 == 0;
      at::Tensor dq_dst = first_chunk ? dq.narrow(0, b, 1) : dq_part;
      at::Tensor dkv_c = dkv.narrow(0, 0, n).unsqueeze(0);  // (1, n, 2C)
      // Per head, in parallel (as in the forward): every chunk size keeps H tasks for the threads.
      at::parallel_for(0, g.H, 1, [&](int64_t h_begin, int64_t h_end) {
        for (int64_t h = h_begin; h < h_end; ++h) {
          attention::Problem p;
          p.dtype = dtype;
          p.B = 1, p.H = 1, p.Nq = g.Lp, p.Nk = n, p.D = g.D;
          p.scale = 1.0f;
          const int64_t c = h * g.D;
          p.q = view(q, b, 0, c, g.D), p.out = view(out, b, 0, c, g.D), p.dout = view(dout, b, 0, c, g.D);
          p.k = view(kv, b, j0, c, g.D), p.v = view(kv, b, j0, g.C + c, g.D);
          p.lse = const_cast<float*>(lse.data_ptr<float>()) + (b * g.H + h) * g.Lp;
          p.dq = view(dq_dst, 0, 0, c, g.D), p.dk = view(dkv_c, 0, 0, c, g.D), p.dv = view(dkv_c, 0, 0, g.C + c, g.D);
          attention::backward(p);
        }
      });
      if (!first_chunk) dq.select(0, b).add_(dq_part.select(0, 0));

      const at::Tensor dkv_2d = dkv_c.select(0, 0);
      grad_b_kv.add_(dkv_2d.sum(0));
      at::Tensor dkv_mm = dkv_2d;
      if (!is_float) dkv_mm = dkv_low.narrow(0, 0, n).copy_(dkv_2d);
      const at::Tensor x_c = x.select(0, b).narrow(0, j0, n);
      at::Tensor grad_x_c = grad_x.select(0, b).narrow(0, j0, n);
      at::mm_out(grad_x_c, dkv_mm, w_kv);
      if (single_step) {
        at::mm_out(grad_w_kv, dkv_mm.t(), x_c);
      } else if (is_float) {
        if (b == 0 && first_chunk) {
          at::mm_out(grad_w_kv, dkv_mm.t(), x_c);
        } else {
          grad_w_kv.addmm_(dkv_mm.t(), x_c);
        }
      } else {
        grad_w_kv_acc.add_(at::mm(dkv_mm.t(), x_c));
      }
    }
  }
  if (grad_w_kv_acc.defined()) grad_w_kv.copy_(grad_w_kv_acc);

  // Query side, w.r.t. the unscaled projection q_proj = xs W_q^T + b_q (q = q_proj * D^-0.5). The projections'
  // GEMMs run in the input dtype, as eager's do (bfloat16 GEMMs accumulate in float32 inside BLAS).
  dq.mul_(std::pow(static_cast<double>(g.D), -0.5));
  grad_b.narrow(0, 0, g.C).copy_(dq.sum({0, 1}));
  const at::Tensor dq_mm = (is_float ? dq : dq.to(dtype)).view({g.B * g.Lp, g.C});
  at::mm_out(grad_w_q, dq_mm.t(), gather_sampled(x, g));
  // Each sampled token is one row of dq, so its dx contribution is added through a strided view without overlap.
  grad_x.view({g.B, g.gh, g.gw, g.C}).slice(1, 0, g.gh, g.stride).slice(2, 0, g.gw, g.stride) +=
      at::mm(dq_mm, w.narrow(0, 0, g.C)).view({g.B, g.ph, g.pw, g.C});
  return {grad_x, grad_w, is_float ? grad_b : grad_b.to(dtype)};
}

}  // namespace segvit::cpu
