"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80) and H100 (sm_90a), with no GPU.

    python -m segvit.kernels.compile_report              # table on stdout; exit 1 on any failure
    python -m segvit.kernels.compile_report --markdown   # also rewrite the tables in kernels/README.md
    python -m segvit.kernels.compile_report --all-configs  # every listed config, without launch specialization

Default: **what launches**. Every op of every published model (``segvit.list_models()``, batch 1 and 8, bf16 and
fp32, the ATM attention with dropout 0 and 0.1, forward and the backward training runs) is called through its real
Triton launcher in compile-only mode (``compile_only.py``, cases in ``launch_cases.py``): Triton's own binder
specializes the arguments as a launch does (16-byte-aligned pointers, integers divisible by 16), the autotuner
prunes its configs with the call's arguments and compiles every survivor, and the launcher's torch code runs on CPU
tensors. Each distinct compiled kernel is one row: registers (from the cubin), spills (``ptxas -v`` on its PTX with
Triton's options), shared memory, blocks per SM (occupancy from registers, shared memory and warps), tensor-core
instructions in the SASS (``HMMA`` = mma.sync, ``HGMMA`` = wgmma), asynchronous copies (``LDGSTS`` = cp.async,
``UTMALDG`` = TMA), and how many published cases launch it or may pick it.

``--all-configs``: the older spec path. Every module of ``segvit.kernels`` that defines ``COMPILE_SPECS`` is
compiled for each spec, each autotune config and each dtype with ``triton.compile(ASTSource(...))`` and no
launch-time specialization. A spec is a dict: ``name``, ``fn`` (the ``@triton.jit`` kernel), ``signature``
(argument -> ASTSource type string; ``{dtype}`` is replaced by each entry of ``dtypes``, e.g. ``"*{dtype}"``),
``constexprs``, ``configs`` (dicts of constexpr values plus ``num_warps`` / ``num_stages``), ``dtypes`` and
optionally ``tensor_cores``.

A row fails on a compile or ptxas error, on shared memory above the architecture's per-block limit, on any spill
(every row is a config the autotuner may choose), or on a missing tensor-core instruction where one is required.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}  # Triton emits sm_90a PTX for capability 90 (wgmma needs the "a")
ARCHS = (80, 90)
# Per-SM limits for occupancy: 64 K registers (allocated per warp in units of 256), shared memory per SM (A100
# 164 KiB, H100 228 KiB, 1 KiB of it reserved per resident block), 64 warps and 32 blocks.
SM_LIMITS = {80: {"regs": 65536, "smem": 164 * 1024, "warps": 64, "blocks": 32},
             90: {"regs": 65536, "smem": 228 * 1024, "warps": 64, "blocks": 32}}
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
    blocks_per_sm: int | None = None  # launch mode: resident programs per SM (occupancy)
    async_copy: str = "-"              # launch mode: cp.async / TMA in the SASS
    specialization: str = ""           # launch mode: arguments specialized as divisible by 16
    cases: int = 0                     # launch mode: published cases that compile this kernel


def blocks_per_sm(regs: int, num_warps: int, smem: int, arch: int) -> int:
    """Resident programs (thread blocks) per SM: the least of the register, shared-memory, warp and block limits."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_per_scheduler = (limits["regs"] // 4) // regs_per_warp  # the register file is split over 4 schedulers
    by_regs = (4 * warps_per_scheduler) // num_warps
    by_smem = limits["smem"] // (smem + 1024)
    return max(0, min(by_regs, by_smem, limits["warps"] // num_warps, limits["blocks"]))


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
    """``TRITON_PTXAS_PATH`` if set, else the ptxas that ``sass`` finds (Triton's bundled one first: it accepts the
    PTX version Triton emits; then the CUDA toolkit's, then PATH)."""
    from segvit.kernels import sass

    override = os.environ.get("TRITON_PTXAS_PATH", "")
    if override and os.path.isfile(override) and os.access(override, os.X_OK):
        return override
    return sass._tool("ptxas")


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


def _ptxas_spills(ptx: str, arch: int, ptxas: str, workdir: str) -> dict:
    """``ptxas -v`` on Triton's PTX with Triton's own register-allocation option (its cubin has no spill counts)."""
    path = os.path.join(workdir, f"launch{arch}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    result = subprocess.run([ptxas, "--regAllocOptLevel=2", "-v", f"--gpu-name={PTXAS_ARCH[arch]}", path,
                             "-o", os.devnull], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {(result.stderr or result.stdout).strip()[:200]}")
    return parse_ptxas(result.stdout + result.stderr)


def _kernel_dtype(kernel) -> str:
    """The element type of the kernel's first pointer argument (the op's input dtype)."""
    for ty in getattr(kernel.src, "signature", {}).values():
        if isinstance(ty, str) and ty.startswith("*"):
            return ty[1:]
    return "-"


def tensor_core_kernels() -> set[str]:
    """Names of the @triton.jit functions whose specs require tensor cores for half dtypes."""
    names = set()
    for module in kernel_modules():
        for spec in module.COMPILE_SPECS:
            if spec.get("tensor_cores"):
                names.add(spec["fn"].__name__)
    return names


def launch_key(launch) -> tuple:
    return (launch.arch, launch.fn_name, tuple(sorted(launch.constexprs.items())), launch.num_warps,
            launch.num_stages, _kernel_dtype(launch.kernel), launch.specialization)


def record_launches(arch: int, cases=None, on_case=None) -> list:
    """Run every published launch case for ``sm_<arch>`` in compile-only mode; the recorded launches."""
    from segvit.kernels import launch_cases
    from segvit.kernels.compile_only import compile_only

    with compile_only(arch) as launches:
        for case in cases if cases is not None else launch_cases.published_cases():
            case.run()
            if on_case:
                on_case(case)
    return launches


def launch_rows(launches: list, ptxas: str, workdir: str, needs_tensor_cores: set[str]) -> list[Row]:
    """One row per distinct compiled kernel of ``launches``."""
    from segvit.kernels import sass

    groups: dict[tuple, list] = {}
    for launch in launches:
        groups.setdefault(launch_key(launch), []).append(launch)
    rows = []
    for key, group in groups.items():
        first = group[0]
        module = first.kernel.src.fn.__module__.rsplit(".", 1)[-1]
        config = dict(first.constexprs, num_warps=first.num_warps, num_stages=first.num_stages)
        row = Row(f"{module}.{first.fn_name}", config_name(config), _kernel_dtype(first.kernel), first.arch)
        row.specialization = first.specialization
        row.cases = len({lnch.tags.get("case") for lnch in group})
        row.smem = int(first.kernel.metadata.shared)
        try:
            info = sass.analyse(first.kernel.asm["cubin"])
            spills = _ptxas_spills(first.kernel.asm["ptx"], first.arch, ptxas, workdir)
        except Exception as exc:  # a failed disassembly or ptxas run is a report failure, with its message
            row.problems.append(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
            rows.append(row)
            continue
        row.regs = info["resources"]["regs"]
        row.spill_stores, row.spill_loads = spills["spill_stores"], spills["spill_loads"]
        row.tensor_core = info["features"]["tensor_cores"]
        row.async_copy = info["features"]["async_copy"]
        row.blocks_per_sm = blocks_per_sm(row.regs, first.num_warps, row.smem, first.arch)
        row.problems += check(row, first.fn_name in needs_tensor_cores)
        if info["resources"]["stack"] or info["resources"]["local"]:
            row.problems.append(f"stack frame {info['resources']['stack']} B / local {info['resources']['local']} B")
        if row.blocks_per_sm == 0:
            row.problems.append("does not fit an SM (registers or shared memory)")
        rows.append(row)
    return rows


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


LAUNCH_HEADER = ["| kernel | config | dtype | arch | regs | spills (st/ld B) | smem (B) | blocks/SM | tensor cores "
                 "| async copy | cases | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def launch_markdown_row(r: Row) -> str:
    spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
    status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
    regs = r.regs if r.regs is not None else "-"
    smem = r.smem if r.smem is not None else "-"
    blocks = r.blocks_per_sm if r.blocks_per_sm is not None else "-"
    return (f"| {r.kernel.split('.', 1)[-1]} | {r.config} | {r.dtype} | sm_{r.arch} | {regs} | {spills} | {smem} "
            f"| {blocks} | {r.tensor_core} | {r.async_copy} | {r.cases} | {status} |")


def markdown(rows: list[Row]) -> str:
    if rows and rows[0].specialization:
        return "\n".join(LAUNCH_HEADER + [launch_markdown_row(r) for r in rows])
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


def write_section_tables(rows: list[Row], path: str = README, caption: str = "Compile report (sm_80, sm_90):") -> None:
    """Put each kernel module's rows at the end of its ``## <module>`` section of kernels/README.md, next to that
    kernel's roofline note (replacing the module's previous table)."""
    text = open(path, encoding="utf-8").read()
    by_module: dict[str, list[Row]] = {}
    for row in rows:
        by_module.setdefault(row.kernel.split(".")[0], []).append(row)
    for module, module_rows in by_module.items():
        begin, end = f"<!-- compile-report:{module}:begin -->", f"<!-- compile-report:{module}:end -->"
        block = f"{begin}\n{caption}\n\n{markdown(module_rows)}\n{end}"
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


def _tool_note(ptxas: str) -> str:
    import triton

    root = os.path.dirname(os.path.dirname(triton.__file__))
    return f"triton {triton.__version__}, ptxas of {os.path.relpath(ptxas, root) if 'site-packages' in ptxas else ptxas}"


def _spec_rows(args, ptxas: str, workdir: str) -> list[Row]:
    rows = []
    print("\n".join(HEADER), flush=True)  # rows stream as they compile: a slow CI run shows where it is
    for module in kernel_modules():
        for spec in module.COMPILE_SPECS:
            if args.kernel and spec["name"] not in args.kernel:
                continue
            for config in spec["configs"]:
                for dtype in spec["dtypes"]:
                    for arch in ARCHS:
                        rows.append(compile_row(spec, config, dtype, arch, ptxas, workdir))
                        print(markdown_row(rows[-1]), flush=True)
    return rows


def _arch_launch_rows(arch: int, ops, ptxas: str, workdir: str) -> list[Row]:
    """The launch-mode rows of one architecture, printed as they are made (also the body of a ``--jobs`` worker)."""
    from segvit.kernels import launch_cases

    cases = [c for c in launch_cases.published_cases() if not ops or c.op in ops]
    started = time.time()

    def progress(case, counter=iter(range(1, len(cases) + 1))):
        print(f"  sm_{arch} [{next(counter)}/{len(cases)}] {case.name} ({time.time() - started:.0f} s)",
              file=sys.stderr, flush=True)

    launches = record_launches(arch, cases, on_case=progress)
    rows = launch_rows(launches, ptxas, workdir, tensor_core_kernels())
    for row in rows:
        print(launch_markdown_row(row), flush=True)
    return rows


def _launch_rows(args, ptxas: str, workdir: str) -> list[Row]:
    print("\n".join(LAUNCH_HEADER), flush=True)
    if args.jobs <= 1:
        return [row for arch in ARCHS for row in _arch_launch_rows(arch, args.op, ptxas, workdir)]
    # One process per architecture: the Triton front end and ptxas are single-threaded, so two cores halve the run.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(args.jobs, len(ARCHS)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_arch_launch_rows, arch, args.op, ptxas, workdir) for arch in ARCHS]
        return [row for future in futures for row in future.result()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="rewrite the tables in kernels/README.md")
    parser.add_argument("--all-configs", action="store_true",
                        help="compile every COMPILE_SPECS config without launch specialization (the older report)")
    parser.add_argument("--kernel", action="append", help="--all-configs: only specs with this name (repeatable)")
    parser.add_argument("--op", action="append", help="only the launch cases of this op (repeatable)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="launch mode: architectures compiled in parallel processes (default: 2 where 2 cores)")
    parser.add_argument("--allow-spills", action="store_true",
                        help="list spilling rows as FAIL but exit 0 for them (compile errors, shared memory and "
                             "missing tensor cores still fail)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The kernels must be real @triton.jit functions, not interpreter wrappers.
        print("compile_report: unset TRITON_INTERPRET (it replaces the compiler by the interpreter)", file=sys.stderr)
        return 2
    ptxas = find_ptxas()
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        rows = (_spec_rows if args.all_configs else _launch_rows)(args, ptxas, workdir)
    failed = [r for r in rows if r.problems]
    spill_only = [r for r in failed if all("spill" in p or "stack frame" in p for p in r.problems)]
    what = "compiles" if args.all_configs else "distinct kernels launched by the published models"
    print(f"\n{len(rows)} {what}, {len(failed)} failed, {time.time() - start:.0f} s ({_tool_note(ptxas)})")
    if args.markdown:
        flags = " --all-configs" if args.all_configs else ""
        flags += "".join(f" --kernel {k}" for k in args.kernel or []) + "".join(f" --op {o}" for o in args.op or [])
        caption = ("Compile report (sm_80, sm_90; every listed config, no launch specialization):" if args.all_configs
                   else "Compile report (sm_80, sm_90), as launched by the published models (launch specialization, "
                        "every config the autotuner may pick; `cases`: how many published cases compile it):")
        write_section_tables(rows, caption=caption)
        table = f"{len(rows)} {what}, {len(failed)} failed; each kernel's table stands at the end of its section above."
        write_readme(table, f"Generated by `python -m segvit.kernels.compile_report --markdown{flags}` "
                            f"({_tool_note(ptxas)}). Limits: shared memory {SMEM_LIMIT[80] // 1024} KiB (sm_80), "
                            f"{SMEM_LIMIT[90] // 1024} KiB (sm_90) per block; no spills in any config the autotuner "
                            "may pick.")
    if args.allow_spills and spill_only:
        print(f"--allow-spills: {len(spill_only)} spilling rows listed above do not fail this run", file=sys.stderr)
        failed = [r for r in failed if r not in spill_only]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
