"""Input validation shared by the ops: each failure names the argument and what was expected."""
from __future__ import annotations

import math
import operator

import torch

from segvit.ops import _autocast

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, ndim: int, dims: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {dims}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected non-empty sizes {dims}, got shape {tuple(t.shape)}")
    return t


def same(name_a: str, a: int, name_b: str, b: int, what: str) -> None:
    if a != b:
        raise ValueError(f"{name_b}: expected {what} {a} (as {name_a}), got {b}")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Checked after the autocast policy (segvit/ops/_autocast.py) has cast the inputs, so inside autocast only
    float64 mixed with other dtypes is left to fail."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}"
                            + ("" if _autocast.active_dtype(ref.device) else
                               " (mixed dtypes are cast only inside torch.autocast)"))


def integer(name: str, value, *, minimum: int | None = 1, what: str = "") -> int:
    """An integer argument, the same check on every backend: a Python int (or an integral type with
    ``__index__``, e.g. a numpy integer or a SymInt), never a bool or a float, not even an integral float (as
    ``F.interpolate`` refuses a float ``size``); at least ``minimum`` unless that is None. Returns it as an int."""
    expected = what or ("an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}")
    if isinstance(value, bool) or not (isinstance(value, int) or _is_index(value)):
        raise TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    value = value if isinstance(value, int) else operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def _is_index(value) -> bool:
    # Integral types other than int (numpy integers, torch.SymInt) define __index__; floats, tensors of a float
    # dtype and bools do not pass (a bool is an int subclass, refused above).
    if isinstance(value, (float, torch.Tensor)):
        return False
    return hasattr(type(value), "__index__")


def size_pair(name: str, size) -> tuple[int, int]:
    """Two positive ints (H, W): a float (``(5.5, 7)``, even ``7.0``) or a bool is an error, never truncated."""
    expected = "two positive ints (H, W)"
    try:
        h, w = size
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {expected}, got {size!r}") from None
    if isinstance(size, torch.Tensor):
        raise TypeError(f"{name}: expected {expected} (a tuple or list), got a tensor")
    for s in (h, w):
        if isinstance(s, bool) or not (isinstance(s, int) or _is_index(s)):
            raise TypeError(f"{name}: expected {expected}, got {size!r} ({type(s).__name__} {s!r})")
    h, w = operator.index(h), operator.index(w)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected {expected}, got {size!r}")
    return h, w


def real(name: str, value, what: str) -> float:
    """A real-number argument (int or float, not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(type(value), "__float__"):
        raise TypeError(f"{name}: expected {what}, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected {what} (a Python number), got a tensor")
    return float(value)


def focal_alpha(name: str, alpha) -> float:
    """The focal loss's class weight: in [0, 1] (weight alpha of the targets, 1 - alpha of the negatives), or
    negative to disable the weighting (both weights 1, the original's ``alpha = -1``). NaN, inf and values above 1
    are errors (NaN would silently disable the weighting: ``NaN >= 0`` is false)."""
    what = "a number in [0, 1], or negative (e.g. -1) to disable the class weighting"
    alpha = real(name, alpha, what)
    if not math.isfinite(alpha) or alpha > 1.0:
        raise ValueError(f"{name}: expected {what}, got {alpha!r}")
    return alpha


def focal_gamma(name: str, gamma) -> float:
    """The focal loss's focusing exponent: finite and >= 0."""
    what = "a finite number >= 0"
    gamma = real(name, gamma, what)
    if not math.isfinite(gamma) or gamma < 0.0:
        raise ValueError(f"{name}: expected {what}, got {gamma!r}")
    return gamma


# What the compiled extension's backends take: the device type and the dtypes of their kernels.
_COMPILED_BACKENDS = {"cpp": ("cpu", "CPU", (torch.float32, torch.bfloat16)),
                      "cuda": ("cuda", "CUDA", (torch.float32, torch.float16, torch.bfloat16))}


def compiled_backend_reasons(backend: str, tensor: torch.Tensor, name: str = "") -> list[str]:
    """Why the extension's ``cpp`` or ``cuda`` kernels cannot take ``tensor`` (empty when they can): not built,
    built without CUDA, wrong device, or a dtype they lack. ``name`` names the argument in the dtype message."""
    from segvit import _extension

    ok, why = _extension.status()
    if not ok:
        return [why]
    if backend == "cuda" and not _extension.has_cuda_kernels():
        return ["extension built without CUDA kernels (CPU build of torch, no nvcc, or SEGVIT_SKIP_CUDA=1)"]
    device, label, dtypes = _COMPILED_BACKENDS[backend]
    reasons = []
    if tensor.device.type != device:
        reasons.append(f"{backend} runs on {label} tensors, got {tensor.device}")
    if tensor.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        takes = " or ".join(names) if len(names) == 2 else f"{', '.join(names[:-1])} or {names[-1]}"
        reasons.append(f"{backend} takes {takes}{' ' + name if name else ''}, got {tensor.dtype}")
    return reasons


def label_values(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label is a class in [0, num_classes) or ``ignore_index`` (one min/max pass in the valid case)."""
    low, high = torch.aminmax(labels.masked_fill(labels == ignore_index, 0))
    if int(low) < 0 or int(high) >= num_classes:
        invalid = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        raise ValueError(f"{name}: expected values in [0, {num_classes}) or ignore_index={ignore_index}, "
                         f"found {labels[invalid][:5].tolist()}")
