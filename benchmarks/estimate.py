"""Static cost model of the fused Triton path on A100 and H100, from the machine code that would launch (an estimate).

    python -m benchmarks.estimate                      # table on stdout
    python -m benchmarks.estimate --markdown --json benchmarks/results/estimates.json

For every published launch case (``segvit/kernels/launch_cases.py``: each op of each published model, batch 1
and 8, bf16 and fp32, the ATM attention with dropout 0 and 0.1) the real launchers run in compile-only mode, and
each recorded Triton launch is costed from its SASS (``segvit/kernels/sass.py``):

* **Issue**: per-warp instructions of a program = straight-line code + each loop's body x its trip count (trip
  counts from the kernel module's ``LOOP_TRIPS``, from the launch's arguments). A scheduler issues one
  warp-instruction per cycle; FP32/IMAD instructions occupy the FMA pipe 2 cycles on A100 (16 lanes per scheduler)
  and 1 on H100 (32), MUFU 8 cycles (4 lanes), loads/stores 4 cycles (8 lanes); the busiest of these per scheduler
  times the warps sharing it. A scheduler with one warp is assumed to issue every other cycle (latency).
* **Tensor cores**: FLOPs of the executed HMMA (mma.sync) / HGMMA (wgmma) instructions, padding included, over the
  SM's tensor peak.
* **Occupancy and waves**: resident programs per SM from registers, shared memory and warps
  (``compile_report.blocks_per_sm``); waves = ceil(programs / (resident x SMs)).
* **Memory**: the bytes of every tensor argument, read or written once (re-reads are assumed to hit L2), over HBM
  bandwidth.
* **Launch**: 3 us per kernel.

A kernel's estimate is max(waves x max(issue, tensor) cycles / clock, memory) + launch. An op's estimate adds its
kernels and the ATen ops its launcher runs (the similarity GEMM, softmax, sums), each of those costed like eager's.
**Eager's estimate**: every ATen op of the eager path (recorded with a dispatch mode; on the meta device where the
op has no data-dependent shape) at max(bytes / bandwidth, FLOPs / peak) plus one launch; views and allocations
cost nothing. **Floor**: max(FLOPs / peak, bytes / bandwidth) with ``benchmarks.counts`` (the same counts as the
measured benchmark). The model ignores caches beyond "L2 absorbs re-reads", bank conflicts, and latency hiding
beyond the rule above; a measured time (``python -m benchmarks.gpu_check``) replaces it and calibrates it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import counts

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "README.md")
BEGIN, END = "<!-- cost-model:begin -->", "<!-- cost-model:end -->"
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    bandwidth: float       # bytes/s
    tensor_flops: float    # dense bf16/fp16 FLOP/s
    fp32_flops: float      # FP32 FMA FLOP/s (what float32 dots run on: TF32 is off, PyTorch's default)
    fma_cycles: int        # cycles one warp's FP32 instruction occupies a scheduler's FMA pipe
    sfu_cycles: int = 8
    lsu_cycles: int = 4
    launch_s: float = 3e-6

    @property
    def tensor_flops_per_sm_cycle(self) -> float:
        return self.tensor_flops / (self.sms * self.clock_ghz * 1e9)


GPUS = {
    "A100": Gpu("A100 SXM4 80GB", 80, 108, 1.41, 2.0e12, 312e12, 19.5e12, fma_cycles=2),
    "H100": Gpu("H100 SXM5", 90, 132, 1.98, 3.35e12, 989e12, 67e12, fma_cycles=1),
}

# ------------------------------------------------------------------------------------------- ATen op costs

_FREE = ("empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "detach", "alias", "_to_copy_meta",
         "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense", "item")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class AtenRecorder(TorchDispatchMode):
    """Records (op name, bytes read + written, matmul FLOPs, dtype) of every ATen op that launches a kernel.
    Custom ``segvit::`` ops are entered, so the ATen ops of a launcher are seen; views and allocations are free."""

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "segvit":
            # A custom op's implementation, run with this mode still active so its ATen calls are recorded.
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None and opdef._init_fn is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        view = any(r.alias_info is not None for r in func._schema.returns)
        if view or name in _FREE or name.startswith("empty"):
            return out
        from torch.utils.flop_counter import flop_registry

        flops = 0
        packet = func._overloadpacket
        if packet in flop_registry:
            try:
                flops = int(flop_registry[packet](*args, out_val=out, **kwargs))
            except Exception:  # a registry entry that cannot price these arguments counts as no FLOPs
                flops = 0
        ins = {id(t): _nbytes(t) for t in _tensors((args, kwargs))}
        outs = sum(_nbytes(t) for t in _tensors(out))
        dtype = next((t.dtype for t in _tensors(out)), torch.float32)
        self.ops.append({"op": name, "bytes": sum(ins.values()) + outs, "flops": flops, "dtype": str(dtype)})
        return out


def aten_time(op: dict, gpu: Gpu) -> float:
    half = op["dtype"] in ("torch.bfloat16", "torch.float16")
    peak = gpu.tensor_flops if half else gpu.fp32_flops
    return max(op["bytes"] / gpu.bandwidth, op["flops"] / peak) + gpu.launch_s


# ------------------------------------------------------------------------------------------- Triton kernel costs

def loop_trips(launch) -> list[float] | None:
    """Trip counts of the kernel's loops (SASS address order; a nested loop counts its total iterations per
    program, possibly a fractional average), from the ``LOOP_TRIPS`` entry of the kernel's module (called with the
    launch's scalars, constexprs, tags, ``<arg>_shape`` and ``programs``); None when it has none."""
    import importlib

    module = importlib.import_module(launch.kernel.src.fn.__module__)
    rule = getattr(module, "LOOP_TRIPS", {}).get(launch.fn_name)
    if rule is None:
        return None
    args = dict(launch.scalars, **launch.constexprs, **{k: v for k, v in launch.tags.items()})
    args.update({f"{k}_shape": v[0] for k, v in launch.shapes.items()}, programs=launch.programs)
    return [max(0, t) for t in rule(args)]


def kernel_time(launch, gpu: Gpu) -> dict:
    from segvit.kernels import sass
    from segvit.kernels.compile_report import blocks_per_sm

    info = sass.analyse(launch.kernel.asm["cubin"])
    trips = loop_trips(launch)
    result = {"kernel": launch.fn_name, "programs": launch.programs, "num_warps": launch.num_warps,
              "config": dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)}
    if trips is None or len(trips) != len(info["loops"]):
        result["problem"] = (f"no trip counts for {len(info['loops'])} loop(s) of {launch.fn_name}"
                             + (f" (LOOP_TRIPS gives {len(trips)})" if trips is not None else ""))
        return result
    program = sass.Mix().add(info["straight"])
    for body, n in zip(info["bodies"], trips):
        program.add(body, n)
    regs = info["resources"]["regs"]
    smem = int(launch.kernel.metadata.shared)
    resident = blocks_per_sm(regs, launch.num_warps, smem, gpu.arch)
    if resident == 0:
        result["problem"] = "does not fit an SM"
        return result
    waves = math.ceil(launch.programs / (resident * gpu.sms))
    per_sm = min(resident, math.ceil(launch.programs / gpu.sms))  # programs sharing an SM in a full wave
    warps_per_scheduler = per_sm * launch.num_warps / 4
    pipe = max(program.total, program.fma * gpu.fma_cycles, program.sfu * gpu.sfu_cycles,
               program.memory * gpu.lsu_cycles)
    issue_cycles = max(warps_per_scheduler * pipe, 2 * program.total)
    tensor_cycles = per_sm * launch.num_warps * program.tensor_flops / gpu.tensor_flops_per_sm_cycle
    compute_s = waves * max(issue_cycles, tensor_cycles) / (gpu.clock_ghz * 1e9)
    moved = sum(math.prod(shape) * torch.tensor([], dtype=getattr(torch, TORCH_NAMES.get(dt, dt))).element_size()
                for shape, dt in launch.shapes.values())
    memory_s = moved / gpu.bandwidth
    bound = "tensor" if tensor_cycles > issue_cycles else "issue"
    if memory_s > compute_s:
        bound = "memory"
    result.update(instructions_per_program=program.total, waves=waves, resident=resident, regs=regs,
                  issue_us=waves * issue_cycles / gpu.clock_ghz / 1e3, tensor_us=waves * tensor_cycles / gpu.clock_ghz
                  / 1e3, memory_us=memory_s * 1e6, bound=bound,
                  time_us=(max(compute_s, memory_s) + gpu.launch_s) * 1e6)
    return result


# ------------------------------------------------------------------------------------------- cases

def _floor(case, gpu: Gpu, backward: bool) -> float:
    s, elem = case.shape, {"bf16": 2, "fp16": 2, "fp32": 4}[case.dtype]
    half = case.dtype != "fp32"
    peak = gpu.tensor_flops if half else gpu.fp32_flops
    if case.op == "atm_attention":
        flops, moved = counts.atm_attention(case.batch, s["classes"], s["grid"] ** 2, s["heads"], s["head_dim"],
                                            backward=backward, elem=elem)
    elif case.op == "mask_classify":
        flops, moved = counts.mask_classify(case.batch, s["classes"], s["classes"], (s["grid"], s["grid"]),
                                            (s["img"], s["img"]), elem=elem)
    elif case.op == "query_pool_attention":
        from segvit.ops.query_pool_attention import pooled_grid

        pooled = math.prod(pooled_grid((s["grid"], s["grid"])))
        flops, moved = counts.query_pool_attention(case.batch, s["grid"] ** 2, pooled, s["channels"],
                                                   backward=backward, elem=elem)
    else:
        from segvit.kernels.launch_cases import PRESENT_PER_IMAGE

        flops, moved = counts.mask_losses(case.batch, s["classes"], (s["grid"], s["grid"]), (s["img"], s["img"]),
                                          case.batch * PRESENT_PER_IMAGE, backward=backward, elem=elem)
        peak = gpu.fp32_flops  # no products: CUDA-core arithmetic
    return counts.roofline_floor(flops, moved, peak, gpu.bandwidth)


def _eager_ops(case, backward: bool) -> list[dict]:
    """The ATen ops of the eager (original) path of this case, on the meta device unless the op needs data."""
    import importlib

    from segvit.kernels import launch_cases as lc

    # segvit.ops re-exports each op function under its module's name: import the modules themselves.
    atm, mc, ml, qp = (importlib.import_module(f"segvit.ops.{name}") for name in
                       ("atm_attention", "mask_classify", "mask_losses", "query_pool_attention"))

    s, B, dt = case.shape, case.batch, lc.TORCH_DTYPES[case.dtype]
    meta = case.op != "mask_losses"  # the losses select the present classes: data-dependent shapes

    def make(shape, grad=False, scale=1.0):
        if meta:
            return torch.empty(shape, dtype=dt, device="meta", requires_grad=grad)
        return lc._randn(shape, case.dtype, 0, scale=scale, grad=grad)

    recorder = AtenRecorder()
    with torch.set_grad_enabled(backward):
        if case.op == "atm_attention":
            q = make((B, s["classes"], s["heads"], s["head_dim"]), backward)
            k = make((B, s["grid"] ** 2, s["heads"], s["head_dim"]), backward)
            v = make((B, s["grid"] ** 2, s["heads"], s["head_dim"]), backward)
            inputs = (q, k, v)
            with recorder:
                outputs = atm.eager(q, k, v, scale=s["head_dim"] ** -0.5, dropout_p=case.dropout)
        elif case.op == "mask_classify":
            cls = make((B, s["classes"], s["classes"] + 1))
            masks = make((B, s["classes"], s["grid"], s["grid"]))
            with recorder:
                outputs = mc.eager(cls, masks, (s["img"], s["img"]))
            inputs = ()
        elif case.op == "query_pool_attention":
            C = s["channels"]
            inputs = (make((B, s["grid"] ** 2, C), backward), make((3 * C, C), backward), make((3 * C,), backward))
            with recorder:
                outputs = (qp.eager(inputs[0], (s["grid"], s["grid"]), inputs[1], inputs[2], s["backbone_heads"],
                                    stride=2),)
        else:
            logits = make((B, s["classes"], s["grid"], s["grid"]), backward, scale=3.0)
            labels = lc.training_labels(B, s["img"], s["classes"], seed=8)
            inputs = (logits,)
            with recorder:
                outputs = ml.eager(logits, labels)[:2]
        if backward:
            outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
                       if isinstance(o, torch.Tensor) and o.requires_grad]
            with recorder:
                torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
    return recorder.ops


def estimate_case(case, launches_by_arch: dict, aten_by_pass: dict, gpu: Gpu, backward: bool) -> dict:
    """Fused-path and eager estimates of one case (forward, or forward+backward) on ``gpu``."""
    passes = ("fwd", "bwd") if backward else ("fwd",)
    mine = [lnch for lnch in launches_by_arch[gpu.arch] if lnch.tags.get("case") == case.name
            and lnch.tags.get("pass_") in passes]
    kernels, problems = [], []
    # The autotuner tried every candidate before launching its pick; the model picks like it would: the fastest.
    candidates: list = []
    for lnch in mine:
        candidates.append(lnch)
        if lnch.tuning:
            continue
        costed = [kernel_time(c, gpu) for c in candidates if c.fn_name == lnch.fn_name]
        candidates = []
        ok = [c for c in costed if "time_us" in c]
        if not ok:
            problems += [c.get("problem", "?") for c in costed]
            continue
        kernels.append(min(ok, key=lambda c: c["time_us"]))
    aten = [op for p in passes for op in aten_by_pass.get(p, [])]
    aten_us = sum(aten_time(op, gpu) for op in aten) * 1e6
    fused_us = sum(k["time_us"] for k in kernels) + aten_us if not problems else None
    eager = _eager_ops(case, backward)
    eager_us = sum(aten_time(op, gpu) for op in eager) * 1e6
    floor_us = _floor(case, gpu, backward) * 1e6
    mode = ("fwd+bwd" if backward else "fwd") + (f"-dropout{case.dropout:g}" if case.dropout else "")
    return {"id": f"{case.op}/{case.model.replace('segvit_', '')}/{mode}/{TORCH_NAMES[case.dtype]}/B{case.batch}",
            "op": case.op, "model": case.model, "batch": case.batch, "dtype": case.dtype, "mode": mode,
            "gpu": gpu.name, "estimate_us": fused_us, "floor_us": floor_us,
            "estimate_over_floor": fused_us / floor_us if fused_us else None, "eager_estimate_us": eager_us,
            "eager_launches": len(eager), "eager_over_estimate": eager_us / fused_us if fused_us else None,
            "aten_us": aten_us, "aten_ops": [op["op"] for op in aten], "kernels": kernels, "problems": problems}


def case_modes(case) -> list[bool]:
    """The ``backward`` flags a case is estimated in, in order: a training op forward alone and then with its
    backward; the ATM attention in its case's own mode (its cases already split forward and training)."""
    return [False, True] if case.backward and case.op != "atm_attention" else [case.backward]


def run(cases=None, gpus=("A100", "H100"), progress=True) -> list[dict]:
    from segvit.kernels import launch_cases
    from segvit.kernels.compile_only import compile_only

    cases = cases if cases is not None else launch_cases.published_cases()
    launches_by_arch, aten = {}, {}
    for name in gpus:
        arch = GPUS[name].arch
        if arch in launches_by_arch:
            continue
        with compile_only(arch) as launches:
            for i, case in enumerate(cases):
                recorder = _PassRecorder()
                with recorder:
                    case.run()
                aten[case.name] = recorder.by_pass
                if progress:
                    print(f"  sm_{arch} [{i + 1}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)
        launches_by_arch[arch] = launches
    results = []
    for case in cases:
        for backward in case_modes(case):
            for name in gpus:
                results.append(estimate_case(case, launches_by_arch, aten[case.name], GPUS[name], backward))
    return results


class _PassRecorder(AtenRecorder):
    """AtenRecorder that files each op under the launch pass (fwd/bwd) current when it ran."""

    def __init__(self):
        super().__init__()
        self.by_pass: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from segvit.kernels.compile_only import _State

        before = len(self.ops)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        current = _State.tags.get("pass_")  # None: the case building its inputs, not part of the op
        if current is not None:
            self.by_pass.setdefault(current, []).extend(self.ops[before:])
        del self.ops[before:]
        return out


# ------------------------------------------------------------------------------------------- output

COLUMNS = ("case", "GPU", "estimate us", "bound", "floor us", "est/floor", "eager est us", "eager/est")


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table_rows(results: list[dict]) -> list[tuple]:
    rows = []
    for r in results:
        bounds = "+".join(sorted({k.get("bound", "?") for k in r["kernels"]})) or "-"
        rows.append((r["id"], r["gpu"].split()[0], _fmt(r["estimate_us"]), bounds, _fmt(r["floor_us"]),
                     _fmt(r["estimate_over_floor"], ".2f"), _fmt(r["eager_estimate_us"]),
                     _fmt(r["eager_over_estimate"], ".2f")))
    return rows


def markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def write_readme(results: list[dict], path: str = README, command: str = "--markdown") -> None:
    header = (f"Static cost model (an estimate, not a measurement: `python -m benchmarks.estimate {command}`; "
              "model in benchmarks/estimate.py). Times in microseconds for one op call; `bound` is what limits "
              "each kernel (issue slots, tensor cores, memory).")
    block = f"{BEGIN}\n{header}\n\n{markdown(results)}\n{END}"
    text = open(path, encoding="utf-8").read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Static cost model (estimate)\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="only the cases of this op (repeatable)")
    parser.add_argument("--batch", type=int, action="append", help="only this batch (repeatable)")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp32"], help="only this dtype (repeatable)")
    parser.add_argument("--gpu", action="append", choices=sorted(GPUS), help="only this GPU (repeatable)")
    parser.add_argument("--model", action="append", help="only this published model (repeatable)")
    parser.add_argument("--markdown", action="store_true", help="write the table into kernels/README.md")
    parser.add_argument("--json", help="write every estimate (with per-kernel detail) to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("estimate: unset TRITON_INTERPRET (the model reads compiled code)", file=sys.stderr)
        return 2
    from segvit.kernels import launch_cases

    cases = [c for c in launch_cases.published_cases(models=args.model, batches=tuple(args.batch or (1, 8)),
                                                     dtypes=tuple(args.dtype or ("bf16", "fp32")))
             if not args.op or c.op in args.op]
    start = time.time()
    results = run(cases, gpus=tuple(args.gpu or ("A100", "H100")))
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *table_rows(results))]
    for row in [COLUMNS] + table_rows(results):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    problems = [(r["id"], p) for r in results for p in r["problems"]]
    for case_id, problem in problems:
        print(f"no estimate for {case_id}: {problem}", file=sys.stderr)
    print(f"{len(results)} estimates, {len(problems)} problems, {time.time() - start:.0f} s", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": "static SASS cost model (estimate)", "gpus": {k: asdict(v) for k, v in GPUS.items()},
                       "estimates": results}, f, indent=1, default=str)
    if args.markdown:
        write_readme(results, command=" ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
