// CPU attention kernels of segvit (atm_attention, query_pool_attention), declared for csrc/bindings.cpp, and the
// flash-style attention core they share (csrc/cpu/atm_attention.cpp), declared for csrc/cpu/query_pool_attention.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace segvit::cpu {

// segvit::atm_attention_fwd: q (B, Nq, H, D), k and v (B, Nk, H, D) ->
//   out (B, Nq, H, D) = dropout(softmax(scale q_h k_h^T)) v_h per head (dropout mask from seed, see Problem), sim (B, Nq, Nk) = mean_h scale q_h k_h^T,
//   lse (B, H, Nq) float32, the log-sum-exp of each softmax row (what the backward needs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> atm_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, double scale,
                                                                     double dropout_p, int64_t seed);

// segvit::atm_attention_bwd: (grad_q, grad_k, grad_v) from the output gradients and the forward's saved tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> atm_attention_backward(const at::Tensor& grad_out,
                                                                      const at::Tensor& grad_sim, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse,
                                                                      double scale, double dropout_p, int64_t seed);

// segvit::query_pool_attention_fwd: x (B, L, C) on a (gh, gw) grid, in_proj_weight (3C, C), in_proj_bias (3C) ->
//   out (B, L', C), and for the backward: q (B, L', C) (projected sampled tokens, already scaled by D^-0.5),
//   kv (B, L, 2C) (key and value projections of all tokens), lse (B, H, L') float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> query_pool_attention_forward(
    const at::Tensor& x, at::IntArrayRef grid, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    int64_t num_heads, int64_t stride);

// segvit::query_pool_attention_bwd: (grad_x, grad_in_proj_weight, grad_in_proj_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> query_pool_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef grid, const at::Tensor& in_proj_weight,
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    int64_t stride);

namespace attention {

// Fills t with NaN when the environment variable SEGVIT_POISON_OUTPUTS is set (tests): an element a kernel fails
// to write then shows up instead of passing as the zeros of a fresh allocation.
void poison_for_tests(at::Tensor& t);

// A (B, N, H, D) operand addressed as ptr + b * batch + n * row + h * head + d (element strides; d is unit-stride).
struct HeadsView {
  void* ptr = nullptr;
  int64_t batch = 0, row = 0, head = 0;
};

struct Problem {
  at::ScalarType dtype;  // of q, k, v, out, dout, dsim, sim (float32 or bfloat16); every float* below is float32
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0;
  float scale = 1.0f;  // softmax logits are scale * q_h . k_h
  HeadsView q, k, v, out;
  float* lse = nullptr;  // (B, H, Nq) contiguous: written by forward, read by backward
  // Optional similarity map (B, Nq, Nk) contiguous, dtype: sim = sim_scale * sum_h q_h . k_h.
  void* sim = nullptr;
  float sim_scale = 0.0f;
  // Attention dropout (0 = none): probabilities dropped with dropout_p, survivors scaled by 1 / (1 - dropout_p);
  // the keep mask is a hash of (seed, b, h, query, key), so the backward regenerates it (no stored mask) and it does
  // not depend on tiling or thread count. lse and sim stay those of the un-dropped softmax.
  float dropout_p = 0.0f;
  uint64_t seed = 0;
  // Backward only: dout (same layout rules as out), optional dsim (B, Nq, Nk) contiguous dtype, and the float32
  // gradients dq, dk, dv (fully written, not accumulated into).
  HeadsView dout;
  const void* dsim = nullptr;
  HeadsView dq, dk, dv;
};

// Fills out, lse and (when set) sim. Never materializes (B, H, Nq, Nk): per-thread tiles only.
void forward(const Problem& p);
// Fills dq, dk, dv (float32). Deterministic: the result does not depend on the thread count.
void backward(const Problem& p);

}  // namespace attention
}  // namespace segvit::cpu
