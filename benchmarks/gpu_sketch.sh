#!/bin/sh
# The sketch kernels on the lent GPU, the call after gpu-check (docs/gpu_check.md): their tests on
# CUDA, then bench_sketch --quick. Output folder: $1, else $OUT, else build/gpu-sketch.
# The machine's own python3 (PYTHON overrides it); no .venv, no pip. Exit status: the tests'.
out="${1:-${OUT:-build/gpu-sketch}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH=".:kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$out/sketch_junit.xml" \
    tests/kernels/test_sketch_kernels.py tests/allocation/test_growth_sketch.py \
    tests/sensitivity/test_sketch_wiring.py > "$out/sketch_tests.log" 2>&1
tests=$?
tail -n 15 "$out/sketch_tests.log"
"$python" benchmarks/bench_sketch.py --quick --out "$out" > "$out/sketch_bench.log" 2>&1
echo "bench_sketch exit status $?; its output: $out/sketch_bench.log"
tail -n 20 "$out/sketch_bench.log"
exit $tests
