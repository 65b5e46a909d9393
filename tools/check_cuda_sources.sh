#!/usr/bin/env bash
# Compile-check the CUDA sources under csrc/cuda without a GPU.
#
#   tools/check_cuda_sources.sh             every .cu with nvcc -c -arch=sm_90 (no torch needed)
#   tools/check_cuda_sources.sh --bindings  also the torch binding files (.cpp), syntax only, against
#                                           the installed torch headers (a CPU-only torch lacks one
#                                           generated CUDA header; an empty stand-in is used)
#
# Exits 0 with a message when nvcc is absent, non-zero when any source fails to compile.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
ARCH=${CUDA_ARCH:-sm_90}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda_sources: nvcc not found; skipping the CUDA compile check"
    exit 0
fi

status=0
for source in csrc/cuda/*.cu; do
    if "$NVCC" -c -std=c++17 -O3 -arch="$ARCH" -Icsrc/cuda "$source" -o /dev/null; then
        echo "ok    $source (nvcc, $ARCH)"
    else
        echo "FAIL  $source"
        status=1
    fi
done

if [[ "${1:-}" == "--bindings" ]]; then
    cuda_include="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
    for candidate in "$cuda_include" /usr/local/cuda/include /usr/local/cuda-*/include; do
        if [[ -f "$candidate/cuda_runtime_api.h" ]]; then cuda_include=$candidate; break; fi
    done
    stub=$(mktemp -d)
    trap 'rm -rf "$stub"' EXIT
    mkdir -p "$stub/c10/cuda/impl"
    touch "$stub/c10/cuda/impl/cuda_cmake_macros.h"
    read -r -a torch_includes <<<"$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")"
    python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    for source in csrc/cuda/*.cpp; do
        # the stand-in comes last: a CUDA build of torch ships the real header
        if "${CXX:-g++}" -std=c++20 -fsyntax-only "${torch_includes[@]}" -I"$python_include" -I"$cuda_include" \
            -I"$stub" -Icsrc/cuda -DTORCH_EXTENSION_NAME=megalm_cuda_kernels "$source"; then
            echo "ok    $source (syntax, torch headers)"
        else
            echo "FAIL  $source"
            status=1
        fi
    done
fi
exit $status
