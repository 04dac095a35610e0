"""Runs units of work (``units.py``) in one process, the main one or a worker.

MiniLM is loaded and each task built on first use, then kept; so is the data each unit derives
from its seed (training stream, calibration batches), rebuilt from the seed when needed rather
than held for every seed (on the planted task one 1,000-step stream of 32 x 64 tokens carries
3 GiB of target hidden states). Every unit returns a JSON-ready record (``journal.py``).
"""

from __future__ import annotations

import time

import torch

from lorambo.experiments.config import ExperimentConfig
from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities
from lorambo.experiments.train import train_run
from lorambo.experiments.units import sens_seed, task_methods


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def baselines(task) -> dict:
    """The test score of the model before any LoRA (the planted task's metric is 1.0 for it on the
    training windows only, so its test score is measured too)."""
    if task.name == "planted":
        return {"pretrained model, no LoRA": task.pretrained["test"]}
    return {"linear probe, no LoRA": task.probe["test"]}


class Executor:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self._model = None
        self._tasks: dict[str, tuple] = {}      # name -> (task, setup seconds, heldout, EVA cache)
        self._stream: tuple | None = None       # ((task, seed), batches): the last run's stream

    def _task(self, name: str) -> tuple:
        if name not in self._tasks:
            from lorambo.experiments.tasks import make_task

            started = time.perf_counter()
            if self._model is None:
                from lorambo.experiments.minilm import load_minilm

                bert, tokenizer = load_minilm()
                self._model = (bert.to(resolve_device(self.cfg.device)), tokenizer)
            task = make_task(name, *self._model, self.cfg)
            self._tasks[name] = (task, time.perf_counter() - started, task.heldout_batches(self.cfg.alora_heldout), {})
        return self._tasks[name]

    def _batches(self, task, seed: int, steps: int) -> list:
        """The first ``steps`` batches of the seed's stream (a prefix of the full stream)."""
        return task.train_batches(seed, steps, self.cfg.batch_size)

    def _full_stream(self, task, seed: int) -> list:
        if self._stream is None or self._stream[0] != (task.name, seed):
            self._stream = None  # free the previous stream before building the next
            self._stream = ((task.name, seed), self._batches(task, seed, self.cfg.steps))
        return self._stream[1]

    def run(self, unit: dict) -> dict:
        """The record of one unit (``units.inputs`` has filled in its ``sens`` and ``lr``), with the
        CPU seconds this process spent on it (``cpu``; a task's first unit includes its setup)."""
        cpu_started = time.process_time()
        return dict(self._run(unit), cpu=time.process_time() - cpu_started)

    def _run(self, unit: dict) -> dict:
        task, setup_seconds, heldout, cache = self._task(unit["task"])
        cfg = self.cfg
        if unit["kind"] == "task":
            return {"kind": "task", "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
                    "budgets": {str(lv): budget_of(lv, task.dims) for lv in cfg.budgets}, "dims": task.dims,
                    "describe": task.describe(), "baselines": baselines(task), "setup_seconds": setup_seconds}
        if unit["kind"] == "sens":
            seed = unit["seed"]
            batches = self._batches(task, seed, max(cfg.calib_batches, cfg.probe_steps))
            sens, seconds = compute_sensitivities(task, cfg, seed, batches[:cfg.calib_batches],
                                                  task_methods(cfg, task.name), stream=batches)
            return {"kind": "sens", "task": task.name, "seed": seed, "sens": sens, "seconds": seconds}
        level = cfg.budgets[unit["li"]]
        calib = self._batches(task, sens_seed(cfg, unit["seed"]), cfg.calib_batches)
        ctx = RunContext(task, cfg, level, budget_of(level, task.dims), unit["seed"], calib, heldout, unit["sens"],
                         cache)
        run = train_run(ctx, unit["method"], unit["lr"], self._full_stream(task, unit["seed"]),
                        score_val=not unit["selected"] or cfg.val_every > 0,
                        record_divergence=not unit["selected"])  # a grid run may diverge, a selected one not
        return {"kind": "run", "task": task.name, "run": run}
