"""``python -m benchmarks.gpu_check --out DIR``: the one-command check of a GPU machine.

1. Checks that a CUDA device is visible (exit status 2 with a message saying why not, otherwise).
2. Records the machine in ``DIR/machine.json``: every GPU's properties, the driver, ``nvidia-smi -q``, the torch /
   CUDA / cuDNN / triton / Python versions, ``segvit``'s build info and backend status, the git commit.
3. Runs ``python -m pytest -m gpu -q tests`` (tests/test_gpu.py and the CUDA cases of the other test files) with
   ``DIR/junit.xml`` and its log in ``DIR/pytest.log``.
4. Runs ``python -m benchmarks --device cuda --quick`` into ``DIR/bench/`` (the op cases) and ``DIR/bench/models/``
   (the model cases, a second run so that a timeout there keeps the op results), logs in ``DIR/bench*.log``.
5. Writes ``DIR/summary.md``: machine, each step's status and time, the test counts and failures, the benchmark
   tables.

Each step runs in its own process group under a time limit (pytest 240 s, the benchmarks 210 s together, so the
whole check ends within 8 minutes); a step that runs over is stopped (pytest with SIGINT, so it still reports the
tests it ran and writes its junit xml; the benchmarks with SIGTERM; SIGKILL to the group 15 s later), recorded as
timed out, and the check goes on. Every file written is kept under 16 MiB (logs keep their head and tail).

Exit status: 0 when every test passed and the benchmarks completed; 1 when a test failed or errored, pytest timed
out or crashed, or wrote no junit report; 3 when the tests passed but a benchmark step failed or timed out;
2 when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE_BYTES = 16 * 2 ** 20
PYTEST_TIMEOUT_S = 240
BENCH_TIMEOUT_S = 210
# The models' benchmark run is started only with at least this much of the benchmark budget left.
MIN_MODELS_S = 30
CALIBRATE_TIMEOUT_S = 240  # the cost model's estimate next to measured times (benchmarks/calibrate.py)
OP_GROUPS = "atm_attention,mask_classify,query_pool_attention,mask_losses"
EXIT_OK, EXIT_TESTS, EXIT_NO_GPU, EXIT_BENCH = 0, 1, 2, 3


@dataclass
class Step:
    """One child process of the check."""
    name: str
    command: list
    log: str
    timeout_s: float
    # The first signal at the time limit: SIGINT for pytest (it stops, reports the tests run so far and writes the
    # junit xml, as on Ctrl-C), SIGTERM for the benchmarks (they end their worker processes on it).
    stop_signal: int = signal.SIGTERM
    status: str = "not run"  # "ok", "failed (exit N)", "timed out after N s", "not run", "skipped: why"
    returncode: int | None = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------- helpers

def cap_file(path: str, limit: int = MAX_FILE_BYTES) -> bool:
    """Cuts ``path`` to at most ``limit`` bytes, keeping its first quarter and its end around a marker line;
    True if it was cut."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    if size <= limit:
        return False
    marker = f"\n\n[... {{}} bytes cut by benchmarks.gpu_check: the file was {size} bytes ...]\n\n"
    room = limit - len(marker.format(size)) - 16
    head, tail = room // 4, room - room // 4
    with open(path, "rb") as f:
        first = f.read(head)
        f.seek(size - tail)
        last = f.read(tail)
    with open(path, "wb") as f:
        f.write(first + marker.format(size - head - tail).encode() + last)
    return True


def cap_junit(path: str, limit: int = MAX_FILE_BYTES, text_limit: int = 4000) -> bool:
    """Keeps a junit report under ``limit`` as valid XML: failure texts and captured output are cut to
    ``text_limit`` characters each (and dropped if that is not enough). True if it was changed."""
    try:
        if os.path.getsize(path) <= limit:
            return False
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return cap_file(path, limit)
    for keep in (text_limit, 0):
        for element in tree.iter():
            if element.tag in ("failure", "error", "skipped", "system-out", "system-err") and element.text:
                if len(element.text) > keep:
                    element.text = element.text[:keep] + ("\n[... cut by benchmarks.gpu_check ...]" if keep else "")
            if element.tag in ("failure", "error") and len(element.get("message", "")) > max(keep, 200):
                element.set("message", element.get("message")[:max(keep, 200)])
        tree.write(path, encoding="utf-8", xml_declaration=True)
        if os.path.getsize(path) <= limit:
            return True
    return cap_file(path, limit) or True


def run_step(step: Step, cwd: str = ROOT, env: dict | None = None, grace_s: float = 15.0) -> Step:
    """Runs ``step.command`` with stdout and stderr into ``step.log``, in its own process group; past
    ``step.timeout_s`` the group gets ``step.stop_signal``, then SIGKILL ``grace_s`` later."""
    if step.timeout_s <= 0:
        step.status = "skipped: no time left in the budget"
        return step
    start = time.monotonic()
    with open(step.log, "w") as log:
        log.write(f"$ {' '.join(step.command)}\n(timeout {step.timeout_s:.0f} s)\n\n")
        log.flush()
        try:
            proc = subprocess.Popen(step.command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_sigint)
        except OSError as exc:
            step.status = f"failed to start: {exc}"
            return step
        try:
            step.returncode = proc.wait(timeout=step.timeout_s)
            step.status = "ok" if step.returncode == 0 else f"failed (exit {step.returncode})"
        except subprocess.TimeoutExpired:
            _kill_group(proc, step.stop_signal, grace_s)
            step.returncode = proc.returncode
            step.status = f"timed out after {step.timeout_s:.0f} s"
            log.write(f"\n[benchmarks.gpu_check: {step.status}; the process group was terminated]\n")
    step.seconds = time.monotonic() - start
    if cap_file(step.log):
        step.notes.append(f"{os.path.basename(step.log)} cut to {MAX_FILE_BYTES // 2 ** 20} MiB")
    return step


def _default_sigint() -> None:
    # A check started in the background inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # the child gets the default back, so pytest can stop cleanly on the SIGINT of the time limit.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_group(proc: subprocess.Popen, first_signal: int, grace_s: float) -> None:
    """``first_signal`` to the child's process group, SIGKILL to the group once the child is gone or ``grace_s``
    passed (so no grandchild, e.g. a test's subprocess, outlives the step)."""
    try:
        os.killpg(proc.pid, first_signal)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _command_output(command: list, timeout: float = 30.0) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ the machine

def cuda_problem() -> str:
    """Why there is no usable CUDA device here ("" when there is one)."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                f"(torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES={visible!r})")
    return ""


def machine_info() -> dict:
    """The GPUs, driver, software versions, segvit's build and the git commit."""
    import torch

    info = {"recorded_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "hostname": platform.node(),
            "platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "total_memory_gib": round(p.total_memory / 2 ** 30, 2),
                     "multi_processor_count": p.multi_processor_count})
    info["gpus"] = gpus
    query = _command_output(["nvidia-smi", "--query-gpu=driver_version,name,memory.total,clocks.max.sm,power.limit",
                             "--format=csv,noheader"])
    info["driver"] = query.splitlines()[0].split(",")[0].strip() if query else None
    info["nvidia_smi"] = query.strip().splitlines() if query else None
    full = _command_output(["nvidia-smi", "-q"])
    info["nvidia_smi_q"] = full[:200_000] if full else "nvidia-smi not found or failed"
    info["git_commit"] = (_command_output(["git", "rev-parse", "HEAD"]) or "").strip() or None
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    info["git_dirty"] = bool(dirty.strip()) if dirty is not None else None
    try:
        import segvit
        from segvit import _extension

        info["segvit"] = getattr(segvit, "__version__", None)
        info["segvit_build_info"] = _extension.build_info()
        info["segvit_backends"] = segvit.ops.available_backends()
    except Exception as exc:  # a broken build is a finding, not a reason to stop
        info["segvit_error"] = f"{type(exc).__name__}: {exc}"
    return info


# ------------------------------------------------------------------------------------------------- the results

def junit_counts(path: str) -> dict | None:
    """{tests, passed, failed, errors, skipped, seconds, failures: [(test id, first line of the message)]} from a
    junit xml report, or None if it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failures": []}
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        counts["seconds"] += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                counts["failures"].append((test_id, bad.tag, message[0][:300] if message else ""))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def pytest_log_tail(path: str, lines: int = 3) -> list:
    """The last non-empty lines of a pytest log (its "N passed, M failed in S s" line)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-20000:]
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def bench_tables(bench_dirs: list) -> list:
    """Markdown (compact table per run directory) of each benchmark run's results.json, or why it is missing."""
    from benchmarks import summarize

    parts = []
    for title, directory in bench_dirs:
        path = os.path.join(directory, "results.json")
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError) as exc:
            parts.append(f"### {title}\n\nno results ({path}: {type(exc).__name__}: {exc})\n")
            continue
        parts.append(f"### {title}\n\n" + summarize.compact_markdown(results, os.path.relpath(directory)))
    return parts


def write_summary(path: str, machine: dict, steps: list, tests: dict | None, bench_dirs: list,
                  total_s: float, exit_code: int, calibration: str | None = None) -> str:
    """Writes DIR/summary.md; returns its text. ``calibration``: the directory of ``benchmarks.calibrate``'s
    output, whose table is appended (None: not run)."""
    gpus = "; ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['total_memory_gib']} GiB)"
                     for g in machine.get("gpus", [])) or "no GPU recorded"
    verdict = {EXIT_OK: "PASS", EXIT_TESTS: "FAIL (tests)", EXIT_BENCH: "PASS (tests); benchmarks incomplete",
               EXIT_NO_GPU: "no CUDA device"}.get(exit_code, f"exit {exit_code}")
    commit = (machine.get("git_commit") or "unknown")[:12]
    commit += " (uncommitted changes)" if machine.get("git_dirty") else ""
    lines = [f"# segvit GPU check: {verdict}", "",
             f"- GPUs: {gpus}",
             f"- driver {machine.get('driver')}, torch {machine.get('torch')}, CUDA {machine.get('cuda')}, "
             f"cuDNN {machine.get('cudnn')}, triton {machine.get('triton')}, Python {machine.get('python')}",
             f"- segvit {machine.get('segvit')} at commit {commit}; backends: "
             + ", ".join(f"{k} {v}" for k, v in (machine.get("segvit_backends") or {}).items()),
             f"- recorded {machine.get('recorded_utc')} UTC on {machine.get('hostname')}; total {total_s:.0f} s",
             "", "## Steps", "", "| step | status | seconds | log |", "|---|---|---|---|"]
    for step in steps:
        notes = f" ({'; '.join(step.notes)})" if step.notes else ""
        lines.append(f"| {step.name} | {step.status}{notes} | {step.seconds:.0f} | `{os.path.basename(step.log)}` |")
    lines += ["", "## Tests (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("No junit report (pytest did not finish).")
    else:
        lines.append(f"{tests['tests']} tests: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['seconds']:.0f} s.")
        if tests["failures"]:
            lines += ["", "| test | kind | message |", "|---|---|---|"]
            for test_id, kind, message in tests["failures"][:100]:
                lines.append(f"| `{test_id}` | {kind} | {message.replace('|', '/')} |")
            if len(tests["failures"]) > 100:
                lines.append(f"| ... {len(tests['failures']) - 100} more: see junit.xml | | |")
    pytest_step = next((s for s in steps if s.name == "pytest"), None)
    if pytest_step is not None:
        tail = pytest_log_tail(pytest_step.log)
        if tail:
            lines += ["", "Last lines of pytest.log:", "", "```", *tail, "```"]
    lines += ["", "## Benchmarks (`python -m benchmarks --device cuda --quick`)", ""]
    lines += bench_tables(bench_dirs) or ["not run"]
    if calibration is not None:
        lines += ["", "## Cost model against measurement (`python -m benchmarks.calibrate`)", ""]
        table = os.path.join(calibration, "calibration.md")
        if os.path.exists(table):
            with open(table) as f:
                lines += f.read().splitlines()
        else:
            lines.append("no results (see calibrate.log)")
    text = "\n".join(lines).rstrip() + "\n"
    with open(path, "w") as f:
        f.write(text)
    cap_file(path)
    return text


def exit_status(pytest_step: Step | None, tests: dict | None, bench_steps: list) -> int:
    if pytest_step is not None and pytest_step.status != "not run":
        if tests is None or tests["failed"] or tests["errors"] or not pytest_step.ok:
            return EXIT_TESTS
    if any(not s.ok for s in bench_steps):
        return EXIT_BENCH
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description="Run the GPU tests and the quick CUDA benchmarks on this machine "
                                                 "and write their logs, results and a summary to DIR.")
    parser.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    parser.add_argument("--pytest-timeout", type=float, default=PYTEST_TIMEOUT_S,
                        help=f"seconds for the pytest run (default {PYTEST_TIMEOUT_S})")
    parser.add_argument("--bench-timeout", type=float, default=BENCH_TIMEOUT_S,
                        help=f"seconds for both benchmark runs together (default {BENCH_TIMEOUT_S})")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    parser.add_argument("--no-models", action="store_true", help="benchmark the ops only (no model cases)")
    parser.add_argument("--calibrate-timeout", type=float, default=CALIBRATE_TIMEOUT_S,
                        help=f"seconds for the cost-model calibration (default {CALIBRATE_TIMEOUT_S})")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the cost-model calibration")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. '-x -k atm')")
    args = parser.parse_args(argv)
    if args.pytest_timeout <= 0 or args.bench_timeout <= 0 or args.calibrate_timeout <= 0:
        parser.error("--pytest-timeout, --bench-timeout and --calibrate-timeout must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    problem = cuda_problem()
    if problem:
        print(f"benchmarks.gpu_check: no CUDA device: {problem}. This check runs the GPU tests and the CUDA "
              "benchmarks; run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return EXIT_NO_GPU
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"benchmarks.gpu_check: recording the machine in {out}/machine.json", flush=True)
    machine = machine_info()
    with open(os.path.join(out, "machine.json"), "w") as f:
        json.dump(machine, f, indent=1, default=str)
    cap_file(os.path.join(out, "machine.json"))

    env = dict(os.environ, TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the real GPU kernels, never the interpreter
    env.pop("SEGVIT_GPU_TESTS_ON_CPU", None)
    steps, bench_steps, bench_dirs = [], [], []
    pytest_step, tests = None, None
    if not args.no_tests:
        junit = os.path.join(out, "junit.xml")
        if os.path.exists(junit):
            os.remove(junit)
        pytest_step = Step("pytest", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", "-rfE",
                                      "--durations=25", f"--junitxml={junit}", "-p", "no:cacheprovider",
                                      *args.pytest_args.split()],
                           os.path.join(out, "pytest.log"), args.pytest_timeout, stop_signal=signal.SIGINT)
        print(f"benchmarks.gpu_check: pytest -m gpu (at most {args.pytest_timeout:.0f} s)...", flush=True)
        run_step(pytest_step, env=env)
        if cap_junit(junit):
            pytest_step.notes.append("junit.xml texts cut to stay under 16 MiB")
        tests = junit_counts(junit)
        steps.append(pytest_step)
        print(f"benchmarks.gpu_check: pytest {pytest_step.status} in {pytest_step.seconds:.0f} s", flush=True)
    if not args.no_bench:
        deadline = time.monotonic() + args.bench_timeout
        bench = os.path.join(out, "bench")
        runs = [("benchmarks: ops", OP_GROUPS, bench, "bench.log")]
        if not args.no_models:
            runs.append(("benchmarks: models", "models", os.path.join(bench, "models"), "bench-models.log"))
        for title, groups, directory, log in runs:
            left = deadline - time.monotonic()
            step = Step(title, [sys.executable, "-m", "benchmarks", "--device", "cuda", "--quick", "--ops", groups,
                                "--out", directory], os.path.join(out, log), left)
            if groups == "models" and left < MIN_MODELS_S:
                step.status = f"skipped: {left:.0f} s of the benchmark budget left"
            else:
                print(f"benchmarks.gpu_check: {title} (at most {left:.0f} s)...", flush=True)
                run_step(step, env=env)
                print(f"benchmarks.gpu_check: {title} {step.status} in {step.seconds:.0f} s", flush=True)
            for name in ("results.json", "results.csv", "table.txt"):
                cap_file(os.path.join(directory, name))
            steps.append(step)
            bench_steps.append(step)
            bench_dirs.append((title, directory))
    calibration = None
    if not args.no_calibrate:
        calibration = os.path.join(out, "calibration")
        step = Step("cost-model calibration", [sys.executable, "-m", "benchmarks.calibrate", "--out", calibration],
                    os.path.join(out, "calibrate.log"), args.calibrate_timeout)
        print(f"benchmarks.gpu_check: cost-model calibration (at most {args.calibrate_timeout:.0f} s)...", flush=True)
        run_step(step, env=env)
        print(f"benchmarks.gpu_check: calibration {step.status} in {step.seconds:.0f} s", flush=True)
        for name in ("calibration.json", "calibration.md"):
            cap_file(os.path.join(calibration, name))
        steps.append(step)
    code = exit_status(pytest_step, tests, bench_steps)
    write_summary(os.path.join(out, "summary.md"), machine, steps, tests, bench_dirs, time.monotonic() - started,
                  code, calibration=calibration)
    print(f"benchmarks.gpu_check: wrote {out}/summary.md (exit status {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
