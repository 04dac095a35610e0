"""Loading MiniLM prints no progress bar of transformers' own and leaves its switch as it was."""

import pytest
from transformers.utils import logging

from lorambo.experiments.minilm import load_minilm


@pytest.mark.parametrize("enabled_before", [True, False])
def test_load_prints_no_bar_and_restores_the_switch(enabled_before, capfd):
    (logging.enable_progress_bar if enabled_before else logging.disable_progress_bar)()
    try:
        model, _ = load_minilm()
        err = capfd.readouterr().err
        assert "Loading weights" not in err, err
        assert logging.is_progress_bar_enabled() is enabled_before
        assert sum(p.numel() for p in model.parameters()) > 20_000_000  # the real 22M model loaded
    finally:
        logging.enable_progress_bar()
