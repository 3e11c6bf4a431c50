"""The compile-only launch mode, the SASS reader and the static cost model (benchmarks/estimate.py).

The compile-only tests run in a subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests):
they compile for sm_80 with triton's bundled tools, no GPU needed.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from segvit.kernels import sass
from segvit.kernels.compile_report import blocks_per_sm

SASS_TEXT = """
        code for sm_80
                Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDG.E R2, [R4.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0040*/                   FFMA R2, R2, R3, R4 ;
        /*0050*/                   MUFU.EX2 R5, R2 ;
        /*0060*/                   FADD R6, R6, R5 ;
        /*0070*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0080*/              @!P0 BRA 0x40 ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], R24 ;
        /*00a0*/                   LDGSTS.E [R1], [R2.64] ;
        /*00b0*/                   STG.E [R4.64], R6 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
        /*00e0*/                   NOP;
"""


@pytest.fixture
def fake_sass(monkeypatch):
    monkeypatch.setattr(sass, "_cuobjdump", lambda cubin, flag: SASS_TEXT)


def test_sass_loops_bodies_and_mix(fake_sass):
    code = sass.instructions(b"")
    assert [i.address for i in code][-1] == 0xd0  # the NOP padding is dropped
    assert code[3].opcode == "HMMA.16816.F32.BF16" and code[8].base == "BRA"
    loops = sass.loops(code)
    assert loops == [sass.Loop(0x40, 0x80)]  # "BRA to itself" at the end is not a loop
    straight, bodies = sass.exclusive_bodies(code, loops)
    assert [i.address for i in bodies[0]] == [0x40, 0x50, 0x60, 0x70, 0x80]
    body = sass.mix(bodies[0])
    assert (body.total, body.fma, body.sfu, body.memory, body.tensor_flops) == (5, 2, 1, 0, 0)
    whole = sass.mix(straight)
    # one HMMA m16n8k16 per warp (2*16*8*16) and one HGMMA 64x128x16 per warpgroup (a quarter per warp)
    assert whole.tensor_flops == 2 * 16 * 8 * 16 + 2 * 64 * 128 * 16 // 4
    assert whole.memory == 3  # LDG, LDGSTS, STG
    assert sass.features(code) == {"tensor_cores": "wgmma", "async_copy": "cp.async"}


def test_sass_nested_loops_belong_to_the_innermost():
    code = [sass.Instruction(a, t) for a, t in [(0, "MOV"), (16, "FADD"), (32, "FMUL"), (48, "BRA 0x20"),
                                                 (64, "IADD3"), (80, "BRA 0x10"), (96, "EXIT")]]
    loops = sass.loops(code)
    assert loops == [sass.Loop(0x10, 0x50), sass.Loop(0x20, 0x30)]
    assert sass.nesting(loops) == [None, 0]
    straight, bodies = sass.exclusive_bodies(code, loops)
    assert [i.address for i in straight] == [0, 96]
    assert [i.address for i in bodies[0]] == [16, 64, 80] and [i.address for i in bodies[1]] == [32, 48]


def test_divergent_fallback_is_neither_a_loop_nor_work():
    # ptxas' shape around a shuffle reduction: BRA.DIV to a fallback copy that branches back to the join point.
    code = [sass.Instruction(a, t) for a, t in [
        (0x00, "MOV"), (0x10, "FADD"), (0x20, "BRA.DIV ~URZ, 0x80"), (0x30, "SHFL.BFLY"), (0x40, "FMNMX"),
        (0x50, "ISETP.GE.AND P0, PT, R0, 0x10, PT"), (0x60, "@!P0 BRA 0x10"), (0x70, "EXIT"),
        (0x80, "WARPSYNC"), (0x90, "SHFL.BFLY"), (0xa0, "BRA 0x40"), (0xb0, "BRA 0xb0")]]
    assert sass.divergent_fallbacks(code) == [(0x80, 0xa0)]
    executed = sass.hot(code)
    assert [i.address for i in executed] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xb0]
    assert sass.loops(code) == [sass.Loop(0x10, 0x60), sass.Loop(0x40, 0xa0)]  # the raw code sees a false loop
    assert sass.loops(executed) == [sass.Loop(0x10, 0x60)]


def test_resources_parse_and_reject(monkeypatch):
    monkeypatch.setattr(sass, "_cuobjdump", lambda cubin, flag: " Function k:\n  REG:168 STACK:0 SHARED:0 LOCAL:0 ")
    assert sass.resources(b"") == {"regs": 168, "stack": 0, "static_shared": 0, "local": 0}
    monkeypatch.setattr(sass, "_cuobjdump", lambda cubin, flag: "nothing")
    with pytest.raises(ValueError, match="unrecognised"):
        sass.resources(b"")


def test_blocks_per_sm_by_hand():
    # 128 registers: 4096 per warp, 4 warps per scheduler, 16 per SM: 4 programs of 4 warps.
    assert blocks_per_sm(128, 4, 0, 80) == 4
    # 255 registers round up to 256 per thread: 2 warps per scheduler, 8 per SM: 2 programs of 4 warps, 1 of 8.
    assert blocks_per_sm(255, 4, 0, 80) == 2 and blocks_per_sm(255, 8, 0, 80) == 1
    # shared memory: 100 KiB + 1 KiB reserved fits once in 164 KiB (A100), twice in 228 KiB (H100).
    assert blocks_per_sm(32, 4, 100 * 1024, 80) == 1 and blocks_per_sm(32, 4, 100 * 1024, 90) == 2
    # warps: 2-warp programs of few registers stop at 32 programs per SM, 8-warp ones at 64 / 8.
    assert blocks_per_sm(16, 2, 0, 80) == 32 and blocks_per_sm(16, 8, 0, 80) == 8
    assert blocks_per_sm(255, 16, 0, 80) == 0  # 16 warps x 256 registers do not fit


def test_aten_op_cost_and_recorder():
    estimate = pytest.importorskip("benchmarks.estimate")
    a100 = estimate.GPUS["A100"]
    assert estimate.aten_time({"bytes": 2e9, "flops": 0, "dtype": "torch.float32"}, a100) == pytest.approx(1e-3 + 3e-6)
    big = {"bytes": 0, "flops": 312e12 * 1e-3, "dtype": "torch.bfloat16"}
    assert estimate.aten_time(big, a100) == pytest.approx(1e-3 + 3e-6)  # tensor peak for half matmuls
    assert estimate.aten_time(dict(big, dtype="torch.float32"), a100) == pytest.approx(16e-3 + 3e-6)
    recorder = estimate.AtenRecorder()
    a = torch.empty(8, 16, 32, device="meta")
    with recorder:
        b = a.transpose(1, 2)  # a view: free
        c = torch.bmm(a, b)    # 2 * 8 * 16 * 16 * 32 FLOPs
        c.relu()
    assert [op["op"] for op in recorder.ops] == ["bmm", "relu"]
    assert recorder.ops[0]["flops"] == 2 * 8 * 16 * 16 * 32
    assert recorder.ops[0]["bytes"] == (a.numel() * 2 + c.numel()) * 4  # a read twice counts once per argument
    assert recorder.ops[1]["bytes"] == 2 * c.numel() * 4


_COMPILE_ONLY_SCRIPT = r"""
import json, sys
import torch, triton
import triton.language as tl
from segvit.kernels.compile_only import compile_only, tag
from benchmarks import estimate

@triton.jit
def add_rows(x_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * cols + offs, mask=offs < cols, other=0.0)
    tl.store(out_ptr + row * BLOCK + tl.arange(0, BLOCK), acc)

tuned = triton.autotune([triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
                        key=["cols"])(add_rows)
x, out = torch.randn(64, 4096), torch.full((64, 128), 7.0)
results = {}
with compile_only(80) as launches:
    with tag(case="plain", pass_="fwd"):
        add_rows[(64,)](x, out, 64, 4096, BLOCK=64)
        add_rows[(64,)](x, out, 64, 1000, BLOCK=64)
    with tag(case="tuned", pass_="fwd"):
        tuned[lambda meta: (128 // meta["BLOCK"],)](x, out, 64, 4096)
results["untouched"] = bool((out == 7.0).all())  # nothing ran
results["tuning_forgotten"] = not tuned.cache  # a real launch afterwards tunes for itself
results["launches"] = [(l.fn_name, l.grid, l.constexprs, l.num_warps, l.specialization, l.tuning, l.tags["case"])
                       for l in launches]
trips = lambda a: [-(-a["cols"] // a["BLOCK"])]
sys.modules[add_rows.fn.__module__].LOOP_TRIPS = {"add_rows": trips}
short, long_ = estimate.kernel_time(launches[1], estimate.GPUS["A100"]), estimate.kernel_time(launches[0],
                                                                                             estimate.GPUS["A100"])
results["short"], results["long"] = short, long_
print(json.dumps(results, default=str))
"""


def _run_clean(script: str, tmp_path) -> dict:
    path = tmp_path / "compile_only_probe.py"  # @triton.jit needs its source in a file
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=root,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compile_only_records_what_launches_and_runs_nothing(tmp_path):
    pytest.importorskip("triton")
    r = _run_clean(_COMPILE_ONLY_SCRIPT, tmp_path)
    assert r["untouched"] and r["tuning_forgotten"]
    launches = r["launches"]
    # the plain launches: launch-time specialization seen (4096 divisible by 16, 1000 not)
    assert launches[0][:4] == ["add_rows", [64, 1, 1], {"BLOCK": 64}, 4]
    assert "cols" in launches[0][4] and "x_ptr" in launches[0][4] and "cols" not in launches[1][4]
    # the autotuner compiled both configs as candidates, then launched its pick (the first: a constant benchmark)
    tuned = [entry for entry in launches if entry[6] == "tuned"]
    assert [(e[2]["BLOCK"], e[5]) for e in tuned] == [(64, True), (128, True), (64, False)]
    assert tuned[0][1] == [2, 1, 1] and tuned[1][1] == [1, 1, 1]  # the grid is evaluated with each config's constexprs
    # the model: 4096 columns run 64 loop trips, 1000 run 16: more instructions, same straight-line part
    short, long_ = r["short"], r["long"]
    assert "problem" not in short and "problem" not in long_
    assert long_["instructions_per_program"] > short["instructions_per_program"]
    assert long_["time_us"] >= short["time_us"] > 3.0  # at least the launch


def test_kernel_without_trip_counts_is_reported_not_guessed(tmp_path):
    pytest.importorskip("triton")
    script = _COMPILE_ONLY_SCRIPT.replace('sys.modules[add_rows.fn.__module__].LOOP_TRIPS = {"add_rows": trips}',
                                          "")
    r = _run_clean(script, tmp_path)
    assert "no trip counts for 1 loop(s) of add_rows" in r["short"]["problem"]


def test_calibration_pairs_estimates_with_measurements():
    """benchmarks.calibrate: every (case, mode) the estimate makes gets its measurement beside it; a failed
    measurement is reported in its row; model GPUs from device names."""
    from benchmarks import calibrate, estimate
    from segvit.kernels import launch_cases

    cases = [c for c in launch_cases.published_cases(models=["segvit_vit-l16_ade20k_640"], batches=(8,),
                                                     dtypes=("bf16",))]
    modes = [(c, b) for c in cases for b in estimate.case_modes(c)]
    assert {c.op for c, _ in modes} == {"atm_attention", "mask_classify", "mask_losses"}
    assert [b for c, b in modes if c.op == "mask_losses"] == [False, True]  # forward alone, then with backward
    estimates = [dict(id=f"{c.name}/{b}", estimate_us=10.0 + i, floor_us=5.0) for i, (c, b) in enumerate(modes)]

    def measure(case, backward):
        if case.op == "mask_classify":
            raise RuntimeError("no kernel image")
        return 20.0

    rows = calibrate.run(cases, "A100", measure=measure, estimates=estimates)
    assert [r["id"] for r in rows] == [e["id"] for e in estimates]
    first = rows[0]
    assert first["measured_us"] == 20.0 and first["measured_over_estimate"] == 2.0 and first["measured_over_floor"] == 4.0
    failed = [r for r in rows if r["problem"]]
    assert len(failed) == 1 and "no kernel image" in failed[0]["problem"] and failed[0]["measured_over_estimate"] is None
    table = calibrate.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "failed: RuntimeError: no kernel image" in table
    with pytest.raises(RuntimeError, match="estimates for"):
        calibrate.run(cases, "A100", measure=measure, estimates=estimates[:-1])
    assert [calibrate.model_gpu(n) for n in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                              "Tesla T4")] == ["A100", "H100", "H100", None]


def test_launch_case_callable_runs_the_op_on_a_device():
    """LaunchCase.callable_on: the timed function of the calibration, here on the CPU through the interpreter at a
    small shape (forward, and forward + backward with input gradients of the inputs' shapes)."""
    from segvit.kernels import launch_cases

    shape = dict(classes=5, heads=2, head_dim=8, grid=3)
    case = launch_cases.LaunchCase("atm_attention", "tiny", 2, "fp32", shape, dropout=0.0, backward=True)
    out, sim = case.callable_on("cpu", backward=False)()
    assert out.shape == (2, 5, 2, 8) and sim.shape == (2, 5, 9) and torch.isfinite(out).all()
    grads = case.callable_on("cpu", backward=True)()
    assert [g.shape for g in grads] == [(2, 5, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8)]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


_SEED_SCRIPT = r"""
import json
import torch
from segvit.kernels.compile_only import compile_only
from segvit.kernels.launch_cases import LaunchCase

def seed_after(s):
    torch.manual_seed(s)
    return int(torch.randint(0, 2 ** 31 - 1, ()))  # the op's first draw: its dropout seed

aligned = next(s for s in range(1000) if seed_after(s) % 16 == 0)
unaligned = next(s for s in range(1000) if seed_after(s) % 16 != 0)
case = LaunchCase("atm_attention", "tiny", 2, "bf16", dict(classes=5, heads=2, head_dim=32, grid=8), dropout=0.1)
found = []
with compile_only(80) as launches:
    for s in (aligned, unaligned):
        torch.manual_seed(s)
        before = len(launches)
        case.run()
        found.append(sorted({(l.fn_name, l.specialization, l.kernel.hash) for l in launches[before:]}))
print(json.dumps({"aligned": found[0], "unaligned": found[1], "seeds": [seed_after(aligned), seed_after(unaligned)]}))
"""


def test_dropout_seed_does_not_change_what_compiles(tmp_path):
    """The attention kernels do not specialize on the dropout seed: a seed divisible by 16 launches the same compiled
    kernels as any other (else one training step in 16 would compile new variants, and the compile report would
    list a random set)."""
    pytest.importorskip("triton")
    r = _run_clean(_SEED_SCRIPT, tmp_path)
    assert r["seeds"][0] % 16 == 0 and r["seeds"][1] % 16 != 0
    assert r["aligned"] and r["aligned"] == r["unaligned"]
