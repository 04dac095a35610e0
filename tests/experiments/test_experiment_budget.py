"""Budget accounting is the same for every method and matches the parameters the model holds."""

import pytest

from lorambo.experiments.config import METHODS
from lorambo.experiments.methods import RunContext, budget_of, compute_sensitivities, spent
from lorambo.experiments.student import PREFIX
from lorambo.experiments.train import train_run

pytestmark = pytest.mark.slow


def test_budget_level_means_uniform_rank(planted_task):
    dims = planted_task.dims
    assert len(dims) == 36
    total = sum(d + k for d, k in dims.values())
    assert total == 6 * (4 * 768 + 2 * 1920)
    assert budget_of(1.0, dims) == total and budget_of(4.0, dims) == 4 * total


def test_budget_too_small_for_any_method(planted_task):
    with pytest.raises(ValueError, match="below the cost of one rank"):
        budget_of(0.01, planted_task.dims)



def test_a_budget_of_one_rank_in_the_cheapest_layer_is_the_smallest():
    dims = {"a": (2, 3), "b": (4, 4)}                                  # one rank costs 5 and 8
    assert budget_of(5 / 13, dims) == 5
    with pytest.raises(ValueError, match=r"gives P = 4 parameters, below the cost of one rank in the cheapest "
                                         r"layer \(5\)"):
        budget_of(4 / 13, dims)


def _assert_no_positive_gain_left_that_fits(run, gains, dims, p):
    """The probe's knapsack hands out only ranks of positive measured gain (its curves end at the
    probe's rank): a 3-step tiny-preset probe measures noise, positive in a few layers or in many
    depending on the stack (the corpus, standard-library docstrings, differs with Python). What
    it leaves unspent must be explained: no layer's next rank has a positive gain and fits."""
    left = p - run["spent"]
    for name, rank in run["ranks"].items():
        curve = gains[PREFIX + name]
        assert not (rank < len(curve) and curve[rank] > 0 and sum(dims[name]) <= left), (name, rank, curve, left)


def test_every_method_spends_at_most_p_counted_from_the_model(planted_task, tiny_cfg):
    """train_run checks, for each method, sum r_i (d_i + k_i) of its final ranks against the LoRA
    parameters its model actually holds (lorambo pools' active slices, peft's lora_A/lora_B, or
    AdaLoRA's unmasked triplets); here every method is run once at the same P."""
    cfg = tiny_cfg
    batches = planted_task.train_batches(0, cfg.steps, cfg.batch_size)
    calib = batches[:cfg.calib_batches]
    sens, _ = compute_sensitivities(planted_task, cfg, 0, calib, METHODS, stream=batches)
    level = 1.0
    p = budget_of(level, planted_task.dims)
    ctx = RunContext(planted_task, cfg, level, p, 0, calib, planted_task.heldout_batches(4), sens)
    budgets = set()
    for method in METHODS:
        run = train_run(ctx, method, 1e-3, batches)
        budgets.add(run["budget"])
        assert run["spent"] == spent(run["ranks"], planted_task.dims) <= p, method
        if method == "probe":
            _assert_no_positive_gain_left_that_fits(run, sens["probe"], planted_task.dims, p)
        else:
            assert run["spent"] >= 0.5 * p, (method, run["spent"])   # nobody wastes half the budget
        assert set(run["ranks"]) == set(planted_task.dims)
    assert budgets == {p}
