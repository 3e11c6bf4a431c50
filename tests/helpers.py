"""Checks shared by the kernel tests (tests/test_cpp_*.py, tests/test_triton_*.py).

Not a test module (pytest collects only test_*.py); the tests import it as ``helpers``, since pytest puts tests/ on
sys.path (as for ``conftest``). Fixtures defined here take effect in a test module that imports them by name.
"""
import contextlib

import pytest
import torch

from segvit.kernels import _common

CUDA = torch.cuda.is_available()
# The Triton tests' dtypes. bfloat16 only on CUDA: the triton 3.8 interpreter computes bfloat16 ``tl.dot`` and
# reductions wrongly (upstream issues 11584, 11604).
TRITON_DTYPES = [torch.float32, torch.float16,
                 pytest.param(torch.bfloat16,
                              marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]
# flash-attention's rule for float16 / bfloat16: the kernel's max error against the float64 reference is at most this
# factor times the error of eager PyTorch computing the same thing in the same dtype (plus a floor stated per test),
# since the inputs themselves carry the dtype's rounding.
EAGER_FACTOR = 2.0


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, computed in float64 on the CPU; NaN when either holds a NaN, so a bound check fails."""
    return (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "output"):
    """Elementwise |actual - expected| <= atol + rtol |expected| against a (float64) reference, with the same shape;
    NaN and inf in ``actual`` always fail. The error counts the mismatches and shows the first few."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())  # NaN compares False, so it counts as bad
    if bad.any():
        first = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements mismatch (max abs err "
                             f"{err.max().item():.3g}, atol {atol:.3g}, rtol {rtol:.3g}); first (index, got, "
                             f"expected): {first}")


def assert_within_eager(name: str, actual: torch.Tensor, eager: torch.Tensor, expected: torch.Tensor, floor: float):
    """The low-precision rule: ``actual`` is finite and max |actual - expected| <= EAGER_FACTOR *
    max |eager - expected| + floor, with ``expected`` the float64 reference and ``eager`` plain PyTorch in the
    kernel's dtype."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (or NaN poison left)"
    err, eager_err = max_err(actual, expected), max_err(eager, expected)
    assert err <= EAGER_FACTOR * eager_err + floor, (
        f"{name}: kernel error {err:.3g}, eager error {eager_err:.3g}, bound {EAGER_FACTOR:g}x + {floor:.3g} "
        f"({actual.dtype})")


def float64_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Float64 CPU copies of ``tensors`` that require grad: the inputs of a reference run."""
    return [t.detach().cpu().double().requires_grad_() for t in tensors]


def run_with_grads(fn, inputs, cotangents) -> list[torch.Tensor]:
    """``fn(*inputs)``'s outputs (detached), followed by the gradients with respect to ``inputs`` of
    sum_i <outputs[i], cotangents[i]>. One cotangent per output (a tensor or a number, converted to the output's
    dtype); None leaves that output out of the gradient (e.g. an integer count)."""
    outputs = fn(*inputs)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    used = [(o, torch.as_tensor(c, dtype=o.dtype, device=o.device))
            for o, c in zip(outputs, cotangents, strict=True) if c is not None]
    grads = torch.autograd.grad([o for o, _ in used], inputs, [c for _, c in used])
    return [o.detach() for o in outputs] + list(grads)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def num_threads(request):
    """A test taking this fixture runs with 1 and with 2 intra-op threads (the CPU kernels split work by thread)."""
    with torch_threads(request.param):
        yield request.param


@pytest.fixture
def poison_triton_outputs(monkeypatch):
    """Triton launchers allocate the buffers their kernels write filled with NaN (``_common.POISON``), so an element
    a kernel forgets to write fails the comparison instead of passing as stale memory."""
    monkeypatch.setattr(_common, "POISON", True)
