"""Aggregate runs into mean ± std per (method, budget), compare with uniform, format, save.

Only the runs at each (method, budget)'s selected learning rate enter the summary; the others
(the rest of the grid, on seed 0, including the runs that diverged) stay in the JSON.
Comparisons with uniform are paired by seed (same data order and LoRA initialisation seed): a
method "beats uniform" at a budget when it is better on every seed. Where a reference (the
oracle) ran, each method's share of the uniform-to-oracle gap is reported per seed
(:func:`gap_closed`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lorambo.adapters.atomic import atomic_write_text
from lorambo.experiments.config import METHOD_LABELS, REFERENCE, TASK_LABELS

EXTRA = ("spearman", "planted_share", "planted_coverage")


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_closed(method: dict, uniform: dict, reference: dict) -> dict:
    """Share of the uniform-to-reference gap a method closes, paired by seed:
    ``(m_s - u_s) / (o_s - u_s)`` for every seed ``s`` the three share ({seed: metric} each).
    1 = as good as the reference, 0 = no better than uniform, < 0 = worse than uniform; the sign
    convention holds for losses and for accuracies alike. A seed on which uniform equals the
    reference has no gap to close and is left out (its value would be 0 / 0)."""
    out = {}
    for seed in sorted(set(method) & set(uniform) & set(reference)):
        gap = float(reference[seed]) - float(uniform[seed])
        if gap != 0.0:
            out[seed] = (float(method[seed]) - float(uniform[seed])) / gap + 0.0  # + 0.0: no -0.0
    return out


def summarize(runs: list[dict], lr_choice: dict, methods, levels, higher_is_better: bool) -> dict:
    """``{method: {str(level): {...}}}`` over the selected runs, with paired gaps to uniform."""
    chosen = {}
    for r in runs:
        if not r.get("diverged") and r["lr"] == lr_choice[r["method"]][str(r["level"])]:
            chosen.setdefault((r["method"], r["level"]), {})[r["seed"]] = r
    out = {}
    for method in methods:
        for level in levels:
            rows = chosen.get((method, level), {})
            if not rows:
                continue
            seeds = sorted(rows)
            m, s = mean_std(rows[k]["metric"] for k in seeds)
            entry = {"seeds": seeds, "metric_mean": m, "metric_std": s, "lr": lr_choice[method][str(level)],
                     "spent_mean": statistics.fmean(rows[k]["spent"] for k in seeds),
                     "budget": rows[seeds[0]]["budget"],
                     "mean_ranks": {n: statistics.fmean(rows[k]["ranks"][n] for k in seeds)
                                    for n in rows[seeds[0]]["ranks"]}}
            for key in EXTRA:
                if key in rows[seeds[0]]:
                    entry[key + "_mean"], entry[key + "_std"] = mean_std(rows[k][key] for k in seeds)
            base = chosen.get(("uniform", level), {})
            common = [k for k in seeds if k in base]
            if method != "uniform" and common:
                sign = 1.0 if higher_is_better else -1.0
                gains = [sign * (rows[k]["metric"] - base[k]["metric"]) for k in common]
                entry["gain_vs_uniform_mean"], entry["gain_vs_uniform_std"] = mean_std(gains)
                entry["wins_vs_uniform"] = sum(g > 0 for g in gains)
                entry["paired_seeds"] = len(common)
            ref = chosen.get((REFERENCE[0], level), {})
            if ref and base:
                shares = gap_closed({k: rows[k]["metric"] for k in seeds}, {k: r["metric"] for k, r in base.items()},
                                    {k: r["metric"] for k, r in ref.items()})
                if shares:
                    entry["gap_closed"] = [shares[k] for k in sorted(shares)]
                    entry["gap_closed_mean"], entry["gap_closed_std"] = mean_std(entry["gap_closed"])
            curves = [rows[k].get("val_curve") for k in seeds]
            if curves and all(curves) and len({len(c) for c in curves}) == 1:
                entry["val_curve_steps"] = [step for step, _ in curves[0]]
                entry["val_curve_mean"] = [statistics.fmean(c[i][1] for c in curves) for i in range(len(curves[0]))]
                entry["val_curve_std"] = [mean_std([c[i][1] for c in curves])[1] for i in range(len(curves[0]))]
            out.setdefault(method, {})[str(level)] = entry
    return out


def lr_choice_line(lr_choice: dict, diverged: list[dict]) -> str:
    """The learning rates chosen per method (one per budget) and the grid rates that diverged:
    ``uniform 0.003/0.003 (0.01 diverged)``; with grids at several budgets, the budget of each."""
    parts = []
    for method, per in lr_choice.items():
        text = f"{method} {'/'.join(f'{v:g}' for v in per.values())}"
        by_level: dict[float, list[float]] = {}
        for d in diverged:
            if d["method"] == method:
                by_level.setdefault(d["level"], []).append(d["lr"])
        if len(by_level) == 1:
            (lrs,) = by_level.values()
            text += f" ({', '.join(f'{lr:g}' for lr in sorted(lrs))} diverged)"
        elif by_level:
            text += " (diverged: " + "; ".join(f"level {lv:g}: {', '.join(f'{lr:g}' for lr in sorted(lrs))}"
                                               for lv, lrs in sorted(by_level.items())) + ")"
        parts.append(text)
    return "learning rates chosen on validation (per budget): " + ", ".join(parts)


def verdicts(task: str, summary: dict, levels, higher_is_better: bool) -> list[str]:
    """Plain sentences: which adaptive method beat uniform on every seed, at which budget."""
    lines = []
    word = "higher" if higher_is_better else "lower"
    for level in levels:
        uni = summary.get("uniform", {}).get(str(level))
        if uni is None:
            lines.append(f"[{task}] level {level:g}: uniform was not run, no comparison")
            continue
        better, worse = [], []
        for method, per in summary.items():
            e = per.get(str(level))
            if method == "uniform" or method in REFERENCE or e is None or "wins_vs_uniform" not in e:
                continue
            text = (f"{METHOD_LABELS[method]} {e['metric_mean']:.4f} ± {e['metric_std']:.4f} "
                    f"({e['wins_vs_uniform']}/{e['paired_seeds']} seeds)")
            (better if e["wins_vs_uniform"] == e["paired_seeds"] else worse).append(text)
        lines.append(f"[{task}] level {level:g} (P = {uni['budget']:,}), uniform {uni['metric_mean']:.4f} "
                     f"± {uni['metric_std']:.4f} ({word} is better):")
        lines.append("  beat uniform on every seed: " + ("; ".join(better) if better else "none"))
        lines.append("  did not: " + ("; ".join(worse) if worse else "none"))
    return lines


def _pm(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}f}±{s:.{digits}f}"


def format_table(task_result: dict, methods, levels) -> str:
    """One text table per task: a row per method, a column group per budget."""
    task, summary = task_result["task"], task_result["summary"]
    metric = task_result["metric"]
    planted = task == "planted"
    cols = ["loss", "ρ", "share"] if planted else ["accuracy"]
    width = max(len(METHOD_LABELS[m]) for m in methods) + 2
    cell = 14
    titles = [f"level {lv:g}, P={task_result['budgets'][str(lv)]:,}" for lv in levels]
    group = max([cell * len(cols)] + [len(t) + 1 for t in titles])
    head1 = " " * width + "".join(f"| {t}".ljust(group + 2) for t in titles)
    head2 = "method".ljust(width) + "".join(("| " + "".join(c.ljust(cell) for c in cols)).ljust(group + 2)
                                            for _ in levels)
    lines = [f"{TASK_LABELS[task]}: held-out {metric} (mean ± std over seeds)", head1, head2,
             "-" * len(head2)]
    extra = task_result.get("baselines", {})
    for name, value in extra.items():
        lines.append(f"{name}".ljust(width) + "".join(("| " + f"{value:.3f}").ljust(group + 2) for _ in levels))
    for m in methods:
        row = METHOD_LABELS[m].ljust(width)
        for lv in levels:
            e = summary.get(m, {}).get(str(lv))
            if e is None:
                row += "| n/a".ljust(group + 2)
                continue
            parts = [_pm(e["metric_mean"], e["metric_std"])]
            if planted:
                parts += [f"{e['spearman_mean']:.2f}", f"{e['planted_share_mean']:.2f}"]
            row += ("| " + "".join(p.ljust(cell) for p in parts)).ljust(group + 2)
        lines.append(row)
    if planted:
        lines.append("ρ: Spearman correlation of the final ranks with the planted ones over all 36 layers "
                     "(0 for a constant allocation); share: part of the spent budget Σ r (d + k) that goes to "
                     "planted layers (oracle: 1.00). loss: MSE / the pretrained model's MSE on the training windows "
                     "(its test loss is the baseline row), 0 = deltas recovered.")
    return "\n".join(lines)


def _finite(obj, path="result") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{path} is {obj}: refusing to write a non-finite number")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{path}[{i}]")


def write_json_atomic(obj, path) -> Path:
    """Write JSON (finite numbers only) so that a reader never sees a partial file."""
    _finite(obj)
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False))


def write_text_atomic(text: str, path) -> Path:
    return atomic_write_text(path, text)
