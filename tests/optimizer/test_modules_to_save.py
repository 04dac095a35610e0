"""LoRAMBoOptimizer(..., modules_to_save=[...]): configure() keeps a classification head trainable
(before, the allocator had no such argument, configure() froze the head and FrozenHeadWarning
pointed to configure_model alone). The head's first AdamW step is checked against the step
written out in float64 from the head's input, and save_adapter / load_adapter carry it."""

import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lorambo import LoRAMBoOptimizer, load_adapter, lora_layers, save_adapter
from lorambo.model.frozen_heads import FrozenHeadWarning

DT = torch.float64
TARGETS = ["query", "value"]
LABELS = torch.tensor([0, 2, 1])
LR, WD, EPS = 1e-2, 0.01, 1e-8


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(DT).eval()


def _ids():
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))


def _allocator(model, **kwargs):
    return LoRAMBoOptimizer(model, total_budget=256, sensitivity_method="frobenius", target_modules=TARGETS,
                            **kwargs)


def _configured_with_head():
    model = _bert()
    opt = _allocator(model, modules_to_save=["classifier"])
    opt.compute_optimal_ranks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenHeadWarning)  # the head is not frozen, so no warning
        opt.configure()
    return model, opt


def test_the_head_trains_as_a_float64_adamw_step_says_and_round_trips(tmp_path):
    model, opt = _configured_with_head()
    head = model.classifier
    assert all(p.requires_grad for p in head.parameters())
    torch_opt = opt.make_optimizer(lr=LR, weight_decay=WD, eps=EPS)
    assert any(p is head.weight for g in torch_opt.param_groups for p in g["params"])
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    logits = model(input_ids=_ids()).logits
    handle.remove()
    torch.nn.functional.cross_entropy(logits, LABELS).backward()
    torch_opt.step()

    # reference: the cross-entropy gradient of a linear head written out, then AdamW's first step
    # (bias-corrected moments are g and g^2), all in float64
    x = seen[0]
    delta = (torch.softmax(x @ w0.T + b0, dim=-1) - torch.nn.functional.one_hot(LABELS, 3).to(DT)) / len(LABELS)
    for p, p0, g in ((head.weight, w0, delta.T @ x), (head.bias, b0, delta.sum(0))):
        want = p0 * (1 - LR * WD) - LR * g / (g.abs() + EPS)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        assert not torch.equal(p.detach(), p0)

    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(_bert(), tmp_path / "adapter")  # the same base; its head is still w0, b0
    for key, value in model.classifier.state_dict().items():
        assert torch.equal(fresh.classifier.state_dict()[key], value), key
    ids = _ids()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("entry,message", [
    ("classifer", "LoRAMBoOptimizer: modules_to_save entry 'classifer' matches no module of "
                  "BertForSequenceClassification"),
    ("bert.encoder.layer.0.attention.self.query", "LoRAMBoOptimizer: module "
     "'bert.encoder.layer.0.attention.self.query' is both in modules_to_save and a LoRA target"),
])
def test_a_bad_entry_is_refused_at_construction_and_nothing_changes(entry, message):
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        _allocator(model, modules_to_save=[entry])
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_state_records_modules_to_save():
    model, opt = _configured_with_head()
    opt.make_optimizer(lr=LR)
    state = opt.state_dict()
    assert state["settings"]["modules_to_save"] == ["classifier"]
    opt.load_state_dict(state)  # the same settings load
    other = LoRAMBoOptimizer(model, total_budget=256, sensitivity_method="frobenius")  # its LoRA layers
    other.make_optimizer(lr=LR)
    with pytest.raises(ValueError, match=r"other settings .*'modules_to_save': \(\['classifier'\], None\)"):
        other.load_state_dict(state)
