"""The planted task's verdict: gap closed per method, recovery of the planted ranks, and plots.

Primary metric: the share of the uniform-to-oracle gap in test loss each method closes, paired by
seed (``results.gap_closed``), as mean ± std with the number of seeds on which it beat uniform.
Secondary: rank coverage ``sum_i min(r_i, r*_i) / sum_i r*_i``, the budget share on planted
layers and the Spearman correlation of the ranks with the planted ones (``planted.recovery``).

Artefacts: ``demo_results.json`` (:func:`compact`), ``demo_gap_closed.png``,
``demo_val_loss.png`` and ``demo_rank_heatmaps.png`` (:func:`demo_plots`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from lorambo.adapters.atomic import atomic_save_figure
from lorambo.experiments.config import METHOD_LABELS, seeds_phrase
from lorambo.experiments.cpus import cpus_line
from lorambo.experiments.plots import new_figure, rank_heatmap


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):  # not available on every platform
        return None


def machine_line(env: dict, load_start, load_end) -> str:
    """One line: platform, CPUs, threads, device and the 1-minute load average at start and end."""
    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"

    where = env.get("gpu") or f"{cpus_line(env)} ({env.get('processor') or env.get('machine')})"
    return (f"{platform.node() or 'host'}: {env.get('platform')}, {where}, torch {env.get('torch')}, "
            f"{env.get('threads')} torch thread(s), device {env.get('device')}; 1-minute load average "
            f"{fmt(load_start)} at start, {fmt(load_end)} at end")


def diverged_lrs(tr: dict, level: str, method: str = "uniform") -> list[float]:
    """The rates of ``method``'s grid at ``level`` whose runs diverged (the tables name them)."""
    return sorted(d["lr"] for d in tr.get("diverged", []) if d["method"] == method and d["level"] == float(level))


def _lr_note(summary: dict) -> str:
    gone = summary.get("lr_diverged")
    return f"; {', '.join(f'{lr:g}' for lr in gone)} diverged" if gone else ""


def _on_uniform(summary: dict) -> bool:
    """Whether one rate, chosen on uniform LoRA, served every method (``lr_search="uniform"``);
    otherwise each method ran at the rate its own grid chose, which the tables show per row."""
    return summary["lr_search"] == "uniform"


def _rate_header(summary: dict) -> str:
    if _on_uniform(summary):
        return f"lr {summary['lr']:g} (chosen on uniform LoRA, seed 0{_lr_note(summary)})"
    return "each method at the rate its own grid chose on seed 0 (column lr)"


def _rate_cell(row: dict) -> str:
    gone = row["lr_diverged"]
    return f"{row['lr']:g}" + (f" ({', '.join(f'{lr:g}' for lr in gone)} diverged)" if gone else "")


def compact(result: dict, task: str = "planted") -> dict:
    """The committed summary: machine, wall time and, per method at the first budget, the per-seed
    test losses and gap shares, the mean coverage, share, ρ, ranks and validation curve."""
    tr = result["tasks"][task]
    level = str(result["config"]["budgets"][0])
    out = {"machine": result.get("machine", ""), "wall_s": float(result["seconds"]),
           "cpu_s": float(result.get("cpu_seconds", result["seconds"])),
           "command": result.get("command", ""), "task": task, "budget": tr["budgets"][level],
           "planted_params": tr["describe"].get("planted_params"),
           "planted_ranks": tr["describe"].get("planted_ranks"),
           "steps": result["config"]["steps"], "batch_size": result["config"]["batch_size"],
           "max_length": result["config"]["max_length"], "seeds": result["config"]["seeds"],
           "split_sizes": tr["describe"].get("sizes"), "lr_search": result["config"]["lr_search"],
           "lr": tr["lr_choice"].get("uniform", {}).get(level),
           "lr_diverged": diverged_lrs(tr, level), "lr_choice": tr["lr_choice"], "methods": {}}
    seeds_of = {}
    for run in tr["runs"]:
        if (not run.get("diverged") and run["level"] == float(level)
                and run["lr"] == tr["lr_choice"][run["method"]].get(level)):
            seeds_of.setdefault(run["method"], {})[run["seed"]] = run
    for method, entry in tr["summary"].items():
        e = entry.get(level)
        if e is None:
            continue
        runs = seeds_of.get(method, {})
        row = {"label": METHOD_LABELS[method],
               "test_loss": [runs[s]["metric"] for s in sorted(runs)],
               "gap_closed": e.get("gap_closed", []),
               "gap_closed_mean": e.get("gap_closed_mean"), "gap_closed_std": e.get("gap_closed_std"),
               "wins_vs_uniform": e.get("wins_vs_uniform"), "paired_seeds": e.get("paired_seeds"),
               "coverage": e.get("planted_coverage_mean"), "planted_share": e.get("planted_share_mean"),
               "spearman": e.get("spearman_mean"), "spent": e.get("spent_mean"),
               "mean_ranks": e["mean_ranks"], "val_curve_steps": e.get("val_curve_steps"),
               "val_curve_mean": e.get("val_curve_mean"), "val_curve_std": e.get("val_curve_std")}
        if not _on_uniform(out):
            row.update(lr=tr["lr_choice"][method][level], lr_diverged=diverged_lrs(tr, level, method))
        out["methods"][method] = row
    return out


def accuracy_summary(result: dict, task: str = "sentiment") -> dict:
    """The committed summary of a classification task: per method at the first budget, the
    per-seed test accuracies, their mean ± std and the seeds on which it beat uniform."""
    tr = result["tasks"][task]
    level = str(result["config"]["budgets"][0])
    out = {"machine": result.get("machine", ""), "wall_s": float(result["seconds"]),
           "cpu_s": float(result.get("cpu_seconds", result["seconds"])),
           "command": result.get("command", ""), "task": task, "dataset": tr["describe"].get("dataset"),
           "budget": tr["budgets"][level], "steps": result["config"]["steps"],
           "batch_size": result["config"]["batch_size"], "max_length": result["config"]["max_length"],
           "seeds": result["config"]["seeds"], "split_sizes": tr["describe"].get("sizes"),
           "class_counts": tr["describe"].get("class_counts"),
           "lr_search": result["config"]["lr_search"],
           "lr": tr["lr_choice"].get("uniform", {}).get(level), "lr_diverged": diverged_lrs(tr, level),
           "linear_probe": tr["describe"].get("linear_probe"), "methods": {}}
    for method, entry in tr["summary"].items():
        e = entry.get(level)
        if e is None:
            continue
        runs = {r["seed"]: r for r in tr["runs"] if not r.get("diverged")
                and r["method"] == method and r["level"] == float(level) and r["lr"] == e["lr"]}
        out["methods"][method] = {"label": METHOD_LABELS[method], "accuracy": [runs[s]["metric"] for s in sorted(runs)],
                                  "mean": e["metric_mean"], "std": e["metric_std"],
                                  "wins_vs_uniform": e.get("wins_vs_uniform"), "paired_seeds": e.get("paired_seeds"),
                                  "mean_ranks": e["mean_ranks"]}
        if not _on_uniform(out):
            out["methods"][method].update(lr=e["lr"], lr_diverged=diverged_lrs(tr, level, method))
    return out


def accuracy_table(summary: dict) -> str:
    """The text table of :func:`accuracy_summary`'s output (also the README's). Unless one rate
    chosen on uniform LoRA served every method, a column gives each method's own rate; without
    uniform LoRA (an experiment run with other methods only) no seed has a uniform run to beat."""
    own_rates = not _on_uniform(summary)
    lines = [f"{summary['task']} task at P = {summary['budget']:,}, {summary['steps']} steps of "
             f"{summary['batch_size']} x {summary['max_length']} tokens, {seeds_phrase(summary['seeds'])}, "
             f"{_rate_header(summary)}; "
             f"linear probe on the frozen encoder: test accuracy {summary['linear_probe']['test']:.3f}", "",
             "| method | test accuracy (mean ± std) | per seed | seeds better than uniform |"
             + (" lr |" if own_rates else ""), "|---|---|---|---|" + ("---|" if own_rates else "")]
    for method, row in summary["methods"].items():
        wins = ("—" if method == "uniform" else "n/a" if row["wins_vs_uniform"] is None
                else f"{row['wins_vs_uniform']}/{row['paired_seeds']}")
        lines.append(f"| {row['label']} | {row['mean']:.4f} ± {row['std']:.4f} | "
                     f"{', '.join(f'{a:.4f}' for a in row['accuracy'])} | {wins} |"
                     + (f" {_rate_cell(row)} |" if own_rates else ""))
    return "\n".join(lines)


def table(summary: dict) -> str:
    """The text table of :func:`compact`'s output (also the README's); a column gives each method's
    own rate unless one rate chosen on uniform LoRA served every method."""
    own_rates = not _on_uniform(summary)
    lines = [f"planted task at P = {summary['budget']:,} (P* = {summary['planted_params']:,}), "
             f"{summary['steps']} steps of {summary['batch_size']} x {summary['max_length']} tokens, "
             f"{seeds_phrase(summary['seeds'])}, {_rate_header(summary)}",
             "",
             "| method | test loss (mean ± std) | gap closed (mean ± std) | seeds better than uniform | "
             "coverage | budget on planted | Spearman ρ |" + (" lr |" if own_rates else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if own_rates else "")]
    for method, row in summary["methods"].items():
        losses = row["test_loss"]
        loss = f"{np.mean(losses):.3f} ± {np.std(losses, ddof=1) if len(losses) > 1 else 0.0:.3f}"
        if method in ("uniform", "oracle"):
            gap = "0 (by definition)" if method == "uniform" else "1 (by definition)"
            wins = "—" if method == "uniform" else f"{row['wins_vs_uniform']}/{row['paired_seeds']}"
        else:
            gap = (f"{row['gap_closed_mean']:.2f} ± {row['gap_closed_std']:.2f}"
                   if row["gap_closed_mean"] is not None else "n/a")
            wins = f"{row['wins_vs_uniform']}/{row['paired_seeds']}" if row["wins_vs_uniform"] is not None else "n/a"
        lines.append(f"| {row['label']} | {loss} | {gap} | {wins} | {row['coverage']:.2f} | "
                     f"{row['planted_share']:.2f} | {row['spearman']:.2f} |"
                     + (f" {_rate_cell(row)} |" if own_rates else ""))
    lines.append("")
    lines.append("gap closed: (uniform - method) / (uniform - oracle) in test loss, per seed; coverage: "
                 "Σ min(r, r*) / Σ r*; budget on planted: share of the spent budget Σ r (d + k) that goes to the "
                 "planted layers.")
    return "\n".join(lines)


def gap_plot(summary: dict, path) -> Path:
    rows = [(m, r) for m, r in summary["methods"].items() if m not in ("uniform", "oracle") and r["gap_closed"]]
    fig = new_figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    xs = np.arange(len(rows))
    means = [r["gap_closed_mean"] for _, r in rows]
    stds = [r["gap_closed_std"] for _, r in rows]
    ax.bar(xs, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.75)
    for x, (_, r) in zip(xs, rows):
        ax.plot([x] * len(r["gap_closed"]), r["gap_closed"], "k.", ms=6)
    ax.axhline(0, color="black", lw=1)
    ax.axhline(1, color="tab:green", ls="--", lw=1)
    ax.annotate("oracle", (len(rows) - 0.5, 1), color="tab:green", fontsize=8, va="bottom", ha="right")
    ax.annotate("uniform", (len(rows) - 0.5, 0), fontsize=8, va="bottom", ha="right")
    ax.set_xticks(xs, [METHOD_LABELS[m] for m, _ in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("share of the uniform-to-oracle gap closed")
    ax.set_title(f"planted task, P = {summary['budget']:,}: bars mean ± std, dots = seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def curve_plot(summary: dict, path) -> Path:
    from matplotlib import colormaps

    fig = new_figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    palette = iter(c for i, c in enumerate(colormaps["tab10"].colors) if i != 2)  # green: the oracle's
    for method, row in summary["methods"].items():
        if not row.get("val_curve_steps"):
            continue
        xs, ys, es = (np.asarray(row[k], dtype=float) for k in ("val_curve_steps", "val_curve_mean", "val_curve_std"))
        style = dict(lw=2.4, color="black") if method == "uniform" else (
            dict(lw=2.0, color="tab:green", ls="--") if method == "oracle" else dict(lw=1.4, color=next(palette)))
        line, = ax.plot(xs, ys, marker="o", ms=3, label=row["label"], **style)
        ax.fill_between(xs, ys - es, ys + es, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (1.0 = pretrained model on training windows)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"planted task, P = {summary['budget']:,}: mean ± std over {seeds_phrase(summary['seeds'])}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def demo_plots(summary: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = {n: float(summary["planted_ranks"].get(n, 0)) for n in summary["methods"]["uniform"]["mean_ranks"]}
    panels = {"planted ranks (truth)": truth}
    panels.update({row["label"]: row["mean_ranks"] for m, row in summary["methods"].items()})
    written = [gap_plot(summary, out_dir / "demo_gap_closed.png"), curve_plot(summary, out_dir / "demo_val_loss.png"),
               rank_heatmap(panels, f"ranks at P = {summary['budget']:,} (mean over seeds) beside the planted ranks",
                            out_dir / "demo_rank_heatmaps.png")]
    return written
