"""LoRAMBoOptimizer.load_state_dict forgets what the interrupted attempt left behind (found by
mutation testing of lorambo/optimizer.py)."""

import pytest
import torch

from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 8, generator=g, dtype=DT), torch.randn(12, 8, generator=g, dtype=DT)) for _ in range(n)]


DATA = _data(8)


def _started():
    """Decision steps 2, 5, 8, ...; trained through step 2 (its decision taken)."""
    torch.manual_seed(0)
    model = ResidualNet()
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="gradient", initial_budget=300, warmup_steps=2,
                           interval=3, sketch_rank=1)
    opt.compute_optimal_ranks(DATA[:2], mse)
    opt.configure()
    torch_opt = opt.make_optimizer(lr=2e-2)
    for step in range(3):
        with opt.capture(step):
            mse(model, DATA[step]).backward()
        opt.step(step)
        torch_opt.step()
        torch_opt.zero_grad()
    return model, opt


def test_activations_captured_before_a_resume_feed_no_decision_after_it():
    """A decision step's capture, then a resume from the state saved before it: the captured
    activations belong to the abandoned attempt, so step 5 has nothing to decide from."""
    model, opt = _started()
    state = opt.state_dict()
    ranks = opt.current_ranks()
    with opt.capture(5):
        mse(model, DATA[5]).backward()
    opt.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="step 5 is a rank decision step but no activations were captured"):
        assert opt.step(5) == []
    assert opt.current_ranks() == ranks and opt.decisions == state["decisions"]


# the model's ranks go back before the AdamW state saved with them is loaded (by load_state_dict)
@pytest.mark.filterwarnings("ignore:LoRAMBoLinear .* rank changed .* by load_state_dict without its optimizer")
def test_a_step_decided_before_a_resume_is_decided_again_after_it():
    """The run that is resumed never took step 5's decision: its retry takes it."""
    model, opt = _started()
    state, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    with opt.capture(5):
        mse(model, DATA[5]).backward()
    assert opt.step(5)  # it grew
    model.load_state_dict(weights)
    opt.load_state_dict(state)
    with opt.capture(5):
        mse(model, DATA[5]).backward()
    assert opt.step(5)
