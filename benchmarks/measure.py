"""Timing, peak memory and the device's roofline peaks.

Time. CPU: ``time.perf_counter`` around one block of ``number`` calls per variant per round (after one untimed
call, unless the block is one call of 50 ms or more), in the process's thread count, ``number`` chosen so a block
lasts about ``block_s``; the rounds interleave the variants (rotating their order) so machine drift hits them
alike; the result is the median over rounds of the per-call time of a block, with p20/p80 and min/max over rounds
as the spread. CUDA: ``triton.testing.do_bench`` (CUDA events, median) per variant per round, interleaved the
same way.

Peak memory, the bytes a call needs above its inputs (outputs, saved tensors and temporaries included). CUDA:
``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()`` before it, in the timing process.
CPU: in a fresh process per variant (forked from a server that has only imported the modules, so no allocator
state of other variants), the inputs are built, the call runs once to warm up (op cases; model cases measure their
first call) and then once measured: the kernel's peak-resident mark (VmHWM) is reset through /proc/self/clear_refs
just before the call and read after it (where that reset is refused, a thread samples the resident set every
0.2 ms instead); the peak minus the resident set just before the call is the result. glibc is
told to serve every allocation from 256 KiB up by mmap (MALLOC_MMAP_THRESHOLD_, which also turns off its
adaptive threshold) so freed buffers leave the resident set and it follows what is live.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

PAGE = os.sysconf("SC_PAGE_SIZE")
MMAP_THRESHOLD = 256 * 1024


def percentile(values, p):
    """Linear-interpolated percentile (p in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * p / 100
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(times_s):
    """Median, p20, p80, min and max (seconds) of per-call times."""
    return {"median_s": statistics.median(times_s), "p20_s": percentile(times_s, 20),
            "p80_s": percentile(times_s, 80), "min_s": min(times_s), "max_s": max(times_s), "rounds": len(times_s)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def one_call_s(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def block_s(fn, number, device):
    """Per-call seconds of one block of ``number`` calls."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(20, int(number)), return_mode="median") / 1e3
    # Not torch.utils.benchmark.Timer.timeit: it runs max(number // 100, 2) untimed calls before every block, which
    # tripled the cost of the model cases (a Shrunk ViT-L training step is ~27 s here). Fast calls get one untimed
    # call (caches after the other variants' blocks); a call of 50 ms or more needs none.
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first >= 0.05 and number == 1:
        return first
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_interleaved(fns, rounds, block_target_s, device, first_call_s=None, on_block=None, block=None):
    """{name: summary} for the no-argument callables ``fns`` (already warmed up), interleaved over ``rounds``.
    ``first_call_s`` (name -> seconds of a warm call) sizes the blocks; missing entries are measured here.
    ``block(name, number)`` (default: ``block_s`` of ``fns[name]`` here) returns the per-call seconds of a block."""
    block = block or (lambda name, number: block_s(fns[name], number, device))
    first_call_s = dict(first_call_s or {})
    numbers = {}
    for name, fn in fns.items():
        if name not in first_call_s:
            first_call_s[name] = one_call_s(fn, device)
        # CUDA: ``number`` is do_bench's rep in ms
        numbers[name] = (max(1, round(block_target_s / max(first_call_s[name], 1e-9))) if device != "cuda"
                         else max(20, int(block_target_s * 1e3)))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            samples[name].append(block(name, numbers[name]))
            if on_block:
                on_block()
    return {name: dict(summary(samples[name]), number=numbers[name]) for name in names}


class _FlopCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_flops(fn):
    """(FLOPs of the products and convolutions one call of ``fn`` dispatches, its result), with the formulas of
    ``torch.utils.flop_counter`` (forward and backward). Not ``FlopCounterMode`` itself: its module tracker
    refuses models that run under ``no_grad`` with parameters that require grad."""
    with _FlopCount() as counter:
        result = fn()
    return counter.total, result


def tensors_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensors_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensors_bytes(o) for o in obj.values())
    return 0


def cuda_peak(fn):
    """(peak bytes above what was allocated before the call, output bytes) of one call on CUDA."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, tensors_bytes(out)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def _reset_peak_rss():
    """Resets the kernel's peak-resident-set mark of this process (VmHWM) to the current resident set; False where
    /proc/self/clear_refs does not take "5" (not Linux, or an old kernel)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sampled_peak(fn):
    """(peak resident bytes above the resident set before the call, output bytes) of one call, in this process.
    Exact where the kernel's peak mark can be reset (VmHWM after /proc/self/clear_refs): a thread sampling the
    resident set misses buffers that live for a millisecond while both cores run BLAS (eager's (B, H, L', L)
    scores were measured at under half their size that way). Elsewhere: that sampling, every 0.2 ms."""
    gc.collect()
    if _reset_peak_rss():
        base = _status_bytes("VmRSS:")
        out = fn()
        return _status_bytes("VmHWM:") - base, tensors_bytes(out)
    base = _rss()
    maxrss_before = _maxrss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = fn()
    peak[0] = max(peak[0], _rss())
    done.set()
    thread.join()
    maxrss_after = _maxrss()
    top = max(peak[0], maxrss_after if maxrss_after > maxrss_before else 0)
    return top - base, tensors_bytes(out)


def _memory_child(settings_dict, case_id, variant_name, threads, warmup=True):
    """Runs in a fresh process: build one case's inputs and measure one variant's peak (after a warm-up call if
    ``warmup``: the parent skips it for calls of seconds, whose peaks dwarf any one-time allocation)."""
    from benchmarks import cases as cases_mod

    torch.set_num_threads(threads)
    settings = cases_mod.Settings(**settings_dict)
    case = cases_mod.find_case(settings, case_id)
    variant = next(v for v in case.variants if v.name == variant_name)
    state = case.setup()
    try:
        fn = variant.make(state, check=warmup and not case.heavy)  # the check call is the warm-up
    except cases_mod.NotAvailable as exc:
        return {"error": str(exc)}
    peak, out = sampled_peak(fn)
    return {"peak_bytes": peak, "output_bytes": out}


def _model_worker(conn, settings_dict, case_id, variant_name, threads):
    """A fresh process holding one variant of a model case: ``first`` runs the first call (the warm-up) while
    sampling memory, and counts its FLOPs; ``time`` runs a timing block; ``quit`` ends. Replies are dicts."""
    from benchmarks import cases as cases_mod

    try:
        torch.set_num_threads(threads)
        case = cases_mod.find_case(cases_mod.Settings(**settings_dict), case_id)
        variant = next(v for v in case.variants if v.name == variant_name)
        state = case.setup()
        fn = variant.make(state, check=False)
        conn.send({"ready": True})
    except Exception as exc:
        conn.send({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
        return
    while True:
        command, number = conn.recv()
        try:
            if command == "first":
                counted = {}

                def first_call():  # only eager's count is used (the case's FLOPs); counting slows a call ~30 %
                    if variant_name != "eager":
                        counted["flops"] = None
                        return fn()
                    counted["flops"], result = count_flops(fn)
                    return result

                start = time.perf_counter()
                peak, out = sampled_peak(first_call)
                conn.send({"first_s": time.perf_counter() - start, "peak_bytes": peak, "output_bytes": out,
                           "flops": counted["flops"]})
            elif command == "time":
                conn.send({"seconds": block_s(fn, number, "cpu")})
            else:
                return
        except Exception as exc:
            conn.send({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})


class ModelWorker:
    """The parent's handle on a ``_model_worker`` process."""

    def __init__(self, server, settings_dict, case_id, variant_name):
        self.conn, child = server.context.Pipe()
        self.process = server.context.Process(target=_model_worker, daemon=True,
                                              args=(child, settings_dict, case_id, variant_name,
                                                    torch.get_num_threads()))
        self.process.start()
        child.close()
        self.ready = self._reply()

    def _reply(self):
        try:
            return self.conn.recv()
        except EOFError:  # the process died (e.g. killed for memory)
            return {"error": f"worker process ended with exit code {self.process.join(5) or self.process.exitcode}"}

    def request(self, command, number=1):
        self.conn.send((command, number))
        return self._reply()

    def close(self):
        try:
            self.conn.send(("quit", 0))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


class MemoryServer:
    """Fresh processes for CPU memory measurement, forked from a server that has imported the modules only."""

    def __init__(self):
        from multiprocessing import forkserver

        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "segvit", "benchmarks.cases"])
        # glibc reads the threshold when the server process starts; this process keeps its environment
        previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        try:
            forkserver.ensure_running()
        finally:
            if previous is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = previous

    def measure(self, settings_dict, case_id, variant_name, warmup=True):
        # max_tasks_per_child=1: a new process for every measurement
        with ProcessPoolExecutor(max_workers=1, mp_context=self.context, max_tasks_per_child=1) as pool:
            try:
                return pool.submit(_memory_child, settings_dict, case_id, variant_name, torch.get_num_threads(),
                                   warmup).result()
            except Exception as exc:  # a crash of the child (e.g. out of memory) is a result, not a run failure
                return {"error": f"memory subprocess failed: {type(exc).__name__}: {exc}"}


def device_peaks(device, dtypes, quick=False):
    """Measured matmul throughput (FLOP/s per dtype) and copy bandwidth (bytes/s) of the device. The matmul peak is
    the best over a square GEMM and a tall one shaped like a ViT-L projection (tokens x 1024 -> 2048): on this CPU
    MKL is up to ~2x faster on some shapes than on others, and a floor taken from the slow shape would put
    kernels above 100 % of the roofline."""
    n = 8192 if device == "cuda" else (1536 if quick else 2048)
    shapes = [(n, n, n)] if device == "cuda" else [(n, n, n), (1600, 1024, 2048)]  # (M, K, N)
    flops, best_shape = {}, {}
    for dtype in dtypes:
        dt = torch.bfloat16 if dtype == "bf16-autocast" else getattr(torch, dtype)
        for m, k, n_ in shapes:
            a = torch.randn(m, k, device=device, dtype=dt)
            b = torch.randn(k, n_, device=device, dtype=dt)
            fn = lambda: torch.mm(a, b)  # noqa: E731
            fn()
            times = time_interleaved({"mm": fn}, 5, 0.2, device)["mm"]
            rate = 2 * m * k * n_ / times["min_s"]  # best block: the peak the device can reach
            if rate > flops.get(dtype, 0.0):
                flops[dtype], best_shape[dtype] = rate, [m, k, n_]
    elements = (256 if device == "cuda" else 64) * 2 ** 20  # 1 GiB on CUDA, 256 MiB on CPU (far above caches)
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    times = time_interleaved({"copy": fn}, 5, 0.2, device)["copy"]
    bandwidth = 2 * elements * 4 / times["min_s"]  # read and write
    return {"matmul_flops": flops, "copy_bandwidth": bandwidth, "matmul_shape": best_shape, "copy_bytes": elements * 4}


def best_peaks(*measurements):
    """The highest matmul throughput (per dtype) and copy bandwidth over several ``device_peaks`` results."""
    best = dict(measurements[0])
    best["matmul_flops"], best["matmul_shape"] = {}, {}
    for dtype in measurements[0]["matmul_flops"]:
        top = max(measurements, key=lambda m: m["matmul_flops"][dtype])
        best["matmul_flops"][dtype] = top["matmul_flops"][dtype]
        best["matmul_shape"][dtype] = top.get("matmul_shape", {}).get(dtype)
    best["copy_bandwidth"] = max(m["copy_bandwidth"] for m in measurements)
    return best
