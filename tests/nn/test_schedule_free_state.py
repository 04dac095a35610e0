"""Schedule-free optimizers (schedulefree.AdamWScheduleFree, transformers' optim="schedule_free_*")
keep ``z`` starting at the parameter's value and averaging weights shared by every slot: a rank
change after their first step cannot give changed slots a fresh optimizer's state (zeroing z
pulled a grown slot's Kaiming row towards 0), so it is refused before anything changes."""

import pytest
import torch

from lorambo import LoRAMBoLinear


class ScheduleFreeSGD(torch.optim.Optimizer):
    """Schedule-free SGD (Defazio et al. 2024) keeping state as schedulefree does: the parameter
    holds y, ``z`` starts as a copy of it at the first step, ``weight_sum`` and ``lr_max`` live
    in the param group and weight every slot alike."""

    def __init__(self, params, lr: float, beta: float = 0.9):
        super().__init__(params, dict(lr=lr, beta=beta, k=0, weight_sum=0.0, lr_max=-1.0, train_mode=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["lr_max"] = lr_max = max(group["lr"], group["lr_max"])
            group["weight_sum"] = weight_sum = group["weight_sum"] + lr_max ** 2
            ckp1 = lr_max ** 2 / weight_sum
            for y in group["params"]:
                if y.grad is None:
                    continue
                z = self.state[y].setdefault("z", y.clone())
                y.lerp_(z, ckp1).add_(y.grad, alpha=group["lr"] * (group["beta"] * (1 - ckp1) - 1))
                z.sub_(y.grad, alpha=group["lr"])
            group["k"] += 1


def _stepped_layer():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(6, 5), rank=2, capacity=4, alpha=2.0)
    opt = ScheduleFreeSGD([layer.lora_A, layer.lora_B], lr=0.1)
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    opt.step()
    return layer, opt


@pytest.mark.parametrize("change", ["grow", "shrink", "keep"])
def test_rank_change_after_first_step_is_refused_unchanged(change):
    layer, opt = _stepped_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    z_before = [opt.state[p]["z"].clone() for p in (layer.lora_A, layer.lora_B)]
    with pytest.raises(RuntimeError, match=r"schedule-free.*nothing was changed"):
        if change == "grow":
            layer.set_rank(4, optimizer=opt)
        elif change == "shrink":
            layer.set_rank(1, optimizer=opt)
        else:
            layer.keep_components([1], optimizer=opt)
    assert layer.rank == 2
    for k, v in layer.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for p, z in zip((layer.lora_A, layer.lora_B), z_before):
        torch.testing.assert_close(opt.state[p]["z"], z, rtol=0, atol=0)


def test_rank_change_before_first_step_is_allowed():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(6, 5), rank=2, capacity=4, alpha=2.0)
    opt = ScheduleFreeSGD([layer.lora_A, layer.lora_B], lr=0.1)
    layer.set_rank(3, optimizer=opt)  # no z yet: the first step copies it from the parameter
    assert layer.rank == 3
