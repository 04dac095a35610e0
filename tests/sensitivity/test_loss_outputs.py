"""What loss_fn may return: a scalar tensor, or a Hugging Face ModelOutput carrying ``loss``
(``lambda model, batch: model(**batch)`` with labels in the batch); anything else is an error
naming the estimator and the type. Dict and tuple batches are handed to loss_fn as they are."""

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import lorambo
from lorambo.sensitivity import gradient_sensitivity, hessian_trace
from lorambo.sensitivity.ablation import ablation_scores

DT = torch.float64


class Classifier(nn.Module):
    """A model called as HF models are: ``model(input=..., labels=...) -> ModelOutput``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7, dtype=DT), nn.Tanh(), nn.Linear(7, 3, dtype=DT))

    def forward(self, input, labels=None):
        logits = self.net(input)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(6, 5, generator=g, dtype=DT), "labels": torch.randint(0, 3, (6,), generator=g)}
            for _ in range(2)]


def model_output(model, batch):
    return model(**batch)


def tensor_loss(model, batch):  # the same loss, from a tuple view of the batch
    x, y = batch["input"], batch["labels"]
    return nn.functional.cross_entropy(model(x).logits, y)


def _lora_model():
    torch.manual_seed(0)
    model = lorambo.configure_model(Classifier(), {"net.0": 2, "net.2": 2})
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :layer.rank].normal_()
    return model


@pytest.mark.parametrize("estimate", [
    lambda m, f, b: gradient_sensitivity(m, f, b),
    lambda m, f, b: {n: e.value for n, e in hessian_trace(m, f, b, num_probes=4).items()},
    lambda m, f, b: {n: a.score for n, a in ablation_scores(m, f, b).items()},
], ids=["gradient", "hessian", "ablation"])
def test_model_output_loss_is_accepted_and_matches_the_tensor_loss(estimate):
    model, batches = _lora_model(), _batches()
    got, want = estimate(model, model_output, batches), estimate(model, tensor_loss, batches)
    assert got.keys() == want.keys() and len(got) == 2
    for name in want:
        torch.testing.assert_close(torch.as_tensor(got[name]), torch.as_tensor(want[name]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimate,who", [
    (lambda m, f, b: gradient_sensitivity(m, f, b), "gradient_sensitivity"),
    (lambda m, f, b: hessian_trace(m, f, b, num_probes=2), "hessian_trace"),
    (lambda m, f, b: ablation_scores(m, f, b), "ablation_scores"),
], ids=["gradient", "hessian", "ablation"])
@pytest.mark.parametrize("loss_fn,kind", [
    (lambda m, b: m(b["input"]), "SequenceClassifierOutput without a loss"),
    (lambda m, b: (m(**b).loss, m(**b).logits), "tuple"),
])
def test_unusable_loss_is_an_error_naming_the_estimator_and_type(estimate, who, loss_fn, kind):
    with pytest.raises(TypeError, match=rf"{who}: loss_fn must return a scalar tensor.*got {kind}"):
        estimate(_lora_model(), loss_fn, _batches())


@pytest.mark.parametrize("method", ["gradient", "hessian"])
def test_a_non_scalar_loss_names_the_allocator_method_and_the_shape(method):
    # before: "targets_without_gradient: loss_fn must return ...", a function the user never called
    opt = lorambo.LoRAMBoOptimizer(Classifier(), total_budget=100, sensitivity_method=method, num_probes=2)
    per_example = lambda m, b: nn.functional.cross_entropy(m(**b).logits, b["labels"], reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"^LoRAMBoOptimizer.compute_sensitivities: loss_fn must return a scalar "
                                         r"tensor, got shape \(6,\)"):
        opt.compute_optimal_ranks(_batches(), per_example)
