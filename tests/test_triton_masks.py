"""Triton kernels of ``mask_classify`` and ``mask_losses`` against the float64 references of segvit.ops.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors; with a GPU the same
tests run on CUDA (``pytest -m gpu``), where bfloat16 is tested too (the triton 3.8 interpreter computes bfloat16
``tl.dot`` and reductions wrongly, upstream issues 11584 and 11604).

Tolerances, against float64:
- float32: mask_classify atol = rtol = 5e-6 (worst seen ~1e-6: a few roundings of values <= Q); mask_losses
  losses rtol 1e-5 and gradients atol 1e-6 + rtol 1e-4 (float32 sums over up to ~600 pixels per tile).
- float16 / bfloat16: the kernel's error at most 2x the error of eager PyTorch computing the same thing in that dtype,
  plus a floor (flash-attention's rule, ``helpers.assert_within_eager``).
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import segvit
from helpers import CUDA, TRITON_DTYPES, assert_close, assert_within_eager, float64_leaves, run_with_grads
from helpers import poison_triton_outputs  # noqa: F401  (a fixture: pytest finds it in this module's namespace)

triton = pytest.importorskip("triton")
mc_ops = importlib.import_module("segvit.ops.mask_classify")
ml_ops = importlib.import_module("segvit.ops.mask_losses")
from segvit.kernels import mask_classify as mc_kernels  # noqa: E402

if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

# Every launcher allocates the buffers its kernel writes filled with NaN.
pytestmark = pytest.mark.usefixtures("poison_triton_outputs")
# The same tests on the device the kernels run on here: CUDA with a GPU (marked gpu), else the interpreter on CPU.
DEVICE = pytest.param("cuda", marks=pytest.mark.gpu) if CUDA else "cpu"
F32_TOL = 5e-6
HALF_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---------------------------------------------------------------------------------------------------- mask_classify
# (B, Q, K, h, w, Hout, Wout): ragged Q/K/pixel tiles, Q and K above one block (16 under the interpreter), 1x1
# grid, downsampling, identity size, a single output row/column.
MC_SHAPES = [
    (2, 7, 5, 5, 7, 33, 17),
    (1, 19, 17, 6, 4, 9, 13),
    (1, 3, 2, 1, 1, 5, 9),
    (1, 4, 6, 9, 11, 4, 5),
    (2, 5, 3, 8, 6, 8, 6),
    (1, 6, 4, 4, 3, 1, 50),
]


def mc_inputs(B, Q, K, h, w, dtype, device):
    return ((torch.randn(B, Q, K + 1) * 3).to(dtype).to(device),
            (torch.randn(B, Q, h, w) * 3).to(dtype).to(device))


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", MC_SHAPES, ids=lambda s: "B{}Q{}K{}_{}x{}to{}x{}".format(*s))
def test_mask_classify_matches_reference(shape, dtype, device):
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = mc_inputs(B, Q, K, h, w, dtype, device)
    out = mc_kernels.mask_classify(class_logits, mask_logits, (Hout, Wout))
    assert out.shape == (B, K, Hout, Wout) and out.dtype == dtype and out.device == class_logits.device
    expected = mc_ops.reference(class_logits.cpu(), mask_logits.cpu(), (Hout, Wout))
    assert torch.isfinite(out).all(), "output not fully written (NaN poison left)"
    if dtype == torch.float32:
        assert_close(out, expected, F32_TOL, F32_TOL)
    else:
        eager = mc_ops.eager(class_logits, mask_logits, (Hout, Wout))
        assert_within_eager("out", out, eager, expected, HALF_FLOOR[dtype])


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 5, 40, 3, 4, 13, 37), (2, 3, 7, 9, 11, 4, 5), (1, 4, 6, 5, 7, 5, 7)],
                         ids=["K40_superTiles", "down", "same"])
@pytest.mark.parametrize("gather", [False, True], ids=["matrix", "gather"])
def test_mask_classify_paths(shape, dtype, gather, device, monkeypatch):
    # Class super-tiles (K above the two accumulators), and half logits on both interpolation paths: the weight
    # matrix (FOOT <= FOOT_MAX) and the four gathers (FOOT_MAX = 0 forces them; float32 always gathers).
    if gather:
        monkeypatch.setattr(mc_kernels, "FOOT_MAX", 0)
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = mc_inputs(B, Q, K, h, w, dtype, device)
    out = mc_kernels.mask_classify(class_logits, mask_logits, (Hout, Wout))
    expected = mc_ops.reference(class_logits.cpu(), mask_logits.cpu(), (Hout, Wout))
    assert torch.isfinite(out).all(), "output not fully written (NaN poison left)"
    if dtype == torch.float32:
        assert_close(out, expected, F32_TOL, F32_TOL)
    else:
        assert_within_eager("out", out, mc_ops.eager(class_logits, mask_logits, (Hout, Wout)), expected,
                            HALF_FLOOR[dtype])


def test_mask_classify_tiling_rules():
    # Published class counts: 150 -> 128 + 32, 171 -> 128 + 64, 60 -> 64 (one program covers all classes).
    assert [mc_kernels.class_tiles(k, 128) for k in (150, 171, 60, 300)] == [(128, 32), (128, 64), (64, 0),
                                                                           (128, 128)]
    # 16x upsampling needs at most 11 source columns per 128-pixel chunk; in == out needs the chunk itself.
    assert [mc_kernels.footprint(n, 16 * n, 128) for n in (40, 32, 30)] == [16, 16, 16]
    assert mc_kernels.footprint(640, 640, 128) == 128 and mc_kernels.footprint(7, 5, 16) == 16
    # The lo half of the split weights is skipped only where every weight is exact (power-of-2 upsampling).
    assert [mc_kernels.exact_weights(w, W) for w, W in ((40, 640), (30, 480), (6, 6), (4, 12), (5, 7))] == [
        True, True, True, False, False]


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_classify_interpolation_matches_f_interpolate(device):
    # One query, K = 1 with the two class logits equal: P = 1/2 exactly, so out = sigmoid(interpolate(m)) / 2 and
    # the comparison isolates the source-index rule (a wrong tap moves values by far more than 1e-6).
    mask_logits = (torch.randn(1, 1, 7, 5) * 4).to(device)
    class_logits = torch.zeros(1, 1, 2, device=device)
    for size in [(23, 11), (7, 5), (3, 2), (64, 1)]:
        out = mc_kernels.mask_classify(class_logits, mask_logits, size)
        expected = torch.sigmoid(F.interpolate(mask_logits, size, mode="bilinear", align_corners=False)) / 2
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_classify_dispatch_and_non_contiguous_inputs(device):
    class_logits, mask_logits = mc_inputs(2, 5, 4, 7, 6, torch.float32, device)
    cls_t = class_logits.transpose(0, 1).contiguous().transpose(0, 1)
    masks_t = mask_logits.transpose(2, 3).contiguous().transpose(2, 3)
    with segvit.ops.use_backend("triton"):
        out = segvit.ops.mask_classify(cls_t, masks_t, (13, 11))
    assert_close(out, mc_ops.reference(class_logits.cpu(), mask_logits.cpu(), (13, 11)), F32_TOL, F32_TOL)


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_classify_reasons(device):
    class_logits, mask_logits = mc_inputs(1, 3, 2, 4, 4, torch.float32, device)
    assert mc_ops._OP.why_not("triton", class_logits, mask_logits, (5, 5)) == []
    grad = mc_ops._OP.why_not("triton", class_logits.requires_grad_(), mask_logits, (5, 5))
    assert len(grad) == 1 and grad[0].startswith("forward only")
    with torch.no_grad():
        assert mc_ops._OP.why_not("triton", class_logits, mask_logits, (5, 5)) == []
    wrong = mc_ops._OP.why_not("triton", class_logits.detach().double(), mask_logits.double(), (5, 5))
    assert any("float64" in r for r in wrong)
    if not CUDA:
        assert any("bfloat16" in r for r in mc_ops._OP.why_not("triton", class_logits.detach().bfloat16(),
                                                               mask_logits.bfloat16(), (5, 5)))


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_classify_opcheck_and_compile(device):
    class_logits, mask_logits = mc_inputs(2, 4, 3, 5, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.segvit.triton_mask_classify.default, (class_logits, mask_logits, [11, 7]))
    compiled = torch.compile(lambda c, m: torch.ops.segvit.triton_mask_classify(c, m, [11, 7]) * 2,
                             fullgraph=True, backend="eager")
    assert_close(compiled(class_logits, mask_logits) / 2,
                 mc_ops.reference(class_logits.cpu(), mask_logits.cpu(), (11, 7)), F32_TOL, F32_TOL)


# ------------------------------------------------------------------------------------------------------ mask_losses
from segvit.kernels import mask_losses as ml_kernels  # noqa: E402

# (B, K, h, w, Hl, Wl): ragged pixel tiles, downsampling, 1x1 logits, identity size, and a grid above one 16x16
# low-resolution block in both directions (several backward programs per pair, shared border pixels).
ML_SHAPES = [
    (2, 5, 5, 7, 33, 17),
    (1, 6, 9, 11, 4, 5),
    (2, 3, 1, 1, 7, 9),
    (1, 4, 6, 6, 6, 6),
    (1, 4, 18, 17, 37, 23),
]
ML_F32 = dict(loss_rtol=1e-5, loss_atol=1e-7, grad_rel=1e-5)  # grad: atol = grad_rel * max |reference grad|


def ml_inputs(B, K, h, w, Hl, Wl, dtype, device, all_ignored_image=None):
    logits = (torch.randn(B, K, h, w) * 2).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, max(K - 1, 1), (B, Hl, Wl))  # the last class is absent everywhere
    labels[torch.rand(B, Hl, Wl) < 0.2] = 255
    if all_ignored_image is not None:
        labels[all_ignored_image] = 255
    return logits, labels.to(device)


def ml_run(fn, logits, labels, g_focal, g_dice, **kw):
    """[loss_focal, loss_dice, num_masks, d(g_focal loss_focal + g_dice loss_dice) / d logits]."""
    return run_with_grads(lambda x: fn(x, labels, **kw), (logits,), (g_focal, g_dice, None))


def ml_reference(logits, labels, g_focal, g_dice, **kw):
    return ml_run(ml_ops.reference, *float64_leaves(logits), labels.cpu(), g_focal, g_dice, **kw)


def ml_check(logits, labels, dtype, **kw):
    g_focal, g_dice = torch.randn(()), torch.randn(())
    out = ml_run(ml_kernels.mask_losses, logits, labels, g_focal, g_dice, **kw)
    ref = ml_reference(logits, labels, g_focal, g_dice, **kw)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.int64 and out[3].dtype == dtype
    assert out[2].item() == ref[2].item()
    grad = out[3]
    assert torch.isfinite(grad).all(), "gradient not fully written (NaN poison left)"
    scale = ref[3].abs().max().item()
    if dtype == torch.float32:
        for name, ours, theirs in zip(("loss_focal", "loss_dice"), out[:2], ref[:2]):
            assert_close(ours, theirs, ML_F32["loss_atol"], ML_F32["loss_rtol"], name)
        assert_close(grad, ref[3], ML_F32["grad_rel"] * scale, 1e-4, "grad")
    else:
        eager = ml_run(ml_ops.eager, logits, labels, g_focal, g_dice, **kw)
        for name, ours, theirs, base in zip(("loss_focal", "loss_dice"), out[:2], ref[:2], eager[:2]):
            assert_within_eager(name, ours, base, theirs, 1e-5)
        assert_within_eager("grad", grad, eager[3], ref[3], 1e-3 * scale)
    return out


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", ML_SHAPES, ids=lambda s: "B{}K{}_{}x{}to{}x{}".format(*s))
def test_mask_losses_forward_backward_match_reference(shape, dtype, device):
    logits, labels = ml_inputs(*shape, dtype, device)
    ml_check(logits, labels, dtype)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("alpha, gamma", [(-1.0, 0.0), (0.6, 1.5), (0.25, 2.0)])
def test_mask_losses_alpha_gamma_and_all_ignored_image(alpha, gamma, device):
    logits, labels = ml_inputs(2, 5, 5, 7, 33, 17, torch.float32, device, all_ignored_image=1)
    _, _, num_masks, grad = ml_check(logits, labels, torch.float32, alpha=alpha, gamma=gamma)
    assert num_masks.item() == len(labels[0].unique()) - 1  # image 1 contributes no pair
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_all_ignored_batch(device):
    logits = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    labels = torch.full((2, 9, 7), 255, device=device)
    loss_focal, loss_dice, num_masks, grad = ml_run(ml_kernels.mask_losses, logits, labels, 1.0, 1.0)
    assert loss_focal.item() == 0 and loss_dice.item() == 0 and num_masks.item() == 1
    assert (grad == 0).all()


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_backward_is_deterministic(device):
    logits, labels = ml_inputs(1, 4, 18, 17, 37, 23, torch.float32, device)
    first = ml_run(ml_kernels.mask_losses, logits, labels, 0.7, 1.3)
    second = ml_run(ml_kernels.mask_losses, logits, labels, 0.7, 1.3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_dispatch_narrow_labels_non_contiguous_logits(device):
    logits, labels = ml_inputs(2, 5, 5, 7, 13, 11, torch.float32, device)
    labels = labels.to(torch.uint8)
    transposed = logits.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not transposed.is_contiguous()
    with segvit.ops.use_backend("triton"):
        out = ml_run(segvit.ops.mask_losses, transposed, labels, 1.0, 1.0)
    ref = ml_reference(logits, labels, 1.0, 1.0)
    for ours, theirs in zip(out[:2], ref[:2]):
        assert_close(ours, theirs, ML_F32["loss_atol"], ML_F32["loss_rtol"])
    assert_close(out[3], ref[3], ML_F32["grad_rel"] * ref[3].abs().max().item(), 1e-4)


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_reasons(device):
    logits, labels = ml_inputs(1, 3, 4, 4, 5, 5, torch.float32, device)
    assert ml_ops._OP.why_not("triton", logits, labels, ignore_index=255, alpha=0.25, gamma=2.0) == []
    assert any("float64" in r for r in ml_ops._OP.why_not("triton", logits.double(), labels))
    if not CUDA:
        assert any("bfloat16" in r for r in ml_ops._OP.why_not("triton", logits.bfloat16(), labels))


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_opcheck_and_compile(device):
    logits, labels = ml_inputs(2, 4, 5, 6, 11, 7, torch.float32, device)
    torch.library.opcheck(torch.ops.segvit.triton_mask_losses.default, (logits, labels, 255, 0.25, 2.0))
    _, _, num_masks, stats = torch.ops.segvit.triton_mask_losses(logits.detach(), labels, 255, 0.25, 2.0)
    grads = (torch.tensor(0.5, device=device), torch.tensor(-1.5, device=device))
    torch.library.opcheck(torch.ops.segvit.triton_mask_losses_backward.default,
                          (*grads, logits.detach(), labels, stats, num_masks, 0.25, 2.0))

    def loss(x, y):
        focal, dice, _, _ = torch.ops.segvit.triton_mask_losses(x, y, 255, 0.25, 2.0)
        return focal + 2 * dice

    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    ours, grad = run_with_grads(lambda x: compiled(x, labels), (logits,), (1.0,))
    ref = ml_reference(logits, labels, 1.0, 2.0)
    assert_close(ours, ref[0] + 2 * ref[1], 1e-6, 1e-5)
    assert_close(grad, ref[3], ML_F32["grad_rel"] * ref[3].abs().max().item(), 1e-4)


# New paths of the launch-synchronisation-free kernels: constexpr gammas (0, 1, 2 and the general exp2 path),
# an all-absent image next to a present one, ignore-only labels, odd and in == out sizes, downsampling, several
# owned blocks per pair (persistent grid striding over work items).
@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.7])
@pytest.mark.parametrize("shape", [(2, 4, 7, 5, 31, 19), (1, 3, 13, 9, 13, 9), (1, 5, 35, 3, 17, 41)],
                         ids=lambda s: "B{}K{}_{}x{}to{}x{}".format(*s))
def test_mask_losses_gammas_sizes(shape, gamma, device):
    logits, labels = ml_inputs(*shape, torch.float32, device)
    ml_check(logits, labels, torch.float32, gamma=gamma, alpha=0.3)


@pytest.mark.parametrize("device", [DEVICE])
def test_mask_losses_ignore_only_and_absent_image(device):
    logits = torch.randn(3, 4, 6, 5, device=device, requires_grad=True)
    labels = torch.full((3, 23, 17), 255, device=device)
    labels[1, :5] = 2  # only image 1 has a class
    labels[1, 5:9] = 0
    out = ml_check(logits, labels, torch.float32)
    assert out[2].item() == 2 and (out[3][0] == 0).all() and (out[3][2] == 0).all()
    assert (out[3][1, [1, 3]] == 0).all()


def test_mask_losses_owned_block_and_ranges():
    # the host's owned-block choice at 16x fits the footprint in whole tiles; any choice stays within the block
    assert ml_kernels._owned_block(40, 640, 16, 64) in (14, 15)
    assert ml_kernels._owned_block(9, 9, 16, 64) == 9
    for in_size, out_size in [(40, 640), (32, 512), (30, 480), (9, 4), (1, 7), (21, 150)]:
        assert 1 <= ml_kernels._owned_block(in_size, out_size, 16, 32) <= 16


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_mask_losses_class_counts_match_bincount(label_dtype, device):
    # several histogram tiles per image (the interpreter's block is 64 pixels), a ragged last tile, ignore_index,
    # negative and too-large labels all counted in the last column
    B, K, H, W = 3, 7, 13, 11
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(-2, K + 3, (B, H, W), generator=g)
    labels[labels == K + 2] = 255
    labels = labels.to(label_dtype).to(device)
    counts = ml_kernels._class_counts(labels, K, 255)
    flat = labels.long().reshape(B, -1).cpu()
    flat = torch.where((flat < 0) | (flat >= K), K, flat)
    expected = torch.stack([torch.bincount(row, minlength=K + 1) for row in flat]).to(torch.int32)
    assert counts.dtype == torch.int32 and torch.equal(counts.cpu(), expected)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("B, K", [(1, 1), (3, 7), (5, 13)])  # B K from below one block (16 here) to several
@pytest.mark.parametrize("source", ["counts", "stats"])
def test_mask_losses_compaction_matches_reference(B, K, source, device, poison_triton_outputs):
    g = torch.Generator().manual_seed(B * 100 + K)
    hits = torch.rand(B, K, generator=g) < 0.4
    if source == "counts":  # int32 class counts, the (B, K + 1) table's first K columns (row stride K + 1)
        table = torch.where(hits, torch.randint(1, 50, (B, K), generator=g), 0).to(torch.int32)
        present = torch.cat([table, torch.zeros(B, 1, dtype=torch.int32)], 1).to(device)[:, :K]
    else:  # float T column of the (B, K, 4) stats (strides 4 K, 4)
        stats = torch.rand(B, K, 4, generator=g)
        stats[..., 3] = torch.where(hits, stats[..., 3] + 1.0, 0.0)
        present = stats.to(device)[..., 3]
    order, starts = ml_kernels._compact(present)
    flat = hits.reshape(-1)
    expected_order = torch.cat([torch.nonzero(flat).flatten(), torch.nonzero(~flat).flatten()]).to(torch.int32)
    expected_starts = torch.cat([torch.zeros(1, dtype=torch.int64), hits.sum(1).cumsum(0)]).to(torch.int32)
    assert torch.equal(order.cpu(), expected_order)
    assert torch.equal(starts.cpu(), expected_starts)
