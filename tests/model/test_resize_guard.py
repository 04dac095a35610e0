"""resize_token_embeddings on a model whose output head is adapted is refused before anything
changes. transformers resizes the input embedding first: with an untied adapted lm_head it then
raised its own TypeError naming LoRAMBoLinear, leaving input embeddings of 70 rows under a head of
64 (and config.vocab_size 64). The refusal says what to do: unload, resize, configure again."""

import copy
import warnings

import pytest
import torch

import lorambo
from lorambo.model.resize_guard import ResizeGuard

from tiny_causal_lms import tiny_gpt2, tiny_llama  # tests/model/tiny_causal_lms.py


def _adapted_llama():
    torch.manual_seed(0)
    model = tiny_llama().double().eval()
    model.config.tie_word_embeddings = False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    lorambo.configure_model(model, 2, target_modules=["lm_head", "q_proj"])
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :layer.rank].normal_(generator=torch.Generator().manual_seed(5))
    return model


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.vocab_size,
            model.get_input_embeddings().num_embeddings)


def _unchanged(model, snapshot):
    state, vocab, rows = snapshot
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in now)
            and model.config.vocab_size == vocab and model.get_input_embeddings().num_embeddings == rows)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("call,target", [
    (dict(new_num_tokens=70), 70), (dict(new_num_tokens=60), 60), (dict(new_num_tokens=64, pad_to_multiple_of=48), 96),
    (dict(pad_to_multiple_of=96), 96), (dict(new_num_tokens=70, pad_to_multiple_of=8), 72),
    # transformers takes True as 1 and rounds with a negative multiple too: (64 - 8 - 1) // -8 * -8 = 56;
    # both passed the guard, resized the input embedding and met the head's TypeError
    (dict(new_num_tokens=70, pad_to_multiple_of=True), 70), (dict(pad_to_multiple_of=-8), 56)])
def test_a_resize_under_an_adapted_untied_head_is_refused_changing_nothing(call, target):
    model = _adapted_llama()
    before, logits = _snapshot(model), model(input_ids=IDS).logits
    with pytest.raises(ValueError, match=rf"output embedding, LoRAMBoLinear 'lm_head', is adapted: its LoRA pools hold "
                                         rf"64 output rows, so the vocabulary cannot become {target}\. Nothing was "
                                         r"changed.*lorambo\.unload\(model\).*resize, and configure again"):
        model.resize_token_embeddings(**call)
    assert _unchanged(model, before)
    assert torch.equal(model(input_ids=IDS).logits, logits)


@pytest.mark.parametrize("pad,error,match", [("8", ValueError, "not and integer"), (0, ZeroDivisionError, "by zero"),
                                              (False, ZeroDivisionError, "by zero")])
def test_a_multiple_transformers_refuses_gets_its_own_error_changing_nothing(pad, error, match):
    model = _adapted_llama()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        model.resize_token_embeddings(70, pad_to_multiple_of=pad)
    assert _unchanged(model, before)


def test_a_resize_that_keeps_the_size_passes_through():
    model = _adapted_llama()
    before = _snapshot(model)
    assert model.resize_token_embeddings(64) is model.get_input_embeddings()
    assert model.resize_token_embeddings(pad_to_multiple_of=32).num_embeddings == 64
    assert _unchanged(model, before)


def test_unload_resize_and_configure_again_works_and_guards_again():
    model = _adapted_llama()
    adapted = model(input_ids=IDS).logits
    lorambo.unload(model, merge=True)
    assert "resize_token_embeddings" not in vars(model)  # the guard goes with the adapters
    model.resize_token_embeddings(70, mean_resizing=False)
    assert model.lm_head.weight.shape == (70, 32) and model.config.vocab_size == 70
    resized = model(input_ids=IDS).logits
    torch.testing.assert_close(resized[..., :64], adapted, rtol=1e-12, atol=1e-12)  # float64: merge roundoff
    lorambo.configure_model(model, 2, target_modules=["lm_head"])
    assert lorambo.lora_layers(model)["lm_head"].out_features == 70
    with pytest.raises(ValueError, match="cannot become 80"):
        model.resize_token_embeddings(80)


def test_a_deep_copy_has_a_guard_of_its_own():
    model = _adapted_llama()
    twin = copy.deepcopy(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="cannot become 70"):
        twin.resize_token_embeddings(70)
    lorambo.unload(twin)
    twin.resize_token_embeddings(70)  # the copy's own guard went with its adapters
    assert twin.get_input_embeddings().num_embeddings == 70 and _unchanged(model, before)
    with pytest.raises(ValueError, match="cannot become 70"):
        model.resize_token_embeddings(70)


def test_a_resize_under_an_adapted_tied_head_is_refused_changing_nothing():
    """GPT-2's lm_head shares wte's weight: the resize replaced the shared weight in place and only
    then met out_features' refusal, leaving a head whose base weight had 70 rows over 64-row pools."""
    torch.manual_seed(0)
    model = tiny_gpt2().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lm_head is tied to wte (tested elsewhere)
        lorambo.configure_model(model, 2, target_modules=["lm_head", "c_attn"])
    before, logits = _snapshot(model), model(input_ids=IDS).logits
    with pytest.raises(ValueError, match="LoRAMBoLinear 'lm_head', is adapted.*cannot become 70"):
        model.resize_token_embeddings(70)
    assert _unchanged(model, before) and model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model(input_ids=IDS).logits, logits)


def test_a_wrong_call_gets_transformers_own_error_changing_nothing():
    model = _adapted_llama()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="not_an_argument"):
        model.resize_token_embeddings(70, not_an_argument=1)
    assert _unchanged(model, before)


def test_only_a_model_with_the_method_and_an_adapted_head_gets_a_guard():
    """No guard (an instance attribute) on a model whose head is plain, nor on a module without
    transformers' method (a holder that hands out the adapted head): ``hasattr`` stays False."""
    torch.manual_seed(0)
    plain_head = tiny_llama().eval()
    lorambo.configure_model(plain_head, 2, target_modules=["q_proj"])
    assert "resize_token_embeddings" not in vars(plain_head)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama()
            self.lm.config.tie_word_embeddings = False

        def get_output_embeddings(self):
            return self.lm.get_output_embeddings()

    holder = Holder()
    lorambo.configure_model(holder, 2, target_modules=["lm_head"])
    assert isinstance(holder.get_output_embeddings(), lorambo.LoRAMBoLinear)
    assert not hasattr(holder, "resize_token_embeddings")
    assert isinstance(vars(holder.lm)["resize_token_embeddings"], ResizeGuard)
