"""``python -m benchmarks [--device cpu|cuda] [--quick] [--ops NAMES] [--out DIR]``

Times every fused op of segvit at the published models' shapes, and whole-model inference and training steps,
for the eager backend, the best plain-PyTorch composition, xformers (CUDA) and every fused backend that takes
the inputs; measures peak memory and the device's roofline; prints a table and writes results.json,
results.csv, table.txt and plots/*.png (formats: benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import signal
import sys
import time
import traceback

import torch
from tqdm import tqdm

from benchmarks import cases as cases_mod
from benchmarks import measure, report


def _settings_dict(settings):
    return {"device": settings.device, "quick": settings.quick, "groups": tuple(settings.groups),
            "dtypes": tuple(settings.dtypes), "models": settings.models}


# Op calls slower than SLOW_CALL_S get at most SLOW_ROUNDS rounds, model calls slower than SLOW_MODEL_CALL_S at most
# SLOW_MODEL_ROUNDS: the default CPU run must fit in 10 minutes.
SLOW_CALL_S, SLOW_ROUNDS = 1.0, 3
SLOW_MODEL_CALL_S, SLOW_MODEL_ROUNDS = 10.0, 2
VERY_SLOW_MODEL_CALL_S = 20.0  # a Shrunk ViT-L training step (~27 s here): one timed round
# The CPU memory subprocess warms up only calls faster than this (a slower call's peak dwarfs one-time allocations).
MEMORY_WARMUP_BELOW_S = 0.5


def _error(exc):
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _cap_rounds(first, rounds, slow_s, slow_rounds, progress, count):
    if first and max(first.values()) > slow_s and rounds > slow_rounds:
        if progress is not None:  # the skipped blocks still tick the bar
            progress.update((rounds - slow_rounds) * count)
        return slow_rounds
    return rounds


def _rows(case, failed, timings, planned_rounds, progress):
    rows = []
    for variant in case.variants:
        row = report.base_row(case, variant.name)
        if variant.name in failed:
            row.update(status="n/a" if failed[variant.name].startswith("n/a") else "error",
                       reason=failed[variant.name])
            if progress is not None:
                progress.update(planned_rounds + 1)
        else:
            t = timings[variant.name]
            row.update(status="ok", median_ms=t["median_s"] * 1e3, p20_ms=t["p20_s"] * 1e3, p80_ms=t["p80_s"] * 1e3,
                       min_ms=t["min_s"] * 1e3, max_ms=t["max_s"] * 1e3, rounds=t["rounds"], number=t["number"])
        rows.append(row)
    return rows


def run_case(case, settings, rounds, block_target_s, memory_server, progress=None):
    """Rows (one per variant) of one case: warm-up, timing interleaved over the variants, memory per variant."""
    if case.heavy and settings.device == "cpu":
        return run_model_case_cpu(case, settings, rounds, block_target_s, memory_server, progress)
    device = settings.device
    planned_rounds = rounds
    state = case.setup()
    fns, first, failed = {}, {}, {}
    for variant in case.variants:
        try:
            start = time.perf_counter()
            fn = variant.make(state, check=not case.heavy)  # op cases: the check call is the first warm-up
            if case.heavy and variant.name == "eager":
                case.flops = measure.count_flops(fn)[0]  # the model's warm-up, counted
            elif case.heavy:
                fn()
            measure.sync(device)
            elapsed = time.perf_counter() - start
            # The warm-up's time sizes the timing blocks of slow calls (one call per block whatever it says);
            # a fast call gets a second, warm, call to size its blocks.
            first[variant.name] = elapsed if elapsed > 2 * block_target_s else measure.one_call_s(fn, device)
            fns[variant.name] = fn
        except cases_mod.NotAvailable as exc:
            failed[variant.name] = f"n/a: {exc}"
        except Exception as exc:  # a variant that crashes is reported as such, never silently dropped
            failed[variant.name] = _error(exc)
            traceback.print_exc()
    slow = (SLOW_MODEL_CALL_S, SLOW_MODEL_ROUNDS) if case.heavy else (SLOW_CALL_S, SLOW_ROUNDS)
    rounds = _cap_rounds(first, rounds, *slow, progress, len(fns))
    on_block = (lambda: progress.update(1)) if progress is not None else None
    timings = measure.time_interleaved(fns, rounds, block_target_s, device, first, on_block)
    rows = _rows(case, failed, timings, planned_rounds, progress)
    if device == "cuda":
        # in-process: the caching allocator's statistics isolate each call
        for row in rows:
            if row["status"] == "ok":
                peak, out = measure.cuda_peak(fns[row["variant"]])
                row.update(peak_mem_mb=peak / 2 ** 20, output_mb=out / 2 ** 20)
                if progress is not None:
                    progress.update(1)
        del state, fns
    else:
        del state, fns
        gc.collect()
        for row in rows:
            if row["status"] == "ok":
                mem = memory_server.measure(_settings_dict(settings), case.id, row["variant"],
                                            warmup=first[row["variant"]] < MEMORY_WARMUP_BELOW_S)
                if "error" in mem:
                    row["mem_note"] = mem["error"]
                else:
                    row.update(peak_mem_mb=mem["peak_bytes"] / 2 ** 20, output_mb=mem["output_bytes"] / 2 ** 20)
                if progress is not None:
                    progress.update(1)
    return rows


def run_model_case_cpu(case, settings, rounds, block_target_s, memory_server, progress=None):
    """A model case on the CPU: each variant lives in its own fresh process (forked from the memory server), whose
    first call is the warm-up, the memory measurement and (eager) the FLOP count; the parent then interleaves
    the timing blocks over the processes. A training step takes a minute on a loaded 2-core machine: this costs
    no call beyond the warm-up and the timed ones."""
    planned_rounds = rounds
    workers, first, memory, failed = {}, {}, {}, {}
    try:
        for variant in case.variants:
            worker = measure.ModelWorker(memory_server, _settings_dict(settings), case.id, variant.name)
            if "error" in worker.ready:
                failed[variant.name] = "error: " + worker.ready["error"]
                worker.close()
                continue
            workers[variant.name] = worker
        for name, worker in list(workers.items()):
            reply = worker.request("first")
            if "error" in reply:
                failed[name] = "error: " + reply["error"]
                workers.pop(name).close()
                continue
            first[name], memory[name] = reply["first_s"], reply
            if name == "eager":
                case.flops = reply["flops"]
            if progress is not None:
                progress.update(1)  # the memory step of the bar
        rounds = _cap_rounds(first, rounds, SLOW_MODEL_CALL_S, SLOW_MODEL_ROUNDS, progress, len(workers))
        rounds = _cap_rounds(first, rounds, VERY_SLOW_MODEL_CALL_S, 1, progress, len(workers))

        def block(name, number):
            reply = workers[name].request("time", number)
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply["seconds"]

        on_block = (lambda: progress.update(1)) if progress is not None else None
        try:
            timings = measure.time_interleaved(dict.fromkeys(workers), rounds, block_target_s, "cpu", first,
                                               on_block, block)
        except RuntimeError as exc:
            failed.update({name: _error(exc) for name in workers})
            timings = {}
    finally:
        for worker in workers.values():
            worker.close()
    rows = _rows(case, failed, timings, planned_rounds, progress)
    for row in rows:
        if row["variant"] in memory and row["status"] == "ok":
            mem = memory[row["variant"]]
            row.update(peak_mem_mb=mem["peak_bytes"] / 2 ** 20, output_mb=mem["output_bytes"] / 2 ** 20)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="ViT-B 512 shapes only (query pooling: Shrunk ViT-L 640), fewer rounds (CPU: ViT-B "
                             "model only, one timed round)")
    parser.add_argument("--ops", default=",".join(cases_mod.GROUPS),
                        help=f"comma-separated subset of: {', '.join(cases_mod.GROUPS)} (default: all), and the "
                             f"opt-in train_memory (training-step peak memory per model, backend, checkpointing, "
                             f"precision and batch, a fresh process each: about 20 min on a CPU; "
                             f"python -m benchmarks.train_memory has its options)")
    parser.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    args = parser.parse_args(argv)
    if argv is None:  # the command line: a terminated run still ends its worker processes (finally blocks run)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    groups = tuple(g.strip() for g in args.ops.split(",") if g.strip())
    unknown = set(groups) - set(cases_mod.GROUPS) - {"train_memory"}
    if unknown:
        parser.error(f"--ops: unknown {', '.join(sorted(unknown))}; expected names from "
                     f"{', '.join(cases_mod.GROUPS + ('train_memory',))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if "train_memory" in groups:
        from benchmarks import train_memory

        rows, summary = train_memory.run(args.device, out_dir=os.path.join(args.out, "train_memory"))
        print(train_memory.markdown(rows, summary))
        groups = tuple(g for g in groups if g != "train_memory")
        if not groups:
            return
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; the Triton interpreter is never benchmarked (CPU: cpp only)")
    started = time.time()
    dtypes = ("float32", "bfloat16") if args.device == "cuda" else ("float32",)
    settings = cases_mod.Settings(device=args.device, quick=args.quick, groups=groups, dtypes=dtypes)
    cases = cases_mod.build_cases(settings)
    op_rounds, model_rounds = (3, 1) if args.quick else (5, 3)
    block_target_s = 0.1 if args.quick else 0.2
    peak_dtypes = sorted({c.dtype for c in cases}) or ["float32"]
    print(f"measuring the {args.device} roofline (matmul, copy)...", flush=True)
    load_start = os.getloadavg()
    peaks_start = measure.device_peaks(args.device, peak_dtypes, quick=args.quick)
    memory_server = measure.MemoryServer() if args.device == "cpu" else None
    per_variant = lambda c: (model_rounds if c.heavy else op_rounds) + 1  # noqa: E731  timing blocks + memory
    total = sum(per_variant(c) * len(c.variants) for c in cases)
    per_case, case_wall_s = [], {}
    with tqdm(total=total, desc="benchmarks", unit="step", dynamic_ncols=True) as progress:
        for case in cases:
            progress.set_postfix_str(case.id, refresh=True)
            case_start = time.time()
            per_case.append((case, run_case(case, settings, model_rounds if case.heavy else op_rounds,
                                            block_target_s, memory_server, progress)))
            case_wall_s[case.id] = round(time.time() - case_start, 1)
    # The roofline is measured before and after the cases and the better of the two kept: on a shared machine
    # either measurement may have been slowed by other work.
    peaks_end = measure.device_peaks(args.device, peak_dtypes, quick=args.quick)
    peaks = measure.best_peaks(peaks_start, peaks_end)
    rows = []
    for case, case_rows in per_case:
        report.derive(case_rows, case, peaks)
        rows += case_rows
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    meta = report.machine_meta(args.device)
    meta.update(load_average_start=list(load_start), load_average_end=list(os.getloadavg()),
                cpu_time_s=round(sum(u.ru_utime + u.ru_stime for u in usage), 1), case_wall_s=case_wall_s,
                peaks_start=peaks_start, peaks_end=peaks_end)
    meta.update(settings={"quick": args.quick, "groups": list(groups), "dtypes": list(dtypes),
                          "op_rounds": op_rounds, "model_rounds": model_rounds, "block_target_s": block_target_s,
                          "timing": measure.__doc__.split("\n\n")[1].replace("\n", " "),
                          "memory": measure.__doc__.split("\n\n")[2].replace("\n", " ")},
                peaks=peaks, started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
                duration_s=round(time.time() - started, 1))
    report.write_all(args.out, meta, rows)
    print(report.format_table(rows, meta))
    print(f"\nwrote {args.out}/results.json, results.csv, table.txt and plots/ in {meta['duration_s']:.0f} s")


if __name__ == "__main__":
    main()
