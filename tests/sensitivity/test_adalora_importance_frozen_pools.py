"""AdaLoRAImportance with frozen pools: a frozen pool gets no gradient, so its layer's scores hold
the other pool's term alone. Checked against a float64 hand computation of AdaLoRA's smoothed
sensitivities; where some layers freeze a pool that others train, component_scores warns once,
naming them (they rank below equally important layers in a rank move)."""

import warnings

import pytest
import torch

import lorambo
from lorambo.sensitivity import AdaLoRAImportance

from residual_net import ResidualNet, mse

DT = torch.float64


def _model(frozen_a):
    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=4)
    gen = torch.Generator().manual_seed(1)
    for name, layer in lorambo.lora_layers(model).items():
        layer.lora_B.data[:, :2].normal_(generator=gen)
        if name in frozen_a:
            layer.lora_A.requires_grad_(False)
    return model


def _run(model, steps=2):
    importance = AdaLoRAImportance(model, beta1=0.8, beta2=0.7)
    gen = torch.Generator().manual_seed(2)
    samples = []  # per step: {(name, pool): |value * grad|} in float64
    for _ in range(steps):
        batch = (torch.randn(6, 8, generator=gen, dtype=DT), torch.randn(6, 8, generator=gen, dtype=DT))
        mse(model, batch).backward()
        samples.append({(n, p): (getattr(m, p).detach() * getattr(m, p).grad).abs()
                        for n, m in lorambo.lora_layers(model).items() for p in ("lora_A", "lora_B")
                        if getattr(m, p).grad is not None})
        importance.update()
        model.zero_grad()
    return importance, samples


def _reference_scores(samples, names):
    ibar, ubar = {}, {}
    for step in samples:
        for key, inst in step.items():
            i_old = ibar.get(key, torch.zeros_like(inst))
            ibar[key] = 0.8 * i_old + 0.2 * inst
            ubar[key] = 0.7 * ubar.get(key, torch.zeros_like(inst)) + 0.3 * (inst - ibar[key]).abs()
    scores = {}
    for name in names:
        s = torch.zeros(2, dtype=DT)
        if (name, "lora_A") in ibar:
            s += (ibar[name, "lora_A"] * ubar[name, "lora_A"])[:2].mean(1)
        if (name, "lora_B") in ibar:
            s += (ibar[name, "lora_B"] * ubar[name, "lora_B"])[:, :2].mean(0)
        scores[name] = s
    return scores


def test_a_lora_fa_layer_among_trained_ones_is_scored_by_b_alone_and_warned_about():
    frozen = "blocks.0.down"
    model = _model({frozen})
    importance, samples = _run(model)
    with pytest.warns(UserWarning, match=r"layers blocks.0.down \(lora_A\) hold a frozen pool"):
        got = importance.component_scores()
    want = _reference_scores(samples, list(lorambo.lora_layers(model)))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)  # statistics kept in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importance.component_scores()  # warned once


@pytest.mark.parametrize("frozen", ["none", "every"])
def test_the_same_pools_frozen_everywhere_does_not_warn(frozen):
    model = _model(set(lorambo.lora_layers(_model(set()))) if frozen == "every" else set())
    importance, samples = _run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = importance.component_scores()
    want = _reference_scores(samples, list(got))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("frozen_pools", [("lora_B",), ("lora_A", "lora_B")])
def test_a_layer_whose_lora_b_is_frozen_is_not_warned_about(frozen_pools):
    # a frozen lora_B (MiCA in some layers, a layer frozen whole for a phase) keeps its layer out
    # of every rank move (lorambo/allocation/frozen.py), so its missing term ranks it below nothing;
    # before, component_scores warned "blocks.0.down (lora_B) hold a frozen pool ... rank below"
    model = _model(set())
    layer = lorambo.lora_layers(model)["blocks.0.down"]
    for pool in frozen_pools:
        getattr(layer, pool).requires_grad_(False)
    importance, samples = _run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = importance.component_scores()
    want = _reference_scores(samples, list(got))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)


def test_a_pool_frozen_mid_run_is_scored_as_frozen_from_then_on():
    """Freezing lora_A of one layer after two updates drops its gathered statistics: that layer is
    scored by lora_B alone (the float64 reference of lora_B's four steps) and warned about, not by
    lora_A's term frozen at the step it froze next to the other layers' current ones."""
    frozen = "blocks.0.down"
    model = _model(set())
    importance, before = _run(model, steps=2)
    lorambo.lora_layers(model)[frozen].lora_A.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    after = []
    for _ in range(2):
        batch = (torch.randn(6, 8, generator=gen, dtype=DT), torch.randn(6, 8, generator=gen, dtype=DT))
        mse(model, batch).backward()
        after.append({(n, p): (getattr(m, p).detach() * getattr(m, p).grad).abs()
                      for n, m in lorambo.lora_layers(model).items() for p in ("lora_A", "lora_B")
                      if getattr(m, p).requires_grad})
        importance.update()
        model.zero_grad()
    with pytest.warns(UserWarning, match=r"layers blocks.0.down \(lora_A\) hold a frozen pool"):
        got = importance.component_scores()
    samples = [{key: value for key, value in step.items() if key != (frozen, "lora_A")} for step in before + after]
    want = _reference_scores(samples, list(lorambo.lora_layers(model)))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)
    assert (frozen, "A") not in importance.state_dict()["ibar"]
    assert importance.parameter_scores(frozen)[0].count_nonzero() == 0


def test_a_pool_frozen_after_the_last_update_is_not_scored_by_its_old_term():
    """component_scores read after a pool is frozen (no update since) leaves its term out too."""
    model = _model(set())
    importance, samples = _run(model, steps=3)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_A.requires_grad_(False)  # a LoRA-FA phase for every layer: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = importance.component_scores()
    samples = [{key: value for key, value in step.items() if key[1] == "lora_B"} for step in samples]
    want = _reference_scores(samples, list(got))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)


def test_update_with_gradients_only_in_frozen_pools_is_refused():
    """A gradient left in a pool frozen after backward is not folded in; with no other gradient,
    update() refuses as it does without any."""
    model = _model(set())
    mse(model, (torch.randn(6, 8, dtype=DT), torch.randn(6, 8, dtype=DT))).backward()
    for layer in lorambo.lora_layers(model).values():
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    importance = AdaLoRAImportance(model)
    with pytest.raises(RuntimeError, match=r"update\(\): none of its layers .* has a gradient"):
        importance.update()
    assert importance.steps == 0
