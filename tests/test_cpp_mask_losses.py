"""The C++ CPU kernels of ``segvit.ops.mask_losses`` (csrc/cpu/mask_losses.cpp) against the float64 reference."""
import importlib

import pytest
import torch

import segvit
from helpers import assert_close, assert_within_eager, run_with_grads, torch_threads
from helpers import num_threads  # noqa: F401  (a fixture: pytest finds it in this module's namespace)
from segvit import _extension

ml = importlib.import_module("segvit.ops.mask_losses")

_AVAILABLE, _REASON = _extension.status()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_REASON)

# float32: the worst observed error / (atol + rtol |ref|) over 20 seeds of these shapes is 0.07 for the losses and 0.19
# for the gradients (atol scaled by the largest reference gradient); bfloat16 (below): 0.17 and 0.43 of its bound.
F32 = dict(rtol=2e-5, atol=1e-6)
F32_GRAD = dict(rtol=1e-4, atol=1e-5)  # atol relative to max |reference gradient|
# bfloat16: error against the float64 reference at most 2x that of eager bfloat16 (which, like the kernel, computes in
# float32 from the bfloat16 logits), plus a floor for cases where eager happens to be almost exact.
BF16_FLOOR = 1e-5
BF16_GRAD_FLOOR = 1e-3  # relative to max |reference gradient|; bfloat16 gradients carry 8 bits

# (B, K, h, w, Hl, Wl): upsampling to odd sizes, 1x1 logits, labels at the logits' size, downsampling, label images
# split into several row blocks (16384 label pixels per block: 301x67 -> 2 ragged blocks, 3x6000 -> one row each).
SHAPES = [
    (2, 5, 3, 4, 13, 11),
    (1, 3, 1, 1, 7, 5),
    (2, 4, 6, 5, 6, 5),
    (1, 6, 9, 11, 4, 5),
    (1, 3, 5, 7, 301, 67),
    (1, 2, 2, 3, 3, 6000),
]
SHAPE_IDS = ["B{}K{}_{}x{}to{}x{}".format(*s) for s in SHAPES]


def make_inputs(B, K, h, w, Hl, Wl, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(B, K, h, w, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, K, (B, Hl, Wl))
    labels[labels == K - 1] = 255  # class K-1 absent everywhere; its pixels are ignored (negatives of every class)
    labels[:, 0, 0] = 255
    if B > 1:
        labels[-1] = 255  # an all-ignored image: no pairs from it
    return logits, labels


def run_cpp(logits, labels, **kwargs):
    with segvit.ops.use_backend("cpp"):
        return segvit.ops.mask_losses(logits, labels, **kwargs)


def forward_backward(fn, logits, labels, **kwargs):
    """[loss_focal, loss_dice, num_masks, d(0.7 loss_focal + 1.3 loss_dice) / d logits]."""
    leaf = logits.detach().clone().requires_grad_()
    return run_with_grads(lambda x: fn(x, labels, **kwargs), (leaf,), (0.7, 1.3, None))


def assert_grad_close(grad, ref):
    """F32_GRAD, its atol scaled by the largest reference gradient."""
    assert_close(grad, ref, F32_GRAD["atol"] * ref.abs().max().item(), F32_GRAD["rtol"], "grad")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float32_matches_float64_reference(shape, num_threads):
    logits, labels = make_inputs(*shape)
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels)
    ref_focal, ref_dice, ref_num, ref_grad = forward_backward(ml.reference, logits.double(), labels)
    assert focal.dtype == dice.dtype == torch.float32 and focal.shape == dice.shape == ()
    assert num.dtype == torch.int64 and num.shape == () and num.item() == ref_num.item()
    torch.testing.assert_close(focal.double(), ref_focal, **F32)
    torch.testing.assert_close(dice.double(), ref_dice, **F32)
    assert grad.dtype == torch.float32 and grad.shape == logits.shape and torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad)
    # Classes absent from an image get exactly zero gradient.
    absent = torch.ones(logits.shape[:2], dtype=torch.bool)
    for b in range(labels.shape[0]):
        for c in labels[b].unique().tolist():
            if c != 255:
                absent[b, c] = False
    assert (grad[absent] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bfloat16_error_within_2x_eager(shape, num_threads):
    logits, labels = make_inputs(*shape, dtype=torch.bfloat16)
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels)
    ref = forward_backward(ml.reference, logits.double(), labels)
    eager = forward_backward(ml.eager, logits, labels)
    assert grad.dtype == torch.bfloat16 and focal.dtype == torch.float32
    for name, mine, theirs, expected in zip(("loss_focal", "loss_dice"), (focal, dice), eager[:2], ref[:2]):
        assert_within_eager(name, mine, theirs, expected, BF16_FLOOR * expected.abs().item() + 1e-7)
    assert_within_eager("grad", grad, eager[3], ref[3], BF16_GRAD_FLOOR * ref[3].abs().max().item())


@pytest.mark.parametrize("kwargs", [dict(gamma=1.5, alpha=0.4), dict(alpha=-1.0), dict(gamma=0.0), dict(ignore_index=0)],
                         ids=["gamma1.5", "no_alpha", "gamma0", "ignore_index_is_a_class"])
def test_loss_parameters(kwargs):
    logits, labels = make_inputs(2, 4, 5, 3, 17, 9)
    if "ignore_index" in kwargs:
        labels[labels == 255] = kwargs["ignore_index"]
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels, **kwargs)
    ref_focal, ref_dice, ref_num, ref_grad = forward_backward(ml.reference, logits.double(), labels, **kwargs)
    assert num.item() == ref_num.item()
    torch.testing.assert_close(focal.double(), ref_focal, **F32)
    torch.testing.assert_close(dice.double(), ref_dice, **F32)
    assert_grad_close(grad, ref_grad)


def test_saturated_logits_stay_finite():
    # |logits| up to ~150: exp underflows and sigmoid saturates; the reference in float64 is still exact.
    logits, labels = make_inputs(1, 3, 4, 4, 19, 23, scale=50.0)
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels)
    ref_focal, ref_dice, _, ref_grad = forward_backward(ml.reference, logits.double(), labels)
    torch.testing.assert_close(focal.double(), ref_focal, **F32)
    torch.testing.assert_close(dice.double(), ref_dice, **F32)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad)


def test_no_present_class_gives_zero_losses_and_gradient():
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.full((2, 9, 7), 255)
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels)
    assert focal.item() == 0 and dice.item() == 0 and num.item() == 1
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_other_label_dtypes(dtype):
    logits, labels = make_inputs(2, 3, 3, 4, 10, 12)
    focal, dice, num, grad = forward_backward(run_cpp, logits, labels.to(dtype))
    ref = forward_backward(ml.reference, logits.double(), labels)
    torch.testing.assert_close(focal.double(), ref[0], **F32)
    assert_grad_close(grad, ref[3])


def test_deterministic_across_runs_and_thread_counts():
    logits, labels = make_inputs(2, 6, 7, 9, 301, 67)
    results = []
    for threads in (2, 2, 1):
        with torch_threads(threads):
            results.append(forward_backward(run_cpp, logits, labels))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_non_contiguous_logits():
    logits, labels = make_inputs(2, 4, 6, 5, 11, 13)
    strided = logits.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    mine = forward_backward(run_cpp, strided, labels)
    ref = forward_backward(ml.reference, logits.double(), labels)
    torch.testing.assert_close(mine[0].double(), ref[0], **F32)
    assert_grad_close(mine[3], ref[3])


def test_stats_values():
    # The op's own output: [sum focal, sum sigmoid*t, sum sigmoid, sum t] for present classes, zero rows otherwise.
    logits, labels = make_inputs(1, 3, 2, 3, 5, 4)
    stats = torch.ops.segvit.mask_loss_stats(logits, labels, 255, 0.25, 2.0)
    p = torch.nn.functional.interpolate(logits.double(), size=(5, 4), mode="bilinear", align_corners=False)[0]
    for c in range(3):
        t = (labels[0] == c).double()
        if t.sum() == 0:
            assert (stats[0, c] == 0).all()
            continue
        focal = ml.sigmoid_focal(p[c].flatten()[None], t.flatten()[None], 0.25, 2.0) * t.numel()
        expected = torch.stack([focal[0], (p[c].sigmoid() * t).sum(), p[c].sigmoid().sum(), t.sum()])
        torch.testing.assert_close(stats[0, c], expected, rtol=1e-5, atol=1e-6)


def test_opcheck():
    logits, labels = make_inputs(2, 4, 3, 5, 7, 6)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.segvit.mask_loss_stats.default, (logits, labels, 255, 0.25, 2.0))
    stats = torch.ops.segvit.mask_loss_stats(logits.detach(), labels, 255, 0.25, 2.0)
    torch.library.opcheck(torch.ops.segvit.mask_loss_stats_backward.default,
                          (torch.randn(2, 4, 4, dtype=torch.float64), logits.detach(), labels, stats, 255, 0.25, 2.0))


def test_compiles_with_torch_compile():
    logits, labels = make_inputs(1, 3, 3, 4, 9, 8)
    # The backend function (the public one validates label values, a data-dependent branch dynamo cannot trace).
    compiled = torch.compile(lambda x, y: ml._compiled(x, y)[:2], fullgraph=True, backend="aot_eager")
    focal, dice = compiled(logits, labels)
    ref = ml.reference(logits, labels)
    torch.testing.assert_close(focal.double(), ref[0], **F32)
    torch.testing.assert_close(dice.double(), ref[1], **F32)


_LOGITS, _LABELS = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 6, 6))


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (_LOGITS[0], _LABELS, r"mask_logits must be 4-D \(B, K, h, w\)"),
        (_LOGITS, _LABELS[0], r"labels must be 3-D \(B, Hl, Wl\)"),
        (_LOGITS.double(), _LABELS, r"mask_logits must be float32 or bfloat16, got Double"),
        (_LOGITS.half(), _LABELS, r"mask_logits must be float32 or bfloat16, got Half"),
        (_LOGITS, _LABELS.int(), r"labels must be int64, got Int"),
        (_LOGITS[:1], _LABELS, r"same batch size B"),
        (_LOGITS[..., :0], _LABELS, r"mask_logits must have a non-empty \(h, w\) grid"),
        (_LOGITS, _LABELS[:, :0], r"labels must have a non-empty \(Hl, Wl\) size"),
        (_LOGITS, torch.where(_LABELS == 1, 3, _LABELS), r"labels must hold values in \[0, 3\) or ignore_index=255, "
                                                          r"found 3"),
        (_LOGITS, torch.where(_LABELS == 1, -1, _LABELS), r"found -1"),
    ],
    ids=["logits_dims", "labels_dims", "float64", "float16", "int32_labels", "batch", "empty_grid", "empty_labels",
         "label_too_large", "label_negative"],
)
def test_invalid_inputs_raise_naming_the_argument(logits, labels, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.segvit.mask_loss_stats(logits, labels, 255, 0.25, 2.0)


def test_backward_op_checks_its_stats():
    stats = torch.zeros(2, 3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"grad_stats must have shape \(B, K, 4\) = \(2, 3, 4\)"):
        torch.ops.segvit.mask_loss_stats_backward(stats[:, :2], _LOGITS, _LABELS, stats, 255, 0.25, 2.0)
    with pytest.raises(RuntimeError, match=r"stats must be float64"):
        torch.ops.segvit.mask_loss_stats_backward(stats, _LOGITS, _LABELS, stats.float(), 255, 0.25, 2.0)


def test_cpp_backend_refuses_what_it_cannot_run():
    with segvit.ops.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="cpp takes float32 or bfloat16 mask_logits"):
            segvit.ops.mask_losses(_LOGITS.double(), _LABELS)
    with segvit.ops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
            segvit.ops.mask_losses(_LOGITS, _LABELS)
