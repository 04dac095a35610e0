"""An int beyond the float range (10**400) given to a public numeric argument (a LoRAMBoLinear
dropout, a threshold of LoRAMBoOptimizer, lorambo.optim.AdamW's lr, default_capacity's
growth_factor, ...) is a ValueError (an AdapterFormatError for a file) naming the argument and
the number by its digit count, not Python's bare ``OverflowError: int too large to convert to
float``, which names no argument, nor accepted silently."""

import json

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear, LoRAMBoOptimizer, configure_model
from lorambo.allocation.alora import ALoRA, ALoRAConfig
from lorambo.allocation.online import OnlineGrowth
from lorambo.allocation.report import save_heatmap
from lorambo.nn import default_capacity
from lorambo.sensitivity import AdaLoRAImportance, hessian_opnorm

HUGE = 10**400
DIGITS = r"10000000\.\.\. \(a number of 401 digits\)"


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))


def _adapted():
    return configure_model(_plain(), 2, capacity=4)


def _pools():
    model = _adapted()
    return [p for p in model.parameters() if p.requires_grad]


def _batches():
    return [torch.randn(3, 6, generator=torch.Generator().manual_seed(0))]


CALLS = {
    "LoRAMBoLinear dropout": (lambda: LoRAMBoLinear(nn.Linear(6, 6), rank=2, dropout=HUGE), r"dropout " + DIGITS),
    "LoRAMBoLinear negative dropout": (lambda: LoRAMBoLinear(nn.Linear(6, 6), rank=2, dropout=-HUGE),
                                       r"dropout -1000000\.\.\. \(a number of 401 digits\)"),
    "configure_model dropout": (lambda: configure_model(_plain(), 2, dropout=HUGE), r"'0': dropout " + DIGITS),
    "configure_model alpha of an existing layer": (lambda: configure_model(_adapted(), 2, alpha=HUGE),
                                                   r"alpha=" + DIGITS + " was requested"),
    "configure_model alpha_pattern": (lambda: configure_model(_plain(), 2, alpha=2.0, alpha_pattern={"0": HUGE}),
                                      r"alpha_pattern\['0'\] = " + DIGITS),
    "default_capacity growth_factor": (lambda: default_capacity(2, 8, 8, growth_factor=HUGE),
                                       r"growth_factor=" + DIGITS),
    "LoRAMBoOptimizer growth_factor": (lambda: LoRAMBoOptimizer(_plain(), 64, growth_factor=HUGE),
                                       r"growth_factor=" + DIGITS),
    "LoRAMBoOptimizer loss_improvement_threshold": (
        lambda: LoRAMBoOptimizer(_plain(), 64, loss_improvement_threshold=HUGE),
        r"loss_improvement_threshold=" + DIGITS),
    "LoRAMBoOptimizer move_threshold": (lambda: LoRAMBoOptimizer(_plain(), 64, move_threshold=-HUGE),
                                        r"move_threshold=-1000000\.\.\."),
    "OnlineGrowth budget": (lambda: OnlineGrowth(lorambo.lora_layers(_adapted()), budget=HUGE), r"budget=" + DIGITS),
    "OnlineGrowth threshold": (lambda: OnlineGrowth(lorambo.lora_layers(_adapted()), budget=64, threshold=HUGE),
                               r"threshold=" + DIGITS),
    "AdaLoRAImportance beta1": (lambda: AdaLoRAImportance(_adapted(), beta1=HUGE), r"beta1 .*" + DIGITS),
    "AdaLoRAImportance beta2": (lambda: AdaLoRAImportance(_adapted(), beta2=HUGE), r"beta2 .*" + DIGITS),
    "hessian_opnorm tol": (lambda: hessian_opnorm(_plain(), lambda m, b: m(b).sum(), _batches(), tol=HUGE),
                           r"tol .*" + DIGITS),
    "optim.AdamW lr": (lambda: lorambo.optim.AdamW(_pools(), lr=HUGE), r"AdamW: lr=" + DIGITS),
    "optim.AdamW eps": (lambda: lorambo.optim.AdamW(_pools(), eps=HUGE), r"AdamW: eps=" + DIGITS),
    "optim.AdamW weight_decay": (lambda: lorambo.optim.AdamW(_pools(), weight_decay=HUGE),
                                 r"AdamW: weight_decay=" + DIGITS),
    "optim.AdamW add_param_group lr": (
        lambda: lorambo.optim.AdamW(_pools()[:1]).add_param_group({"params": _pools()[1:], "lr": HUGE}),
        r"AdamW: lr=" + DIGITS),
    "peft_config alpha": (lambda: lorambo.peft_config({"0": 2}, alpha=HUGE), r"alpha of '0' is " + DIGITS),
    "save_heatmap rank": (lambda: save_heatmap({"layer.0.q": HUGE}, "unused.png"), r"rank of layer .* is " + DIGITS),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_huge_int_is_a_value_error_naming_the_argument(name):
    call, match = CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()


def test_a_huge_int_in_adapter_config_is_a_format_error_naming_the_field(tmp_path):
    lorambo.export_peft(_adapted(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": HUGE}))
    with pytest.raises(lorambo.AdapterFormatError, match=r"lora_alpha is " + DIGITS + ", expected a finite number"):
        lorambo.import_peft(_plain(), tmp_path)
