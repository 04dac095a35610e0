"""AdaLoRA importance: EMA of |theta * grad| times its uncertainty, per component."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance


def test_matches_the_adalora_recursion_by_hand():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 2, capacity=4)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :2].normal_()
    tracker = AdaLoRAImportance(model, beta1=0.8, beta2=0.7)
    ibar = {}
    ubar = {}
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(9, 6)).pow(2).mean().backward()
        tracker.update()
        for name, layer in lorambo.lora_layers(model).items():
            for which in "AB":
                p = getattr(layer, "lora_" + which)
                inst = (p.detach() * p.grad).abs()
                key = (name, which)
                ibar[key] = 0.8 * ibar.get(key, torch.zeros_like(inst)) + 0.2 * inst
                ubar[key] = 0.7 * ubar.get(key, torch.zeros_like(inst)) + 0.3 * (inst - ibar[key]).abs()
    scores = tracker.component_scores()
    for name, layer in lorambo.lora_layers(model).items():
        s_a = ibar[(name, "A")] * ubar[(name, "A")]
        s_b = ibar[(name, "B")] * ubar[(name, "B")]
        want = s_a[:2].mean(1) + s_b[:, :2].mean(0)
        torch.testing.assert_close(scores[name], want.double(), rtol=1e-5, atol=1e-12)
        assert scores[name].shape == (layer.rank,) and bool((scores[name] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pools_are_scored_from_the_exact_products(dtype):
    # |theta * grad| of fp16 pools (1e-3 * 1e-5) underflowed to 0 in fp16 (every score 0: rank moves
    # decided by ties); bf16 rounded it to 3 digits
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)).to(dtype), 3, capacity=4)
    layer = lorambo.lora_layers(model)["0"]
    gen = torch.Generator().manual_seed(4)
    tracker = AdaLoRAImportance(model, beta1=0.8, beta2=0.7)
    ibar, ubar = {}, {}
    with torch.no_grad():
        layer.lora_A[:3] = (torch.randn(3, 6, generator=gen) * 1e-3).to(dtype)
        layer.lora_B[:, :3] = (torch.randn(5, 3, generator=gen) * 1e-3).to(dtype)
    for _ in range(3):
        for which, p in (("A", layer.lora_A), ("B", layer.lora_B)):
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-5).to(dtype)
            inst = (p.detach().double() * p.grad.double()).abs()  # float64 oracle
            ibar[which] = 0.8 * ibar.get(which, torch.zeros_like(inst)) + 0.2 * inst
            ubar[which] = 0.7 * ubar.get(which, torch.zeros_like(inst)) + 0.3 * (inst - ibar[which]).abs()
        tracker.update()
    want = (ibar["A"] * ubar["A"])[:3].mean(1) + (ibar["B"] * ubar["B"])[:, :3].mean(0)
    torch.testing.assert_close(tracker.component_scores()["0"], want, rtol=1e-5, atol=0.0)


def test_keep_and_reset_follow_rank_changes():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)), 3, capacity=4)
    layer = lorambo.lora_layers(model)["0"]
    layer.lora_B.data[:, :3].normal_()
    tracker = AdaLoRAImportance(model)
    model(torch.randn(4, 6)).sum().backward()
    tracker.update()
    before = tracker.component_scores()["0"]
    layer.keep_components([2, 0])
    tracker.keep("0", [2, 0])
    torch.testing.assert_close(tracker.component_scores()["0"], before[[2, 0]])
    tracker.reset("0", [1])
    assert float(tracker.component_scores()["0"][1]) == 0.0


def test_bad_beta():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)), 1)
    with pytest.raises(ValueError, match=r"beta1 must be a number in \[0, 1\), got 1.0"):
        AdaLoRAImportance(model, beta1=1.0)


def test_keep_and_reset_refuse_bad_layers_and_slots():
    # reset(name, [-1]) used to forget the last slot (torch's negative indexing), [1.5] or [True]
    # slot 1, an unknown name nothing at all, and keep() took duplicates: all without a word
    torch.manual_seed(3)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)), 4, capacity=4)
    layer = lorambo.lora_layers(model)["0"]
    layer.lora_B.data.normal_()
    tracker = AdaLoRAImportance(model)
    model(torch.randn(9, 6)).pow(2).mean().backward()
    tracker.update()
    before = tracker.parameter_scores("0")
    assert bool((before[0] > 0).all()) and bool((before[1] > 0).all())  # every slot has statistics
    with pytest.raises(ValueError, match=r"'0': AdaLoRAImportance.reset slots \[-1\] outside \[0, capacity = 4\)"):
        tracker.reset("0", [-1])
    for bad in (1.5, True):
        with pytest.raises(TypeError, match=rf"'0': slot must be an int, got {bad}"):
            tracker.reset("0", [bad])
    with pytest.raises(ValueError, match=r"AdaLoRAImportance.reset: unknown layer '0.weight'"):
        tracker.reset("0.weight", [0])
    with pytest.raises(ValueError, match=r"AdaLoRAImportance.keep slots must be distinct, got \[1, 1\]"):
        tracker.keep("0", [1, 1])
    with pytest.raises(ValueError, match=r"AdaLoRAImportance.keep: unknown layer 'x'"):
        tracker.keep("x", [0])
    after = tracker.parameter_scores("0")
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_update_without_gradients_and_scores_without_updates_are_refused():
    # before: update() after zero_grad() counted a step that folded nothing in, and
    # component_scores() before any update() gave all zeros, on which rank moves then acted
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 2, capacity=4)
    tracker = AdaLoRAImportance(model)
    with pytest.raises(RuntimeError, match=r"component_scores\(\): no update\(\) yet"):
        tracker.component_scores()
    with pytest.raises(RuntimeError, match=r"update\(\): none of its layers \['0', '1'\] has a gradient: call it "
                                           r"after loss.backward\(\) and before optimizer.zero_grad\(\)"):
        tracker.update()
    assert tracker.steps == 0 and not tracker.state_dict()["ibar"]
    model(torch.randn(3, 6)).pow(2).mean().backward()
    tracker.update()
    assert tracker.steps == 1 and set(tracker.component_scores()) == {"0", "1"}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_step_with_non_finite_gradients_is_left_out(bad):
    # a GradScaler step that overflowed (the scaler skips it) made Ibar inf and Ubar NaN for good:
    # every later score of the component was NaN, and a decision with rank moves raised
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 3, capacity=4)
    gen = torch.Generator().manual_seed(7)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :3].normal_(generator=gen)
    tracker = AdaLoRAImportance(model, beta1=0.8, beta2=0.7)
    ibar, ubar = {}, {}
    for step in range(4):
        model.zero_grad()
        model(torch.randn(9, 6, generator=gen)).pow(2).mean().backward()
        if step == 1:  # one entry of one layer's gradient overflowed
            lorambo.lora_layers(model)["1"].lora_B.grad[2, 1] = bad
            assert not tracker.update()
            continue
        assert tracker.update()
        for name, layer in lorambo.lora_layers(model).items():
            for which in "AB":
                p = getattr(layer, "lora_" + which)
                inst = (p.detach().double() * p.grad.double()).abs()  # float64 oracle
                key = (name, which)
                ibar[key] = 0.8 * ibar.get(key, torch.zeros_like(inst)) + 0.2 * inst
                ubar[key] = 0.7 * ubar.get(key, torch.zeros_like(inst)) + 0.3 * (inst - ibar[key]).abs()
    assert (tracker.steps, tracker.skipped_steps) == (3, 1)
    scores = tracker.component_scores()
    for name in ("0", "1"):
        s_a, s_b = ibar[(name, "A")] * ubar[(name, "A")], ibar[(name, "B")] * ubar[(name, "B")]
        torch.testing.assert_close(scores[name], s_a[:3].mean(1) + s_b[:, :3].mean(0), rtol=1e-5, atol=0)


def test_scores_after_only_overflowed_steps_are_refused_saying_so():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)), 2, capacity=4)
    tracker = AdaLoRAImportance(model)
    model(torch.randn(3, 6)).pow(2).mean().mul(float("inf")).backward()
    assert not tracker.update()
    with pytest.raises(RuntimeError, match=r"no update\(\) yet \(1 left out: their gradients were not finite\)"):
        tracker.component_scores()
