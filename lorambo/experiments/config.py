"""Experiment configuration: which tasks, methods, budgets, seeds and how much training.

Budgets are given as *levels*: the mean LoRA rank per adapted module, so a level L buys
``P = L * sum_i (d_i + k_i)`` parameters, the cost of uniform rank L everywhere. Every method is
held to the same P, counted as ``sum_i r_i (d_i + k_i)`` over its final ranks. On MiniLM
(``sum_i (d_i + k_i) = 41,472``) the planted deltas cost ``P* = 20,736``: level 0.5 is P = P*,
level 1 is 2 P*; the oracle gets ``P / P*`` times the planted ranks, so it spends exactly P.

Three sizes: :func:`tiny` (the CI test: seconds per run), :func:`default` (``lorambo demo``:
the planted task at P = P*: 464 s on a 2-core CPU, 1 thread, docs/demo_results.json) and
:func:`full` (``--full``: sized for one GPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

METHODS = ("uniform", "gradient", "hessian", "data", "frobenius", "online", "moves", "moves_ablation", "alora",
           "adalora", "eva", "probe", "probe_sqrt", "oracle")
REFERENCE = ("oracle",)  # not an allocator: the planted ranks themselves (planted task only)
METHOD_LABELS = {
    "uniform": "uniform LoRA",
    "gradient": "closed form, gradient",
    "hessian": "closed form, Hessian trace",
    "data": "closed form, data covariance",
    "frobenius": "closed form, Frobenius",
    "online": "online greedy growth",
    "moves": "online rank moves",
    "moves_ablation": "online rank moves, removal scores",
    "alora": "ALoRA prune/reallocate",
    "adalora": "AdaLoRA (peft)",
    "eva": "EVA (peft)",
    "probe": "knapsack, probe directions",
    "probe_sqrt": "closed form, probe removal",
    "oracle": "oracle: planted ranks",
}
CLOSED_FORM = ("gradient", "hessian", "data", "frobenius")  # LoRAMBoOptimizer sensitivity_method names
TASKS = ("planted", "sentiment")
LR_SEARCH = ("per_budget", "first_budget", "uniform")
PLANTED_TEXTS = ("docstrings", "snippets")  # text_corpus.py, snippet_text.py
DEMO_METHODS = ("uniform", "oracle", "gradient", "hessian", "online", "alora", "probe")
TASK_LABELS = {"planted": "planted low-rank deltas (distillation)",
               "sentiment": "movie-review sentiment (classification)"}


def seeds_phrase(count: int) -> str:
    """``"1 seed"``, ``"3 seeds"``: how tables and plot titles say how many seeds they average."""
    return f"{count} seed{'' if count == 1 else 's'}"


def _positive_number(value) -> bool:
    """A finite number > 0; a bool is not one (True would read as 1, a rate of 1.0 or a budget of 1)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of one experiment; the same values apply to every method."""

    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    budgets: tuple[float, ...] = (1.0, 4.0)      # levels: mean rank per module (see module doc)
    seeds: int = 3
    steps: int = 20                              # optimizer steps per run (default preset: 200)
    batch_size: int = 8
    max_length: int = 16                         # tokens per sequence, [CLS] and [SEP] included
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # AdamW learning rates tried per method: on the
    #                                              planted task at 20 steps EVA and online growth did
    #                                              best at 1e-3, most at 3e-3, AdaLoRA at 1e-2
    lr_search: str = "first_budget"              # "per_budget" | "first_budget": where the grid runs;
    #                                              "uniform": the grid runs on uniform only (seed 0,
    #                                              first budget) and every method uses its choice
    train_examples: int = 512                    # training pool per task (0: all)
    eval_examples: int = 96                      # validation examples scored per run (0: all);
    #                                              the test split is always scored whole
    calib_batches: int = 2                       # batches for sensitivities and EVA's SVD
    hessian_probes: int = 4                      # Hutchinson probes (per calibration batch)
    sensitivities_per_seed: bool = False         # False: measured once per task, on seed 0's batches
    eva_batches: int = 8                         # EVA's SVD data: the first eva_batches x 32 training
    #                                              rows (with 2 batches of 8, peft's incremental SVD
    #                                              never converged at r=4: >300 passes)
    eva_max_passes: int = 400                    # guard: peft's EVA loop has no iteration limit
    growth_factor: float = 2.0                   # pool size = growth_factor x rank (online, ALoRA),
    #                                              AdaLoRA init_r and EVA's rho follow the same factor
    online_initial: float = 0.5                  # online growth starts with this share of P (uniform)
    alora_rounds: int = 1
    alora_prune: float = 0.25                    # share of the active components pruned per round
    alora_heldout: int = 4                       # validation examples ALoRA scores components on
    #                                              (ablation runs 2 + 2 x components forwards on
    #                                              them, so a few keep ALoRA's cost near a run's)
    val_every: int = 0                           # validation loss every this many steps (0: none)
    probe_rank: int = 8                          # probe: rank of the short all-layer LoRA; the knapsack
    #                                              rule gives no layer more ranks than this
    probe_steps: int = 20                        # probe: its training steps (default preset: 60)
    probe_lr: float = 3e-3                       # probe: its learning rate (1e-2 diverged on the
    #                                              planted task: probe loss 1.3-3.1 after 30 steps)
    planted_scale: float = 0.1                   # each planted layer alone: this relative error
    planted_text: str = "docstrings"             # the planted task's text: "docstrings" (Python's own:
    #                                              7 test windows at 64 tokens) or "snippets" (NYT
    #                                              editorials and Amazon reviews: 374)
    threads: int = 2                             # torch CPU threads (per worker)
    workers: int = 1                             # processes running whole runs at once (results are
    #                                              the same for any number: docs/gpu_experiment.md)
    device: str = "auto"                         # "auto" (CUDA if available), "cpu" or "cuda"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty list without repeats, got {list(self.methods)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown or no task(s) {bad or list(self.tasks)}; valid tasks: {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):  # each would run every unit twice under one key
            raise ValueError(f"tasks repeat: {list(self.tasks)}")
        idle = [t for t in self.tasks if t != "planted" and all(m in REFERENCE for m in self.methods)]
        if idle:  # the oracle needs planted ranks: on another task nothing would run
            raise ValueError(f"task(s) {idle} would run no method: {', '.join(self.methods)} needs the planted "
                             "task's planted ranks; add an allocator such as uniform")
        if not self.budgets or not all(_positive_number(b) for b in self.budgets):
            raise ValueError(f"budgets must be positive mean ranks per module, got {list(self.budgets)}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets repeat: {list(self.budgets)}")
        for name in ("train_examples", "eval_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: all), got {v!r}")
        for name in ("seeds", "steps", "batch_size", "calib_batches", "hessian_probes", "alora_rounds",
                     "eva_batches", "eva_max_passes",
                     "alora_heldout", "threads", "workers", "probe_rank", "probe_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 4:
            raise ValueError(f"max_length must be an int >= 4 tokens, got {self.max_length!r}")
        if self.steps < 5:
            raise ValueError(f"steps must be >= 5 (the adaptive schedules need room), got {self.steps}")
        if not self.lr_grid or not all(_positive_number(lr) for lr in self.lr_grid):
            raise ValueError(f"lr_grid must hold positive learning rates, got {list(self.lr_grid)}")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"lr_grid repeats: {list(self.lr_grid)}")
        if self.lr_search not in LR_SEARCH:
            raise ValueError(f"lr_search must be one of {', '.join(LR_SEARCH)}, got {self.lr_search!r}")
        if self.lr_search == "uniform" and "uniform" not in self.methods:
            raise ValueError("lr_search='uniform' chooses the learning rate on uniform LoRA: add 'uniform' to methods")
        if isinstance(self.val_every, bool) or not isinstance(self.val_every, int) or self.val_every < 0:
            raise ValueError(f"val_every must be an int >= 0 (0: no validation curve), got {self.val_every!r}")
        if self.probe_steps > self.steps and {"probe", "probe_sqrt"} & set(self.methods):  # no probe: unused
            raise ValueError(f"probe_steps ({self.probe_steps}) must not exceed steps ({self.steps}): the probe "
                             "trains on the first probe_steps batches of a run's stream")
        if not _positive_number(self.probe_lr):
            raise ValueError(f"probe_lr must be a positive learning rate, got {self.probe_lr!r}")
        if not 0 < self.online_initial < 1 or not 0 < self.alora_prune < 1:
            raise ValueError("online_initial and alora_prune must be in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.planted_text not in PLANTED_TEXTS:
            raise ValueError(f"planted_text must be one of {', '.join(PLANTED_TEXTS)}, got {self.planted_text!r}")
        if not (_positive_number(self.growth_factor) and self.growth_factor >= 1):
            raise ValueError(f"growth_factor must be a number >= 1, got {self.growth_factor!r}")

    def replace(self, **changes) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out


def default() -> ExperimentConfig:
    """``lorambo demo``: the planted task at P = P*, 200 steps of 8 x 16 tokens, 3 seeds, the whole
    validation and test splits, the learning rate chosen on uniform LoRA (seed 0) for every method.
    At 20 steps and budgets of 2 P* and 8 P* the oracle and uniform LoRA tied within seed noise; at
    P* and 200 steps they separate far beyond it."""
    return ExperimentConfig(tasks=("planted",), methods=DEMO_METHODS, budgets=(0.5,), seeds=3, steps=200,
                            batch_size=8, max_length=16, lr_search="uniform", train_examples=0,
                            eval_examples=0, val_every=50, probe_rank=8, probe_steps=60, threads=1)


def tiny(methods=("uniform", "gradient")) -> ExperimentConfig:
    """CI size: 1 seed, a few steps, 2 methods, one learning rate."""
    return ExperimentConfig(methods=tuple(methods), budgets=(1.0, 2.0), seeds=1, steps=5, batch_size=4,
                            max_length=12, lr_grid=(1e-2,), train_examples=64, eval_examples=16, calib_batches=1,
                            eva_batches=2, hessian_probes=2, alora_heldout=4, probe_rank=2, probe_steps=3,
                            val_every=2, threads=1)  # tiny products on a busy 2-core box stall with 2 OpenMP threads


def full() -> ExperimentConfig:
    """``--full``: sized for one GPU: budgets P*, 2 P* and 4 P*, 1,000 steps of 32 x 64 tokens,
    every method, 5 seeds, 32 Hessian probes, the learning rate chosen per method and budget. The
    planted task reads the NYT/Amazon snippets: at 64 tokens the docstrings leave 7 test windows."""
    return ExperimentConfig(budgets=(0.5, 1.0, 2.0), seeds=5, steps=1000, batch_size=32, max_length=64,
                            lr_search="per_budget",
                            lr_grid=(1e-3, 3e-3, 1e-2), train_examples=0, eval_examples=0, calib_batches=8,
                            hessian_probes=32, sensitivities_per_seed=True, alora_rounds=3, alora_prune=0.1,
                            alora_heldout=64, probe_rank=32, probe_steps=60, val_every=100, planted_text="snippets")
    # probe rank 32: the oracle's largest rank at 4 P*, so the probe's knapsack can match it


SENTIMENT_METHODS = ("uniform", "gradient", "hessian", "online", "alora", "probe")


def sentiment() -> ExperimentConfig:
    """``lorambo experiment --task sentiment``: MiniLM + a linear head + LoRA on movie-review
    sentiment at P = level 1, 3 seeds, the learning rate chosen on uniform LoRA (2-core CPU: two
    worker processes of one thread each)."""
    return ExperimentConfig(tasks=("sentiment",), methods=SENTIMENT_METHODS, budgets=(1.0,), seeds=3, steps=60,
                            batch_size=16, max_length=32, lr_search="uniform", train_examples=2000,
                            eval_examples=500, probe_rank=8, probe_steps=20, threads=1,
                            workers=2)


def sentiment_full() -> ExperimentConfig:
    """``lorambo experiment --task sentiment --preset full``: the whole data, every method (GPU)."""
    return full().replace(tasks=("sentiment",), methods=tuple(m for m in METHODS if m != "oracle"),
                          max_length=48)


PRESETS = {"default": default, "tiny": tiny, "full": full}
TASK_PRESETS = {("sentiment", "default"): sentiment, ("sentiment", "full"): sentiment_full}
