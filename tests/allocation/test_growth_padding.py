"""Online growth on real padded Hugging Face batches (all-MiniLM-L6-v2): the same sentences
padded right, left or to a fixed length, in one batch or several, give the same growth decisions
and new rows of A as a reference captured one unpadded sentence at a time; with ``max_tokens``
the captured rows are the evenly spaced ones of the real tokens."""

import pytest
import torch

from minilm_batches import BAD_TOKEN_MASKS, TEXTS, encode, load
from padded_growth import MODULES, allocator, assert_same_decision, decide, sentence_sum_loss


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return load(torch.float64)


def _layout(tokenizer, layout):
    if layout == "one_at_a_time":
        return [encode(tokenizer, [t]) for t in TEXTS]
    if layout == "two_batches_left":
        return [encode(tokenizer, TEXTS[:1], "left"), encode(tokenizer, TEXTS[1:], "left")]
    if layout == "right_to_24":
        return [encode(tokenizer, TEXTS, "right", length=24)]
    return [encode(tokenizer, TEXTS, layout)]


@pytest.fixture(scope="module")
def reference(minilm):
    """One unpadded sentence per batch, captured without a mask: no pads anywhere."""
    model, tokenizer = minilm
    return decide(model, _layout(tokenizer, "one_at_a_time"), pass_batch=False)


@pytest.mark.parametrize("layout", ["right", "left", "right_to_24", "two_batches_left"])
def test_growth_decisions_and_new_rows_ignore_padding(minilm, reference, layout):
    model, tokenizer = minilm
    batches = _layout(tokenizer, layout)
    assert all(bool((b["attention_mask"] == 0).any()) for b in batches[-1:])
    records, _, _ = reference
    assert records and {r["layer"] for r in records} != set(MODULES)  # a choice was made
    assert_same_decision(decide(model, batches), reference)


@pytest.mark.parametrize("layout", ["right", "left", "right_to_24"])
def test_max_tokens_keeps_evenly_spaced_real_tokens(minilm, reference, layout):
    model, tokenizer = minilm
    max_tokens = 16
    got = decide(model, _layout(tokenizer, layout), max_tokens=max_tokens)
    for n in MODULES:
        xs, dys = zip(*reference[2][n])
        x, dy = torch.cat(xs), torch.cat(dys)  # every real token, sentence after sentence
        assert x.shape[0] > max_tokens
        pick = [i * (x.shape[0] - 1) // (max_tokens - 1) for i in range(max_tokens)]
        ((got_x, got_dy),) = got[2][n]
        torch.testing.assert_close(got_x, x[pick], rtol=1e-9, atol=1e-10, msg=n)
        torch.testing.assert_close(got_dy, dy[pick] * (x.shape[0] / max_tokens), rtol=1e-7, atol=1e-12, msg=n)
    if layout != "right":
        assert_same_decision(got, decide(model, _layout(tokenizer, "right"), max_tokens=max_tokens))


def test_capture_without_a_batch_keeps_every_position(minilm):
    """Code that passes no batch captures as before: pads included."""
    model, tokenizer = minilm
    batch = encode(tokenizer, TEXTS)
    _, _, pairs = decide(model, [batch], pass_batch=False)
    ((x, _),) = pairs[MODULES[0]]
    assert x.shape[0] == batch["input_ids"].numel() > int(batch["attention_mask"].sum())


@pytest.mark.parametrize("token_mask,message", BAD_TOKEN_MASKS)
def test_bad_token_mask_is_a_clear_error(minilm, token_mask, message):
    model, tokenizer = minilm
    batch = encode(tokenizer, TEXTS)
    assert batch["input_ids"].shape == (4, 13)
    with pytest.raises(ValueError, match=message):
        opt = allocator(model, token_mask=token_mask)
        with opt.capture(0, batch):
            sentence_sum_loss(opt.model, batch).backward()


def test_capture_keeps_real_rows_and_skips_calls_of_pads_only():
    from lorambo.allocation.online import ActivationCapture

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    capture = ActivationCapture({"l": layer})
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    with capture:
        for m in (torch.zeros_like(mask), mask):  # a batch of pads only, then a real one
            capture.set_token_mask(m)
            layer(x).pow(2).sum().backward()
    ((got_x, got_dy),) = capture.pairs("l")
    torch.testing.assert_close(got_x, x[mask], rtol=0, atol=0)
    torch.testing.assert_close(got_dy, (2 * layer(x))[mask].detach(), rtol=1e-6, atol=1e-7)
