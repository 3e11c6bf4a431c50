"""``python -m benchmarks.gpu_check``: the pieces that run without a GPU (argument parsing, the no-GPU exit, the
child-process time limits, the file-size caps, junit parsing and the summary), and its orchestration with the
children faked."""
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.5">
<testcase classname="tests.test_gpu" name="test_a[triton-float32]" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_b[cuda-bfloat16]" time="2.0">
  <failure message="AssertionError: out: error 0.5 &gt; bound 0.01 | x">long traceback</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.1"><skipped message="needs two CUDA devices"/></testcase>
<testcase classname="tests.test_gpu" name="test_d" time="0.1"><error message="fixture failed">trace</error></testcase>
<testcase classname="tests.test_triton_masks" name="test_e" time="0.3"/>
</testsuite></testsuites>
"""


def fake_results(device_name="NVIDIA H100 80GB HBM3"):
    meta = {"device_name": device_name, "cores": 16, "threads": 16, "torch": "2.13.0", "triton": "3.8.0",
            "segvit": "0.1.0", "commit": "abc1234", "settings": {"quick": True}, "started_utc": "2026-12-01 10:00:00",
            "duration_s": 100.0, "peaks": {"matmul_flops": {"float32": 5e13}, "copy_bandwidth": 3e12}}
    base = {"group": "atm_attention", "label": "vit-b16_ade20k_512: B8 Nq150 Nk1024 H12 D32", "mode": "fwd",
            "case_id": "atm_attention/vit-b16_ade20k_512/fwd/float32", "reason": "", "p20_ms": 1.0, "p80_ms": 1.2}
    rows = [dict(base, variant="eager", status="ok", median_ms=1.1, peak_mem_mb=50.0, speedup_vs_eager=1.0,
                 mem_ratio_vs_eager=1.0, scratch_ratio_vs_eager=1.0, roofline_pct=10.0),
            dict(base, variant="triton", status="ok", median_ms=0.25, peak_mem_mb=5.0, speedup_vs_eager=4.4,
                 mem_ratio_vs_eager=0.1, scratch_ratio_vs_eager=0.05, roofline_pct=44.0),
            dict(base, variant="cuda", status="n/a", reason="n/a: no cuda kernel for atm_attention (not implemented)",
                 median_ms=None, peak_mem_mb=None, speedup_vs_eager=None, mem_ratio_vs_eager=None,
                 roofline_pct=None)]
    return {"schema": 1, "meta": meta, "results": rows}


FAKE_MACHINE = {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "total_memory_gib": 79.1,
                          "multi_processor_count": 132}],
                "driver": "550.54.15", "torch": "2.13.0+cu128", "cuda": "12.8", "cudnn": 91000, "triton": "3.8.0",
                "python": "3.11.7", "segvit": "0.1.0", "git_commit": "0123456789abcdef", "git_dirty": False,
                "segvit_backends": {"eager": "available", "triton": "available", "cpp": "available",
                                    "cuda": "available"},
                "recorded_utc": "2026-12-01 10:00:00", "hostname": "gpu-box"}


# ------------------------------------------------------------------------------------------- arguments, no GPU

def test_arguments():
    args = gpu_check.parse_args(["--out", "x"])
    assert (args.out, args.pytest_timeout, args.bench_timeout) == ("x", 240, 210)
    assert not (args.no_tests or args.no_bench or args.no_models)
    # the whole check fits in 8 minutes: pytest 4, the benchmarks 3.5
    assert gpu_check.PYTEST_TIMEOUT_S + gpu_check.BENCH_TIMEOUT_S <= 7.5 * 60
    args = gpu_check.parse_args(["--out", "y", "--pytest-timeout", "30", "--no-bench", "--pytest-args", "-x -k atm"])
    assert args.pytest_timeout == 30 and args.no_bench and args.pytest_args.split() == ["-x", "-k", "atm"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])  # --out is required
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--bench-timeout", "0"])


@pytest.mark.skipif(gpu_check.cuda_problem() == "", reason="this machine has a CUDA device")
def test_no_gpu_exits_2_with_a_clear_message(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no CUDA device" in result.stderr and "torch" in result.stderr
    assert not out.exists()  # nothing is run or written


def test_no_gpu_path_in_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "cuda_problem", lambda: "torch 2.13.0+cpu is a build without CUDA")
    assert gpu_check.main(["--out", str(tmp_path / "o")]) == gpu_check.EXIT_NO_GPU
    assert "no CUDA device: torch 2.13.0+cpu is a build without CUDA" in capsys.readouterr().err


def test_machine_info_is_json_without_a_gpu():
    info = gpu_check.machine_info()
    for key in ("torch", "cuda", "triton", "python", "gpus", "driver", "nvidia_smi_q", "git_commit",
                "segvit_build_info", "segvit_backends"):
        assert key in info, key
    json.dumps(info, default=str)


# ------------------------------------------------------------------------------------------ child processes

def test_run_step_records_success_failure_and_timeout(tmp_path):
    ok = gpu_check.run_step(gpu_check.Step("ok", [sys.executable, "-c", "print('hello')"], str(tmp_path / "a.log"),
                                           30))
    assert ok.ok and ok.returncode == 0 and "hello" in (tmp_path / "a.log").read_text()
    bad = gpu_check.run_step(gpu_check.Step("bad", [sys.executable, "-c", "raise SystemExit(4)"],
                                            str(tmp_path / "b.log"), 30))
    assert bad.status == "failed (exit 4)" and not bad.ok
    # A child that ignores SIGTERM (its grandchild inherits that) and leaves a grandchild: the whole group is killed
    # (SIGKILL after the grace period) before the grandchild would write its marker.
    marker = tmp_path / "grandchild-alive"
    script = tmp_path / "child.py"
    grandchild = f"import time; time.sleep(5); open({str(marker)!r}, 'w')"
    script.write_text("import signal, subprocess, sys, time\n"
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
                      "time.sleep(60)\n")
    code = str(script)
    start = time.monotonic()
    slow = gpu_check.run_step(gpu_check.Step("slow", [sys.executable, code], str(tmp_path / "c.log"), 1.5),
                              grace_s=1.0)
    assert time.monotonic() - start < 5
    assert slow.status == "timed out after 2 s" and not slow.ok
    assert "timed out" in (tmp_path / "c.log").read_text()
    time.sleep(5)
    assert not marker.exists(), "the grandchild outlived the time limit"
    skipped = gpu_check.run_step(gpu_check.Step("none", ["true"], str(tmp_path / "d.log"), 0))
    assert skipped.status.startswith("skipped")


def test_pytest_stopped_at_the_limit_still_writes_its_junit(tmp_path):
    """The SIGINT at pytest's time limit: the tests run so far are reported and the junit xml is written."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(60)\n")
    junit = tmp_path / "junit.xml"
    step = gpu_check.Step("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                                     f"--junitxml={junit}"], str(tmp_path / "pytest.log"), 6,
                          stop_signal=gpu_check.signal.SIGINT)
    gpu_check.run_step(step, cwd=str(tmp_path), grace_s=10)
    assert step.status == "timed out after 6 s"
    counts = gpu_check.junit_counts(str(junit))
    assert counts is not None and counts["passed"] >= 1, (tmp_path / "pytest.log").read_text()[-2000:]
    assert "KeyboardInterrupt" in (tmp_path / "pytest.log").read_text()


# ------------------------------------------------------------------------------------------------ file sizes

def test_cap_file_keeps_head_and_tail(tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"HEAD" + b"x" * 300_000 + b"TAIL")
    assert gpu_check.cap_file(str(path), limit=10_000)
    data = path.read_bytes()
    assert len(data) <= 10_000 and data.startswith(b"HEAD") and data.endswith(b"TAIL") and b"bytes cut" in data
    assert not gpu_check.cap_file(str(path), limit=10_000)  # already small enough
    assert not gpu_check.cap_file(str(tmp_path / "missing"))


def test_cap_junit_stays_valid_xml(tmp_path):
    path = tmp_path / "junit.xml"
    cases = "".join(f'<testcase classname="t" name="c{i}"><failure message="m{i}">{"y" * 5000}</failure>'
                    f'<system-out>{"z" * 5000}</system-out></testcase>' for i in range(40))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite tests="40" failures="40" errors="0" skipped="0" '
                    f'time="1">{cases}</testsuite></testsuites>')
    assert os.path.getsize(path) > 400_000
    assert gpu_check.cap_junit(str(path), limit=100_000, text_limit=500)
    assert os.path.getsize(path) <= 100_000
    counts = gpu_check.junit_counts(str(path))  # still parses, counts intact
    assert counts["tests"] == 40 and counts["failed"] == 40 and len(counts["failures"]) == 40


# --------------------------------------------------------------------------------------------------- summary

def test_junit_counts_and_missing_report(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    counts = gpu_check.junit_counts(str(path))
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == dict(
        tests=5, passed=2, failed=1, errors=1, skipped=1)
    assert counts["failures"][0] == ("tests.test_gpu::test_b[cuda-bfloat16]", "failure",
                                     "AssertionError: out: error 0.5 > bound 0.01 | x")
    assert gpu_check.junit_counts(str(tmp_path / "none.xml")) is None
    (tmp_path / "broken.xml").write_text("<testsuites><testsuite")
    assert gpu_check.junit_counts(str(tmp_path / "broken.xml")) is None


def test_summary_from_fake_junit_log_and_results(tmp_path):
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "pytest.log").write_text("....F.s\n\n=== 1 failed, 2 passed, 1 skipped, 1 error in 12.50s ===\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps(fake_results()))
    steps = [gpu_check.Step("pytest", ["pytest"], str(tmp_path / "pytest.log"), 240, status="failed (exit 1)",
                            returncode=1, seconds=13.2),
             gpu_check.Step("benchmarks: ops", ["bench"], str(tmp_path / "bench.log"), 210, status="ok", seconds=95.0),
             gpu_check.Step("benchmarks: models", ["bench"], str(tmp_path / "bench-models.log"), 115,
                            status="timed out after 115 s", seconds=130.0)]
    tests = gpu_check.junit_counts(str(tmp_path / "junit.xml"))
    code = gpu_check.exit_status(steps[0], tests, steps[1:])
    assert code == gpu_check.EXIT_TESTS
    text = gpu_check.write_summary(str(tmp_path / "summary.md"), FAKE_MACHINE, steps, tests,
                                   [("benchmarks: ops", str(bench)), ("benchmarks: models", str(bench / "models"))],
                                   250.0, code)
    assert text == (tmp_path / "summary.md").read_text()
    assert text.startswith("# segvit GPU check: FAIL (tests)")
    assert "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" in text and "driver 550.54.15" in text
    assert "CUDA 12.8" in text and "0123456789ab" in text
    assert "5 tests: 2 passed, 1 failed, 1 errors, 1 skipped in 12 s." in text
    assert "`tests.test_gpu::test_b[cuda-bfloat16]` | failure | AssertionError: out: error 0.5 > bound 0.01 / x" in text
    assert "`tests.test_gpu::test_d` | error | fixture failed" in text
    assert "| pytest | failed (exit 1) | 13 | `pytest.log` |" in text
    assert "| benchmarks: models | timed out after 115 s | 130 | `bench-models.log` |" in text
    assert "1 failed, 2 passed, 1 skipped, 1 error in 12.50s" in text  # the log's last line
    assert "| atm_attention | vit-b16_ade20k_512: B8 Nq150 Nk1024 H12 D32 | fwd | 1.1 | 50.0 | triton: 4.40x" in text
    assert "### benchmarks: models\n\nno results" in text


def test_exit_status():
    ok = gpu_check.Step("pytest", [], "", 1, status="ok")
    passing = {"tests": 3, "failed": 0, "errors": 0}
    bench_ok, bench_late = gpu_check.Step("b", [], "", 1, status="ok"), gpu_check.Step("b", [], "", 1,
                                                                                        status="timed out after 1 s")
    assert gpu_check.exit_status(ok, passing, [bench_ok]) == gpu_check.EXIT_OK
    assert gpu_check.exit_status(ok, passing, [bench_ok, bench_late]) == gpu_check.EXIT_BENCH
    assert gpu_check.exit_status(ok, dict(passing, failed=1), [bench_ok]) == gpu_check.EXIT_TESTS
    assert gpu_check.exit_status(ok, dict(passing, errors=2), []) == gpu_check.EXIT_TESTS
    assert gpu_check.exit_status(ok, None, []) == gpu_check.EXIT_TESTS  # no junit report
    late = gpu_check.Step("pytest", [], "", 1, status="timed out after 240 s")
    assert gpu_check.exit_status(late, passing, []) == gpu_check.EXIT_TESTS
    assert gpu_check.exit_status(None, None, [bench_ok]) == gpu_check.EXIT_OK  # --no-tests


# ------------------------------------------------------------------------------------- main, children faked

def test_main_with_faked_children(monkeypatch, tmp_path):
    """The whole check with a 'GPU' and the child processes replaced: what runs, with which arguments and limits,
    and the files it leaves."""
    monkeypatch.setattr(gpu_check, "cuda_problem", lambda: "")
    monkeypatch.setattr(gpu_check, "machine_info", lambda: dict(FAKE_MACHINE))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []

    def fake_run_step(step, cwd=gpu_check.ROOT, env=None):
        seen.append((step.name, list(step.command), step.timeout_s, env))
        if step.name == "pytest":
            junit = next(a.split("=", 1)[1] for a in step.command if a.startswith("--junitxml="))
            with open(junit, "w") as f:
                f.write(JUNIT.replace('errors="1" failures="1"', 'errors="0" failures="0"')
                        .replace('<failure message="AssertionError: out: error 0.5 &gt; bound 0.01 | x">long '
                                 'traceback</failure>', "")
                        .replace('<error message="fixture failed">trace</error>', ""))
        elif step.name == "cost-model calibration":
            directory = step.command[step.command.index("--out") + 1]
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "calibration.md"), "w") as f:
                f.write("| case | model GPU | estimate us | measured us |\n|---|---|---|---|\n"
                        "| atm_attention/x/fwd/bfloat16/B8 | H100 | 10.0 | 12.5 |\n")
        else:
            directory = step.command[step.command.index("--out") + 1]
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "results.json"), "w") as f:
                json.dump(fake_results(), f)
        with open(step.log, "w") as f:
            f.write("log\n")
        step.status, step.returncode, step.seconds = "ok", 0, 1.0
        return step

    monkeypatch.setattr(gpu_check, "run_step", fake_run_step)
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--pytest-args=-x"]) == gpu_check.EXIT_OK
    names = [s[0] for s in seen]
    assert names == ["pytest", "benchmarks: ops", "benchmarks: models", "cost-model calibration"]
    calibrate_cmd = seen[3][1]
    assert calibrate_cmd[1:3] == ["-m", "benchmarks.calibrate"] and seen[3][2] == gpu_check.CALIBRATE_TIMEOUT_S
    assert calibrate_cmd[calibrate_cmd.index("--out") + 1] == str(out / "calibration")
    pytest_cmd = seen[0][1]
    assert pytest_cmd[1:7] == ["-m", "pytest", "-m", "gpu", "-q", "tests"] and pytest_cmd[-1] == "-x"
    assert seen[0][2] == 240
    ops_cmd, models_cmd = seen[1][1], seen[2][1]
    assert ops_cmd[1:6] == ["-m", "benchmarks", "--device", "cuda", "--quick"]
    assert ops_cmd[ops_cmd.index("--ops") + 1] == gpu_check.OP_GROUPS
    assert models_cmd[models_cmd.index("--ops") + 1] == "models"
    assert models_cmd[models_cmd.index("--out") + 1] == str(out / "bench" / "models")
    assert seen[1][2] <= 210 and seen[2][2] <= seen[1][2]  # one budget shared by the two runs
    assert all("TRITON_INTERPRET" not in s[3] for s in seen)  # the children run the real GPU kernels
    assert sorted(os.listdir(out)) == ["bench", "bench-models.log", "bench.log", "calibrate.log", "calibration",
                                       "junit.xml", "machine.json", "pytest.log", "summary.md"]
    assert json.loads((out / "machine.json").read_text())["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# segvit GPU check: PASS")
    assert "5 tests: 4 passed, 0 failed, 0 errors, 1 skipped" in summary
    assert summary.count("| atm_attention |") == 2  # the table of each benchmark run
    assert "## Cost model against measurement" in summary and "| atm_attention/x/fwd/bfloat16/B8 | H100 | 10.0 | 12.5 |" in summary
    for name in os.listdir(out):
        if os.path.isfile(out / name):
            assert os.path.getsize(out / name) < gpu_check.MAX_FILE_BYTES
    ET.parse(out / "junit.xml")
