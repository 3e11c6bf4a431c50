"""Inference on what users have: image files, PIL images, uint8 arrays and tensors.

    import segvit
    from segvit.inference import inference
    model = segvit.build_model("segvit_vit-l16_ade20k_640", checkpoint="ade_54.6.pth")
    labels = inference(model, "room.jpg")                              # (H, W) int64
    labels, probs = inference(model, ["a.jpg", "b.png"], return_scores=True)  # lists

``model.predict`` keeps its contract (normalized float NCHW tensors); this call applies the model's own
preprocessing, carried by the model as ``model.data_config`` (``build_model`` attaches it for a published name or
a whole config): the config's test pipeline, exactly as ``segvit.eval`` runs it (``segvit.data.EvalPipeline``:
keep-ratio resize to ``img_scale`` [``min_size``], normalisation, RGB or BGR order), then ``model.predict``, the
scores resized back to each input's size (bilinear) and softmaxed, argmax.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

_AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16,
        torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}

_NO_DATA_CONFIG = (
    "this model has no data_config (its test-time normalisation and resize): build it from a published name or a "
    "whole config (segvit.build_model('segvit_vit-l16_ade20k_640') or build_model(whole_config_dict), not the "
    "config's 'model' part alone), or set model.data_config = {'mean': [...], 'std': [...], 'to_rgb': True, "
    "'img_scale': (2048, 512) or None}")


def _pipeline(data_config):
    """The EvalPipeline of ``data_config`` (or only its Normalize when there is no test-time resize)."""
    from segvit.data.transforms import EvalPipeline, Normalize

    if not isinstance(data_config, dict) or "mean" not in data_config or "std" not in data_config:
        raise ValueError(f"model.data_config: expected a dict with 'mean' and 'std', got {data_config!r}")
    norm = {"type": "Normalize", "mean": data_config["mean"], "std": data_config["std"],
            "to_rgb": data_config.get("to_rgb", True)}
    for key in ("mean", "std"):
        if np.asarray(norm[key]).shape not in ((3,), ()):
            raise ValueError(f"model.data_config[{key!r}]: expected 3 numbers (or one), got {norm[key]!r}")
    scale = data_config.get("img_scale")
    if scale is None:
        return lambda img, ratio=1.0, flip=False: Normalize(norm["mean"], norm["std"], norm["to_rgb"])(img)
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scale)):
        raise ValueError(f"model.data_config['img_scale']: expected None or a pair of positive numbers "
                         f"(long, short), got {scale!r} (multi-scale test scales are not supported)")
    resize = {"type": "Resize", "keep_ratio": data_config.get("keep_ratio", True)}
    if data_config.get("min_size") is not None:
        resize["min_size"] = data_config["min_size"]
    return EvalPipeline([{"type": "MultiScaleFlipAug", "img_scale": list(scale), "transforms": [resize, norm]}])


def _rgb_from_array(arr: np.ndarray, where: str) -> np.ndarray:
    """H x W x 3 uint8 from H x W, H x W x 1, H x W x 3 or H x W x 4 (alpha dropped, as PIL's convert('RGB'))."""
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{where}: expected uint8 pixel values 0..255, got {arr.dtype}; this call applies the "
                            f"model's own normalisation, so pass the raw image (model.predict takes normalized "
                            f"float NCHW tensors)")
        raise TypeError(f"{where}: expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        hint = " (a batch: pass a list of images)" if arr.ndim == 4 else ""
        raise ValueError(f"{where}: expected an image of shape (H, W), (H, W, 3) or (H, W, 4) (channels last; a "
                         f"torch tensor may also be (3, H, W)), got shape {tuple(arr.shape)}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {tuple(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _tensor_to_hwc(t: torch.Tensor, where: str) -> np.ndarray:
    if t.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a uint8 tensor of pixel values 0..255, got {t.dtype}; this call applies "
                        f"the model's own normalisation, so pass the raw image (model.predict takes normalized float "
                        f"NCHW tensors)")
    if t.dtype != torch.uint8:
        raise TypeError(f"{where}: expected a uint8 tensor, got {t.dtype}")
    t = t.detach().cpu()
    # Channels last only when the last axis alone looks like channels; otherwise (ambiguous (3, H, 3) included)
    # channels first, torchvision's convention.
    if t.dim() == 3 and not (t.shape[2] in (1, 3, 4) and t.shape[0] not in (1, 3, 4)):
        t = t.permute(1, 2, 0)
    return t.numpy()


def _pil_to_rgb(image, where: str) -> np.ndarray:
    """RGB uint8 of a PIL image, turned upright by its EXIF orientation (as a photo viewer, and OpenCV's imread that
    mmcv uses, show it)."""
    from PIL import ImageOps

    if image.mode in ("F", "I") or image.mode.startswith("I;"):
        raise TypeError(f"{where}: expected an 8-bit PIL image (mode L, RGB, RGBA, P, ...), got mode "
                        f"{image.mode!r}; convert it to 8 bits first")
    return np.array(ImageOps.exif_transpose(image).convert("RGB"))


def load_image(image, where: str = "image") -> np.ndarray:
    """An H x W x 3 uint8 RGB array from a file path, a PIL image, a uint8 numpy array (H x W, H x W x 1/3/4) or
    a uint8 tensor (C x H x W or H x W x C, C in 1, 3, 4). Alpha is dropped (the colours are kept as they are,
    as PIL's ``convert('RGB')``); grey is repeated to three channels. Files and PIL images are turned upright by
    their EXIF orientation (a phone photo is segmented as it is shown, and the label map has that shape; a dataset
    read by ``segvit.eval`` is not rotated, its labels being stored as the images are)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        from segvit.data.datasets import _open_error

        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: no such image file: {path!r}")
        try:
            with Image.open(path) as im:
                return _pil_to_rgb(im, where)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # as segvit.data names it
            raise _open_error(path, e) from e
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, where)
    if isinstance(image, torch.Tensor):
        return _rgb_from_array(_tensor_to_hwc(image, where), where)
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image, where)
    raise TypeError(f"{where}: expected a file path, a PIL image, a uint8 numpy array or a uint8 tensor, got "
                    f"{type(image).__name__}")


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def inference(model, inputs, *, mode: str | None = None, return_scores: bool = False, device=None, amp=None,
              batch_size: int = 1, progress: bool = False):
    """Label maps of ``inputs`` at their original sizes, with the model's own preprocessing.

    ``inputs``: one image or a list (or tuple) of them; an image is a file path (str or os.PathLike), a PIL image,
    a uint8 numpy array (H, W) / (H, W, 3) / (H, W, 4) or a uint8 tensor (3, H, W) / (H, W, 3) (1 or 4 channels
    too; alpha is dropped). Float inputs are refused: ``model.predict`` is the call for normalized float tensors.
    ``mode``: None (the config's test mode), "whole" or "slide". ``device``: where the model runs (default: the
    model's device; given, the model is moved there, as ``model.to(device)``). ``amp``: None, "bf16" or "fp16"
    (autocast on the device). ``batch_size``: images per ``model.predict`` call (images whose resized sizes differ
    run apart).

    Returns, for one image, a (H, W) int64 label map on the CPU, and with ``return_scores`` the pair (labels,
    (K, H, W) float32 class probabilities: the softmax of the scores resized to the image, as ``segvit.eval``);
    for a list, a list of those. The result equals ``segvit.eval.inference`` followed by argmax."""
    data_config = getattr(model, "data_config", None)
    if data_config is None:
        raise ValueError(_NO_DATA_CONFIG)
    pipeline = _pipeline(data_config)
    if amp not in _AMP:
        raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {amp!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if mode not in (None, "whole", "slide"):
        raise ValueError(f"mode: expected None, 'whole' or 'slide', got {mode!r}")
    single = not isinstance(inputs, (list, tuple))
    items = [inputs] if single else list(inputs)
    if device is not None:
        device = torch.device(device)
        model.to(device)  # no-op when it is there already
    else:
        device = _model_device(model)
    dtype = _AMP[amp]

    from tqdm import tqdm

    results = [None] * len(items)
    bar = tqdm(total=len(items), desc="inference", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = []
        for i in range(start, min(start + batch_size, len(items))):
            img = load_image(items[i], "inputs" if single else f"inputs[{i}]")
            chunk.append((i, img.shape[:2], pipeline(img)))
        # Images of one resized size share a predict call.
        by_size: dict[tuple, list] = {}
        for entry in chunk:
            by_size.setdefault(tuple(entry[2].shape[-2:]), []).append(entry)
        for group in by_size.values():
            x = torch.stack([e[2] for e in group]).to(device)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
                scores = model.predict(x, mode)
            for j, (i, size, _) in enumerate(group):
                # As segvit.eval.inference: float32 resize to the original size, then softmax.
                probs = F.interpolate(scores[j:j + 1].float(), size=size, mode="bilinear",
                                      align_corners=False).softmax(dim=1)[0]
                labels = probs.argmax(0).cpu()
                results[i] = (labels, probs.cpu()) if return_scores else labels
        bar.update(len(chunk))
    bar.close()
    return results[0] if single else results


__all__ = ["inference", "load_image"]
