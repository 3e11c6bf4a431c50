"""Export helpers: ``torch.export`` and ONNX programs of a SegViT model, with a dynamic batch.

    from segvit.export import Predictor, export_program, export_onnx
    program = export_program(model, images, predict=True)          # torch.export.ExportedProgram
    program.module()(other_images)                                   # any batch size
    onnx_program = export_onnx(model, images, "segvit.onnx")         # needs `pip install segvit[onnx]`

Everything here is the plain PyTorch API applied to the model; the helpers only fix the details that are easy to
get wrong (``predict`` as a module, the batch dimension marked dynamic, an example batch the exporter does not
specialize). ``torch.export`` keeps the fused kernels as ``torch.ops.segvit.*`` calls (the exported program runs
them, on the backend selected while exporting); ``torch.onnx.export`` gets the eager math instead, since ONNX has no
operator for them (segvit/ops/_dispatch.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Predictor(nn.Module):
    """``model.predict(images, mode)`` as a module's ``forward``: what ``torch.export``, ``torch.onnx.export`` and
    ``torch.compile`` take. ``mode``: None (the model's test mode), ``"whole"`` or ``"slide"``. Returns the class
    scores (B, K, H, W) at the input's size."""

    def __init__(self, model: nn.Module, mode: str | None = None):
        super().__init__()
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"model: expected a segvit model with a predict method, got {type(model).__name__}")
        if mode not in (None, "whole", "slide"):
            raise ValueError(f"mode: expected None, 'whole' or 'slide', got {mode!r}")
        self.model = model
        self.mode = mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images, self.mode)


def _target(model: nn.Module, predict: bool, mode: str | None) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mode is not None and not predict:
        raise ValueError("mode: only applies with predict=True (forward has no inference mode)")
    return Predictor(model, mode) if predict else model


def _example(images, dynamic_batch: bool) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images: expected an example float tensor (B, 3, H, W), got "
                         + (f"shape {tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor)
                            else type(images).__name__))
    if dynamic_batch and images.shape[0] == 1:
        # torch.export specializes a size-1 dimension to the constant 1; only the example's shape matters here.
        images = images.expand(2, -1, -1, -1).contiguous()
    return images


def export_program(model: nn.Module, images: torch.Tensor, *, predict: bool = False, mode: str | None = None,
                   dynamic_batch: bool = True, strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (its ``forward``, or ``predict`` with ``predict=True``) traced at the
    example ``images`` (B, 3, H, W); with ``dynamic_batch`` the program takes any batch size (H and W stay those
    of the example). The model is exported in eval mode."""
    target = _target(model, predict, mode).eval()
    example = _example(images, dynamic_batch)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(target, (example,), dynamic_shapes=shapes, strict=strict)


def export_onnx(model: nn.Module, images: torch.Tensor, path=None, *, predict: bool = True,
                mode: str | None = None, dynamic_batch: bool = True, **kwargs):
    """``torch.onnx.export(..., dynamo=True)`` of ``model.predict`` (or ``forward`` with ``predict=False``) at
    the example ``images``; saved to ``path`` when given. Returns the ``torch.onnx.ONNXProgram``. Input
    ``images``; outputs ``scores`` (B, K, H, W) for predict, else ``pred_logits``, ``pred_masks`` and the aux outputs
    in order (``aux_outputs_0_pred_logits``, ...). Further keyword arguments go to ``torch.onnx.export`` (e.g.
    ``opset_version``). The fused ops are exported as the original's math: whatever the backend, ONNX gets plain
    matrix products, softmax, bilinear resizes and sigmoids. Needs ``pip install segvit[onnx]``."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter is built on it)
    except ImportError as exc:
        raise ImportError(f"export_onnx needs onnx and onnxscript ({exc}): pip install segvit[onnx]") from exc
    target = _target(model, predict, mode).eval()
    example = _example(images, dynamic_batch)
    if predict:
        output_names = ["scores"]
    else:
        with torch.no_grad():
            out = target(example[:1])
        output_names = _leaf_names(out)
    shapes = ({0: "batch"},) if dynamic_batch else None
    program = torch.onnx.export(target, (example,), dynamo=True, dynamic_shapes=shapes, input_names=["images"],
                                output_names=output_names, **kwargs)
    if path is not None:
        program.save(str(path))
    return program


def _leaf_names(tree, prefix: str = "") -> list[str]:
    """Names of the tensors of a nested dict / list output, in the order the exporter flattens it (dicts in key
    order, lists by index): ``pred_logits``, ..., ``aux_outputs_0_pred_logits``, ..."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return [prefix]
    return [name for key, value in items for name in _leaf_names(value, f"{prefix}_{key}" if prefix else str(key))]
