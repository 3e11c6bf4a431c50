"""Result rows, derived columns (speed-up, memory ratio, roofline) and the output files."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess

import torch

from benchmarks import cases, counts

# One row per case and variant; the machine columns repeat on every row so a CSV row stands alone.
CASE_FIELDS = ["case_id", "group", "label", "mode", "dtype", "batch", "variant", "status", "reason"]
MEASURE_FIELDS = ["median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "rounds", "number", "speedup_vs_eager",
                  "peak_mem_mb", "output_mb", "mem_ratio_vs_eager", "scratch_mb", "scratch_ratio_vs_eager", "mem_note", "flops", "bytes", "gflops_per_s",
                  "gb_per_s", "floor_ms", "time_over_floor", "roofline_pct"]
MACHINE_FIELDS = ["device", "device_name", "cpu_model", "cores", "threads", "torch", "triton", "segvit", "python",
                  "commit", "quick"]
FIELDS = CASE_FIELDS + MEASURE_FIELDS + MACHINE_FIELDS


def base_row(case, variant):
    row = dict.fromkeys(FIELDS)
    row.update(case_id=case.id, group=case.group, label=case.label, mode=case.mode, dtype=case.dtype,
               batch=case.batch, variant=variant, reason="")
    return row


def peak_flops(peaks, dtype):
    flops = peaks["matmul_flops"]
    return flops.get(dtype) or flops.get("bfloat16" if "bf16" in dtype else "float32") or max(flops.values())


def derive(rows, case, peaks):
    """Fill speed-up and memory ratio over eager, and the roofline columns, in place."""
    eager = next((r for r in rows if r["variant"] == "eager" and r["status"] == "ok"), None)
    floor_s = counts.roofline_floor(case.flops, case.bytes, peak_flops(peaks, case.dtype), peaks["copy_bandwidth"])
    for row in rows:  # scratch: what a call needs beyond its outputs (fwd+bwd: the input gradients), issue 4's measure
        if row["status"] == "ok" and row.get("peak_mem_mb") is not None and row.get("output_mb") is not None:
            row["scratch_mb"] = max(row["peak_mem_mb"] - row["output_mb"], 0.0)
    for row in rows:
        row.update(flops=case.flops, bytes=case.bytes)
        if row["status"] != "ok":
            continue
        seconds = row["median_ms"] / 1e3
        if eager is not None:
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
            if row.get("peak_mem_mb") is not None and eager.get("peak_mem_mb"):
                row["mem_ratio_vs_eager"] = row["peak_mem_mb"] / eager["peak_mem_mb"]
        if row.get("scratch_mb") is not None and eager is not None and eager.get("scratch_mb"):
            row["scratch_ratio_vs_eager"] = row["scratch_mb"] / eager["scratch_mb"]
        if case.flops:
            row["gflops_per_s"] = case.flops / seconds / 1e9
        if case.bytes:
            row["gb_per_s"] = case.bytes / seconds / 1e9
        if floor_s > 0:
            row["floor_ms"] = floor_s * 1e3
            row["time_over_floor"] = seconds / floor_s
            row["roofline_pct"] = 100 * floor_s / seconds


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_meta(device):
    import segvit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = _cpu_model()
    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
            "cpu_model": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "segvit": segvit.__version__, "python": platform.python_version(),
            "commit": _commit(), "platform": platform.platform(), "backends": cases.backend_status()}


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_table(rows, meta):
    head = (f"{meta['device_name']} ({meta['cores']} cores, {meta['threads']} threads), torch {meta['torch']}, "
            f"triton {meta['triton']}; roofline: matmul "
            + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in meta["peaks"]["matmul_flops"].items())
            + f", copy {meta['peaks']['copy_bandwidth'] / 1e9:.1f} GB/s")
    lines = [head, ""]
    header = (f"{'case':70s} {'mode':18s} {'variant':30s} {'median ms':>10s} {'p20-p80 ms':>15s} {'x eager':>8s} "
              f"{'peak MB':>9s} {'mem/eager':>9s} {'GFLOP/s':>8s} {'GB/s':>7s} {'%roof':>6s}")
    last = None
    for row in rows:
        if row["group"] != last:
            last = row["group"]
            lines += ["", f"== {last}", header]
        if row["status"] != "ok":
            lines.append(f"{row['label'][:70]:70s} {row['mode']:18s} {row['variant'][:30]:30s} {row['reason'][:120]}")
            continue
        spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
        lines.append(
            f"{row['label'][:70]:70s} {row['mode']:18s} {row['variant'][:30]:30s} {row['median_ms']:10.2f} "
            f"{spread:>15s} {_fmt(row['speedup_vs_eager'], '7.2f'):>7s}x {_fmt(row['peak_mem_mb'], '9.1f'):>9s} "
            f"{_fmt(row['mem_ratio_vs_eager'], '9.2f'):>9s} {_fmt(row['gflops_per_s'], '8.1f'):>8s} "
            f"{_fmt(row['gb_per_s'], '7.2f'):>7s} {_fmt(row['roofline_pct'], '6.1f'):>6s}")
    return "\n".join(lines)


def write_all(out_dir, meta, rows):
    os.makedirs(out_dir, exist_ok=True)
    machine = {k: meta.get(k) for k in MACHINE_FIELDS if k != "quick"}
    machine["quick"] = meta["settings"]["quick"]
    for row in rows:
        row.update(machine)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"schema": 1, "meta": meta, "results": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(format_table(rows, meta) + "\n")
    plot(out_dir, rows, meta)


def _case_tick(row):
    return row["label"].split(":")[0] + f"\n{row['mode']}"


def plot(out_dir, rows, meta):
    """plots/<group>.png: speed-up over eager (top) and peak memory over eager's (bottom), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    for group in dict.fromkeys(r["group"] for r in rows):
        group_rows = [r for r in rows if r["group"] == group]
        case_ids = list(dict.fromkeys(r["case_id"] for r in group_rows))
        variants = list(dict.fromkeys(r["variant"] for r in group_rows))
        ticks = [_case_tick(next(r for r in group_rows if r["case_id"] == c)) for c in case_ids]
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(case_ids)), 9))
        width = 0.8 / max(len(variants), 1)
        for i, variant in enumerate(variants):
            by_case = {r["case_id"]: r for r in group_rows if r["variant"] == variant}
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(case_ids))]
            speed = [(by_case.get(c) or {}).get("speedup_vs_eager") or 0 for c in case_ids]
            mem = [(by_case.get(c) or {}).get("mem_ratio_vs_eager") or 0 for c in case_ids]
            axes[0].bar(xs, speed, width, label=variant)
            axes[1].bar(xs, mem, width, label=variant)
        for ax in axes:
            ax.axhline(1.0, color="black", linewidth=0.8)
        axes[0].set_ylabel("speed-up over eager (x, higher is better)")
        axes[1].set_ylabel("peak memory above inputs / eager's (lower is better)")
        for ax in axes:
            ax.set_xticks(range(len(case_ids)))
            ax.set_xticklabels(ticks, fontsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{group} on {meta['device_name']} (torch {meta['torch']}); missing bar: n/a")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "plots", f"{group}.png"), dpi=90)
        plt.close(fig)
