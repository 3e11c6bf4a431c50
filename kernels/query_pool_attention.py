"""Triton backend of ``segvit.ops.query_pool_attention`` (math: that function's docstring).

Design:

* Query projection: ``_gather_proj``, a GEMM whose A rows are gathered from the token grid by index: program
  (row block, column block, batch) computes the grid token of each sampled query (row pi * stride, column
  pj * stride of the (gh, gw) map) and reads those rows of x directly, so the sampled copy of x never exists and
  only L' = ceil(gh / s) * ceil(gw / s) rows are projected (a quarter of the tokens at stride 2).
* Key/value projection of all L tokens: one ``addmm`` (cuBLAS; a library GEMM is the right tool for a dense
  (B L, C) x (C, 2C) product) into a (B, L, 2C) buffer whose two halves the attention reads through strides.
* Attention: the flash-attention core of ``segvit.kernels.atm_attention`` (online softmax, no (B, H, L', L)
  scores, base-2 LSE saved), writing the heads-merged (B, L', C) output in place.
* Backward: the flash backward (two deterministic passes) gives dq (B, L', C) and dk, dv straight into a
  (B, L, 2C) buffer; the projection gradients are GEMMs: dW_kv = dKV^T x, dW_q = dQ^T x_sampled (the one
  (B, L', C) gather, backward only), dx = dKV W_kv with dQ W_q added into the sampled rows through a strided view
  (no dense scatter buffer).
"""
from __future__ import annotations

import torch

from segvit.kernels import _common
from segvit.kernels import atm_attention as _attn
from segvit.kernels._common import tl, triton

# Autotune configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for A100 / H100 by dtype group; the
# float32 (exact FMA) dot needs smaller tiles. Every listed config compiles without spills (compile report).
PROJ_CONFIGS = {
    ("16", 0): [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in [
        (64, 64, 32, 4, 3), (128, 128, 32, 8, 3)]],
    ("32", 0): [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in [
        (32, 32, 32, 4, 2), (64, 64, 32, 8, 2), (64, 64, 16, 4, 2)]],
}
PROJ_SINGLE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)

if triton is not None:
    @triton.jit
    def _gather_proj(X, W, BIAS, OUT, Lp, C, gw, gwp, stride, sxb, sxl,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT[b, i, n] = sum_c X[b, token(i), c] W[n, c] + BIAS[n] for the sampled queries i < Lp, n < C."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2)
        offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        i_ok = offs_i < Lp
        n_ok = offs_n < C
        # Sampled query i sits at pooled-grid (i // gwp, i % gwp), i.e. token row * stride, column * stride.
        token = (offs_i // gwp) * stride * gw + (offs_i % gwp) * stride
        x_rows = X + b.to(tl.int64) * sxb + token.to(tl.int64)[:, None] * sxl
        w_rows = W + offs_n.to(tl.int64)[:, None] * C
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start in range(0, C, BLOCK_K):
            kk = start + offs_k
            k_ok = kk < C
            xt = tl.load(x_rows + kk[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = OUT + b.to(tl.int64) * Lp * C + offs_i.to(tl.int64)[:, None] * C + offs_n[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=i_ok[:, None] & n_ok[None, :])

    _proj = _common.autotune(_attn._all(PROJ_CONFIGS), PROJ_SINGLE, ["Lp", "C"],
                             _attn._pruner(PROJ_CONFIGS, "X", lambda kwargs: 0))(_gather_proj)


def _pooled(grid, stride):
    return -(-grid[0] // stride), -(-grid[1] // stride)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))  # (B, N, H, D) view


@torch.library.custom_op("segvit::triton_query_pool_attention", mutates_args=())
@_common.on_inputs_device
def _qp_op(x: torch.Tensor, grid: list[int], in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
           num_heads: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, L', C), q (B, L', C), kv (B, L, 2C), lse); q, kv and lse are saved for the backward."""
    x, w, bias = x.contiguous(), in_proj_weight.contiguous(), in_proj_bias.contiguous()
    batch, length, channels = x.shape
    ghp, gwp = _pooled(grid, stride)
    lp = ghp * gwp
    q = _common.empty(batch, lp, channels, dtype=x.dtype, device=x.device)
    def meta_grid(meta):
        return triton.cdiv(lp, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_N"]), batch

    _proj[meta_grid](x, w, bias, q, lp, channels, grid[1], gwp, stride, x.stride(0), x.stride(1),
                     **_proj.single_config)
    kv = torch.addmm(bias[channels:], x.view(batch * length, channels), w[channels:].t()).view(batch, length,
                                                                                               2 * channels)
    out = _common.empty(batch, lp, channels, dtype=x.dtype, device=x.device)
    head_dim = channels // num_heads
    lse = _attn.attention_forward(_heads(q, num_heads), _heads(kv[..., :channels], num_heads),
                                  _heads(kv[..., channels:], num_heads), _heads(out, num_heads),
                                  head_dim ** -0.5, 0.0, 0)
    return out, q, kv, lse


@_qp_op.register_fake
def _(x, grid, in_proj_weight, in_proj_bias, num_heads, stride):
    batch, length, channels = x.shape
    ghp, gwp = _pooled(grid, stride)
    return (x.new_empty(batch, ghp * gwp, channels), x.new_empty(batch, ghp * gwp, channels),
            x.new_empty(batch, length, 2 * channels),
            x.new_empty(batch * num_heads, ghp * gwp, dtype=torch.float32))


@torch.library.custom_op("segvit::triton_query_pool_attention_backward", mutates_args=())
@_common.on_inputs_device
def _qp_backward_op(dout: torch.Tensor, x: torch.Tensor, in_proj_weight: torch.Tensor, q: torch.Tensor,
                    kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grid: list[int], num_heads: int,
                    stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w = x.contiguous(), in_proj_weight.contiguous()
    batch, length, channels = x.shape
    ghp, gwp = _pooled(grid, stride)
    dq = _common.empty(batch, ghp * gwp, channels, dtype=x.dtype, device=x.device)
    dkv = _common.empty(batch, length, 2 * channels, dtype=x.dtype, device=x.device)
    h = num_heads
    _attn.attention_backward(_heads(q, h), _heads(kv[..., :channels], h), _heads(kv[..., channels:], h),
                             _heads(out, h), _heads(dout, h), lse, None, _heads(dq, h),
                             _heads(dkv[..., :channels], h), _heads(dkv[..., channels:], h),
                             (channels // h) ** -0.5, 0.0, 0)
    sampled = x.view(batch, grid[0], grid[1], channels)[:, ::stride, ::stride]  # strided view, no copy
    dq2, dkv2 = dq.view(-1, channels), dkv.view(-1, 2 * channels)
    dw = torch.cat([dq2.t() @ sampled.reshape(-1, channels), dkv2.t() @ x.view(-1, channels)])
    dbias = torch.cat([dq2.sum(0, dtype=torch.float32), dkv2.sum(0, dtype=torch.float32)]).to(x.dtype)
    dx = (dkv2 @ w[channels:]).view(batch, length, channels)
    dx.view(batch, grid[0], grid[1], channels)[:, ::stride, ::stride] += (dq2 @ w[:channels]).view(
        batch, ghp, gwp, channels)
    return dx, dw, dbias


@_qp_backward_op.register_fake
def _(dout, x, in_proj_weight, q, kv, out, lse, grid, num_heads, stride):
    return x.new_empty(x.shape), in_proj_weight.new_empty(in_proj_weight.shape), \
        in_proj_weight.new_empty(in_proj_weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, grid, w, _, num_heads, stride = inputs
    out, q, kv, lse = output
    ctx.save_for_backward(x, w, q, kv, out, lse)
    ctx.grid, ctx.num_heads, ctx.stride = grid, num_heads, stride


def _backward(ctx, dout, _dq, _dkv, _dlse):
    x, w, q, kv, out, lse = ctx.saved_tensors
    dx, dw, dbias = _qp_backward_op(dout, x, w, q, kv, out, lse, ctx.grid, ctx.num_heads, ctx.stride)
    return dx, None, dw, dbias, None, None


_qp_op.register_autograd(_backward, setup_context=_setup_context)


def query_pool_attention(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2):
    """The ``triton`` backend of ``segvit.ops.query_pool_attention`` (inputs validated there)."""
    return _qp_op(x, list(grid), in_proj_weight, in_proj_bias, num_heads, stride)[0]


def reasons(x, grid, in_proj_weight, in_proj_bias, num_heads, *, stride=2) -> list[str]:
    """Why the triton backend cannot take these inputs (empty list: it can)."""
    found = _common.device_reasons(x)
    head_dim = x.shape[2] // num_heads
    if head_dim > _attn.MAX_HEAD_DIM:
        found.append(f"head dim C / num_heads = {head_dim} > {_attn.MAX_HEAD_DIM}")
    found += _common.index_reasons(kv=2 * x.numel(), in_proj_weight=in_proj_weight.numel())
    return found


def _specs():
    """The projection kernel's configurations for ``segvit.kernels.compile_report`` (its attention kernels are in
    ``atm_attention.COMPILE_SPECS``); pointer types ``*{dtype}`` are filled with each entry of ``dtypes``."""
    if triton is None:
        return []
    sig = dict(X="*{dtype}", W="*{dtype}", BIAS="*{dtype}", OUT="*{dtype}", Lp="i32", C="i32", gw="i32",
               gwp="i32", stride="i32", sxb="i32", sxl="i32", BLOCK_M="constexpr", BLOCK_N="constexpr",
               BLOCK_K="constexpr")
    return [dict(name="query_pool_attention.gather_proj", fn=_gather_proj, signature=sig, constexprs={},
                 configs=configs, dtypes=_attn.GROUP_DTYPES[group], tensor_cores=group == "16")
            for (group, _), configs in PROJ_CONFIGS.items()]


COMPILE_SPECS = _specs()


# Loop trip counts per program for the static cost model (benchmarks/estimate.py): the projection loops over C.
LOOP_TRIPS = {"_gather_proj": lambda a: [-(-a["C"] // a["BLOCK_K"])]}
