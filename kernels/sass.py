"""Reading a compiled kernel's machine code (SASS): instructions, loops, resources, and what each costs to issue.

Uses the ``cuobjdump`` that triton ships (``triton/backends/nvidia/bin``), so it works with no CUDA toolkit and no
GPU. The compile report (registers, tensor-core and async-copy use) and the static cost model of ``benchmarks``
read kernels through this module.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b(?:\.\S+)*\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)")


def _tool(name: str) -> str:
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    candidates.append(shutil.which(name) or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"no {name} found (triton/backends/nvidia/bin, /usr/local/cuda*/bin, PATH)")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        result = subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {(result.stderr or result.stdout).strip()[:300]}")
    return result.stdout


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # e.g. "@P0 HMMA.16816.F32.BF16 R4, R8, R12, R4"

    @property
    def opcode(self) -> str:
        """The full opcode with modifiers, predicate stripped: ``HMMA.16816.F32.BF16``."""
        parts = self.text.split()
        if parts and parts[0].startswith("@"):
            parts = parts[1:]
        return parts[0] if parts else ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int    # address of the backward branch

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end


def instructions(cubin: bytes) -> list[Instruction]:
    """Every SASS instruction of the cubin's (single) kernel, in address order (NOPs of the padding dropped)."""
    found = [Instruction(int(a, 16), t) for a, t in _INSTRUCTION.findall(_cuobjdump(cubin, "-sass"))]
    if not found:
        raise ValueError("cuobjdump -sass printed no instructions")
    # The code ends with "BRA self" and NOP padding: neither is executed work.
    return [i for i in found if i.base != "NOP"]


def loops(code: list[Instruction]) -> list[Loop]:
    """Every loop: a branch back to an earlier address, ordered by start address (outer before inner).
    The "BRA to itself" trap at the end of a kernel is not a loop."""
    found = []
    for ins in code:
        m = _BRANCH.search(ins.text)
        if m:
            target = int(m.group(1), 16)
            if target < ins.address:
                found.append(Loop(target, ins.address))
    return sorted(set(found), key=lambda lp: (lp.start, -lp.end))


def divergent_fallbacks(code: list[Instruction]) -> list[tuple[int, int]]:
    """Address ranges of the code that only runs when a warp is divergent: ptxas guards warp-synchronous sequences
    (shuffle reductions) with ``BRA.DIV`` to a fallback copy that ends with a branch back. Not executed by
    converged warps (every Triton program is), so neither a loop nor work."""
    ranges = []
    for ins in code:
        if ins.opcode.startswith("BRA.DIV"):
            m = re.search(r"(0x[0-9a-f]+)\s*$", ins.text)  # BRA.DIV ~URZ, 0x55f0
            if not m:
                continue
            target = int(m.group(1), 16)
            end = next((i.address for i in code if i.address >= target and i.opcode == "BRA"
                        and not i.text.startswith("@")), None)
            if end is not None:
                ranges.append((target, end))
    return ranges


def hot(code: list[Instruction]) -> list[Instruction]:
    """The code without its divergent fallbacks."""
    cold = divergent_fallbacks(code)
    return [i for i in code if not any(lo <= i.address <= hi for lo, hi in cold)]


def resources(cubin: bytes) -> dict:
    """Registers per thread, stack and local (spill) bytes of the kernel, as the cubin records them."""
    text = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise ValueError(f"unrecognised cuobjdump -res-usage output: {text.strip()[:300]!r}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


# ---------------------------------------------------------------------------------------------- instruction mix

# Which execution pipe an opcode occupies, for the issue model of benchmarks/estimate.py. Everything else is
# counted only in the issue slot (one warp-instruction per scheduler per cycle).
FMA_PIPE = {"FFMA", "FADD", "FMUL", "FFMA2", "FADD2", "FMUL2", "HFMA2", "HADD2", "HMUL2", "IMAD", "IMUL"}
SFU_PIPE = {"MUFU"}
MEMORY_PIPE = {"LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "ATOM", "ATOMG", "ATOMS", "RED", "LD", "ST", "LDL", "STL"}
ASYNC_COPY = {"LDGSTS": "cp.async", "UTMALDG": "TMA", "UBLKCP": "TMA"}


def tensor_flops(ins: Instruction) -> int:
    """Floating-point operations of one warp's issue of a tensor-core instruction (0 for anything else).

    ``HMMA.16816`` (sm_80 mma.sync m16n8k16): 2 * 16 * 8 * 16 per warp; ``HMMA.1688``: 2 * 16 * 8 * 8;
    ``HGMMA.64xNx16`` (sm_90 wgmma, issued by the 4 warps of a warpgroup together): 2 * 64 * N * K / 4 per warp."""
    op = ins.opcode
    if op.startswith("HMMA."):
        m = re.match(r"HMMA\.(\d+)(\d)(\d+)\.", op)  # 16816 -> 16, 8, 16; 1688 -> 16, 8, 8
        shape = op.split(".")[1]
        dims = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4)}.get(shape)
        if dims is None and m:
            dims = (16, 8, 16)
        return 2 * dims[0] * dims[1] * dims[2] if dims else 0
    if op.startswith("HGMMA."):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if m:
            mm, nn, kk = map(int, m.groups())
            return 2 * mm * nn * kk // 4
    return 0


@dataclass
class Mix:
    """Per-warp instruction counts of a piece of code (or of a whole program, loops weighted by their trips)."""
    total: float = 0.0
    fma: float = 0.0
    sfu: float = 0.0
    memory: float = 0.0
    tensor_flops: float = 0.0

    def add(self, other: "Mix", times: float = 1.0) -> "Mix":
        self.total += other.total * times
        self.fma += other.fma * times
        self.sfu += other.sfu * times
        self.memory += other.memory * times
        self.tensor_flops += other.tensor_flops * times
        return self


def mix(code: list[Instruction]) -> Mix:
    m = Mix()
    for ins in code:
        m.total += 1
        m.fma += ins.base in FMA_PIPE
        m.sfu += ins.base in SFU_PIPE
        m.memory += ins.base in MEMORY_PIPE
        m.tensor_flops += tensor_flops(ins)
    return m


def features(code: list[Instruction]) -> dict:
    """Tensor-core family (``mma.sync`` / ``wgmma`` / ``-``) and async-copy use (``cp.async`` / ``TMA`` / ``-``)."""
    bases = {i.base for i in code}
    tensor = "wgmma" if "HGMMA" in bases else "mma.sync" if "HMMA" in bases else "-"
    copies = sorted({ASYNC_COPY[b] for b in bases if b in ASYNC_COPY})
    return {"tensor_cores": tensor, "async_copy": "+".join(copies) if copies else "-"}


def exclusive_bodies(code: list[Instruction], found: list[Loop]) -> tuple[list[Instruction], list[list[Instruction]]]:
    """Split the code into the straight-line part and each loop's own body (instructions of nested loops belong
    to the innermost loop that contains them)."""
    straight, bodies = [], [[] for _ in found]
    for ins in code:
        owner = None
        for index, lp in enumerate(found):
            if lp.contains(ins.address) and (owner is None or found[owner].contains(lp.start)):
                owner = index
        (straight if owner is None else bodies[owner]).append(ins)
    return straight, bodies


def nesting(found: list[Loop]) -> list[int | None]:
    """For each loop, the index of the innermost loop that encloses it (None at top level)."""
    parents = []
    for index, lp in enumerate(found):
        parent = None
        for other, outer in enumerate(found):
            if other != index and outer.start <= lp.start and lp.end <= outer.end and outer != lp:
                if parent is None or found[parent].start <= outer.start:
                    parent = other
        parents.append(parent)
    return parents


@functools.lru_cache(maxsize=None)
def analyse(cubin: bytes) -> dict:
    """Everything the report and the model need from one cubin, cached by its bytes."""
    code = instructions(cubin)
    executed = hot(code)
    found = loops(executed)
    straight, bodies = exclusive_bodies(executed, found)
    return {"code": code, "loops": found, "parents": nesting(found), "straight": mix(straight),
            "bodies": [mix(b) for b in bodies], "features": features(code), "resources": resources(cubin)}
