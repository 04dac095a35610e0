"""The Hessian estimators on Hugging Face models as shipped (SDPA attention, whose fused CPU
kernel has no double backward), checked against the same model switched to eager attention."""

import math
import warnings

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import hessian_opnorm, hessian_trace
from lorambo.sensitivity.attention import double_backward_attention

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]


@pytest.fixture(scope="module")
def minilm_and_batch():
    from lorambo.experiments.minilm import load_minilm

    model, tokenizer = load_minilm()
    model.eval()
    batch = tokenizer(["The quick brown fox jumps.", "Return the file name."], padding=True,
                      return_tensors="pt")
    return model, dict(batch)


def mean_pooled_loss(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1)).pow(2).mean()


def _eager_copy(model):
    import copy

    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def _close(a, b):
    assert math.isfinite(a) and abs(a - b) <= 1e-4 * max(abs(b), 1e-8) + 1e-6, (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method,probes", [("hutchinson", 2), ("hutch++", 3), ("xtrace", 4)])
def test_hessian_trace_runs_on_stock_minilm_and_matches_eager(minilm_and_batch, method, probes):
    model, batch = minilm_and_batch
    assert model.config._attn_implementation == "sdpa"  # the attention the model ships with
    got = hessian_trace(model, mean_pooled_loss, [batch], modules=MODULES, num_probes=probes,
                        method=method, seed=3)
    assert model.config._attn_implementation == "sdpa"  # restored
    ref = hessian_trace(_eager_copy(model), mean_pooled_loss, [batch], modules=MODULES,
                        num_probes=probes, method=method, seed=3)
    for name in MODULES:
        _close(got[name].value, ref[name].value)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_hessian_opnorm_runs_on_stock_minilm_and_matches_eager(minilm_and_batch):
    model, batch = minilm_and_batch
    got = hessian_opnorm(model, mean_pooled_loss, [batch], modules=MODULES[:1], num_iters=2)
    ref = hessian_opnorm(_eager_copy(model), mean_pooled_loss, [batch], modules=MODULES[:1], num_iters=2)
    _close(got[MODULES[0]].value, ref[MODULES[0]].value)


@pytest.mark.slow
def test_optimizer_default_hessian_on_stock_minilm(minilm_and_batch):
    model, batch = minilm_and_batch
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=8 * 768, target_modules=MODULES, num_probes=2)
    assert opt.sensitivity_method == "hessian"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # negative traces are clipped to 0
        ranks = opt.compute_optimal_ranks([batch], mean_pooled_loss)
    assert set(ranks) == set(MODULES) and sum(r * 768 for r in ranks.values()) <= 8 * 768
    assert all(math.isfinite(s) and s >= 0 for s in opt.sensitivities.values())


class _FakeHF(nn.Module):
    """Stands in for a transformers model configured with an attention lacking double backward."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
        self.inner = nn.Linear(2, 2)


def test_other_attention_is_switched_to_eager_and_restored_even_on_error():
    model = nn.Sequential(_FakeHF())
    hf = model[0]
    with double_backward_attention(model):
        assert hf.config._attn_implementation == "eager"
    assert hf.config._attn_implementation == "flash_attention_2"
    with pytest.raises(KeyError, match="boom"):
        with double_backward_attention(model):
            raise KeyError("boom")
    assert hf.config._attn_implementation == "flash_attention_2"


def test_sdpa_inside_runs_the_math_backend_with_double_backward():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float32, requires_grad=True) for _ in range(3))

    def second_derivative():
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(g.sum(), q)[0]

    with double_backward_attention(nn.Linear(1, 1)):
        inside = second_derivative()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = torch.softmax(qd @ kd.transpose(-1, -2) / 2.0, dim=-1)
    (g,) = torch.autograd.grad((scores @ vd).pow(2).sum(), qd, create_graph=True)
    ref = torch.autograd.grad(g.sum(), qd)[0]
    torch.testing.assert_close(inside.double(), ref, rtol=1e-4, atol=1e-5)
