"""What the experiment's PNGs show, read from the matplotlib Figure each one is saved from: the
series, error bars, labels and colour scale come from the result dict, and each file is written
through ``atomic_save_figure`` (temporary name, then rename)."""

import random

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from lorambo.experiments import plots  # noqa: E402
from lorambo.experiments.config import METHOD_LABELS, TASK_LABELS  # noqa: E402

BLOCKS = [f"layer.{b}" for b in range(2)]
KINDS = ["attention.self.query", "attention.self.value", "intermediate.dense"]
NAMES = [f"{b}.{k}" for b in BLOCKS for k in KINDS]


@pytest.fixture
def saved(monkeypatch):
    """Every (figure, path, savefig options) handed to atomic_save_figure, which still writes."""
    real, calls = plots.atomic_save_figure, []

    def save(fig, path, **kwargs):
        calls.append((fig, path, kwargs))
        return real(fig, path, **kwargs)

    monkeypatch.setattr(plots, "atomic_save_figure", save)
    return calls


def _entry(rng, budget):
    return {"budget": budget, "metric_mean": rng.uniform(0.1, 0.9), "metric_std": rng.uniform(0.01, 0.05),
            "mean_ranks": {n: rng.choice([0.0, 1.0, 2.5, 4.0]) for n in NAMES}}


def _task_result(rng, levels=("2.0", "10.0", "0.5"), higher_is_better=False, task="planted"):
    """Budget levels out of order, and "10.0" sorts before "2.0" as a string: the plot must sort
    them by value."""
    methods = ("uniform", "gradient", "probe")
    budgets = {lv: int(float(lv) * 1000) for lv in levels}
    return {"task": task, "metric": "rel_loss", "higher_is_better": higher_is_better, "seeds": 3,
            "budgets": budgets, "dims": {n: (4, 4) for n in NAMES},
            "describe": {"planted_ranks": {NAMES[1]: 2, NAMES[5]: 3}},
            "baselines": {"pretrained": 0.95, "half": 0.4},
            "summary": {m: {lv: _entry(rng, budgets[lv]) for lv in levels} for m in methods}}


def _errorbars(ax):
    out = {}
    for container in ax.containers:
        line, _, (bars,) = container
        segments = bars.get_segments()
        out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()),
                                      [float(seg[1][1] - seg[0][1]) / 2 for seg in segments], line)
    return out


@pytest.mark.parametrize("higher_is_better, word", [(False, "lower"), (True, "higher")])
def test_metric_vs_budget_draws_each_method_sorted_by_budget_with_std_bars(tmp_path, saved, higher_is_better, word):
    rng = random.Random(7)
    tr = _task_result(rng, higher_is_better=higher_is_better)
    path = tmp_path / "planted_rel_loss_vs_budget.png"
    assert plots.metric_vs_budget(tr, path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == [path.name]
    (fig, to, _), = saved
    assert to == path
    ax, = fig.axes
    bars = _errorbars(ax)
    assert set(bars) == {METHOD_LABELS[m] for m in tr["summary"]}
    for method, per in tr["summary"].items():
        xs, ys, es, line = bars[METHOD_LABELS[method]]
        order = ["0.5", "2.0", "10.0"]
        assert xs == [per[lv]["budget"] for lv in order] == [500, 2000, 10000]
        assert ys == pytest.approx([per[lv]["metric_mean"] for lv in order])
        assert es == pytest.approx([per[lv]["metric_std"] for lv in order])
        assert (line.get_color() == "black") == (method == "uniform")      # the reference stands out
    assert ax.get_xscale() == "log"
    assert sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == ":") == [0.4, 0.95]
    assert {t.get_text() for t in ax.texts} == {"pretrained", "half"}
    assert ax.get_ylabel() == f"held-out rel_loss ({word} is better)"
    assert "P = Σ r_i (d_i + k_i)" in ax.get_xlabel()
    assert ax.get_title() == f"{TASK_LABELS['planted']}\nmean ± std over 3 seeds"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [METHOD_LABELS[m] for m in tr["summary"]]


def _images(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def test_rank_heatmap_shows_every_panel_on_one_colour_scale(tmp_path, saved):
    rng = random.Random(3)
    first = {n: float(rng.randint(0, 6)) for n in NAMES}
    second = {n: float(rng.randint(0, 3)) for n in NAMES if n != NAMES[4]}   # one layer absent: blank
    second[NAMES[0]] = 7.5
    panels = {"first": first, "second": second, "third": dict(first)}
    path = tmp_path / "heatmaps" / "x.png"
    assert plots.rank_heatmap(panels, "the title", path, columns=2) == path
    assert path.read_bytes()[:4] == b"\x89PNG"
    (fig, to, _), = saved
    assert to == path
    axes = _images(fig)
    assert [ax.get_title() for ax in axes] == list(panels)
    assert sum(ax.get_visible() for ax in fig.axes if not ax.images) == 1    # the colour bar; a 4th cell hidden
    vmax = max(max(first.values()), 7.5)
    for ax, ranks in zip(axes, panels.values()):
        image, = ax.images
        data = image.get_array()
        assert data.shape == (len(BLOCKS), len(KINDS))
        for n in NAMES:
            i, j = BLOCKS.index(".".join(n.split(".")[:2])), KINDS.index(".".join(n.split(".")[2:]))
            assert (data.mask[i, j] if n not in ranks else data[i, j] == ranks[n]), n
        assert image.get_clim() == (0, vmax)
        assert [t.get_text() for t in ax.get_yticklabels()] == BLOCKS
        assert [t.get_text() for t in ax.get_xticklabels()] == ["attn.self.query", "attn.self.value",
                                                                 "intermediate.dense"]
        texts = {t.get_text() for t in ax.texts}
        assert texts == {f"{v:.1f}".rstrip("0").rstrip(".") for v in ranks.values()}
    assert fig.axes[-1].get_ylabel() == "rank (mean over seeds)"
    assert fig._suptitle.get_text() == "the title"
    rows = {round(ax.get_position().y0, 3) for ax in axes}
    assert len(rows) == 2                                                     # 3 panels, 2 per row


def test_rank_heatmap_with_fewer_panels_than_columns_draws_them_in_one_row(tmp_path, saved):
    """3 panels, 4 columns allowed: one row of 3, left to right in the panels' order (a grid
    of 3 rows x 1 column would be drawn into a figure sized for one row)."""
    rng = random.Random(5)
    panels = {t: {n: float(rng.randint(0, 5)) for n in NAMES} for t in ("level 0.5", "level 1", "level 2")}
    plots.rank_heatmap(panels, "t", tmp_path / "row.png")
    (fig, _, _), = saved
    axes = _images(fig)
    assert [ax.get_title() for ax in axes] == list(panels)
    assert len(fig.axes) == len(panels) + 1                                  # no hidden cell; the colour bar
    assert len({round(ax.get_position().y0, 3) for ax in axes}) == 1
    lefts = [ax.get_position().x0 for ax in axes]
    assert lefts == sorted(lefts) and len(set(lefts)) == len(panels)


def test_rank_heatmap_of_all_zero_ranks_keeps_a_unit_scale(tmp_path, saved):
    plots.rank_heatmap({"p": dict.fromkeys(NAMES, 0.0)}, "t", tmp_path / "z.png")
    (fig, _, _), = saved
    ax, = _images(fig)
    assert ax.images[0].get_clim() == (0, 1.0)


def test_all_plots_writes_a_line_plot_per_task_with_budgets_and_a_heatmap_per_method(tmp_path, saved):
    rng = random.Random(11)
    result = {"tasks": {"planted": _task_result(rng),
                        "sentiment": _task_result(rng, levels=("1.0",), higher_is_better=True, task="sentiment")}}
    written = plots.all_plots(result, str(tmp_path))          # a str folder, as the CLI gives
    assert written == ["planted_rel_loss_vs_budget.png", "heatmaps/planted_uniform.png",
                       "heatmaps/planted_gradient.png", "heatmaps/planted_probe.png", "heatmaps/planted_truth.png",
                       "heatmaps/sentiment_uniform.png", "heatmaps/sentiment_gradient.png",
                       "heatmaps/sentiment_probe.png"]
    assert all((tmp_path / p).is_file() for p in written)
    figures = {str(path.relative_to(tmp_path)): fig for fig, path, _ in saved}
    per = result["tasks"]["planted"]["summary"]["gradient"]
    shown = {ax.get_title(): list(ax.images[0].get_array().ravel())
             for ax in _images(figures["heatmaps/planted_gradient.png"])}
    assert shown == {f"level {float(lv):g}, P={int(float(lv) * 1000):,}": [per[lv]["mean_ranks"][n] for n in NAMES]
                     for lv in ("2.0", "10.0", "0.5")}
    assert "level 10, P=10,000" in shown                                    # one panel per budget
    # smallest budget first, the line plot's order, not the summary's ("2.0", "10.0", "0.5")
    assert list(shown) == ["level 0.5, P=500", "level 2, P=2,000", "level 10, P=10,000"]
    assert figures["heatmaps/planted_gradient.png"]._suptitle.get_text() == (
        f"{TASK_LABELS['planted']}: {METHOD_LABELS['gradient']}")
    truth, = _images(figures["heatmaps/planted_truth.png"])
    expected = np.zeros(len(NAMES))
    expected[1], expected[5] = 2, 3                                   # unplanted layers show rank 0
    assert list(truth.images[0].get_array().ravel()) == list(expected)
