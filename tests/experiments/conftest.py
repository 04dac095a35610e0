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
