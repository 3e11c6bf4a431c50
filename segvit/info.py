"""``python -m segvit.info``: versions, what was built, and which backend runs each op here."""
from __future__ import annotations

import platform

import torch

import segvit
from segvit import _extension
from segvit.ops import _dispatch


def report() -> str:
    lines = [f"segvit {segvit.__version__}   torch {torch.__version__}   python {platform.python_version()}",
             f"machine: {platform.machine()}, {torch.get_num_threads()} threads, CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, CUDA devices: {torch.cuda.device_count()}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    info = _extension.build_info()
    if info.pop("available"):
        kernels = info.pop("kernels")
        lines.append("extension segvit._C: built")
        lines += [f"  {key}: {value}" for key, value in info.items()]
        lines += [f"  {device} kernels: {', '.join(names) or 'none'}" for device, names in kernels.items()]
        if not kernels:
            lines.append("  kernels: not listed (this torch has no dispatcher listing)")
    else:
        lines.append(f"extension segvit._C: {info['reason']}")
    lines.append(f"selected backend: {_dispatch.get_backend()}")
    lines.append("backends:")
    lines += [f"  {name:7s} {why}" for name, why in _dispatch.available_backends().items()]
    lines.append("kernels per op:")
    for name, op in sorted(_dispatch.OPS.items()):
        lines.append(f"  {name:22s} {', '.join(b for b in _dispatch.BACKENDS if b in op.kernels)}")
        lines += [f"  {'':22s} auto and {backend}: {kernel.auto_note}" for backend, kernel in op.kernels.items()
                  if kernel.auto != "yes"]
    return "\n".join(lines)


def main() -> None:
    """``python -m segvit.info`` and the console script ``segvit-info``."""
    print(report())


if __name__ == "__main__":
    main()
