"""Bad input to LoRAMBoOptimizer: each error names the layer and the value."""

import math

import pytest
import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer


def _model():
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def test_budget_below_one_rank_of_the_cheapest_layer():
    with pytest.raises(ValueError, match=r"below the cost of one rank in the cheapest layer '2' \(d \+ k = 14\)"):
        LoRAMBoOptimizer(_model(), 13)


def test_min_rank_above_max_rank():
    with pytest.raises(ValueError, match="min_rank=3 > max_rank=2"):
        LoRAMBoOptimizer(_model(), 1000, min_rank=3, max_rank=2)


@pytest.mark.parametrize("bad", [-0.5, math.nan])
def test_negative_or_nan_sensitivity(bad):
    opt = LoRAMBoOptimizer(_model(), 1000)
    with pytest.raises(ValueError, match=rf"sensitivity for layer '2' is {bad!r}"):
        opt.compute_optimal_ranks(sensitivities={"0": 1.0, "2": bad})


def test_unknown_and_missing_sensitivities():
    opt = LoRAMBoOptimizer(_model(), 1000)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['9'\]"):
        opt.compute_optimal_ranks(sensitivities={"0": 1.0, "2": 1.0, "9": 1.0})
    with pytest.raises(ValueError, match=r"missing for layer\(s\) \['2'\]"):
        opt.compute_optimal_ranks(sensitivities={"0": 1.0})


def test_capacity_too_small_for_the_requested_rank():
    with pytest.raises(ValueError, match="capacity 1 of layer '2' is too small for the requested rank min_rank=2"):
        LoRAMBoOptimizer(_model(), 1000, capacity={"0": 4, "2": 1}, min_rank=2)
    opt = LoRAMBoOptimizer(_model(), 1000, capacity={"0": 2}, sensitivity_method="gradient")
    opt.user_capacity.pop("0")  # an allocation made elsewhere asks for more than the pool holds
    opt.user_capacity["0"] = 2
    with pytest.raises(ValueError, match="capacity 2 of layer '0' is too small for the requested rank 5"):
        opt.plan_capacities({"0": 5, "2": 1})
    configured = lorambo.configure_model(_model(), 1, capacity=2)
    with pytest.raises(ValueError, match="capacity 2 of layer '0' is too small.*min_rank=3"):
        LoRAMBoOptimizer(configured, 1000, min_rank=3)


def test_unknown_method_and_nan_estimates():
    with pytest.raises(ValueError, match="sensitivity_method='fisher'"):
        LoRAMBoOptimizer(_model(), 1000, sensitivity_method="fisher")
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="gradient")
    batch = (torch.full((3, 6), math.nan), torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"gradient_sensitivity: the loss on batch 0 is nan"):
        opt.compute_optimal_ranks([batch], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="data")
    with pytest.raises(ValueError, match=r"data_covariance: the inputs fed to layer\(s\) \['0', '2'\] contain NaN"):
        opt.compute_optimal_ranks([batch], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())


def test_ablation_needs_adapters():
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="ablation")
    with pytest.raises(ValueError, match="has no LoRAMBoLinear layer"):
        opt.compute_sensitivities([(torch.randn(2, 6), None)], lambda m, b: m(b[0]).sum())


def test_initial_budget_checks():
    with pytest.raises(ValueError, match=r"initial_budget=5 is below the cost of one rank in the cheapest layer '2'"):
        LoRAMBoOptimizer(_model(), 1000, initial_budget=5)
    with pytest.raises(ValueError, match="initial_budget=2000 exceeds total_budget=1000"):
        LoRAMBoOptimizer(_model(), 1000, initial_budget=2000)


def test_alora_settings_without_alora_allocation_are_refused():
    """The config used to be kept and never used: the rounds run only with allocation='alora'."""
    from lorambo.allocation.alora import ALoRAConfig

    with pytest.raises(ValueError, match=r"alora=.*allocation='closed_form'.*only with allocation='alora'"):
        LoRAMBoOptimizer(nn.Linear(4, 4), 100, alora=ALoRAConfig(rounds=2))


def test_make_optimizer_before_configure_is_refused():
    torch.manual_seed(0)
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="frobenius")
    with pytest.raises(RuntimeError, match=r"make_optimizer: Sequential has no LoRAMBoLinear layers yet.*call "
                                           r"configure\(\) \(after compute_optimal_ranks\) first"):
        opt.make_optimizer(lr=1e-3)
    opt.compute_optimal_ranks()
    model = opt.configure()
    held = [p for group in opt.make_optimizer(lr=1e-3).param_groups for p in group["params"]]
    pools = [p for layer in lorambo.lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    assert [id(p) for p in held] == [id(p) for p in pools]


@pytest.mark.parametrize("call", ["capture", "begin_step", "step", "is_decision_step"])
@pytest.mark.parametrize("bad, error, message", [
    ({"input_ids": [1]}, TypeError, r"step must be the training step, an int >= 0, got dict"),  # capture(batch)
    (None, TypeError, r"step must be the training step, an int >= 0, got NoneType None"),
    (2.0, TypeError, r"step must be the training step, an int >= 0, got float 2.0"),
    (-2, ValueError, r"step must be an int >= 0, got -2")])
def test_a_step_that_is_not_a_step_counter(call, bad, error, message):
    # before: a batch or None failed inside the schedule ("'<' not supported between 'dict' and
    # 'int'"), and 2.0 or -2 were taken (-2 as a step that never decides)
    torch.manual_seed(0)
    model = lorambo.configure_model(_model(), 2)
    opt = LoRAMBoOptimizer(model, 1000, interval=2)
    run = {"capture": lambda s: opt.capture(s).__enter__(), "begin_step": opt.begin_step, "step": opt.step,
           "is_decision_step": opt.is_decision_step}[call]
    with pytest.raises(error, match=rf"LoRAMBoOptimizer.{call}: " + message):
        run(bad)
    assert opt.is_decision_step(2) and not opt.is_decision_step(3)


@pytest.mark.parametrize("call", ["step", "update_ranks"])
@pytest.mark.parametrize("argument, message", [
    ("optimizer", r"optimizer must be a torch optimizer.*got StepLR"),
    ("grad_scaler", r"grad_scaler=<torch.optim.lr_scheduler.StepLR.*must be a torch.amp.GradScaler or None")])
def test_an_optimizer_or_scaler_of_the_wrong_kind_is_refused_at_once(call, argument, message):
    # before: step() took it at every step that decides nothing, and the first decision step (at
    # the end of the warmup, hours in) raised naming update_ranks or nothing; update_ranks said
    # first that nothing was captured
    torch.manual_seed(0)
    model = lorambo.configure_model(_model(), 2, capacity=4)
    opt = LoRAMBoOptimizer(model, 1000, interval=2, warmup_steps=10)
    scheduler = torch.optim.lr_scheduler.StepLR(opt.make_optimizer(lr=1e-3), step_size=1)
    kwargs = {argument: scheduler}
    run = {"step": lambda: opt.step(1, **kwargs), "update_ranks": lambda: opt.update_ranks(**kwargs)}[call]
    with pytest.raises(TypeError, match=rf"^LoRAMBoOptimizer.{call}: {message}"):
        run()
    assert {n: layer.rank for n, layer in lorambo.lora_layers(model).items()} == {"0": 2, "2": 2}


@pytest.mark.parametrize("call", ["step", "update_ranks"])
def test_component_scores_without_rank_moves_are_refused(call):
    # before: without move_threshold the scores were dropped without a word, so a loop that
    # computed them every step (for moves it never got) trained on as if moves were made
    torch.manual_seed(0)
    model = lorambo.configure_model(_model(), 2, capacity=4)
    opt = LoRAMBoOptimizer(model, 1000, interval=2, warmup_steps=10)
    scores = {n: torch.rand(layer.rank) for n, layer in lorambo.lora_layers(model).items()}
    run = {"step": lambda: opt.step(1, component_scores=scores),
           "update_ranks": lambda: opt.update_ranks(component_scores=scores)}[call]
    with pytest.raises(ValueError, match=rf"^LoRAMBoOptimizer.{call}: component_scores were given, but "
                                         r"move_threshold is None.*move_threshold=\.\.\."):
        run()
    assert {n: layer.rank for n, layer in lorambo.lora_layers(model).items()} == {"0": 2, "2": 2}


@pytest.mark.parametrize("given, missing", [({}, "heldout_batches and loss_fn"),
                                            ({"heldout_batches": "batches"}, "loss_fn"),
                                            ({"loss_fn": nn.functional.mse_loss}, "heldout_batches")])
def test_rank_moves_without_scores_name_the_allocator_and_what_is_missing(given, missing):
    """Found at the first decision step, maybe hours in: the message named neither the allocator
    nor which of heldout_batches / loss_fn was left out. Nothing changes, and the step's capture
    stays, so the step can be decided again with component_scores."""
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(5, 6), torch.randn(5, 4)
    given = {k: [(x, y)] if v == "batches" else v for k, v in given.items()}
    opt = LoRAMBoOptimizer(model, 200, initial_budget=100, sensitivity_method="frobenius", warmup_steps=0,
                           interval=1, move_threshold=0.5, **given)
    opt.compute_optimal_ranks()
    opt.configure()
    ranks = opt.current_ranks()
    with opt.capture(0, x):
        nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=rf"^LoRAMBoOptimizer: move_threshold=0.5 makes rank moves.*component_scores="
                                         rf".*\(missing: {missing}\)"):
        opt.step(0)
    assert opt.current_ranks() == ranks
    scores = {n: torch.rand(layer.rank) for n, layer in opt.layers().items()}
    assert opt.step(0, component_scores=scores)  # the retry decides (grows) from the kept capture


def test_component_scores_given_to_alora_are_refused():
    """ALoRA scores its layers by held-out ablation; scores passed to its step() went unread."""
    from lorambo.allocation.alora import ALoRAConfig

    torch.manual_seed(0)
    model = _model()
    batches = [(torch.randn(5, 6), torch.randn(5, 4))]
    opt = LoRAMBoOptimizer(model, 200, allocation="alora", loss_fn=nn.functional.mse_loss, heldout_batches=batches,
                           alora=ALoRAConfig(k1=0, k2=3, rounds=2, n_prune=1))
    opt.compute_optimal_ranks()
    opt.configure()
    ranks = opt.current_ranks()
    scores = {n: torch.rand(layer.rank) for n, layer in lorambo.lora_layers(model).items()}
    with pytest.raises(ValueError, match=r"^LoRAMBoOptimizer.step: component_scores were given, but "
                                         r"allocation='alora' scores its layers by held-out ablation"):
        opt.step(0, component_scores=scores)
    assert opt.current_ranks() == ranks and opt.alora_schedule().rounds_done == 0


def test_update_ranks_of_an_alora_allocator_says_alora_grows_nothing_online():
    """ALoRA captures nothing, so update_ranks after ``with opt.capture(0)`` blamed the capture:
    "no activations were captured: run its forward and backward inside opt.capture(step)"."""
    from lorambo.allocation.alora import ALoRAConfig

    torch.manual_seed(0)
    model = _model()
    batch = (torch.randn(5, 6), torch.randn(5, 4))
    opt = LoRAMBoOptimizer(model, 200, allocation="alora", loss_fn=nn.functional.mse_loss, heldout_batches=[batch],
                           alora=ALoRAConfig(k1=0, k2=3, rounds=2, n_prune=1))
    opt.compute_optimal_ranks()
    opt.configure()
    ranks = opt.current_ranks()
    with opt.capture(0):
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    with pytest.raises(RuntimeError, match=r"^LoRAMBoOptimizer.update_ranks grows ranks by online growth, but "
                                           r"allocation='alora' changes ranks in ALoRA rounds only"):
        opt.update_ranks(opt.make_optimizer())
    assert opt.current_ranks() == ranks


def test_ablation_of_untrained_adapters_says_so():
    # before: "closed_form: all sensitivities are zero ...", not saying why
    torch.manual_seed(0)
    model = lorambo.configure_model(_model(), 2)
    opt = LoRAMBoOptimizer(model, 1000, sensitivity_method="ablation")
    batches, loss_fn = [torch.randn(5, 6)], lambda m, x: m(x).pow(2).mean()
    with pytest.raises(ValueError, match=r"sensitivity_method='ablation': the adapters of \['0', '2'\] are untrained "
                                         r"\(B A = 0\).*train them first"):
        opt.compute_optimal_ranks(batches, loss_fn)
    with torch.no_grad():
        model[0].lora_B[:, :2].normal_()  # one trained layer: scores exist, the other's are exactly 0
    sens = opt.compute_sensitivities(batches, loss_fn)
    assert sens["2"] == 0.0 and set(sens) == {"0", "2"}


@pytest.mark.parametrize("alpha", [0, "16", math.nan, True])
def test_a_bad_alpha_is_refused_before_anything_is_measured(alpha):
    # before: taken, and refused by configure() only, after compute_optimal_ranks had run
    with pytest.raises(ValueError, match=rf"LoRAMBoOptimizer: alpha={alpha!r} must be a finite nonzero number"):
        LoRAMBoOptimizer(_model(), 1000, alpha=alpha)


def test_an_alpha_or_budget_beyond_the_float_range_is_refused_naming_it():
    # before: OverflowError "int too large to convert to float"
    with pytest.raises(ValueError, match=r"LoRAMBoOptimizer: alpha=10000000\.\.\. \(a number of 401 digits\) "
                                         r"must be a finite nonzero number"):
        LoRAMBoOptimizer(_model(), 1000, alpha=10**400)
    with pytest.raises(ValueError, match=r"total_budget=10000000\.\.\. \(a number of 401 digits\) must be a "
                                         r"finite number"):
        LoRAMBoOptimizer(_model(), 10**400)


@pytest.mark.parametrize("growth_factor", [math.inf, 0.5, math.nan, "2", True])
def test_a_bad_growth_factor_is_refused_before_anything_is_measured(growth_factor):
    # inf passed the ">= 1" check and overflowed in the capacity rounding after the measurement
    model = _model()
    with pytest.raises(ValueError, match=rf"LoRAMBoOptimizer: growth_factor={growth_factor!r} must be a finite "
                                         "number >= 1"):
        LoRAMBoOptimizer(model, 1000, sensitivity_method="frobenius", growth_factor=growth_factor)
    assert isinstance(model[0], nn.Linear)


def test_default_capacity_refuses_an_infinite_growth_factor_naming_it():
    with pytest.raises(ValueError, match="default_capacity: growth_factor=inf must be a finite number >= 1"):
        lorambo.nn.default_capacity(4, 64, 64, growth_factor=math.inf)
    assert lorambo.nn.default_capacity(4, 64, 64, growth_factor=3.0) == 16  # ceil(12) -> next power of two


def test_knapsack_without_gain_curves_says_where_they_go():
    """allocation='knapsack' measures nothing: the error names compute_optimal_ranks' benefits=
    (not only allocate's), and with the curves the same call allocates within the budget."""
    opt = LoRAMBoOptimizer(_model(), 1000, allocation="knapsack", target_modules=["0", "2"])
    with pytest.raises(ValueError, match=r"allocation='knapsack'.*compute_optimal_ranks\(\.\.\., benefits="):
        opt.compute_optimal_ranks()
    gains = {"0": [4.0, 3.0, 2.0, 1.0], "2": [8.0, 1.0, 0.5, 0.25]}
    ranks = opt.compute_optimal_ranks(benefits=gains)
    assert sum(r * (6 + 10 if n == "0" else 10 + 4) for n, r in ranks.items()) <= 1000
    assert ranks == lorambo.allocate(opt.dims, None, 1000, method="knapsack", benefits=gains,
                                     capacities=None)


@pytest.mark.parametrize("allocation", ["uniform", "alora", "knapsack"])
def test_sensitivities_given_to_an_allocation_that_ignores_them_are_refused(allocation):
    """uniform (alora's start) and the knapsack read no sensitivities: ranks that pass every budget
    check while ignoring the given ones would hide that the caller meant another allocation."""
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="frobenius", allocation=allocation)
    gains = {"benefits": {"0": [4.0, 3.0], "2": [8.0, 1.0]}} if allocation == "knapsack" else {}
    with pytest.raises(ValueError, match=rf"LoRAMBoOptimizer\(allocation='{allocation}'\)\.compute_optimal_ranks: "
                                         r"sensitivities= is given, but .* does not read sensitivities"):
        opt.compute_optimal_ranks(sensitivities={"0": 1.0, "2": 100.0}, **gains)
    assert opt.ranks is None
    opt.compute_optimal_ranks(**gains)  # without them the same optimizer allocates
    assert sum(r * (16 if n == "0" else 14) for n, r in opt.ranks.items()) <= 1000


@pytest.mark.parametrize("allocation, curve", [("uniform", "benefits"), ("alora", "spectra"),
                                               ("closed_form", "tail_energies"), ("knapsack", "spectra")])
def test_a_gain_curve_the_allocation_does_not_read_is_refused(allocation, curve):
    opt = LoRAMBoOptimizer(_model(), 1000, sensitivity_method="frobenius", allocation=allocation)
    needed = {"benefits": {"0": [4.0, 3.0], "2": [8.0, 1.0]}} if allocation == "knapsack" else {}
    sens = {"sensitivities": {"0": 1.0, "2": 2.0}} if allocation == "closed_form" else {}
    with pytest.raises(ValueError, match=rf"allocation='{allocation}'\)\.compute_optimal_ranks: {curve}= is read "
                                         rf"only by allocation='\w+', and allocation='{allocation}' would ignore it"):
        opt.compute_optimal_ranks(**sens, **needed, **{curve: {"0": [3.0, 1.0], "2": [2.0, 1.0, 0.5]}})
    assert opt.ranks is None


def test_sensitivities_that_overflow_are_refused_naming_the_layer():
    # a finite loss whose gradients square past float64 (loss * 1e200): every Fisher-style sum is
    # inf; compute_sensitivities names the layer and keeps no sensitivities
    from residual_net import ResidualNet, mse

    torch.manual_seed(0)
    opt = LoRAMBoOptimizer(ResidualNet(), 500, sensitivity_method="gradient")
    data = [(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))]
    with pytest.raises(ValueError, match=r"gradient sensitivity of layer 'blocks.0.up' is inf \(not finite\)"):
        opt.compute_sensitivities(data, lambda model, batch: mse(model, batch) * 1e200)
    assert opt.sensitivities is None


def test_compute_optimal_ranks_refuses_a_progress_string_even_with_sensitivities_given():
    # with sensitivities given no pass runs, so only the method's own check sees progress="no"
    from residual_net import ResidualNet

    opt = LoRAMBoOptimizer(ResidualNet(), 500)
    sens = dict.fromkeys(opt.names, 1.0)
    with pytest.raises(TypeError, match=r"compute_optimal_ranks: progress must be True, False or None, got 'no'"):
        opt.compute_optimal_ranks(sensitivities=sens, progress="no")
    assert opt.ranks is None
