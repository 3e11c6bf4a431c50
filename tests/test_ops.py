"""segvit.ops: every op's eager backend against its float64 reference, input validation, backend dispatch.

Tolerances (eager backend on CPU): float32 rtol/atol 1e-5 (1e-4 for gradients through softmax), bfloat16
rtol/atol 2e-2 (bf16 keeps 8 bits of mantissa: ~4e-3 relative per rounding, a few roundings deep).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import segvit
# The package exports each op's function under its module's name: take the modules themselves.
atm_mod, mc_mod, ml_mod, qp_mod = (importlib.import_module(f"segvit.ops.{name}") for name in (
    "atm_attention", "mask_classify", "mask_losses", "query_pool_attention"))

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def eager_backend():
    with segvit.ops.use_backend("eager"):
        yield


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def check(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nq,nk,h,d", [(2, 7, 13, 3, 8), (1, 1, 1, 1, 4), (1, 19, 5, 2, 16)])
def test_atm_attention(dtype, b, nq, nk, h, d):
    q, k, v = leaf(b, nq, h, d, dtype=dtype), leaf(b, nk, h, d, dtype=dtype), leaf(b, nk, h, d, dtype=dtype)
    out, sim = segvit.ops.atm_attention(q, k, v)
    assert out.shape == (b, nq, h, d) and sim.shape == (b, nq, nk) and out.dtype == dtype
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_sim = atm_mod.reference(*refs)
    check(out, ref_out, TOL[dtype])
    check(sim, ref_sim, TOL[dtype])
    g_out, g_sim = torch.randn_like(ref_out), torch.randn_like(ref_sim)
    torch.autograd.backward((out, sim), (g_out.to(dtype), g_sim.to(dtype)))
    torch.autograd.backward((ref_out, ref_sim), (g_out, g_sim))
    for ours, theirs in zip((q, k, v), refs):
        check(ours.grad, theirs.grad, GRAD_TOL[dtype])


def test_atm_attention_sim_is_head_mean_of_scaled_logits():
    q, k, v = torch.randn(1, 3, 4, 5), torch.randn(1, 6, 4, 5), torch.randn(1, 6, 4, 5)
    _, sim = segvit.ops.atm_attention(q, k, v, scale=0.3)
    expected = torch.einsum("bqhd,bkhd->bqk", q, k) * 0.3 / 4
    torch.testing.assert_close(sim, expected)


def test_atm_attention_dropout_drops_probabilities_only():
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 9, 2, 4), torch.randn(2, 9, 2, 4)
    torch.manual_seed(1)
    out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=0.5)
    ref_out, ref_sim = segvit.ops.atm_attention(q, k, v)
    torch.testing.assert_close(sim, ref_sim)  # the similarity map is pre-dropout
    assert not torch.allclose(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,grid,c,heads,stride", [(2, (5, 7), 12, 3, 2), (1, (1, 1), 8, 2, 2), (1, (6, 4), 16, 4, 3)])
def test_query_pool_attention(dtype, b, grid, c, heads, stride):
    x = leaf(b, grid[0] * grid[1], c, dtype=dtype)
    w, bias = leaf(3 * c, c, dtype=dtype, scale=c ** -0.5), leaf(3 * c, dtype=dtype)
    out = segvit.ops.query_pool_attention(x, grid, w, bias, heads, stride=stride)
    pooled = qp_mod.pooled_grid(grid, stride)
    assert out.shape == (b, pooled[0] * pooled[1], c)
    refs = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref = qp_mod.reference(refs[0], grid, refs[1], refs[2], heads, stride=stride)
    check(out, ref, TOL[dtype])
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for ours, theirs in zip((x, w, bias), refs):
        check(ours.grad, theirs.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,q,k,hw,out_size", [(2, 7, 5, (5, 7), (33, 17)), (1, 3, 2, (1, 1), (5, 9)),
                                               (1, 4, 6, (9, 11), (4, 5))])
def test_mask_classify(dtype, b, q, k, hw, out_size):
    cls, masks = leaf(b, q, k + 1, dtype=dtype, scale=3), leaf(b, q, *hw, dtype=dtype, scale=3)
    out = segvit.ops.mask_classify(cls, masks, out_size)
    assert out.shape == (b, k, *out_size) and out.dtype == dtype
    refs = [t.detach().double().requires_grad_() for t in (cls, masks)]
    ref = mc_mod.reference(*refs, out_size)
    check(out, ref, TOL[dtype])
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for ours, theirs in zip((cls, masks), refs):
        check(ours.grad, theirs.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k,hw,label_size", [(2, 5, (3, 4), (13, 11)), (1, 3, (1, 1), (4, 4)), (2, 4, (7, 5), (7, 5))])
def test_mask_losses(dtype, b, k, hw, label_size):
    logits = leaf(b, k, *hw, dtype=dtype, scale=2)
    labels = torch.randint(0, k, (b, *label_size))
    labels[labels == k - 1] = 255  # class k-1 absent everywhere, its pixels ignored
    labels[0, 0, 0] = 255
    focal, dice, n = segvit.ops.mask_losses(logits, labels)
    ref_logits = logits.detach().double().requires_grad_()
    ref_focal, ref_dice, ref_n = ml_mod.reference(ref_logits, labels)
    assert n.item() == ref_n.item() and focal.dtype == torch.float32
    check(focal, ref_focal, TOL[dtype])
    check(dice, ref_dice, TOL[dtype])
    (focal * 0.7 + dice * 1.3).backward()
    (ref_focal * 0.7 + ref_dice * 1.3).backward()
    check(logits.grad, ref_logits.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("call,match", [
    (lambda: segvit.ops.atm_attention(torch.randn(1, 2, 3), torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3)),
     r"q: expected 4 dims \(B, Nq, H, D\)"),
    (lambda: segvit.ops.atm_attention(torch.randn(1, 2, 2, 3), torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3)),
     "k: expected head count H 2"),
    (lambda: segvit.ops.atm_attention(torch.randn(1, 2, 1, 3), torch.randn(1, 4, 1, 3), torch.randn(1, 5, 1, 3)),
     r"v: expected shape \(1, 4, 1, 3\)"),
    (lambda: segvit.ops.atm_attention(torch.randn(1, 2, 1, 3), torch.randn(1, 4, 1, 3).double(),
                                      torch.randn(1, 4, 1, 3)), "k: expected dtype torch.float32"),
    (lambda: segvit.ops.atm_attention(torch.randn(1, 0, 1, 3), torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3)),
     "q: expected non-empty"),
    (lambda: segvit.ops.atm_attention(torch.randn(1, 2, 1, 3), torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3),
                                      dropout_p=1.0), "dropout_p"),
    (lambda: segvit.ops.mask_classify(torch.randn(2, 3, 4), torch.randn(2, 4, 5, 5), (8, 8)),
     "mask_logits: expected query count Q 3"),
    (lambda: segvit.ops.mask_classify(torch.randn(2, 3, 4), torch.randn(1, 3, 5, 5), (8, 8)),
     "mask_logits: expected batch size 2"),
    (lambda: segvit.ops.mask_classify(torch.randn(2, 3, 4), torch.randn(2, 3, 5, 5), (0, 8)), "out_size"),
    (lambda: segvit.ops.mask_classify(torch.randn(2, 3, 1), torch.randn(2, 3, 5, 5), (4, 8)), "K\\+1 >= 2"),
    (lambda: segvit.ops.mask_losses(torch.randn(2, 3, 5, 5), torch.zeros(2, 4, 4)), "labels: expected dtype"),
    (lambda: segvit.ops.mask_losses(torch.randn(2, 3, 5, 5), torch.zeros(1, 4, 4, dtype=torch.long)),
     "labels: expected batch size 2"),
    (lambda: segvit.ops.query_pool_attention(torch.randn(1, 12, 8), (3, 5), torch.randn(24, 8), torch.randn(24), 2),
     "grid: expected gh \\* gw == L = 12"),
    (lambda: segvit.ops.query_pool_attention(torch.randn(1, 12, 8), (3, 4), torch.randn(24, 8), torch.randn(24), 3),
     "num_heads"),
    (lambda: segvit.ops.query_pool_attention(torch.randn(1, 12, 8), (3, 4), torch.randn(24, 4), torch.randn(24), 2),
     "in_proj_weight: expected shape"),
])
def test_validation_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_use_backend_switches_and_restores():
    assert segvit.ops.get_backend() == "eager"
    with segvit.ops.use_backend("auto"):
        assert segvit.ops.get_backend() == "auto"
    assert segvit.ops.get_backend() == "eager"
    with pytest.raises(ValueError, match="unknown segvit backend 'fast'"):
        segvit.ops.use_backend("fast")


def test_requested_backend_that_cannot_run_says_why():
    with segvit.ops.use_backend("triton"):
        # float64 is valid for the op (the eager reference runs it) but not for the Triton kernels.
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run these inputs: .*dtype torch.float64"):
            segvit.ops.atm_attention(*(torch.randn(1, n, 1, 4, dtype=torch.float64) for n in (2, 3, 3)))


def test_auto_falls_back_to_eager_for_gradients():
    cls = torch.randn(1, 3, 4, requires_grad=True)
    masks = torch.randn(1, 3, 2, 2, requires_grad=True)
    with segvit.ops.use_backend("auto"):
        out = segvit.ops.mask_classify(cls, masks, (5, 5))
    out.sum().backward()
    assert cls.grad is not None and masks.grad is not None


def test_available_backends_reports_every_backend():
    status = segvit.ops.available_backends()
    assert set(status) == {"eager", "triton", "cpp", "cuda"}
    assert status["eager"] == "available"
    assert all(isinstance(v, str) and v for v in status.values())


def test_environment_variable_selects_backend():
    code = "import segvit; print(segvit.ops.get_backend())"
    env = dict(os.environ, SEGVIT_BACKEND="eager")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "eager"
    env["SEGVIT_BACKEND"] = "nope"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "SEGVIT_BACKEND: unknown segvit backend 'nope'" in result.stderr


def test_auto_policy_of_a_registration(monkeypatch):
    """``register(..., auto=...)``: "no" keeps a backend out of auto's order whatever the inputs, "without-triton"
    only where Triton is installed; an explicit selection still runs it; the shipped .cu mask_classify is "no"."""
    from segvit.ops import _dispatch

    calls = []
    op = _dispatch.Op("probe")
    op.register("eager", lambda x: calls.append("eager") or x)
    op.register("cpp", lambda x: calls.append("cpp") or x, auto="no", auto_note="explicit only: test")
    monkeypatch.setattr(_dispatch, "_selected", "auto")
    op(torch.ones(1))
    assert calls == ["eager"] and op.auto_skips("cpp")
    monkeypatch.setattr(_dispatch, "_selected", "cpp")
    op(torch.ones(1))
    assert calls == ["eager", "cpp"]
    op.register("cpp", lambda x: calls.append("cpp") or x, auto="without-triton")
    monkeypatch.setattr(_dispatch, "_triton_installed", lambda: True)
    assert op.auto_skips("cpp")
    monkeypatch.setattr(_dispatch, "_triton_installed", lambda: False)
    assert not op.auto_skips("cpp")
    with pytest.raises(ValueError, match="auto must be one of"):
        op.register("cpp", lambda x: x, auto="sometimes")
    assert _dispatch.OPS["mask_classify"].kernels["cuda"].auto == "no"
    assert _dispatch.OPS["mask_losses"].kernels["cuda"].auto == "without-triton"
    report = __import__("segvit.info", fromlist=["report"]).report()
    assert "auto and cuda: explicit only" in report and "used by auto only without Triton" in report
