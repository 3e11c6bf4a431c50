"""The compile report's parsing and limit checks (the full compile runs in CI as `python -m segvit.kernels.compile_report`)."""
import json
import os
import subprocess
import sys

import pytest

from segvit.kernels import compile_report as report

PTXAS_OK = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_mask_classify_kernel' for 'sm_80'
ptxas info    : Function properties for _mask_classify_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 170 registers, used 1 barriers, 432 bytes cmem[0]
ptxas info    : Compile time = 25.1 ms
"""
PTXAS_SPILL = PTXAS_OK.replace("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                               "64 bytes stack frame, 2356 bytes spill stores, 2108 bytes spill loads").replace(
    "Used 170 registers", "Used 255 registers")


def row(**kw):
    base = dict(kernel="k", config="P=64", dtype="fp16", arch=80, regs=100, spill_stores=0, spill_loads=0,
                smem=1024, tensor_core="mma.sync")
    base.update(kw)
    return report.Row(**base)


def test_parse_ptxas_reads_registers_and_spills():
    assert report.parse_ptxas(PTXAS_OK) == {"regs": 170, "spill_stores": 0, "spill_loads": 0, "stack": 0}
    assert report.parse_ptxas(PTXAS_SPILL) == {"regs": 255, "spill_stores": 2356, "spill_loads": 2108, "stack": 64}


def test_parse_ptxas_rejects_unknown_output():
    # A format change must fail, never read as "no spills".
    with pytest.raises(ValueError, match="unrecognised ptxas"):
        report.parse_ptxas("ptxas info    : Used 40 registers\n")
    with pytest.raises(ValueError):
        report.parse_ptxas("")


def test_shared_memory_limits_per_arch():
    assert report.check(row(arch=80, smem=163 * 1024), True) == []
    assert "shared memory" in report.check(row(arch=80, smem=163 * 1024 + 1), True)[0]
    # 200 KiB fits an H100 block but not an A100 one.
    assert report.check(row(arch=90, smem=200 * 1024, tensor_core="wgmma"), True) == []
    assert report.check(row(arch=80, smem=200 * 1024), True) != []
    assert "shared memory" in report.check(row(arch=90, smem=227 * 1024 + 1, tensor_core="wgmma"), True)[0]


def test_spills_fail():
    info = report.parse_ptxas(PTXAS_SPILL)
    problems = report.check(row(spill_stores=info["spill_stores"], spill_loads=info["spill_loads"]), True)
    assert len(problems) == 1 and "spill" in problems[0]
    assert "spill" in report.check(row(spill_stores=0, spill_loads=4), False)[0]


def test_tensor_core_detection_and_requirement():
    ptx_80 = "\t// begin inline asm\n\tmma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, ...;\n"
    ptx_90 = "\twgmma.fence.sync.aligned;\n\twgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, ...;\n"
    assert report.tensor_core_instructions(ptx_80, 80) == "mma.sync"
    assert report.tensor_core_instructions(ptx_90, 90) == "wgmma"
    assert report.tensor_core_instructions(ptx_90, 80) == "-"  # wgmma is not an sm_80 instruction
    assert report.tensor_core_instructions("\tfma.rn.f32 %f1, %f2, %f3, %f4;\n", 90) == "-"
    assert "mma.sync" in report.check(row(tensor_core="-"), True)[0]
    assert "wgmma" in report.check(row(arch=90, tensor_core="-"), True)[0]
    assert report.check(row(tensor_core="-"), False) == []  # not a tensor-core kernel
    assert report.check(row(dtype="fp32", tensor_core="-"), True) == []  # float32 dots run on FMA units


_COMPILE_SCRIPT = """
import json, sys, tempfile
import triton
import triton.language as tl
from segvit.kernels import compile_report as report

@triton.jit
def good(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

@triton.jit
def broken(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + undefined_name)

out = {}
with tempfile.TemporaryDirectory() as d:
    for fn in (good, broken):
        spec = {"name": fn.__name__, "fn": fn, "signature": {"x_ptr": "*{dtype}", "n": "i32"}, "constexprs": {}}
        r = report.compile_row(spec, {"BLOCK": 128, "num_warps": 4, "num_stages": 1}, "fp32", 80, report.find_ptxas(), d)
        out[fn.__name__] = {"problems": r.problems, "regs": r.regs, "smem": r.smem}
print(json.dumps(out))
"""


def test_compile_row_compiles_and_reports_compile_errors(tmp_path):
    # In a subprocess without TRITON_INTERPRET (conftest sets it, and it turns kernels into interpreter wrappers).
    pytest.importorskip("triton")
    try:
        report.find_ptxas()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "compile_two.py"  # @triton.jit needs its source in a file
    script.write_text(_COMPILE_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["good"]["problems"] == [] and out["good"]["regs"] > 0 and out["good"]["smem"] is not None
    assert len(out["broken"]["problems"]) == 1 and "compile error" in out["broken"]["problems"][0]
    assert "undefined_name" in out["broken"]["problems"][0]


def test_markdown_table_and_readme_block(tmp_path):
    rows = [row(), row(arch=90, tensor_core="wgmma", regs=None, spill_stores=None, spill_loads=None,
                       problems=["compile error: X"])]
    table = report.markdown(rows)
    assert "| k | P=64 | fp16 | sm_80 | 100 | 0/0 | 1024 | mma.sync | ok |" in table
    assert "FAIL: compile error: X" in table
    readme = tmp_path / "README.md"
    readme.write_text("# Kernels\n\nintro\n\n## Attention\n\nother section\n")
    report.write_readme("TABLE1", "header", str(readme))
    report.write_readme("TABLE2", "header", str(readme))
    text = readme.read_text()
    assert text.count(report.BEGIN) == 1 and "TABLE2" in text and "TABLE1" not in text
    assert "other section" in text and text.index("intro") < text.index(report.BEGIN)


def test_every_compile_spec_is_complete():
    # What the CI report will compile, checked without compiling: each kernel argument typed or given a value.
    pytest.importorskip("triton")
    modules = report.kernel_modules()
    names = {m.__name__.rsplit(".", 1)[-1] for m in modules}
    assert {"mask_classify", "mask_losses"} <= names
    for module in modules:
        for spec in module.COMPILE_SPECS:
            where = f"{module.__name__}:{spec.get('name')}"
            assert {"name", "fn", "signature", "constexprs", "configs", "dtypes"} <= spec.keys(), where
            assert spec["configs"] and set(spec["dtypes"]) <= {"fp32", "fp16", "bf16"}, where
            for config in spec["configs"]:
                assert {"num_warps", "num_stages"} <= config.keys(), where
                given = set(spec["signature"]) | set(spec["constexprs"]) | set(config) - {"num_warps", "num_stages"}
                missing = [a for a in spec["fn"].arg_names if a not in given]
                assert not missing, f"{where}: arguments without type or value: {missing}"
                unknown = given - set(spec["fn"].arg_names)
                assert not unknown, f"{where}: names that are not kernel arguments: {unknown}"


def test_section_tables_stand_next_to_each_kernel(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n\n## alpha (forward)\n\nnote a\n\n## beta\n\nnote b\n\n## Compile report\n")
    rows = [report.Row("alpha.fwd", "M=16", "fp16", 80), report.Row("beta.bwd", "M=32", "fp32", 90)]
    report.write_section_tables(rows, str(readme))
    report.write_section_tables(rows, str(readme))  # rewriting replaces, never duplicates
    text = readme.read_text()
    assert text.count("<!-- compile-report:alpha:begin -->") == 1
    assert text.index("note a") < text.index("| alpha.fwd |") < text.index("## beta")
    assert text.index("note b") < text.index("| beta.bwd |") < text.index("## Compile report")
    with pytest.raises(ValueError, match="no '## gamma' section"):
        report.write_section_tables([report.Row("gamma.k", "c", "fp32", 80)], str(readme))
