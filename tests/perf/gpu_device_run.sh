#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md ("The GPU path"), as run on a lent GPU machine through the device tool.
#
# That machine has its own python3 (3.12, with numpy, scipy, pillow, aiohttp and prometheus-client, and a
# CPU-only onnxruntime) and cannot download anything, so what it lacks travels with the working tree:
#   .whl/     grpcio, grpcio-health-checking, grpcio-reflection, protobuf, tritonclient, python-rapidjson
#             wheels for cp312 (pip download --only-binary=:all: --python-version 3.12 ...);
#   .ortgpu/  onnxruntime-gpu 1.31.1 (CUDA 13, cuDNN 9: the machine's torch brings those libraries),
#             unpacked, tarred, xz-compressed and split into parts of under 64 MiB, because one call
#             carries at most 64 MiB: earlier calls only stash their part in /tmp/ortgpu-parts.
#
#   gpu_device_run.sh payload    HERE, on the development machine: download and pack .whl and .ortgpu
#                                (ignored by git through .git/info/exclude; about 225 MB, a few minutes)
#   gpu_device_run.sh stash      THERE: stash the carried parts (and install .whl when carried)
#   gpu_device_run.sh run        THERE: unpack onnxruntime-gpu if needed, then `digits bench --device cuda`
# Results go to $OUT (cuda.md, cuda.json, log).
#
# The calls, each fired within the machine's 30 s warm window of the one before: carry .ortgpu/part.aa, .ab
# and .ac with `stash`; then .ortgpu/part.ad and .whl with `run` (timeout 420 s). Rehearsed here with Python
# 3.12 and a CPU-only onnxruntime in a venv first on PATH: everything up to the CUDA libraries loads, and the
# report says they did not.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-run}" = payload ]; then
    mkdir -p .git/info && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.ortgpu/\n' >> .git/info/exclude
    get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"; }
    get .whl grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
        tritonclient==2.41.0 python-rapidjson==1.25 || exit 1
    work=$(mktemp -d) && get "$work" onnxruntime-gpu==1.31.1 || exit 1
    (cd "$work" && unzip -q onnxruntime_gpu-*.whl && rm -f onnxruntime_gpu-*.whl \
        onnxruntime/capi/libonnxruntime_providers_tensorrt.so && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info) \
        | xz -9 -T0 > "$work/ortgpu.tar.xz" || exit 1
    mkdir -p .ortgpu && rm -f .ortgpu/part.* && split -b 56000000 "$work/ortgpu.tar.xz" .ortgpu/part. && rm -rf "$work"
    ls -la .whl .ortgpu
    exit 0
fi
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/ortgpu-parts /tmp/site
if compgen -G ".ortgpu/part.*" > /dev/null; then cp .ortgpu/part.* /tmp/ortgpu-parts/; fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
ls -la /tmp/ortgpu-parts
[ "${1:-run}" = stash ] && exit 0

{
    nvidia-smi
    python3 --version
    python3 -c 'import onnxruntime as o; print("preinstalled onnxruntime", o.__version__, o.get_available_providers())'
} 2>&1 | tee "$OUT/machine.txt"

if ! python3 -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    mkdir -p /tmp/ortgpu
    cat /tmp/ortgpu-parts/part.* | xz -dc | tar -x -C /tmp/ortgpu || exit 3
    export PYTHONPATH=/tmp/ortgpu
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$PWD"
# The CUDA 13 and cuDNN 9 libraries of the machine's own Python packages (its torch's).
libs=$(python3 - <<'EOF'
import pathlib, site
names = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
         "libcudnn.so.9", "libnvrtc.so.13")
roots = [pathlib.Path(p) for p in site.getsitepackages()]
found = {f.parent for r in roots if r.is_dir() for n in names for f in r.glob(f"nvidia/**/{n}")}
print(":".join(sorted(map(str, found))))
EOF
)
# The CUDA toolkit's own folder as a fallback (the image has nvcc).
export LD_LIBRARY_PATH="$libs${libs:+:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$OUT/machine.txt"
python3 -c 'import onnxruntime as o; print("serving onnxruntime", o.__version__, o.__file__, o.get_available_providers())' \
    2>&1 | tee -a "$OUT/machine.txt"
PYTHONUNBUFFERED=1 python3 -m service.cli bench --device cuda --out "$OUT/cuda.md" 2>&1 | tee "$OUT/log"
