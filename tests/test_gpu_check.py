"""benchmarks/gpu_check.py: its CPU smoke run end to end, its verdicts, its stage time limits.

The smoke run is the GPU check with the CUDA build left out, on CPU under the Triton interpreter
at tiny sizes: every stage, every CSV column the verdict reads, the verdict table and the output
folder, so the check cannot fail for a trivial reason the day it runs on a GPU.
"""

import csv
import importlib.util
import math
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench_scripts import BENCH, load_bench

ROOT = Path(__file__).resolve().parents[1]

gpu_check = load_bench("gpu_check")
gpu_targets = gpu_check.gpu_targets
bench = load_bench("bench_lora_linear")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is for CPU machines")
def test_cpu_smoke_runs_every_stage_and_ends_with_the_verdict_table(tmp_path):
    # Runs without matplotlib too, as the GPU image lacks it: there only the PNG is left out.
    from lorambo.ext import ops as ext_ops

    plots = importlib.util.find_spec("matplotlib") is not None

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.rstrip().splitlines()

    # the last lines: one per target, in order, each judged PASS or MISS
    target_lines = lines[-len(gpu_targets.TARGETS):]
    for target, line in zip(gpu_targets.TARGETS, target_lines):
        assert line.startswith(target.name) and (" PASS " in line or " MISS " in line), line
    status = {line[:11].strip(): line[12:25].strip() for line in lines
              if line[:11].strip() in ("build", "gpu tests", "bench", "bench ext")}
    assert status == {"build": "SKIP", "gpu tests": "OK", "bench": "OK", "bench ext": "OK"}, lines

    # the output folder keeps to the device tool's limits
    files = sorted(p.name for p in out.rglob("*"))
    assert len(files) <= 8 and set(files) <= set(gpu_check.OUTPUTS), files
    expected = {"verdict.md", "gpu_check.log", "junit.xml", "lora_linear.csv", "lora_linear.md"}
    if plots:
        expected.add("lora_linear.png")
    if ext_ops.available():
        expected |= {"ext.csv", "ext.md"}
    assert expected <= set(files)
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    if plots:
        assert (out / "lora_linear.png").stat().st_size > 5000
    else:
        assert "lora_linear.png" not in files and "no matplotlib here: no PNG" in proc.stdout
    verdict = (out / "verdict.md").read_text()
    assert all(t.name in verdict for t in gpu_targets.TARGETS)
    log = (out / "gpu_check.log").read_text()
    assert "===== gpu_tests" in log and "===== bench" in log

    # the GPU tests were collected (none fails to import) and skipped without CUDA
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 10
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0

    # every labelled case was measured, by every provider it concerns
    rows = list(csv.DictReader((out / "lora_linear.csv").open()))
    for case in bench.SMOKE:
        providers = {r["provider"] for r in rows if r["case"] == case.label}
        assert providers == ({"lorambo"} if case.lorambo_only else {"base", "peft_style", "lorambo"}), case
    assert all(math.isfinite(float(r["ms_median"])) and float(r["ms_median"]) > 0 for r in rows)
    # saved for backward: the peft-style layer keeps exactly t = A x, [M, r] float32
    large = next(c for c in bench.SMOKE if c.label == "large")
    saved = {r["provider"]: int(r["saved_bytes"]) for r in rows if r["case"] == "large" and r["mode"] == "fwd_bwd"}
    assert saved["peft_style"] == large.m * large.rank * 4
    assert saved["base"] == 0 and saved["lorambo"] >= large.m * large.rank * 4


def _row(case, provider, mode, ms, dtype="bfloat16", saved=-1, shape=(8192, 4096, 4096)):
    m, k, n = shape
    return dict(case=case, provider=provider, mode=mode, dtype=dtype, ms_median=str(ms), saved_bytes=str(saved),
                M=str(m), K=str(k), N=str(n))


def _reduce_rows(loop_ms, run="", elements=None, tensors="224"):
    """bench_ext reduction rows: python_loop at ``loop_ms[(case, dtype)]``, ext at 1 ms."""
    elements = str(gpu_targets.REDUCE_ELEMENTS if elements is None else elements)
    return [dict(run=run, section="reduce", case=c, dtype=d, provider=p, M=tensors, K=elements, ms_median=str(ms))
            for (c, d), loop in loop_ms.items() for p, ms in (("python_loop", loop), ("ext", 1.0))]


def _adamw_rows(ext_ms, foreach_ms, run="", pools=224, width=1024):
    return [dict(run=run, section="adamw", case=f"adamw_step_{pools}", dtype="float32", provider=p, M=str(pools),
                 K=str(width), ms_median=str(ms)) for p, ms in [("ext", ext_ms), ("foreach", foreach_ms),
                                                                ("torch_whole_pool", 6.0)]]


def test_verdicts_judge_each_target_against_its_limit():
    lora = [
        _row("large", "base", "fwd_bwd", 1.0, saved=0), _row("large", "lorambo", "fwd_bwd", 1.10, saved=300),
        _row("large", "peft", "fwd_bwd", 1.5, saved=256), _row("large", "peft_style", "fwd_bwd", 1.5, saved=1000),
        _row("mid", "base", "fwd_bwd", 0.2, shape=(2048, 4096, 4096)),
        _row("mid", "lorambo", "fwd_bwd", 0.2 * 1.26, shape=(2048, 4096, 4096)),
        # wide: lorambo failed, no row
        _row("wide", "base", "fwd_bwd", 2.0, shape=(8192, 4096, 11008)),
        _row("pool_dense", "lorambo", "fwd_bwd", 1.0), _row("pool", "lorambo", "fwd_bwd", 1.04),
        _row("decode", "base", "fwd", 0.01, shape=(1, 4096, 4096)),
        _row("decode", "lorambo", "fwd", 0.02, shape=(1, 4096, 4096)),
        _row("large", "base", "fwd_bwd", 2.0, dtype="float16"),
        _row("large", "lorambo", "fwd_bwd", 2.1, dtype="float16"),
    ]
    ext = _reduce_rows({("dot_224", "float32"): 10.0, ("dot_224", "bfloat16"): 8.0,
                        ("sq_norm_224", "float32"): 7.0, ("sq_norm_224", "bfloat16"): 6.0})
    ext += _adamw_rows(4.0, 7.0)
    got = {v.target.name: v for v in gpu_targets.evaluate(lora, ext)}
    assert [v.target.name for v in gpu_targets.evaluate(lora, ext)] == [t.name for t in gpu_targets.TARGETS]

    large = got["fwd+bwd M=8192 4096->4096 r=16"]
    assert large.word == "PASS" and large.value == pytest.approx(1.10) and large.fp16 == pytest.approx(1.05)
    assert got["fwd+bwd M=2048 4096->4096 r=16"].word == "MISS"  # 1.26 > 1.25
    wide = got["fwd+bwd M=8192 4096->11008 r=16"]
    assert wide.word == "MISS" and wide.value is None and "not measured" in wide.note
    assert got["rank 8: capacity 128 / capacity 8"].word == "PASS"
    assert got["forward M=1 (decode) r=16"].value == pytest.approx(2.0)
    memory = got["saved for backward / peft"]  # against the peft library, not the peft-style layer
    assert memory.word == "MISS" and memory.value == pytest.approx(300 / 256) and "peft" in memory.note
    speedup = got["ext reductions, 224 tensors: loop/ext"]
    assert speedup.word == "PASS" and speedup.value == pytest.approx(6.0)  # the worst of the four
    adamw = got["pool AdamW step, 224 pools: foreach/ext"]
    assert adamw.word == "MISS" and adamw.value == pytest.approx(1.75) and adamw.fp16 is None  # < 2
    assert gpu_targets.evaluate([], [])[0].word == "MISS"
    lines = gpu_targets.table(list(got.values()))
    assert len(lines) == len(gpu_targets.TARGETS) + 1 and all(" PASS " in ln or " MISS " in ln for ln in lines[1:])


def test_a_hung_stage_is_stopped_at_its_limit_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    start = time.monotonic()
    stage = gpu_check.run("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
                          None, 3.0, tmp_path)
    assert stage.status == "TIMEOUT" and time.monotonic() - start < 30
    assert "started" in (tmp_path / "hang.log").read_text()
    failed = gpu_check.run("fails", [sys.executable, "-c", "raise SystemExit(3)"], None, 60.0, tmp_path)
    assert failed.status == "FAIL (3)"
    assert gpu_check.run("late", [sys.executable, "-c", "pass"], None, 0.4, tmp_path).status == "SKIP"


def test_output_folder_limits_are_checked(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("x")
    problems = gpu_check.output_problems(tmp_path)
    assert any("10 files" in p for p in problems) and any("too deep" in p for p in problems)
    assert gpu_check.output_problems(deep) == []


# What the GPU machine's python3 has that these files may use (docs/gpu_check.md): its image has no
# network and lacks some of requirements/dev.txt (the MiniLM model package, for one). The checkout
# itself provides lorambo, lorambo_kernels and the test helpers (aot_sm90 and aot_cases from tools/).
GPU_IMAGE_MODULES = {"torch", "triton", "numpy", "pytest", "hypothesis", "peft", "transformers", "safetensors", "tqdm",
                     "yaml", "matplotlib", "lorambo", "lorambo_kernels", "lora_oracle", "ext_testutil", "aot_sm90",
                     "aot_cases"}


def test_gpu_test_files_import_only_what_the_gpu_image_has():
    import ast

    local = {"gpu_targets", "providers", "results_csv", "arg_lists", "machine",  # benchmarks/ as plain modules
             "residual_net", "pyproject_data"}  # tests/ helpers, on sys.path through tests/conftest.py
    files = [ROOT / "tests" / "conftest.py", *sorted((ROOT / "tests" / "kernels").glob("*.py")),
             *sorted((ROOT / "tests" / "ext").glob("*.py")),
             *[BENCH / f for f in ("gpu_check.py", "gpu_targets.py", "bench_lora_linear.py", "bench_ext.py",
                                   "bench_sketch.py", "providers.py", "results_csv.py", "arg_lists.py",
                                   "machine.py")]]
    foreign = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in GPU_IMAGE_MODULES | local:
                    foreign.add(f"{path.relative_to(ROOT)}: {name}")
    assert not foreign, sorted(foreign)


# ------------------------------------------------------------- what the GPU machine lacks
class _Without:
    """importlib.util for gpu_check with ``missing`` modules not installed."""

    def __init__(self, *missing):
        self.missing = set(missing)

    def find_spec(self, name, *args):
        return None if name in self.missing else importlib.util.find_spec(name, *args)


def test_carried_plugin_wheels_are_pure_python_and_match_their_hashes():
    import hashlib

    folder = gpu_check.PLUGIN_WHEELS
    listed = dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    assert wheels == sorted(listed) and len(wheels) == 3
    for name in wheels:
        assert name.endswith("-py3-none-any.whl"), name
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == listed[name]
    for dists in gpu_check.PLUGINS.values():
        for dist in dists:
            assert any(w.startswith(f"{dist}-") for w in wheels), dist


def test_missing_plugins_come_from_the_carried_wheels_and_run(tmp_path, monkeypatch):
    # As on the GPU machine: no xdist, no pytest-timeout installed. The stages' pytest must still
    # run 2 workers and time a hung test out.
    monkeypatch.setattr(gpu_check, "util", _Without("xdist", "pytest_timeout"))
    assert gpu_check._has("xdist") and gpu_check._has("pytest_timeout")
    env = gpu_check.child_env(smoke=False)
    carried = [p for p in env["PYTHONPATH"].split(":") if p.endswith(".whl")]
    assert sorted(Path(p).name.split("-")[0] for p in carried) == ["execnet", "pytest_timeout", "pytest_xdist"]
    (tmp_path / "test_plugins.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                              "def test_hangs():\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--timeout=2", str(tmp_path / "test_plugins.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "bringing up nodes" in out and re.search(r"\[gw[01]\] linux", out), out  # run by xdist workers
    assert "1 failed, 1 passed" in out and "Timeout (>2.0s) from pytest-timeout" in out, out


def test_without_matplotlib_the_benchmark_skips_only_the_plot(monkeypatch):
    csv_path = Path("lora_linear.csv")
    monkeypatch.setattr(gpu_check, "util", _Without("matplotlib"))
    assert gpu_check.bench_command("bfloat16", csv_path, smoke=False)[-1] == "--no-plot"
    assert "--no-plot" in gpu_check.bench_command("bfloat16", csv_path, smoke=True)
    monkeypatch.setattr(gpu_check, "util", _Without())
    if importlib.util.find_spec("matplotlib") is not None:
        assert "--no-plot" not in gpu_check.bench_command("bfloat16", csv_path, smoke=False)


def test_the_table_shows_a_near_miss_as_measured_not_rounded_onto_the_limit():
    lora = [_row("large", "base", "fwd_bwd", 1.0), _row("large", "lorambo", "fwd_bwd", 1.104)]
    (line,) = [ln for ln in gpu_targets.table(gpu_targets.evaluate(lora, []))
               if ln.startswith("fwd+bwd M=8192 4096->4096 r=16")]
    assert " 1.104x " in line and " MISS " in line  # not "1.10x" beside a "<= 1.1x" goal


@pytest.mark.parametrize("budget", ["0", "-5", "inf"])
def test_a_budget_that_is_not_a_positive_number_is_refused(tmp_path, capsys, budget):
    """Not a check whose every stage is skipped for want of time and which still exits 0."""
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu-smoke", "--budget-s", budget, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and f"argument --budget-s: expected a positive float, got '{budget}'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
