"""Packaging: the sdist's file list, pyproject.toml's [project], the console scripts, the CUDA toolkit lookup of the
build (build_tools/cuda_build.py, on fake directory layouts) and the extension's torch-version check.

The full build (sdist -> CUDA wheel -> install -> import) runs in .ci/cuda_wheel.sh.
"""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_build", os.path.join(ROOT, "build_tools", "cuda_build.py"))
cuda_build = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cuda_build", cuda_build)  # its dataclass looks its module up there
_spec.loader.exec_module(cuda_build)

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)


# --- CUDA toolkit lookup -------------------------------------------------------------------------------------------

def make_toolkit(root, lib="lib64", nvcc=True, header=True, cudart="libcudart.so"):
    """A fake toolkit: bin/nvcc, include/cuda_runtime.h, <lib>/libcudart.so, each optional."""
    root.mkdir(parents=True, exist_ok=True)
    if nvcc:
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (root / "bin" / "nvcc").chmod(0o755)
    if header:
        (root / "include").mkdir(exist_ok=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    if lib:
        (root / lib).mkdir(parents=True, exist_ok=True)
        (root / lib / cudart).write_text("")
    return root


def no_nvcc(name):
    return None


def no_top(nvcc):
    return None


@pytest.fixture
def no_default(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(tmp_path / "no-default-cuda"))


@pytest.mark.parametrize("lib", ["lib64", "lib", "targets/x86_64-linux/lib"])
def test_cudart_found_in_each_layout(tmp_path, lib):
    root = make_toolkit(tmp_path / "cuda", lib=lib)
    assert cuda_build.cudart_dir(str(root)) == str(root / lib)
    assert cuda_build.missing_parts(str(root)) == []


def test_missing_parts(tmp_path):
    assert len(cuda_build.missing_parts(str(tmp_path / "nothing"))) == 3
    # pip's nvidia-cuda-runtime ships only the versioned library, which -lcudart does not find
    root = make_toolkit(tmp_path / "cuda", nvcc=False, cudart="libcudart.so.13")
    missing = cuda_build.missing_parts(str(root))
    assert missing == ["bin/nvcc", "libcudart.so in lib64/, lib/ or targets/*/lib/"]


def test_cuda_home_from_environment(tmp_path, no_default):
    root = make_toolkit(tmp_path / "cuda")
    home = cuda_build.find_cuda_home({"CUDA_HOME": str(root)}, no_nvcc, no_top)
    assert (home.root, home.cudart_dir, home.found_by) == (str(root), str(root / "lib64"), "CUDA_HOME")
    home = cuda_build.find_cuda_home({"CUDA_PATH": str(root)}, no_nvcc, no_top)
    assert home.found_by == "CUDA_PATH"


def test_unusable_cuda_home_is_one_line_saying_what_to_set(tmp_path, no_default):
    root = make_toolkit(tmp_path / "cuda", lib=None)
    good = make_toolkit(tmp_path / "good")
    with pytest.raises(cuda_build.CudaHomeError) as err:
        # an explicit CUDA_HOME is never second-guessed, even with a usable toolkit on PATH
        cuda_build.find_cuda_home({"CUDA_HOME": str(root)}, lambda n: str(good / "bin" / "nvcc"), no_top)
    message = str(err.value)
    assert "\n" not in message and f"CUDA_HOME={root}" in message
    assert "libcudart" in message and "SEGVIT_SKIP_CUDA=1" in message


def test_wrapper_nvcc_resolved_by_its_dryrun_top(tmp_path, no_default):
    # /usr/local/bin/nvcc as a script that execs the real one: torch's guess (/usr/local) has no runtime
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    wrapper = make_toolkit(tmp_path / "usr-local", lib=None, header=False)
    nvcc = str(wrapper / "bin" / "nvcc")
    tops = {nvcc: str(toolkit / "bin" / "..")}
    home = cuda_build.find_cuda_home({}, lambda n: nvcc, tops.get)
    assert home.root == str(toolkit) and "--dryrun" in home.found_by


def test_symlinked_nvcc_resolved_by_realpath(tmp_path, no_default):
    toolkit = make_toolkit(tmp_path / "cuda", lib="targets/x86_64-linux/lib")
    links = tmp_path / "env" / "bin"
    links.mkdir(parents=True)
    (links / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    home = cuda_build.find_cuda_home({}, lambda n: str(links / "nvcc"), no_top)
    assert home.root == str(toolkit) and home.found_by.startswith("realpath")
    assert home.cudart_dir == str(toolkit / "targets" / "x86_64-linux" / "lib")


def test_nvcc_in_toolkit_bin_and_default_root(tmp_path, monkeypatch):
    toolkit = make_toolkit(tmp_path / "cuda")
    home = cuda_build.find_cuda_home({}, lambda n: str(toolkit / "bin" / "nvcc"), no_top)
    assert home.root == str(toolkit)
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(toolkit))
    assert cuda_build.find_cuda_home({}, no_nvcc, no_top) == cuda_build.CudaHome(str(toolkit), str(toolkit / "lib64"),
                                                                                 "default")


def test_no_toolkit_is_one_line_listing_what_was_tried(tmp_path, no_default):
    wrapper = make_toolkit(tmp_path / "usr-local", lib=None, header=False)
    with pytest.raises(cuda_build.CudaHomeError) as err:
        cuda_build.find_cuda_home({}, lambda n: str(wrapper / "bin" / "nvcc"), no_top)
    message = str(err.value)
    assert "\n" not in message and str(wrapper) in message and "no-default-cuda" in message
    assert "CUDA_HOME=" in message and "SEGVIT_SKIP_CUDA=1" in message


def test_a_toolkit_in_sight_or_none(tmp_path, monkeypatch):
    # A CUDA torch with no toolkit anywhere (pip's torch, no nvcc) builds the CPU kernels; anything pointing at a
    # toolkit makes the lookup (and its one-line stop) apply.
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(tmp_path / "no-default-cuda"))
    assert not cuda_build.any_toolkit_in_sight({}, no_nvcc)
    assert cuda_build.any_toolkit_in_sight({"CUDA_HOME": "/x"}, no_nvcc)
    assert cuda_build.any_toolkit_in_sight({"CUDA_PATH": "/x"}, no_nvcc)
    assert cuda_build.any_toolkit_in_sight({}, lambda n: "/usr/local/bin/nvcc")
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(make_toolkit(tmp_path / "cuda")))
    assert cuda_build.any_toolkit_in_sight({}, no_nvcc)


def test_nvcc_top_runs_nvcc_dryrun(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text('#!/bin/sh\necho "#$ _HERE_=/opt/x/bin"\necho "#$ TOP=/opt/x/bin/.."\necho "#$ NVVM=y"\n')
    fake.chmod(0o755)
    assert cuda_build.nvcc_top(str(fake)) == "/opt/x"
    fake.write_text("#!/bin/sh\necho 'nvcc fatal: something'\nexit 1\n")
    assert cuda_build.nvcc_top(str(fake)) is None
    assert cuda_build.nvcc_top(str(tmp_path / "missing")) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_this_machines_toolkit_is_found(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = cuda_build.find_cuda_home()
    assert cuda_build.missing_parts(home.root) == []


def test_gencode_sass_for_each_ptx_for_newest():
    assert cuda_build.parse_archs(None) == ["80", "90"]
    assert cuda_build.parse_archs("9.0, 8.0") == ["90", "80"]
    assert cuda_build.gencode_flags(["80", "90"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                      "-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    assert cuda_build.gencode_flags(["100", "90a"]) == ["-gencode=arch=compute_100,code=[sm_100,compute_100]",
                                                        "-gencode=arch=compute_90a,code=sm_90a"]
    for bad in ("", "sm_80", "8.x"):
        with pytest.raises(ValueError):
            cuda_build.parse_archs(bad)


def test_nvcc_flags():
    flags = cuda_build.nvcc_flags(["80", "90"])
    assert "--use_fast_math" not in flags and "-O3" in flags
    assert not any("Werror" in f for f in flags)
    strict = cuda_build.nvcc_flags(["80"], werror=True)
    assert strict[strict.index("-Werror") + 1] == "all-warnings"
    assert "-Werror" in strict[strict.index("-Xcompiler") + 1]


# --- pyproject.toml, console scripts --------------------------------------------------------------------------------

def test_project_table():
    project = PYPROJECT["project"]
    assert project["name"] == "segvit" and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "segvit.__version__"}
    assert project["readme"] == "README.md" and os.path.isfile(os.path.join(ROOT, project["readme"]))
    assert project["requires-python"].startswith(">=3.")
    deps = {d.split(";")[0].strip().split(">=")[0] for d in project["dependencies"]}
    assert deps == {"torch", "numpy", "triton", "tqdm", "pillow"}
    assert "torch>=2.4" in project["dependencies"]
    assert set(project["optional-dependencies"]) >= {"test", "bench", "hub", "tensorboard", "onnx"}
    # an isolated build must never fetch a torch of its own to build against
    assert not any(r.startswith("torch") for r in PYPROJECT["build-system"]["requires"])


@pytest.mark.parametrize("name", ["segvit-train", "segvit-eval", "segvit-predict", "segvit-export", "segvit-info",
                                  "segvit-data"])
def test_console_script_targets(name, monkeypatch):
    target = PYPROJECT["project"]["scripts"][name]
    module, _, attr = target.partition(":")
    func = getattr(importlib.import_module(module), attr)
    assert callable(func)
    if name == "segvit-info":
        return
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        func()
    assert exit_.value.code == 0


def test_info_main_prints_and_returns_none(capsys):
    import segvit.info

    assert segvit.info.main() is None
    out = capsys.readouterr().out
    assert out.startswith("segvit ") and "extension segvit._C" in out


def test_train_and_eval_cli_return_none(monkeypatch):
    # a console script's return value is its exit status: cli() must not hand back main()'s results dict
    import segvit.eval
    import segvit.export
    import segvit.predict
    import segvit.train

    for module in (segvit.train, segvit.eval, segvit.predict, segvit.export):
        monkeypatch.setattr(module, "main", lambda argv=None: {"mIoU": 1.0})
        assert module.cli() is None


def test_setup_without_torch_says_no_build_isolation():
    # what `pip install .` (isolated build, no torch there) shows: one line, no traceback
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-build-isolation ." in lines[0], proc.stderr


# --- the sdist -----------------------------------------------------------------------------------------------------

def git_tracked_files():
    if not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return [f for f in proc.stdout.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def test_sdist_holds_every_tracked_file(tmp_path):
    tracked = git_tracked_files()
    if tracked is None:
        pytest.skip("not a git checkout")
    # Build it from a copy of the tracked files (what a clean clone has), as `python -m build --sdist` would.
    src = tmp_path / "src"
    for name in tracked:
        os.makedirs(src / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    # Only the repository's dot-files (.ci/, .gitignore) stay out: CI scripts are no part of a build or test run.
    needed = {f for f in tracked if not f.startswith(".")}
    assert sorted(needed - members) == []
    assert {"PKG-INFO", "build_tools/cuda_build.py", "csrc/cuda/kernels.h", "tests/data/dev_vit.pt"} <= members
    assert not [m for m in members if m.endswith((".so", ".pyc", ".o"))]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        pkg_info = tar.extractfile(f"{name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    import segvit

    assert f"Version: {segvit.__version__}" in pkg_info and "Requires-Dist: torch>=2.4" in pkg_info


# --- the extension's torch-version check ---------------------------------------------------------------------------

def test_torch_version_mismatch_warns(monkeypatch, recwarn):
    import torch

    from segvit import _extension

    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    _extension._check_torch_version("2.13.0")
    assert not recwarn.list
    monkeypatch.setattr(torch, "__version__", "9.8.7+cpu")
    with pytest.warns(RuntimeWarning, match=r"built against torch 2\.13\.0 but torch 9\.8\.7\+cpu is running"):
        _extension._check_torch_version("2.13.0")
    assert _extension._release("2.15.0.dev20260101+cu130") == "2.15.0"


def test_build_info_reports_both_torch_versions(monkeypatch):
    import torch

    from segvit import _extension

    info = _extension.build_info()
    if not info["available"]:
        pytest.skip(info["reason"])
    assert info["torch_version_running"] == torch.__version__ and info["torch_version_matches"]
    monkeypatch.setattr(torch, "__version__", "9.8.7")
    assert _extension.build_info()["torch_version_matches"] is False
