"""Logic of csrc/compile_check.py (the nvcc compile check of the CUDA sources, run in full by .ci/run)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("compile_check", os.path.join(ROOT, "csrc", "compile_check.py"))
compile_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_check)

NVCC = compile_check.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_finds_every_cuda_source():
    found = [os.path.relpath(p, ROOT) for p in compile_check.cuda_sources()]
    assert {"csrc/cuda/mask_classify.cu", "csrc/cuda/mask_losses.cu"} <= set(found)
    on_disk = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
               for f in files if f.endswith(".cu")}
    assert set(found) == on_disk and found == sorted(found)


def test_nvcc_command():
    cmd = compile_check.nvcc_command("/x/nvcc", "/src/k.cu", "90", "/tmp/k.o", ["-I/torch/include"])
    assert cmd[:5] == ["/x/nvcc", "-c", "/src/k.cu", "-o", "/tmp/k.o"]
    assert "-gencode=arch=compute_90,code=sm_90" in cmd
    assert "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE" in cmd and "-I/torch/include" in cmd
    assert cmd[cmd.index("-Werror") + 1] == "all-warnings"
    assert "-Werror" in cmd[cmd.index("-Xcompiler") + 1]
    assert "--use_fast_math" not in cmd  # as in setup.py's build: its consequences are not tested here
    device_only = compile_check.nvcc_command("/x/nvcc", "/src/k.cu", "80", "/tmp/k.cubin", [], host=False)
    assert device_only[1] == "-cubin" and "-gencode=arch=compute_80,code=sm_80" in device_only


def test_nvcc_lookup_prefers_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert compile_check.find_nvcc() == str(fake)


def test_missing_nvcc_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(compile_check, "find_nvcc", lambda: None)
    assert compile_check.main([]) == 2
    assert "nvcc not found" in capsys.readouterr().err


@needs_nvcc
def test_reports_errors_and_warnings_as_failures(tmp_path, capsys, monkeypatch):
    # Tiny sources without torch headers keep this fast; the torch flags are not needed for them.
    monkeypatch.setattr(compile_check, "torch_flags", lambda: [])
    good = tmp_path / "good.cu"
    good.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    warning = tmp_path / "warning.cu"
    warning.write_text("__global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }\n")
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    assert compile_check.main([str(good), "--arch", "80"]) == 0
    assert compile_check.main([str(good), str(warning), str(broken), "--arch", "80", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    lines = {os.path.basename(line.split()[0]): line for line in out.splitlines() if line.endswith(("ok", "FAILED"))}
    assert lines["good.cu"].endswith("ok")
    assert lines["warning.cu"].endswith("FAILED") and lines["broken.cu"].endswith("FAILED")
    assert "undefined_name" in out and "unused" in out
