"""The C++ CPU kernel of ``segvit::mask_classify`` (csrc/cpu/mask_classify.cpp) against the float64 reference."""
import importlib

import pytest
import torch

from helpers import assert_close, assert_within_eager, torch_threads
from helpers import num_threads  # noqa: F401  (a fixture: pytest finds it in this module's namespace)
from segvit import _extension

mc_ops = importlib.import_module("segvit.ops.mask_classify")

_AVAILABLE, _REASON = _extension.status()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_REASON)

# float32: worst observed |err| / (1e-6 + 1e-6 |ref|) is ~1.6 over 30 seeds of these shapes (and Q=20, K=30 to 200x150).
F32_ATOL = F32_RTOL = 5e-6
# bfloat16: the kernel's max error may be at most 2x that of eager bfloat16 computing the same thing (interpolate,
# sigmoid, einsum in bfloat16), plus a floor for cases where eager happens to be almost exact.
BF16_FLOOR = 1e-4

# (B, Q, K, h, w, Hout, Wout): odd sizes, Q != K, 1x1 grids, downsampling, identity size, rows not a block multiple.
SHAPES = [
    (2, 7, 5, 5, 7, 33, 17),
    (1, 13, 13, 6, 6, 96, 96),
    (1, 3, 2, 1, 1, 5, 9),
    (1, 4, 6, 9, 11, 4, 5),
    (2, 5, 3, 8, 6, 8, 6),
    (1, 1, 1, 3, 1, 7, 1),
    (3, 9, 4, 4, 3, 1, 50),
    (1, 6, 19, 10, 10, 160, 23),
]


mask_classify = mc_ops._cpp  # the extension op itself: no dispatch, no Python-side validation


def inputs(B, Q, K, h, w, dtype=torch.float32):
    return (torch.randn(B, Q, K + 1) * 3).to(dtype), (torch.randn(B, Q, h, w) * 3).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Q{}K{}_{}x{}to{}x{}".format(*s))
def test_float32_matches_float64_reference(shape, num_threads):
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = inputs(B, Q, K, h, w)
    out = mask_classify(class_logits, mask_logits, (Hout, Wout))
    assert out.shape == (B, K, Hout, Wout) and out.dtype == torch.float32 and out.is_contiguous()
    # The reference is strictly positive (softmax and sigmoid are), so a pixel the kernel never wrote shows up.
    assert (out > 0).all(), "output not fully written"
    assert_close(out, mc_ops.reference(class_logits, mask_logits, (Hout, Wout)), F32_ATOL, F32_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Q{}K{}_{}x{}to{}x{}".format(*s))
def test_bfloat16_error_within_2x_eager(shape, num_threads):
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = inputs(B, Q, K, h, w, torch.bfloat16)
    expected = mc_ops.reference(class_logits, mask_logits, (Hout, Wout))
    out = mask_classify(class_logits, mask_logits, (Hout, Wout))
    assert out.shape == (B, K, Hout, Wout) and out.dtype == torch.bfloat16
    assert (out > 0).all(), "output not fully written"
    assert_within_eager("out", out, mc_ops.eager(class_logits, mask_logits, (Hout, Wout)), expected, BF16_FLOOR)


# The fused float32 paths (where the CPU has them) tile the work by 12 (a last panel: 6 or 12) classes x 32 pixels
# (AVX-512) or 6 classes x 16 pixels (AVX2) per micro-tile, 128 output columns and 32 output rows per task: K, Wout
# and Hout off those multiples, Wout above one chunk, Wout odd (no aligned streaming stores) and even (streaming), in
# == out sizes, and a published-like 16x upsampling.
TILING_SHAPES = [
    (1, 13, 17, 5, 9, 70, 301),
    (2, 8, 6, 7, 7, 7, 7),
    (1, 20, 11, 4, 5, 33, 144),
    (1, 9, 7, 3, 40, 97, 129),
    (1, 31, 25, 4, 4, 64, 64),
]


# Every float32 path of the kernel on this machine: the fused AVX-512 and AVX2 kernels and the generic one (ATen GEMM
# and sigmoid), each forced by SEGVIT_MASK_CLASSIFY_CPU_PATH, a cap the kernel reads on every call; TILING_SHAPES
# and more.
PATH_NAMES = {"avx512": "fused AVX-512 kernel", "avx2": "fused AVX2+FMA kernel", "generic": "generic path"}
PATH_FLAGS = {"avx512": {"avx512f", "avx512dq", "avx512bw", "avx512vl", "fma"}, "avx2": {"avx2", "fma"}, "generic": set()}
# Class counts around the AVX-512 panels (12; the rest in a 6-class panel when it fits, else a 12-class one): 11, 12,
# 13, 18, 19, 25, 59; Q below and above one panel of classes; Wout off the 32-pixel panels and the 128-column chunks.
PATH_SHAPES = TILING_SHAPES + [
    (1, 5, 11, 3, 4, 41, 47),
    (2, 12, 12, 4, 4, 32, 64),
    (1, 17, 13, 5, 3, 9, 150),
    (1, 3, 18, 2, 5, 19, 33),
    (1, 21, 19, 6, 6, 35, 96),
    (1, 40, 25, 7, 5, 20, 160),
    (1, 60, 59, 8, 8, 48, 80),
]


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _path_taken():
    """Which float32 path build_info() says a call takes now, or None when the fused kernels are not compiled."""
    info = _extension.build_info()["cpu_isa"]
    if "mask_classify float32:" not in info:
        return None
    taken = [path for path, name in PATH_NAMES.items() if "mask_classify float32: " + name in info]
    assert len(taken) == 1, info
    return taken[0]


@pytest.fixture(params=list(PATH_NAMES))
def cpu_path(request, monkeypatch):
    """The float32 path named by the parameter, forced; skipped where the CPU or the build lacks it."""
    monkeypatch.setenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", request.param)
    taken = _path_taken()
    if request.param != "generic" and taken != request.param:
        pytest.skip(f"this CPU or build has no {request.param} kernel (a call takes: {taken})")
    yield request.param


def test_best_path_is_taken(monkeypatch):
    monkeypatch.delenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", raising=False)
    flags, taken = _cpu_flags(), _path_taken()
    if flags is None or taken is None:
        pytest.skip("no /proc/cpuinfo, or the fused kernels are not compiled (not x86_64 GCC/clang)")
    best = next(path for path in PATH_NAMES if PATH_FLAGS[path] <= flags)
    assert taken == best, _extension.build_info()["cpu_isa"]
    monkeypatch.setenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", "auto")
    assert _path_taken() == best


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "B{}Q{}K{}_{}x{}to{}x{}".format(*s))
def test_each_float32_path_matches_reference_and_is_thread_count_independent(shape, cpu_path):
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = inputs(B, Q, K, h, w)
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(mask_classify(class_logits, mask_logits, (Hout, Wout)))
    assert (outs[0] > 0).all(), "output not fully written"
    assert_close(outs[0], mc_ops.reference(class_logits, mask_logits, (Hout, Wout)), F32_ATOL, F32_RTOL)
    if cpu_path != "generic":  # the generic path's BLAS may split its GEMM by thread
        assert torch.equal(outs[0], outs[1]), "results differ between 1 and 2 threads"


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "B{}Q{}K{}_{}x{}to{}x{}".format(*s))
def test_avx512_and_avx2_kernels_agree_bit_for_bit(shape, monkeypatch):
    # Each output element is the same sequence of IEEE operations in both (csrc/cpu/mask_classify_fused.h).
    B, Q, K, h, w, Hout, Wout = shape
    class_logits, mask_logits = inputs(B, Q, K, h, w)
    outs = {}
    for path in ("avx512", "avx2"):
        monkeypatch.setenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", path)
        if _path_taken() != path:
            pytest.skip(f"this CPU or build has no {path} kernel")
        outs[path] = mask_classify(class_logits, mask_logits, (Hout, Wout))
    assert torch.equal(outs["avx512"], outs["avx2"])


def test_unknown_path_value_raises(monkeypatch):
    monkeypatch.delenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", raising=False)
    if _path_taken() is None:
        pytest.skip("the fused kernels are not compiled")
    monkeypatch.setenv("SEGVIT_MASK_CLASSIFY_CPU_PATH", "avx1024")
    assert "names no path" in _extension.build_info()["cpu_isa"]
    class_logits, mask_logits = inputs(1, 2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"SEGVIT_MASK_CLASSIFY_CPU_PATH must be auto, avx512, avx2 or generic"):
        mask_classify(class_logits, mask_logits, (8, 8))


def test_non_contiguous_inputs_are_accepted():
    class_logits, mask_logits = inputs(2, 5, 4, 7, 6)
    cls_t = class_logits.transpose(0, 1).contiguous().transpose(0, 1)
    masks_t = mask_logits.transpose(2, 3).contiguous().transpose(2, 3)
    assert not cls_t.is_contiguous() and not masks_t.is_contiguous()
    out = mask_classify(cls_t, masks_t, (13, 11))
    assert_close(out, mc_ops.reference(class_logits, mask_logits, (13, 11)), F32_ATOL, F32_RTOL)


def test_empty_batch():
    class_logits, mask_logits = inputs(0, 3, 2, 4, 4)
    assert mask_classify(class_logits, mask_logits, (5, 6)).shape == (0, 2, 5, 6)


_CLS, _MASKS = torch.randn(2, 3, 5), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "class_logits, mask_logits, out_size, match",
    [
        (_CLS[0], _MASKS, (8, 8), r"class_logits must be 3-D"),
        (_CLS, _MASKS[0], (8, 8), r"mask_logits must be 4-D"),
        (_CLS, _MASKS[:, :2], (8, 8), r"same number of queries Q"),
        (_CLS[:1], _MASKS, (8, 8), r"same batch size B"),
        (_CLS.double(), _MASKS.double(), (8, 8), r"class_logits must be float32 or bfloat16"),
        (_CLS.half(), _MASKS.half(), (8, 8), r"class_logits must be float32 or bfloat16"),
        (_CLS, _MASKS.bfloat16(), (8, 8), r"mask_logits must have the dtype of class_logits"),
        (_CLS, _MASKS, (0, 8), r"out_size must be two positive ints"),
        (_CLS, _MASKS, (8, -1), r"out_size must be two positive ints"),
        (_CLS, _MASKS, (8, 8, 8), r"out_size must be two ints"),
        (_CLS[:, :0], _MASKS[:, :0], (8, 8), r"number of queries Q must be >= 1"),
        (_CLS[..., :1], _MASKS, (8, 8), r"class_logits must have K\+1 >= 2"),
        (_CLS, _MASKS[..., :0], (8, 8), r"mask_logits must have a non-empty \(h, w\) grid"),
    ],
    ids=["cls_dims", "masks_dims", "mismatched_Q", "mismatched_batch", "float64", "float16", "mixed_dtype",
         "out_size_zero", "out_size_negative", "out_size_three", "empty_Q", "no_classes", "empty_grid"],
)
def test_invalid_inputs_raise_naming_the_argument(class_logits, mask_logits, out_size, match):
    with pytest.raises(RuntimeError, match=match):
        mask_classify(class_logits, mask_logits, out_size)


def test_opcheck():
    class_logits, mask_logits = inputs(2, 4, 3, 5, 6)
    torch.library.opcheck(torch.ops.segvit.mask_classify.default, (class_logits, mask_logits, [11, 7]))


def test_build_info():
    info = _extension.build_info()
    assert info["available"] and "cpu_isa" in info and isinstance(info["cuda"], bool)
    assert set(info["kernels"]["cpu"]) == {"segvit::mask_classify", "segvit::mask_loss_stats",
                                           "segvit::mask_loss_stats_backward", "segvit::atm_attention_fwd",
                                           "segvit::atm_attention_bwd", "segvit::query_pool_attention_fwd",
                                           "segvit::query_pool_attention_bwd"}
    assert bool(info["kernels"]["cuda"]) == info["cuda"]
