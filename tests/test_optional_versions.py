"""An optional package older than pyproject.toml's extras allow is refused by name, with the
version needed, where lorambo first needs it (not as a TypeError inside transformers)."""

import importlib.metadata
import re

import pytest

import lorambo.integrations
import lorambo.optional as optional
from pyproject_data import pyproject


def _pretend_installed(monkeypatch, package, version):
    """``package`` at ``version``, checked again where it was checked (lorambo.integrations binds
    LoRAMBoCallback at its first lookup)."""
    monkeypatch.delitem(vars(lorambo.integrations), "LoRAMBoCallback", raising=False)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == package else real(name))


def test_the_extras_state_the_minimum_versions_lorambo_checks():
    extras = pyproject()["project"]["optional-dependencies"]
    for package, minimum in optional.MINIMUM_VERSIONS.items():
        bound = f"{package}>={'.'.join(map(str, minimum))}"
        assert bound in extras[package]  # the transformers extra also brings accelerate (the Trainer's)
        assert bound in extras["demo"]


@pytest.mark.parametrize("found", ["4.45.0", "4.57.6"])
def test_an_older_transformers_is_refused_naming_the_caller_and_the_version(monkeypatch, found):
    # before: LoRAMBoCallback imported under transformers 4.45, and load_minilm / `lorambo allocate`
    # failed inside it with "BertModel.__init__() got an unexpected keyword argument 'dtype'"
    _pretend_installed(monkeypatch, "transformers", found)
    expected = f"LoRAMBoCallback needs transformers >= 5.0, found transformers {found}: pip install 'transformers>=5.0'"
    with pytest.raises(ImportError, match=re.escape(expected)):
        lorambo.integrations.LoRAMBoCallback
    from lorambo.experiments.minilm import load_minilm

    expected = f"load_minilm needs transformers >= 5.0, found transformers {found}"
    with pytest.raises(ImportError, match=re.escape(expected)):
        load_minilm()


@pytest.mark.parametrize("found", ["5.0", "5.0.0", "5.23.0", "6.1.0.dev0", "5.0.0+local"])
def test_a_recent_enough_transformers_is_taken(monkeypatch, found):
    _pretend_installed(monkeypatch, "transformers", found)
    assert lorambo.integrations.LoRAMBoCallback.__name__ == "LoRAMBoCallback"


@pytest.mark.parametrize("argv", [["demo"], ["demo", "--growth"], ["experiment", "--tasks", "planted"]])
def test_the_commands_refuse_an_older_transformers_before_any_work(monkeypatch, capsys, argv):
    import lorambo.cli.growth
    import lorambo.experiments.runner
    from lorambo.cli import main

    def fail(*a, **k):
        raise AssertionError("the command started work before checking its dependencies")

    monkeypatch.setattr(lorambo.experiments.runner, "run_experiment", fail)
    monkeypatch.setattr(lorambo.cli.growth, "run_growth_demo", fail)
    _pretend_installed(monkeypatch, "transformers", "4.45.0")
    assert main(argv) == 2
    command = " ".join(argv[:2] if argv[1:2] == ["--growth"] else argv[:1])
    assert (f"`lorambo {command}` needs transformers >= 5.0, found transformers 4.45.0: "
            "pip install 'transformers>=5.0'") in capsys.readouterr().err


def test_an_older_peft_is_refused_naming_the_caller(monkeypatch):
    _pretend_installed(monkeypatch, "peft", "0.12.0")
    with pytest.raises(ImportError, match=re.escape(
            "peft_config needs peft >= 0.13, found peft 0.12.0: pip install 'peft>=0.13'")):
        lorambo.peft_config({"layer": 2})


def test_only_packages_with_a_minimum_are_refused_for_their_version(monkeypatch):
    """matplotlib (the demo's plots) has no minimum: any installed release passes the commands' check."""
    import lorambo.cli.deps as deps

    found = {"matplotlib": "0.1", "transformers": "4.45.0"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found.get(name) or real(name))
    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name, *a: object())  # every module is there
    deps.require({"plots"}, "demo")
    with pytest.raises(ImportError, match=re.escape("`lorambo demo` needs transformers >= 5.0, found transformers 4.45.0")):
        deps.require({"plots", "model"}, "demo")


def test_requires_names_the_caller_only_when_the_package_itself_is_missing():
    """A module missing inside an installed package (or one of its dependencies) propagates as is:
    "pip install peft" would not fix it."""
    with pytest.raises(ImportError, match=re.escape("from_peft needs peft, which is not installed: pip install peft")):
        with optional.requires("peft", "from_peft"):
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
    inner = ModuleNotFoundError("No module named 'peft_dependency'", name="peft_dependency")
    with pytest.raises(ModuleNotFoundError) as caught:
        with optional.requires("peft", "from_peft"):
            raise inner
    assert caught.value is inner


def test_a_package_with_a_minimum_that_is_not_installed_gets_the_install_command(monkeypatch):
    """No version to compare: the import's own failure is what names the caller."""
    real = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert optional.check_version("peft", "from_peft") is None
    with pytest.raises(ImportError, match=re.escape("from_peft needs peft, which is not installed: pip install peft")):
        with optional.requires("peft", "from_peft"):
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
