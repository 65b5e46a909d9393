#!/usr/bin/env bash
# Compile-check the CUDA sources under csrc/cuda without a GPU, for every architecture we ship.
#
#   tools/check_cuda_sources.sh             every .cu with nvcc -c for sm_80 and sm_90 (no torch needed);
#                                           where a CUDA build of torch is installed, also the torch
#                                           binding files (.cpp), compiled against its headers
#   tools/check_cuda_sources.sh --bindings  the binding files with a CPU-only torch too, syntax only (it
#                                           lacks one generated CUDA header; an empty stand-in is used)
#
# CUDA_ARCHS="sm_80 sm_90" chooses the architectures. Exits 0 with a message when nvcc is absent,
# non-zero when any source fails to compile.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
read -r -a ARCHS <<<"${CUDA_ARCHS:-sm_80 sm_90}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "check_cuda_sources: nvcc not found; skipping the CUDA compile check"
    exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for arch in "${ARCHS[@]}"; do
    for source in csrc/cuda/*.cu; do
        if "$NVCC" -c -std=c++17 -O3 -arch="$arch" -Icsrc/cuda "$source" -o "$out/kernel.o"; then
            echo "ok    $source (nvcc, $arch)"
        else
            echo "FAIL  $source (nvcc, $arch)"
            status=1
        fi
    done
done

torch_cuda=$(python -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || true)
if [[ -n "$torch_cuda" || "${1:-}" == "--bindings" ]]; then
    cuda_include="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include"
    for candidate in "$cuda_include" /usr/local/cuda/include /usr/local/cuda-*/include; do
        if [[ -f "$candidate/cuda_runtime_api.h" ]]; then cuda_include=$candidate; break; fi
    done
    mkdir -p "$out/stub/c10/cuda/impl"
    touch "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    read -r -a torch_includes <<<"$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")"
    python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
    if [[ -n "$torch_cuda" ]]; then
        mode=(-c -o "$out/bindings.o")     # the real header is there: compile as the extension build does
        what="compiled, torch $torch_cuda headers"
    else
        mode=(-fsyntax-only -I"$out/stub")  # the stand-in comes last
        what="syntax, CPU torch headers"
    fi
    for source in csrc/cuda/*.cpp; do
        if "${CXX:-g++}" -std=c++20 -fPIC -D_GLIBCXX_USE_CXX11_ABI="$abi" "${torch_includes[@]}" \
            -I"$python_include" -I"$cuda_include" -Icsrc/cuda -DTORCH_EXTENSION_NAME=megalm_cuda_kernels \
            "${mode[@]}" "$source"; then
            echo "ok    $source ($what)"
        else
            echo "FAIL  $source"
            status=1
        fi
    done
fi
exit $status
