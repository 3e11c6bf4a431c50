"""Triton backend of atm_attention and query_pool_attention against the float64 references.

Without a GPU the kernels run on the CPU under TRITON_INTERPRET=1 (tests/conftest.py); with one, the same tests run
on CUDA (`pytest -m gpu`). Tolerance (the flash-attention rule): the kernel's max abs error against the float64
reference is at most 2x the error of the eager backend computing the same thing in the same dtype, plus a floor
for outputs where both errors are at rounding level (FLOOR). bfloat16 runs only on CUDA: the triton 3.8
interpreter computes bfloat16 dots wrongly (triton issues 11584, 11604).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import segvit
from helpers import CUDA, TRITON_DTYPES, assert_within_eager, float64_leaves, run_with_grads
from helpers import poison_triton_outputs  # noqa: F401  (a fixture: pytest finds it in this module's namespace)
from segvit.kernels import _common

atm_mod = importlib.import_module("segvit.ops.atm_attention")
qp_mod = importlib.import_module("segvit.ops.query_pool_attention")
atm_kernels = importlib.import_module("segvit.kernels.atm_attention")
qp_kernels = importlib.import_module("segvit.kernels.query_pool_attention")

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not _common.INTERPRET, reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]
# The floor of the eager rule (helpers.assert_within_eager), for outputs where both errors are at rounding level.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Every launcher allocates the buffers its kernels write filled with NaN.
pytestmark = pytest.mark.usefixtures("poison_triton_outputs")


@pytest.fixture(autouse=True)
def triton_backend():
    with segvit.ops.use_backend("triton"):
        yield


def leaf(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_()


# ---------------------------------------------------------------------------------------------- atm_attention

ATM_SHAPES = [(2, 7, 13, 3, 8),   # odd everything, Nq != Nk
              (1, 1, 5, 2, 16),   # a single query
              (2, 6, 1, 2, 8),    # a single key
              (1, 19, 23, 2, 24),  # D not a power of 2; Nq, Nk > the interpreter's 16-blocks, ragged tails
              (1, 5, 17, 1, 128)]  # the largest head dim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("b,nq,nk,h,d", ATM_SHAPES)
def test_atm_attention_matches_reference(device, dtype, b, nq, nk, h, d):
    q, k, v = (leaf(b, n, h, d, dtype=dtype, device=device) for n in (nq, nk, nk))
    refs = float64_leaves(q, k, v)
    g_out, g_sim = torch.randn(b, nq, h, d, dtype=torch.float64), torch.randn(b, nq, nk, dtype=torch.float64)
    grads = (g_out.to(device, dtype), g_sim.to(device, dtype))
    ours = run_with_grads(lambda *a: segvit.ops.atm_attention(*a), (q, k, v), grads)
    with segvit.ops.use_backend("eager"):
        eager = run_with_grads(lambda *a: segvit.ops.atm_attention(*a), (q, k, v), grads)
    ref = run_with_grads(atm_mod.reference, refs, (g_out, g_sim))
    assert ours[0].shape == (b, nq, h, d) and ours[1].shape == (b, nq, nk) and ours[0].dtype == dtype
    for name, a, e, r in zip(("out", "sim", "dq", "dk", "dv"), ours, eager, ref):
        assert_within_eager(name, a, e, r, FLOOR[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", [0, 1])
def test_atm_attention_strided_inputs_and_one_used_output(device, used):
    # q, k, v as transposed views of (B, H, N, D) tensors; only `out` (dSim is None) or only `sim` (dOut is None)
    # reaches the loss. dv is zero when only sim is used.
    q, k, v = (torch.randn(2, 3, n, 8, device=device).transpose(1, 2).requires_grad_() for n in (5, 21, 21))
    ours = segvit.ops.atm_attention(q, k, v, scale=0.3)[used]
    ours.square().sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = atm_mod.reference(*refs, scale=0.3)[used]
    ref.square().sum().backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip((q, k, v), refs):
        expected = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad  # v does not reach sim
        torch.testing.assert_close(mine.grad.double(), expected, rtol=1e-4, atol=1e-4)


def _dropout_inputs(device, b=2, nq=37, h=3, n=16):
    # v_h = identity (Nk = D): out[b, i, h, j] = P_ij * keep_ij / (1 - p), so the keep mask is out != 0.
    q, k = torch.randn(b, nq, h, n, device=device), torch.randn(b, n, h, n, device=device)
    v = torch.eye(n, device=device)[None, :, None, :].expand(b, n, h, n).contiguous()
    return q, k, v


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_dropout_zero_is_exact_and_draws_no_random_numbers(device):
    q, k, v = _dropout_inputs(device)
    state = torch.get_rng_state()
    out0, sim0 = segvit.ops.atm_attention(q, k, v, dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)
    out1, sim1 = segvit.ops.atm_attention(q, k, v)
    assert torch.equal(out0, out1) and torch.equal(sim0, sim1)


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_dropout_keep_rate_and_scaling(device):
    p = 0.3
    q, k, v = _dropout_inputs(device)
    probs, sim_ref = atm_mod.reference(q, k, v)  # with v = identity, out = P
    kept = 0
    for seed in range(3):
        torch.manual_seed(seed)
        out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=p)
        keep = out != 0
        kept += keep.sum().item()
        torch.testing.assert_close(out.double(), torch.where(keep, probs / (1 - p), 0.0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sim.double(), sim_ref, rtol=1e-5, atol=1e-5)  # sim is pre-dropout
    n = 3 * out.numel()
    # Binomial(n, 1 - p): 5 standard deviations (n = 10656: +-0.022 around 0.7).
    assert abs(kept / n - (1 - p)) < 5 * ((1 - p) * p / n) ** 0.5
    torch.manual_seed(0)
    first = segvit.ops.atm_attention(q, k, v, dropout_p=p)[0]
    torch.manual_seed(0)
    assert torch.equal(first, segvit.ops.atm_attention(q, k, v, dropout_p=p)[0])  # the seed comes from torch


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_dropout_backward_uses_the_forward_mask(device):
    p, seed = 0.25, 123
    q0, k0, v0 = _dropout_inputs(device)
    torch.manual_seed(seed)
    keep = segvit.ops.atm_attention(q0, k0, v0, dropout_p=p)[0] != 0  # (B, Nq, H, Nk): the mask of this seed
    # Fresh inputs of the same shapes, same seed: the mask is a function of (seed, b, h, i, j) only.
    q, k, v = (leaf(*t.shape, dtype=torch.float32, device=device) for t in (q0, k0, v0))
    g_out, g_sim = torch.randn(q.shape, device=device), torch.randn(q.shape[:2] + k.shape[1:2], device=device)
    torch.manual_seed(seed)
    ours = run_with_grads(lambda *a: segvit.ops.atm_attention(*a, dropout_p=p), (q, k, v), (g_out, g_sim))

    def masked_reference(q, k, v):
        logits = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
        attn = logits.softmax(-1) * keep.permute(0, 2, 1, 3) / (1 - p)
        return torch.einsum("bhij,bjhd->bihd", attn, v), logits.mean(1)

    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = run_with_grads(masked_reference, refs, (g_out.double(), g_sim.double()))
    for name, a, r in zip(("out", "sim", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_dropout_gradient_by_finite_differences(device):
    p, seed, eps = 0.2, 7, 1e-2
    q, k, v = (leaf(1, n, 2, 8, dtype=torch.float32, device=device) for n in (5, 11, 11))
    g_out, g_sim = torch.randn(1, 5, 2, 8, device=device), torch.randn(1, 5, 11, device=device)

    def loss(q, k, v):
        torch.manual_seed(seed)
        out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=p)
        return (out * g_out).sum() + (sim * g_sim).sum()

    loss(q, k, v).backward()
    with torch.no_grad():
        for t in (q, k, v):
            direction = torch.randn_like(t)
            t += eps * direction
            up = loss(q, k, v).double()
            t -= 2 * eps * direction
            down = loss(q, k, v).double()
            t += eps * direction
            numeric = (up - down) / (2 * eps)
            analytic = (t.grad.double() * direction.double()).sum()
            assert abs(numeric - analytic) <= 1e-2 * (1 + abs(analytic)), (numeric.item(), analytic.item())


def _keep_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def philox_pair(ref, ours, seed, M: tl.constexpr, C: tl.constexpr):
        rows = tl.arange(0, M) * 7 + 3
        quads = tl.arange(0, C) + 5
        a = tl.randint4x(seed, (rows.to(tl.int64)[:, None] << 32) | quads.to(tl.int64)[None, :])
        b = atm_kernels._philox(seed, tl.broadcast_to(quads[None, :], [M, C]), tl.broadcast_to(rows[:, None], [M, C]))
        i = tl.arange(0, M)[:, None] * C + tl.arange(0, C)[None, :]
        for lane in tl.static_range(4):
            tl.store(ref + lane * M * C + i, a[lane].to(tl.int32, bitcast=True))
            tl.store(ours + lane * M * C + i, b[lane].to(tl.int32, bitcast=True))

    @triton.jit
    def keep_map(out, seed, dropout_p, row0, R, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # the mask of rows row0 + [0, R), keys [0, N) as a pass with (BLOCK_M, BLOCK_N) tiles generates it
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        start = tl.program_id(1) * BLOCK_N
        keep = atm_kernels._keep(seed, row0 + offs_m, start, atm_kernels._threshold(dropout_p), BLOCK_M, BLOCK_N)
        n = start + tl.arange(0, BLOCK_N)
        tl.store(out + offs_m[:, None] * N + n[None, :], keep.to(tl.int8),
                 mask=(offs_m < R)[:, None] & (n < N)[None, :])

    return philox_pair, keep_map


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_philox_is_randint4x(device):
    # _philox (the 64-bit-product form) is bit for bit tl.randint4x of the counter (c1 << 32) | c0.
    philox_pair, _ = _keep_kernels()
    ref, ours = (torch.zeros(4 * 16 * 8, dtype=torch.int32, device=device) for _ in range(2))
    philox_pair[(1,)](ref, ours, 123457, 16, 8)
    assert torch.equal(ref, ours) and ref.unique().numel() > 500


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_keep_mask_is_tile_independent_and_exact(device):
    # Every pass (forward 64 x 64, dK/dV 64 x 32, dQ 32 x 64, ...) must regenerate the same mask: the mask of a row
    # and key may not depend on the tile that computes it. Key j of row r keeps iff lane j % 4 of
    # randint4x(seed, (r << 32) | j // 4) >= p * 2**32, so the keep rate is 1 - p (here checked at the published
    # p = 0.1 on 2**18 draws: 5 standard deviations = 0.003).
    import triton

    philox_pair, keep_map = _keep_kernels()
    p, seed, row0, rows, keys = 0.1, 2024, 150 * 5 + 3, 256, 1024
    masks = []
    for bm, bn in [(16, 16), (64, 64), (32, 64), (64, 32), (16, 128)]:
        out = torch.full((rows, keys), -1, dtype=torch.int8, device=device)
        keep_map[(triton.cdiv(rows, bm), triton.cdiv(keys, bn))](out, seed, p, row0, rows, keys, bm, bn)
        masks.append(out.cpu())
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    keep = masks[0].double()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    # the lane layout: rows 0..15 x quads 0..7 of the mask against randint4x itself
    ref = torch.zeros(4 * 16 * 8, dtype=torch.int32, device=device)
    philox_pair[(1,)](ref, torch.zeros_like(ref), seed, 16, 8)  # rows 7 i + 3, quads 5 + c
    threshold = int(torch.tensor(p, dtype=torch.float32).item() * 2 ** 32)
    lanes = (ref.cpu().view(4, 16, 8).to(torch.int64) & 0xFFFFFFFF) >= threshold  # (lane, i, c)
    out = torch.full((16 * 7, 64), -1, dtype=torch.int8, device=device)
    keep_map[(7, 1)](out, seed, p, 3, 16 * 7, 64, 16, 64)
    got = out.cpu()[0::7].view(16, 16, 4)[:, 5:13]  # rows 3 + 7 i, keys 4 (5 + c) + lane
    assert torch.equal(got.bool(), lanes.permute(1, 2, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_negative_scale(device):
    # The forward kernel needs qk_scale >= 0 (max(qk_scale s) = qk_scale max(s)); the launcher flips q otherwise.
    q, k, v = (leaf(1, n, 2, 8, dtype=torch.float32, device=device) for n in (5, 21, 21))
    refs = float64_leaves(q, k, v)
    grads = (torch.randn(1, 5, 2, 8, dtype=torch.float64), torch.randn(1, 5, 21, dtype=torch.float64))
    ours = run_with_grads(lambda *a: segvit.ops.atm_attention(*a, scale=-0.4), (q, k, v),
                          [t.to(device, torch.float32) for t in grads])
    ref = run_with_grads(lambda *a: atm_mod.reference(*a, scale=-0.4), refs, grads)
    for name, a, r in zip(("out", "sim", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_atm_attention_autotune_keys_are_size_buckets():
    # Autotune keys are the next powers of 2 of Nq and Nk, so whole-image and multi-scale evaluation (a new Nk at
    # each image size) reuse a tuned config within a bucket instead of re-benchmarking.
    assert [atm_kernels._bucket(n) for n in (1, 16, 17, 150, 1600, 2048, 2049)] == [16, 16, 32, 256, 2048, 2048,
                                                                                     4096]
    for fn in (atm_kernels._attn_fwd, atm_kernels._attn_bwd_dkdv, atm_kernels._attn_bwd_dq):
        names = getattr(fn, "arg_names", None) or list(getattr(fn, "signature", fn).parameters)
        assert {"Nq_bucket", "Nk_bucket"} <= set(names)


@pytest.mark.parametrize("device", DEVICES)
def test_atm_attention_opcheck(device):
    q, k, v = (leaf(2, n, 3, 8, dtype=torch.float32, device=device) for n in (5, 9, 9))
    torch.library.opcheck(torch.ops.segvit.triton_atm_attention.default, (q, k, v, 0.35, 0.0))
    with torch.no_grad():  # the backward op has no autograd formula of its own (no double backward)
        out, sim, lse, seed = torch.ops.segvit.triton_atm_attention(q, k, v, 0.35, 0.0)
    args = (torch.randn_like(out), torch.randn_like(sim), q.detach(), k.detach(), v.detach(), out, lse, seed,
            0.35, 0.0)
    torch.library.opcheck(torch.ops.segvit.triton_atm_attention_backward.default, args)


def test_atm_attention_reasons():
    ok = torch.randn(1, 2, 1, 8)
    found = atm_kernels.reasons(ok, ok, ok, scale=1.0, dropout_p=0.0)
    assert (found == []) if _common.INTERPRET else ("not CUDA" in found[0])
    wide = torch.randn(1, 2, 1, 129, dtype=torch.float64)
    found = " ".join(atm_kernels.reasons(wide, wide, wide, scale=1.0, dropout_p=0.0))
    assert "dtype torch.float64 not supported" in found and "head dim D = 129 > 128" in found


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_dispatches_cuda_tensors_to_triton(monkeypatch):
    kernel = segvit.ops._dispatch.op("atm_attention").kernels["triton"]
    calls = []
    monkeypatch.setattr(kernel, "fn", lambda *a, **kw: calls.append(1) or atm_kernels.atm_attention(*a, **kw))
    q = torch.randn(1, 3, 2, 8, device="cuda")
    with segvit.ops.use_backend("auto"):
        segvit.ops.atm_attention(q, q, q)
    assert calls == [1]


# --------------------------------------------------------------------------------------- query_pool_attention

QP_CASES = [(2, (5, 7), 12, 3, 2),   # D = 4, odd grid, h != w
            (1, (1, 1), 8, 2, 2),    # a single token
            (1, (6, 4), 16, 4, 3),   # stride 3, ragged pooled grid
            (1, (9, 7), 40, 2, 3)]   # L = 63 > 3 blocks, C = 40 and D = 20 not powers of 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("b,grid,c,heads,stride", QP_CASES)
def test_query_pool_attention_matches_reference(device, dtype, b, grid, c, heads, stride):
    x = leaf(b, grid[0] * grid[1], c, dtype=dtype, device=device)
    w, bias = leaf(3 * c, c, dtype=dtype, device=device, scale=c ** -0.5), leaf(3 * c, dtype=dtype, device=device)
    pooled = qp_mod.pooled_grid(grid, stride)
    g = torch.randn(b, pooled[0] * pooled[1], c, dtype=torch.float64)

    def fn(x, w, bias):
        return segvit.ops.query_pool_attention(x, grid, w, bias, heads, stride=stride)

    ours = run_with_grads(fn, (x, w, bias), (g.to(device, dtype),))
    with segvit.ops.use_backend("eager"):
        eager = run_with_grads(fn, (x, w, bias), (g.to(device, dtype),))
    refs = float64_leaves(x, w, bias)
    ref = run_with_grads(lambda *a: qp_mod.reference(a[0], grid, a[1], a[2], heads, stride=stride), refs, (g,))
    assert ours[0].shape == (b, pooled[0] * pooled[1], c) and ours[0].dtype == dtype
    for name, a, e, r in zip(("out", "dx", "dw", "dbias"), ours, eager, ref):
        assert_within_eager(name, a, e, r, FLOOR[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_query_pool_attention_opcheck(device):
    x = leaf(2, 20, 8, dtype=torch.float32, device=device)
    w, bias = leaf(24, 8, dtype=torch.float32, device=device), leaf(24, dtype=torch.float32, device=device)
    torch.library.opcheck(torch.ops.segvit.triton_query_pool_attention.default, (x, [5, 4], w, bias, 2, 2))
    with torch.no_grad():
        out, q, kv, lse = torch.ops.segvit.triton_query_pool_attention(x, [5, 4], w, bias, 2, 2)
    args = (torch.randn_like(out), x.detach(), w.detach(), q, kv, out, lse, [5, 4], 2, 2)
    torch.library.opcheck(torch.ops.segvit.triton_query_pool_attention_backward.default, args)


def test_compile_specs_cover_every_kernel_config_and_dtype():
    specs = atm_kernels.COMPILE_SPECS + qp_kernels.COMPILE_SPECS
    assert {s["fn"] for s in specs} == {atm_kernels._attn_fwd, atm_kernels._attn_bwd_dkdv, atm_kernels._attn_bwd_dq,
                                        qp_kernels._gather_proj}
    for fn, table in [(atm_kernels._attn_fwd, atm_kernels.FWD_CONFIGS),
                      (atm_kernels._attn_bwd_dkdv, atm_kernels.DKDV_CONFIGS),
                      (atm_kernels._attn_bwd_dq, atm_kernels.DQ_CONFIGS), (qp_kernels._gather_proj,
                                                                          qp_kernels.PROJ_CONFIGS)]:
        mine = [s for s in specs if s["fn"] is fn]
        # every row of the autotune table is compiled, for every dtype the kernel takes
        assert sorted(map(str, (s["configs"] for s in mine))) == sorted(map(str, table.values()))
        assert sorted(d for s in mine for d in s["dtypes"]) == sorted(["fp32", "fp16", "bf16"] * (len(mine) // 2))
        for spec in mine:
            args = set(spec["signature"])
            assert all(set(c) - {"num_warps", "num_stages"} <= args for c in spec["configs"])
            assert set(spec["constexprs"]) <= args


@pytest.mark.parametrize("table", ["FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS", "PROJ_CONFIGS"])
def test_autotune_pruning_keeps_the_row_of_the_dtype_and_head_dim(table):
    # The pruner runs only under triton.autotune (GPU); check it on triton.Config objects directly.
    import triton

    proj = table == "PROJ_CONFIGS"
    rows = getattr(qp_kernels if proj else atm_kernels, table)
    configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in atm_kernels._all(rows)]
    prune = atm_kernels._pruner(rows, "X", lambda kw: 0) if proj else atm_kernels._pruner(rows)
    for dtype, group in [(torch.float16, "16"), (torch.bfloat16, "16"), (torch.float32, "32")]:
        for block_d, cls in [(0, 0)] if proj else [(16, 64), (64, 64), (128, 128)]:
            kept = prune(configs, {"Q" if not proj else "X": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d)
            kept = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept]
            assert sorted(map(str, kept)) == sorted(map(str, rows[(group, cls)]))


def test_gpu_import_path_builds_the_autotuners():
    # Without the interpreter (the GPU path) every kernel is wrapped by triton.autotune over its whole table.
    code = ("import triton, segvit.kernels.atm_attention as a, segvit.kernels.query_pool_attention as q\n"
            "for k, t in [(a._fwd, a.FWD_CONFIGS), (a._bwd_dkdv, a.DKDV_CONFIGS), (a._bwd_dq, a.DQ_CONFIGS),"
            " (q._proj, q.PROJ_CONFIGS)]:\n"
            "    assert isinstance(k, triton.runtime.Autotuner) and len(k.configs) == len(a._all(t)), k\n"
            "    assert k.single_config == {}\n"
            "    assert k.keys[:2] == (['Nq_bucket', 'Nk_bucket'] if k is not q._proj else ['Lp', 'C']), k.keys\n"
            # triton's own Autotuner calls the pruner with the launch's positional tensors and constexpr kwargs
            "import torch\n"
            "a._bwd_dq.nargs = {'Q': torch.empty(0, dtype=torch.float32)}\n"
            "kept = a._bwd_dq.prune_configs({'BLOCK_D': 128, 'DROPOUT': True, 'HAS_DSIM': True})\n"
            "assert [(c.kwargs, c.num_warps) for c in kept] == [({'BLOCK_M': m, 'BLOCK_N': n}, w)"
            " for m, n, w, _ in [tuple(c.values()) for c in a.DQ_CONFIGS[('32', 128)]]], kept\n"
            "q._proj.nargs = {'X': torch.empty(0, dtype=torch.bfloat16)}\n"
            "assert len(q._proj.prune_configs({})) == len(q.PROJ_CONFIGS[('16', 0)])\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
