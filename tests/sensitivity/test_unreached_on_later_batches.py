"""LoRAMBoOptimizer keeps a target that only a later batch reaches (one task's head, a routed
expert) and drops only those no batch reaches; against float64 gradients taken directly."""

import pytest
import torch
from torch import nn

import lorambo

DT = torch.float64


class TwoTasks(nn.Module):
    """A shared body, one head per task, and a layer no loss uses (as BERT's pooler)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6, dtype=DT)
        self.heads = nn.ModuleList([nn.Linear(6, 3, dtype=DT) for _ in range(2)])
        self.spare = nn.Linear(6, 6, dtype=DT)

    def forward(self, x, task):
        h = torch.tanh(self.body(x))
        self.spare(h)
        return self.heads[task](h)


def mse(model, batch):
    return ((model(batch["x"], batch["task"]) - batch["y"]) ** 2).mean()


def test_a_head_only_the_last_batch_reaches_is_measured_and_an_unused_layer_dropped():
    torch.manual_seed(0)
    model = TwoTasks().requires_grad_(False)  # frozen: a task-0 batch gives heads.1 no graph at all
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(n, 4, generator=g, dtype=DT), "y": torch.randn(n, 3, generator=g, dtype=DT),
                "task": task} for n, task in ((5, 0), (7, 0), (4, 1))]
    names = ["body", "heads.0", "heads.1", "spare"]
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=60, sensitivity_method="gradient", target_modules=names)
    with pytest.warns(RuntimeWarning, match=r"no gradient reaches layer\(s\) \['spare'\]"):
        sens = opt.compute_sensitivities(batches, mse)
    assert opt.names == ["body", "heads.0", "heads.1"]
    reference = dict.fromkeys(opt.names, 0.0)
    for batch in batches:
        weights = [model.get_submodule(n).weight.detach().clone().requires_grad_(True) for n in opt.names]
        params = {f"{n}.weight": w for n, w in zip(opt.names, weights)}
        loss = mse(lambda x, task: torch.func.functional_call(model, params, (x, task)), batch)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for n, grad in zip(opt.names, grads):
            reference[n] += 0.0 if grad is None else float(grad.pow(2).sum()) / len(batches)
    assert reference["heads.1"] > 0
    assert sens == pytest.approx(reference, rel=1e-12)
    assert not any(p.requires_grad for p in model.parameters())  # left as it was
