// CPU kernel of segvit::query_pool_attention (CONTRACT.md, op 2): the Shrunk query-downsampling attention.
//
// Forward: the query projection runs only on the sampled tokens, one GEMM per sampled grid row straight on x (the
// sampled tokens of a grid row are `stride` tokens apart, a valid BLAS leading dimension, so no sampled copy of x is
// made); q is then scaled by D^-0.5 in its own dtype, as nn.MultiheadAttention does before the product. Keys and
// values of all tokens come from one GEMM (B L x 2C). The attention itself is the flash-style core of
// csrc/cpu/atm_attention.cpp (per-thread tiles, online softmax; no (B, H, L', L) scores).
//
// Backward: the core's backward gives dq (w.r.t. the scaled q) and dk, dv; the projections' gradients are GEMMs
// (the query side on a gathered (B L' x C) copy of the sampled tokens, the size of the output). Each sampled token
// is one row of dq, so its dx contribution is added through a strided view without overlap.
#include <ATen/ATen.h>

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

// The sampled tokens of grid row r * stride of batch b, as a (pw, C) view of x (B, L, C) contiguous.
at::Tensor sampled_rows(const at::Tensor& x, const Geometry& g, int64_t b, int64_t r) {
  return x.as_strided({g.pw, g.C}, {g.stride * g.C, 1}, x.storage_offset() + (b * g.L + r * g.stride * g.gw) * g.C);
}

attention::HeadsView view(const at::Tensor& t, int64_t channel_offset, int64_t head_dim) {  // t (B, N, width)
  return {static_cast<char*>(t.data_ptr()) + channel_offset * t.element_size(), t.stride(0), t.stride(1), head_dim};
}

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
  const at::Tensor w_q = w.narrow(0, 0, g.C), b_q = bias.narrow(0, 0, g.C);

  at::Tensor q = at::empty({g.B, g.Lp, g.C}, x.options());
  at::Tensor kv = at::linear(x, w.narrow(0, g.C, 2 * g.C), bias.narrow(0, g.C, 2 * g.C));  // (B, L, 2C)
  at::Tensor out = at::empty({g.B, g.Lp, g.C}, x.options());
  at::Tensor lse = at::empty({g.B, g.H, g.Lp}, x.options().dtype(at::kFloat));
  for (at::Tensor* t : {&q, &out, &lse}) attention::poison_for_tests(*t);
  if (g.B == 0) return {out, q, kv, lse};
  const at::Tensor w_q_t = w_q.t();
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t r = 0; r < g.ph; ++r) {
      at::Tensor q_rows = q[b].narrow(0, r * g.pw, g.pw);
      at::addmm_out(q_rows, b_q, sampled_rows(x, g, b, r), w_q_t);
    }
  }
  q.mul_(std::pow(static_cast<double>(g.D), -0.5));

  attention::Problem p;
  p.dtype = x.scalar_type();
  p.B = g.B, p.H = g.H, p.Nq = g.Lp, p.Nk = g.L, p.D = g.D;
  p.scale = 1.0f;
  p.q = view(q, 0, g.D), p.k = view(kv, 0, g.D), p.v = view(kv, g.C, g.D), p.out = view(out, 0, g.D);
  p.lse = lse.data_ptr<float>();
  attention::forward(p);
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

  const auto f32 = x_in.options().dtype(at::kFloat);
  const at::Tensor dout = grad_out.contiguous(), q = q_in.contiguous(), kv = kv_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty({g.B, g.Lp, g.C}, f32);
  at::Tensor dkv = at::empty({g.B, g.L, 2 * g.C}, f32);
  for (at::Tensor* t : {&dq, &dkv}) attention::poison_for_tests(*t);
  if (g.B > 0) {
    attention::Problem p;
    p.dtype = dtype;
    p.B = g.B, p.H = g.H, p.Nq = g.Lp, p.Nk = g.L, p.D = g.D;
    p.scale = 1.0f;
    p.q = view(q, 0, g.D), p.k = view(kv, 0, g.D), p.v = view(kv, g.C, g.D), p.out = view(out, 0, g.D);
    p.dout = view(dout, 0, g.D);
    p.lse = const_cast<float*>(lse.data_ptr<float>());
    p.dq = view(dq, 0, g.D), p.dk = view(dkv, 0, g.D), p.dv = view(dkv, g.C, g.D);
    attention::backward(p);
  }
  // Gradient w.r.t. the unscaled projection q_proj = xs W_q^T + b_q (q = q_proj * D^-0.5).
  dq.mul_(std::pow(static_cast<double>(g.D), -0.5));
  at::Tensor grad_b = at::cat({dq.sum({0, 1}), dkv.sum({0, 1})});

  // The projections' GEMMs run in the input dtype, as eager's do (bfloat16 GEMMs accumulate in float32 inside
  // BLAS and are about twice as fast as float32 ones here). For the query side, the sampled tokens are gathered
  // once (B L' x C, the size of the output) so dW_q is one GEMM rather than a sum of per-row GEMMs, which in
  // bfloat16 would round after every row.
  const at::Tensor x = x_in.contiguous(), w = in_proj_weight.contiguous();
  const at::Tensor dq_t = dq.to(dtype).view({g.B * g.Lp, g.C}), dkv_t = dkv.to(dtype).view({g.B * g.L, 2 * g.C});
  const at::Tensor xs = x.view({g.B, g.gh, g.gw, g.C})
                            .slice(1, 0, g.gh, g.stride)
                            .slice(2, 0, g.gw, g.stride)
                            .reshape({g.B * g.Lp, g.C});
  at::Tensor grad_w = at::empty({3 * g.C, g.C}, x.options());
  at::Tensor grad_w_q = grad_w.narrow(0, 0, g.C), grad_w_kv = grad_w.narrow(0, g.C, 2 * g.C);
  at::mm_out(grad_w_q, dq_t.t(), xs);
  at::mm_out(grad_w_kv, dkv_t.t(), x.view({g.B * g.L, g.C}));
  at::Tensor grad_x = at::mm(dkv_t, w.narrow(0, g.C, 2 * g.C)).view({g.B, g.gh, g.gw, g.C});
  grad_x.slice(1, 0, g.gh, g.stride).slice(2, 0, g.gw, g.stride) +=
      at::mm(dq_t, w.narrow(0, 0, g.C)).view({g.B, g.ph, g.pw, g.C});
  return {grad_x.view({g.B, g.L, g.C}), grad_w, grad_b.to(dtype)};
}

}  // namespace segvit::cpu
