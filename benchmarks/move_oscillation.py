"""Do rank moves undo the previous decision's growth, and do they lower the loss? A study of
online growth with rank moves.

    OMP_NUM_THREADS=1 python benchmarks/move_oscillation.py           # thresholds 2e-9 and 1e-6, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/move_oscillation.py --move-thresholds 1e-9 --steps 400 --seeds 0

A float64 MLP of three ``--width``-wide layers (LoRA on each, rank 2, capacity 8) distils a copy of
itself one of whose layers (``--planted``: each of 0, 2, 4 in turn) carries a planted rank-4 delta,
on fresh Gaussian inputs. The budget is what the starting ranks spend, so every rank change is a
move. The allocator decides every ``--interval`` steps (online growth with rank moves,
``LoRAMBoOptimizer``'s ``move_threshold``), scored by ``AdaLoRAImportance``, which follows each
decision (``importance.follow``). Each run is compared with the same training without moves
(``none``) and with the planted layer given rank 4 and the others rank 1 from the start
(``oracle``), by the mean squared error on 4096 held-out inputs after the last step.

For each run it counts the decisions whose move took away the very component the previous
decision had grown (its layer and slot), and reports the scores of the components grown at the
previous decision against the others' just before each decision. The decisions go to ``--out``
(default ``benchmarks/results/move_oscillation.csv``, one row per rank change), the runs to
``--runs-out`` (``benchmarks/results/move_oscillation_runs.csv``, one row per run), with the
machine. Deterministic for a seed: no timing is involved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from results_csv import append_rows  # noqa: E402

FIELDS = ["time_utc", "move_threshold", "step", "event", "layer", "old_rank", "new_rank", "component", "score",
          "undoes_last_growth", "loss", "width", "interval", "seed", "torch", "python", "cpu", "planted"]
RUN_FIELDS = ["time_utc", "method", "move_threshold", "planted", "seed", "heldout_mse", "moves", "undone",
              "decisions_after_first", "final_ranks", "steps", "width", "interval", "torch", "python", "cpu"]
LAYERS = ("0", "2", "4")  # the Linear layers of the MLP


def grown_at(records: list[dict], step: int) -> set[tuple[str, int]]:
    """(layer, slot) of every component the decision at ``step`` grew: a grow from rank r to r'
    fills slots r .. r'-1."""
    return {(r["layer"], k) for r in records if r["step"] == step and r["event"] == "grow"
            for k in range(r["old_rank"], r["new_rank"])}


def undone(records: list[dict]) -> list[bool]:
    """For each decision step after the first (in order), whether one of its shrinks dropped a
    component that the previous decision step grew (:func:`grown_at`: the same layer and slot;
    nothing else changes ranks between decisions here)."""
    steps = sorted({r["step"] for r in records})
    out = []
    for before, now in zip(steps, steps[1:]):
        grown = grown_at(records, before)
        out.append(any((r["layer"], k) in grown for r in records if r["step"] == now and r["event"] == "shrink"
                       for k in r["components"]))
    return out


def run(move_threshold: float | None, width: int, steps: int, interval: int, seed: int, planted: str = "2",
        ranks: dict | None = None):
    """(records, loss at each decision step, scores of fresh and other components per decision,
    held-out MSE after the last step, final ranks). ``move_threshold`` None: no moves;
    ``ranks``: the starting ranks (default 2 each)."""
    from lorambo import LoRAMBoOptimizer
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    torch.manual_seed(seed)
    dt64 = torch.float64
    teacher = nn.Sequential(*(m for _ in range(2) for m in (nn.Linear(width, width, dtype=dt64), nn.Tanh())),
                            nn.Linear(width, width, dtype=dt64))
    student = nn.Sequential(*(type(m)(width, width, dtype=dt64) if isinstance(m, nn.Linear) else nn.Tanh()
                              for m in teacher))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # the planted delta: rank 4 in the middle layer only
        teacher[int(planted)].weight += 0.5 * torch.randn(width, 4, dtype=dt64) @ torch.randn(4, width, dtype=dt64) / width ** 0.5
    alloc = LoRAMBoOptimizer(student, total_budget=3 * 2 * 2 * width, sensitivity_method="frobenius", capacity=8,
                             interval=interval, warmup_steps=interval, sketch_rank=4, power_iters=4,
                             move_threshold=move_threshold)
    alloc.configure(ranks or {n: 2 for n in LAYERS})
    opt = alloc.make_optimizer(lr=3e-3)
    importance = AdaLoRAImportance(student)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, fresh_scores, other_scores = {}, [], []
    for step in range(steps):
        x = torch.randn(64, width, dtype=dt64, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        with alloc.capture(step):
            loss = ((student(x) - y) ** 2).mean()
            loss.backward()
        importance.update()
        scores = importance.component_scores()
        if alloc.is_decision_step(step) and alloc.decisions:
            fresh = grown_at(alloc.decisions, alloc.decisions[-1]["step"])
            for name, values in scores.items():
                for k, v in enumerate(values.tolist()):
                    (fresh_scores if (name, k) in fresh else other_scores).append(v)
        records = alloc.step(step, opt, component_scores=None if move_threshold is None else scores)
        importance.follow(records)
        if records:
            losses[step] = loss.item()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        x = torch.randn(4096, width, dtype=dt64, generator=torch.Generator().manual_seed(seed + 2))
        heldout = ((student(x) - teacher(x)) ** 2).mean().item()
    final = {n: student[int(n)].rank for n in LAYERS}
    return alloc.decisions, losses, fresh_scores, other_scores, heldout, final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--move-thresholds", type=float, nargs="+", default=[2e-9, 1e-6])
    parser.add_argument("--planted", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=10)
    results = Path(__file__).resolve().parent / "results"
    parser.add_argument("--out", type=Path, default=results / "move_oscillation.csv")
    parser.add_argument("--runs-out", type=Path, default=results / "move_oscillation_runs.csv")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, run_rows = [], []
    common = dict(time_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), width=args.width,
                  interval=args.interval, torch=torch.__version__, python=platform.python_version(), cpu=cpu_name())
    methods = [("none", None, None), ("oracle", None, "oracle")] + [("moves", t, None) for t in args.move_thresholds]
    for planted in args.planted:
        oracle = {n: 4 if n == planted else 1 for n in LAYERS}
        for method, threshold, start in methods:
            mses, undid_counts, move_counts = [], [], []
            for seed in args.seeds:
                records, losses, fresh, other, heldout, final = run(
                    threshold, args.width, args.steps, args.interval, seed, planted,
                    oracle if start == "oracle" else None)
                flags = undone(records)
                moves = sum(r["event"] == "shrink" for r in records)
                mses.append(heldout), undid_counts.append(f"{sum(flags)}/{len(flags)}"), move_counts.append(moves)
                run_rows.append(dict(common, method=method, move_threshold="" if threshold is None else threshold,
                                     planted=planted, seed=seed, heldout_mse=heldout, moves=moves, undone=sum(flags),
                                     decisions_after_first=len(flags), steps=args.steps,
                                     final_ranks=" ".join(f"{n}:{r}" for n, r in final.items())))
                first = min((r["step"] for r in records), default=None)
                undid = dict(zip(sorted({r["step"] for r in records})[1:], flags))
                for r in records:
                    for k in (r.get("components") or [None]):
                        rows.append(dict(common, move_threshold=threshold, planted=planted, seed=seed, step=r["step"],
                                         event=r["event"], layer=r["layer"], old_rank=r["old_rank"],
                                         new_rank=r["new_rank"], component=k,
                                         score=(r["scores"][r["components"].index(k)] if k is not None else ""),
                                         undoes_last_growth=(undid.get(r["step"], "") if r["event"] == "shrink"
                                                             and r["step"] != first else ""),
                                         loss=losses.get(r["step"], "")))
                if method == "moves":
                    print(f"planted {planted}, seed {seed}, move_threshold {threshold:g}: {sum(flags)} of {len(flags)} "
                          "decisions after the first moved out the component the previous decision had grown; "
                          f"fresh components scored {min(fresh, default=float('nan')):.1e} .. "
                          f"{max(fresh, default=float('nan')):.1e}, the others {min(other, default=float('nan')):.1e}"
                          f" .. {max(other, default=float('nan')):.1e}")
            label = method if threshold is None else f"moves {threshold:g}"
            print(f"planted {planted} | {label:12s} | held-out MSE " + " ".join(f"{m:.5f}" for m in mses)
                  + f" | moves {' '.join(map(str, move_counts))} | undone {' '.join(undid_counts)}")
    if not args.no_save:
        append_rows(args.out, FIELDS, rows)
        append_rows(args.runs_out, RUN_FIELDS, run_rows)
        print(f"appended {len(rows)} rows to {args.out} and {len(run_rows)} to {args.runs_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
