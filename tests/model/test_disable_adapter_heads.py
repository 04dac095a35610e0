"""disable_adapter's frozen modules_to_save are built from the recorded original tensors, not by
copying the trained module (its parameters and their gradients) and overwriting it: the reference
pass of DPO-style training enters the context every step."""

import copy
import io
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lorambo
from lorambo import configure_model, disable_adapter
from lorambo.model.modules_to_save import original_state


def _trained():
    torch.manual_seed(0)
    head = nn.Sequential(OrderedDict(lin=nn.Linear(8, 3), bn=nn.BatchNorm1d(3)))
    base = nn.Sequential(OrderedDict(body=nn.Linear(5, 8), act=nn.Tanh(), head=head))
    base(torch.randn(12, 5))  # running stats away from their start values
    model = configure_model(copy.deepcopy(base), 2, target_modules=["body"], modules_to_save=["head"])
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(12, 5)).square().sum().backward()
    opt.step()
    model(torch.randn(12, 5)).square().sum().backward()  # gradients held across the context
    return base.double().eval(), model.double().eval()  # a dtype change after configure_model


def test_reference_pass_uses_originals_and_leaves_the_trained_head_alone():
    base, model = _trained()
    head = model.head
    params = {n: (p, p.detach().clone(), p.grad.clone()) for n, p in head.named_parameters()}
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with disable_adapter(model):
        frozen = model.head
        assert frozen is not head
        for name, p in frozen.named_parameters():
            assert p.dtype == torch.float64 and not p.requires_grad
            assert p.grad is None, f"the reference head's {name} carries the trained gradient"
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert model.head is head
    for name, p in head.named_parameters():
        same, value, grad = params[name]
        assert p is same
        torch.testing.assert_close(p, value, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)


def test_entering_does_not_copy_the_head_parameters():
    """Each entry reused the recorded original tensors: no copy of a large head per reference pass."""
    base, model = _trained()
    model.float()  # back to the dtype the originals were recorded in
    originals = original_state(model)["head"]
    for _ in range(2):
        with disable_adapter(model):
            for name, p in model.head.named_parameters():
                assert p.data_ptr() == originals[name].data_ptr(), f"{name} was copied on entry"


def test_a_head_to_save_resized_after_configure_is_refused_naming_it():
    """resize_token_embeddings after configure_model: the recorded original lm_head has 64 rows,
    the head 70. The reference pass ran a 64-row copy under out_features=70 and returned 64
    logits per token instead of 70; it is refused, and the model is left as it was."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    lorambo.configure_model(model, 2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    model.resize_token_embeddings(70, mean_resizing=False)
    ids = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    head = model.lm_head
    with pytest.raises(RuntimeError, match=r"disable_adapter: lm_head\.weight is now \[70, 32\], but its state "
                                           r"recorded by configure_model is \[64, 32\]"):
        with lorambo.disable_adapter(model):
            pass
    assert model.lm_head is head and not any(layer.adapter_disabled for layer in lorambo.lora_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("call", ["save_adapter", "export_peft"])
def test_saving_inside_the_context_is_refused_naming_the_heads(tmp_path, call):
    """Inside disable_adapter the heads to save are frozen copies of their state before
    configure_model: a file written there held the untrained head in place of the trained one,
    and loaded back it changed the model's outputs without a word. Refused, nothing written."""
    _, model = _trained()
    target = tmp_path / "adapter"
    with disable_adapter(model):
        with pytest.raises(RuntimeError, match=rf"{call}: called inside lorambo\.disable_adapter.*\['head'\]"):
            getattr(lorambo, call)(model, target)
    assert not target.exists()
    getattr(lorambo, call)(model, target)  # after the with-block it saves the trained head


def test_loading_inside_the_context_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    """load_adapter inside the context wrote the file's head into the frozen copy, which the exit
    then dropped: the trained head stayed as it was while the pools took the file's values."""
    _, model = _trained()
    _, other = _trained()
    with torch.no_grad():
        other.head.lin.weight.add_(1.0)
        other.body.lora_A[:other.body.rank].add_(0.5)
    lorambo.save_adapter(other, tmp_path / "adapter")
    before = _snapshot(model)
    with disable_adapter(model):
        with pytest.raises(RuntimeError, match=r"load_adapter: called inside lorambo\.disable_adapter.*\['head'\]"):
            lorambo.load_adapter(model, tmp_path / "adapter")
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


_CAPTURES = {
    "state_dict": lambda model, state: model.state_dict(),
    "load_state_dict": lambda model, state: model.load_state_dict(state),
    "copy.deepcopy": lambda model, state: copy.deepcopy(model),
    "pickling": lambda model, state: torch.save(model, io.BytesIO()),
}


@pytest.mark.parametrize("call", sorted(_CAPTURES))
def test_capturing_or_restoring_the_model_inside_the_context_is_refused(call):
    """Inside the context the heads to save are the frozen originals: a state_dict held the
    untrained head beside the trained pools; load_state_dict wrote into the recorded originals
    themselves, so every later reference pass ran the loaded head; a deepcopy kept the frozen head
    and the disabled layers for good. Each is refused, naming the call, and changes nothing."""
    base, model = _trained()
    trained_state = _snapshot(model)
    # the pools keep their values: slots past the rank must stay zero for a load to pass lorambo's checks
    changed = {k: v + 1.0 if v.is_floating_point() and "lora_" not in k else v for k, v in trained_state.items()}
    originals = {k: v.clone() for k, v in original_state(model)["head"].items()}
    with disable_adapter(model):
        with pytest.raises(RuntimeError, match=rf"^{re.escape(call)}.*: called inside lorambo\.disable_adapter.*\['head'\]"):
            _CAPTURES[call](model, changed)
    for key, value in original_state(model)["head"].items():
        torch.testing.assert_close(value, originals[key], rtol=0, atol=0, msg=key)
    after = _snapshot(model)
    for key, value in trained_state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with disable_adapter(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    _CAPTURES[call](model, trained_state)  # after the with-block each works on the trained model
    assert not model._state_dict_pre_hooks and not model._load_state_dict_pre_hooks


def test_a_module_holding_a_head_refuses_its_state_dict_inside_the_context():
    """Not only the model given to disable_adapter: a state_dict of any module holding a frozen
    head (here a block of the model) gave that head's untrained values."""
    torch.manual_seed(0)
    block = nn.Sequential(OrderedDict(proj=nn.Linear(5, 5), head=nn.Linear(5, 3)))
    model = configure_model(nn.Sequential(OrderedDict(body=nn.Linear(4, 5), block=block)), 2,
                            target_modules=["body", "proj"], modules_to_save=["block.head"])
    with torch.no_grad():
        model.block.head.weight.add_(1.0)
    with disable_adapter(model):
        with pytest.raises(RuntimeError, match=r"^state_dict: called inside lorambo\.disable_adapter.*\['block\.head'\]"):
            model.block.state_dict()
    torch.testing.assert_close(model.block.state_dict()["head.weight"], model.block.head.weight, rtol=0, atol=0)
