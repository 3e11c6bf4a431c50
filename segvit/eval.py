"""Evaluate a SegViT checkpoint on a dataset as mmsegmentation's ``tools/test.py`` does.

    python -m segvit.eval --config NAME_OR_JSON --checkpoint PATH --data DIR [--mode whole|slide] [--aug-test]

Per image: the config's test pipeline (keep-ratio resize to ``img_scale * ratio``, ``min_size`` where the config
has it, normalisation), ``model.predict`` (whole image or sliding windows with the config's crop and stride; crops
smaller than the window simply run at their size), scores resized to the original image (bilinear), softmax,
flipped back for flipped inputs, averaged over the scales and flips (``--aug-test``: ratios 0.5 ... 1.75 and a
horizontal flip), argmax. IoU areas are summed over the dataset (``segvit.metrics``). Under ``torchrun`` the
images are split over the processes and the areas summed.
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


def load_config(name_or_json: str) -> dict:
    """A published model name (``segvit.list_models()``) or the path of a JSON config of the same form."""
    import segvit

    if name_or_json in segvit.list_models():
        return segvit.published_config(name_or_json)
    if os.path.isfile(name_or_json):
        with open(name_or_json) as f:
            return json.load(f)
    raise ValueError(f"--config: {name_or_json!r} is neither a published model ({', '.join(segvit.list_models())}) "
                     f"nor an existing JSON file")


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
             dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """``segvit.metrics`` results over ``dataset`` (raw items: uint8 image, label), sharded over processes
    when torch.distributed is initialised."""
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
        acc.update(probs.argmax(0).cpu(), torch.from_numpy(np.asarray(label)))
    if distributed:
        areas = acc.areas().to(device)
        dist.all_reduce(areas)
        acc = IoUAccumulator(model.num_classes, acc.ignore_index)
        acc.merge_(areas.cpu())
    model.train(was_training)
    return acc.compute()


def summary(results: dict) -> dict:
    """The JSON-friendly part of the results (percent, as mmseg prints them)."""
    return {k: round(100 * results[k], 2) for k in ("mIoU", "aAcc", "mAcc")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m segvit.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="published model name or JSON config file")
    parser.add_argument("--checkpoint", required=True, help="original (mmcv) or segvit checkpoint (.pth)")
    parser.add_argument("--data", required=True, help="dataset root (for ADE20K: the ADEChallengeData2016 folder)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the config's test_cfg")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale (0.5 ... 1.75) with flip")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
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
    cfg = load_config(args.config)
    dataset = build_dataset(cfg, args.split, args.data)
    if args.check_data:  # every process checks all of it, so all stop together
        from segvit.data import check_dataset

        check_dataset({args.split: dataset}, raise_errors=True, progress=not distributed or dist.get_rank() == 0)
    model = segvit.build_model(cfg["model"], checkpoint=args.checkpoint)  # original, or segvit.train's "model"
    segvit.apply_fused_kernels(model).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    results = evaluate(model, dataset, eval_pipeline(cfg, args.split), mode=args.mode, aug_test=args.aug_test,
                       device=device, dtype=dtype)
    if not distributed or dist.get_rank() == 0:
        print(format_table(results))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**summary(results), "IoU": [None if np.isnan(v) else v for v in results["IoU"].tolist()]},
                          f)
    if distributed:
        dist.destroy_process_group()
    return results


def cli() -> None:
    """Console script ``segvit-eval``: main() returns its results for callers; a console script's return value would
    become its exit status."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
