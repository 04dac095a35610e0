"""Shared, expensive objects for the experiment tests: the real MiniLM and the tiny tasks."""

import pytest
import torch

from lorambo.experiments import config as presets


@pytest.fixture(scope="session")
def minilm():
    from lorambo.experiments.minilm import load_minilm

    torch.set_num_threads(1)  # the tiny sizes run faster on one thread (see presets.tiny)
    return load_minilm()


@pytest.fixture(scope="session")
def tiny_cfg():
    return presets.tiny(methods=presets.METHODS)


@pytest.fixture(scope="session")
def planted_task(minilm, tiny_cfg):
    from lorambo.experiments.tasks import PlantedTask

    bert, tok = minilm
    return PlantedTask(bert, tok, tiny_cfg)


@pytest.fixture(scope="session")
def sentiment_task(minilm, tiny_cfg):
    from lorambo.experiments.tasks import SentimentTask

    bert, tok = minilm
    return SentimentTask(bert, tok, tiny_cfg)


@pytest.fixture(scope="session")
def tiny_journal(tmp_path_factory):
    """(config, path of its finished journal): one seed, uniform LoRA's grid of two rates, then
    gradient at uniform's choice, on the planted task (the journal of one tiny experiment)."""
    from lorambo.experiments.runner import run_experiment

    cfg = presets.tiny(methods=("uniform", "gradient")).replace(tasks=("planted",), budgets=(1.0,), seeds=1,
                                                                lr_grid=(1e-3, 1e-2), lr_search="uniform")
    out = tmp_path_factory.mktemp("tiny_journal")
    run_experiment(cfg, out_dir=out, progress=False, echo=lambda *a: None)
    return cfg, out / "runs.jsonl"
