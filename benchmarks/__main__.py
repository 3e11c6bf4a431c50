"""``python -m benchmarks [--device cpu|cuda] [--quick] [--ops NAMES] [--out DIR]``

Times whole-model inference of the published SegViT configurations (batch 1, random weights: speed does not
depend on the values) under the eager backend and under ``auto`` (the fused kernels where built), and the fused
ops that exist against their eager composition. Prints a table and writes ``results.json`` and ``results.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import torch
from tqdm import tqdm

import segvit

QUICK_MODELS = ["segvit_vit-b16_ade20k_512", "segvit_vit-l16_shrunk_ade20k_640"]


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median and spread (max - min) in seconds over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], times[-1] - times[0]


def model_cases(names, device, repeats):
    for name in names:
        torch.manual_seed(0)
        model = segvit.build_model(name).to(device).eval()
        size = model.head.img_size
        images = torch.randn(1, 3, size, size, device=device)
        for backend in ("eager", "auto"):
            with segvit.ops.use_backend(backend), torch.no_grad():
                median, spread = median_time(lambda: model.predict(images, mode="whole"), repeats)
            yield {"case": f"{name} predict(whole) b1", "variant": backend, "median_s": median, "spread_s": spread}
        del model


def op_cases(device, repeats, ops):
    if "mask_classify" in ops:
        for classes, grid, size in ((150, 40, 640), (150, 32, 512)):
            cls = torch.randn(1, classes, classes + 1, device=device)
            masks = torch.randn(1, classes, grid, grid, device=device)
            for backend in ("eager", "auto"):
                with segvit.ops.use_backend(backend):
                    median, spread = median_time(lambda: segvit.ops.mask_classify(cls, masks, (size, size)),
                                                 repeats)
                yield {"case": f"mask_classify B1 Q{classes} {grid}x{grid}->{size}x{size}", "variant": backend,
                       "median_s": median, "spread_s": spread}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="two models, fewer repeats")
    parser.add_argument("--ops", default="mask_classify,models", help="comma-separated: op names and/or 'models'")
    parser.add_argument("--out", default="bench-out", help="directory for results.json and results.csv")
    args = parser.parse_args(argv)
    wanted = set(args.ops.split(","))
    repeats = 3 if args.quick else 5
    names = QUICK_MODELS if args.quick else segvit.list_models()
    jobs = list(op_cases(args.device, repeats, wanted)) if wanted - {"models"} else []
    if "models" in wanted:
        for row in tqdm(model_cases(names, args.device, 1 if args.quick else 3), total=2 * len(names),
                        desc="models", unit="case"):
            jobs.append(row)
    eager = {r["case"]: r["median_s"] for r in jobs if r["variant"] == "eager"}
    for row in jobs:
        row["speedup_vs_eager"] = eager[row["case"]] / row["median_s"]
    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(), "segvit": segvit.__version__,
            "backends": segvit.ops.available_backends()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": jobs}, f, indent=1)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "variant", "median_s", "spread_s", "speedup_vs_eager"])
        writer.writeheader()
        writer.writerows(jobs)
    print(f"\n{'case':58s} {'variant':8s} {'median ms':>10s} {'spread ms':>10s} {'vs eager':>9s}")
    for r in jobs:
        print(f"{r['case']:58s} {r['variant']:8s} {r['median_s'] * 1e3:10.1f} {r['spread_s'] * 1e3:10.1f} "
              f"{r['speedup_vs_eager']:8.2f}x")
    print(f"\nwrote {args.out}/results.json and results.csv")


if __name__ == "__main__":
    main()
