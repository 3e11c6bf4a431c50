"""``python -m benchmarks.summarize DIR [--readme README.md]``: the Markdown summary of ``DIR/results.json``.

Prints a header naming the machine and one table row per case and variant (n/a rows with their reason);
``--compact``: one row per case. With ``--readme FILE``, writes the table between the
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` markers of FILE instead (the READMEs' numbers are
generated from the committed results, never typed).
"""
from __future__ import annotations

import argparse
import json
import os

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _num(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def _escape(text):
    return str(text).replace("|", "\\|")


def _load(meta):
    if "load_average_start" not in meta:
        return ""
    return (f" Load average (1 min) {meta['load_average_start'][0]:.1f} at the start, "
            f"{meta['load_average_end'][0]:.1f} at the end; {meta['cpu_time_s']:.0f} s of CPU time in the main "
            "process.")


def summary_markdown(results: dict, source: str | None = None) -> str:
    meta, rows = results["meta"], results["results"]
    peaks = meta["peaks"]
    matmul = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks["matmul_flops"].items())
    settings = meta.get("settings", {})
    lines = [
        f"{meta['device_name']} ({meta['cores']} cores, {meta['threads']} threads), torch {meta['torch']}, "
        f"triton {meta['triton']}, segvit {meta['segvit']} ({meta.get('commit') or 'no commit'}), "
        f"{'quick' if settings.get('quick') else 'full'} run of {meta.get('started_utc', '?')} UTC, "
        f"{meta.get('duration_s', 0):.0f} s. Measured roofline: matmul {matmul}, copy "
        f"{peaks['copy_bandwidth'] / 1e9:.1f} GB/s." + _load(meta) + (f" Files: `{source}`." if source else ""),
        "",
        "| op | case | mode | variant | median ms (p20-p80) | x eager | peak MB | mem / eager | scratch / eager "
        "| % roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = _escape(row["label"])
        if row["status"] != "ok":
            lines.append(f"| {row['group']} | {case} | {row['mode']} | {_escape(row['variant'])} | "
                         f"{_escape(row['reason'])} | | | | | |")
            continue
        lines.append(
            f"| {row['group']} | {case} | {row['mode']} | {_escape(row['variant'])} | "
            f"{row['median_ms']:.1f} ({row['p20_ms']:.1f}-{row['p80_ms']:.1f}) | "
            f"{_num(row['speedup_vs_eager'], '.2f', 'x')} | {_num(row['peak_mem_mb'], '.1f')} | "
            f"{_num(row['mem_ratio_vs_eager'], '.2f')} | {_num(row.get('scratch_ratio_vs_eager'), '.2f')} | "
            f"{_num(row['roofline_pct'], '.1f')} |")
    return "\n".join(lines) + "\n"


def compact_markdown(results: dict, source: str | None = None) -> str:
    """One row per case: eager's time and memory, then each other variant as speed-up / memory ratio."""
    header = summary_markdown(results, source).split("\n\n")[0]
    lines = [header, "", "| op | case | mode | eager ms | eager peak MB | other variants: speed-up over eager, "
             "peak memory / eager, scratch (peak beyond the outputs) / eager |", "|---|---|---|---|---|---|"]
    rows = results["results"]
    for case_id in dict.fromkeys(r["case_id"] for r in rows):
        case_rows = [r for r in rows if r["case_id"] == case_id]
        eager = next((r for r in case_rows if r["variant"] == "eager"), None)
        others = []
        for row in case_rows:
            if row is eager:
                continue
            if row["status"] != "ok":
                reason = row["reason"].split(": ", 1)[-1]
                others.append(f"{row['variant']}: {row['status']} ({reason[:70]})")
            else:
                others.append(f"{row['variant']}: {_num(row['speedup_vs_eager'], '.2f', 'x')}, "
                              f"mem {_num(row['mem_ratio_vs_eager'], '.2f')}, "
                              f"scratch {_num(row.get('scratch_ratio_vs_eager'), '.2f')}")
        first = case_rows[0]
        ok = eager is not None and eager["status"] == "ok"
        lines.append(f"| {first['group']} | {_escape(first['label'])} | {first['mode']} | "
                     f"{eager['median_ms']:.1f} | {_num(eager['peak_mem_mb'], '.1f')} | " if ok else
                     f"| {first['group']} | {_escape(first['label'])} | {first['mode']} | - | - | ")
        lines[-1] += _escape("; ".join(others)) + " |"
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {BEGIN} ... {END} not found")
    return text[:start + len(BEGIN)] + "\n" + block + text[end:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="directory holding results.json")
    parser.add_argument("--readme", help="file whose marked benchmarks block is replaced by the table")
    parser.add_argument("--compact", action="store_true", help="one row per case (the README's form)")
    args = parser.parse_args(argv)
    with open(os.path.join(args.dir, "results.json")) as f:
        results = json.load(f)
    source = os.path.relpath(args.dir)
    block = compact_markdown(results, source) if args.compact else summary_markdown(results, source)
    if args.readme:
        if args.compact:
            block += (f"\nEvery variant's time, spread, memory and roofline: `{source}/README.md`; how it is "
                      "measured: `benchmarks/README.md`.\n")
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_between_markers(text, block))
    else:
        print(block, end="")


if __name__ == "__main__":
    main()
