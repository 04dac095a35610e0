"""Benchmark rows and the GPU check say how many CPUs the process could use: its affinity mask
(taskset, a container's cpuset), not ``os.cpu_count()``, which counts every logical CPU of the
machine. They called that count "cores"."""

import os

import pytest

from bench_scripts import load_bench


@pytest.fixture
def two_of_eight(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)


def test_rows_name_the_usable_cpus_of_a_restricted_process(two_of_eight):
    machine = load_bench("machine")
    assert machine.usable_cpus() == 2
    assert machine.cpu_description() == f"cpu ({machine.cpu_name()}, 2 of 8 logical CPUs usable)"


def test_an_unrestricted_process_has_every_logical_cpu(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert load_bench("machine").cpu_description().endswith(", 4 logical CPUs)")


def test_the_gpu_check_header_and_build_jobs_use_the_usable_cpus(two_of_eight, monkeypatch, tmp_path):
    gpu_check = load_bench("gpu_check")
    _, header = gpu_check.environment(smoke=True)
    device = next(line for line in header if line.startswith("device: "))
    assert "; 2 of 8 logical CPUs usable" in device and "cores" not in device
    seen = {}

    def fake_run(name, cmd, env, limit, logs):
        seen["jobs"] = env["MAX_JOBS"]
        return gpu_check.Stage(name, "OK", 0.0)

    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: type("P", (), {"stdout": "with cuda",
                                                                                     "stderr": ""})())
    gpu_check.build_stage({}, gpu_check.Clock(400), tmp_path)
    assert seen["jobs"] == "2"


def test_experiment_reports_say_usable_of_logical_cpus(two_of_eight):
    from lorambo.experiments import cpus, demo_report

    assert cpus.usable_cpus() == 2
    env = {"cpu_count": 8, "usable_cpus": 2, "processor": "x86_64", "platform": "Linux", "torch": "2", "threads": 1,
           "device": "cpu"}
    assert ", 2 of 8 logical CPUs usable (x86_64)," in demo_report.machine_line(env, 0.5, 0.5)
    older = dict(env, usable_cpus=None)  # recorded before usable_cpus existed
    assert ", 8 logical CPUs (x86_64)," in demo_report.machine_line(older, 0.5, 0.5)


def test_one_definition_shared_without_importing_lorambo(tmp_path):
    """benchmarks/machine.py had its own copy of usable_cpus beside lorambo/experiments/cpus.py's;
    it now loads that file by its path, which must therefore import only the standard library
    (gpu_check.py imports machine before its build, without the lorambo package or torch)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    from lorambo.experiments import cpus

    machine = load_bench("machine")
    assert Path(machine.usable_cpus.__code__.co_filename).resolve() == Path(cpus.__file__).resolve()
    tree = ast.parse(Path(cpus.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported
    bench = Path(machine.__file__).resolve().parent  # a fresh python with benchmarks/ alone on sys.path
    code = ("import sys; sys.path.insert(0, %r); import machine; machine.cpu_description(); "
            "print(sorted(m for m in ('lorambo', 'torch') if m in sys.modules))" % str(bench))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
