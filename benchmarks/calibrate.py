"""The static cost model next to a measurement: each published launch case estimated and timed on this GPU.

    python -m benchmarks.calibrate --out DIR [--gpu A100|H100] [--model M ...] [--batch 8] [--dtype bf16] [--op OP]

On a CUDA machine, for every case of ``segvit.kernels.launch_cases`` selected (default: ViT-L 640 and Shrunk ViT-L
640, batch 8, bf16: the shapes of the cost-model table in ``kernels/README.md``), the Triton path is estimated by
``benchmarks.estimate`` for the model GPU closest to this one and then timed here (``triton.testing.do_bench``,
median, after its warm-up; the autotuner's first call is outside the timing) on the same inputs the compile report
launches. Writes ``calibration.json`` (both numbers per case, the estimate's per-kernel detail) and
``calibration.md`` (the table ``benchmarks.gpu_check`` puts in its summary). A measured/estimate ratio far from 1
says where the model is wrong: the measurement wins and the model is corrected (issue 10).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODELS = ("segvit_vit-l16_ade20k_640", "segvit_vit-l16_shrunk_ade20k_640")
COLUMNS = ("case", "model GPU", "estimate us", "measured us", "measured / estimate", "floor us", "measured / floor")


def model_gpu(device_name: str) -> str | None:
    """The cost model's GPU for a CUDA device name (H200: the H100 model, same SMs; its HBM is faster)."""
    name = device_name.upper()
    if "A100" in name:
        return "A100"
    if "H100" in name or "H200" in name or "GH200" in name:
        return "H100"
    return None


def time_case_us(case, backward: bool, device: str = "cuda") -> float:
    """Median time of one call (forward, or forward + backward) of the case's Triton path on ``device``."""
    import triton.testing

    fn = case.callable_on(device, backward)
    fn()  # autotuning and JIT compilation, outside the timing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def run(cases, gpu: str, measure=time_case_us, estimates=None) -> list[dict]:
    """One row per (case, mode): the estimate on model GPU ``gpu`` and ``measure(case, backward)`` in us."""
    from benchmarks import estimate

    if estimates is None:
        estimates = estimate.run(cases, gpus=(gpu,), progress=True)
    pairs = [(case, backward) for case in cases for backward in estimate.case_modes(case)]
    if len(pairs) != len(estimates):
        raise RuntimeError(f"{len(estimates)} estimates for {len(pairs)} case modes")
    rows = []
    for (case, backward), est in zip(pairs, estimates):
        try:
            measured, problem = measure(case, backward), None
        except Exception as exc:  # one failing case is reported, the others still run
            measured, problem = None, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        est_us, floor_us = est["estimate_us"], est["floor_us"]
        rows.append(dict(id=est["id"], gpu=gpu, estimate_us=est_us, measured_us=measured, floor_us=floor_us,
                         measured_over_estimate=measured / est_us if measured and est_us else None,
                         measured_over_floor=measured / floor_us if measured and floor_us else None,
                         problem=problem, estimate=est))
    return rows


def markdown(rows: list[dict]) -> str:
    from benchmarks.estimate import _fmt

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        measured = _fmt(r["measured_us"]) if r["problem"] is None else f"failed: {r['problem']}".replace("|", "/")
        lines.append("| " + " | ".join([r["id"], r["gpu"], _fmt(r["estimate_us"]), measured,
                                        _fmt(r["measured_over_estimate"], ".2f"), _fmt(r["floor_us"]),
                                        _fmt(r["measured_over_floor"], ".2f")]) + " |")
    return "\n".join(lines)


def write(rows: list[dict], out: str, device_name: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "calibration.json"), "w") as f:
        json.dump({"device": device_name, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(out, "calibration.md"), "w") as f:
        f.write(f"Cost model against measurement on {device_name} (estimates for the model GPU in the second "
                "column; `python -m benchmarks.calibrate`):\n\n" + markdown(rows) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--gpu", choices=["A100", "H100"], help="cost-model GPU (default: from the device name)")
    parser.add_argument("--model", action="append", help=f"published model (repeatable; default {DEFAULT_MODELS})")
    parser.add_argument("--batch", type=int, action="append", help="batch (repeatable; default 8)")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp32"], help="dtype (repeatable; default bf16)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.calibrate: no CUDA device; the estimates alone: python -m benchmarks.estimate",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks.calibrate: unset TRITON_INTERPRET (it times the compiled kernels)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name()
    gpu = args.gpu or model_gpu(device_name)
    if gpu is None:
        print(f"benchmarks.calibrate: no cost model for {device_name!r}; pass --gpu A100 or --gpu H100",
              file=sys.stderr)
        return 2
    from segvit.kernels import launch_cases

    cases = [c for c in launch_cases.published_cases(models=args.model or DEFAULT_MODELS,
                                                     batches=tuple(args.batch or (8,)),
                                                     dtypes=tuple(args.dtype or ("bf16",)))
             if not args.op or c.op in args.op]
    started = time.time()
    rows = run(cases, gpu)
    write(rows, args.out, device_name)
    print(markdown(rows))
    print(f"\n{len(rows)} cases in {time.time() - started:.0f} s; wrote {args.out}/calibration.json and .md")
    return 0 if all(r["problem"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
