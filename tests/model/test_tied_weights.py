"""An adapted layer whose base weight is tied to another module's (GPT-2's lm_head and wte):
merging would change the other module too (measured: logits moved by ~6 here), so unload(merge=True)
refuses it before touching anything, and configure_model warns."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import lorambo
from lorambo.integrations import fsdp


def _tied_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"'lm_head' is tied to \['transformer.wte.weight'\]"):
        lorambo.configure_model(model, 2, target_modules=["lm_head", "c_attn"])
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :2].normal_(std=0.5)
    return model


def test_merging_into_a_tied_weight_is_refused_and_nothing_changes():
    model, ids = _tied_gpt2(), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        embedding = model.transformer.wte.weight.detach().clone()
        with pytest.raises(ValueError, match=r"'lm_head' is tied to \['transformer.wte.weight'\].*nothing was changed"):
            lorambo.unload(model)
        assert set(lorambo.lora_layers(model)) == {"transformer.h.0.attn.c_attn", "lm_head"}
        assert not any(layer.merged for layer in lorambo.lora_layers(model).values())
        assert torch.equal(model.transformer.wte.weight, embedding)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_untied_it_merges_and_unload_without_merge_works():
    model, ids = _tied_gpt2(), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        head = lorambo.lora_layers(model)["lm_head"].base_layer
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
        plain = lorambo.unload(model)
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        other = _tied_gpt2()
        embedding = other.transformer.wte.weight.detach().clone()
        lorambo.unload(other, merge=False)
        assert torch.equal(other.transformer.wte.weight, embedding) and other.lm_head.weight is other.transformer.wte.weight


def test_the_unloaded_state_dict_of_a_tied_weight_is_refused_too():
    """fsdp.unloaded_state_dict (plain models too) merged into head.weight only, so the state
    dict held two different values for the one tied weight."""
    model = _tied_gpt2()
    with pytest.raises(ValueError, match=r"unloaded_state_dict\(merge=True\): the base weight of 'lm_head' is tied"):
        fsdp.unloaded_state_dict(model)
    state = fsdp.unloaded_state_dict(model, merge=False)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    head = lorambo.lora_layers(model)["lm_head"].base_layer
    with torch.no_grad():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
        ids = torch.randint(0, 64, (2, 7))
        want = model(input_ids=ids).logits
        fresh = GPT2LMHeadModel(model.config).eval()
        fresh.config.tie_word_embeddings = False
        fresh.lm_head.weight = nn.Parameter(fresh.lm_head.weight.detach().clone())
        fresh.load_state_dict(fsdp.unloaded_state_dict(model))
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_merging_the_tied_layer_itself_is_refused_and_untied_it_merges():
    """``layer.merge()`` (and so ``lorambo.integrations.fsdp.merge``) used to merge into the tied
    weight, changing the input embedding too (logits moved by ~10)."""
    model, ids = _tied_gpt2(), torch.randint(0, 64, (2, 7))
    for candidate in (model, copy.deepcopy(model)):  # a copy keeps its own tie
        head = lorambo.lora_layers(candidate)["lm_head"]
        with torch.no_grad():
            want = candidate(input_ids=ids).logits
            embedding = candidate.transformer.wte.weight.detach().clone()
        with pytest.raises(RuntimeError, match=r"'lm_head': the base weight is tied to \['transformer.wte.weight'\]"):
            head.merge()
        with pytest.raises(ValueError, match=r"^merge: the base weight of 'lm_head' is tied.*nothing was changed"):
            fsdp.merge(candidate)
        assert not any(layer.merged for layer in lorambo.lora_layers(candidate).values())
        with torch.no_grad():
            assert torch.equal(candidate.transformer.wte.weight, embedding)
            torch.testing.assert_close(candidate(input_ids=ids).logits, want, rtol=0, atol=0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        head = lorambo.lora_layers(model)["lm_head"]
        head.base_layer.weight = nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)  # untie
        expected = (head.base_layer.weight.double()
                    + head.scaling * head.lora_B[:, :2].double() @ head.lora_A[:2].double()).float()
        head.merge()
        assert torch.equal(head.base_layer.weight, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def _assigned_from_a_saved_state_dict(model, tmp_path):
    """A meta-device skeleton given ``model``'s state_dict through torch.save / torch.load and
    ``load_state_dict(assign=True)``: the head and the embedding become two Parameters over one
    storage (torch.load keeps the sharing, assign gives each key its own Parameter)."""
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with torch.device("meta"):
        skeleton = GPT2LMHeadModel(copy.deepcopy(model.config)).eval()
    return skeleton, torch.load(tmp_path / "model.pt", weights_only=True)


def test_a_tie_through_shared_memory_after_assign_is_refused_too(tmp_path):
    """Tied by memory, not by one Parameter object, the tie was not seen: unload(merge=True) and
    merge() wrote the adapter into the embedding too (moved by 0.78)."""
    model, ids = _tied_gpt2(), torch.randint(0, 64, (2, 7))
    skeleton, state = _assigned_from_a_saved_state_dict(model, tmp_path)
    with pytest.warns(UserWarning, match="'lm_head' is tied"):
        lorambo.configure_model(skeleton, 2, target_modules=["lm_head", "c_attn"])
    skeleton.load_state_dict(state, assign=True)
    head, wte = skeleton.lm_head, skeleton.transformer.wte
    assert head.base_layer.weight is not wte.weight and head.base_layer.weight.data_ptr() == wte.weight.data_ptr()
    embedding = wte.weight.detach().clone()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with pytest.raises(ValueError, match=r"'lm_head' is tied to \['transformer.wte.weight'\]"):
            lorambo.unload(skeleton)
        with pytest.raises(RuntimeError, match=r"tied to \['transformer.wte.weight'\]"):
            head.merge()
        assert not head.merged and torch.equal(wte.weight, embedding)
        torch.testing.assert_close(skeleton(input_ids=ids).logits, want, rtol=0, atol=0)


def test_a_plain_model_tied_through_shared_memory_is_seen_by_configure_model(tmp_path):
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    skeleton, state = _assigned_from_a_saved_state_dict(plain, tmp_path)
    skeleton.load_state_dict(state, assign=True)
    assert skeleton.lm_head.weight is not skeleton.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"'lm_head' is tied to \['transformer.wte.weight'\]"):
        lorambo.configure_model(skeleton, 2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"'lm_head' is tied to \['transformer.wte.weight'\]"):
        lorambo.unload(skeleton)
