"""Triton backend of ``segvit.ops.atm_attention`` (math: that function's docstring) and the flash-attention core
that ``query_pool_attention`` reuses.

Design:

* Attention: flash-attention, one program per (query block, batch * head). Keys and values stream through in
  blocks with an online softmax (running max and sum in float32, base-2 exponentials with log2(e) folded into
  the scale); the (B, H, Nq, Nk) scores never exist. The kernel saves the base-2 log-sum-exp per (b, h, query)
  for the backward. Per (query block, head) rather than per query block over all heads: SegViT's decoder has
  Nq = 150 queries, so a per-query-block grid would launch B * 3 programs on a 108-SM A100, and holding H
  accumulators (H x BLOCK_M x D floats) per program costs 16x the registers. With per-head programs the K/V of
  one head is re-read once per query block (3 blocks at Nq = 150), from L2.
* Similarity map: sim = mean_h scale q_h k_h^T = (scale / H) q k^T over the full C = H * D channels, written by
  the forward kernel itself. A per-head program cannot sum over heads without float atomics (order-dependent, not
  deterministic), so the map is cut by key tiles instead: after its attention loop, program (i, b, h) computes the
  full-channel sim tiles t = h, h + H, h + 2H, ... of its query block (one D-slice dot per head, summed in a fixed
  order, float32), so the H programs of a (query block, batch) share the map's key tiles. q and k come back from L2
  (the sibling programs of the same batch read them at the same time), so HBM sees k once, not once more for a
  separate GEMM (at ViT-L 640 B8 that GEMM re-read 13 MB of k). Its gradient is fused into the attention backward:
  dSim / H is added to every head's score gradient inside the tiles, so the backward is one pass.
* Backward: two deterministic passes, as FlashAttention-2: a (key block, b * h) program accumulates dK and dV
  over all query blocks, a (query block, b * h) program accumulates dQ over all key blocks; both recompute
  P = exp2(s - lse) from the saved LSE. No float atomics, so results do not depend on scheduling.
* Dropout: counter-based Philox, regenerated in every pass instead of stored. Key j of global row
  r = (b * H + h) * Nq + i keeps iff lane j % 4 of ``tl.randint4x(seed, (r << 32) | j // 4)`` is >= p * 2**32 (an
  exact 32-bit compare: keep probability 1 - p to 2**-32). A (BLOCK_M, BLOCK_N / 4) block of Philox calls gives
  the 4 lanes, interleaved into the tile with ``tl.join`` / ``tl.reshape``: one Philox call (10 rounds) per 4 scores
  instead of one per score, and the products written as 64-bit multiplies (one IMAD.WIDE each). The mask depends on
  (seed, row, key) only, not on the tile shape, so the forward and both backward passes (different tiles) agree.
  The 1 / (1 - p) rescale is applied to the accumulated output (and dV), not per score. The seed is drawn from
  torch's CPU generator inside the op (``torch.manual_seed`` reproduces it) and saved for backward. It is a kernel
  argument Triton does not specialize on (``do_not_specialize``): a seed divisible by 16 would otherwise compile a
  second variant of each kernel in the middle of a training run.
* Masks: full key tiles run without any per-score mask, the ragged last key tile (if any) with one; padding
  query rows load zeros (finite, never stored), and the dK/dV pass needs no score mask at all (a padding key only
  feeds its own, unstored, dK/dV row). The forward computes the row max on the raw scores and the exponent
  qk_scale * s - m as one FMA (for a negative scale the launcher flips q).
* Autotune keys: next powers of 2 of Nq and Nk (``Nq_bucket``, ``Nk_bucket``, kernel arguments used only as keys),
  so whole-image and multi-scale evaluation do not re-benchmark at every image size.

Layouts: q (B, Nq, H, D), k and v (B, Nk, H, D), any strides with a unit D stride (the wrapper makes q, k, v
contiguous); D <= 128 padded to a power of 2 (>= 16 for ``tl.dot``) with masks. float32, float16, bfloat16
inputs, float32 accumulation; float32 dots use IEEE fp32 (not TF32) so float32 keeps float32 accuracy.
"""
from __future__ import annotations

import torch

from segvit.kernels import _common
from segvit.kernels._common import tl, triton

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


def _configs(rows):
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in rows]


# Autotune configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) for A100 (sm_80) and H100 (sm_90), by
# (dtype group, head-dim class). float32 dots run as exact fp32 FMA, which needs about twice the registers of a
# tensor-core dot: larger or pipelined float32 tiles spill (see the compile report). Every config of the 64 class
# compiles without spills on sm_80 and sm_90 at every launch of the published models (BLOCK_D 32 and 64, dropout on
# and off, with and without dSim; the compile report checks it). The spills found there were not all register
# pressure: ptxas (with Triton's --regAllocOptLevel=2) also parks a few long-lived scalars on the stack in some
# tile shapes, differently per architecture, so configs were chosen by compiling candidates, not by a rule.
FWD_CONFIGS = {
    ("16", 64): _configs([(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 2, 4),
                          (32, 32, 4, 3)]),
    ("16", 128): _configs([(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3)]),
    ("32", 64): _configs([(32, 32, 4, 1)]),
    ("32", 128): _configs([(16, 32, 8, 1), (16, 16, 4, 1)]),
}
DKDV_CONFIGS = {
    ("16", 64): _configs([(64, 32, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2),
                          (64, 64, 4, 2)]),
    ("16", 128): _configs([(32, 32, 4, 2), (32, 64, 8, 2)]),
    ("32", 64): _configs([(16, 64, 4, 1), (16, 32, 4, 1)]),
    ("32", 128): _configs([(16, 32, 4, 1), (32, 32, 8, 1)]),
}
DQ_CONFIGS = {
    ("16", 64): _configs([(64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 1), (16, 64, 2, 2), (16, 128, 4, 2)]),
    ("16", 128): _configs([(32, 64, 4, 2), (64, 32, 8, 2)]),
    ("32", 64): _configs([(32, 32, 4, 1), (64, 32, 8, 1)]),
    ("32", 128): _configs([(16, 32, 4, 1), (32, 32, 8, 1)]),
}
GROUP_DTYPES = {"16": ["fp16", "bf16"], "32": ["fp32"]}
# Under the interpreter: small blocks, so the tests' sizes (7, 13, 19 ...) have ragged tails and several blocks.
SINGLE = dict(BLOCK_M=16, BLOCK_N=16)


def _group(dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def _pruner(table, pointer="Q", head_dim=lambda kwargs: 64 if kwargs["BLOCK_D"] <= 64 else 128):
    """Keep the configs of the call's (dtype group, head-dim class) row of ``table``."""
    def prune(configs, named_args, **kwargs):
        row = table[(_group(named_args[pointer].dtype), head_dim(kwargs))]
        wanted = {tuple(sorted(c.items())) for c in row}
        return [c for c in configs
                if tuple(sorted(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages).items())) in wanted]
    return prune


def _all(table) -> list[dict]:
    seen, out = set(), []
    for row in table.values():
        for c in row:
            key = tuple(sorted(c.items()))
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


if triton is not None:
    @triton.jit
    def _philox(seed, c0, c1):
        """Philox-4x32-10 of the counter (c0, c1, 0, 0) with the key (seed, 0): bit for bit
        ``tl.randint4x(seed, (c1 << 32) | c0)``, with each round's two 32 x 32 -> 64-bit products written as 64-bit
        multiplies of zero-extended operands (one IMAD.WIDE.U32 each instead of separate high and low multiplies)."""
        seed64 = seed.to(tl.uint64)
        k0 = (seed64 & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c0 = c0.to(tl.uint32, bitcast=True)
        c1 = c1.to(tl.uint32, bitcast=True)
        c2 = c0 * 0
        c3 = c0 * 0
        for _ in tl.static_range(10):
            pa = c0.to(tl.uint64) * 0xD2511F53
            pb = c2.to(tl.uint64) * 0xCD9E8D57
            c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
            c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
            c1 = pb.to(tl.uint32)
            c3 = pa.to(tl.uint32)
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        return c0, c1, c2, c3

    @triton.jit
    def _keep(seed, rows, start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keep mask of the (BLOCK_M, BLOCK_N) score tile of global rows ``rows`` (= b H Nq + h Nq + i) and keys
        ``start + [0, BLOCK_N)`` (start a multiple of 4): key j of row r keeps iff lane j % 4 of the Philox block of
        counter (j // 4, r) is >= threshold = p 2**32 (exact 32-bit compare). One Philox call gives 4 keys, and
        the mask does not depend on the tile shape, so every pass regenerates the same one."""
        quads = start // 4 + tl.arange(0, BLOCK_N // 4)
        c0 = tl.broadcast_to(quads[None, :], [BLOCK_M, BLOCK_N // 4])
        c1 = tl.broadcast_to(rows[:, None], [BLOCK_M, BLOCK_N // 4])
        r0, r1, r2, r3 = _philox(seed, c0, c1)
        # join(join(a, c), join(b, d)) flattens row-major to a, b, c, d: key 4 q + l gets lane l.
        keep = tl.join(tl.join(r0 >= threshold, r2 >= threshold), tl.join(r1 >= threshold, r3 >= threshold))
        return tl.reshape(keep, [BLOCK_M, BLOCK_N])

    @triton.jit
    def _threshold(dropout_p):
        # Keep iff a uniform uint32 >= p 2**32: keep probability 1 - p exactly (p * 2**32 is exact in float32 and an
        # integer for p >= 2**-9), and the rescale 1 / (1 - p) uses the same float32 p.
        return (tl.to_tensor(dropout_p).to(tl.float32) * 4294967296.0).to(tl.uint32)

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start, offs_n, offs_d, d_ok, Nk, skn, svn, qk_scale, seed,
                  rows, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                  DROPOUT: tl.constexpr):
        n = start + offs_n
        if MASK_N:
            n_ok = n < Nk
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        # qk_scale >= 0 (the launcher flips q otherwise): max(qk_scale s) = qk_scale max(s), and the exponent
        # qk_scale s - m is one FMA per score.
        if MASK_N:
            m_new = tl.maximum(m_i, tl.max(tl.where(n_ok[None, :], s * qk_scale, float("-inf")), 1))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # Every tile has >= 1 valid key (start < Nk), so m_new is finite and no row becomes NaN.
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        if MASK_N:
            p = tl.where(n_ok[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the 1 / (1 - p) rescale is applied once, to the output
            p = tl.where(_keep(seed, rows, start, threshold, BLOCK_M, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return acc, m_new, l_i

    @triton.jit(do_not_specialize=["seed"])
    def _attn_fwd(Q, K, V, O, LSE, SIM, seed, qk_scale, sim_scale, dropout_p, Nq, Nk, H, D,
                  sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh, Nq_bucket, Nk_bucket,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
                  WITH_SIM: tl.constexpr):
        # Nq_bucket, Nk_bucket: autotune keys only (next powers of 2 of Nq, Nk). SIM (B, Nq, Nk) contiguous, written
        # iff WITH_SIM (sim_scale = scale / H).
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        d_ok = offs_d < D
        # Padding query rows load q = 0: finite scores, never stored, so the tiles need no row mask.
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        rows = bh * Nq + offs_m
        threshold = _threshold(dropout_p)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Full key tiles without masks, then the ragged tail (if any) with the key mask.
        n_full = (Nk // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start, offs_n, offs_d, d_ok, Nk, skn, svn,
                                      qk_scale, seed, rows, threshold, BLOCK_M, BLOCK_N, False, DROPOUT)
        for tail in range(n_full, Nk, BLOCK_N):  # 0 or 1 trips (a loop: as an `if`, ptxas spills the fp32 FMA path)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, tail, offs_n, offs_d, d_ok, Nk, skn, svn,
                                      qk_scale, seed, rows, threshold, BLOCK_M, BLOCK_N, True, DROPOUT)
        inv_keep = 1.0
        if DROPOUT:
            inv_keep = 1.0 / (1.0 - dropout_p)
        acc = acc * (inv_keep / l_i)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh * Nq + offs_m, m_i + tl.log2(l_i), mask=m_ok)
        if WITH_SIM:  # this program's share of the head-mean similarity map: key tiles h, h + H, ...
            q_rows = Q + b * sqb + offs_m[:, None] * sqm + offs_d[None, :]
            k_rows = K + b * skb + offs_d[None, :]
            q_mask = m_ok[:, None] & d_ok[None, :]
            for tile in range(h, tl.cdiv(Nk, BLOCK_N), H):
                n = tile * BLOCK_N + offs_n
                n_ok = n < Nk
                sim = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for head in range(0, H):
                    q_h = tl.load(q_rows + head * sqh, mask=q_mask, other=0.0)
                    k_h = tl.load(k_rows + head * skh + n[:, None] * skn, mask=n_ok[:, None] & d_ok[None, :],
                                  other=0.0)
                    sim = tl.dot(q_h, tl.trans(k_h), sim, input_precision="ieee")
                tl.store(SIM + b * Nq * Nk + offs_m[:, None] * Nk + n[None, :], (sim * sim_scale).to(
                         SIM.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["seed"])
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DSIM, DK, DV, seed, qk_scale, scale, inv_h, dropout_p,
                       Nq, Nk, H, D, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdob, sdom, sdoh,
                       sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, Nq_bucket, Nk_bucket,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DROPOUT: tl.constexpr, HAS_DSIM: tl.constexpr):
        # No score masks: a padding query row has q = dO = 0 (and lse = delta = 0), so its P is finite and its
        # dV, dK terms are 0; a padding key column only feeds its own dK, dV rows, which are not stored.
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < Nk
        d_ok = offs_d < D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        threshold = _threshold(dropout_p)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, Nq, BLOCK_M):
            offs_m = start + offs_m0
            m_ok = offs_m < Nq
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            if DROPOUT:  # 1 / (1 - p) is applied to dV at the end and to dP below
                keep = _keep(seed, bh * Nq + offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
                dv += tl.dot(tl.trans(tl.where(keep, p, 0.0).to(do.dtype)), do, input_precision="ieee")
                ds = p * (tl.where(keep, dp, 0.0) * (1.0 / (1.0 - dropout_p)) - delta[:, None])
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                ds = p * (dp - delta[:, None])
            if HAS_DSIM:  # + dSim / H: the similarity map is the head mean of the scores
                ds += inv_h * tl.load(DSIM + b * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :],
                                      mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
        if DROPOUT:
            dv = dv * (1.0 / (1.0 - dropout_p))
        tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, k_base, v_base, dsim_base, start, offs_m, m_ok, offs_n, offs_d, d_ok, Nk,
                 skn, svn, qk_scale, inv_h, dropout_p, seed, rows, threshold, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DROPOUT: tl.constexpr, HAS_DSIM: tl.constexpr):
        n = start + offs_n
        n_ok = n < Nk
        if MASK_N:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if DROPOUT:
            keep = _keep(seed, rows, start, threshold, BLOCK_M, BLOCK_N)
            ds = p * (tl.where(keep, dp, 0.0) * (1.0 / (1.0 - dropout_p)) - delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        if HAS_DSIM:
            ds += inv_h * tl.load(dsim_base + offs_m[:, None] * Nk + n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                                  other=0.0).to(tl.float32)
        if MASK_N:  # a padding key's P = exp2(-lse) may overflow; its k row is 0 but inf * 0 is NaN
            ds = tl.where(n_ok[None, :], ds, 0.0)
        return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee")

    @triton.jit(do_not_specialize=["seed"])
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DSIM, DQ, seed, qk_scale, scale, inv_h, dropout_p,
                     Nq, Nk, H, D, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sdob, sdom, sdoh,
                     sdqb, sdqm, sdqh, Nq_bucket, Nk_bucket,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DROPOUT: tl.constexpr, HAS_DSIM: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        d_ok = offs_d < D
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        dsim_base = DSIM + b * Nq * Nk
        rows = bh * Nq + offs_m
        threshold = _threshold(dropout_p)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = (Nk // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, dsim_base, start, offs_m, m_ok, offs_n, offs_d,
                          d_ok, Nk, skn, svn, qk_scale, inv_h, dropout_p, seed, rows, threshold, BLOCK_M, BLOCK_N,
                          False, DROPOUT, HAS_DSIM)
        for tail in range(n_full, Nk, BLOCK_N):  # 0 or 1 trips, as in the forward
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, dsim_base, tail, offs_m, m_ok, offs_n, offs_d,
                          d_ok, Nk, skn, svn, qk_scale, inv_h, dropout_p, seed, rows, threshold, BLOCK_M, BLOCK_N,
                          True, DROPOUT, HAS_DSIM)
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)

    # Autotune keys: the sizes' next powers of 2 (Nq_bucket, Nk_bucket), so that new image sizes within a bucket
    # (whole-image and multi-scale evaluation) reuse the tuned config instead of re-benchmarking.
    _KEY = ["Nq_bucket", "Nk_bucket", "BLOCK_D", "DROPOUT"]
    _fwd = _common.autotune(_all(FWD_CONFIGS), SINGLE, _KEY, _pruner(FWD_CONFIGS))(_attn_fwd)
    _bwd_dkdv = _common.autotune(_all(DKDV_CONFIGS), SINGLE, _KEY + ["HAS_DSIM"],
                                 _pruner(DKDV_CONFIGS))(_attn_bwd_dkdv)
    _bwd_dq = _common.autotune(_all(DQ_CONFIGS), SINGLE, _KEY + ["HAS_DSIM"], _pruner(DQ_CONFIGS))(_attn_bwd_dq)


def _bucket(n: int) -> int:
    """Autotune key of a size: its next power of 2 (at least 16)."""
    return _common.next_pow2(n)


def _s(t: torch.Tensor):
    """(batch, sequence, head) strides of a (B, N, H, D) tensor with a unit D stride."""
    assert t.stride(3) == 1, "the kernels index D with a unit stride"
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, out, scale: float, dropout_p: float, seed: int,
                      sim: torch.Tensor | None = None) -> torch.Tensor:
    """Flash forward: writes ``out`` (B, Nq, H, D) and, if given, the head-mean similarity map ``sim`` (B, Nq, Nk)
    contiguous, and returns the base-2 LSE (B * H, Nq) in float32. q, k, v, out may be strided views (unit stride
    along D)."""
    batch, nq, heads, dim = q.shape
    nk = k.shape[1]
    lse = _common.empty(batch * heads, nq, dtype=torch.float32, device=q.device)
    if scale < 0:  # the kernel needs qk_scale >= 0 (row max of the raw scores): softmax(s q k^T) = softmax(-s (-q) k^T)
        q, scale = -q, -scale
    kernel = _fwd
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    # Without a map, SIM gets a placeholder pointer (never read or written).
    kernel[grid](q, k, v, out, lse, out if sim is None else sim, seed, scale * LOG2E, scale / heads, dropout_p, nq,
                 nk, heads, dim, *_s(q), *_s(k), *_s(v), *_s(out), _bucket(nq), _bucket(nk),
                 BLOCK_D=_common.next_pow2(dim), DROPOUT=dropout_p > 0, WITH_SIM=sim is not None,
                 **kernel.single_config)
    return lse


def attention_backward(q, k, v, out, dout, lse, dsim, dq, dk, dv, scale: float, dropout_p: float,
                       seed: int) -> None:
    """Flash backward into the preallocated (possibly strided) dq, dk, dv. ``dsim`` (B, Nq, Nk) contiguous or None:
    the gradient of the head-mean similarity map, added to every head's score gradient as dSim / H."""
    batch, nq, heads, dim = q.shape
    nk = k.shape[1]
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (also with dropout: O already holds the dropped, rescaled P).
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).reshape(batch * heads, nq).contiguous()
    dout = dout if dout.stride(3) == 1 else dout.contiguous()
    has_dsim = dsim is not None
    dsim_arg = dsim.contiguous() if has_dsim else delta  # placeholder pointer, never read
    common = dict(BLOCK_D=_common.next_pow2(dim), DROPOUT=dropout_p > 0, HAS_DSIM=has_dsim)
    args = (seed, scale * LOG2E, scale, 1.0 / heads, dropout_p, nq, nk, heads, dim, *_s(q), *_s(k), *_s(v),
            *_s(dout))
    grid = lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    buckets = (_bucket(nq), _bucket(nk))
    _bwd_dkdv[grid](q, k, v, dout, lse, delta, dsim_arg, dk, dv, *args, *_s(dk), *_s(dv), *buckets, **common,
                    **_bwd_dkdv.single_config)
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _bwd_dq[grid](q, k, v, dout, lse, delta, dsim_arg, dq, *args, *_s(dq), *buckets, **common,
                  **_bwd_dq.single_config)


# ---- torch.library wiring ----

@torch.library.custom_op("segvit::triton_atm_attention", mutates_args=())
@_common.on_inputs_device
def _atm_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, sim, lse, seed); lse and seed are saved for the backward."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # p = 0 leaves torch's generator untouched, as eager does.
    seed = int(torch.randint(0, 2 ** 31 - 1, ())) if dropout_p > 0 else 0
    out = _common.empty(*q.shape, dtype=q.dtype, device=q.device)
    sim = _common.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
    lse = attention_forward(q, k, v, out, scale, dropout_p, seed, sim)
    return out, sim, lse, torch.tensor(seed, dtype=torch.int64)


@_atm_op.register_fake
def _(q, k, v, scale, dropout_p):
    batch, nq, heads, dim = q.shape
    return (q.new_empty(q.shape), q.new_empty(batch, nq, k.shape[1]),
            q.new_empty(batch * heads, nq, dtype=torch.float32), torch.empty((), dtype=torch.int64))


@torch.library.custom_op("segvit::triton_atm_attention_backward", mutates_args=())
@_common.on_inputs_device
def _atm_backward_op(dout: torch.Tensor, dsim: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, scale: float,
                     dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = (_common.empty(*t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    attention_backward(q, k, v, out, dout, lse, dsim, dq, dk, dv, scale, dropout_p, int(seed))
    return dq, dk, dv


@_atm_backward_op.register_fake
def _(dout, dsim, q, k, v, out, lse, seed, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, dropout_p = inputs
    out, _, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    # Outputs that do not reach the loss (lse and seed always, sim or out sometimes) get None, not zero-filled
    # tensors: no fill kernels, and no dSim pass when the similarity map is unused.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dsim, _dlse, _dseed):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _atm_backward_op(dout, dsim, q, k, v, out, lse, seed, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None


_atm_op.register_autograd(_backward, setup_context=_setup_context)


def atm_attention(q, k, v, *, scale, dropout_p):
    """The ``triton`` backend of ``segvit.ops.atm_attention`` (inputs validated there)."""
    out, sim, _, _ = _atm_op(q, k, v, scale, dropout_p)
    return out, sim


def reasons(q, k, v, *, scale, dropout_p) -> list[str]:
    """Why the triton backend cannot take these inputs (empty list: it can)."""
    found = _common.device_reasons(q)
    if q.shape[3] > MAX_HEAD_DIM:
        found.append(f"head dim D = {q.shape[3]} > {MAX_HEAD_DIM}")
    found += _common.index_reasons(q=q.numel(), k=k.numel(), sim=q.shape[0] * q.shape[1] * k.shape[1])
    return found


def _specs():
    """Every kernel x autotune configuration, for ``segvit.kernels.compile_report`` (ahead-of-time compilation).
    Pointer types written ``*{dtype}`` in a signature are filled with each entry of ``dtypes``."""
    if triton is None:
        return []
    strides = {n: "i32" for n in ("sqb", "sqm", "sqh", "skb", "skn", "skh", "svb", "svn", "svh")}
    specs = []
    fwd_sig = dict(Q="*{dtype}", K="*{dtype}", V="*{dtype}", O="*{dtype}", LSE="*fp32", SIM="*{dtype}", seed="i32",
                   qk_scale="fp32", sim_scale="fp32", dropout_p="fp32", Nq="i32", Nk="i32", H="i32", D="i32", **strides, sob="i32", som="i32",
                   soh="i32", Nq_bucket="i32", Nk_bucket="i32", BLOCK_M="constexpr", BLOCK_N="constexpr",
                   BLOCK_D="constexpr", DROPOUT="constexpr", WITH_SIM="constexpr")
    bwd_common = dict(Q="*{dtype}", K="*{dtype}", V="*{dtype}", DO="*{dtype}", LSE="*fp32", DELTA="*fp32",
                      DSIM="*{dtype}")
    bwd_tail = dict(seed="i32", qk_scale="fp32", scale="fp32", inv_h="fp32", dropout_p="fp32", Nq="i32", Nk="i32",
                    H="i32", D="i32", **strides, sdob="i32", sdom="i32", sdoh="i32")
    consts = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "DROPOUT", "HAS_DSIM"]
    dkdv_sig = dict(**bwd_common, DK="*{dtype}", DV="*{dtype}", **bwd_tail, sdkb="i32", sdkn="i32", sdkh="i32",
                    sdvb="i32", sdvn="i32", sdvh="i32", Nq_bucket="i32", Nk_bucket="i32",
                    **{c: "constexpr" for c in consts})
    dq_sig = dict(**bwd_common, DQ="*{dtype}", **bwd_tail, sdqb="i32", sdqm="i32", sdqh="i32", Nq_bucket="i32",
                  Nk_bucket="i32", **{c: "constexpr" for c in consts})
    # Each (dtype group, head-dim class) compiles at the class's largest BLOCK_D (64: ViT-L's 32 and the Shrunk
    # backbone's 64; 128: the largest head dim the op accepts) with dropout and the dSim term on, the superset of
    # the code the other specializations compile.
    for name, fn, sig, table in [("atm_attention.fwd", _attn_fwd, fwd_sig, FWD_CONFIGS),
                                 ("atm_attention.bwd_dkdv", _attn_bwd_dkdv, dkdv_sig, DKDV_CONFIGS),
                                 ("atm_attention.bwd_dq", _attn_bwd_dq, dq_sig, DQ_CONFIGS)]:
        for (group, block_d), configs in table.items():
            constexprs = dict(BLOCK_D=block_d, DROPOUT=True)
            if fn is _attn_fwd:
                constexprs["WITH_SIM"] = True
            else:
                constexprs["HAS_DSIM"] = True
            specs.append(dict(name=f"{name}[D<={block_d}]", fn=fn, signature=sig, constexprs=constexprs,
                              configs=configs, dtypes=GROUP_DTYPES[group], tensor_cores=group == "16"))
    return specs


COMPILE_SPECS = _specs()


# Loop trip counts per program, in SASS order, for the static cost model (benchmarks/estimate.py): the forward and
# the dQ pass loop over the full key tiles, then over the ragged tail tile (a second loop of 0 or 1 trips), the
# dK/dV pass over query tiles. The forward's similarity map: the H programs of a query block share its key tiles
# (on average cdiv(Nk, BLOCK_N) / H each), and each tile loops over the H heads.
def _sim_trips(a) -> list[float]:
    tiles = -(-a["Nk"] // a["BLOCK_N"])
    return [tiles / a["H"], tiles] if a["WITH_SIM"] else []


LOOP_TRIPS = {
    "_attn_fwd": lambda a: [a["Nk"] // a["BLOCK_N"], int(a["Nk"] % a["BLOCK_N"] != 0)] + _sim_trips(a),
    "_attn_bwd_dkdv": lambda a: [-(-a["Nq"] // a["BLOCK_M"])],
    "_attn_bwd_dq": lambda a: [a["Nk"] // a["BLOCK_N"], int(a["Nk"] % a["BLOCK_N"] != 0)],
}
