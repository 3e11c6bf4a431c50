"""The C++ CPU kernels of ``atm_attention`` and ``query_pool_attention`` (csrc/cpu/atm_attention.cpp,
csrc/cpu/query_pool_attention.cpp) against the float64 references of segvit/ops, forward and backward."""
import importlib

import pytest
import torch

import segvit.ops
from segvit import _extension

_AVAILABLE, _REASON = _extension.status()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_REASON)

# segvit.ops re-exports the functions under the modules' names, hence import_module.
atm_ops = importlib.import_module("segvit.ops.atm_attention")
qpa_ops = importlib.import_module("segvit.ops.query_pool_attention")

# float32: |err| <= TOL * (max |ref| + |ref|) elementwise; observed worst ~5e-7 relative to the tensor's scale.
F32_TOL = 1e-5
# bfloat16: the kernel's max error may be at most 2x that of eager bfloat16 on the same inputs, plus a floor
# (relative to the tensor's scale) for cases where eager happens to be almost exact.
BF16_EAGER_FACTOR = 2.0
BF16_FLOOR = 2e-3

# (B, Nq, Nk, H, D): odd sizes, Nq != Nk, one query and one key, one shape with many query and key blocks, and one
# with more key blocks than the backward has key chunks (several blocks per chunk).
ATM_SHAPES = [(2, 7, 13, 3, 8), (1, 1, 1, 1, 8), (3, 5, 2, 2, 4), (1, 150, 1600, 2, 32), (1, 3, 2100, 1, 4)]
# (B, gh, gw, C, H, stride): h != w, 1x1 grid, stride not dividing the grid, stride 1 and 3.
QPA_SHAPES = [(2, 5, 7, 24, 3, 2), (1, 1, 1, 8, 2, 2), (1, 6, 4, 16, 4, 3), (1, 3, 5, 12, 1, 1), (2, 9, 8, 32, 2, 2)]
# L above the backward's key chunk (1024 tokens): B 2 with 2 chunks of 578 and 577 keys; an odd grid with stride 3 and
# 3 chunks of 705 keys (small C keeps them cheap).
QPA_CHUNKED_SHAPES = [(2, 33, 35, 8, 2, 2), (1, 45, 47, 4, 1, 3)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    # The kernels then fill their output buffers with NaN before writing them (see attention::poison_for_tests).
    monkeypatch.setenv("SEGVIT_POISON_OUTPUTS", "1")


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def num_threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def assert_close(name, actual, expected, tol):
    """Elementwise |actual - expected| <= tol * (max |expected| + |expected|); NaN and inf always fail."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    bound = tol * (expected.abs().max() + expected.abs())
    bad = ~(err <= bound)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches (max abs err {err.max().item():.3g}, "
                             f"scale {expected.abs().max().item():.3g}); first: {worst}")


def max_rel_err(actual, expected):
    err = (actual.double() - expected).abs().max()
    assert torch.isfinite(err), "non-finite values"
    return (err / expected.abs().max().clamp(min=1e-30)).item()


def assert_bf16_within_2x_eager(name, actual, eager, expected):
    err, eager_err = max_rel_err(actual, expected), max_rel_err(eager, expected)
    assert err <= BF16_EAGER_FACTOR * eager_err + BF16_FLOOR, f"{name}: kernel {err:.3g}, eager bfloat16 {eager_err:.3g}"


def grads(outputs, cotangents, inputs):
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def atm_inputs(B, Nq, Nk, H, D, dtype=torch.float32):
    return [torch.randn(B, n, H, D).to(dtype).requires_grad_() for n in (Nq, Nk, Nk)]


def atm_cpp(q, k, v, scale):
    return atm_ops._cpp(q, k, v, scale=scale, dropout_p=0.0)


def atm_reference_and_grads(q, k, v, scale, cotangents):
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outputs = atm_ops.reference(*inputs, scale=scale)
    return [o.detach() for o in outputs], grads(outputs, [c.double() for c in cotangents], inputs)


@pytest.mark.parametrize("shape", ATM_SHAPES, ids=lambda s: "B{}_Nq{}_Nk{}_H{}_D{}".format(*s))
def test_atm_float32_forward_backward_match_float64_reference(shape, num_threads):
    B, Nq, Nk, H, D = shape
    q, k, v = atm_inputs(*shape)
    scale = 0.7 * D ** -0.5  # not the default, so a kernel ignoring the argument fails
    out, sim = atm_cpp(q, k, v, scale)
    assert out.dtype == sim.dtype == torch.float32 and out.is_contiguous() and sim.is_contiguous()
    cotangents = [torch.randn_like(out), torch.randn_like(sim)]
    ref_outputs, ref_grads = atm_reference_and_grads(q, k, v, scale, cotangents)
    assert_close("out", out, ref_outputs[0], F32_TOL)
    assert_close("sim", sim, ref_outputs[1], F32_TOL)
    for name, g, r in zip(("grad_q", "grad_k", "grad_v"), grads((out, sim), cotangents, (q, k, v)), ref_grads):
        assert_close(name, g, r, F32_TOL)


@pytest.mark.parametrize("shape", ATM_SHAPES[:3], ids=lambda s: "B{}_Nq{}_Nk{}_H{}_D{}".format(*s))
def test_atm_bfloat16_error_within_2x_eager(shape, num_threads):
    q, k, v = atm_inputs(*shape, dtype=torch.bfloat16)
    scale = shape[-1] ** -0.5
    out, sim = atm_cpp(q, k, v, scale)
    assert out.dtype == sim.dtype == torch.bfloat16
    cotangents = [torch.randn_like(out), torch.randn_like(sim)]
    ref_outputs, ref_grads = atm_reference_and_grads(q, k, v, scale, cotangents)
    eager_outputs = atm_ops.eager(q, k, v, scale=scale, dropout_p=0.0)
    eager_grads = grads(eager_outputs, cotangents, (q, k, v))
    kernel_grads = grads((out, sim), cotangents, (q, k, v))
    names = ("out", "sim", "grad_q", "grad_k", "grad_v")
    actual, eager, expected = [out, sim, *kernel_grads], [*eager_outputs, *eager_grads], [*ref_outputs, *ref_grads]
    for name, a, e, r in zip(names, actual, eager, expected):
        assert_bf16_within_2x_eager(name, a, e, r)


def test_atm_results_do_not_depend_on_thread_count():
    q, k, v = atm_inputs(2, 33, 700, 2, 16)
    cotangents = [torch.randn(2, 33, 2, 16), torch.randn(2, 33, 700)]
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outputs = atm_cpp(q, k, v, 0.25)
            results.append([o.detach() for o in outputs] + list(grads(outputs, cotangents, (q, k, v))))
        finally:
            torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("used", ["out", "sim"])
def test_atm_gradient_through_one_output(used):
    q, k, v = atm_inputs(2, 7, 13, 3, 8)
    scale = 8 ** -0.5
    out, sim = atm_cpp(q, k, v, scale)
    chosen = out if used == "out" else sim
    cotangent = torch.randn_like(chosen)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_chosen = atm_ops.reference(*ref_inputs, scale=scale)[0 if used == "out" else 1]
    # sim does not depend on v: its gradient there is None in the reference and zeros from the kernel.
    expected = torch.autograd.grad((ref_chosen * cotangent.double()).sum(), ref_inputs, allow_unused=True)
    actual = torch.autograd.grad((chosen * cotangent).sum(), (q, k, v))
    for name, a, e in zip(("grad_q", "grad_k", "grad_v"), actual, expected):
        if e is None:
            assert torch.equal(a, torch.zeros_like(a)), f"{name}: expected zeros"
        else:
            assert_close(name, a, e, F32_TOL)


# Attention dropout: two forward query blocks, two key blocks, several backward query blocks.
ATM_DROPOUT_SHAPE = (1, 100, 300, 2, 32)


def atm_dropout(q, k, v, scale, p, seed):
    out, sim, _ = torch.ops.segvit.atm_attention_fwd(q, k, v, scale, p, seed)
    return out, sim


def atm_dropout_mask(q, k, scale, p, seed):
    """The kernel's keep mask (B, H, Nq, Nk), read through its output: the mask depends on the indices only, and
    with v one-hot over a window of D keys, out[b, i, h, d] is the dropped probability of key j0 + d, > 0 iff kept
    (probabilities are >= exp(-87) > 0)."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    mask = torch.empty(B, H, Nq, Nk, dtype=torch.bool)
    for j0 in range(0, Nk, D):
        n = min(D, Nk - j0)
        v = torch.zeros(B, Nk, H, D)
        v[:, j0 + torch.arange(n), :, torch.arange(n)] = 1.0
        out, _ = atm_dropout(q.detach(), k.detach(), v, scale, p, seed)
        mask[..., j0:j0 + n] = (out[..., :n] != 0).permute(0, 2, 1, 3)
    return mask


def atm_dropout_reference(q, k, v, scale, mask, p):
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    attn = logits.softmax(dim=-1) * mask / (1 - p)
    return torch.einsum("bhij,bjhd->bihd", attn, v), logits.mean(dim=1)


def test_atm_dropout_matches_float64_reference_with_the_kernels_mask(num_threads):
    B, Nq, Nk, H, D = ATM_DROPOUT_SHAPE
    q, k, v = atm_inputs(*ATM_DROPOUT_SHAPE)
    scale, p, seed = 0.7 * D ** -0.5, 0.3, 1234567
    mask = atm_dropout_mask(q, k, scale, p, seed)
    kept, n = mask.sum().item(), mask.numel()
    assert abs(kept - n * (1 - p)) <= 6 * (n * p * (1 - p)) ** 0.5, f"kept {kept} of {n} at p={p}"
    # Not one pattern repeated: rows and heads get different masks.
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1]) and not torch.equal(mask[0, 0], mask[0, 1])
    out, sim = atm_dropout(q, k, v, scale, p, seed)
    cotangents = [torch.randn_like(out), torch.randn_like(sim)]
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = atm_dropout_reference(*inputs, scale, mask, p)
    ref_grads = grads(ref, [c.double() for c in cotangents], inputs)
    assert_close("out", out, ref[0].detach(), F32_TOL)
    assert_close("sim", sim, ref[1].detach(), F32_TOL)
    for name, g, r in zip(("grad_q", "grad_k", "grad_v"), grads((out, sim), cotangents, (q, k, v)), ref_grads):
        assert_close(name, g, r, F32_TOL)


def test_atm_dropout_seed_p0_and_thread_count():
    q, k, v = atm_inputs(2, 33, 700, 2, 16)
    d = [t.detach() for t in (q, k, v)]
    plain = torch.ops.segvit.atm_attention_fwd(*d, 0.25)
    for a, b in zip(plain, torch.ops.segvit.atm_attention_fwd(*d, 0.25, 0.0, 99)):
        assert torch.equal(a, b), "p=0 must be the no-dropout path"
    first = torch.ops.segvit.atm_attention_fwd(*d, 0.25, 0.2, 5)
    again = torch.ops.segvit.atm_attention_fwd(*d, 0.25, 0.2, 5)
    other = torch.ops.segvit.atm_attention_fwd(*d, 0.25, 0.2, 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    # sim and the log-sum-exp are those of the un-dropped softmax.
    assert torch.equal(first[1], plain[1]) and torch.equal(first[2], plain[2])
    cotangents = [torch.randn(2, 33, 2, 16), torch.randn(2, 33, 700)]
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outputs = atm_dropout(q, k, v, 0.25, 0.2, 5)
            results.append([o.detach() for o in outputs] + list(grads(outputs, cotangents, (q, k, v))))
        finally:
            torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_atm_dropout_seed_comes_from_torch_manual_seed():
    q, k, v = (t.detach() for t in atm_inputs(1, 9, 40, 2, 8))
    with segvit.ops.use_backend("cpp"):
        torch.manual_seed(3)
        first = segvit.ops.atm_attention(q, k, v, dropout_p=0.5)[0]
        second = segvit.ops.atm_attention(q, k, v, dropout_p=0.5)[0]
        torch.manual_seed(3)
        replay = segvit.ops.atm_attention(q, k, v, dropout_p=0.5)[0]
    assert torch.equal(first, replay) and not torch.equal(first, second)


def qpa_inputs(B, gh, gw, C, H, stride, dtype=torch.float32):
    x = torch.randn(B, gh * gw, C)
    weight = torch.randn(3 * C, C) * C ** -0.5
    bias = torch.randn(3 * C) * 0.5
    return [t.to(dtype).requires_grad_() for t in (x, weight, bias)]


def qpa_cpp(x, grid, weight, bias, num_heads, stride):
    return qpa_ops._cpp(x, grid, weight, bias, num_heads, stride=stride)


def qpa_reference_and_grads(x, grid, weight, bias, num_heads, stride, cotangent):
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = qpa_ops.reference(inputs[0], grid, inputs[1], inputs[2], num_heads, stride=stride)
    return out.detach(), grads([out], [cotangent.double()], inputs)


@pytest.mark.parametrize("shape", QPA_SHAPES + QPA_CHUNKED_SHAPES, ids=lambda s: "B{}_{}x{}_C{}_H{}_s{}".format(*s))
def test_qpa_float32_forward_backward_match_float64_reference(shape, num_threads):
    B, gh, gw, C, H, stride = shape
    x, weight, bias = qpa_inputs(*shape)
    out = qpa_cpp(x, (gh, gw), weight, bias, H, stride)
    pooled = -(-gh // stride) * -(-gw // stride)
    assert out.shape == (B, pooled, C) and out.dtype == torch.float32 and out.is_contiguous()
    cotangent = torch.randn_like(out)
    ref_out, ref_grads = qpa_reference_and_grads(x, (gh, gw), weight, bias, H, stride, cotangent)
    assert_close("out", out, ref_out, F32_TOL)
    actual = grads([out], [cotangent], (x, weight, bias))
    for name, g, r in zip(("grad_x", "grad_in_proj_weight", "grad_in_proj_bias"), actual, ref_grads):
        assert_close(name, g, r, F32_TOL)


@pytest.mark.parametrize("shape", QPA_SHAPES[:3] + QPA_CHUNKED_SHAPES[:1],
                         ids=lambda s: "B{}_{}x{}_C{}_H{}_s{}".format(*s))
def test_qpa_bfloat16_error_within_2x_eager(shape, num_threads):
    B, gh, gw, C, H, stride = shape
    x, weight, bias = qpa_inputs(*shape, dtype=torch.bfloat16)
    out = qpa_cpp(x, (gh, gw), weight, bias, H, stride)
    assert out.dtype == torch.bfloat16
    cotangent = torch.randn_like(out)
    ref_out, ref_grads = qpa_reference_and_grads(x, (gh, gw), weight, bias, H, stride, cotangent)
    eager_out = qpa_ops.eager(x, (gh, gw), weight, bias, H, stride=stride)
    eager_grads = grads([eager_out], [cotangent], (x, weight, bias))
    kernel_grads = grads([out], [cotangent], (x, weight, bias))
    names = ("out", "grad_x", "grad_in_proj_weight", "grad_in_proj_bias")
    for name, a, e, r in zip(names, [out, *kernel_grads], [eager_out, *eager_grads], [ref_out, *ref_grads]):
        assert_bf16_within_2x_eager(name, a, e, r)


def test_qpa_results_do_not_depend_on_thread_count():
    # Several key chunks and B 2: the chunking and the per-head split are fixed by the shape, not the thread count.
    B, gh, gw, C, H, stride = QPA_CHUNKED_SHAPES[0]
    x, weight, bias = qpa_inputs(B, gh, gw, C, H, stride)
    results = []
    for n in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            out = qpa_cpp(x, (gh, gw), weight, bias, H, stride)
            cotangent = torch.linspace(-1, 1, out.numel()).view_as(out)
            results.append([out.detach(), *grads([out], [cotangent], (x, weight, bias))])
        finally:
            torch.set_num_threads(previous)
    for name, a, b in zip(("out", "grad_x", "grad_in_proj_weight", "grad_in_proj_bias"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_dispatch_selects_cpp_and_explains_refusals():
    q, k, v = (t.detach() for t in atm_inputs(1, 3, 5, 2, 4))
    with segvit.ops.use_backend("cpp"):
        out, sim = segvit.ops.atm_attention(q, k, v)
        dropped, _ = segvit.ops.atm_attention(q, k, v, dropout_p=0.1)  # taken by cpp too, no eager fallback
        assert torch.isfinite(dropped).all()
        with pytest.raises(RuntimeError, match=r"cpp takes float32 or bfloat16, got torch.float16"):
            segvit.ops.atm_attention(q.half(), k.half(), v.half())
        x, weight, bias = (t.detach() for t in qpa_inputs(1, 3, 3, 8, 2, 2))
        pooled = segvit.ops.query_pool_attention(x, (3, 3), weight, bias, 2)
        with pytest.raises(RuntimeError, match=r"cpp takes float32 or bfloat16, got torch.float16"):
            segvit.ops.query_pool_attention(x.half(), (3, 3), weight.half(), bias.half(), 2)
    ref_out, ref_sim = atm_ops.reference(q, k, v)
    assert_close("out", out, ref_out, F32_TOL)
    assert_close("sim", sim, ref_sim, F32_TOL)
    assert_close("pooled", pooled, qpa_ops.reference(x, (3, 3), weight, bias, 2), F32_TOL)


def test_opcheck_atm_attention():
    q, k, v = atm_inputs(2, 5, 9, 3, 8)
    torch.library.opcheck(torch.ops.segvit.atm_attention_fwd.default, (q, k, v, 0.3))
    d = [t.detach() for t in (q, k, v)]
    out, sim, lse = torch.ops.segvit.atm_attention_fwd(*d, 0.3)
    torch.library.opcheck(torch.ops.segvit.atm_attention_bwd.default,
                          (torch.randn_like(out), torch.randn_like(sim), *d, out, lse, 0.3))
    torch.library.opcheck(torch.ops.segvit.atm_attention_fwd.default, (q, k, v, 0.3, 0.25, 7))
    out, sim, lse = torch.ops.segvit.atm_attention_fwd(*d, 0.3, 0.25, 7)
    torch.library.opcheck(torch.ops.segvit.atm_attention_bwd.default,
                          (torch.randn_like(out), torch.randn_like(sim), *d, out, lse, 0.3, 0.25, 7))


def test_opcheck_query_pool_attention():
    x, weight, bias = qpa_inputs(2, 5, 3, 8, 2, 2)
    torch.library.opcheck(torch.ops.segvit.query_pool_attention_fwd.default, (x, [5, 3], weight, bias, 2, 2))
    d = [t.detach() for t in (x, weight, bias)]
    out, q, kv, lse = torch.ops.segvit.query_pool_attention_fwd(d[0], [5, 3], d[1], d[2], 2, 2)
    torch.library.opcheck(torch.ops.segvit.query_pool_attention_bwd.default,
                          (torch.randn_like(out), d[0], [5, 3], d[1], q, kv, out, lse, 2, 2))


_Q, _K = torch.randn(2, 3, 2, 4), torch.randn(2, 5, 2, 4)


@pytest.mark.parametrize(
    "q, k, v, match",
    [
        (_Q[0], _K, _K, r"q must be 4-D"),
        (_Q, _K, _K[:, :4], r"v must have the shape of k"),
        (_Q[:1], _K, _K, r"same batch size B"),
        (_Q[:, :, :1], _K, _K, r"same head count H"),
        (_Q[..., :3], _K, _K, r"same head dim D"),
        (_Q.double(), _K.double(), _K.double(), r"q must be float32 or bfloat16"),
        (_Q.half(), _K.half(), _K.half(), r"q must be float32 or bfloat16"),
        (_Q, _K.bfloat16(), _K, r"k must have the dtype of q"),
        (_Q[:, :0], _K, _K, r"q must have Nq >= 1"),
        (_Q, _K[:, :0], _K[:, :0], r"k must have Nk >= 1"),
        (torch.randn(1, 2, 1, 129), torch.randn(1, 3, 1, 129), torch.randn(1, 3, 1, 129), r"head dim D in \[1, 128\]"),
    ],
    ids=["q_dims", "v_shape", "batch", "heads", "head_dim", "float64", "float16", "mixed_dtype", "no_queries",
         "no_keys", "head_dim_too_large"],
)
def test_atm_invalid_inputs_raise_naming_the_argument(q, k, v, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.segvit.atm_attention_fwd(q, k, v, 0.5)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_atm_invalid_dropout_p_raises(p):
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        torch.ops.segvit.atm_attention_fwd(_Q, _K, _K, 0.5, p, 0)


_X, _W, _B = torch.randn(1, 12, 8), torch.randn(24, 8), torch.randn(24)


@pytest.mark.parametrize(
    "x, grid, weight, bias, heads, stride, match",
    [
        (_X[0], [3, 4], _W, _B, 2, 2, r"x must be 3-D"),
        (_X, [3, 5], _W, _B, 2, 2, r"grid must satisfy gh \* gw == L = 12"),
        (_X, [3, 4], _W[:, :7], _B, 2, 2, r"in_proj_weight must have shape \(3C, C\)"),
        (_X, [3, 4], _W, _B[:23], 2, 2, r"in_proj_bias must have shape \(3C,\)"),
        (_X, [3, 4], _W, _B, 3, 2, r"num_heads must be a positive divisor of C = 8"),
        (_X, [3, 4], _W, _B, 2, 0, r"stride must be a positive int"),
        (_X.half(), [3, 4], _W.half(), _B.half(), 2, 2, r"x must be float32 or bfloat16"),
        (_X, [3, 4], _W.bfloat16(), _B, 2, 2, r"in_proj_weight must have the dtype of x"),
        (_X, [3, 4], _W, _B.double(), 2, 2, r"in_proj_bias must have the dtype of x"),
    ],
    ids=["x_dims", "grid", "weight_shape", "bias_shape", "heads", "stride", "float16", "weight_dtype", "bias_dtype"],
)
def test_qpa_invalid_inputs_raise_naming_the_argument(x, grid, weight, bias, heads, stride, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.segvit.query_pool_attention_fwd(x, grid, weight, bias, heads, stride)
