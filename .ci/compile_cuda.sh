#!/usr/bin/env bash
# Compile every csrc/**/*.cu to an object for sm_90 with nvcc against torch's headers.
# CI has no GPU: this catches CUDA compile errors; the CUDA ops themselves run in the GPU tests.
# Usage: .ci/compile_cuda.sh [python]   (default: .venv/bin/python, else python3)
# Env: NVCC (default: nvcc on PATH), MAX_JOBS (parallel nvcc processes, default 2),
#      LORAMBO_CUDA_OBJ_DIR (where objects go; default a temporary directory, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null || { echo "compile_cuda: $NVCC not found" >&2; exit 1; }

# Include paths and the defines torch.utils.cpp_extension would use for a CUDAExtension.
FLAGS_TXT="$(mktemp)"
"$PY" - >"$FLAGS_TXT" <<'PYEOF'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
# include_paths("cpu"): a CPU wheel has no CUDA_HOME of its own; nvcc adds the toolkit's headers.
for path in ce.include_paths("cpu") + [sysconfig.get_paths()["include"], "csrc/include"]:
    print(f"-I{path}")
for flag in ce.COMMON_NVCC_FLAGS:
    print(flag)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
if torch.version.cuda is None:
    # The CPU wheel ships c10/cuda headers without the generated c10/cuda/impl/cuda_cmake_macros.h
    # (it only sets Windows DLL-export macros); this define skips that include.
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
PYEOF
mapfile -t FLAGS <"$FLAGS_TXT"
rm -f "$FLAGS_TXT"

OUT="${LORAMBO_CUDA_OBJ_DIR:-}"
if [[ -z "$OUT" ]]; then OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT; fi
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then echo "compile_cuda: no .cu files under csrc/"; exit 0; fi

echo "compile_cuda: $("$NVCC" --version | tail -n 1); ${#SOURCES[@]} file(s) for sm_90"
printf '%s\n' "${SOURCES[@]}" | xargs -P "${MAX_JOBS:-2}" -I{} sh -c '
  src="$1"; shift; out="$1"; shift
  obj="$out/$(echo "$src" | tr / _).o"
  "$@" -c "$src" -o "$obj" && echo "  ok  $src"
' _ {} "$OUT" "$NVCC" -std=c++20 -O3 -gencode=arch=compute_90,code=sm_90 -Xcompiler -fPIC \
    -DLORAMBO_WITH_CUDA=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "${FLAGS[@]}"
echo "compile_cuda: all CUDA sources compiled"
