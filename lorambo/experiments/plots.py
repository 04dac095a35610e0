"""PNG plots of an experiment, drawn from its result dict (matplotlib).

- ``<task>_<metric>_vs_budget.png``: the held-out metric against the budget P (log scale), one
  line per method, error bars = std over seeds.
- ``heatmaps/<task>_<method>.png``: the rank of every adapted layer (rows: the 6 blocks, columns:
  the 6 module types), mean over seeds, one panel per budget, smallest first (the line plot's
  order, whatever the summary's); ``heatmaps/planted_truth.png`` shows
  the planted ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lorambo.adapters.atomic import atomic_save_figure
from lorambo.allocation.report import rank_grid
from lorambo.experiments.config import METHOD_LABELS, TASK_LABELS, seeds_phrase


def new_figure(**kwargs):
    """A matplotlib Figure of its own, outside pyplot: drawing it needs no backend, so the
    process's (a notebook's inline display, say) is left as it is."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def levels_by_budget(per_level: dict) -> list[str]:
    """The budget levels of one method's summary (``{level: entry}``, keys like "0.5"), smallest
    first: the budget grows with the level, and the keys' own order is the run's, not the scale's."""
    return sorted(per_level, key=float)


def metric_vs_budget(task_result: dict, path) -> Path:
    summary, metric = task_result["summary"], task_result["metric"]
    fig = new_figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    markers = "osD^v<>ph*"
    for i, (method, per) in enumerate(summary.items()):
        levels = levels_by_budget(per)
        xs = [per[lv]["budget"] for lv in levels]
        ys = [per[lv]["metric_mean"] for lv in levels]
        es = [per[lv]["metric_std"] for lv in levels]
        style = dict(lw=2.4, color="black") if method == "uniform" else dict(lw=1.3)
        ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], capsize=3,
                    label=METHOD_LABELS[method], **style)
    for name, value in task_result.get("baselines", {}).items():
        ax.axhline(value, ls=":", color="gray", lw=1)
        ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                    va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("LoRA parameter budget P = Σ r_i (d_i + k_i)")
    better = "higher" if task_result["higher_is_better"] else "lower"
    ax.set_ylabel(f"held-out {metric} ({better} is better)")
    ax.set_title(f"{TASK_LABELS[task_result['task']]}\nmean ± std over {seeds_phrase(task_result['seeds'])}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def rank_heatmap(panels: dict[str, dict[str, float]], title: str, path, columns: int = 4) -> Path:
    """``panels``: ``{panel title: {short layer name: rank}}``, drawn with one colour scale,
    ``columns`` panels per row."""
    grids = {t: rank_grid(r) for t, r in panels.items()}
    vmax = max(1.0, max(float(np.nanmax(g[2])) for g in grids.values()))
    ncols = min(columns, len(grids))
    nrows = -(-len(grids) // ncols)
    fig = new_figure(figsize=(0.6 + 3.6 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax in axes.flat[len(grids):]:
        ax.set_visible(False)
    for ax, (t, (rows, cols, grid)) in zip(axes.flat, grids.items()):
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(cols)), [c.replace("attention.", "attn.") for c in cols], rotation=45,
                      ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}".rstrip("0").rstrip("."), ha="center", va="center",
                        color="w" if v < 0.6 * vmax else "k", fontsize=6)
        ax.set_title(t, fontsize=8)
    fig.subplots_adjust(wspace=0.45, hspace=0.6)
    fig.colorbar(image, ax=list(axes.flat), label="rank (mean over seeds)", shrink=0.9)
    fig.suptitle(title, fontsize=9)
    return atomic_save_figure(fig, path, dpi=100, bbox_inches="tight")


def all_plots(result: dict, out_dir) -> list[str]:
    """Every PNG of the experiment; returns their paths relative to ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    for task, tr in result["tasks"].items():
        if len(tr["budgets"]) > 1:  # one budget: the line plot would be a column of dots
            written.append(metric_vs_budget(tr, out_dir / f"{task}_{tr['metric']}_vs_budget.png"))
        for method, per in tr["summary"].items():
            panels = {f"level {float(lv):g}, P={per[lv]['budget']:,}": per[lv]["mean_ranks"]
                      for lv in levels_by_budget(per)}
            written.append(rank_heatmap(panels, f"{TASK_LABELS[task]}: {METHOD_LABELS[method]}",
                                        out_dir / "heatmaps" / f"{task}_{method}.png"))
        if task == "planted":
            truth = {n: float(tr["describe"]["planted_ranks"].get(n, 0)) for n in tr["dims"]}
            written.append(rank_heatmap({"planted ranks": truth}, "planted low-rank deltas (ground truth)",
                                        out_dir / "heatmaps" / "planted_truth.png"))
    return [str(Path(p).relative_to(out_dir)) for p in written]
