"""The whole experiment: tasks x methods x budgets x seeds, with a per-method learning-rate search.

Protocol (identical for every method):
1. per task and seed, the training batch stream is fixed; the calibration batches (the first
   ``calib_batches`` of seed 0's stream, or of each seed's with ``sensitivities_per_seed``) feed
   the closed-form sensitivities and EVA's SVD, measured once and reused for every budget;
2. learning rate: every value of ``lr_grid`` is trained on seed 0 and the one with the lowest
   *validation* loss is kept (per budget, or at the first budget for all with
   ``lr_search="first_budget"``); the remaining seeds run at that rate only;
3. the test split is scored for every run, but never used to choose anything.

Outputs, in ``out_dir``: ``results.json`` (every number, rewritten atomically after each task),
``results.txt`` (the tables and verdicts) and the PNGs of ``plots.py``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorambo.experiments import demo_report
from lorambo.experiments import results as res
from lorambo.experiments.config import REFERENCE, ExperimentConfig
from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities
from lorambo.experiments.train import train_run


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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def default_out_dir(root="runs") -> Path:
    return Path(root) / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def environment(cfg: ExperimentConfig) -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "threads": cfg.threads, "device": str(resolve_device(cfg.device)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def task_methods(cfg: ExperimentConfig, task: str) -> tuple[str, ...]:
    """The oracle needs planted ranks: it runs on the planted task only."""
    return tuple(m for m in cfg.methods if not (m in REFERENCE and task != "planted"))


def plan(cfg: ExperimentConfig, task: str = "planted") -> list[tuple]:
    """Every run as (method, level index, seed, lr or None = 'the selected lr'), in execution order.
    With ``lr_search="uniform"`` uniform LoRA runs first (the grid on seed 0 at the first budget)
    and every other method then runs at its choice only."""
    methods = task_methods(cfg, task)
    if cfg.lr_search == "uniform":
        methods = ("uniform",) + tuple(m for m in methods if m != "uniform")
    out = []
    for method in methods:
        for li in range(len(cfg.budgets)):
            if cfg.lr_search == "uniform":
                search = method == "uniform" and li == 0
            else:
                search = cfg.lr_search == "per_budget" or li == 0
            if search:  # the grid on seed 0 (a grid of one is just seed 0's run)
                out += [(method, li, 0, lr) for lr in cfg.lr_grid]
            out += [(method, li, s, None) for s in range(1 if search else 0, cfg.seeds)]
    return out


def chosen_lr(lr_choice: dict, cfg: ExperimentConfig, method: str, level: float) -> float:
    """The selected learning rate of (method, budget level): its own per budget, else its first
    budget's, else (``lr_search="uniform"``) uniform LoRA's at the first budget."""
    first = str(cfg.budgets[0])
    if cfg.lr_search == "uniform":
        return lr_choice["uniform"][first]
    return lr_choice[method].get(str(level)) or lr_choice[method][first]


def run_experiment(cfg: ExperimentConfig, out_dir=None, progress: bool | None = None, echo=print) -> dict:
    """Run everything, write the artefacts, and return the result dict."""
    started, cpu_started = time.perf_counter(), time.process_time()
    load_start = demo_report.load_average()
    out_dir = check_out_dir(out_dir if out_dir is not None else default_out_dir())
    torch.set_num_threads(cfg.threads)
    from lorambo.experiments.minilm import load_minilm
    from lorambo.experiments.tasks import make_task

    bert, tokenizer = load_minilm()
    device = resolve_device(cfg.device)
    bert.to(device)
    sens_units = cfg.seeds if cfg.sensitivities_per_seed else 1
    total = sum(len(plan(cfg, t)) + sens_units + 1 for t in cfg.tasks)
    bar = tqdm(total=total, desc="experiment", unit="run", file=sys.stderr, disable=progress is False,
               dynamic_ncols=True)
    result = {"config": cfg.as_dict(), "environment": environment(cfg), "out_dir": str(out_dir),
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "tasks": {}}
    try:
        for task_name in cfg.tasks:
            bar.set_postfix_str(f"{task_name}: data and targets")
            t0 = time.perf_counter()
            task = make_task(task_name, bert, tokenizer, cfg)
            bar.update(1)
            tr = _run_task(task, cfg, plan(cfg, task_name), bar)
            tr["setup_seconds"] = time.perf_counter() - t0 - tr["run_seconds"] - tr["sensitivity_seconds_total"]
            result["tasks"][task_name] = tr
            result["seconds"] = time.perf_counter() - started
            res.write_json_atomic(result, out_dir / "results.json")
    finally:
        bar.close()
    from lorambo.experiments.plots import all_plots

    result["plots"] = all_plots(result, out_dir)
    text = report_text(result, cfg)
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = time.process_time() - cpu_started  # this process's CPU time: the wall
    #                                                           time it would take on an idle core
    result["machine"] = demo_report.machine_line(result["environment"], load_start, demo_report.load_average())
    result["command"] = " ".join(["lorambo"] + sys.argv[1:]) if Path(sys.argv[0]).name == "lorambo" else ""
    if _has_gap(result):
        summary = demo_report.compact(result)
        result["plots"] += [str(p.relative_to(out_dir)) for p in demo_report.demo_plots(summary, out_dir)]
        result["seconds"] = summary["wall_s"] = time.perf_counter() - started
        result["cpu_seconds"] = summary["cpu_s"] = time.process_time() - cpu_started
        res.write_json_atomic(summary, out_dir / "demo_results.json")
        text = demo_report.table(summary) + "\n\n" + text
    if "sentiment" in result["tasks"]:
        sentiment = demo_report.accuracy_summary(result)
        res.write_json_atomic(sentiment, out_dir / "sentiment_results.json")
        text = demo_report.accuracy_table(sentiment) + "\n\n" + text
    text += f"\n\nwall time {result['seconds']:.0f} s; {result['machine']}; artefacts in {out_dir}/"
    res.write_text_atomic(text + "\n", out_dir / "results.txt")
    res.write_json_atomic(result, out_dir / "results.json")
    echo(text)
    return result


def _has_gap(result: dict) -> bool:
    """Whether the planted task ran uniform and the oracle at the first budget (the demo's verdict)."""
    tr = result["tasks"].get("planted")
    level = str(result["config"]["budgets"][0])
    return bool(tr) and all(level in tr["summary"].get(m, {}) for m in ("uniform", "oracle"))


def _run_task(task, cfg: ExperimentConfig, runs_plan, bar) -> dict:
    levels = list(cfg.budgets)
    budgets = {str(lv): budget_of(lv, task.dims) for lv in levels}
    methods = task_methods(cfg, task.name)
    streams, sens, sens_seconds = {}, {}, {}
    for seed in range(cfg.seeds):
        batches = task.train_batches(seed, cfg.steps, cfg.batch_size)
        streams[seed] = batches
        if seed == 0 or cfg.sensitivities_per_seed:
            bar.set_postfix_str(f"{task.name}: sensitivities, seed {seed}")
            sens[seed], sens_seconds[seed] = compute_sensitivities(task, cfg, seed, batches[:cfg.calib_batches],
                                                                   methods, stream=batches)
            bar.update(1)
        else:  # measured once per task: every seed allocates from seed 0's sensitivities
            sens[seed] = sens[0]
    heldout = task.heldout_batches(cfg.alora_heldout)
    first = streams[0][:cfg.calib_batches]  # one object: EVA's cache is keyed on it
    calib = {seed: streams[seed][:cfg.calib_batches] if cfg.sensitivities_per_seed else first for seed in streams}
    cache: dict = {}
    runs, lr_choice, run_seconds = [], {m: {} for m in methods}, 0.0
    for method, li, seed, lr in runs_plan:
        level = levels[li]
        searching = lr is not None
        if lr is None:  # the selected rate (see chosen_lr)
            lr = chosen_lr(lr_choice, cfg, method, level)
            lr_choice[method].setdefault(str(level), lr)
        bar.set_postfix_str(f"{task.name}: {method}, level {level:g}, seed {seed}, lr {lr:g}")
        ctx = RunContext(task, cfg, level, budgets[str(level)], seed, calib[seed], heldout, sens[seed], cache)
        run = train_run(ctx, method, lr, streams[seed], score_val=searching or cfg.val_every > 0)
        run_seconds += run["seconds"]
        runs.append(run)
        _select(runs, lr_choice, method, level, cfg)
        bar.update(1)
    summary = res.summarize(runs, lr_choice, methods, levels, task.higher_is_better)
    tr = {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
          "seeds": cfg.seeds, "budgets": budgets, "dims": task.dims, "describe": task.describe(),
          "sensitivity_seconds": sens_seconds,
          "sensitivity_seconds_total": sum(sum(v.values()) for v in sens_seconds.values()),
          "sensitivities": {str(s): {m: {k.replace("bert.encoder.", ""): v for k, v in vals.items()}
                                     for m, vals in per.items() if not m.startswith("_")}
                            for s, per in sens.items() if s in sens_seconds},
          "methods": list(methods),
          "notes": sorted({n for per in sens.values() for n in per.get("_notes", [])}),
          "lr_choice": lr_choice, "runs": runs, "summary": summary, "run_seconds": run_seconds,
          "baselines": _baselines(task)}
    tr["verdicts"] = res.verdicts(task.name, summary, levels, task.higher_is_better)
    return tr


def _select(runs, lr_choice, method, level, cfg) -> None:
    """After the grid of (method, level) on seed 0 is complete, keep the lowest validation loss."""
    key = str(level)
    if key in lr_choice[method]:
        return
    grid = [r for r in runs if r["method"] == method and r["level"] == level and r["seed"] == 0]
    if len(grid) < len(cfg.lr_grid):
        return
    best = min(grid, key=lambda r: (r["val"].get("loss", r["val"].get("rel_loss")), r["lr"]))
    lr_choice[method][key] = best["lr"]


def _baselines(task) -> dict:
    if task.name == "planted":
        return {"pretrained model, no LoRA": 1.0}
    return {"linear probe, no LoRA": task.probe["test"]}


def report_text(result: dict, cfg: ExperimentConfig) -> str:
    parts = []
    for task, tr in result["tasks"].items():
        parts.append(res.format_table(tr, tr["methods"], cfg.budgets))
        parts.append("\n".join(tr["verdicts"]))
        chosen = ", ".join(f"{m} {'/'.join(f'{v:g}' for v in per.values())}" for m, per in tr["lr_choice"].items())
        parts.append(f"learning rates chosen on validation (per budget): {chosen}")
        if tr["notes"]:
            parts.append("notes: " + "; ".join(tr["notes"]))
    env = result["environment"]
    parts.append(f"{cfg.seeds} seeds, {cfg.steps} steps of {cfg.batch_size} x {cfg.max_length} tokens per run; "
                 f"python {env['python']}, torch {env['torch']}, peft {env['peft']}, "
                 f"{env['cpu_count']} CPUs ({env['processor'] or env['machine']}), {env['threads']} threads")
    return "\n\n".join(parts)
