"""lorambo.optim.AdamW refuses a bad lr, betas, eps or weight_decay (as defaults, in a group given
to the constructor, or through add_param_group) with a ValueError naming the class, the argument
and the value; valid values, tensors included, train exactly as torch.optim.AdamW does."""

import pytest
import torch
from torch import nn

import lorambo

DT = torch.float64
NAN, INF = float("nan"), float("inf")

BAD = [
    ({"lr": NAN}, r"lr=nan must be a finite number >= 0"),
    ({"lr": -1e-3}, r"lr=-0\.001 must be a finite number >= 0"),
    ({"lr": INF}, r"lr=inf must be"),
    ({"lr": torch.tensor(NAN)}, r"lr=tensor\(nan\) must be"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, r"lr=a tensor of shape \[2\] must be"),
    ({"lr": torch.tensor([])}, r"lr=a tensor of shape \[0\] must be"),  # no value to take
    ({"lr": torch.tensor(True)}, r"lr=tensor\(True\) must be"),  # a flag, not the rate 1.0
    ({"betas": (torch.tensor(False), 0.999)}, r"betas\[0\]=tensor\(False\) must be"),
    ({"eps": -1e-8}, r"eps=-1e-08 must be a finite number >= 0"),
    ({"eps": NAN}, r"eps=nan must be"),
    ({"weight_decay": NAN}, r"weight_decay=nan must be a finite number >= 0"),
    ({"weight_decay": -0.1}, r"weight_decay=-0\.1 must be"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]=1\.0 must be a finite number in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]=-0\.1 must be"),
    ({"betas": (0.9, NAN)}, r"betas\[1\]=nan must be"),
    ({"betas": (0.9,)}, r"betas=\(0\.9,\) must be a pair"),
]


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(3, 4, generator=g, dtype=DT)), nn.Parameter(torch.randn(4, generator=g, dtype=DT))]


@pytest.mark.parametrize("bad,message", BAD)
@pytest.mark.parametrize("where", ["default", "group", "add_param_group"])
def test_bad_hyperparameters_are_refused_naming_the_argument(bad, message, where):
    first, second = _params()
    match = r"^lorambo\.optim\.AdamW: " + message
    if where == "add_param_group":
        opt = lorambo.optim.AdamW([first])
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [second], **bad})
        assert len(opt.param_groups) == 1  # refused before the group joined
        return
    groups = [first, second] if where == "default" else [{"params": [first]}, {"params": [second], **bad}]
    with pytest.raises(ValueError, match=match):
        lorambo.optim.AdamW(groups, **(bad if where == "default" else {}))

@pytest.mark.parametrize("settings", [
    {"lr": 0.0, "eps": 0.0, "weight_decay": 0.0, "betas": (0.0, 0.0)},
    {"lr": torch.tensor(0.05, dtype=DT), "betas": (0.5, 0.9), "weight_decay": 0.1},
    {"lr": 3e-2, "betas": (torch.tensor(0.8), torch.tensor(0.99)), "eps": 1e-6},
])
def test_valid_values_train_as_torch_adamw(settings):
    ours, theirs = _params(), _params()
    opt, ref = lorambo.optim.AdamW(ours, **settings), torch.optim.AdamW(theirs, **settings)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=DT) for p in ours]
        for p, q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
