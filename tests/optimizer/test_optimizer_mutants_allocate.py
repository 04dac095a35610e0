"""LoRAMBoOptimizer's allocation, pool plan and memory report, checked against computations by
hand from layer shapes, ranks and dtypes (found by mutation testing of lorambo/optimizer.py)."""

import pytest
import torch
from torch import nn

from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class _Conv1DNet(nn.Module):
    """transformers' Conv1D (weight stored [in, out]) 8 -> 16, tanh, 16 -> 8."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.up, self.down = Conv1D(16, 8).double(), Conv1D(8, 16).double()
        for m in (self.up, self.down):
            nn.init.normal_(m.weight)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _conv_mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_data_sensitivity_of_a_conv1d_layer_reads_its_weight_as_out_by_in():
    """E||W x||^2 over the layer's inputs: Conv1D computes x @ weight, so W is weight.T."""
    torch.manual_seed(0)
    model = _Conv1DNet()
    batches = [(torch.randn(10, 8, dtype=DT), torch.randn(10, 8, dtype=DT)) for _ in range(2)]
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="data", target_modules=["up", "down"])
    got = opt.compute_sensitivities(batches, _conv_mse)
    xs = torch.cat([b[0] for b in batches])
    hidden = torch.tanh(model.up(xs)).detach()
    want = {"up": (xs @ model.up.weight.detach()).pow(2).sum(1).mean().item(),
            "down": (hidden @ model.down.weight.detach()).pow(2).sum(1).mean().item()}
    assert got == pytest.approx(want, rel=1e-10)


def _next_pow2(x):
    p = 1
    while p < x:
        p *= 2
    return p


def test_pools_have_room_for_the_total_budget_and_the_report_counts_their_bytes_per_dtype():
    """initial_budget buys the first ranks; the pools are sized for what total_budget could buy
    (online growth spends the rest), and memory_report counts each pool in its layer's dtype."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(16, 24, dtype=torch.float32), "b": nn.Linear(24, 40, dtype=DT),
                           "c": nn.Linear(40, 16, dtype=torch.bfloat16)})
    total, initial = 1600, 250
    opt = LoRAMBoOptimizer(model, total, initial_budget=initial, sensitivity_method="frobenius",
                           allocation="uniform", target_modules=["a", "b", "c"])
    ranks = opt.compute_optimal_ranks()
    shapes = {"a": (24, 16), "b": (40, 24), "c": (16, 40)}  # (out, in)
    costs = {n: d + k for n, (d, k) in shapes.items()}
    assert 0 < sum(r * costs[n] for n, r in ranks.items()) <= initial
    want_caps = {n: max(min(max(_next_pow2(2 * r), 8), min(shapes[n]), total // costs[n]), r)
                 for n, r in ranks.items()}
    assert opt.capacities == want_caps and any(c * costs[n] > initial for n, c in want_caps.items())
    size = {"a": 4, "b": 8, "c": 2}
    report = opt.memory_report
    assert report["per_layer_bytes"] == {n: want_caps[n] * costs[n] * size[n] for n in shapes}
    assert report["total_bytes"] == sum(report["per_layer_bytes"].values())
    assert report["active_params"] == sum(r * costs[n] for n, r in ranks.items())
    assert report["pool_params"] == sum(c * costs[n] for n, c in want_caps.items())
    opt.configure()
    built = {n: m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
             for n, m in opt.layers().items()}
    assert built == report["per_layer_bytes"]


def _frozen_model(frozen):
    """ResidualNet (every target d + k = 20) at rank 2 in pools of 8, ``frozen`` layers' lora_B frozen."""
    import lorambo

    from residual_net import ResidualNet

    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=8)
    for n in frozen:
        lorambo.lora_layers(model)[n].lora_B.requires_grad_(False)
    return model


def test_a_budget_exactly_the_frozen_ranks_plus_min_rank_elsewhere_is_allocated():
    """Frozen blocks.0.up keeps rank 2 (40 parameters); min_rank=1 in the 3 others takes 60: a
    budget of exactly 100 buys that and nothing more."""
    torch.manual_seed(0)
    opt = LoRAMBoOptimizer(_frozen_model(["blocks.0.up"]), 100, sensitivity_method="frobenius",
                           allocation="uniform", min_rank=1)
    ranks = opt.compute_optimal_ranks()
    assert ranks == {"blocks.0.up": 2, "blocks.0.down": 1, "blocks.1.up": 1, "blocks.1.down": 1}
    assert sum(r * opt.costs[n] for n, r in ranks.items()) == 100


@pytest.mark.parametrize("allocation", ["uniform", "closed_form"])
def test_a_model_whose_adapters_are_all_frozen_keeps_every_rank(allocation):
    torch.manual_seed(0)
    names = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    model = _frozen_model(names)
    opt = LoRAMBoOptimizer(model, 400, sensitivity_method="frobenius", allocation=allocation)
    ranks = opt.compute_optimal_ranks()
    assert ranks == dict.fromkeys(names, 2) and opt.capacities == dict.fromkeys(names, 8)


@pytest.mark.parametrize("bound", [{"min_rank": 2}, {"max_rank": 4}])
def test_min_rank_and_max_rank_bound_the_allocation(bound):
    """One layer far more sensitive than the others: closed_form gives it rank min(d, k) = 8 and
    the others 1 or less; min_rank / max_rank bound that, as lorambo.allocate with them does."""
    from residual_net import ResidualNet

    import lorambo

    torch.manual_seed(0)
    model = ResidualNet(width=8, hidden=12)
    sens = {"blocks.0.up": 50.0, "blocks.0.down": 1e-4, "blocks.1.up": 2e-4, "blocks.1.down": 1e-4}
    dims = {f"blocks.{i}.{p}": (12, 8) if p == "up" else (8, 12) for i in (0, 1) for p in ("up", "down")}
    unbounded = LoRAMBoOptimizer(model, 240).compute_optimal_ranks(sensitivities=sens)
    assert unbounded == lorambo.allocate(dims, sens, 240)
    ranks = LoRAMBoOptimizer(model, 240, **bound).compute_optimal_ranks(sensitivities=sens)
    assert ranks == lorambo.allocate(dims, sens, 240, **bound)
    assert min(ranks.values()) >= bound.get("min_rank", 0) and max(ranks.values()) <= bound.get("max_rank", 8)
    assert ranks != unbounded and sum(ranks.values()) * 20 == 240


def test_an_allocation_option_that_is_not_per_layer_passes_through_with_frozen_layers():
    """exact=True (the gain methods' exact optimum) is not a {layer: value} input: it reaches
    lorambo.allocate as is while the frozen layer is left out of the per-layer ones (spectra)."""
    import lorambo

    torch.manual_seed(0)
    model = _frozen_model(["blocks.0.up"])
    opt = LoRAMBoOptimizer(model, 300, sensitivity_method="frobenius", allocation="frobenius_greedy")
    ranks = opt.compute_optimal_ranks(exact=True)
    layers = lorambo.lora_layers(model)
    others = ["blocks.0.down", "blocks.1.up", "blocks.1.down"]
    spectra = {n: torch.linalg.svdvals(layers[n].weight.detach().double()).numpy() for n in others}
    want = lorambo.allocate({n: tuple(layers[n].weight.shape) for n in others}, dict.fromkeys(others, 1.0),
                            300 - 40, method="frobenius_greedy", capacities=dict.fromkeys(others, 8),
                            spectra=spectra, exact=True)
    assert ranks == {**want, "blocks.0.up": 2} and sum(want.values()) > 6


@pytest.mark.parametrize("missing", ["batches", "loss_fn"])
def test_data_weighted_tails_without_batches_or_loss_fn_are_refused_naming_them(missing):
    """frobenius sensitivities need no batches, but the data-weighted tails need input covariances."""
    from residual_net import ResidualNet, mse

    g = torch.Generator().manual_seed(0)
    given = {"batches": [(torch.randn(6, 8, dtype=DT, generator=g), torch.randn(6, 8, dtype=DT, generator=g))],
             "loss_fn": mse}
    given[missing] = None
    opt = LoRAMBoOptimizer(ResidualNet(), 500, sensitivity_method="frobenius", allocation="data_weighted")
    with pytest.raises(ValueError, match=r"allocation='data_weighted' needs batches and loss_fn \(input covariances\)"):
        opt.compute_optimal_ranks(**given)
    assert opt.ranks is None


def _padded_batches():
    """[B, T, 8] inputs whose last 3 positions are pads carrying large values, and a mask callable."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        x = torch.randn(3, 6, 8, dtype=DT, generator=g)
        x[:, 3:] *= 25.0
        batches.append((x, torch.randn(3, 6, 8, dtype=DT, generator=g)))
    return batches


def _real_tokens(batch):
    mask = torch.zeros(batch[0].shape[:2], dtype=torch.bool)
    mask[:, :3] = True
    return mask


def test_the_token_mask_keeps_pads_out_of_the_data_sensitivity_and_the_tails():
    import lorambo
    from lorambo.sensitivity import data_covariance, data_weighted_tail_energy

    from residual_net import ResidualNet, mse

    torch.manual_seed(0)
    model = ResidualNet()
    batches = _padded_batches()
    opt = LoRAMBoOptimizer(model, 400, sensitivity_method="data", token_mask=_real_tokens)
    got = opt.compute_sensitivities(batches, mse)
    xs = torch.cat([b[0][:, :3].reshape(-1, 8) for b in batches])  # the real tokens fed to blocks.0.up
    w = model.blocks[0]["up"].weight.detach()
    assert got["blocks.0.up"] == pytest.approx((xs @ w.T).pow(2).sum(1).mean().item(), rel=1e-10)

    opt = LoRAMBoOptimizer(model, 400, sensitivity_method="frobenius", allocation="data_weighted",
                           token_mask=_real_tokens)
    ranks = opt.compute_optimal_ranks(batches, mse)
    cov = data_covariance(model, mse, batches, modules=opt.names, token_mask=_real_tokens)
    unmasked = data_covariance(model, mse, batches, modules=opt.names, token_mask=None)
    dims = dict(opt.dims)

    def allocation(covs):
        tails = {n: data_weighted_tail_energy(model.get_submodule(n).weight.detach(), covs[n], min(dims[n])).numpy()
                 for n in dims}
        return lorambo.allocate(dims, dict.fromkeys(dims, 1.0), 400, method="data_weighted", tail_energies=tails)

    assert ranks == allocation(cov)
    assert allocation(unmasked) != ranks  # the pads would move rank between layers
