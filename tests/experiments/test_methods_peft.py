"""peft's AdaLoRA and EVA as experiment methods (lorambo/experiments/methods_peft.py)."""

import pytest

from lorambo.experiments.methods import RunContext, budget_of
from lorambo.experiments.registry import make_method

pytestmark = pytest.mark.slow


def test_adalora_asked_for_ranks_before_its_final_allocation_says_so(planted_task, tiny_cfg):
    """Before peft's final masking step AdaLoRA has no rank pattern: that is an error naming the
    cause, not an AttributeError from inside peft's config."""
    pytest.importorskip("peft")
    ctx = RunContext(planted_task, tiny_cfg, 1.0, budget_of(1.0, planted_task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    run.setup(planted_task.fresh_student(0))
    with pytest.raises(RuntimeError, match="AdaLoRA never reached its final allocation step"):
        run.final_ranks()
