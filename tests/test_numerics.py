"""Issue 11, item 5 ("Nothing lost, nothing silent"): the fused backends keep eager's semantics where they used to
differ silently.

* second-order gradients (create_graph=True) of every fused op on every fused backend (cpp, triton under the
  interpreter) equal eager's, or raise a clear error naming the op (atm_attention with dropout);
* NaN and inf propagate as in eager (all -inf softmax rows, inf and NaN inputs): the same positions are NaN, the
  same are +-inf, the finite values agree;
* integer arguments (sizes, num_heads, stride, ignore_index) are ints, never truncated floats or bools, checked
  identically on every backend; alpha and gamma outside their domains are errors;
* model configs are validated at build time, errors naming the config key.

Tolerances: gradients against eager float32 on the same inputs, elementwise within 1e-4 * (max |eager| + |eager|)
(the fused path's first-order parts, e.g. the output gradient 2 out of a squared loss, come from the fused kernels,
~1e-6 relative to the tensor's scale, and a near-zero element then differs by that much in absolute terms).
"""
import importlib
import math
import shutil
import subprocess

import pytest
import torch

import segvit
import segvit.ops
from segvit import _extension

atm_mod, mc_mod, ml_mod, qp_mod = (importlib.import_module(f"segvit.ops.{name}") for name in (
    "atm_attention", "mask_classify", "mask_losses", "query_pool_attention"))

_CPP, _CPP_REASON = _extension.status()
FUSED = [pytest.param("cpp", marks=pytest.mark.skipif(not _CPP, reason=_CPP_REASON)), "triton"]
SECOND_ORDER_TOL = 1e-4
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv("SEGVIT_POISON_OUTPUTS", "1")


def _assert_close(actual, expected, tol=SECOND_ORDER_TOL):
    err = (actual.double() - expected.double()).abs()
    bound = tol * (expected.double().abs().max() + expected.double().abs())
    assert bool((err <= bound).all()), f"max abs err {err.max().item():.3g}, scale {expected.abs().max().item():.3g}"


def _leaves(*shapes, scale=1.0):
    return [(torch.randn(*s) * scale).requires_grad_() for s in shapes]


# ---- second-order gradients ---------------------------------------------------------------------------------

def _atm_case():
    q, k, v = _leaves((2, 5, 2, 4), (2, 7, 2, 4), (2, 7, 2, 4))

    def loss_fn(q, k, v):
        out, sim = segvit.ops.atm_attention(q, k, v)
        return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() + sim.pow(2).sum()
    return (q, k, v), loss_fn


def _qp_case():
    x, w, b = _leaves((2, 12, 8), (24, 8), (24,))
    w.data *= 0.3

    def loss_fn(x, w, b):
        return segvit.ops.query_pool_attention(x, (3, 4), w, b, 2).pow(2).sum()
    return (x, w, b), loss_fn


def _ml_case():
    (logits,) = _leaves((2, 3, 4, 5), scale=2.0)
    labels = torch.randint(0, 3, (2, 8, 10))
    labels[1, :2] = 255

    def loss_fn(logits):
        focal, dice, _ = segvit.ops.mask_losses(logits, labels)
        return 20 * focal + dice
    return (logits,), loss_fn


def _mc_case():
    cls, masks = _leaves((1, 3, 4), (1, 3, 4, 5))

    def loss_fn(cls, masks):
        return segvit.ops.mask_classify(cls, masks, (8, 10)).pow(2).sum()
    return (cls, masks), loss_fn


def _second_order(inputs, loss_fn, backend):
    with segvit.ops.use_backend(backend):
        first = torch.autograd.grad(loss_fn(*inputs), inputs, create_graph=True)
    penalty = sum((g * torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view(g.shape)).pow(2).sum() for g in first)
    second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    return [g.detach() for g in first], [torch.zeros_like(i) if g is None else g for g, i in zip(second, inputs)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", [_atm_case, _qp_case, _ml_case], ids=["atm_attention", "query_pool_attention",
                                                                          "mask_losses"])
def test_second_order_gradients_match_eager(case, backend):
    inputs, loss_fn = case()
    ref_first, ref_second = _second_order(inputs, loss_fn, "eager")
    first, second = _second_order(inputs, loss_fn, backend)
    for ours, theirs in zip(first, ref_first):
        _assert_close(ours, theirs)
    assert any(g.abs().sum() > 0 for g in ref_second)
    for ours, theirs in zip(second, ref_second):
        _assert_close(ours, theirs)


def test_issue_reproducer_second_order_is_not_zero():
    if not _CPP:
        pytest.skip(_CPP_REASON)
    q, k, v = (torch.randn(1, 4, 2, 4, requires_grad=True) for _ in range(3))
    norms = {}
    for backend in ("eager", "cpp", "triton"):
        with segvit.ops.use_backend(backend):
            o, s = segvit.ops.atm_attention(q, k, v)
        g, = torch.autograd.grad(o.sum() + s.pow(2).sum(), q, create_graph=True)
        norms[backend] = torch.autograd.grad(g.pow(2).sum(), k)[0].norm().item()
    assert norms["eager"] > 1
    assert norms["cpp"] == pytest.approx(norms["eager"], rel=1e-4)
    assert norms["triton"] == pytest.approx(norms["eager"], rel=1e-4)


@pytest.mark.parametrize("backend", FUSED)
def test_mask_classify_gradients_come_from_eager(backend):
    """The fused mask_classify kernels are forward only: asked for by name with inputs that require grad they
    refuse clearly; under auto the eager path runs and its second order is eager's."""
    inputs, loss_fn = _mc_case()
    with segvit.ops.use_backend(backend), pytest.raises(RuntimeError, match="forward only: inputs require grad"):
        loss_fn(*inputs)
    ref_first, ref_second = _second_order(inputs, loss_fn, "eager")
    first, second = _second_order(inputs, loss_fn, "auto")
    for ours, theirs in zip(first + second, ref_first + ref_second):
        _assert_close(ours, theirs)


@pytest.mark.parametrize("backend", FUSED)
def test_second_order_with_dropout_is_a_clear_error(backend):
    q, k, v = _leaves((1, 3, 2, 4), (1, 5, 2, 4), (1, 5, 2, 4))
    with segvit.ops.use_backend(backend):
        out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=0.3)
    with pytest.raises(RuntimeError, match=r"segvit.ops.atm_attention: second-order gradients .*dropout_p=0.3.*"
                                           r"use_backend\('eager'\)"):
        torch.autograd.grad(out.sum() + sim.sum(), q, create_graph=True)
    # First order with dropout still runs the fused backward.
    with segvit.ops.use_backend(backend):
        out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=0.3)
    (out.sum() + sim.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", FUSED)
def test_first_order_retain_graph_and_twice(backend):
    """The fused graph behind the second-order node follows the outer retain_graph: a second backward works
    with it and is a clear error without it."""
    (q, k, v), loss_fn = _atm_case()
    with segvit.ops.use_backend(backend):
        loss = loss_fn(q, k, v)
    loss.backward(retain_graph=True)
    first = q.grad.clone()
    loss.backward()
    torch.testing.assert_close(q.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


# ---- NaN and inf --------------------------------------------------------------------------------------------

def _assert_same_special_values(name, actual, expected):
    """Same NaN positions, same +-inf positions and signs, finite values close (float32 tolerance)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, name
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{name}: NaN at {actual.isnan().nonzero()[:5].tolist()}, eager at {expected.isnan().nonzero()[:5].tolist()}")
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{name}: +inf positions differ from eager"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{name}: -inf positions differ from eager"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5)


def _run(backend, fn, *args, **kwargs):
    with segvit.ops.use_backend(backend):
        return fn(*args, **kwargs)


def _atm_special_cases():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 37, 2, 4), torch.randn(2, 37, 2, 4)
    cases = {}
    # Query (b 0, i 1) of head 0 scores -inf against every key: an all -inf softmax row (eager: NaN output row).
    qa, ka = q.clone(), k.abs() + 0.1
    qa[0, 1, 0] = -INF
    cases["all_neg_inf_row"] = (qa, ka, v)
    qi = q.clone()
    qi[1, 2, 1, 3] = INF
    cases["q_inf"] = (qi, k, v)
    qn = q.clone()
    qn[0, 4, 0, 0] = NAN
    cases["q_nan"] = (qn, k, v)
    ki = k.clone()
    ki[1, 30, 0, 2] = -INF
    cases["k_neg_inf"] = (qi, ki, v)
    vi = v.clone()
    vi[0, 3, 1, 1] = INF
    vi[1, 5, 0, 0] = NAN
    cases["v_inf_nan"] = (q, k, vi)
    return cases


ATM_SPECIAL = _atm_special_cases()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", sorted(ATM_SPECIAL))
def test_atm_attention_special_values_as_eager(backend, case):
    q, k, v = ATM_SPECIAL[case]
    expected = _run("eager", segvit.ops.atm_attention, q, k, v)
    actual = _run(backend, segvit.ops.atm_attention, q, k, v)
    for name, ours, theirs in zip(("out", "sim"), actual, expected):
        _assert_same_special_values(f"{case} {name}", ours, theirs)


@pytest.mark.parametrize("backend", FUSED)
def test_atm_attention_all_neg_inf_row_gradients_as_eager(backend):
    q, k, v = (t.clone().requires_grad_() for t in ATM_SPECIAL["all_neg_inf_row"])
    grads = {}
    for name in ("eager", backend):
        out, sim = _run(name, segvit.ops.atm_attention, q, k, v)
        grads[name] = torch.autograd.grad(out.nan_to_num().sum() + sim.nan_to_num().sum(), (q, k, v))
    for name, ours, theirs in zip("qkv", grads[backend], grads["eager"]):
        _assert_same_special_values(f"d{name}", ours, theirs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_query_pool_attention_special_values_as_eager(backend, value):
    x, w, b = torch.randn(1, 30, 8), torch.randn(24, 8) * 0.3, torch.randn(24)
    x[0, 7, 3] = value
    expected = _run("eager", segvit.ops.query_pool_attention, x, (5, 6), w, b, 2)
    _assert_same_special_values("out", _run(backend, segvit.ops.query_pool_attention, x, (5, 6), w, b, 2), expected)


def _logits_with(value, where):
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 4, 5) * 2
    for index in where:
        logits[index] = value
    return logits


# Interior and border cells (a border cell's neighbour has a zero weight at some output pixels); (4, 5) -> (8, 10)
# and -> (4, 5) (the in == out copy of ATen).
ML_WHERE = {"interior": [(0, 1, 2, 3)], "border": [(0, 0, 0, 0), (1, 2, 3, 4)], "row_end": [(1, 1, 1, 4)]}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", sorted(ML_WHERE))
@pytest.mark.parametrize("label_size", [(8, 10), (4, 5), (6, 7)])
def test_mask_losses_special_values_as_eager(backend, value, where, label_size):
    logits = _logits_with(value, ML_WHERE[where])
    labels = torch.randint(0, 3, (2, *label_size))
    labels[0, 0, :3] = 0
    labels[0, 1, :3] = 1
    expected = _run("eager", segvit.ops.mask_losses, logits, labels)
    actual = _run(backend, segvit.ops.mask_losses, logits, labels)
    for name, ours, theirs in zip(("focal", "dice"), actual[:2], expected[:2]):
        _assert_same_special_values(name, ours, theirs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("operand", ["class_logits", "mask_logits"])
def test_mask_classify_special_values_as_eager(backend, value, operand):
    torch.manual_seed(6)
    cls, masks = torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5)
    if operand == "class_logits":
        cls[0, 1, 2] = value
    else:
        masks[0, 1, 2, 3] = value
        masks[0, 2, 0, 0] = value
    expected = _run("eager", segvit.ops.mask_classify, cls, masks, (8, 10))
    _assert_same_special_values("scores", _run(backend, segvit.ops.mask_classify, cls, masks, (8, 10)), expected)


_FAST_EXP_PROGRAM = r"""
#include "common/fast_exp.h"
#include <cmath>
#include <cstdio>
#include <limits>
int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const float xs[] = {-inf, inf, NAN, -1e30f, -100.f, -87.5f, -87.f, -20.f, 0.f, 20.f, 88.f, 88.8f, 1e30f};
  for (float x : xs) std::printf("%a %a\n", x, segvit::fast_exp(x));
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_fast_exp_ieee_ends(tmp_path):
    """csrc/common/fast_exp.h: exp(-inf) = 0 (so an all -inf softmax row sums to 0), exp(NaN) = NaN,
    exp(inf) = inf, 0 below the normal range, and ~1 ulp inside it."""
    import pathlib

    src = tmp_path / "fast_exp.cpp"
    src.write_text(_FAST_EXP_PROGRAM)
    csrc = pathlib.Path(segvit.__file__).resolve().parent.parent / "csrc"
    exe = tmp_path / "fast_exp"
    subprocess.run(["g++", "-O2", "-fno-trapping-math", f"-I{csrc}", str(src), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    got = [float.fromhex(line.split()[1]) for line in lines if line]
    neg_inf, inf, nan, neg_huge, m100, m875, m87, m20, zero, p20, p88, p888, huge = got
    assert neg_inf == 0.0 and neg_huge == 0.0 and m100 == 0.0 and m875 == 0.0
    assert inf == INF and huge == INF and p888 == INF
    assert math.isnan(nan)
    for x, y in ((-87.0, m87), (-20.0, m20), (0.0, zero), (20.0, p20), (88.0, p88)):
        assert y == pytest.approx(math.exp(x), rel=3e-7)


# ---- integer arguments and loss parameters ------------------------------------------------------------------

def _qp_inputs():
    return torch.randn(1, 12, 8), torch.randn(24, 8), torch.randn(24)


@pytest.mark.parametrize("backend", ["eager", *FUSED])
@pytest.mark.parametrize("call,exc,match", [
    (lambda: segvit.ops.query_pool_attention(_qp_inputs()[0], (3.0, 4), *_qp_inputs()[1:], 2), TypeError, "grid"),
    (lambda: segvit.ops.query_pool_attention(torch.randn(1, 12, 8), (2.5, 4.8), *_qp_inputs()[1:], 2), TypeError,
     "grid"),
    (lambda: segvit.ops.query_pool_attention(_qp_inputs()[0], (True, 12), *_qp_inputs()[1:], 2), TypeError, "grid"),
    (lambda: segvit.ops.query_pool_attention(*_qp_inputs()[:1], (3, 4), *_qp_inputs()[1:], True), TypeError,
     "num_heads"),
    (lambda: segvit.ops.query_pool_attention(*_qp_inputs()[:1], (3, 4), *_qp_inputs()[1:], 2.0), TypeError,
     "num_heads"),
    (lambda: segvit.ops.query_pool_attention(*_qp_inputs()[:1], (3, 4), *_qp_inputs()[1:], 0), ValueError,
     "num_heads"),
    (lambda: segvit.ops.query_pool_attention(*_qp_inputs()[:1], (3, 4), *_qp_inputs()[1:], 2, stride=2.0),
     TypeError, "stride"),
    (lambda: segvit.ops.query_pool_attention(*_qp_inputs()[:1], (3, 4), *_qp_inputs()[1:], 2, stride=True),
     TypeError, "stride"),
    (lambda: segvit.ops.mask_classify(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5), (9.7, 9)), TypeError,
     "out_size"),
    (lambda: segvit.ops.mask_classify(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5), (8.0, 9)), TypeError,
     "out_size"),
    (lambda: segvit.ops.mask_classify(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5), (True, 9)), TypeError,
     "out_size"),
    (lambda: segvit.ops.mask_classify(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5), 8), TypeError, "out_size"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    ignore_index=255.0), TypeError, "ignore_index"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    alpha=NAN), ValueError, "alpha"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    alpha=1.5), ValueError, "alpha"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    alpha=-INF), ValueError, "alpha"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    gamma=-1.0), ValueError, "gamma"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    gamma=INF), ValueError, "gamma"),
    (lambda: segvit.ops.mask_losses(torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 4, dtype=torch.long),
                                    gamma=NAN), ValueError, "gamma"),
])
def test_argument_checks_are_the_same_on_every_backend(backend, call, exc, match):
    with segvit.ops.use_backend(backend), pytest.raises(exc, match=match):
        call()


def test_integral_types_are_accepted():
    import numpy as np

    x, w, b = _qp_inputs()
    ref = segvit.ops.query_pool_attention(x, (3, 4), w, b, 2)
    torch.testing.assert_close(segvit.ops.query_pool_attention(x, (np.int64(3), np.int32(4)), w, b, np.int64(2),
                                                               stride=np.int64(2)), ref)
    scores = segvit.ops.mask_classify(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 5), [np.int64(8), 9])
    assert scores.shape == (1, 3, 8, 9)


def test_negative_alpha_disables_the_weighting():
    """The documented domain: alpha in [0, 1], or negative for no class weighting (the original's alpha = -1)."""
    logits, labels = torch.randn(1, 3, 4, 5), torch.randint(0, 3, (1, 8, 10))
    for alpha in (-1.0, -0.5):
        focal = segvit.ops.mask_losses(logits, labels, alpha=alpha)[0]
        torch.testing.assert_close(focal, 2 * segvit.ops.mask_losses(logits, labels, alpha=0.5)[0])
    for alpha in (0.0, 1.0, 1):
        segvit.ops.mask_losses(logits, labels, alpha=alpha, gamma=0)


@pytest.mark.parametrize("kwargs,match", [({"focal_alpha": NAN}, "focal_alpha"), ({"focal_alpha": 2.0}, "focal_alpha"),
                                          ({"focal_gamma": -0.5}, "focal_gamma"),
                                          ({"focal_gamma": INF}, "focal_gamma")])
def test_loss_checks_focal_parameters_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segvit.SegViTLoss(5, **kwargs)


# ---- model configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
@pytest.mark.parametrize("part,key,value,match", [
    ("backbone", "num_heads", 3, r"model.backbone.num_heads: expected a positive int dividing embed_dims=32, got 3"),
    ("backbone", "num_heads", True, r"model.backbone.num_heads"),
    ("backbone", "num_heads", 0, r"model.backbone.num_heads"),
    ("backbone", "embed_dims", 0, r"model.backbone.embed_dims"),
    ("backbone", "num_layers", 0, r"model.backbone.num_layers"),
    ("backbone", "patch_size", 0, r"model.backbone.patch_size"),
    ("backbone", "patch_size", 128, r"model.backbone.img_size: expected at least patch_size=128"),
    ("backbone", "img_size", [64, 0], r"model.backbone.img_size"),
    ("backbone", "img_size", [64.0, 64], r"model.backbone.img_size"),
    ("backbone", "img_size", 64.0, r"model.backbone.img_size: expected an int or a pair of ints, got 64.0"),
    ("backbone", "img_size", [64, 64, 3], r"model.backbone.img_size: expected an int or a pair of ints"),
    ("backbone", "mlp_ratio", 0, r"model.backbone.mlp_ratio"),
    ("backbone", "drop_path_rate", 1.5, r"model.backbone.drop_path_rate"),
    ("backbone", "drop_rate", -0.1, r"model.backbone.drop_rate"),
    ("backbone", "out_indices", [1, 9], r"model.backbone.out_indices: expected block indices in \[-4, 4\)"),
    ("backbone", "interpolate_mode", "nearest", r"model.backbone.interpolate_mode"),
    ("decode_head", "num_heads", 3, r"model.decode_head.num_heads: expected a positive int dividing embed_dims=16"),
    ("decode_head", "num_heads", 2.0, r"model.decode_head.num_heads"),
    ("decode_head", "num_classes", 0, r"model.decode_head.num_classes"),
    ("decode_head", "num_layers", 0, r"model.decode_head.num_layers"),
    ("decode_head", "embed_dims", 0, r"model.decode_head.embed_dims"),
    ("decode_head", "img_size", 0, r"model.decode_head.img_size"),
])
def test_model_config_validated_at_build(make_config, head, part, key, value, match):
    cfg = make_config(head=head)
    cfg[part][key] = value
    if key == "num_classes":
        cfg[part]["loss_decode"][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        segvit.build_model(cfg)


def test_model_config_head_dim_and_shrink_checks(make_config):
    cfg = make_config()
    cfg["decode_head"].update(embed_dims=512, num_heads=2)
    with pytest.raises(ValueError, match=r"model.decode_head.num_heads: head dim .* = 256 exceeds 128"):
        segvit.build_model(cfg)
    cfg = make_config(head="TPNATMHead")
    cfg["decode_head"]["shrink_ratio"] = 128
    with pytest.raises(ValueError, match=r"model.decode_head.shrink_ratio: expected at most img_size=64"):
        segvit.build_model(cfg)
    cfg = make_config(head="TPNATMHead")
    cfg["backbone"]["shrink_idx"] = 7
    with pytest.raises(ValueError, match=r"model.backbone.shrink_idx: expected a block index in \[0, 4\)"):
        segvit.build_model(cfg)
    cfg = make_config()
    cfg["decode_head"]["use_proj"] = False
    with pytest.raises(ValueError, match=r"model.decode_head.embed_dims: expected in_channels=32 with use_proj=False"):
        segvit.build_model(cfg)
