"""Real padded Hugging Face batches (all-MiniLM-L6-v2): the same sentences padded right, left or
not at all, in one batch or several, give the same sensitivities as an independent reference
computed one unpadded sentence at a time."""

import pytest
import torch

from lorambo.nn.hook_inputs import layer_input
from lorambo.sensitivity import FisherProxy, data_covariance
from minilm_batches import BAD_TOKEN_MASKS, TEXTS, load
from minilm_batches import encode as _encode

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
           "encoder.layer.5.output.dense"]


@pytest.fixture(scope="module")
def minilm():
    return load()


def forward(model, batch):
    return model(**batch).last_hidden_state


def _reference_covariance(model, tokenizer):
    """E[x x^T] over the real tokens of every sentence, each run alone without padding."""
    modules = dict(model.named_modules())
    sums = {n: 0.0 for n in MODULES}
    count = 0
    for text in TEXTS:
        seen = {}
        handles = [modules[n].register_forward_hook(
            lambda m, a, k, o, n=n: seen.__setitem__(n, layer_input(a, k).detach().double()),
            with_kwargs=True) for n in MODULES]
        with torch.no_grad():
            forward(model, _encode(tokenizer, [text]))
        for h in handles:
            h.remove()
        for n in MODULES:
            x = seen[n].reshape(-1, seen[n].shape[-1])
            sums[n] = sums[n] + x.T @ x
        count += x.shape[0]
    return {n: s / count for n, s in sums.items()}


def _assert_same(got, want):
    for n in MODULES:  # every layer, every element
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("layout", ["one_at_a_time", "right", "left", "two_batches_left"])
def test_data_covariance_ignores_padding(minilm, layout):
    model, tokenizer = minilm
    if layout == "one_at_a_time":
        batches = [_encode(tokenizer, [t]) for t in TEXTS]
    elif layout == "two_batches_left":
        batches = [_encode(tokenizer, TEXTS[:2], "left"), _encode(tokenizer, TEXTS[2:], "left")]
    else:
        batches = [_encode(tokenizer, TEXTS, layout)]
    assert layout == "one_at_a_time" or bool((batches[0]["attention_mask"] == 0).any())
    _assert_same(data_covariance(model, forward, batches, modules=MODULES),
                 _reference_covariance(model, tokenizer))


def test_data_covariance_token_mask_callable_for_raw_text_batches(minilm):
    model, tokenizer = minilm
    encode = lambda texts: _encode(tokenizer, list(texts))  # noqa: E731
    got = data_covariance(model, lambda m, texts: forward(m, encode(texts)), [TEXTS], modules=MODULES,
                          token_mask=lambda texts: encode(texts)["attention_mask"])
    _assert_same(got, _reference_covariance(model, tokenizer))


def test_data_covariance_token_mask_none_counts_every_position(minilm):
    model, tokenizer = minilm
    batch = _encode(tokenizer, TEXTS)
    seen = {}
    module = dict(model.named_modules())[MODULES[0]]
    handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach().double()))
    with torch.no_grad():
        forward(model, batch)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])  # pads included
    got = data_covariance(model, forward, [batch], modules=MODULES[:1], token_mask=None)
    torch.testing.assert_close(got[MODULES[0]].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("token_mask,message", BAD_TOKEN_MASKS)
def test_data_covariance_bad_token_mask_is_a_clear_error(minilm, token_mask, message):
    model, tokenizer = minilm
    batch = _encode(tokenizer, TEXTS)
    assert batch["input_ids"].shape == (4, 13)
    with pytest.raises(ValueError, match="data_covariance: .*" + message):
        data_covariance(model, forward, [batch], modules=MODULES, token_mask=token_mask)


def per_sentence_loss(model, batch):
    """Mean over sentences of a loss on each one's masked-mean embedding (pads get no gradient)."""
    hidden = forward(model, batch)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1)).pow(2).sum(-1).mean()


@pytest.mark.parametrize("layout", ["one_at_a_time", "right", "left"])
def test_fisher_per_example_norms_ignore_padding(minilm, layout):
    """A padded sentence is one example: FisherProxy's mean ||g_n||^2 equals the mean over the
    sentences, each run alone, of ||d loss / dW||^2 from autograd."""
    from lorambo.sensitivity.targets import differentiable

    model, tokenizer = minilm
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in MODULES]
    with differentiable(weights):
        want = torch.tensor([[float(g.double().square().sum()) for g in
                              torch.autograd.grad(per_sentence_loss(model, _encode(tokenizer, [t])), weights)]
                             for t in TEXTS], dtype=torch.float64).mean(0)
        batches = ([_encode(tokenizer, [t]) for t in TEXTS] if layout == "one_at_a_time"
                   else [_encode(tokenizer, TEXTS, layout)])
        with FisherProxy(model, modules=MODULES) as fisher:
            for batch in batches:
                per_sentence_loss(model, batch).backward()  # FisherProxy follows passes that feed .grad
        model.zero_grad(set_to_none=True)  # the module-scoped model leaves the test as it came
    got = fisher.estimates()
    for i, name in enumerate(MODULES):
        assert got[name].num_probes == len(TEXTS)
        torch.testing.assert_close(torch.tensor(got[name].value, dtype=torch.float64), want[i], rtol=1e-4, atol=0)


HEAD = torch.randn(384, 5, generator=torch.Generator().manual_seed(0))


def _with_labels(batch):
    """Token labels (deterministic per token), -100 at pads: Hugging Face's convention."""
    labels = torch.where(batch["attention_mask"] == 1, batch["input_ids"] % 5, -100)
    return {**batch, "labels": labels}


def token_mean_loss(model, batch):
    """Hugging Face's token classification loss: cross-entropy averaged over every real token of
    the batch, so each sentence weighs by its number of tokens."""
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = forward(model, batch) @ HEAD
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _fisher_traces(model, batches, weights, **kwargs):
    with FisherProxy(model, modules=MODULES, **kwargs) as fisher:
        for batch in batches:
            token_mean_loss(model, batch).backward()  # FisherProxy follows passes that feed .grad
    model.zero_grad(set_to_none=True)  # the module-scoped model leaves the test as it came
    return fisher.estimates()


@pytest.mark.parametrize("layout", ["one_at_a_time", "right", "left", "one_and_three_left", "two_batches_right"])
def test_fisher_token_mean_ignores_padding_and_batching(minilm, layout):
    """reduction="token_mean": the trace is the mean over sentences of ||d L_n / dW||^2, L_n each
    sentence's own token mean, computed by autograd one unpadded sentence at a time."""
    from lorambo.sensitivity.targets import differentiable

    model, tokenizer = minilm
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in MODULES]
    splits = {"one_at_a_time": [[t] for t in TEXTS], "right": [TEXTS], "left": [TEXTS],
              "one_and_three_left": [TEXTS[:1], TEXTS[1:]], "two_batches_right": [TEXTS[:2], TEXTS[2:]]}[layout]
    side = "left" if "left" in layout else "right"
    batches = [_with_labels(_encode(tokenizer, texts, side)) for texts in splits]
    with differentiable(weights):
        want = torch.tensor([[float(g.double().square().sum()) for g in torch.autograd.grad(
            token_mean_loss(model, _with_labels(_encode(tokenizer, [t]))), weights)] for t in TEXTS],
            dtype=torch.float64).mean(0)
        got = _fisher_traces(model, batches, weights, reduction="token_mean")
    for i, name in enumerate(MODULES):
        assert got[name].num_probes == len(TEXTS)
        torch.testing.assert_close(torch.tensor(got[name].value, dtype=torch.float64), want[i], rtol=1e-4, atol=0)


@pytest.mark.parametrize("token_mask,drop_mask,message", [
    (lambda batch: batch["attention_mask"][:3], False,
     r"layer 'encoder.layer.0.attention.self.query' gets an input of shape \(4, 13, 384\).*\(3, 13\)"),
    ("auto", True, r"keyword arguments \['input_ids', 'position_ids', 'token_type_ids'\] have no attention_mask"),
])
def test_fisher_token_mean_bad_token_mask_is_a_clear_error(minilm, token_mask, drop_mask, message):
    from lorambo.sensitivity.targets import differentiable

    model, tokenizer = minilm
    batch = _with_labels(_encode(tokenizer, TEXTS))
    if drop_mask:
        del batch["attention_mask"]
    weights = [dict(model.named_modules())[n].weight for n in MODULES]
    with differentiable(weights), pytest.raises(ValueError, match=message):
        _fisher_traces(model, [batch], weights, reduction="token_mean", token_mask=token_mask)
