"""The whole GPU check in one command: build, GPU tests, benchmarks, and a verdict per target.

On the lent GPU machine (H200), one device call from the repository root, timeout_s=540,
everything lands in $OUT (docs/gpu_check.md):

    if command -v make >/dev/null; then make gpu-check; else python3 benchmarks/gpu_check.py; fi

It uses the machine's own python3 and the torch, triton, peft and pytest installed there: no
virtual environment, no pip, no network. pytest-xdist and pytest-timeout, which that machine
lacks, come from the wheels in tools/gpu_wheels/; without matplotlib the PNG is left out.

    python3 benchmarks/gpu_check.py [--out DIR]     default $OUT when set, else build/gpu-check
    python3 benchmarks/gpu_check.py --cpu-smoke     the same stages on CPU at tiny sizes, under the
                                                    Triton interpreter, without the CUDA build (CI)

Stages, each a subprocess with its own time limit, all inside --budget-s (default 420 s); a stage
that fails or hangs is reported and the next one still runs:

  build       setup.py build_ext --inplace: lorambo._C with CUDA, every core (GPU only)
  gpu tests   pytest -m gpu tests/kernels tests/ext, JUnit XML
  bench bf16  benchmarks/bench_lora_linear.py --quick (the target cases)
  bench ext   benchmarks/bench_ext.py: the extension's multi-tensor ops over 224 tensors
  bench fp16  the bf16 benchmark again in float16, when time is left

Output folder (8 files): verdict.md, gpu_check.log (every stage's output), junit.xml,
lora_linear.csv/.md/.png, ext.csv/.md. The last lines printed are the verdict table (see
benchmarks/gpu_targets.py). Exit status 1 when a stage failed or timed out; a MISS is a finding
about speed, not a failure of the check.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_targets  # noqa: E402
from arg_lists import positive  # noqa: E402
from machine import cpus_label, usable_cpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OUTPUTS = ("verdict.md", "gpu_check.log", "junit.xml", "lora_linear.csv", "lora_linear.md", "lora_linear.png",
           "ext.csv", "ext.md")
LOG_KEEP = 3 * 2**20  # bytes of each stage's log kept in gpu_check.log (its tail)
MIN_STAGE_S = 5.0  # a stage with less time than this left is skipped
# The CPU-only ahead-of-time compile tests hold no gpu test, and collecting them sweeps ~1200
# launcher configurations (tens of seconds): not worth it inside a timed GPU call.
PYTEST_IGNORE = ("tests/kernels/test_aot_sm90.py",)
# pytest-xdist (with execnet) and pytest-timeout as pure-Python wheels in the tree, for a machine
# that has neither and no network (tools/gpu_wheels/README.md): the GPU tests compile their Triton
# variants in 8 processes, not one, and a hung kernel fails only its own test.
PLUGIN_WHEELS = ROOT / "tools" / "gpu_wheels"
PLUGINS = {"xdist": ("pytest_xdist", "execnet"), "pytest_timeout": ("pytest_timeout",)}


@dataclass
class Stage:
    name: str
    status: str  # OK, FAIL (rc), TIMEOUT, SKIP
    seconds: float
    note: str = ""


class Clock:
    """Seconds left of the whole check."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def limit(self, cap: float, reserve: float) -> float:
        """A stage's time limit: at most ``cap``, leaving ``reserve`` seconds for later stages."""
        return max(0.0, min(cap, self.budget - self.elapsed() - reserve))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else build/gpu-check)")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes, no CUDA build")
    ap.add_argument("--budget-s", type=positive(float), default=None, help="total seconds (default 420; --cpu-smoke 600)")
    ap.add_argument("--no-fp16", action="store_true", help="skip the float16 benchmark")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "build" / "gpu-check"
    if args.budget_s is None:
        args.budget_s = 600.0 if args.cpu_smoke else 420.0
    return args


# ------------------------------------------------------------------------------ running
def run(name, cmd, env, limit, logs: Path) -> Stage:
    """Run ``cmd`` (output to logs/name.log) for at most ``limit`` s; on time-out interrupt it
    (pytest still writes its JUnit XML), then kill its process group."""
    if limit < MIN_STAGE_S:
        return Stage(name, "SKIP", 0.0, "no time left")
    log_path = logs / f"{name.replace(' ', '_')}.log"
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n(time limit {limit:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "OK" if rc == 0 else f"FAIL ({rc})"
        except subprocess.TimeoutExpired:
            status = "TIMEOUT"
            _stop(proc)
    stage = Stage(name, status, time.monotonic() - start)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} in {stage.seconds:.0f} s", flush=True)
    if status != "OK":
        print("    " + "\n    ".join(_tail(log_path, 15)), flush=True)
    return stage


def _stop(proc):
    for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int) -> list[str]:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 20000))
        return fh.read().decode("utf-8", "replace").splitlines()[-n:]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _carried(module: str) -> list[str]:
    """The carried wheels that provide ``module`` (a pytest plugin), when this python lacks it."""
    if module not in PLUGINS or util.find_spec(module) is not None:
        return []
    return [str(path) for dist in PLUGINS[module] for path in sorted(PLUGIN_WHEELS.glob(f"{dist}-*.whl"))]


def _has(module: str) -> bool:
    """Whether the stages can import ``module``: installed here, or carried as wheels."""
    return util.find_spec(module) is not None or bool(_carried(module))


def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    plugins = [path for module in PLUGINS for path in _carried(module)]
    paths = ([str(ROOT), str(ROOT / "kernels")] + plugins
             + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


# ------------------------------------------------------------------------------- stages
def build_stage(env, clock, logs) -> tuple[Stage, bool]:
    """(stage, whether lorambo._C now imports with CUDA)."""
    jobs = str(usable_cpus())  # the CPUs the compilers may run on, not every CPU of the machine
    build_env = dict(env, MAX_JOBS=jobs, TORCH_CUDA_ARCH_LIST="9.0", LORAMBO_BUILD_CUDA="1")
    stage = run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], build_env,
                clock.limit(200, reserve=230), logs)
    stage.note = f"lorambo._C, CUDA, MAX_JOBS={jobs}, {stage.seconds:.0f} s"
    print(f"build time: {stage.seconds:.1f} s ({jobs} jobs)", flush=True)
    probe = subprocess.run([sys.executable, "-c", "from lorambo.ext import loader as e; m = e.load(); print("
                            "'with cuda' if m is not None and getattr(m, 'with_cuda', False) else 'built without CUDA' "
                            "if m is not None else f'not importable: {e._state.get(\"error\")}')"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    with_cuda = probe.stdout.strip().endswith("with cuda")
    if not with_cuda:
        stage.note += f"; extension not usable with CUDA: {(probe.stdout + probe.stderr).strip()[-200:]}"
        if stage.status == "OK":
            stage.status = "FAIL (import)"
    return stage, with_cuda


def tests_stage(env, clock, logs, out: Path, smoke: bool, ext_cuda: bool) -> Stage:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/kernels", "tests/ext", "-q", "-rfEs",
           "-p", "no:cacheprovider", f"--junitxml={out / 'junit.xml'}", "--durations=15"]
    cmd += [f"--ignore={p}" for p in PYTEST_IGNORE]
    if not smoke and _has("xdist"):
        cmd += ["-n", "8"]  # Triton compiles in parallel; a crashed worker does not take the rest down
    if not smoke and _has("pytest_timeout"):
        cmd += ["--timeout=90"]  # one hung kernel fails its test, not the whole stage
    test_env = dict(env, LORAMBO_REQUIRE_EXT="1") if ext_cuda else env  # a broken build is an error
    stage = run("gpu tests", cmd, test_env, clock.limit(160, reserve=130), logs)
    stage.note = junit_summary(out / "junit.xml")
    return stage


def bench_command(dtype: str, csv_path: Path, smoke: bool) -> list:
    cmd = [sys.executable, BENCH / "bench_lora_linear.py", "--out", csv_path]
    cmd += ["--cpu-smoke", "--providers", "base,peft_style,lorambo"] if smoke else \
        ["--quick", "--dtype", dtype, "--providers", "base,peft_style,peft,lorambo"]
    return cmd + _plot_flag()


def _plot_flag() -> list:
    """``--no-plot`` where matplotlib is missing (the GPU image has none): the PNG is drawn later,
    elsewhere, with ``bench_lora_linear.py --replot --out lora_linear.csv``."""
    return [] if _has("matplotlib") else ["--no-plot"]


def bench_stage(name, dtype, env, clock, cap, reserve, logs, out: Path, smoke: bool) -> Stage:
    csv_path = out / "lora_linear.csv"
    no_plot = _plot_flag()
    stage = run(name, bench_command(dtype, csv_path, smoke), dict(env, LORAMBO_BACKEND="triton"),
                clock.limit(cap, reserve), logs)
    if stage.status != "OK" and csv_path.exists():  # cut short: redraw from the rows it kept
        run(f"{name} replot", [sys.executable, BENCH / "bench_lora_linear.py", "--replot", "--out", csv_path,
                               *no_plot], env, clock.limit(40, reserve=0), logs)
    if no_plot:
        stage.note = "no matplotlib here: no PNG (draw it with bench_lora_linear.py --replot)"
    return stage


def ext_stage(env, clock, logs, out: Path, smoke: bool, ext_cuda: bool) -> Stage:
    if not smoke and not ext_cuda:
        return Stage("bench ext", "SKIP", 0.0, "lorambo._C with CUDA is not available")
    cmd = [sys.executable, BENCH / "bench_ext.py", "--out", out / "ext.csv", "--no-plot"]
    cmd += ["--device", "cpu", "--sections", "reduce", "--quick", "--budget", "0.05"] if smoke else \
        ["--device", "cuda", "--sections", "reduce,probes,pool,adamw", "--budget", "1"]
    return run("bench ext", cmd, env, clock.limit(75, reserve=10), logs)


# ------------------------------------------------------------------------------ results
def junit_summary(path: Path) -> str:
    if not path.exists():
        return "no JUnit XML"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return f"unreadable JUnit XML ({err})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return (f"{passed} passed, {count['failures']} failed, {count['errors']} errors, "
            f"{count['skipped']} skipped")


def junit_failures(path: Path, limit: int = 20) -> list[str]:
    if not path.exists():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return []
    out = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            out.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    return out[:limit]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def environment(smoke: bool) -> tuple[str, list[str]]:
    """(device name, header lines: versions, usable CPUs and load)."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "none"

    if smoke:  # the parent needs no torch on CPU (seconds saved in CI); the stages import it
        gpu, torch_line = "no CUDA device", f"torch {version('torch')}"
    else:
        import torch

        gpu, torch_line = torch.cuda.get_device_name(), f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            nvcc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
            nvcc = nvcc.splitlines()[-1] if nvcc else "?"
        except (OSError, subprocess.SubprocessError) as err:
            nvcc = f"not runnable ({err})"
    smi = "not found"
    if shutil.which("nvidia-smi"):  # the card's state as found (clocks, temperature, memory in use)
        try:
            smi = subprocess.run(["nvidia-smi", "--format=csv,noheader", "--query-gpu=name,driver_version,"
                                  "clocks.sm,clocks.mem,temperature.gpu,memory.used,memory.total"],
                                 capture_output=True, text=True, timeout=30).stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError) as err:
            smi = f"not runnable ({err})"
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return gpu, [
            f"mode: {'cpu-smoke (Triton interpreter, tiny sizes: the numbers mean nothing)' if smoke else 'GPU'}",
            f"device: {gpu}; {cpus_label()}{load}",
            f"python {sys.version.split()[0]} ({sys.executable}); "
            f"{torch_line}; "
            f"triton {version('triton')}; peft {version('peft')}; transformers {version('transformers')}; "
            f"numpy {version('numpy')}; setuptools {version('setuptools')}",
            f"nvcc: {nvcc or 'not found'}; nvidia-smi: {smi}"]


def write_log(out: Path, logs: Path, header: list[str]) -> None:
    """All stage logs, in order, into one file (each cut to its last LOG_KEEP bytes)."""
    tmp = out / "gpu_check.log.tmp"
    with tmp.open("wb") as dst:
        dst.write(("\n".join(header) + "\n").encode())
        for path in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
            size = path.stat().st_size
            dst.write(f"\n===== {path.stem} ({size} bytes) =====\n".encode())
            with path.open("rb") as src:
                if size > LOG_KEEP:
                    dst.write(f"[first {size - LOG_KEEP} bytes cut]\n".encode())
                    src.seek(size - LOG_KEEP)
                shutil.copyfileobj(src, dst)
    tmp.replace(out / "gpu_check.log")


def output_problems(out: Path) -> list[str]:
    """Breaches of the device tool's limits: 8 files, 16 MiB each, 2 folders deep."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (limit 8)"] if len(files) > 8 else []
    problems += [f"{p.name} is {p.stat().st_size / 2**20:.1f} MiB" for p in files if p.stat().st_size >= 16 * 2**20]
    problems += [f"{p} is too deep" for p in files if len(p.relative_to(out).parts) > 3]
    return problems


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder starts clean (appending CSVs would mix runs)
        (out / name).unlink(missing_ok=True)
    smoke = args.cpu_smoke
    if not smoke and not _cuda_available():
        print("gpu_check: no CUDA device here; use --cpu-smoke to run the check on CPU", file=sys.stderr)
        return 2
    gpu, header = environment(smoke)
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-logs-") as logs:
        stages = check(args, Path(logs), header, clock, out)
    verdicts = gpu_targets.evaluate(read_rows(out / "lora_linear.csv"), read_rows(out / "ext.csv"),
                                    "float32" if smoke else "bfloat16")
    head = f"== lorambo gpu-check, {gpu}, {'cpu-smoke' if smoke else 'bf16'}, {clock.elapsed():.0f} s =="
    stage_lines = [f"{'stage':<11} {'status':<13} {'time':>5}  note"]
    stage_lines += [f"{s.name:<11} {s.status:<13} {s.seconds:>4.0f}s  {s.note}" for s in stages]
    target_lines = gpu_targets.table(verdicts)
    failures = junit_failures(out / "junit.xml")
    md = ["# lorambo gpu-check", "", *[f"- {h}" for h in header], "", "```", head, *stage_lines, "",
          *target_lines, "```", ""]
    if failures:
        md += ["## Failed GPU tests", "", *[f"- {f}" for f in failures], ""]
    tmp = out / "verdict.md.tmp"  # a call cut short leaves no verdict, never half of one
    tmp.write_text("\n".join(md))
    tmp.replace(out / "verdict.md")
    problems = output_problems(out)
    if problems:
        stage_lines.append(f"output folder breaks the device limits: {'; '.join(problems)}")
    print("\n" + "\n".join([head, *stage_lines, *target_lines]), flush=True)
    ok = all(s.status in ("OK", "SKIP") for s in stages) and not problems
    return 0 if ok else 1


def check(args, logs: Path, header: list[str], clock: Clock, out: Path) -> list[Stage]:
    """Run the stages in order of importance; gpu_check.log is rewritten after each one, so a
    call cut short still returns the logs so far."""
    smoke = args.cpu_smoke
    env = child_env(smoke)
    stages = []

    def done(stage):
        stages.append(stage)
        write_log(out, logs, header)

    if smoke:
        done(Stage("build", "SKIP", 0.0, "cpu-smoke: no CUDA build"))
        ext_cuda = False
    else:
        stage, ext_cuda = build_stage(env, clock, logs)
        done(stage)
    done(tests_stage(env, clock, logs, out, smoke, ext_cuda))
    done(bench_stage("bench bf16" if not smoke else "bench", "bfloat16", env, clock, 150, 70, logs, out, smoke))
    done(ext_stage(env, clock, logs, out, smoke, ext_cuda))
    if not smoke and not args.no_fp16:
        if clock.limit(150, reserve=10) >= 60:
            done(bench_stage("bench fp16", "float16", env, clock, 150, 10, logs, out, smoke))
        else:
            done(Stage("bench fp16", "SKIP", 0.0, "less than 60 s left"))
    return stages


if __name__ == "__main__":
    sys.exit(main())
