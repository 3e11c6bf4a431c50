#!/usr/bin/env bash
# CI step: the install a GPU user does, proven on this GPU-less machine, from this (clean) checkout:
#   1. a fresh venv holding the CUDA build of torch (torch 2.14.1 + its nvidia CUDA 13 libraries, which pip takes from
#      this machine's disk; triton is its pinned dependency),
#   2. an sdist of the checkout, 3. a wheel built FROM that sdist against that torch with nvcc (sm_80 and sm_90 SASS,
#      compute_90 PTX; SEGVIT_WERROR=1: every C++/CUDA warning fails it), CUDA_HOME unset so that setup.py has to find
#      the toolkit from nvcc itself (here a wrapper script, /usr/local/bin/nvcc, which torch's own guess gets wrong),
#   4. that wheel installed into the venv, 5. imported from outside the checkout: the extension loads and its CUDA
#      kernels are registered for the CUDA dispatch key; the fat binary holds the SASS and PTX asked for; the console
#      scripts run.
# Everything lives in one temp dir, removed at the end. Prints the time of each step.
# SEGVIT_CI_VENV=DIR reuses a venv that already holds the CUDA torch (development only: skips step 1).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python}
TORCH_SPEC=${SEGVIT_CI_TORCH:-torch==2.14.1}
work=$(mktemp -d "${TMPDIR:-/tmp}/segvit-cuda-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
last=$t0
step() {
  local now
  now=$(date +%s)
  echo "cuda_wheel: $1: $((now - last)) s (total $((now - t0)) s)"
  last=$now
}
show_log() { echo "--- last lines of $1"; tail -n "${2:-80}" "$1"; }

# 1. venv with the CUDA torch. Only what is on this disk or PyPI; nothing here may pull another torch.
if [ -n "${SEGVIT_CI_VENV:-}" ]; then
  venv=$SEGVIT_CI_VENV
else
  venv=$work/venv
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" "setuptools>=64" wheel ninja build \
    numpy >"$work/venv.log" 2>&1 || { show_log "$work/venv.log"; exit 1; }
fi
py=$venv/bin/python
"$py" -c "import torch, triton; assert torch.version.cuda, 'not a CUDA build of torch: ' + torch.__version__; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
step "venv with $TORCH_SPEC"

# 2. sdist. CUDA_HOME/CUDA_PATH unset: the build finds the toolkit itself, as for a user who set nothing.
unset CUDA_HOME CUDA_PATH
"$py" -m build --sdist --no-isolation --outdir "$work/dist" . >"$work/sdist.log" 2>&1 || { show_log "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/segvit-*.tar.gz)
echo "sdist: $(basename "$sdist"), $(tar -tzf "$sdist" | wc -l) files"
step sdist

# 3. wheel from the sdist (pip unpacks it in a temp dir: nothing of the checkout is visible to the build).
SEGVIT_WERROR=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel -v --disable-pip-version-check --no-build-isolation \
  --no-deps -w "$work/wheel" "$sdist" >"$work/wheel.log" 2>&1 || { show_log "$work/wheel.log" 150; exit 1; }
grep -m1 "segvit: CUDA toolkit" "$work/wheel.log"
grep -m1 -o -- "-gencode=arch=compute_80[^ ]*.*-gencode=arch=compute_90[^ ]*" "$work/wheel.log" | sed 's/^/nvcc: /' || true
wheel=$(ls "$work"/wheel/segvit-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KB"
step "wheel (CUDA build)"

# 4. install the wheel with its dependencies (torch>=2.4 is met by the venv's torch: nothing is replaced).
"$py" -m pip install -q --disable-pip-version-check "$wheel" >"$work/install.log" 2>&1 || { show_log "$work/install.log"; exit 1; }
"$py" -m pip check
"$py" -c "import torch; assert torch.__version__.startswith('${TORCH_SPEC#torch==}'), torch.__version__"
step "install wheel"

# 5. import it from outside the checkout.
cd "$work"
"$py" - "$REPO" <<'EOF'
import os
import struct
import sys
import warnings

warnings.simplefilter("error")  # e.g. the extension's torch-version warning
import torch  # noqa: E402

import segvit  # noqa: E402
from segvit import _extension  # noqa: E402

repo = os.path.realpath(sys.argv[1])
where = os.path.realpath(segvit.__file__)
assert not where.startswith(repo + os.sep), f"segvit imported from the checkout: {where}"
info = _extension.build_info()
assert info["available"], info
kernels = _extension.registered_kernels()
need = {"segvit::mask_classify", "segvit::mask_loss_stats", "segvit::mask_loss_stats_backward"}
assert need <= set(kernels.get("cuda", [])), kernels
assert _extension.has_cuda_kernels() and info["cuda"], info
assert info["torch_version_matches"], info
print(f"segvit {segvit.__version__} from {os.path.dirname(where)}")
print(f"  torch {torch.__version__}, CUDA devices {torch.cuda.device_count()}; build: {info}")


def fatbin_entries(path):
    """(kind, arch) of every entry of the CUDA fat binaries in an ELF's .nv_fatbin section (kind 1 = PTX, 2 = SASS)."""
    with open(path, "rb") as f:
        data = f.read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    entries = []
    for name, _, _, _, offset, size in sections:
        if data[names_at + name:data.index(b"\0", names_at + name)] != b".nv_fatbin":
            continue
        pos, end = offset, offset + size
        while pos + 16 <= end:
            magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
            if magic != 0xBA55ED50:  # fat binaries are 8-byte aligned, padding between them
                pos += 8
                continue
            entry, stop = pos + header, pos + header + fat
            while entry < stop:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                arch, = struct.unpack_from("<I", data, entry + 28)
                entries.append((kind, arch))
                entry += entry_header + payload
            pos = stop
    return entries


so = _extension.load().__file__
entries = fatbin_entries(so)
kinds = {(kind, arch) for kind, arch in entries}
assert kinds == {(2, 80), (2, 90), (1, 90)}, f"fat binary of {so}: {sorted(kinds)}"
print(f"  {os.path.basename(so)}: {len(entries)} fat-binary entries: SASS sm_80, sm_90; PTX compute_90")
EOF
"$venv/bin/segvit-info" | sed -n '1,12p'
for script in segvit-train segvit-eval segvit-predict segvit-export segvit-data; do
  "$venv/bin/$script" --help >/dev/null
done
echo "console scripts: segvit-info, segvit-train, segvit-eval, segvit-predict, segvit-export, segvit-data run"
step "import and checks"
echo "cuda_wheel: done in $(( $(date +%s) - t0 )) s"
