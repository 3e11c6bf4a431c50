"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80) and H100 (sm_90a), with no GPU.

    python -m segvit.kernels.compile_report              # table on stdout; exit 1 on any failure
    python -m segvit.kernels.compile_report --markdown   # also rewrite the table in kernels/README.md

Every module of ``segvit.kernels`` that defines ``COMPILE_SPECS`` is compiled for each spec, each autotune config
and each dtype: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` gives the PTX and the
shared memory the launch needs (``metadata.shared``); ``ptxas -v`` on the PTX gives registers and spills. A spec is a
dict: ``name``, ``fn`` (the ``@triton.jit`` kernel), ``signature`` (argument -> ASTSource type string; ``{dtype}``
is replaced by each entry of ``dtypes``, e.g. ``"*{dtype}"``), ``constexprs`` (fixed constexpr values), ``configs``
(dicts of constexpr values plus ``num_warps`` / ``num_stages``: the configs the autotuner may pick), ``dtypes``
(``fp32`` / ``fp16`` / ``bf16``) and optionally ``tensor_cores`` (True: the fp16/bf16 variants must contain
``mma.sync`` on sm_80 and ``wgmma`` or ``mma`` on sm_90).

A row fails on a compile or ptxas error, on shared memory above the architecture's per-block limit, on any spill
(every listed config is one the autotuner may choose), or on a missing tensor-core instruction where one is required.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}  # Triton emits sm_90a PTX for capability 90 (wgmma needs the "a")
ARCHS = (80, 90)
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- compile-report:begin -->", "<!-- compile-report:end -->"


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    arch: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    tensor_core: str = "-"
    problems: list[str] = field(default_factory=list)


def parse_ptxas(text: str) -> dict:
    """Registers, spill bytes and stack frame of the one entry function in ``ptxas -v`` output.

    Raises ValueError when a number is missing, so a changed ptxas output format fails loudly instead of reading as
    zero spills."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if regs is None or spills is None:
        raise ValueError(f"unrecognised ptxas -v output: {text.strip()[:300]!r}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "stack": int(stack.group(1)) if stack else 0}


def tensor_core_instructions(ptx: str, arch: int) -> str:
    """The tensor-core instruction family found in the PTX: ``wgmma`` (sm_90), ``mma.sync``, or ``-``."""
    if arch >= 90 and re.search(r"^\s*wgmma\.mma_async", ptx, re.M):
        return "wgmma"
    if re.search(r"^\s*mma\.sync", ptx, re.M):
        return "mma.sync"
    return "-"


def check(row: Row, needs_tensor_cores: bool) -> list[str]:
    """Why a compiled row fails the report (empty: it passes)."""
    problems = []
    if row.smem is not None and row.smem > SMEM_LIMIT[row.arch]:
        problems.append(f"shared memory {row.smem} B > {SMEM_LIMIT[row.arch]} B limit of sm_{row.arch}")
    if (row.spill_stores or 0) > 0 or (row.spill_loads or 0) > 0:
        problems.append(f"register spills ({row.spill_stores} B stores, {row.spill_loads} B loads)")
    if needs_tensor_cores and row.dtype in ("fp16", "bf16"):
        if row.arch >= 90 and row.tensor_core == "-":
            problems.append("no wgmma/mma instruction in a tensor-core kernel")
        elif row.arch < 90 and row.tensor_core != "mma.sync":
            problems.append("no mma.sync instruction in a tensor-core kernel")
    return problems


def find_ptxas() -> str:
    """Triton's bundled ptxas first (it accepts the PTX version Triton emits), then the CUDA toolkit's."""
    candidates = [os.environ.get("TRITON_PTXAS_PATH", "")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except ImportError:
        pass
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True)
    candidates.append(shutil.which("ptxas") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no ptxas found (triton/backends/nvidia/bin, /usr/local/cuda*/bin, PATH)")


def config_name(config: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k.replace('BLOCK_', ''))}={v}" for k, v in config.items())


def compile_row(spec: dict, config: dict, dtype: str, arch: int, ptxas: str, workdir: str) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec["name"], config_name(config), dtype, arch)
    constexprs = dict(spec.get("constexprs", {}))
    constexprs.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
    signature = {k: v.replace("{dtype}", dtype) for k, v in spec["signature"].items()}
    for name in spec["fn"].arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name not in signature:
            row.problems.append(f"argument {name} has neither a signature type nor a constexpr value")
            return row
    try:
        compiled = triton.compile(ASTSource(fn=spec["fn"], signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.get("num_warps", 4),
                                           "num_stages": config.get("num_stages", 2)})
    except Exception as exc:  # any compiler failure is a report failure, with its message
        row.problems.append(f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        return row
    ptx = compiled.asm["ptx"]
    row.smem = int(compiled.metadata.shared)
    row.tensor_core = tensor_core_instructions(ptx, arch)
    path = os.path.join(workdir, f"k{arch}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    result = subprocess.run([ptxas, f"-arch={PTXAS_ARCH[arch]}", "-v", path, "-o", os.devnull],
                            capture_output=True, text=True)
    if result.returncode != 0:
        row.problems.append(f"ptxas failed: {(result.stderr or result.stdout).strip()[:200]}")
        return row
    try:
        info = parse_ptxas(result.stdout + result.stderr)
    except ValueError as exc:
        row.problems.append(str(exc))
        return row
    row.regs, row.spill_stores, row.spill_loads = info["regs"], info["spill_stores"], info["spill_loads"]
    row.problems += check(row, bool(spec.get("tensor_cores", False)))
    return row


def kernel_modules() -> list:
    import segvit.kernels as package

    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "compile_report":
            continue
        module = importlib.import_module(f"segvit.kernels.{info.name}")
        if getattr(module, "COMPILE_SPECS", None):
            modules.append(module)
    return modules


HEADER = ["| kernel | config | dtype | arch | regs | spills (st/ld B) | smem (B) | tensor cores | status |",
          "|---|---|---|---|---|---|---|---|---|"]


def markdown_row(r: Row) -> str:
    spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
    status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
    return (f"| {r.kernel} | {r.config} | {r.dtype} | sm_{r.arch} | {r.regs if r.regs is not None else '-'} "
            f"| {spills} | {r.smem if r.smem is not None else '-'} | {r.tensor_core} | {status} |")


def markdown(rows: list[Row]) -> str:
    return "\n".join(HEADER + [markdown_row(r) for r in rows])


def write_readme(table: str, header: str, path: str = README) -> None:
    """Replace the text between the report's markers in kernels/README.md (append the block if absent)."""
    block = f"{BEGIN}\n{header}\n\n{table}\n{END}"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_section_tables(rows: list[Row], path: str = README) -> None:
    """Put each kernel module's rows at the end of its ``## <module>`` section of kernels/README.md, next to that
    kernel's roofline note (replacing the module's previous table)."""
    text = open(path, encoding="utf-8").read()
    by_module: dict[str, list[Row]] = {}
    for row in rows:
        by_module.setdefault(row.kernel.split(".")[0], []).append(row)
    for module, module_rows in by_module.items():
        begin, end = f"<!-- compile-report:{module}:begin -->", f"<!-- compile-report:{module}:end -->"
        block = f"{begin}\nCompile report (sm_80, sm_90):\n\n{markdown(module_rows)}\n{end}"
        if begin in text and end in text:
            start, stop = text.index(begin), text.index(end) + len(end)
            text = text[:start] + block + text[stop:]
            continue
        heading = re.search(rf"^## {re.escape(module)}\b.*$", text, re.M)
        if heading is None:
            raise ValueError(f"kernels/README.md has no '## {module}' section for its compile table")
        following = re.search(r"^## ", text[heading.end():], re.M)
        cut = heading.end() + following.start() if following else len(text)
        text = text[:cut].rstrip("\n") + "\n\n" + block + "\n\n" + text[cut:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="rewrite the table in kernels/README.md")
    parser.add_argument("--kernel", action="append", help="only specs with this name (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The kernels must be real @triton.jit functions, not interpreter wrappers.
        print("compile_report: unset TRITON_INTERPRET (it replaces the compiler by the interpreter)", file=sys.stderr)
        return 2
    import triton

    ptxas = find_ptxas()
    start = time.time()
    rows = []
    print("\n".join(HEADER), flush=True)  # rows stream as they compile: a slow CI run shows where it is
    with tempfile.TemporaryDirectory() as workdir:
        for module in kernel_modules():
            for spec in module.COMPILE_SPECS:
                if args.kernel and spec["name"] not in args.kernel:
                    continue
                for config in spec["configs"]:
                    for dtype in spec["dtypes"]:
                        for arch in ARCHS:
                            rows.append(compile_row(spec, config, dtype, arch, ptxas, workdir))
                            print(markdown_row(rows[-1]), flush=True)
    table = markdown(rows)
    failed = [r for r in rows if r.problems]
    print(f"\n{len(rows)} compiles, {len(failed)} failed, {time.time() - start:.0f} s "
          f"(triton {triton.__version__}, {ptxas})")
    if args.markdown:
        only = "".join(f" --kernel {k}" for k in args.kernel or [])
        write_section_tables(rows)
        table = (f"{len(rows)} compiles, {len(failed)} failed; each kernel's table stands at the end of its section "
                 "above.")
        write_readme(table, f"Generated by `python -m segvit.kernels.compile_report --markdown{only}` (triton "
                            f"{triton.__version__}, ptxas of {os.path.relpath(ptxas, os.path.dirname(os.path.dirname(triton.__file__))) if 'site-packages' in ptxas else ptxas}). "
                            f"Limits: shared memory {SMEM_LIMIT[80] // 1024} KiB (sm_80), {SMEM_LIMIT[90] // 1024} KiB "
                            "(sm_90) per block; no spills in any autotune config.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
