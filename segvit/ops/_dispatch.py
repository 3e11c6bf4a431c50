"""Backend selection for the fused ops.

Each op declares, per backend, a kernel and a function that lists why that kernel cannot take given inputs
(an empty list means it can). The dispatcher runs the selected backend, or under ``auto`` the first one that fits
in the device's preference order. A backend the user asked for by name that cannot take the inputs is an error
listing its reasons; under ``auto`` a passed-over backend that is present but refuses the inputs is reported
once as a warning (a backend that merely has no kernel for the op yet is passed over silently).

During ``torch.onnx.export`` only ``eager`` fits: the fused kernels are custom ops that ONNX has no operator for,
so ``auto`` exports the original's math (plain ATen ops, which the exporter translates) and a fused backend asked
for by name is an error saying so. ``torch.export`` and ``torch.compile`` keep the fused ops (they have fake
kernels, autograd formulas and FLOP formulas).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from segvit.ops import _autocast, _second_order

BACKENDS = ("eager", "triton", "cpp", "cuda")
_CHOICES = ("auto",) + BACKENDS
# Preference of ``auto`` by device type; eager is always last and always fits.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpp", "eager")}


def _validate_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown segvit backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


_selected = _validate_name(os.environ.get("SEGVIT_BACKEND", "auto"), "SEGVIT_BACKEND")


def get_backend() -> str:
    """The backend currently selected (``auto`` unless changed by ``use_backend`` or ``SEGVIT_BACKEND``)."""
    return _selected


class use_backend:
    """Select the backend of every ``segvit.ops`` call: ``use_backend("eager")`` switches now and stays;
    ``with use_backend("cpp"): ...`` switches for the block and restores the previous choice on exit."""

    def __init__(self, name: str):
        global _selected
        self._previous = _selected
        _selected = _validate_name(name, "use_backend(name)")

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _selected
        _selected = self._previous


# When ``auto`` may pick a registered backend: always (``yes``), only where Triton is not installed
# (``without-triton``: a GPU fallback slower than the Triton kernel), or never (``no``: explicit selection only).
AUTO_POLICIES = ("yes", "without-triton", "no")


@dataclass
class Kernel:
    """One backend's implementation of one op."""
    fn: Callable
    reasons: Callable[..., list[str]] = lambda *args, **kwargs: []
    auto: str = "yes"
    auto_note: str = ""  # why auto passes this backend over (shown by ``python -m segvit.info``)


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@dataclass
class Op:
    name: str
    kernels: dict[str, Kernel] = field(default_factory=dict)
    # (args, kwargs of the call) -> why the fused backends cannot give second-order gradients of this call (a
    # phrase completing "not supported on backend 'cpp' ..."), or None when the eager formula can
    # (segvit/ops/_second_order.py).
    second_order_refusal: Callable[..., str | None] | None = None

    def register(self, backend: str, fn: Callable, reasons: Callable[..., list[str]] | None = None, *,
                 auto: str = "yes", auto_note: str = "") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        if auto not in AUTO_POLICIES:
            raise ValueError(f"auto must be one of {AUTO_POLICIES}, got {auto!r}")
        self.kernels[backend] = Kernel(fn, reasons or (lambda *a, **k: []), auto, auto_note)

    def auto_skips(self, backend: str) -> bool:
        """Whether ``auto`` passes this backend over whatever the inputs (its registration's ``auto`` policy)."""
        kernel = self.kernels.get(backend)
        if kernel is None or kernel.auto == "yes":
            return False
        return kernel.auto == "no" or _triton_installed()

    def why_not(self, backend: str, *args, **kwargs) -> list[str]:
        kernel = self.kernels.get(backend)
        if kernel is None:
            return [f"no {backend} kernel for {self.name} (not implemented)"]
        if backend != "eager" and onnx_exporting():
            return [f"torch.onnx.export: the {backend} kernel is a custom op without an ONNX translation (the "
                    f"'auto' and 'eager' backends export the eager math)"]
        return kernel.reasons(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        # The op's public function has applied the autocast policy (segvit/ops/_autocast.py) to the inputs; the
        # backend itself runs with autocast off, so its ATen calls are not re-cast.
        with _autocast.disabled(device):
            return self._run(device, *args, **kwargs)

    def _run(self, device, *args, **kwargs):
        if _selected != "auto":
            reasons = self.why_not(_selected, *args, **kwargs)
            if reasons:
                raise RuntimeError(f"segvit.ops.{self.name}: backend {_selected!r} cannot run these inputs: "
                                   + "; ".join(reasons))
            return self._call(_selected, args, kwargs)
        for backend in _AUTO_ORDER.get(device.type, ("eager",)):
            if self.auto_skips(backend):
                continue
            reasons = self.why_not(backend, *args, **kwargs)
            if not reasons:
                return self._call(backend, args, kwargs)
            # warnings.warn cannot be traced by torch.compile(fullgraph=True); an eager call warns as usual. An
            # ONNX export passing over the fused backends is expected, not worth a warning.
            if backend in self.kernels and not torch.compiler.is_compiling() and not onnx_exporting():
                _warn_once(self.name, backend, reasons)
        raise AssertionError("unreachable: the eager kernel takes every valid input")

    def _call(self, backend: str, args, kwargs):
        result = self.kernels[backend].fn(*args, **kwargs)
        if backend != "eager" and _second_order.needs_node(args, kwargs):
            # Fused backwards are first order only: create_graph=True differentiates the eager formula instead.
            result = _second_order.attach(self, backend, result, args, kwargs)
        return result


def onnx_exporting() -> bool:
    """Whether a ``torch.onnx.export`` is running (the TorchScript exporter or ``dynamo=True``)."""
    # No export can be running before torch.onnx is imported; importing it here would cost every first op call.
    onnx = sys.modules.get("torch.onnx")
    if onnx is None:
        return False
    if onnx.is_in_onnx_export():
        return True
    # Dynamo folds is_in_onnx_export() to False, so the exporter's strict (Dynamo) capture would keep the fused ops;
    # the flag behind it (private, hence read defensively) is a plain module global that Dynamo reads as it is.
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


_warned: set[tuple[str, str]] = set()


def _warn_once(op: str, backend: str, reasons: list[str]) -> None:
    # Ordinary cases (a CPU-forward-only kernel during training) are not worth a warning.
    reasons = [r for r in reasons if not r.startswith("forward only")]
    if reasons and (op, backend) not in _warned:
        _warned.add((op, backend))
        warnings.warn(f"segvit.ops.{op}: auto skipped backend {backend!r}: {'; '.join(reasons)}", stacklevel=4)


OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    return OPS.setdefault(name, Op(name))


def available_backends() -> dict[str, str]:
    """Every backend name mapped to ``"available"`` or the reason it is not usable on this machine."""
    from segvit import _extension

    status = {"eager": "available"}
    try:
        import triton  # noqa: F401

        has_cuda = torch.cuda.is_available()
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not any(OPS[n].kernels.get("triton") for n in OPS):
            status["triton"] = "no triton kernels registered yet"
        else:
            status["triton"] = "available" if (has_cuda or interpret) else "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    except ImportError as exc:
        status["triton"] = f"triton not importable: {exc}"
    ext_ok, ext_reason = _extension.status()
    status["cpp"] = "available" if ext_ok else ext_reason
    if not ext_ok:
        status["cuda"] = ext_reason
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device"
    elif not _extension.has_cuda_kernels():
        status["cuda"] = "extension built without CUDA kernels"
    else:
        status["cuda"] = "available"
    return status
