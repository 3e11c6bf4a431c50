"""Training memory: the peak of one full training step (forward, loss, backward, AdamW step) per model, backend,
activation checkpointing, precision and batch size, each in a fresh process.

``python -m benchmarks.train_memory [--device cpu|cuda] [--models NAMES] [--batches 1,2] [--out DIR]``
(also ``python -m benchmarks --ops train_memory``).

What is measured, per case, in a fresh process (``python -m benchmarks.train_memory --child CASE``): the model is
built, its AdamW state created (one optimizer step on zero gradients, so the measured step is the steady state a
training run lives in), then one step runs: ``zero_grad(set_to_none=True)``, forward (under bf16 autocast for the
``bf16-autocast`` cases, float32 master weights), ``SegViTLoss.for_model(model)`` summed (reduced in float32),
backward, ``optimizer.step()``. The peak is the whole process's:

- CPU: the kernel's peak resident set (VmHWM) after the step minus the resident set right after ``import segvit``
  (interpreter and libraries), so parameters, gradients and optimizer state are in it, as the issue's table has them;
- CUDA: ``torch.cuda.max_memory_allocated()`` over the step (parameters included).

The step is timed too (one call: a ViT-L step takes tens of seconds on a CPU), so the cost of checkpointing is read
in the same run. From batch 1 and 2, ``per image = peak(2) - peak(1)`` and ``fixed = peak(1) - per image``; the
table says what that implies for a 24 GB and an 80 GB GPU (derived from the measurement, not measured there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODELS = ("segvit_vit-l16_ade20k_640", "segvit_vit-l16_shrunk_ade20k_640")
BATCHES = (1, 2)
BACKENDS = ("eager", "auto")
PRECISIONS = ("float32", "bf16-autocast")
GPU_BYTES = {"24 GB": 24e9, "80 GB": 80e9}
# Classes present per training image (as the op benchmarks' loss cases).
PRESENT_CLASSES = 10


@dataclass(frozen=True)
class TrainCase:
    model: str
    backend: str          # "eager" (the original's math) or "auto" (the fused kernels)
    checkpointing: bool   # model.set_grad_checkpointing(True)
    precision: str        # "float32" or "bf16-autocast"
    batch: int
    device: str = "cpu"

    @property
    def id(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "plain"
        return f"{self.model}/{self.backend}/{ckpt}/{self.precision}/B{self.batch}"


def cases(models=MODELS, batches=BATCHES, device="cpu", backends=BACKENDS, precisions=PRECISIONS,
          checkpointing=(False, True)) -> list[TrainCase]:
    return [TrainCase(m, backend, ckpt, precision, b, device) for m in models for precision in precisions
            for backend in backends for ckpt in checkpointing for b in batches]


# ------------------------------------------------------------------------------------------------ the child

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(case: TrainCase) -> dict:
    """One training step of ``case`` in this (fresh) process; returns the measurement."""
    import torch

    import segvit
    from segvit.optim import build_optimizer

    from benchmarks.cases import blob_labels

    torch.manual_seed(0)
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    base = 0 if cuda else _status_bytes("VmRSS:")
    cfg = segvit.published_config(case.model)
    model = segvit.build_model(case.model).to(device).train()
    if case.checkpointing:
        model.set_grad_checkpointing(True)
    criterion = segvit.SegViTLoss.for_model(model).to(device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    size = cfg["crop_size"][0] if isinstance(cfg["crop_size"], (list, tuple)) else cfg["crop_size"]
    images = torch.randn(case.batch, 3, size, size, device=device)
    labels = blob_labels(case.batch, size, model.num_classes, seed=1, present=PRESENT_CLASSES).to(device)
    for p in model.parameters():  # AdamW state now: the measured step is the steady state
        p.grad = torch.zeros_like(p)
    optimizer.step()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16-autocast")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
            f.write("5")
    start = time.perf_counter()
    with segvit.ops.use_backend(case.backend):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(images)
        losses = criterion(out, labels)  # outside autocast: the loss reduces in float32
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_bytes("VmHWM:") - base
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_bytes": peak, "step_s": step_s, "param_bytes": params, "loss": loss.item()}


def measure(case: TrainCase, timeout_s: float = 1800) -> dict:
    """Runs ``case`` in a fresh process; a failure is a row with its error."""
    cmd = [sys.executable, "-m", "benchmarks.train_memory", "--child", json.dumps(asdict(case))]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # glibc's malloc raises its mmap threshold after the first large frees and then keeps freed blocks in its heap:
    # the resident set (what the CPU case measures) would record the allocator's high-water mark rather than the
    # tensors (measured: +3.8 GB after a checkpointed ViT-L forward at batch 2 that saves 0.46 GB). A fixed
    # threshold returns every block of 128 KiB or more to the system when it is freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the table

def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, backend, checkpointing, precision): fixed and per-image bytes from batches 1 and 2, the step time
    against the same configuration without checkpointing, and the images that fit a 24 / 80 GB GPU."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["model"], r["backend"], r["checkpointing"], r["precision"]), {})[r["batch"]] = r
    out = []
    for (model, backend, ckpt, precision), batches in by_key.items():
        one, two = batches.get(1, {}), batches.get(2, {})
        entry = dict(model=model, backend=backend, checkpointing=ckpt, precision=precision)
        if "peak_bytes" in one and "peak_bytes" in two:
            per_image = two["peak_bytes"] - one["peak_bytes"]
            fixed = one["peak_bytes"] - per_image
            entry.update(fixed_bytes=fixed, per_image_bytes=per_image)
            for name, size in GPU_BYTES.items():
                entry[f"images_{name}"] = int((size - fixed) // per_image) if per_image > 0 else None
        plain = by_key.get((model, backend, False, precision), {}).get(1, {})
        if ckpt and "step_s" in one and "step_s" in plain:
            entry["time_vs_plain"] = one["step_s"] / plain["step_s"]
        out.append(entry)
    return out


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.2f}"


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = ["| model | backend | checkpointing | precision | batch | peak GB | step s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = r.get("error") or f"{_gb(r.get('peak_bytes'))} | {r['step_s']:.1f}"
        if "error" in r:
            cell = f"error | {cell}"
        lines.append(f"| {r['model'].replace('segvit_', '')} | {r['backend']} | {'yes' if r['checkpointing'] else 'no'}"
                     f" | {r['precision']} | {r['batch']} | {cell} |")
    lines += ["", "| model | backend | checkpointing | precision | fixed GB | per image GB | images on 24 GB | "
              "images on 80 GB | step time vs no checkpointing |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio = f"{s['time_vs_plain']:.2f}x" if "time_vs_plain" in s else "-"
        lines.append(f"| {s['model'].replace('segvit_', '')} | {s['backend']} | {'yes' if s['checkpointing'] else 'no'}"
                     f" | {s['precision']} | {_gb(s.get('fixed_bytes'))} | {_gb(s.get('per_image_bytes'))} | "
                     f"{s.get('images_24 GB', '-')} | {s.get('images_80 GB', '-')} | {ratio} |")
    return "\n".join(lines) + "\n"


def run(device="cpu", models=MODELS, batches=BATCHES, out_dir=None, progress=True, **select) -> tuple[list, list]:
    todo = cases(models, batches, device, **select)
    rows = []
    bar = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="training memory", disable=not progress)
    except ImportError:
        pass
    for case in todo:
        if bar is not None:
            bar.set_postfix_str(case.id.replace("segvit_", ""))
        rows.append(dict(asdict(case), **measure(case)))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    summary = summarize(rows)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "train_memory.json"), "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
        with open(os.path.join(out_dir, "train_memory.md"), "w") as f:
            f.write(markdown(rows, summary))
    return rows, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated published names")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--checkpointing", default="no,yes", help="no, yes or both (no,yes)")
    parser.add_argument("--out", default=None, help="directory for train_memory.json and train_memory.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(TrainCase(**json.loads(args.child)))))
        return
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    batches = tuple(int(b) for b in args.batches.split(","))
    if sorted(batches)[:2] != [1, 2]:
        parser.error("--batches: 1 and 2 are needed to split the fixed and the per-image part")
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    select = dict(backends=split(args.backends), precisions=split(args.precisions),
                  checkpointing=tuple({"no": False, "yes": True}[x] for x in split(args.checkpointing)))
    rows, summary = run(args.device, models, batches, args.out, **select)
    print(markdown(rows, summary))


if __name__ == "__main__":
    main()
