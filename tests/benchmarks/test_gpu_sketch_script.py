"""benchmarks/gpu_sketch.sh (the GPU call after gpu-check) runs the sketch tests, then the quick
benchmark, into one folder, and exits with the tests' status even when the benchmark fails."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_sketch.sh"


def _fake_python(folder: Path, tests_status: int, bench_status: int) -> Path:
    """A python3 stand-in that records its arguments and exits as told for each step."""
    path = folder / "python3"
    path.write_text(f"""#!/bin/sh
echo "$*" >> "{folder}/calls"
case "$*" in
  "-m pytest"*) echo "tests ran"; exit {tests_status} ;;
  *bench_sketch.py*) echo "bench ran"; exit {bench_status} ;;
esac
exit 99
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("tests_status, bench_status", [(0, 0), (1, 0), (0, 3)])
def test_runs_tests_then_bench_into_out_and_exits_with_the_tests_status(tmp_path, tests_status, bench_status):
    python = _fake_python(tmp_path, tests_status, bench_status)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), OUT=str(out))
    proc = subprocess.run(["sh", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == tests_status, proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    assert calls[0].startswith("-m pytest") and f"--junitxml={out}/sketch_junit.xml" in calls[0]
    for test_file in ("tests/kernels/test_sketch_kernels.py", "tests/allocation/test_growth_sketch.py",
                      "tests/sensitivity/test_sketch_wiring.py"):
        assert test_file in calls[0]
        assert (ROOT / test_file).exists()
    assert calls[1] == f"benchmarks/bench_sketch.py --quick --out {out}"
    assert (out / "sketch_tests.log").read_text() == "tests ran\n"
    assert (out / "sketch_bench.log").read_text() == "bench ran\n"
    assert f"bench_sketch exit status {bench_status}" in proc.stdout


def test_an_argument_names_the_folder_over_out(tmp_path):
    python = _fake_python(tmp_path, 0, 0)
    env = dict(os.environ, PYTHON=str(python), OUT=str(tmp_path / "ignored"))
    subprocess.run(["sh", str(SCRIPT), str(tmp_path / "given")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "given" / "sketch_tests.log").exists() and not (tmp_path / "ignored").exists()
