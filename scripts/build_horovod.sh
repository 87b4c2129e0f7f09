#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against torch 2.x and cache the wheel.
#
# The published sdist asks CMake for C++14, but torch 2.x headers need C++17, so we
# patch both CMakeLists.txt files to C++17 and build with Gloo only (no MPI, no TF/MXNet).
# The wheel is cached under ${PATTERNLAKE_CACHE:-~/.cache/patternlake}/wheels and reused.
#
# usage: scripts/build_horovod.sh PYTHON     (prints the wheel's path on stdout)
set -euo pipefail
PY=$(command -v "${1:?usage: build_horovod.sh PYTHON}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
VERSION=0.28.1
CACHE=${PATTERNLAKE_CACHE:-$HOME/.cache/patternlake}
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
# PyPI's torch for Linux x86_64 is a CUDA build (it runs on the CPU as well); the CPU wheel is
# another file. Horovod's torch CMake adds CUDA whenever torch has it, which needs a CUDA
# toolkit (nvcc): without one we build Horovod for the CPU (Gloo) and cut that branch out.
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "cpu")')
GPU_BUILD=0
if [ "$TORCH_CUDA" != cpu ] && command -v nvcc >/dev/null 2>&1; then GPU_BUILD=1; fi
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELDIR="$CACHE/wheels/horovod-$VERSION-torch$TORCH-$TORCH_CUDA-gpu$GPU_BUILD-$PYTAG"
mkdir -p "$WHEELDIR"
existing=$(ls "$WHEELDIR"/horovod-*.whl 2>/dev/null | head -1 || true)
if [ -n "$existing" ]; then
  echo "$existing"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building horovod $VERSION against torch $TORCH (a few minutes on 2 cores)" >&2
"$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work" >&2
tar xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
src="$work/horovod-$VERSION"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
  "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
if [ "$GPU_BUILD" = 0 ]; then
  # CPU build: no add_cuda() (find_package(CUDAToolkit REQUIRED)) for a CUDA-built torch
  sed -i 's/^\( *\)add_cuda()$/\1# add_cuda(): CPU-only Horovod build/' "$src/horovod/torch/CMakeLists.txt"
  if grep -q '^ *add_cuda()' "$src/horovod/torch/CMakeLists.txt"; then
    echo "build_horovod.sh: could not patch add_cuda() out of horovod/torch/CMakeLists.txt" >&2; exit 1
  fi
fi
(
  cd "$src"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
         HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO \
         MAKEFLAGS="-j$(nproc)"
  if [ "$GPU_BUILD" = 1 ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  "$PY" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" . >&2
)
cp "$work"/dist/horovod-*.whl "$WHEELDIR/"
ls "$WHEELDIR"/horovod-*.whl | head -1
