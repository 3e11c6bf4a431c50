"""Evaluate a SegViT checkpoint on a dataset as mmsegmentation's ``tools/test.py`` does.

    python -m segvit.eval --config NAME_OR_JSON (--checkpoint PATH | --pretrained) --data DIR [--mode whole|slide]
                          [--aug-test] [--out FILE] [--show-dir DIR]

Per image: the config's test pipeline (keep-ratio resize to ``img_scale * ratio``, ``min_size`` where the config
has it, normalisation), ``model.predict`` (whole image or sliding windows with the config's crop and stride; crops
smaller than the window simply run at their size), scores resized to the original image (bilinear), softmax,
flipped back for flipped inputs, averaged over the scales and flips (``--aug-test``: ratios 0.5 ... 1.75 and a
horizontal flip), argmax. IoU areas are summed over the dataset (``segvit.metrics``). Under ``torchrun`` the
images are split over the processes and the areas summed.

Output: the per-class table with the dataset's class names (``segvit.classes``) and the summary line. PASCAL-Context
is reported as published: mIoU and mAcc over its 59 classes (the background class 0 left out of the means, the model
still predicts it), the 60-class means beside them. ``--out FILE``: the same as JSON, every figure in percent.
``--show-dir DIR``: each image with its prediction over it and a legend. ``--pretrained``: the official weights of a
published ``--config`` from the Hugging Face Hub instead of ``--checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def published_equivalent(path: str) -> str | None:
    """The published model an original SegViT ``.py`` config file most likely is, from its path (backbone size,
    ``shrink``, dataset), or None when that does not single one out."""
    import segvit

    text = path.lower().replace("_", "-")
    backbone = "vit-b16" if "vit-b" in text else "vit-l16"
    shrunk = "shrink" in text or "shrunk" in text
    dataset = next((d for key, d in (("coco", "cocostuff10k"), ("ade", "ade20k"), ("-pc", "pc60"),
                                     ("context", "pc60")) if key in text), None)
    found = [name for name in segvit.list_models() if backbone in name and ("shrunk" in name) == shrunk
             and (dataset is None or dataset in name)]
    return found[0] if len(found) == 1 else None


def load_config(name_or_json: str) -> dict:
    """A published model name (``segvit.list_models()``) or the path of a JSON config of the same form. An original
    mmcv ``.py`` config is refused with the published equivalent named (its ``_base_`` inheritance needs mmcv)."""
    import segvit

    if name_or_json in segvit.list_models():
        return segvit.published_config(name_or_json)
    if not os.path.isfile(name_or_json):
        raise ValueError(f"--config: {name_or_json!r} is neither a published model "
                         f"({', '.join(segvit.list_models())}) nor an existing JSON file")
    if name_or_json.endswith(".py"):
        same = published_equivalent(name_or_json)
        raise ValueError(
            f"--config {name_or_json}: an original SegViT (mmcv) .py config; segvit reads published names and JSON "
            "configs, not Python ones (their _base_ inheritance is mmcv's). "
            + (f"Its published equivalent is {same!r}: pass --config {same}. " if same else
               f"The published configurations: {', '.join(segvit.list_models())}. ")
            + "A modified config: write the merged dict as JSON (with mmcv: Config.fromfile(path).dump('cfg.json')), "
            "or start from segvit.published_config(name) and json.dump it.")
    with open(name_or_json) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {name_or_json}: not a JSON config ({exc})") from exc


@torch.no_grad()
def inference(model, img: np.ndarray, pipeline, *, mode: str | None = None, ratios=(1.0,), flip: bool = False,
              device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """(K, H, W) class probabilities at the original image size, averaged over ``ratios`` x flips."""
    height, width = img.shape[:2]
    total, count = None, 0
    for ratio in ratios:
        for flipped in ((False, True) if flip else (False,)):
            x = pipeline(img, ratio, flipped)[None].to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                scores = model.predict(x, mode)
            scores = F.interpolate(scores.float(), size=(height, width), mode="bilinear", align_corners=False)
            probs = scores.softmax(dim=1)
            if flipped:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            count += 1
    return total[0] / count


@torch.no_grad()
def evaluate(model, dataset, pipeline, *, mode: str | None = None, aug_test: bool = False, device="cpu",
             dtype: torch.dtype | None = None, progress: bool = True, show_dir: str | None = None,
             class_names=None, palette=None, opacity: float = 0.5) -> dict:
    """``segvit.metrics`` results over ``dataset`` (raw items: uint8 image, label), sharded over processes
    when torch.distributed is initialised. ``show_dir``: each image's prediction drawn over it (``palette``, with
    a legend of ``class_names``) to ``show_dir/<image stem>.png``."""
    if show_dir is not None:
        from segvit import visualize

        if palette is None:
            raise ValueError("evaluate(show_dir=...): a palette is needed (segvit.classes.palette(dataset))")
        os.makedirs(show_dir, exist_ok=True)
    from tqdm import tqdm

    from segvit.metrics import IoUAccumulator

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = model.training
    model.eval()
    acc = IoUAccumulator(model.num_classes, getattr(model, "ignore_index", 255))
    indices = range(rank, len(dataset), world)
    for i in tqdm(indices, desc="eval", disable=not progress or rank != 0, leave=False):
        img, label, _ = dataset[i]
        probs = inference(model, img, pipeline, mode=mode, ratios=AUG_RATIOS if aug_test else (1.0,),
                          flip=aug_test, device=device, dtype=dtype)
        pred = probs.argmax(0).cpu()
        acc.update(pred, torch.from_numpy(np.asarray(label)))
        if show_dir is not None:
            stem = os.path.splitext(os.path.basename(dataset.paths(i)[0]))[0]
            visualize.save_overlay(os.path.join(show_dir, f"{stem}.png"), img, pred.numpy(), palette,
                                   class_names=class_names, opacity=opacity)
    if distributed:
        areas = acc.areas().to(device)
        dist.all_reduce(areas)
        acc = IoUAccumulator(model.num_classes, acc.ignore_index)
        acc.merge_(areas.cpu())
    model.train(was_training)
    return acc.compute()


def headline(results: dict, background: int | None = None) -> dict:
    """``results`` with ``mIoU`` and ``mAcc`` as published. With a ``background`` class (PASCAL-Context's 0): its
    IoU and Acc left out of both means (the published 59-class figures; the model still has 60 outputs), and the
    means over every class kept as ``mIoU_all`` and ``mAcc_all``; ``aAcc`` is over every labelled pixel either way."""
    if background is None:
        return results
    keep = torch.ones(len(results["IoU"]), dtype=torch.bool)
    keep[background] = False
    mean = lambda v: float(np.nanmean(v[keep].numpy())) if (~torch.isnan(v[keep])).any() else float("nan")  # noqa: E731
    return {**results, "mIoU": mean(results["IoU"]), "mAcc": mean(results["Acc"]),
            "mIoU_all": results["mIoU"], "mAcc_all": results["mAcc"], "background": background}


def summary(results: dict) -> dict:
    """The JSON-friendly part of the results, in percent (as mmseg prints them): mIoU, aAcc, mAcc (and mIoU_all,
    mAcc_all where ``headline`` left a background class out)."""
    return {k: round(100 * results[k], 2) for k in ("mIoU", "aAcc", "mAcc", "mIoU_all", "mAcc_all") if k in results}


def report(results: dict, class_names=None) -> dict:
    """What ``--out`` writes: every figure in percent (rounded to 0.01; null where a class never occurs), per
    class with its name."""
    per_class = lambda v: [None if np.isnan(x) else round(100 * x, 2) for x in v.tolist()]  # noqa: E731
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(results["IoU"]))]
    out = {"units": "percent", **summary(results), "classes": names, "IoU": per_class(results["IoU"]),
           "Acc": per_class(results["Acc"])}
    if "background" in results:
        out["background"] = names[results["background"]]
    return out


def dataset_classes(cfg: dict, num_classes: int):
    """(class names, palette, background class) of the config's dataset (``segvit.classes.for_model``), with
    generic names ("class 0", ...) for a dataset it does not know or a class count that differs from the
    dataset's."""
    from segvit import classes

    _, names, palette, background = classes.for_model(cfg, num_classes)
    return list(names) if names is not None else [f"class {i}" for i in range(num_classes)], palette, background


def add_weights_arguments(parser: argparse.ArgumentParser, option: str) -> None:
    """``--checkpoint PATH`` or ``--pretrained`` (one of them), for the model named by ``option``."""
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="original (mmcv) or segvit checkpoint (.pth)")
    weights.add_argument("--pretrained", action="store_true",
                         help=f"the official weights of the published {option}, from the Hugging Face Hub "
                              "(Akide/SegViTv1; needs huggingface_hub: pip install segvit[hub])")


def model_from_arguments(parser, args, name: str, cfg: dict, option: str):
    """The eval-mode model of ``add_weights_arguments``' choice: ``name``'s official weights, or ``cfg`` (the whole
    config ``name`` stands for) with ``--checkpoint`` (original, or segvit.train's "model")."""
    import segvit

    if args.pretrained:
        if error := segvit.hub.no_official_weights(name, "--pretrained", option):
            parser.error(error)
        return segvit.build_model(name, pretrained=True)
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint: no such file: {args.checkpoint!r}")
    return segvit.build_model(cfg, checkpoint=args.checkpoint)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m segvit.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="published model name or JSON config file")
    add_weights_arguments(parser, "--config")
    parser.add_argument("--data", required=True, help="dataset root (for ADE20K: the ADEChallengeData2016 folder)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the config's test_cfg")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale (0.5 ... 1.75) with flip")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None,
                        help="write the results as JSON here (every figure in percent, per class with its name)")
    parser.add_argument("--show-dir", default=None,
                        help="write each image with its prediction drawn over it (and a legend) to this folder")
    parser.add_argument("--opacity", type=float, default=0.5, help="of the prediction in --show-dir (0 to 1)")
    parser.add_argument("--check-data", action="store_true",
                        help="first check every image and label (as python -m segvit.data check) and stop, listing "
                             "the bad files, if any is bad")
    args = parser.parse_args(argv)

    import segvit
    from segvit.data import build_dataset, eval_pipeline
    from segvit.metrics import format_table

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if not 0 <= args.opacity <= 1:
        parser.error(f"--opacity: expected a number in [0, 1], got {args.opacity}")
    if args.pretrained and (error := segvit.hub.no_official_weights(args.config, "--pretrained", "--config")):
        parser.error(error)  # at once, before the data (and their check)
    cfg = load_config(args.config)
    dataset = build_dataset(cfg, args.split, args.data)
    if args.check_data:  # every process checks all of it, so all stop together
        from segvit.data import check_dataset

        check_dataset({args.split: dataset}, raise_errors=True, progress=not distributed or dist.get_rank() == 0)
    model = model_from_arguments(parser, args, args.config, cfg, "--config")
    segvit.apply_fused_kernels(model).to(device)
    names, palette, background = dataset_classes(cfg, model.num_classes)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    results = evaluate(model, dataset, eval_pipeline(cfg, args.split), mode=args.mode, aug_test=args.aug_test,
                       device=device, dtype=dtype, show_dir=args.show_dir, class_names=names, palette=palette,
                       opacity=args.opacity)
    results = headline(results, background)
    if not distributed or dist.get_rank() == 0:
        print(format_table(results, names))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report(results, names), f, indent=1)
    if distributed:
        dist.destroy_process_group()
    return results


def cli() -> None:
    """Console script ``segvit-eval``: main() returns its results for callers; a console script's return value would
    become its exit status."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
