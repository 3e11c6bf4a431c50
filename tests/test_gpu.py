"""What runs on a GPU, tested on a GPU: every Triton kernel and every CUDA C++ kernel of segvit.ops.

Collected by ``pytest -m gpu`` (with the ``gpu``-marked cases of the other test files); skipped where there is no
CUDA device, which is how the normal CI sees it. ``python -m benchmarks.gpu_check`` runs it on a GPU machine.

Covered, each against the float64 reference of the op's module (``segvit.ops.<op>.reference``, computed on the same
device from the same inputs):

* backends: ``triton`` (atm_attention forward and its two backward kernels, query_pool_attention forward with the
  gather-projection kernel and backward, mask_classify, mask_losses forward and backward) and ``cuda`` (the
  extension's ``.cu`` kernels: mask_classify, mask_losses through mask_loss_stats and mask_loss_stats_backward);
* dtypes float32, float16, bfloat16, forward and backward; shapes that are no multiple of any block size (Nq != Nk,
  head dims 40 and 128, grids with h != w, pixel and class counts off the tiles) and one published ViT-L 640 shape
  per op (atm: Shrunk ViT-L 640 decoder B2 Nq150 Nk1600 H16 D32, and D64; query_pool: B1 40x40 C1024 H16 stride 2;
  mask_classify: B1 Q150 K150 40x40 -> 640x640; mask_losses: B2 K150 40x40, labels 640x640, 10 classes per image);
* attention dropout (p = 0.1): keep rate and per-head statistics, the 1 / (1 - p) scaling, ``sim`` before dropout,
  reproducibility from ``torch.manual_seed``, and the backward's use of the forward's mask (the gradients against a
  float64 reference that applies the mask the kernel's own forward implies);
* autocast (``torch.autocast(device, dtype=bfloat16 | float16)``) with float32 inputs and with mixed float32 /
  low-precision inputs: output dtypes per the ops' policy (atm_attention, query_pool_attention, mask_classify: the
  autocast dtype; mask_losses: float32 losses, int64 count, gradient in the logits' dtype);
* the ``cuda`` kernels against the ``triton`` ones on the same inputs (tight agreement, below);
* device placement: each Triton and CUDA C++ op on ``cuda:1`` while the current device is ``cuda:0`` (needs two
  GPUs; all in one subprocess, so a kernel launched on the wrong device cannot poison this process's CUDA context),
  inputs on two devices (a ValueError naming the argument), and a non-default stream (inputs produced on the stream
  behind a sleep kernel: a kernel launched on another stream would read the NaN they replace);
* ``torch.library.opcheck`` of the extension's CUDA ops.

Tolerance (flash-attention's rule, as the other kernel tests): max |kernel - reference| <= 2x max |eager -
reference| + floor, eager being the op module's ``eager`` function (the original's math) in the same dtype on the
same device, the floor a fraction (``FLOOR``) of max |reference|; under autocast 3x the error of ``eager`` called
directly under the same autocast on the same inputs, against the reference of the uncast inputs. Triton launchers
fill their outputs with NaN first (the ``poison_triton_outputs`` fixture), and so do the extension's CUDA C++ and
CPU kernels with ``SEGVIT_POISON_OUTPUTS=1`` (their outputs and the scratch buffers they fill). ``cuda`` against
``triton``: float32 within 1e-5 of max |reference|; float16 / bfloat16 within 2 units in the last place of the
dtype at max |reference| (both accumulate in float32 from the same rounded inputs).

Dry run on a CPU (to check the test code itself where there is no GPU): ``SEGVIT_GPU_TESTS_ON_CPU=1 python -m
pytest tests/test_gpu.py`` on a machine without CUDA runs every test with device ``cpu``: ``triton`` under the
interpreter (``TRITON_INTERPRET=1``, set by conftest.py) in float32 and float16 (the triton 3.8 interpreter computes
bfloat16 dots wrongly), the extension's ``cpp`` kernels in place of ``cuda`` in float32 and bfloat16 (autocast:
float16 for triton, bfloat16 for cpp), the two-device checks with cpu and ``meta``, no streams, and without the ViT-L
640 shapes (too slow for the interpreter). It is never on in CI: without the variable the module is skipped there.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import segvit
from helpers import poison_triton_outputs  # noqa: F401  (a fixture: pytest finds it in this module's namespace)
from segvit import _extension
from segvit.kernels import _common

DRY_RUN = os.environ.get("SEGVIT_GPU_TESTS_ON_CPU") == "1"
CUDA = not DRY_RUN  # the tests' device is CUDA (the module is skipped where there is none)
DEVICE = "cuda" if CUDA else "cpu"
CXX = "cuda" if CUDA else "cpp"  # the extension's backend on DEVICE
# The device an input is moved to for the mismatched-devices check.
OTHER_DEVICE = "cpu" if CUDA else "meta"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN), reason="needs CUDA"),
              pytest.mark.usefixtures("poison_triton_outputs", "_poison_extension_outputs", "_float32_matmul_is_float32")]
if DRY_RUN and not _common.INTERPRET:
    pytestmark.append(pytest.mark.skip(reason="SEGVIT_GPU_TESTS_ON_CPU=1 needs TRITON_INTERPRET=1 (a machine "
                                              "without CUDA: tests/conftest.py sets it)"))

atm_mod = importlib.import_module("segvit.ops.atm_attention")
qp_mod = importlib.import_module("segvit.ops.query_pool_attention")
mc_mod = importlib.import_module("segvit.ops.mask_classify")
ml_mod = importlib.import_module("segvit.ops.mask_losses")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = {"triton": [F32, F16] if DRY_RUN else [F32, F16, BF16],
          CXX: [F32, BF16] if DRY_RUN else [F32, F16, BF16]}
AUTOCAST_DTYPES = {"triton": [F16] if DRY_RUN else [BF16, F16], CXX: [BF16] if DRY_RUN else [BF16, F16]}
EAGER_FACTOR, AUTOCAST_FACTOR = 2.0, 3.0
# Floors of the tolerance rule, as fractions of max |reference|, per output kind and dtype.
FLOOR = {"attention": {F32: 2e-5, F16: 2e-3, BF16: 2e-2},
         "mask_classify": {F32: 1e-5, F16: 1e-3, BF16: 8e-3},
         "loss": {F32: 1e-5, F16: 1e-5, BF16: 1e-5},  # the losses accumulate in float32 whatever the logits
         "loss_grad": {F32: 1e-5, F16: 1e-3, BF16: 1e-3}}
VITL = pytest.mark.skipif(DRY_RUN, reason="ViT-L 640 shape: too slow for the Triton interpreter")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def backend_dtypes(*backends):
    """pytest params (backend, dtype) of every backend's dtypes here."""
    return [pytest.param(b, d, id=f"{b}-{_dtype_name(d)}") for b in backends for d in DTYPES[b]]


def backend_autocast(*backends):
    """pytest params (backend, autocast dtype, input kind)."""
    return [pytest.param(b, d, kind, id=f"{b}-autocast_{_dtype_name(d)}-{kind}")
            for b in backends for d in AUTOCAST_DTYPES[b] for kind in ("float32", "mixed")]


def _cxx_reason():
    status = segvit.ops.available_backends()[CXX]
    return "" if status == "available" else status


@pytest.fixture
def _poison_extension_outputs(monkeypatch):
    """The extension's kernels (CUDA and CPU) fill the buffers they write with NaN first (SEGVIT_POISON_OUTPUTS)."""
    monkeypatch.setenv("SEGVIT_POISON_OUTPUTS", "1")


@pytest.fixture
def _float32_matmul_is_float32():
    """Eager float32 matmuls in full float32 (no TF32), as the kernels' float32 dots: the rule compares with eager."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _require(backend):
    if backend == CXX:
        reason = _cxx_reason()
        if reason:
            pytest.skip(f"backend {CXX!r} unavailable: {reason} (test_cuda_extension_is_built fails for it)")


# ------------------------------------------------------------------------------------------------ test machinery

@dataclass
class Case:
    """One op call: ``op(*inputs, **static)`` (through segvit.ops), the same for ``eager`` and ``reference``; the
    cotangents (float64, one per output, None for an output left out of the backward) give the gradients of
    sum_i <outputs[i], cotangents[i]> with respect to the inputs that require grad."""
    kind: str  # the FLOOR row of the outputs ("attention", "mask_classify", "loss")
    names: tuple
    inputs: list
    cotangents: tuple
    op: Callable
    eager: Callable
    reference: Callable
    static: dict = field(default_factory=dict)

    def to(self, device):
        """The same case on another device (inputs copied, requires_grad kept)."""
        def move(t):
            return t.detach().to(device).requires_grad_(t.requires_grad) if t.is_floating_point() else t.to(device)

        return Case(self.kind, self.names, [move(t) for t in self.inputs], self.cotangents, self.op, self.eager,
                    self.reference, {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in self.static.items()})


def amp(dtype):
    return torch.autocast(DEVICE, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def run(case, fn, inputs=None, autocast=None):
    """(outputs, gradients) of ``fn`` on the case's inputs: the forward under ``autocast``, the backward outside."""
    inputs = case.inputs if inputs is None else inputs
    with amp(autocast):
        outputs = fn(*inputs, **case.static)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    used = [(o, torch.as_tensor(c, dtype=torch.float64).to(o.device, o.dtype))
            for o, c in zip(outputs, case.cotangents, strict=True) if c is not None]
    wrt = [t for t in inputs if t.requires_grad]
    grads = list(torch.autograd.grad([o for o, _ in used], wrt, [c for _, c in used])) if wrt else []
    return [o.detach() for o in outputs], grads


def run_op(case, backend, autocast=None, inputs=None):
    with segvit.ops.use_backend(backend):
        outs, grads = run(case, case.op, inputs, autocast)
    return outs + grads


def run_eager(case, autocast=None):
    outs, grads = run(case, case.eager, autocast=autocast)
    return outs + grads


def run_reference(case):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in case.inputs]
    outs, grads = run(case, case.reference, leaves)
    return outs + grads


def max_err(actual, expected):
    """max |actual - expected| in float64 (on expected's device); NaN if either holds one, so bounds fail."""
    return (actual.to(expected.device, torch.float64) - expected.double()).abs().max().item()


def scale_of(t):
    return max(t.detach().double().abs().max().item(), 1e-30)


def check_within_eager(case, ours, eager, ref, dtype, factor=EAGER_FACTOR, what=""):
    """The tolerance rule on every output and gradient (integer outputs: equal)."""
    for name, a, e, r in zip(case.names, ours, eager, ref, strict=True):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(r.shape)}"
        if not r.is_floating_point():
            assert torch.equal(a.cpu(), r.cpu()), f"{name}: {a.tolist()} != {r.tolist()}"
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite values (or NaN poison left) {what}"
        kind = ("loss" if name.startswith("loss") else "loss_grad") if case.kind == "loss" else case.kind
        err, eager_err = max_err(a, r), max_err(e, r)
        bound = factor * eager_err + FLOOR[kind][dtype] * scale_of(r)
        assert err <= bound, (f"{name}: error {err:.3g} > bound {bound:.3g} ({factor:g}x eager's {eager_err:.3g} + "
                              f"{FLOOR[kind][dtype]:g} x max|ref| {scale_of(r):.3g}) {what}")


def assert_agree(name, a, b, tol, scale):
    """max |a - b| <= tol * scale; NaN fails."""
    err = max_err(a, b)
    assert err <= tol * scale, f"{name}: max |difference| {err:.3g} > {tol:g} x {scale:.3g}"


def agreement_tol(dtype):
    """Tight agreement of two fused kernels: float32 1e-5, low precision 2 ulp of the dtype (relative)."""
    return 1e-5 if dtype == F32 else 2 * torch.finfo(dtype).eps


def leaf(shape, dtype, grad=True, scale=1.0):
    """Seeded (torch's global generator, reset per test) randn on the CPU, moved to DEVICE: the same values on any
    device."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(grad)


def _triple(dtypes):
    return tuple(dtypes) if isinstance(dtypes, (tuple, list)) else (dtypes,) * 3


# ----------------------------------------------------------------------------------------------------- the cases

def atm_case(shape, dtypes, grad=True):
    b, nq, nk, h, d = shape
    dq, dk, dv = _triple(dtypes)
    q, k, v = leaf((b, nq, h, d), dq, grad), leaf((b, nk, h, d), dk, grad), leaf((b, nk, h, d), dv, grad)
    scale = d ** -0.5
    return Case("attention", ("out", "sim", "dq", "dk", "dv"), [q, k, v],
                (torch.randn(b, nq, h, d, dtype=torch.float64), torch.randn(b, nq, nk, dtype=torch.float64)),
                op=lambda q, k, v: segvit.ops.atm_attention(q, k, v),
                eager=lambda q, k, v: atm_mod.eager(q, k, v, scale=scale, dropout_p=0.0),
                reference=lambda q, k, v: atm_mod.reference(q, k, v, scale=scale))


def qp_case(shape, dtypes, grad=True):
    b, grid, c, heads, stride = shape
    dx, dw, db = _triple(dtypes)
    x = leaf((b, grid[0] * grid[1], c), dx, grad)
    w, bias = leaf((3 * c, c), dw, grad, scale=c ** -0.5), leaf((3 * c,), db, grad, scale=0.1)
    pooled = qp_mod.pooled_grid(grid, stride)

    def call(fn):
        return lambda x, w, bias: fn(x, grid, w, bias, heads, stride=stride)

    return Case("attention", ("out", "dx", "dw", "dbias"), [x, w, bias],
                (torch.randn(b, pooled[0] * pooled[1], c, dtype=torch.float64),),
                op=call(segvit.ops.query_pool_attention), eager=call(qp_mod.eager), reference=call(qp_mod.reference))


def mc_case(shape, dtypes):
    b, q, k, h, w, hout, wout = shape
    dc, dm = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes, dtypes)
    class_logits, mask_logits = leaf((b, q, k + 1), dc, False, 3.0), leaf((b, q, h, w), dm, False, 3.0)
    size = (hout, wout)
    return Case("mask_classify", ("out",), [class_logits, mask_logits], (None,),
                op=lambda c, m: segvit.ops.mask_classify(c, m, size), eager=lambda c, m: mc_mod.eager(c, m, size),
                reference=lambda c, m: mc_mod.reference(c, m, size))


def block_labels(b, k, hl, wl, present):
    """Labels (B, Hl, Wl) int64: ``present`` classes per image in an 8 x 8 block pattern (as training crops look),
    the last class never present, 10 % of the pixels ignored (255)."""
    images = []
    for _ in range(b):
        chosen = torch.randperm(k - 1)[:present]
        pattern = chosen[torch.randperm(64) % len(chosen)].view(1, 1, 8, 8).float()
        images.append(F.interpolate(pattern, size=(hl, wl), mode="nearest")[0, 0].long())
    labels = torch.stack(images)
    labels[torch.rand(b, hl, wl) < 0.1] = 255
    return labels


def ml_case(shape, dtype, present=None):
    b, k, h, w, hl, wl = shape
    logits = leaf((b, k, h, w), dtype, True, 2.0)
    labels = block_labels(b, k, hl, wl, present or k - 1).to(DEVICE)
    return Case("loss", ("loss_focal", "loss_dice", "num_masks", "grad"), [logits],
                (torch.randn((), dtype=torch.float64), torch.randn((), dtype=torch.float64), None),
                op=lambda x, labels: segvit.ops.mask_losses(x, labels), eager=ml_mod.eager,
                reference=ml_mod.reference, static={"labels": labels})


# ----------------------------------------------------------------------------------------------- atm_attention

ATM_SHAPES = [pytest.param((2, 77, 130, 3, 40), id="B2_Nq77_Nk130_H3_D40"),  # off every block size, Nq != Nk
              pytest.param((1, 150, 7, 2, 128), id="B1_Nq150_Nk7_H2_D128"),  # few keys, the largest head dim
              pytest.param((2, 150, 1600, 16, 32), id="vitl640_B2_Nq150_Nk1600_H16_D32", marks=VITL),
              pytest.param((2, 150, 1600, 16, 64), id="vitl640_B2_Nq150_Nk1600_H16_D64", marks=VITL)]


@pytest.mark.parametrize("backend, dtype", backend_dtypes("triton"))
@pytest.mark.parametrize("shape", ATM_SHAPES)
def test_atm_attention_forward_backward(shape, backend, dtype):
    case = atm_case(shape, dtype)
    ours = run_op(case, backend)
    assert ours[0].dtype == ours[1].dtype == dtype and ours[0].device.type == DEVICE
    check_within_eager(case, ours, run_eager(case), run_reference(case), dtype)


def _identity_v_inputs(b, nq, h, n, grad=False, dtype=F32):
    """q, k random and v_h = identity (Nk = D = n): out[b, i, h, j] = P_ij keep_ij / (1 - p), so the kernel's keep
    mask is out != 0 (softmax probabilities are never 0 here)."""
    q, k = leaf((b, nq, h, n), dtype, grad), leaf((b, n, h, n), dtype, grad)
    v = torch.eye(n, dtype=torch.float64)[None, :, None, :].expand(b, n, h, n).to(DEVICE, dtype)
    return q, k, v.contiguous().requires_grad_(grad)


DROPOUT_P = 0.1
# (B, Nq, H, Nk = D) of the keep-rate statistics: 307200 draws per seed on a GPU.
RATE_SHAPE = (2, 37, 3, 16) if DRY_RUN else (2, 150, 16, 64)


def test_atm_attention_dropout_keep_rate_and_scaling():
    p = DROPOUT_P
    q, k, v = _identity_v_inputs(*RATE_SHAPE)
    probs, sim_ref = atm_mod.reference(q, k, v)  # with v = identity, out = P
    masks = []
    with segvit.ops.use_backend("triton"):
        for seed in range(3):
            torch.manual_seed(seed)
            out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=p)
            keep = out != 0
            masks.append(keep)
            torch.testing.assert_close(out.double(), torch.where(keep, probs / (1 - p), 0.0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sim.double(), sim_ref, rtol=1e-5, atol=1e-5)  # sim is pre-dropout
        torch.manual_seed(1)
        assert torch.equal(segvit.ops.atm_attention(q, k, v, dropout_p=p)[0] != 0, masks[1])  # seeded by torch
    keep = torch.stack(masks)  # (seed, B, Nq, H, Nk)
    n = keep.numel()
    rate = keep.double().mean().item()
    # Binomial(n, 1 - p): within 5 standard deviations overall, 6 per (seed, batch, head) slice
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate
    per_head = keep.double().mean(dim=(2, 4))  # (seed, B, H)
    n_head = keep.shape[2] * keep.shape[4]
    assert (per_head - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / n_head) ** 0.5, per_head
    # different masks for different seeds, images, heads and queries (an offset that ignores one of them fails)
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep[:, :, :, 0], keep[:, :, :, 1])
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1])


def _masked_reference(keep, p):
    """atm_attention with the given keep mask (B, Nq, H, Nk) applied to the probabilities, in the inputs' dtype."""
    def fn(q, k, v):
        logits = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
        attn = logits.softmax(-1) * keep.permute(0, 2, 1, 3).to(q.dtype) / (1 - p)
        return torch.einsum("bhij,bjhd->bihd", attn, v), logits.mean(1)
    return fn


@pytest.mark.parametrize("backend, dtype", backend_dtypes("triton"))
def test_atm_attention_dropout_backward_uses_the_forward_mask(backend, dtype):
    p, seed, shape = DROPOUT_P, 1234, (2, 77, 3, 40)  # Nk = D = 40: off the blocks
    q0, k0, v0 = _identity_v_inputs(*shape)
    with segvit.ops.use_backend(backend):
        torch.manual_seed(seed)
        keep = segvit.ops.atm_attention(q0, k0, v0, dropout_p=p)[0] != 0  # the mask of this seed and shape
    assert 0 < keep.double().mean().item() < 1
    # Fresh inputs of the same shapes in ``dtype``, the same seed: the mask depends on (seed, b, h, i, j) only.
    b, nq, h, n = shape
    case = atm_case((b, nq, n, h, n), dtype)
    case.op = lambda q, k, v: segvit.ops.atm_attention(q, k, v, dropout_p=p)
    case.eager = case.reference = _masked_reference(keep, p)
    torch.manual_seed(seed)
    ours = run_op(case, backend)
    check_within_eager(case, ours, run_eager(case), run_reference(case), dtype)


@pytest.mark.parametrize("backend, amp_dtype, kind", backend_autocast("triton"))
def test_atm_attention_autocast(backend, amp_dtype, kind):
    case = atm_case((2, 77, 130, 3, 40), F32 if kind == "float32" else (F32, amp_dtype, amp_dtype))
    ours = run_op(case, backend, autocast=amp_dtype)
    assert ours[0].dtype == ours[1].dtype == amp_dtype, "outputs in the autocast dtype"
    assert [g.dtype for g in ours[2:]] == [t.dtype for t in case.inputs], "gradients in the inputs' dtypes"
    check_within_eager(case, ours, run_eager(case, autocast=amp_dtype), run_reference(case), amp_dtype,
                       AUTOCAST_FACTOR, "(autocast)")


# ---------------------------------------------------------------------------------------- query_pool_attention

QP_SHAPES = [pytest.param((2, (13, 11), 96, 3, 2), id="B2_13x11_C96_H3_s2"),  # C, L' off the projection tiles
             pytest.param((1, (9, 7), 40, 2, 3), id="B1_9x7_C40_H2_s3"),  # D 20, stride 3
             pytest.param((1, (40, 40), 1024, 16, 2), id="vitl640_B1_40x40_C1024_H16_s2", marks=VITL)]


@pytest.mark.parametrize("backend, dtype", backend_dtypes("triton"))
@pytest.mark.parametrize("shape", QP_SHAPES)
def test_query_pool_attention_forward_backward(shape, backend, dtype):
    case = qp_case(shape, dtype)
    ours = run_op(case, backend)
    assert ours[0].dtype == dtype and ours[0].device.type == DEVICE
    check_within_eager(case, ours, run_eager(case), run_reference(case), dtype)


@pytest.mark.parametrize("backend, amp_dtype, kind", backend_autocast("triton"))
def test_query_pool_attention_autocast(backend, amp_dtype, kind):
    # mixed: tokens in the autocast dtype (a low-precision layer's output), float32 projection parameters
    case = qp_case((2, (13, 11), 96, 3, 2), F32 if kind == "float32" else (amp_dtype, F32, F32))
    ours = run_op(case, backend, autocast=amp_dtype)
    assert ours[0].dtype == amp_dtype, "output in the autocast dtype"
    assert [g.dtype for g in ours[1:]] == [t.dtype for t in case.inputs], "gradients in the inputs' dtypes"
    check_within_eager(case, ours, run_eager(case, autocast=amp_dtype), run_reference(case), amp_dtype,
                       AUTOCAST_FACTOR, "(autocast)")


# ----------------------------------------------------------------------------------------------- mask_classify

MC_SHAPES = [pytest.param((2, 37, 70, 9, 11, 83, 61), id="B2_Q37_K70_9x11to83x61"),  # off the Q, K, pixel tiles
             pytest.param((1, 3, 2, 1, 1, 5, 9), id="B1_Q3_K2_1x1to5x9"),
             pytest.param((1, 150, 150, 40, 40, 640, 640), id="vitl640_B1_Q150_K150_40x40to640x640", marks=VITL)]


def run_mc(case, backend, autocast=None):
    return run_op(case, backend, autocast)


@pytest.mark.parametrize("backend, dtype", backend_dtypes("triton", CXX))
@pytest.mark.parametrize("shape", MC_SHAPES)
def test_mask_classify(shape, backend, dtype):
    _require(backend)
    case = mc_case(shape, dtype)
    ours = run_mc(case, backend)
    assert ours[0].dtype == dtype and ours[0].device.type == DEVICE
    assert (ours[0] > 0).all(), "every score is positive (softmax times sigmoid): output not fully written"
    check_within_eager(case, ours, run_eager(case), run_reference(case), dtype)


@pytest.mark.parametrize("backend, amp_dtype, kind", backend_autocast("triton", CXX))
def test_mask_classify_autocast(backend, amp_dtype, kind):
    _require(backend)
    # mixed: float32 class logits (a linear layer kept in float32), mask logits in the autocast dtype
    case = mc_case((2, 37, 70, 9, 11, 83, 61), F32 if kind == "float32" else (F32, amp_dtype))
    ours = run_mc(case, backend, autocast=amp_dtype)
    assert ours[0].dtype == amp_dtype, "scores in the autocast dtype"
    check_within_eager(case, ours, run_eager(case, autocast=amp_dtype), run_reference(case), amp_dtype,
                       AUTOCAST_FACTOR, "(autocast)")


# ------------------------------------------------------------------------------------------------- mask_losses

ML_SHAPES = [pytest.param((2, 5, 5, 7, 33, 17), None, id="B2_K5_5x7to33x17"),
             pytest.param((1, 7, 21, 19, 150, 97), None, id="B1_K7_21x19to150x97"),  # several blocks, ragged tiles
             pytest.param((2, 6, 9, 9, 9, 9), None, id="B2_K6_9x9to9x9"),  # labels at the logits' size
             pytest.param((2, 150, 40, 40, 640, 640), 10, id="vitl640_B2_K150_40x40to640x640_10classes",
                          marks=VITL)]


def run_ml(case, backend, autocast=None):
    # (the CUDA C++ kernels allocate their stats and gradient with at::zeros: a missed element shows as a 0)
    return run_op(case, backend, autocast)


def _check_ml_dtypes(case, ours):
    focal, dice, num, grad = ours
    assert focal.dtype == dice.dtype == torch.float32 and focal.shape == dice.shape == ()
    assert num.dtype == torch.int64 and num.shape == ()
    assert grad.dtype == case.inputs[0].dtype and grad.shape == case.inputs[0].shape


@pytest.mark.parametrize("backend, dtype", backend_dtypes("triton", CXX))
@pytest.mark.parametrize("shape, present", ML_SHAPES)
def test_mask_losses_forward_backward(shape, present, backend, dtype):
    _require(backend)
    case = ml_case(shape, dtype, present)
    ours = run_ml(case, backend)
    _check_ml_dtypes(case, ours)
    ref = run_reference(case)
    if present:
        assert ref[2].item() == shape[0] * present
    check_within_eager(case, ours, run_eager(case), ref, dtype)
    # classes absent from an image get exactly zero gradient
    labels = case.static["labels"]
    absent = torch.ones(shape[:2], dtype=torch.bool)
    for b in range(shape[0]):
        absent[b, [c for c in labels[b].unique().tolist() if c != 255]] = False
    assert (ours[3].cpu()[absent] == 0).all()


@pytest.mark.parametrize("backend, amp_dtype, kind", backend_autocast("triton", CXX))
def test_mask_losses_autocast(backend, amp_dtype, kind):
    _require(backend)
    # The losses' policy (float32, like PyTorch's losses): the logits are used in their own dtype.
    case = ml_case((2, 5, 5, 7, 33, 17), F32 if kind == "float32" else amp_dtype)
    ours = run_ml(case, backend, autocast=amp_dtype)
    _check_ml_dtypes(case, ours)
    check_within_eager(case, ours, run_eager(case, autocast=amp_dtype), run_reference(case), amp_dtype,
                       AUTOCAST_FACTOR, "(autocast)")


# ---------------------------------------------------------------------------------- the .cu kernels vs Triton

def _common_dtypes():
    return [d for d in DTYPES[CXX] if d in DTYPES["triton"]]


@pytest.mark.parametrize("dtype", _common_dtypes(), ids=_dtype_name)
@pytest.mark.parametrize("shape", MC_SHAPES[:1] + MC_SHAPES[2:])
def test_mask_classify_cuda_agrees_with_triton(shape, dtype):
    _require(CXX)
    case = mc_case(shape, dtype)
    (ours,), (theirs,) = run_mc(case, CXX), run_mc(case, "triton")
    assert_agree("out", ours, theirs, agreement_tol(dtype), scale_of(run_reference(case)[0]))


@pytest.mark.parametrize("dtype", _common_dtypes(), ids=_dtype_name)
@pytest.mark.parametrize("shape, present", ML_SHAPES[:2] + ML_SHAPES[3:])
def test_mask_losses_cuda_agrees_with_triton(shape, present, dtype):
    _require(CXX)
    case = ml_case(shape, dtype, present)
    ours, theirs, ref = run_ml(case, CXX), run_ml(case, "triton"), run_reference(case)
    assert ours[2].item() == theirs[2].item()
    for i, name in enumerate(("loss_focal", "loss_dice")):  # float32 accumulation in both, whatever the dtype
        assert_agree(name, ours[i], theirs[i], 1e-5, scale_of(ref[i]) + 1e-2)
    assert_agree("grad", ours[3], theirs[3], agreement_tol(dtype) + 1e-5, scale_of(ref[3]))


# ----------------------------------------------------------------------------------------- device placement

# Small float32 cases of each op and fused backend, for the placement and stream checks.
PLACEMENT = {"atm_attention-triton": ("triton", lambda: atm_case((2, 77, 130, 3, 40), F32)),
             "query_pool_attention-triton": ("triton", lambda: qp_case((2, (13, 11), 96, 3, 2), F32)),
             "mask_classify-triton": ("triton", lambda: mc_case((2, 37, 70, 9, 11, 83, 61), F32)),
             f"mask_classify-{CXX}": (CXX, lambda: mc_case((2, 37, 70, 9, 11, 83, 61), F32)),
             "mask_losses-triton": ("triton", lambda: ml_case((1, 7, 21, 19, 150, 97), F32)),
             f"mask_losses-{CXX}": (CXX, lambda: ml_case((1, 7, 21, 19, 150, 97), F32))}


def assert_same_results(name, got, expected, device):
    """``got`` on ``device`` and equal to ``expected`` (float32; up to 1e-6 of the scale: cuBLAS may pick another
    algorithm on another device or stream, the fused kernels are deterministic)."""
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert a.device == torch.device(device), f"{name} result {i} on {a.device}, expected {device}"
        if not e.is_floating_point():
            assert torch.equal(a.cpu(), e.cpu())
            continue
        assert torch.isfinite(a).all(), f"{name} result {i}: non-finite values"
        assert_agree(f"{name} result {i}", a.cpu(), e.cpu(), 1e-6, scale_of(e))


def _placement_check(name):
    """One op: on cuda:0, then on copies of its inputs on cuda:1 while the current device stays cuda:0; the results
    must be on cuda:1 and equal to cuda:0's. (Dry run: cpu twice.)"""
    first, second = ("cuda:0", "cuda:1") if CUDA else ("cpu", "cpu")
    backend, make = PLACEMENT[name]
    torch.manual_seed(0)
    case = make()  # on DEVICE = cuda, the current device: cuda:0
    expected = run_op(case, backend)
    moved = case.to(second)
    with torch.cuda.device(0) if CUDA else contextlib.nullcontext():
        got = run_op(moved, backend)
        if CUDA:
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            assert torch.cuda.current_device() == 0, "the op changed the current device"
    assert all(t.device == torch.device(first) for t in expected)
    assert_same_results(name, got, expected, second)


def _placement_main():
    """The body of test_ops_run_on_a_second_device, run in a fresh process (a kernel launched on the wrong device
    can leave a sticky illegal-address error in the process's CUDA context): every PLACEMENT case, one JSON line
    each. After a failure with a CUDA error the later cases fail too; the first one names the culprit."""
    import json
    import traceback

    _common.POISON = True
    for name in PLACEMENT:
        try:
            if PLACEMENT[name][0] == CXX and _cxx_reason():
                result = {"name": name, "skip": _cxx_reason()}
            else:
                _placement_check(name)
                result = {"name": name, "ok": True}
        except Exception as exc:  # reported per case to the parent
            result = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        print("PLACEMENT " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def placement_results():
    """{case name: result} of _placement_main, run once in a subprocess for all the cases."""
    import json

    tests = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_gpu; test_gpu._placement_main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    results = {r["name"]: r for r in (json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                                      if line.startswith("PLACEMENT "))}
    results["_process"] = f"exit {proc.returncode}; stderr: {proc.stderr[-3000:]}"
    return results


@pytest.mark.parametrize("name", list(PLACEMENT))
def test_ops_run_on_a_second_device(name, request):
    if CUDA and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    results = request.getfixturevalue("placement_results")
    result = results.get(name)
    assert result is not None, f"no result for {name} from the subprocess ({results['_process']})"
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["ok"], f"{result['error']}\n{result['traceback']}"


MISMATCHED = {"atm_attention": (lambda: atm_case((1, 5, 9, 2, 8), F32), 1, "k"),
              "query_pool_attention": (lambda: qp_case((1, (3, 4), 8, 2, 2), F32), 1, "in_proj_weight"),
              "mask_classify": (lambda: mc_case((1, 3, 2, 4, 4, 7, 7), F32), 1, "mask_logits"),
              "mask_losses": (lambda: ml_case((1, 3, 4, 4, 7, 7), F32), "labels", "labels")}


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_inputs_on_two_devices_raise_a_value_error_naming_the_argument(name):
    make, which, argument = MISMATCHED[name]
    case = make()
    if isinstance(which, int):
        case.inputs[which] = case.inputs[which].detach().to(OTHER_DEVICE)
    else:
        case.static[which] = case.static[which].to(OTHER_DEVICE)
    for backend in ("auto", "triton", CXX):
        with segvit.ops.use_backend(backend), pytest.raises(ValueError, match=rf"^{argument}: .*device"):
            case.op(*case.inputs, **case.static)


MIXED_DTYPES = {"atm_attention": (lambda: atm_case((1, 5, 9, 2, 8), (F32, BF16, F32)), "k"),
                "query_pool_attention": (lambda: qp_case((1, (3, 4), 8, 2, 2), (F32, F32, BF16)), "in_proj_bias"),
                "mask_classify": (lambda: mc_case((1, 3, 2, 4, 4, 7, 7), (BF16, F32)), "mask_logits")}


@pytest.mark.parametrize("name", list(MIXED_DTYPES))
def test_mixed_dtypes_outside_autocast_raise_a_type_error_naming_the_argument(name):
    make, argument = MIXED_DTYPES[name]
    case = make()
    with pytest.raises(TypeError, match=rf"^{argument}: .*dtype"):
        case.op(*case.inputs, **case.static)


@pytest.mark.parametrize("name", list(PLACEMENT))
def test_ops_on_a_non_default_stream(name):
    """The op, forward and backward, on a side stream whose inputs are written on that stream behind a ~50 ms sleep:
    a kernel launched on another stream (or synchronizing wrongly) reads the NaN the inputs held before."""
    backend, make = PLACEMENT[name]
    _require(backend)
    case = make()
    expected = run_op(case, backend)
    if CUDA:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        context = torch.cuda.stream(stream)
    else:
        stream, context = None, contextlib.nullcontext()
    with context:
        staged = [torch.full_like(t, float("nan")) if t.is_floating_point() else t.clone() for t in case.inputs]
        if CUDA:
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU cycles, queued before the copies
        with torch.no_grad():
            for dst, src in zip(staged, case.inputs):
                dst.copy_(src)
        staged = [t.requires_grad_(src.requires_grad) for t, src in zip(staged, case.inputs)]
        got = run_op(case, backend, inputs=staged)
    if CUDA:
        stream.synchronize()
    assert_same_results(name, got, expected, got[0].device)


# ------------------------------------------------------------------------------------- the extension's CUDA ops

def test_cuda_extension_is_built():
    """The GPU build has the .cu kernels: the cuda backend is available and registered for every extension op."""
    assert _cxx_reason() == "", f"backend {CXX!r}: {_cxx_reason()}"
    kernels = _extension.build_info()["kernels"].get("cuda" if CUDA else "cpu", [])
    assert {"segvit::mask_classify", "segvit::mask_loss_stats", "segvit::mask_loss_stats_backward"} <= set(kernels)


@pytest.mark.parametrize("dtype", DTYPES[CXX], ids=_dtype_name)
def test_extension_ops_opcheck(dtype):
    _require(CXX)
    class_logits, mask_logits = leaf((2, 4, 4), dtype, False, 3.0), leaf((2, 4, 5, 6), dtype, False, 3.0)
    torch.library.opcheck(torch.ops.segvit.mask_classify.default, (class_logits, mask_logits, [11, 7]))
    logits = leaf((2, 4, 3, 5), dtype, True, 2.0)
    labels = block_labels(2, 4, 7, 6, 3).to(DEVICE)
    torch.library.opcheck(torch.ops.segvit.mask_loss_stats.default, (logits, labels, 255, 0.25, 2.0))
    stats = torch.ops.segvit.mask_loss_stats(logits.detach(), labels, 255, 0.25, 2.0)
    grad_stats = torch.randn(2, 4, 4, dtype=torch.float64).to(DEVICE)
    torch.library.opcheck(torch.ops.segvit.mask_loss_stats_backward.default,
                          (grad_stats, logits.detach(), labels, stats, 255, 0.25, 2.0))
