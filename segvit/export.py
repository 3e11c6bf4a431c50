"""Export helpers: ``torch.export`` and ONNX programs of a SegViT model, with a dynamic batch.

    from segvit.export import Predictor, export_program, export_onnx
    program = export_program(model, images, predict=True)          # torch.export.ExportedProgram
    program.module()(other_images)                                   # any batch size
    onnx_program = export_onnx(model, images, "segvit.onnx")         # needs `pip install segvit[onnx]`

    python -m segvit.export --model NAME_OR_JSON (--checkpoint PATH | --pretrained) [--onnx FILE] [--program FILE]
                            [--size H W] [--mode whole|slide] [--check]

Everything here is the plain PyTorch API applied to the model; the helpers only fix the details that are easy to
get wrong (``predict`` as a module, the batch dimension marked dynamic, an example batch the exporter does not
specialize). ``torch.export`` keeps the fused kernels as ``torch.ops.segvit.*`` calls (the exported program runs
them, on the backend selected while exporting); ``torch.onnx.export`` gets the eager math instead, since ONNX has no
operator for them (segvit/ops/_dispatch.py).
"""
from __future__ import annotations

import argparse
import sys

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


def check_onnx(path: str, model: nn.Module, images: torch.Tensor, mode: str | None = None) -> float:
    """The largest absolute difference between the ONNX model at ``path`` run by onnxruntime and ``model.predict``
    on ``images``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"checking the ONNX model needs onnxruntime ({exc}): pip install segvit[onnx]") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = model.predict(images, mode)
    return float((torch.from_numpy(got) - expected).abs().max())


def main(argv=None) -> dict:
    """``python -m segvit.export``: the model's ``predict`` as an ONNX file and/or a ``torch.export`` program
    (``torch.export.save``), with a dynamic batch at the given image size. Returns what it wrote."""
    from segvit.eval import add_weights_arguments, load_config, model_from_arguments

    parser = argparse.ArgumentParser(prog="python -m segvit.export", description=main.__doc__.split(":")[0])
    parser.add_argument("--model", required=True, help="published model name or JSON config file")
    add_weights_arguments(parser, "--model")
    parser.add_argument("--onnx", default=None, help="write the ONNX model here (pip install segvit[onnx])")
    parser.add_argument("--program", default=None, help="write the torch.export program here (.pt2)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="the image size the export takes (default: the backbone's img_size)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the config's test_cfg")
    parser.add_argument("--check", action="store_true",
                        help="run the ONNX model with onnxruntime on a random batch of 3 against model.predict")
    args = parser.parse_args(argv)
    if not args.onnx and not args.program:
        parser.error("nothing to write: give --onnx FILE and/or --program FILE")
    if args.check and not args.onnx:
        parser.error("--check checks the ONNX model: give --onnx FILE")
    if args.size is not None and min(args.size) < 1:
        parser.error(f"--size: expected two positive ints, got {args.size}")

    try:
        cfg = load_config(args.model)
    except ValueError as e:
        parser.error(str(e).replace("--config", "--model"))
    model = model_from_arguments(parser, args, args.model, cfg, "--model")
    height, width = args.size or model.backbone.img_size
    images = torch.randn(2, 3, height, width)
    written = {}
    if args.program:
        torch.export.save(export_program(model, images, predict=True, mode=args.mode), args.program)
        written["program"] = args.program
        print(f"wrote {args.program}: torch.export program of predict, images (batch, 3, {height}, {width})")
    if args.onnx:
        export_onnx(model, images, args.onnx, mode=args.mode)
        written["onnx"] = args.onnx
        print(f"wrote {args.onnx}: ONNX model of predict, input 'images' (batch, 3, {height}, {width}), output "
              f"'scores' (batch, {model.num_classes}, {height}, {width})")
        if args.check:
            written["max_abs_diff"] = check_onnx(args.onnx, model, torch.randn(3, 3, height, width), args.mode)
            print(f"onnxruntime against model.predict (batch 3): max |difference| {written['max_abs_diff']:.3g}")
    return written


def cli() -> None:
    """Console script ``segvit-export`` (main's return value would otherwise become the exit status)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
